"""Bytes each rank hands to collectives per training step: DeepSpeed ZeRO-3 vs expert parallelism, measured.

Each layout is a real ``rlvr train`` run of the quickstart (random tiny MoE at Qwen3-30B-A3B's shape shrunk in
width, no warm start, no eval) on 2 CPU processes: ``rlvr launch --zero 3`` and ``rlvr launch --ep 2``. Every
rank runs under ``torch.profiler``, which records each transport call (``gloo:*``, ``nccl:*``) with the shape
and dtype of the tensor the rank hands in; the training steps and their generation calls are marked, so the
bytes split into generation and the loss step (forward and backward). Steps after the first are averaged.

Two depths give a per-layer slope; the slope is scaled to the real width by counted ratios: ZeRO-3 moves
parameters (its gathers and reduce-scatters scale with a layer's parameter count); expert parallelism moves
tokens to experts (all-to-all: tokens x hidden x top_k) and the dense weights FSDP2 gathers (a layer's
non-expert parameters). Conventions: the bytes are those of the tensor a rank hands to the collective (an
all-gather's shard, an all-to-all's send buffer), not what the wire carries.

Generation here decodes 16 tokens per completion. ZeRO-3 gathers the whole model once per generation batch
(TRL's ``ds3_gather_for_generation``); under expert parallelism FSDP2 gathers the dense weights, and the
all-to-all runs, in every decoding forward, so its generation bytes grow with the tokens decoded.

    python benchmarks/communication.py                    # 1/16 width, 2 and 4 layers
    python benchmarks/communication.py --shrink 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REAL = {"hidden_size": 2048, "num_heads": 32, "num_kv_heads": 4, "expert_size": 768, "num_experts": 128, "top_k": 8}
DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4, "bool": 1}
MARKS = ("rlvr.bench.step", "rlvr.bench.generation")


def shrunk(shrink: int) -> dict:
    """Qwen3-30B-A3B's MoE shape at 1/shrink of its width: every expert and the top-8 kept."""
    return {
        "hidden_size": REAL["hidden_size"] // shrink,
        "num_heads": max(REAL["num_heads"] // shrink, 1),
        "num_kv_heads": max(REAL["num_kv_heads"] // shrink, 1),
        "expert_size": REAL["expert_size"] // shrink,
        "num_experts": REAL["num_experts"],
        "top_k": REAL["top_k"],
    }


def layer_parameters(spec: dict) -> tuple[int, int]:
    """(expert parameters, other parameters) of one decoder layer of a Qwen3-MoE of this shape, counted on the
    meta device."""
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    config = Qwen3MoeConfig(
        hidden_size=spec["hidden_size"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        head_dim=spec["hidden_size"] // spec["num_heads"],
        moe_intermediate_size=spec["expert_size"],
        num_experts=spec["num_experts"],
        num_experts_per_tok=spec["top_k"],
        num_hidden_layers=1,
    )
    with torch.device("meta"):
        layer = Qwen3MoeDecoderLayer(config, 0)
    experts = sum(p.numel() for name, p in layer.named_parameters() if ".experts." in f".{name}")
    return experts, sum(p.numel() for p in layer.parameters()) - experts


# ------------------------------------------------------------------------------------- one rank, traced


def trace(out_dir: str, argv: list[str]) -> int:
    """Run ``rlvr`` with ``argv`` under the profiler; write this rank's collectives per marked range."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from rlvr.cli.main import main
    from rlvr.trainer import ForkingGRPOTrainer

    step, produce = ForkingGRPOTrainer.training_step, ForkingGRPOTrainer._generate_and_score_completions
    profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    def marked_step(self, *args, **kwargs):
        if profiler.profiler is None:  # from the first training step on (loading and set-up are not traced)
            profiler.start()
        with record_function(MARKS[0]):
            return step(self, *args, **kwargs)

    def marked_generation(self, inputs):
        with record_function(MARKS[1]):
            return produce(self, inputs)

    ForkingGRPOTrainer.training_step = marked_step
    ForkingGRPOTrainer._generate_and_score_completions = marked_generation
    code = main(argv)
    profiler.stop()
    events = profiler.events()
    ranges = {mark: sorted((e.time_range for e in events if e.name == mark), key=lambda r: r.start) for mark in MARKS}
    steps = []
    for step_range in ranges[MARKS[0]]:
        inside = [r for r in ranges[MARKS[1]] if step_range.start <= r.start <= step_range.end]
        record = {"generation": {}, "loss_step": {}}
        for event in events:
            if not event.name.startswith(("gloo:", "nccl:")) or not event.input_shapes:
                continue
            start = event.time_range.start
            if not step_range.start <= start <= step_range.end:
                continue
            shape, dtype = event.input_shapes[0], (event.input_dtypes or ["float"])[0]
            size = DTYPE_BYTES.get(dtype, 4)
            for dimension in shape:
                size *= dimension
            phase = "generation" if any(r.start <= start <= r.end for r in inside) else "loss_step"
            op = event.name.split(":", 1)[1]
            record[phase][op] = record[phase].get(op, 0) + size
        steps.append(record)
    rank = os.environ.get("RANK", "0")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(steps))
    return code


# ------------------------------------------------------------------------------------- the comparison


def run_layout(layout: str, layers: int, spec: dict, steps: int, work: Path, port: int) -> dict[str, dict]:
    """Mean bytes per training step per rank, by phase and op, of one traced run."""
    out = work / f"{layout}-{layers}"
    out.mkdir(parents=True)
    overrides = [f"model.tiny.{key}={value}" for key, value in spec.items()] + [
        f"model.tiny.num_layers={layers}",
        f"output_dir={out / 'run'}",
        "warm_start.enabled=false",
        "eval.enabled=false",
        "save_model=false",
        f"grpo.max_steps={steps}",
        "grpo.logging_steps=1",
        "grpo.per_device_train_batch_size=8",
        "grpo.num_generations=4",
        "grpo.max_completion_length=16",
    ]
    launch = ["--ep", "2"] if layout == "ep" else ["--zero", "3"]
    printed = (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "rlvr.cli",
                "launch",
                *launch,
                "--nproc",
                "2",
                "--main-port",
                str(port),
                "--dry-run",
                "--",
                "train",
                "--config",
                "quickstart",
                *overrides,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .removeprefix("rlvr launch: ")
    )
    import shlex

    command = shlex.split(printed)
    module = command.index("-m", 3)  # the launcher's program: -m rlvr.cli ...
    command[module : module + 2] = [__file__, "--trace", str(out)]
    env = {**os.environ, "HOME": str(work / "home")}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if finished.returncode:
        raise RuntimeError(f"{layout} at {layers} layers failed:\n{finished.stderr[-3000:]}")
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    per_step = [record for rank in ranks for record in rank[1:]]  # the first step warms up
    mean = {}
    for phase in ("generation", "loss_step"):
        ops = {op for record in per_step for op in record[phase]}
        mean[phase] = {op: statistics.fmean(record[phase].get(op, 0) for record in per_step) for op in ops}
    return mean


def main() -> None:
    if sys.argv[1:2] == ["--trace"]:  # one rank of a launched run: benchmarks/communication.py --trace OUT ARGV
        sys.exit(trace(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shrink", type=int, default=16, help="width divisor of Qwen3-30B-A3B's layer shape")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not counted)")
    args = parser.parse_args()
    spec = shrunk(args.shrink)
    real_experts, real_other = layer_parameters(REAL)
    small_experts, small_other = layer_parameters(spec)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for port, (layout, layers) in enumerate((lay, n) for lay in ("zero3", "ep") for n in (2, 4)):
            results[layout, layers] = run_layout(layout, layers, spec, args.steps, Path(directory), 29701 + port)
    print(f"Qwen3-30B-A3B layer shape at 1/{args.shrink} width: {spec}; 2 CPU processes, gloo")
    header = ("layout", "phase", "op", "2 layers", "4 layers", "per layer", "real, per layer")
    widths = (8, 12, 16, 14, 14, 14, 18)
    print("".join(f"{h:<{w}}" if i < 3 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    totals = {}
    for layout in ("zero3", "ep"):
        for phase in ("generation", "loss_step"):
            ops = sorted(set(results[layout, 2][phase]) | set(results[layout, 4][phase]))
            for op in ops:
                two, four = results[layout, 2][phase].get(op, 0.0), results[layout, 4][phase].get(op, 0.0)
                slope = (four - two) / 2
                if layout == "ep" and op == "all_to_all":
                    scale = REAL["hidden_size"] / spec["hidden_size"]  # tokens x hidden x top_k, same tokens
                elif layout == "ep":
                    scale = real_other / small_other  # FSDP2 moves the dense weights
                else:
                    scale = (real_experts + real_other) / (small_experts + small_other)  # ZeRO-3 moves everything
                real = slope * scale
                totals[layout, phase] = totals.get((layout, phase), 0.0) + real
                print(f"{layout:<8}{phase:<12}{op:<16}{two:>14,.0f}{four:>14,.0f}{slope:>14,.0f}{real:>18,.0f}")
    print("\nper layer at the real width (bytes handed to collectives per rank per training step):")
    for phase in ("generation", "loss_step"):
        zero3, ep = totals.get(("zero3", phase), 0.0), totals.get(("ep", phase), 0.0)
        ratio = f"{ep / zero3:.3f}" if zero3 else "n/a"
        print(f"  {phase:<12} ZeRO-3 {zero3 / 2**20:>10,.1f} MiB   EP {ep / 2**20:>10,.1f} MiB   EP / ZeRO-3 {ratio}")


if __name__ == "__main__":
    main()
