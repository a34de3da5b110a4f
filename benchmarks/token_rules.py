"""Cost of the entropy interventions of ``token_rules``: the loss step with each rule against ``forking`` alone.

Every trainer is a ForkingGRPOTrainer with rho=0.2 on the same tiny MoE, batch and completion length, timed
interleaved in one process (rotating, medians). The rules run on the forking tokens (Clip-Cov among forking
tokens, KL-Cov on the top-covariance forking tokens, entropy advantage on the forking tokens). Every trainer
takes two optimizer steps per generation batch (``num_iterations=2``: KL-Cov needs old log-probs that differ
from the policy's), and the batch carries old log-probs 0.1 nats off the policy's, so KL-Cov's penalty and
Clip-Cov's exclusion of PPO-clipped tokens do real work. STAPO silences spurious forking tokens; Archer keeps
every token (it sets its own high-entropy tokens per response), so it is timed against ``full`` (every token, no
rule), with its clip ranges and without its KL term (a reference forward, TRL's cost of any ``beta``).

    python benchmarks/token_rules.py
    python benchmarks/token_rules.py --repeats 50

Prints the median loss step (forward + backward) of each trainer and its ratio to its baseline (``forking``, or
``full`` for Archer).
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

FORKING, FULL = ForkingConfig(rho=0.2), ForkingConfig(policy_tokens="all")
RULES = {  # name -> (forking section, token rule, the trainer it is compared with)
    "forking": (FORKING, TokenRulesConfig(), "forking"),
    "clip_cov": (FORKING, TokenRulesConfig(rule="clip_cov", clip_cov_ratio=2e-3), "forking"),
    "kl_cov": (FORKING, TokenRulesConfig(rule="kl_cov", kl_cov_ratio=2e-3), "forking"),
    "entropy_advantage": (FORKING, TokenRulesConfig(rule="entropy_advantage"), "forking"),
    "stapo": (FORKING, TokenRulesConfig(rule="stapo"), "forking"),
    "full": (FULL, TokenRulesConfig(), "full"),
    "archer": (FULL, TokenRulesConfig(rule="archer"), "full"),
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
                forking=forking,
                token_rules=rules,
            )
            for name, (forking, rules, _) in RULES.items()
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
    print(f"\n{args.arch}: {args.layers} layers, hidden {args.hidden}, {args.batch} completions x {args.length} tokens")
    print(f"{'trainer':20}{'loss step (s)':>16}{'ratio':>8}  baseline")
    for name, values in times.items():
        median, baseline = statistics.median(values), RULES[name][2]
        ratio = median / statistics.median(times[baseline])
        print(f"{name:20}{median:16.4f}{ratio:8.3f}  {baseline}   (median of {len(values)})")


if __name__ == "__main__":
    main()
