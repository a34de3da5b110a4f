"""Shared pieces of the benchmarks: a tiny MoE on disk, trainers on the same data, interleaved timing."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import transformers
from transformers.trainer_callback import PrinterCallback
from trl import GRPOConfig

from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import TinyMoESpec, load_pretrained, save_tiny_policy


def odd_length_reward(completions, **_):
    """A reward with variance on a random policy, so that the policy gradient is not zero."""
    return [float(len(str(c)) % 2) for c in completions]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="qwen3_moe", help="tiny architecture")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--batch", type=int, default=32, help="completions per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--length", type=int, default=40, help="completion tokens (fixed: eos is suppressed)")
    parser.add_argument("--repeats", type=int, default=30, help="loss steps per trainer")
    parser.add_argument("--rounds", type=int, default=4, help="alternating train() rounds per trainer")
    parser.add_argument("--steps", type=int, default=8, help="train() steps per round")


def quiet() -> None:
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def save_model(args, directory: str) -> str:
    spec = TinyMoESpec(num_layers=args.layers, hidden_size=args.hidden, expert_size=2 * args.hidden, num_heads=4)
    return str(save_tiny_policy(args.arch, spec, directory, seed=0))


def build_trainer(trainer_cls, checkpoint: str, args, output_dir: str, grpo: dict | None = None, **extra):
    model, tokenizer = load_pretrained(checkpoint)
    dataset = problems_to_dataset(generate_problems(ArithmeticTask(), "train", 2000, seed=0))
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.length,
        generation_kwargs={"min_new_tokens": args.length},
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        max_steps=args.steps,
        beta=0.0,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        loss_type="dapo",
        router_aux_loss_coef=0.0,
    ) | (grpo or {})
    trainer = trainer_cls(
        model=model,
        reward_funcs=odd_length_reward,
        args=GRPOConfig(**settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # keep the console to the result table
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def fixed_batch(trainer, args) -> dict:
    """One generation batch of ``args.batch`` completions with random advantages."""
    dataset = problems_to_dataset(generate_problems(ArithmeticTask(), "train", 64, seed=1))
    rows = [dataset[i] for i in range(args.batch // args.generations) for _ in range(args.generations)]
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    batch["advantages"] = torch.randn(args.batch, generator=torch.Generator().manual_seed(1))
    return batch


def loss_step_seconds(trainer, batch) -> float:
    """compute_loss + backward, as in one micro-step of training."""
    trainer.model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    seconds = time.perf_counter() - start
    release = getattr(getattr(trainer, "router_updates", None), "release", None)
    if release is not None:
        release()
    return seconds


def interleaved_loss_steps(trainers: dict, batches: dict, repeats: int) -> dict[str, list[float]]:
    times = {name: [] for name in trainers}
    for name, trainer in trainers.items():  # warm-up
        loss_step_seconds(trainer, batches[name])
    for _ in range(repeats):
        for name, trainer in trainers.items():
            times[name].append(loss_step_seconds(trainer, batches[name]))
    return times


def interleaved_train_steps(trainers: dict, rounds: int) -> dict[str, list[float]]:
    """TRL's own ``step_time`` metric over real train() steps (generation included), alternating rounds."""
    times = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            trainer.state.log_history.clear()
            trainer.train()
            times[name] += [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry][1:]
    return times


def print_ratios(title: str, baseline: str, candidate: str, results: dict[str, dict[str, list[float]]]) -> None:
    print(f"\n{title}")
    print(f"{'':12}{baseline + ' (s)':>18}{candidate + ' (s)':>18}{'ratio':>8}")
    for label, times in results.items():
        base, ours = statistics.median(times[baseline]), statistics.median(times[candidate])
        print(f"{label:12}{base:18.4f}{ours:18.4f}{ours / base:8.3f}   (median of {len(times[candidate])})")


def synthetic_batch(vocab: int, rows: int, prompt_length: int, length: int, device) -> dict:
    """A generation batch as TRL's loss sees it: random prompts and full-length completions, random advantages."""
    generator = torch.Generator().manual_seed(0)
    completion_mask = torch.ones(rows, length, dtype=torch.long)
    batch = {
        "prompt_ids": torch.randint(4, vocab, (rows, prompt_length), generator=generator),
        "prompt_mask": torch.ones(rows, prompt_length, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (rows, length), generator=generator),
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, generator=generator),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {key: value.to(device) for key, value in batch.items()}


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while the context is open."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())
