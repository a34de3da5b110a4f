"""Step time on CPU: one process vs 2-process DeepSpeed ZeRO-2 vs ZeRO-3, same global batch.

Each configuration is a real ``rlvr quickstart`` run (random tiny MoE, no warm start, no eval) of
``--steps`` steps; the median of TRL's ``step_time`` (first step excluded) is compared with the
single-process run. For the record only: CPU processes share two cores and talk over gloo, so this
measures overhead, not the speed-up GPUs give. Rounds alternate the three configurations.

    python benchmarks/zero_scaling.py
    python benchmarks/zero_scaling.py --steps 20 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = [
    "model.tiny.num_layers=2",
    "model.tiny.hidden_size=64",
    "model.tiny.expert_size=128",
    "data.num_train=512",
    "warm_start.enabled=false",
    "eval.enabled=false",
    "save_model=false",
    "grpo.logging_steps=1",
    "grpo.num_generations=8",
    "grpo.max_completion_length=32",
    "grpo.disable_tqdm=true",
]


def run(label: str, launcher: list[str], per_device: int, steps: int, output: Path) -> list[float]:
    command = [
        *launcher,
        "quickstart",
        *COMMON,
        f"grpo.max_steps={steps}",
        f"grpo.per_device_train_batch_size={per_device}",
        f"output_dir={output}",
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{label} failed:\n{finished.stderr[-2000:]}")
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in records if "step_time" in r][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--global-batch", type=int, default=32, help="completions per step over all processes")
    args = parser.parse_args()
    rlvr = [sys.executable, "-m", "rlvr.cli"]
    configurations = {
        "1 process": (rlvr, args.global_batch),
        "2 proc ZeRO-2": ([*rlvr, "launch", "--zero", "2", "--nproc", "2", "--"], args.global_batch // 2),
        "2 proc ZeRO-3": ([*rlvr, "launch", "--zero", "3", "--nproc", "2", "--"], args.global_batch // 2),
    }
    times = {label: [] for label in configurations}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for label, (launcher, per_device) in configurations.items():
                output = Path(scratch) / f"{label.replace(' ', '_')}-{round_index}"
                times[label] += run(label, launcher, per_device, args.steps, output)
    base = statistics.median(times["1 process"])
    print(f"\nglobal batch {args.global_batch} completions x 32 tokens, tiny MoE (2 layers, hidden 64), CPU")
    print(f"{'':16}{'s/step':>10}{'ratio':>8}")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"{label:16}{median:10.3f}{median / base:8.2f}   (median of {len(values)})")


if __name__ == "__main__":
    main()
