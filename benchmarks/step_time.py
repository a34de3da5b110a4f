"""Seconds per training step: ForkingGRPOTrainer (rho=0.2) vs stock trl.GRPOTrainer (top_entropy_quantile=0.2).

Same tiny MoE, same prompts, same completion length (eos suppressed so every completion is full
length), measured interleaved in one process so that machine noise hits both alike. Two views:

* loss step: ``compute_loss`` + ``backward`` on one fixed generation batch (where the two differ);
* train step: TRL's own ``step_time`` metric over real ``trainer.train()`` steps (generation included),
  in alternating rounds.

    python benchmarks/step_time.py                 # quickstart-sized model
    python benchmarks/step_time.py --rounds 5 --steps 10 --arch olmoe

Prints the medians and the ratio rlvr / stock (goal: <= 1.05).
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
from trl import GRPOTrainer

from rlvr.run.config import ForkingConfig, MoEConfig
from rlvr.trainer import ForkingGRPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rho", type=float, default=0.2, help="forking fraction / TRL top_entropy_quantile")
    parser.add_argument("--analytics", action="store_true", help="keep rlvr's routing analytics on (its default)")
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_model(args, f"{scratch}/model")
        trainers = {
            "stock TRL": build_trainer(
                GRPOTrainer, checkpoint, args, f"{scratch}/stock", {"top_entropy_quantile": args.rho}
            ),
            # analytics off by default here: the forking-token path alone (router_overhead.py measures the rest)
            "rlvr": build_trainer(
                ForkingGRPOTrainer,
                checkpoint,
                args,
                f"{scratch}/rlvr",
                forking=ForkingConfig(rho=args.rho),
                moe=MoEConfig(analytics=args.analytics),
            ),
        }
        batch = fixed_batch(trainers["stock TRL"], args)
        results = {
            "loss step": interleaved_loss_steps(trainers, {name: batch for name in trainers}, args.repeats),
            "train step": interleaved_train_steps(trainers, args.rounds),
        }
    print_ratios(
        f"{args.arch}: {args.layers} layers, hidden {args.hidden}, {args.batch} completions x {args.length} tokens, "
        f"routing analytics {'on' if args.analytics else 'off'}",
        "stock TRL",
        "rlvr",
        results,
    )


if __name__ == "__main__":
    main()
