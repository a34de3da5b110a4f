"""Multi-process runs on CPU: torchrun with 2 processes (gloo) trains one run, written once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_collectives import assert_identical_collectives, traced

from tests.launching import fresh_cache_env, printed_launch_command

SKEW = 5  # rank 1 samples at most max_completion_length - 5 tokens: its completions are narrower than rank 0's
TINY = [
    "model.tiny.num_layers=1",
    "model.tiny.hidden_size=32",
    "model.tiny.expert_size=32",
    "model.tiny.num_experts=4",
    "data.num_train=64",
    "warm_start.enabled=false",
    "eval.enabled=false",
    "save_model=false",
    "grpo.max_steps=2",
    "grpo.logging_steps=1",
    "grpo.per_device_train_batch_size=8",
    "grpo.num_generations=4",
    "grpo.max_completion_length=16",
    "grpo.disable_tqdm=true",
]


TREE = ["rollout.mode=forking_tree", "rollout.branches=1", "rollout.advantage=treerl"]
COPY_ENGINE = [
    "rollout.engine=copy",
    "rollout.dtype=bfloat16",
    "rollout.router_noise=0.5",
    "moe.routing_replay=rollout",
]


DYNAMIC = ["prompts.filter=dynamic", "prompts.max_draws=2"]  # a random policy's groups rarely vary: refills
PRUNE = ["prompts.filter=skip", "prompts.predictor=both", "prompts.refill=false"]  # ranks agree on the groups


@pytest.mark.slow
@pytest.mark.parametrize(
    "rollout",
    [[], TREE, COPY_ENGINE, DYNAMIC, PRUNE],
    ids=["iid", "forking_tree", "copy_engine", "dynamic_sampling", "skip_without_refill"],
)
def test_two_process_torchrun_on_cpu(tmp_path, rollout):
    output = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        *traced(tmp_path / "trace", SKEW, ["-m", "rlvr.cli", "quickstart", *TINY, *rollout, f"output_dir={output}"]),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_cache_env(tmp_path))
    assert_identical_collectives(tmp_path / "trace", finished)  # the ranks' completion widths differ
    assert finished.stdout.count("rlvr: finished") == 1  # one summary per launch, from rank 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    kept = [r["forking/kept_fraction"] for r in records if "forking/kept_fraction" in r]
    assert len(kept) == 2  # one record per logging step: only rank 0 writes
    # k = ceil(rho * n) over the micro-batch gathered from both ranks: the kept share is rho up to rounding
    assert all(0.2 <= fraction < 0.2 + 1 / 64 for fraction in kept)
    # decoded tokens are summed over both ranks: a tree decodes fewer than its leaves hold
    decoded = [r["rollout/decoded_tokens"] for r in records if "loss" in r]
    share = [r["rollout/decoded_share"] for r in records if "loss" in r]
    assert summary["decoded_tokens"] == sum(decoded) > 0
    assert all(value < 1.0 for value in share) if rollout == TREE else all(value == 1.0 for value in share)
    # each rank samples with its own engine copy; the mismatch is measured over both ranks' rows
    flips = [r.get("mismatch/router_flips") for r in records if "loss" in r]
    assert all(value > 0.05 for value in flips) if rollout == COPY_ENGINE else flips == [None, None]


def _trl_accelerate_config(name: str) -> str:
    import os

    import trl

    return os.path.join(os.path.dirname(trl.__file__), "accelerate_configs", name)


def trl_zero_launch(stage: str, port: int) -> list[str]:
    """``accelerate launch`` with TRL's own ``<stage>.yaml`` (float32, 2 processes), up to the program."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        _trl_accelerate_config(f"{stage}.yaml"),
        "--mixed_precision",
        "no",
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, arm, rollout", [("zero2", "forking", []), ("zero3", "forking_router", TREE)], ids=["zero2", "zero3-tree"]
)
def test_deepspeed_zero_on_cpu_with_trls_own_accelerate_configs(tmp_path, stage, arm, rollout):
    """TRL's zero2.yaml / zero3.yaml, unchanged, with 2 CPU processes; ZeRO-3 with the router-aware arm, routing
    replay and forking-tree rollouts (the tree's branches replay their root's recorded prefix)."""
    output = tmp_path / stage
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        _trl_accelerate_config(f"{stage}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        "29541",
        *traced(
            tmp_path / "trace",
            SKEW,
            ["-m", "rlvr.cli", "quickstart", "--arm", arm, "moe.routing_replay=rollout", *TINY, *rollout]
            + [f"output_dir={output}"],
        ),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=fresh_cache_env(tmp_path))
    assert_identical_collectives(tmp_path / "trace", finished)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert all("moe/routing_drift" in r for r in records if "loss" in r)


