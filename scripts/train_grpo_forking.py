"""Forking-token GRPO as a TRL-style script: copy it, change the prompt, keep the flags.

TRL's ``grpo.py`` with ``GRPOTrainer`` swapped for ``ForkingGRPOTrainer``. Every field of TRL's
``ScriptArguments``, ``GRPOConfig`` and ``ModelConfig`` and of rlvr's ``ForkingConfig`` and
``MoEConfig`` is a flag (``--help`` lists them); ``--config my.yaml`` reads them from a file.

    python scripts/train_grpo_forking.py --model_name_or_path Qwen/Qwen3-30B-A3B \\
        --dataset_name openai/gsm8k --dataset_config main --output_dir runs/qwen3 \\
        --rho 0.2 --router_gate_scope forking --max_steps 500 --learning_rate 1e-6
    accelerate launch --config_file rlvr/configs/deepspeed/zero3.yaml scripts/train_grpo_forking.py ...

The dataset needs a question column (``--question_column``) and a gold-answer column named ``answer``
or ``solution`` (GSM8K's ``... #### 72`` works as it is); rewards are rlvr's ``math_accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import load_dataset
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from rlvr import ForkingConfig, ForkingGRPOTrainer, MoEConfig, math_accuracy


@dataclass
class PromptArguments:
    question_column: str = field(default="question", metadata={"help": "dataset column holding the question"})
    instruction: str = field(
        default="Put the final answer in \\boxed{}.", metadata={"help": "appended to every question"}
    )


def main() -> None:
    parser = TrlParser((ScriptArguments, PromptArguments, GRPOConfig, ModelConfig, ForkingConfig, MoEConfig))
    script, prompt, training, model, forking, moe = parser.parse_args_and_config()

    dataset = load_dataset(script.dataset_name, script.dataset_config, split=script.dataset_train_split)
    dataset = dataset.map(
        lambda row: {"prompt": [{"role": "user", "content": f"{row[prompt.question_column]}\n{prompt.instruction}"}]}
    )
    training.model_init_kwargs = {"dtype": model.dtype, "attn_implementation": model.attn_implementation}
    trainer = ForkingGRPOTrainer(
        model=model.model_name_or_path,
        reward_funcs=[math_accuracy],
        args=training,
        train_dataset=dataset,
        peft_config=get_peft_config(model),
        forking=forking,
        moe=moe,
    )
    trainer.train()
    trainer.save_model(training.output_dir)
    math_accuracy.close()


if __name__ == "__main__":
    main()
