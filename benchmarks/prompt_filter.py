"""Cost of selective rollouts' own bookkeeping against the generation a step spends.

``prompts.filter=skip`` with ``predictor=both`` does, per generation call: a no-grad forward of every candidate
prompt (the probe's features), the probe's prediction, GRESO's history lookups, and after sampling the probe's
refit (L-BFGS on the last 1024 groups) and the history's update. This benchmark trains a ForkingGRPOTrainer
with that filter for ``--steps`` steps and times each of those pieces inside the run, beside the generation
seconds TRL's loop spent in the same steps (``rollout/generation_seconds``: every completion of the step,
refill calls included). Two settings, the same tiny MoE shape as the quickstart and the countdown compares:

* ``quickstart``: the quickstart's task, 4 prompts x G=8 per step;
* ``countdown``: compare/selective's countdown task, 8 prompts x G=8 per step.

The model is random-init with EOS suppressed, so every completion runs ``--length`` tokens (trained policies
on these tasks stop at 25-40 tokens: this is the generation cost of a full-length step). The reward is random
(odd length), so groups have variance and the filter rarely skips: the pieces are timed as they run on every
call whatever is skipped. Printed: seconds per step of each piece, their total against generation seconds per
step, and the break-even: how many prompts a step must skip for the generation saved (seconds per sampled
prompt x skipped) to pay for the bookkeeping.

    python benchmarks/prompt_filter.py
    python benchmarks/prompt_filter.py --settings countdown --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

from common import build_trainer, quiet, save_model

from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.prompts import PromptsConfig
from rlvr.trainer import ForkingGRPOTrainer

TASKS = {  # setting -> (task, prompts per step)
    "quickstart": (ArithmeticTask(), 4),
    "countdown": (
        ArithmeticTask(
            domains=["countdown"], countdown_numbers=3, countdown_min_numbers=2, countdown_max=12, countdown_min_paths=3
        ),
        8,
    ),
}


def timed(seconds: dict[str, float], name: str, function):
    """``function`` with its wall time added to ``seconds[name]`` on every call."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    return wrapper


def measure(setting: str, checkpoint: str, args) -> dict[str, float]:
    task, prompts = TASKS[setting]
    args.batch = prompts * args.generations
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(
            ForkingGRPOTrainer,
            checkpoint,
            args,
            output_dir,
            prompts=PromptsConfig(filter="skip", predictor="both", max_draws=2),
        )
        trainer.train_dataset = problems_to_dataset(generate_problems(task, "train", 96, seed=0))
        chooser = trainer.prompt_filter
        chooser.dataset = trainer.train_dataset
        seconds: dict[str, float] = defaultdict(float)
        chooser.featurize = timed(seconds, "probe forward (features)", chooser.featurize)
        chooser.probe.predict = timed(seconds, "probe predict", chooser.probe.predict)
        chooser.probe.observe = timed(seconds, "probe fit", chooser.probe.observe)
        for method in ("skip_probability", "observe", "adapt"):
            setattr(chooser.history, method, timed(seconds, "history", getattr(chooser.history, method)))
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rollout/generation_seconds" in entry]
    generation = [entry["rollout/generation_seconds"] for entry in logs]
    sampled = [entry["prompts/drawn"] for entry in logs]
    skipped = [entry.get("prompts/skipped", 0.0) for entry in logs]
    steps = len(logs)
    result = {name: total / steps for name, total in seconds.items()}
    result["generation"] = statistics.fmean(generation)
    result["sampled prompts"] = statistics.fmean(sampled)
    result["skipped prompts"] = statistics.fmean(skipped)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="quickstart,countdown", help="comma-separated: quickstart, countdown")
    parser.add_argument("--arch", default="qwen3_moe", help="tiny architecture")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--length", type=int, default=40, help="completion tokens (fixed: eos is suppressed)")
    parser.add_argument(
        "--steps", type=int, default=12, help="training steps per setting (the probe fits from 16 groups)"
    )
    args = parser.parse_args()
    quiet()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = save_model(args, directory)
        for setting in args.settings.split(","):
            result = measure(setting, checkpoint, args)
            pieces = {k: v for k, v in result.items() if k not in ("generation", "sampled prompts", "skipped prompts")}
            overhead = sum(pieces.values())
            per_prompt = result["generation"] / result["sampled prompts"]
            print(f"\n{setting}: {args.steps} steps, {TASKS[setting][1]} prompts x G={args.generations} per step")
            for name, value in sorted(pieces.items()):
                print(f"  {name:28}{value:10.4f} s/step")
            print(f"  {'filter bookkeeping, total':28}{overhead:10.4f} s/step")
            print(f"  {'generation':28}{result['generation']:10.4f} s/step ({result['sampled prompts']:.1f} prompts)")
            print(f"  ratio bookkeeping / generation: {overhead / result['generation']:.3f}")
            print(
                f"  break-even: {overhead / per_prompt:.2f} prompts skipped per step pay for it "
                f"({per_prompt:.4f} s of generation per sampled prompt; this run skipped "
                f"{result['skipped prompts']:.2f} per step)"
            )


if __name__ == "__main__":
    main()
