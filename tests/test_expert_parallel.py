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
        (["resume=true"], r"resume is not supported with expert parallelism yet: transformers saves .* without"),
        (["grpo.save_strategy=steps"], r"grpo.save_strategy is not supported"),
    ],
)
def test_what_expert_parallelism_cannot_do_yet_is_refused_naming_the_key(overrides, message):
    ep = [] if "ep_size=0" in overrides[0] else ["parallel.ep_size=2"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*ep, *overrides])


def test_a_launch_that_cannot_hold_the_experts_fails_before_anything_is_built(monkeypatch, tmp_path):
    """The config loads anywhere (to plan or inspect a recipe); the run refuses the launch before it makes its
    directory."""
    from rlvr.run.recipe import train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = load_config(None, ["parallel.ep_size=2", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"parallel.ep_size=2: expert parallelism needs 2 processes"):
        train(config)
    monkeypatch.setattr("rlvr.run.config.world_size", lambda: 3)
    with pytest.raises(ConfigError, match=r"parallel.ep_size=2 must divide the number of processes \(3\)"):
        train(config)
    assert not (tmp_path / "run").exists()


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
@pytest.mark.parametrize("arm", ["forking", "forking_router", "replay"])
def test_two_ranks_holding_two_experts_each_train_as_one_process_holding_four(tmp_path, arm):
    """Three optimizer steps of each router-aware arm on one fixed global batch (tests/distributed_steps.py: the
    forking-token loss with the LM head on forking tokens only; forking_router adds router and expert gates on
    forking decisions and a load-balancing loss over them; replay forces recorded experts besides, one position
    in four left to the router; routing analytics pooled over ranks), one plain process vs 2 processes with
    parallel.ep_size=2 (each rank holds 2 of every layer's 4 experts; tokens reach them by all-to-all; dense
    weights under FSDP2). Replayed experts live on both ranks: a rank's tokens are forced onto experts it does
    not hold.

    Tolerance as for ZeRO (1e-5 relative on every logged value and parameter moment): the runs add the same
    float32 terms in another order. Measured: <= 4e-7. The saved model (gathered whole) reads back with the
    trained weights."""
    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    helper = str(Path(__file__).parent / "distributed_steps.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29671"]
    results = _run_distributed_steps({"one": [sys.executable, helper]}, model_dir, tmp_path, arm)
    results |= _run_distributed_steps({"ep": [*torchrun, helper]}, model_dir, tmp_path, "ep", arm)
    one, ep = results["one"], results["ep"]
    assert ep["world"] == 2 and ep["expert_parallel"] == 2 and not ep["deepspeed"] and ep["sparse_head"]
    assert ep["arm"] == one["arm"] == arm
    logged = set(one["steps"][0])
    assert ("moe/load_balancing_loss" in logged) == (arm != "forking")
    assert ("moe/routing_drift" in logged) == (arm == "replay")
    _assert_same_training(ep, one, "ep")
    for name, moments in ep["parameters"].items():
        assert ep["saved_parameters"][name] == pytest.approx(moments, rel=1e-6, abs=1e-7), name


@pytest.mark.slow
def test_ranks_with_unequal_batches_issue_the_same_collectives_under_expert_parallelism(tmp_path):
    """The replay arm on batches that differ per rank as sampling makes them differ (tests/distributed_steps.py
    unequal: narrower completions on rank 1, rows that score nothing, a step with no selectable token there):
    every collective of both ranks is recorded and the sequences agree in op, dtype and shape, except the
    size of what each all-to-all sends, which is how many tokens a rank routes to the other's experts."""
    from test_collectives import assert_identical_collectives, traced

    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    helper = str(Path(__file__).parent / "distributed_steps.py")
    program = [helper, str(model_dir), str(tmp_path / "out"), "unequal", "ep", "replay"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29675"]
    command = [*torchrun, *traced(tmp_path / "trace", 0, program)]
    (tmp_path / "out").mkdir()
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_cache_env(tmp_path))
    exchanges = ("functional.all_to_all_single_autograd", "functional.all_to_all_single")  # the tokens' all-to-all
    assert_identical_collectives(tmp_path / "trace", finished, data_sized=exchanges)
    recorded = (tmp_path / "trace" / "rank0.jsonl").read_text()
    assert all(op in recorded for op in (*exchanges, "reduce_scatter_single"))  # experts' and FSDP2's traffic seen
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())["steps"]
    assert len(steps) == 3 and all(step["forking/kept_tokens"] > 0 for step in steps)


