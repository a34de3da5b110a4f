"""Checkpoints and resume: a run killed with SIGKILL resumes from its newest complete checkpoint and
logs the same metrics as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from rlvr.cli.main import main
from rlvr.run.checkpoints import COMPLETE_MARKER, latest_complete_checkpoint, truncate_jsonl
from tests.launching import fresh_cache_env

SLOW_REWARD = """
import time

def slow_odd_length(completions, **_):
    time.sleep(0.25)  # slow steps, so that the run can be killed between checkpoints
    return [float(len(str(c)) % 2) for c in completions]
"""
RUN = [
    "model.tiny.num_layers=1",
    "model.tiny.hidden_size=32",
    "model.tiny.expert_size=32",
    "model.tiny.num_experts=4",
    "data.num_train=128",
    "warm_start.enabled=false",
    "eval.enabled=false",
    "save_model=false",
    "reward.functions=[slow_reward:slow_odd_length]",
    "grpo.learning_rate=1e-2",
    "grpo.max_steps=10",
    "grpo.logging_steps=1",
    "grpo.per_device_train_batch_size=8",
    "grpo.num_generations=4",
    "grpo.max_completion_length=16",
    "grpo.disable_tqdm=true",
    "grpo.save_strategy=steps",
    "grpo.save_steps=2",
]
TIMING = re.compile(r"step_time|runtime|per_second|seconds")


def _kill_process_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a scheduler ends a job (torch's elastic agent starts
    its workers in their own sessions, so killing the launcher's process group leaves them running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(children.get(current, []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _metrics(directory):
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if not TIMING.search(k)} for record in records]


TREE = ["rollout.mode=forking_tree", "rollout.branches=1", "rollout.advantage=treerl"]
SKIP = ["prompts.filter=skip", "prompts.predictor=both", "prompts.max_draws=2"]  # history and probe: in checkpoints


LORA, SVF = (
    ["peft.method=lora", "peft.rank=4", "grpo.learning_rate=5e-2"],
    ["peft.method=svf", "grpo.learning_rate=5e-2"],
)


@pytest.mark.parametrize("rollout", [[], TREE, SKIP, LORA, SVF], ids=["iid", "forking_tree", "skip", "lora", "svf"])
def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path, monkeypatch, capsys, rollout):
    """Every logged metric but wall times matches, the running rollout totals included. With adapters the
    checkpoint holds the adapter (PEFT's files) or the SVF vectors alone, and the optimizer's state."""
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    run = [*RUN, *rollout]
    monkeypatch.syspath_prepend(str(tmp_path))
    environment = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    # The run that gets killed: wait for the step-4 checkpoint to be complete, then SIGKILL.
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "rlvr.cli", "quickstart", *run, f"output_dir={killed}"],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-4" / COMPLETE_MARKER).exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists()
    # A checkpoint directory without the marker (as a kill during saving leaves) is never used.
    (killed / "checkpoint-8").mkdir(exist_ok=True)
    path, step = latest_complete_checkpoint(killed)
    assert step in (4, 6) and path.name == f"checkpoint-{step}"

    assert main(["quickstart", *run, f"output_dir={killed}", "--resume"]) == 0
    assert main(["quickstart", *run, f"output_dir={tmp_path / 'reference'}"]) == 0

    resumed, reference = _metrics(killed), _metrics(tmp_path / "reference")
    training = lambda records: [r for r in records if "loss" in r]  # noqa: E731
    assert [r["step"] for r in training(resumed)] == list(range(1, 11))
    assert training(resumed) == training(reference)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 10
    assert summary["decoded_tokens"] == training(reference)[-1]["rollout/decoded_tokens_total"] > 0
    # Resuming a run whose newest checkpoint is its last step is refused (the Trainer would train one more).
    capsys.readouterr()
    assert main(["quickstart", *run, f"output_dir={killed}", "--resume"]) == 2
    assert "checkpoint-10 is at step 10 and grpo.max_steps is 10" in capsys.readouterr().err


def test_truncate_drops_records_past_the_checkpoint_and_partial_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_jsonl(path, 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert latest_complete_checkpoint(tmp_path) is None


def test_zero3_two_process_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path):
    """The same under ``rlvr launch --zero 3 --nproc 2``: DeepSpeed engine checkpoints (partitioned
    weights and optimizer states, one RNG state per rank), with the router-aware arm and forking trees. The launcher and
    both ranks are killed together, as a scheduler kills a job."""
    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    environment = fresh_cache_env(tmp_path, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = [o for o in RUN if not o.startswith("grpo.max_steps")] + [
        "grpo.max_steps=6",
        "--arm",
        "forking_router",
        *TREE,
    ]

    def launch(output, port, *extra):
        command = [
            sys.executable,
            "-m",
            "rlvr.cli",
            "launch",
            "--zero",
            "3",
            "--nproc",
            "2",
            "--main-port",
            str(port),
            "--",
            "quickstart",
            *run,
            f"output_dir={output}",
            *extra,
        ]
        return subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    killed = tmp_path / "killed"
    process = launch(killed, 29591)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-2" / COMPLETE_MARKER).exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    _kill_process_tree(process.pid)
    process.wait()
    time.sleep(1.0)  # a surviving rank would write on; none may
    assert not (killed / "summary.json").exists() and not (killed / "checkpoint-6").exists()
    assert not (killed / "summary.json").exists()

    for output, port, extra in ((killed, 29592, ["--resume"]), (tmp_path / "reference", 29593, [])):
        finished = launch(output, port, *extra)
        _, errors = finished.communicate(timeout=600)
        assert finished.returncode == 0, errors[-3000:]

    resumed, reference = _metrics(killed), _metrics(tmp_path / "reference")
    training = lambda records: [r for r in records if "loss" in r]  # noqa: E731
    assert [r["step"] for r in training(resumed)] == list(range(1, 7))
    assert training(resumed) == training(reference)
    assert json.loads((killed / "summary.json").read_text())["world_size"] == 2
