"""Seconds per training step: ForkingGRPOTrainer (rho=0.2) vs stock trl.GRPOTrainer (top_entropy_quantile=0.2).

Same tiny MoE, same prompts, same completion length (eos suppressed so every completion is full
length), measured interleaved in one process so that machine noise hits both alike. Two views:

* loss step: ``compute_loss`` + ``backward`` on one fixed generation batch (where the two differ);
* train step: TRL's own ``step_time`` metric over real ``trainer.train()`` steps (generation included),
  in alternating rounds.

    python benchmarks/step_time.py                 # quickstart-sized model
    python benchmarks/step_time.py --rounds 5 --steps 10 --arch olmoe

Prints the medians and the ratio ours / stock (goal: <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
import transformers
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig, GRPOTrainer

from rlvr.config import ForkingConfig
from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import TinyMoESpec, load_pretrained, save_tiny_policy
from rlvr.trainer import ForkingGRPOTrainer


def odd_length_reward(completions, **_):
    return [float(len(str(c)) % 2) for c in completions]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen3_moe", help="tiny architecture")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--length", type=int, default=40, help="completion tokens (fixed)")
    parser.add_argument("--repeats", type=int, default=30, help="loss steps per trainer")
    parser.add_argument("--rounds", type=int, default=4, help="alternating train() rounds per trainer")
    parser.add_argument("--steps", type=int, default=8, help="train() steps per round")
    parser.add_argument("--rho", type=float, default=0.2, help="forking fraction / TRL top_entropy_quantile")
    return parser.parse_args()


def build(trainer_cls, checkpoint: str, args, output_dir: str, steps: int):
    model, tokenizer = load_pretrained(checkpoint)
    dataset = problems_to_dataset(generate_problems(ArithmeticTask(), "train", 2000, seed=0))
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch, num_generations=args.generations,
        max_completion_length=args.length, generation_kwargs={"min_new_tokens": args.length},
        use_cpu=True, bf16=False, report_to=[], logging_steps=1, max_steps=steps, beta=0.0, seed=0,
        save_strategy="no", disable_tqdm=True, loss_type="dapo", router_aux_loss_coef=0.0,
    )
    if trainer_cls is GRPOTrainer:
        settings["top_entropy_quantile"] = args.rho
        extra = {}
    else:
        extra = {"forking": ForkingConfig(rho=args.rho)}
    trainer = trainer_cls(
        model=model, reward_funcs=odd_length_reward, args=GRPOConfig(**settings), train_dataset=dataset,
        processing_class=tokenizer, **extra,
    )
    trainer.remove_callback(PrinterCallback)  # keep the console to the result table
    return trainer


def loss_step_seconds(trainer, batch) -> float:
    trainer.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    spec = TinyMoESpec(num_layers=args.layers, hidden_size=args.hidden, expert_size=2 * args.hidden, num_heads=4)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = str(save_tiny_policy(args.arch, spec, f"{scratch}/model", seed=0))
        trainers = {
            "stock": build(GRPOTrainer, checkpoint, args, f"{scratch}/stock", args.steps),
            "rlvr": build(ForkingGRPOTrainer, checkpoint, args, f"{scratch}/rlvr", args.steps),
        }

        # 1. Loss step on one fixed batch, interleaved.
        dataset = problems_to_dataset(generate_problems(ArithmeticTask(), "train", 64, seed=1))
        prompts = args.batch // args.generations
        rows = [dataset[i] for i in range(prompts) for _ in range(args.generations)]
        for trainer in trainers.values():
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1
        torch.manual_seed(0)
        batch = trainers["stock"]._generate_and_score_completions(rows)
        batch["advantages"] = torch.randn(args.batch, generator=torch.Generator().manual_seed(1))
        loss_times = {name: [] for name in trainers}
        for name, trainer in trainers.items():  # warm-up
            loss_step_seconds(trainer, batch)
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                loss_times[name].append(loss_step_seconds(trainer, batch))

        # 2. Real training steps (generation + loss + optimizer), alternating rounds.
        step_times = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                trainer.state.log_history.clear()
                trainer.train()
                step_times[name] += [e["step_time"] for e in trainer.state.log_history if "step_time" in e][1:]

    print(f"\n{args.arch}: {args.layers} layers, hidden {args.hidden}, {args.batch} completions x {args.length} tokens")
    print(f"{'':12}{'stock TRL (s)':>16}{'rlvr (s)':>12}{'ratio':>8}")
    for label, times in (("loss step", loss_times), ("train step", step_times)):
        stock, ours = statistics.median(times["stock"]), statistics.median(times["rlvr"])
        print(f"{label:12}{stock:16.4f}{ours:12.4f}{ours / stock:8.3f}   (median of {len(times['rlvr'])})")


if __name__ == "__main__":
    main()
