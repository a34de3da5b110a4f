"""Helper for test_distributed.py (not a test module): the forking-token loss of one fixed global batch.

Run as a single process or under torchrun; each rank computes the loss of its share of the rows and
writes it to <out>/loss-<rank>.json.

    python tests/distributed_loss.py MODEL_DIR OUT_DIR
"""

import json
import os
import sys
import warnings

import torch
from trl import GRPOConfig

from rlvr.config import ForkingConfig
from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import load_pretrained
from rlvr.trainer import GROUP_IDS_KEY, ForkingGRPOTrainer

GLOBAL_ROWS, GENERATIONS, PROMPT, COMPLETION = 16, 4, 6, 12


def fixed_global_batch(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(123)
    completion_mask = torch.ones(GLOBAL_ROWS, COMPLETION, dtype=torch.long)
    lengths = torch.randint(2, COMPLETION + 1, (GLOBAL_ROWS,), generator=generator)
    completion_mask[torch.arange(COMPLETION)[None, :] >= lengths[:, None]] = 0  # right padding
    return {
        "prompt_ids": torch.randint(5, vocab, (GLOBAL_ROWS, PROMPT), generator=generator),
        "prompt_mask": torch.ones(GLOBAL_ROWS, PROMPT, dtype=torch.long),
        "completion_ids": torch.randint(5, vocab, (GLOBAL_ROWS, COMPLETION), generator=generator),
        "completion_mask": completion_mask,
        "advantages": torch.randn(GLOBAL_ROWS, generator=generator),
        "num_items_in_batch": completion_mask.sum(),
        GROUP_IDS_KEY: torch.arange(GLOBAL_ROWS) // GENERATIONS,
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model, tokenizer = load_pretrained(model_dir)
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=GLOBAL_ROWS // world,
        num_generations=GENERATIONS, max_completion_length=COMPLETION, use_cpu=True, bf16=False, report_to=[],
        beta=0.0, loss_type="dapo", seed=0, save_strategy="no", router_aux_loss_coef=0.0,
    )
    trainer = ForkingGRPOTrainer(
        model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
        train_dataset=problems_to_dataset(generate_problems(ArithmeticTask(), "train", 16, 0)),
        processing_class=tokenizer, forking=ForkingConfig(rho=0.2, scope="micro_batch"),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = fixed_global_batch(len(tokenizer))
    rows = GLOBAL_ROWS // world
    local = {k: (v[rank * rows : (rank + 1) * rows] if v.dim() else v) for k, v in batch.items()}
    loss = trainer.compute_loss(trainer.model, local)
    kept = int(trainer._selection.keep.sum())
    with open(os.path.join(out_dir, f"loss-{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "world": world, "loss": float(loss), "kept": kept}, handle)


if __name__ == "__main__":
    main()