@pytest.mark.slow
@pytest.mark.parametrize("replay", ["none", "rollout", "old_policy"])
def test_rlvr_launch_ep_trains_from_an_empty_cache(tmp_path, capsys, replay):
    """The quickstart through rlvr launch --ep 2 on 2 CPU processes: warm start, eval, 3 RL steps with the
    experts sharded, the final model saved whole; with routing replay, the experts each rank's routers chose
    while generating (rollout: all-to-all inside every decoding step), or in TRL's old-policy forward of a
    generation batch that serves two optimizer steps (old_policy), forced in its training forwards."""
    output = tmp_path / "run"
    program = ["train", "--config", "quickstart", f"output_dir={output}", *TINY, "grpo.max_steps=3"]
    program.append(f"moe.routing_replay={replay}")
    if replay == "old_policy":  # the old policy differs from the current one at every second step
        program += ["grpo.steps_per_generation=2", "grpo.per_device_train_batch_size=4"]
    command = printed_launch_command(capsys, ["--ep", "2", "--nproc", "2", "--main-port", "29673"], program)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_cache_env(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2 and summary["eval_after"] is not None
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    replayed = [step for step in steps if "moe/routing_drift" in step]
    assert len(replayed) == (0 if replay == "none" else 3)
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


SYNC_PROGRAM = """
import sys, types, torch, torch.distributed as dist
from accelerate import Accelerator
from trl.distributed import DistributedBackend
from trl.generation.vllm_generation import VLLMGeneration
from rlvr.models import load_pretrained
from rlvr.models.parallel import ParallelConfig
from rlvr.training import setup

policy, _ = load_pretrained(sys.argv[1], parallel=ParallelConfig(ep_size=2))
accelerator = Accelerator(cpu=True)
generation = VLLMGeneration.__new__(VLLMGeneration)  # TRL's weight sync without an engine (vLLM needs CUDA)
generation.model, generation.accelerator, generation._dist = policy, accelerator, DistributedBackend(accelerator)
trls = {name: tuple(getattr(t, "_local_tensor", t).shape) for name, t in generation._iter_named_params()}
setup.engine_weight_sync(types.SimpleNamespace(accelerator=accelerator, model=policy, vllm_generation=generation))
sent = dict(generation._iter_named_params())  # every rank iterates: each full_tensor() is a collective
if dist.get_rank() == 0:
    whole = dict(load_pretrained(sys.argv[1])[0].named_parameters())
    assert sent.keys() == whole.keys(), sent.keys() ^ whole.keys()
    for name, tensor in sent.items():
        assert type(tensor) in (torch.Tensor, torch.nn.Parameter) and torch.equal(tensor, whole[name].data), name
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    print(trls[experts], tuple(sent[experts].shape))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_trls_vllm_weight_sync_sends_an_expert_parallel_policy_whole(tmp_path):
    """TRL's own ``VLLMGeneration._iter_named_params`` on a policy loaded with experts over 2 ranks: alone it
    sends each rank's shard (2 of 4 experts); behind rlvr's engine weight sync every tensor equals the whole
    checkpoint's. No vLLM engine runs (it needs CUDA): the sync is TRL's code up to the engine's load_weights."""
    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    (tmp_path / "sync.py").write_text(SYNC_PROGRAM)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29677"]
    command = [*torchrun, str(tmp_path / "sync.py"), str(model_dir)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=fresh_cache_env(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.strip().splitlines()[-1] == "(2, 64, 32) (4, 64, 32)"
