"""Expert parallelism (``parallel.ep_size``, ``rlvr launch --ep``): the guards, the launch command, and two CPU
processes holding two experts each that train as one process holding all four."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import _assert_same_training, _run_distributed_steps, _tiny_model_with_spread_entropies

from rlvr.models.parallel import ParallelConfig, check_expert_parallel
from rlvr.models.tiny import TinyMoESpec, tiny_moe_config
from rlvr.run.config import load_config
from rlvr.utils.options import ConfigError
from tests.launching import fresh_cache_env, printed_launch_command
from tests.test_cli import TINY  # a run of seconds: one MoE layer of 4 experts, a 4-step warm start


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.ep_size=0"], r"parallel.ep_size: must be >= 1"),
        (["peft.method=lora"], r"parallel.ep_size=2: peft.method is not supported with expert parallelism yet"),
        (["rollout.engine=copy"], r"rollout.engine=copy is not supported"),
        (["moe.routing_replay=old_policy"], r"moe.routing_replay is not supported"),
        (["resume=true"], r"resume is not supported"),
        (["grpo.save_strategy=steps"], r"grpo.save_strategy is not supported"),
    ],
)
def test_what_expert_parallelism_cannot_do_yet_is_refused_naming_the_key(overrides, message, monkeypatch):
    monkeypatch.setattr("rlvr.run.config.world_size", lambda: 2)  # as in a 2-process launch
    ep = [] if "ep_size=0" in overrides[0] else ["parallel.ep_size=2"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*ep, *overrides])


def test_a_launch_that_cannot_hold_the_experts_fails_before_any_model_is_built(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"parallel.ep_size=2: expert parallelism needs 2 processes"):
        load_config(None, ["parallel.ep_size=2"])
    monkeypatch.setattr("rlvr.run.config.world_size", lambda: 3)
    with pytest.raises(ConfigError, match=r"parallel.ep_size=2 must divide the number of processes \(3\)"):
        load_config(None, ["parallel.ep_size=2"])


def test_the_layout_is_checked_against_the_launch_and_the_model(monkeypatch):
    def text_config(architecture: str, experts: int = 4):
        spec = TinyMoESpec(num_experts=experts, top_k=2)
        return tiny_moe_config(architecture, spec, 100, 0, 1).get_text_config()

    two = ParallelConfig(ep_size=2)
    check_expert_parallel(two, text_config("qwen3_moe"), world=2)  # 2 experts per rank
    check_expert_parallel(two, text_config("mixtral"), world=4)  # two expert groups of 2 ranks
    with pytest.raises(ValueError, match=r"needs 2 processes \(rlvr launch --ep 2\)"):
        check_expert_parallel(two, text_config("qwen3_moe"), world=1)
    with pytest.raises(ValueError, match=r"must divide the number of processes \(3\)"):
        check_expert_parallel(two, text_config("qwen3_moe"), world=3)
    with pytest.raises(ValueError, match=r"must divide the number of experts per layer \(3\)"):
        check_expert_parallel(two, text_config("qwen3_moe", experts=3), world=2)
    with pytest.raises(ValueError, match=r"no expert-parallel plan for llama4_text"):
        check_expert_parallel(two, text_config("llama4"), world=2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=r"launch with rlvr launch --ep, not --zero"):
        check_expert_parallel(two, text_config("qwen3_moe"), world=2)


def test_launch_ep_builds_a_torchrun_command_with_the_runs_ep_size(capsys):
    command = printed_launch_command(capsys, ["--ep", "2", "--nproc", "4"], ["train", "--config", "quickstart"])
    assert command[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "4"]
    assert command[-6:] == ["-m", "rlvr.cli", "train", "--config", "quickstart", "parallel.ep_size=2"]
    assert "--deepspeed_config_file" not in command
    from rlvr.cli.main import main

    for arguments, message in (
        (["--ep", "3", "--nproc", "4"], "--ep 3: needs 2 or more ranks per expert group, dividing the 4 processes"),
        (["--ep", "2", "--zero", "3"], "give one of --zero 2|3 (DeepSpeed ZeRO) and --ep N"),
        (["--nproc", "2"], "give one of --zero 2|3"),
    ):
        assert main(["launch", *arguments, "--dry-run", "--", "train"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_holding_two_experts_each_train_as_one_process_holding_four(tmp_path):
    """Three optimizer steps of the forking_router arm on one fixed global batch (tests/distributed_steps.py:
    forking-token loss, router and expert gates on forking decisions, a load-balancing loss over them, the LM
    head on forking tokens only; the routing analytics pooled over ranks), one plain process vs 2 processes
    with parallel.ep_size=2 (each rank holds
    2 of every layer's 4 experts; tokens reach them by all-to-all; dense weights under FSDP2).

    Tolerance as for ZeRO (1e-5 relative on every logged value and parameter moment): the runs add the same
    float32 terms in another order. Measured: <= 4e-7. The saved model (gathered whole) reads back with the
    trained weights."""
    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    helper = str(Path(__file__).parent / "distributed_steps.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29671"]
    results = _run_distributed_steps({"one": [sys.executable, helper]}, model_dir, tmp_path)
    results |= _run_distributed_steps({"ep": [*torchrun, helper]}, model_dir, tmp_path, "ep")
    one, ep = results["one"], results["ep"]
    assert ep["world"] == 2 and ep["expert_parallel"] == 2 and not ep["deepspeed"] and ep["sparse_head"]
    _assert_same_training(ep, one, "ep")
    for name, moments in ep["parameters"].items():
        assert ep["saved_parameters"][name] == pytest.approx(moments, rel=1e-6, abs=1e-7), name


@pytest.mark.slow
def test_rlvr_launch_ep_trains_from_an_empty_cache(tmp_path, capsys):
    """The quickstart through rlvr launch --ep 2 on 2 CPU processes: warm start, eval, 3 RL steps with the
    experts sharded, the final model saved whole."""
    output = tmp_path / "run"
    program = ["train", "--config", "quickstart", f"output_dir={output}", *TINY, "grpo.max_steps=3"]
    command = printed_launch_command(capsys, ["--ep", "2", "--nproc", "2", "--main-port", "29673"], program)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_cache_env(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["eval_after"] is not None
    from rlvr.models import load_pretrained

    model, _ = load_pretrained(str(output / "model"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4  # every expert, not a rank's shard


FSDP_PROGRAM = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from rlvr.models.parallel import gathered_for_generation

dist.init_process_group("gloo", init_method="file://{init}", rank=0, world_size=1)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
for layer in model:
    fully_shard(layer)
fully_shard(model)

def reshards():  # whether each FSDP parameter group reshards after forward
    groups = [m._get_fsdp_state()._fsdp_param_groups for m in model.modules() if hasattr(m, "_get_fsdp_state")]
    return [group.post_forward_mesh_info is not None for module_groups in groups for group in module_groups]

model(torch.randn(2, 4))
before = reshards()
with gathered_for_generation(model):
    inside = reshards()
    model(torch.randn(2, 4))
print(before, inside, reshards())
dist.destroy_process_group()
"""


def test_generation_keeps_fsdp2_weights_gathered_and_then_restores_training_settings(tmp_path):
    """Under expert parallelism FSDP2 shards the dense weights; generation keeps them gathered for the call
    (one all-gather per generation, not one per decoded token: benchmarks/communication.py measured 327 -> 50
    MiB per layer) and leaves every FSDP module resharding after forward again, as training expects."""
    program = FSDP_PROGRAM.replace("{init}", str(tmp_path / "init"))
    finished = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert finished.stdout.strip().splitlines()[-1] == "[True, True] [False, False] [True, True]"
