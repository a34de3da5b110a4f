"""Cost of router-aware updates: step time with gates + routing replay + analytics on vs all off.

Both trainers are ForkingGRPOTrainer (rho=0.2) on the same tiny MoE, prompts and completion length,
timed interleaved in one process:

* off: no gates, no router losses, no replay, no routing analytics;
* on:  router and expert gates on forking decisions, load-balancing loss on forking tokens,
       rollout routing replay (recorded during generate), routing analytics.

    python benchmarks/router_overhead.py
    python benchmarks/router_overhead.py --replay old_policy

Prints the medians, the ratio on / off, and the replay storage in bytes per token.
"""

from __future__ import annotations

import argparse
import tempfile

from common import (
    add_model_arguments,
    build_trainer,
    fixed_batch,
    interleaved_loss_steps,
    interleaved_train_steps,
    print_ratios,
    quiet,
    save_model,
)

from rlvr.run.config import ForkingConfig, MoEConfig
from rlvr.trainer import ROUTING_KEY, ForkingGRPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument(
        "--replay", default="rollout", choices=("rollout", "old_policy", "none"), help="routing replay mode"
    )
    args = parser.parse_args()
    quiet()
    on = MoEConfig(
        router_gate_scope="forking",
        expert_gate_scope="forking",
        load_balancing_coef=0.01,
        load_balancing_scope="forking",
        routing_replay=args.replay,
        analytics=True,
    )
    off = MoEConfig(analytics=False)
    # old_policy replay records in TRL's old-policy forward, which TRL runs only when a generation batch
    # serves several optimiser steps; give both trainers that schedule.
    grpo = {"steps_per_generation": 2} if args.replay == "old_policy" else {}
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_model(args, f"{scratch}/model")
        forking = ForkingConfig(rho=0.2)
        trainers = {
            "off": build_trainer(
                ForkingGRPOTrainer, checkpoint, args, f"{scratch}/off", grpo, forking=forking, moe=off
            ),
            "on": build_trainer(ForkingGRPOTrainer, checkpoint, args, f"{scratch}/on", grpo, forking=forking, moe=on),
        }
        batch = fixed_batch(trainers["on"], args)
        plain = {key: value for key, value in batch.items() if key != ROUTING_KEY}
        record = batch.get(ROUTING_KEY)
        results = {
            "loss step": interleaved_loss_steps(trainers, {"off": plain, "on": batch}, args.repeats),
            "train step": interleaved_train_steps(trainers, args.rounds),
        }
    print_ratios(
        f"{args.arch}: {args.layers} layers, hidden {args.hidden}, {args.batch} completions x {args.length} tokens, "
        f"replay={args.replay}",
        "off",
        "on",
        results,
    )
    if record is not None:
        tokens = record.shape[0] * record.shape[1]
        layers, top_k = record.shape[2:]
        print(
            f"replay storage: {record.numel() * record.element_size() / tokens:.0f} bytes per token "
            f"({record.dtype}, {layers} layers x top-{top_k}; budget 4 x layers x k = {4 * layers * top_k})"
        )


if __name__ == "__main__":
    main()