def test_launch_builds_the_accelerate_command(capsys):
    from rlvr.cli.main import main

    code = main(
        [
            "launch",
            "--zero",
            "3",
            "--offload",
            "--nproc",
            "8",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--main-addr",
            "10.0.0.1",
            "--dry-run",
            "--",
            "train",
            "--config",
            "my.yaml",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for piece in (
        "accelerate.commands.launch",
        "configs/deepspeed/zero3_offload.yaml",
        "configs/deepspeed/zero3_offload.json",
        "--num_processes 16",
        "--num_machines 2",
        "--machine_rank 1",
        "--main_process_ip 10.0.0.1",
        "-m rlvr.cli train --config my.yaml",
    ):
        assert piece in printed
    assert main(["launch", "--zero", "2", "--offload", "--dry-run", "--", "train"]) == 2
    assert "--offload needs --zero 3" in capsys.readouterr().err
    assert main(["launch", "--zero", "2", "--nnodes", "2", "--dry-run", "--", "train"]) == 2
    assert main(["launch", "--zero", "2", "--dry-run"]) == 2


@pytest.mark.slow
def test_rlvr_launch_zero3_on_cpu_with_eval(tmp_path, capsys):
    """The command ``rlvr launch --zero 3 --nproc 2`` runs (taken from its --dry-run), with the ranks' completion
    widths made unequal and every collective recorded."""
    output = tmp_path / "launched"
    overrides = [o for o in TINY if not o.startswith("eval.")] + ["eval.sampled_completions=1", "data.num_eval=8"]
    launch = ["--zero", "3", "--nproc", "2", "--main-port", "29547"]
    command = printed_launch_command(capsys, launch, ["quickstart", *overrides, f"output_dir={output}"])
    module = len(command) - 1 - command[::-1].index("-m")  # "python -m accelerate.commands.launch ... -m rlvr.cli ..."
    assert command[module : module + 2] == ["-m", "rlvr.cli"]
    command[module:] = traced(tmp_path / "trace", SKEW, command[module:])
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900, env=fresh_cache_env(tmp_path))
    assert_identical_collectives(tmp_path / "trace", finished)
    summary = json.loads((output / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["eval_after"]["num_problems"] == 8


def _tiny_model_with_spread_entropies(directory):
    """A tiny MoE whose next-token entropies are spread out (a random init is near-uniform, ~4.6 nats
    everywhere), so that which tokens are forking is not decided by float32 rounding. Two layers: in a
    one-layer model an MoE output reaches only its own position's logits, so gating it to forking
    decisions changes nothing; here the gates move layer-0 experts by ~3% over the three steps."""
    import torch

    from rlvr.models import TinyMoESpec, load_pretrained, save_tiny_policy

    save_tiny_policy("qwen3_moe", TinyMoESpec(num_layers=2, hidden_size=32, expert_size=32, num_experts=4), directory)
    model, _ = load_pretrained(directory)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_zero2_and_zero3_two_process_training_matches_one_process(tmp_path):
    """Three optimizer steps on one fixed global batch (generation replaced: see tests/distributed_steps.py),
    forking-token loss with router gates, a load-balancing loss on forking tokens and the LM head on
    forking tokens only (rlvr.training.sparse_head, the head gathered under ZeRO-3): one plain process vs
    2 processes under TRL's own zero2.yaml / zero3.yaml (float32).

    Tolerance: 1e-5 relative on every logged loss, gradient norm, entropy and forking threshold, and on
    the sum and sum of squares of every parameter after the last step. The runs add the same float32
    terms in a different order (per-rank partial sums, then the all-reduce); measured differences are
    <= 6e-7. Real disagreements are far larger: balancing each rank's tokens on its own
    (moe.router_loss_batch=local) moves the first loss by 2e-4 relative and the load-balancing loss by
    0.8%, and a selection that counted k per rank would change the kept tokens.
    """
    from pathlib import Path

    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    helper = str(Path(__file__).parent / "distributed_steps.py")
    runs = {"one": [sys.executable, helper]}
    for port, stage in enumerate(("zero2", "zero3")):
        runs[stage] = [*trl_zero_launch(stage, 29563 + port), helper]
    results = _run_distributed_steps(runs, model_dir, tmp_path)
    one = results.pop("one")
    assert one["world"] == 1 and not one["deepspeed"] and len(one["steps"]) == 3 and one["sparse_head"]
    for stage, run in results.items():
        assert run["world"] == 2 and run["deepspeed"] and run["sparse_head"], stage
        for theirs, ours in zip(run["steps"], one["steps"], strict=True):
            assert theirs.keys() == ours.keys() and "moe/load_balancing_loss" in ours
        _assert_same_training(run, one, stage)


def _run_distributed_steps(runs: dict[str, list[str]], model_dir, tmp_path, *extra: str) -> dict[str, dict]:
    """Each launch command of ``runs`` on tests/distributed_steps.py: the ``steps.json`` its rank 0 wrote."""
    results = {}
    for name, command in runs.items():
        (tmp_path / name).mkdir()
        finished = subprocess.run(
            [*command, str(model_dir), str(tmp_path / name), *extra],
            capture_output=True,
            text=True,
            timeout=600,
            env=fresh_cache_env(tmp_path / name),
        )
        assert finished.returncode == 0, finished.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "steps.json").read_text())
    return results


def _assert_same_training(run: dict, one: dict, label: str) -> None:
    """Every logged value of every step, and every parameter's moments, to 1e-5 (see the test above)."""
    for step, (theirs, ours) in enumerate(zip(run["steps"], one["steps"], strict=True), start=1):
        for key, value in ours.items():
            assert theirs[key] == pytest.approx(value, rel=1e-5), f"{label} step {step} {key}"
    assert run["parameters"].keys() == one["parameters"].keys()
    for name, moments in one["parameters"].items():
        assert run["parameters"][name] == pytest.approx(moments, rel=1e-5, abs=1e-6), f"{label} {name}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "svf"])
def test_adapters_train_the_same_under_ddp_and_zero_2_3_as_in_one_process(tmp_path, method):
    """LoRA (experts included, routers as full parameters) and SVF vectors: three optimizer steps on the fixed
    global batch of tests/distributed_steps.py in one process, and in 2 processes under torchrun (DDP) and
    TRL's zero2.yaml / zero3.yaml, agree to 1e-5 on every logged value and every parameter's moments (the
    same tolerance, for the same reason, as the full-policy test above). LoRA under ZeRO-3 with gradient
    checkpointing runs non-reentrant (rlvr undoes TRL's forced reentrant where DeepSpeed has its fix), which the
    router gates and load-balancing loss of the helper need."""
    from pathlib import Path

    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    helper = str(Path(__file__).parent / "distributed_steps.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571"]
    runs = {"one": [sys.executable, helper], "ddp": [*torchrun, helper]}
    for port, stage in enumerate(("zero2", "zero3")):
        runs[stage] = [*trl_zero_launch(stage, 29573 + port), helper]
    results = _run_distributed_steps(runs, model_dir, tmp_path, method)
    one = results.pop("one")
    trained = [name for name in one["parameters"] if ("lora_" in name or "_svf_dz" in name)]
    assert trained and len(one["steps"]) == 3
    for launch, run in results.items():
        assert run["world"] == 2 and run["deepspeed"] == (launch != "ddp"), launch
        _assert_same_training(run, one, launch)
    # ZeRO-3 never holds every SVF factor whole: each matrix's are partitioned as they are made
    assert results["zero3"]["svf_factors_partitioned_before_training"] == (method == "svf")
