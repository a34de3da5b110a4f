"""The LM head backward on forking tokens only: loss step and saved-for-backward memory, rlvr vs stock TRL.

Stock TRL runs its own forking-token method (``top_entropy_quantile=rho``) through its fused LM head,
which recomputes the logits of every scored position in backward. rlvr's sparse head (rlvr.training.sparse_head)
scores every completion position once without a graph and projects only the selected ones with
gradient. Both see the same synthetic batch (short prompts, full-length completions, random advantages),
timed interleaved in one process; memory is the bytes of the tensors autograd saves for backward
(unique storages, counted with ``torch.autograd.graph.saved_tensors_hooks``), plus the CUDA peak on a GPU.

    python benchmarks/lm_head.py                       # both models, lengths 256/1024/4096, rho 0.2 and 1.0
    python benchmarks/lm_head.py --models quickstart --lengths 256 --repeats 3

Models: ``lm_head`` -- a 2-layer Qwen3-MoE with hidden 512 and Qwen3's 151,936-token vocabulary (the head
dominates); ``quickstart`` -- the packaged quickstart's tiny MoE. Each line ends in ``ratio <rlvr / TRL>``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import SavedBytes, odd_length_reward, quiet, synthetic_batch
from trl import GRPOConfig, GRPOTrainer

from rlvr.forking.selection import ForkingConfig
from rlvr.models import TinyMoESpec, build_char_tokenizer, build_tiny_moe, load_pretrained
from rlvr.moe.config import MoEConfig
from rlvr.run.config import load_config
from rlvr.trainer import ForkingGRPOTrainer
from rlvr.utils.packaged import QUICKSTART


def model_specs() -> dict[str, tuple[TinyMoESpec, int]]:
    quickstart = load_config(QUICKSTART).model.tiny
    return {
        "lm_head": (
            TinyMoESpec(num_layers=2, hidden_size=512, num_heads=8, expert_size=512, max_positions=4200),
            151_936,
        ),
        "quickstart": (TinyMoESpec(**{**vars(quickstart), "max_positions": 4200}), len(build_char_tokenizer())),
    }


def save_model(spec: TinyMoESpec, vocab: int, directory: str) -> str:
    tokenizer = build_char_tokenizer()
    model = build_tiny_moe("qwen3_moe", spec, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id, seed=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_trainer(trainer_cls, checkpoint: str, output_dir: str, length: int, rows: int, **extra):
    from datasets import Dataset

    model, tokenizer = load_pretrained(checkpoint)
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=rows,
        num_generations=rows,
        max_completion_length=length,
        use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
        report_to=[],
        beta=0.0,
        loss_type="dapo",
        router_aux_loss_coef=0.0,
        disable_tqdm=True,
        save_strategy="no",
    )
    grpo = extra.pop("grpo", {})
    trainer = trainer_cls(
        model=model,
        reward_funcs=odd_length_reward,
        args=GRPOConfig(**settings, **grpo),
        train_dataset=Dataset.from_dict({"prompt": ["1+1="] * rows}),
        processing_class=tokenizer,
        **extra,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def loss_step(trainer, batch) -> tuple[float, int, int]:
    """(seconds, saved-for-backward bytes, CUDA peak bytes or 0) of compute_loss + backward."""
    trainer.model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with SavedBytes() as saved:
        loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    release = getattr(getattr(trainer, "router_updates", None), "release", None)
    if release is not None:
        release()
    return seconds, saved.total, peak


def run_case(name: str, spec: TinyMoESpec, vocab: int, length: int, rho: float, args, scratch: str) -> None:
    rows = max(2, args.tokens // length)  # GRPO needs 2 completions per prompt
    checkpoint = save_model(spec, vocab, f"{scratch}/{name}")
    trainers = {
        "TRL": make_trainer(
            GRPOTrainer, checkpoint, f"{scratch}/trl", length, rows, grpo={"top_entropy_quantile": rho}
        ),
        "rlvr": make_trainer(
            ForkingGRPOTrainer,
            checkpoint,
            f"{scratch}/rlvr",
            length,
            rows,
            forking=ForkingConfig(rho=rho, sparse_lm_head=args.sparse_head),
            moe=MoEConfig(analytics=False),
        ),
    }
    batch = synthetic_batch(vocab, rows, 16, length, trainers["TRL"].accelerator.device)
    seconds = {key: [] for key in trainers}
    memory = {}
    for key, trainer in trainers.items():  # warm-up, and the memory of one step
        _, saved, peak = loss_step(trainer, batch)
        memory[key] = (saved, peak)
    for _ in range(args.repeats):
        for key, trainer in trainers.items():
            seconds[key].append(loss_step(trainer, batch)[0])
    trl, ours = statistics.median(seconds["TRL"]), statistics.median(seconds["rlvr"])
    path = "sparse head" if trainers["rlvr"].sparse_head else "TRL's head"
    cuda = f", CUDA peak {memory['rlvr'][1] / memory['TRL'][1]:.2f}x" if torch.cuda.is_available() else ""
    print(
        f"{name:10} V={vocab:<7} {rows:>2} x {length:<5} rho={rho:<4} [{path}]  TRL {trl:8.3f} s  rlvr {ours:8.3f} s  "
        f"saved-for-backward {memory['TRL'][0] / 2**20:7.1f} -> {memory['rlvr'][0] / 2**20:7.1f} MiB{cuda}  "
        f"ratio {ours / trl:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lm_head,quickstart", help="comma-separated: lm_head, quickstart")
    parser.add_argument("--lengths", default="256,1024,4096", help="completion lengths")
    parser.add_argument("--rhos", default="0.2,1.0", help="forking fractions (TRL: top_entropy_quantile)")
    parser.add_argument(
        "--tokens", type=int, default=2048, help="completion tokens per batch (rows = tokens / length, at least 2)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed loss steps per trainer and case")
    parser.add_argument(
        "--sparse-head",
        default="auto",
        choices=["auto", "true", "false"],
        help="rlvr's forking.sparse_lm_head (auto: CPU only; true measures the sparse head on CUDA too)",
    )
    args = parser.parse_args()
    quiet()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"loss step (compute_loss + backward), median of {args.repeats}, on {device}")
    specs = model_specs()
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            spec, vocab = specs[name]
            for length in map(int, args.lengths.split(",")):
                for rho in map(float, args.rhos.split(",")):
                    run_case(name, spec, vocab, length, rho, args, scratch)


if __name__ == "__main__":
    main()
