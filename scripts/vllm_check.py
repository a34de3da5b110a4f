"""Routing replay from vLLM, end to end on a GPU with vLLM installed (scripts/gpu_check.sh runs it).

    python scripts/vllm_check.py [--out runs/vllm-check]

Saves the quickstart's tiny Qwen3-MoE, trains it for a few GRPO steps with TRL's colocated vLLM
(``use_vllm=True``, ``vllm_mode=colocate``) and ``moe.routing_replay=rollout``, and checks what CPU tests
cannot: that TRL's ``LLM`` was built with ``enable_return_routed_experts=True``, that vLLM returned routed
experts for every completion in a layout :func:`rlvr.rollouts.engine_routing.engine_routing_record`
accepts, that the training batches carry the replay record, and that the mismatch metrics were logged.
Expects vLLM >= 0.14 (routed experts) with TRL 1.16's ``VLLMGeneration``. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/vllm-check", help="where the tiny checkpoint and the run go")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import vllm  # noqa: F401  (fails here, with vLLM's own message, when it is not installed)
    from trl import GRPOConfig

    from rlvr.data.arithmetic import ArithmeticTask, generate_problems
    from rlvr.data.records import problems_to_dataset
    from rlvr.models import TinyMoESpec, load_pretrained, save_tiny_policy
    from rlvr.moe.config import MoEConfig
    from rlvr.rewards.registry import resolve_reward
    from rlvr.rollouts import ROUTING_KEY
    from rlvr.trainer import ForkingGRPOTrainer

    out = Path(args.out)
    spec = TinyMoESpec(
        num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, expert_size=256, num_experts=8, top_k=2
    )
    checkpoint = save_tiny_policy("qwen3_moe", spec, out / "policy", seed=0)
    model, tokenizer = load_pretrained(str(checkpoint), "bfloat16")
    task = ArithmeticTask(min_terms=2, max_terms=3, max_operand=9, eval_fraction=0.2)
    dataset = problems_to_dataset(generate_problems(task, "train", 64, seed=0))
    trainer = ForkingGRPOTrainer(
        model=model,
        reward_funcs=[resolve_reward("arithmetic_exact")],
        args=GRPOConfig(
            output_dir=str(out / "run"),
            per_device_train_batch_size=16,
            num_generations=8,
            max_completion_length=24,
            max_steps=args.steps,
            logging_steps=1,
            bf16=True,
            report_to=[],
            save_strategy="no",
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=0.3,
            vllm_importance_sampling_mode="sequence_mask",
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        moe=MoEConfig(routing_replay="rollout"),
    )
    batches = []
    produce = trainer._generate_and_score_completions

    def keep(inputs):
        batch = produce(inputs)
        batches.append(batch)
        return batch

    trainer._generate_and_score_completions = keep
    trainer.train()
    records = [batch[ROUTING_KEY] for batch in batches if ROUTING_KEY in batch]
    recorded = [float((record[..., 0] >= 0).float().mean()) for record in records]
    logged = [entry for entry in trainer.state.log_history if "mismatch/router_flips" in entry]
    result = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "batches": len(batches),
        "batches_with_replay_record": len(records),
        "recorded_share_of_positions": recorded,
        "router_flips": [entry["mismatch/router_flips"] for entry in logged],
        "kl_k3": [entry.get("mismatch/kl_k3") for entry in logged],
    }
    print(json.dumps(result))
    if not records or len(records) != len(batches) or not logged:
        raise SystemExit("vLLM routing replay check FAILED: see the counts above")


if __name__ == "__main__":
    main()
