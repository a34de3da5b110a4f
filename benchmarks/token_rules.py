"""Cost of the entropy interventions of ``token_rules``: the loss step with each rule against ``forking`` alone.

Every trainer is a ForkingGRPOTrainer with rho=0.2 on the same tiny MoE, batch and completion length, timed
interleaved in one process (rotating, medians). The rules run on the forking tokens (Clip-Cov among forking
tokens, KL-Cov on the top-covariance forking tokens, entropy advantage on the forking tokens). Every trainer
takes two optimizer steps per generation batch (``num_iterations=2``: KL-Cov needs old log-probs that differ
from the policy's), and the batch carries old log-probs 0.1 nats off the policy's, so KL-Cov's penalty and
Clip-Cov's exclusion of PPO-clipped tokens do real work.

    python benchmarks/token_rules.py
    python benchmarks/token_rules.py --repeats 50

Prints the median loss step (forward + backward) of each trainer and its ratio to ``forking``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from common import add_model_arguments, build_trainer, fixed_batch, interleaved_loss_steps, quiet, save_model

from rlvr.forking.selection import ForkingConfig
from rlvr.forking.token_rules import TokenRulesConfig
from rlvr.trainer import ForkingGRPOTrainer

RULES = {
    "forking": TokenRulesConfig(),
    "clip_cov": TokenRulesConfig(rule="clip_cov", clip_cov_ratio=2e-3),
    "kl_cov": TokenRulesConfig(rule="kl_cov", kl_cov_ratio=2e-3),
    "entropy_advantage": TokenRulesConfig(rule="entropy_advantage"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_model(args, f"{scratch}/model")
        trainers = {
            name: build_trainer(
                ForkingGRPOTrainer,
                checkpoint,
                args,
                f"{scratch}/{name}",
                {"num_iterations": 2},
                forking=ForkingConfig(rho=0.2),
                token_rules=rules,
            )
            for name, rules in RULES.items()
        }
        batch = fixed_batch(trainers["forking"], args)
        completion = batch["completion_mask"]
        offsets = (torch.rand(completion.shape, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.2
        with torch.no_grad():
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
            mask = torch.cat([batch["prompt_mask"], completion], dim=1)
            logps, _, _ = trainers["forking"]._get_per_token_logps_and_entropies(
                trainers["forking"].model, ids, mask, completion.size(1)
            )
        batch["old_per_token_logps"] = logps + offsets
        times = interleaved_loss_steps(trainers, dict.fromkeys(trainers, batch), args.repeats)
    base = statistics.median(times["forking"])
    print(f"\n{args.arch}: {args.layers} layers, hidden {args.hidden}, {args.batch} completions x {args.length} tokens")
    print(f"{'trainer':20}{'loss step (s)':>16}{'vs forking':>12}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20}{median:16.4f}{median / base:12.3f}   (median of {len(values)})")


if __name__ == "__main__":
    main()
