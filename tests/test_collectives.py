"""rlvr.utils.collectives: every collective rlvr issues goes through it, keeps dtypes, agrees shapes, and runs on
the accelerator's device; ranks holding unequal data issue identical collectives."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlvr.utils.collectives import Collectives, OneProcess
from tests.launching import fresh_cache_env, printed_launch_command

RLVR = Path(__file__).resolve().parent.parent / "rlvr"
TRACER = str(Path(__file__).parent / "collective_trace.py")

# a collective called directly: torch.distributed's, accelerate's helpers, or imported by name
DIRECT_COLLECTIVE = re.compile(
    r"(torch\.distributed|\bdist)\.(all_\w+|broadcast\w*|reduce\w*|gather\w*|scatter\w*|barrier)\s*\("
    r"|accelerator\.(gather\w*|reduce|pad_across_processes)\s*\("
    r"|\b(gather_object|broadcast_object_list|pad_across_processes)\s*\("
    r"|from (torch\.distributed|accelerate\.utils)\S* import .*\b(all_|gather|reduce|broadcast|scatter|pad_across)"
)


def test_no_rlvr_module_calls_a_collective_except_the_helper():
    offenders = []
    for path in sorted(RLVR.rglob("*.py")):
        if path.name == "collectives.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if DIRECT_COLLECTIVE.search(line):
                offenders.append(f"{path.relative_to(RLVR.parent)}:{number}: {line.strip()}")
    assert offenders == [], "collectives outside rlvr/utils/collectives.py:\n" + "\n".join(offenders)


def test_the_source_check_finds_what_the_trainer_used_to_call():
    before = [  # the trainer's calls before rlvr.utils.collectives
        "all_mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1))",
        "return self.accelerator.reduce(values, reduction='sum')",
        "rewards, gather_object(completions), self._group_size()",
        "from accelerate.utils import broadcast_object_list, gather_object",
        "torch.distributed.all_reduce(count)",
    ]
    assert all(DIRECT_COLLECTIVE.search(line) for line in before)
    assert not DIRECT_COLLECTIVE.search("torch.distributed.get_rank(group=generation.tp_group)")


def test_one_process_issues_nothing():
    collectives = OneProcess()
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert collectives.gather_rows(mask) is mask and collectives.sum(mask) is mask
    assert collectives.gather_objects(["a"]) == ["a"] and collectives.broadcast_objects([1], 0) == [1]
    assert collectives.num_processes == 1


def _rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    collectives = Collectives("cpu")
    width = 3 + 2 * rank  # rank 0: 3 columns, rank 1: 5
    mask = torch.ones(2, width, dtype=torch.bool)
    mask[1, -1] = False
    routing = torch.full((2, width, 2, 2), 7 + rank, dtype=torch.int16)  # (B, L, layers, k), int16 as vLLM's
    entropies = torch.arange(2 * width, dtype=torch.float32).reshape(2, width) + 100 * rank
    vector = torch.tensor([1.0, 2.0 + rank], dtype=torch.float64)
    results = {
        "mask": collectives.gather_rows(mask, False),
        "routing": collectives.gather_rows(routing, -1),
        "entropies": collectives.gather_rows(entropies, 0.5),
        "group_ids": collectives.gather_rows(torch.arange(2) + 2 * rank),
        "sum": collectives.sum(vector),
        "vector_after": vector,
        "objects": collectives.gather_objects([f"rank{rank}", rank]),
        "broadcast": collectives.broadcast_objects([f"from{rank}"], 1),
    }
    try:
        collectives.gather_rows(torch.zeros(1 + rank, 2))
    except ValueError as error:
        results["unequal_rows"] = str(error)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_gather_rows_keeps_dtypes_and_pads_every_rank_alike_over_gloo(tmp_path):
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    expected_mask = torch.ones(4, 5, dtype=torch.bool)
    expected_mask[:2, 3:] = False  # rank 0's padding
    expected_mask[1, 2] = expected_mask[3, 4] = False
    expected_routing = torch.full((4, 5, 2, 2), -1, dtype=torch.int16)
    expected_routing[:2, :3], expected_routing[2:] = 7, 8
    expected_entropies = torch.full((4, 5), 0.5)
    expected_entropies[:2, :3] = torch.arange(6.0).reshape(2, 3)
    expected_entropies[2:] = torch.arange(10.0).reshape(2, 5) + 100
    for rank, results in enumerate(ranks):
        assert results["mask"].dtype == torch.bool and torch.equal(results["mask"], expected_mask), rank
        assert results["routing"].dtype == torch.int16 and torch.equal(results["routing"], expected_routing)
        assert torch.equal(results["entropies"], expected_entropies)
        assert results["group_ids"].tolist() == [0, 1, 2, 3]
        assert results["sum"].dtype == torch.float64 and results["sum"].tolist() == [2.0, 5.0]
        assert results["vector_after"].tolist() == [1.0, 2.0 + rank]  # the caller's tensor is not summed in place
        assert results["objects"] == ["rank0", 0, "rank1", 1]
        assert results["broadcast"] == ["from1"]
        assert "same number of rows on every rank, got [1, 2]" in results["unequal_rows"]  # every rank raised


@pytest.mark.gpu
def test_collectives_move_cpu_tensors_to_the_gpu_for_nccl(tmp_path):
    """NCCL serves CUDA tensors only: a CPU tensor handed to it raises; through the helper it works, and the
    result comes back on the CPU (a one-rank NCCL group: every collective still runs through NCCL)."""
    assert torch.cuda.is_available(), "a gpu test: run it on a CUDA machine (scripts/gpu_check.sh)"
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError):
            dist.all_reduce(torch.ones(3))  # the defect the helper prevents
        collectives = Collectives(torch.device("cuda", 0))
        mask = torch.tensor([[True, False, True]])
        gathered = collectives.gather_rows(mask, False)
        assert gathered.device.type == "cpu" and gathered.dtype == torch.bool and torch.equal(gathered, mask)
        summed = collectives.sum(torch.tensor([1.0, 2.0], dtype=torch.float64))
        assert summed.device.type == "cpu" and summed.tolist() == [1.0, 2.0]
        assert collectives.gather_objects(["a", 1]) == ["a", 1]
        assert collectives.broadcast_objects(["b"], 0) == ["b"]
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Ranks with unequal data issue identical collectives (each run records every collective of each rank).


def collective_sequences(trace_dir: Path, world: int = 2) -> list[list[list]]:
    return [
        [json.loads(line) for line in (trace_dir / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in range(world)
    ]


def assert_identical_collectives(
    trace_dir: Path, finished: subprocess.CompletedProcess | None = None, data_sized: tuple[str, ...] = ()
) -> None:
    """Every rank's sequence of (op, dtype, shape) is the same; on failure, the first difference. With
    ``finished`` (the launch), then that it succeeded: a mismatch is named before the crash it caused. The ops
    in ``data_sized`` (expert parallelism's all-to-all) may send different numbers of rows per rank: their
    first dimension is not compared."""
    if finished is not None and not (trace_dir / "rank0.jsonl").exists():
        raise AssertionError(f"no collective recorded, exit {finished.returncode}:\n{finished.stderr[-3000:]}")
    first, *others = collective_sequences(trace_dir)
    assert first, "no collective was recorded"
    for rank, sequence in enumerate(others, start=1):
        for index, (ours, theirs) in enumerate(zip(first, sequence, strict=False)):
            if ours[0] in data_sized and theirs[0] == ours[0] and len(ours) == len(theirs) == 3:
                ours, theirs = [*ours[:2], ours[2][1:]], [*theirs[:2], theirs[2][1:]]
            where = next((f" in arm {line[1]}" for line in reversed(first[:index]) if line[0] == "arm"), "")
            assert ours == theirs, f"collective {index}{where}: rank 0 {ours}, rank {rank} {theirs}"
        # equal prefixes of unequal length: one rank stopped (a crash elsewhere) or issued more
        assert len(first) == len(sequence), f"rank 0 issued {len(first)} collectives, rank {rank} {len(sequence)}"
    if finished is not None:
        assert finished.returncode == 0, finished.stderr[-3000:]


def traced(trace_dir: Path, skew: int, program: list[str]) -> list[str]:
    """``program`` (a script or ``-m module`` with its arguments) run under the collective tracer."""
    return [TRACER, str(trace_dir), str(skew), *program]


def test_the_tracer_finds_a_mismatch(tmp_path):
    """The check above fails on the defect it guards against: one rank's bool mask, the other's int64."""
    for rank, dtype in enumerate(("torch.bool", "torch.int64")):
        lines = [["all_gather_into_tensor", "torch.int64", [4]], ["all_gather_into_tensor", dtype, [8, 26]]]
        (tmp_path / f"rank{rank}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(AssertionError, match="collective 1: rank 0"):
        assert_identical_collectives(tmp_path)


def test_the_tracer_lets_an_all_to_all_send_a_rank_its_own_number_of_rows(tmp_path):
    """Expert parallelism: how many tokens a rank routes to the other's experts is its data's; their width is not."""
    for rank, rows in enumerate((5, 7)):
        line = ["functional.all_to_all_single", "torch.float32", [rows, 32]]
        (tmp_path / f"rank{rank}.jsonl").write_text(json.dumps(line) + "\n")
    assert_identical_collectives(tmp_path, data_sized=("functional.all_to_all_single",))
    with pytest.raises(AssertionError, match="collective 0: rank 0"):
        assert_identical_collectives(tmp_path)
    (tmp_path / "rank1.jsonl").write_text(json.dumps(["functional.all_to_all_single", "torch.float32", [7, 16]]) + "\n")
    with pytest.raises(AssertionError, match="collective 0: rank 0"):
        assert_identical_collectives(tmp_path, data_sized=("functional.all_to_all_single",))


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [[], ["lora"], ["svf"]], ids=["full", "lora", "svf"])
def test_ranks_with_unequal_batches_issue_identical_collectives_under_zero3(tmp_path, adapter):
    """Fixed batches that differ per rank as sampling makes them differ (tests/distributed_steps.py unequal):
    rank 1's completions are narrower, some of its rows score nothing, and at one step it has no selectable
    token at all; the sparse head, router gates and a load-balancing loss on forking tokens are on; the whole
    policy trains, or LoRA / SVF adapters (SVF gathers its partitioned weights to decompose them)."""
    from test_distributed import _tiny_model_with_spread_entropies, trl_zero_launch

    model_dir = _tiny_model_with_spread_entropies(tmp_path / "model")
    helper = str(Path(__file__).parent / "distributed_steps.py")
    program = [helper, str(model_dir), str(tmp_path / "out"), "unequal", *adapter]
    command = [*trl_zero_launch("zero3", 29573), *traced(tmp_path / "trace", 0, program)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_cache_env(tmp_path))
    assert_identical_collectives(tmp_path / "trace", finished)
    steps = json.loads((tmp_path / "out" / "steps.json").read_text())["steps"]
    assert len(steps) == 3 and all(step["forking/kept_tokens"] > 0 for step in steps)


@pytest.mark.slow
def test_every_capability_under_rlvr_launch_zero3_from_an_empty_cache(tmp_path, capsys):
    """One arm per capability (tests/arm_matrix.py: forking, forking_router, tree, replay, dynamic, skip_both with
    refill, prune_both, each token rule, lora, svf) trains under the command ``rlvr launch --zero 3 --nproc 2``
    prints (ZeRO-3 with zero3_init_flag), one arm after another in one launch, on a new home: the first arm builds
    the tiny policy and a warm start under ZeRO-3 and saves the final model. Rank 1 samples narrower completions
    (SKEW); every collective of both ranks is recorded, DeepSpeed's parameter gathers included, and must be
    identical. Fails on a save of a partitioned policy (``save_tiny_policy`` before ``built_whole``) and on skip
    choices whose probe forwards ran as often as a rank's own skip draws asked (``PromptFilter._choose``)."""
    from transformers import AutoModelForCausalLM

    from rlvr.tuning import load_adapted
    from tests.arm_matrix import ARMS, STEPS

    finished = launch_arm_matrix(tmp_path, capsys, list(ARMS), 29581)
    assert_identical_collectives(tmp_path / "trace", finished)
    trace = collective_sequences(tmp_path / "trace")[0]
    assert [line[1] for line in trace if line[0] == "arm"] == list(ARMS)
    assert sum(line[0] == "all_gather_into_tensor" for line in trace) > 1000  # ZeRO-3's parameter gathers
    for name in ARMS:
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == STEPS, name
    skipped = [
        json.loads(line).get("prompts/skipped", 0) for line in (tmp_path / "out" / "skip_both" / "metrics.jsonl").open()
    ]
    assert sum(skipped) > 0  # skip draws differed per rank, and the ranks agreed on the candidate rounds
    cache = tmp_path / "home" / ".cache" / "rlvr" / "warm_start"
    assert {path.name.split("-")[0] for path in cache.iterdir()} == {"base", "warm"}  # built here; no staging left
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "forking" / "model")
    assert all(tensor.numel() > 0 for tensor in saved.state_dict().values())
    for method in ("lora", "svf"):
        policy, _ = load_adapted(tmp_path / "out" / method / "model")
        moved = [p for n, p in policy.named_parameters() if "lora_B" in n or n.endswith("_svf_dz")]
        assert moved and any(p.abs().max() > 0 for p in moved), method


def launch_arm_matrix(tmp_path, capsys, arms: list[str], port: int, **deepspeed: object):
    """tests/arm_matrix.py on ``arms``, traced, under the command ``rlvr launch --zero 3 --nproc 2`` prints, on a new
    home; ``deepspeed``: keys of its ZeRO-3 JSON changed (written to a copy)."""
    command = printed_launch_command(capsys, ["--zero", "3", "--nproc", "2", "--main-port", str(port)], ["train"])
    assert command[-3:] == ["-m", "rlvr.cli", "train"]
    if deepspeed:
        where = command.index("--deepspeed_config_file") + 1
        settings = json.loads(Path(command[where]).read_text())
        settings["zero_optimization"].update(deepspeed)
        command[where] = str(tmp_path / "zero3.json")
        Path(command[where]).write_text(json.dumps(settings))
    program = [
        str(Path(__file__).parent / "arm_matrix.py"),
        str(tmp_path / "trace"),
        str(tmp_path / "out"),
        ",".join(arms),
    ]
    command[-3:] = traced(tmp_path / "trace", 5, program)
    environment = fresh_cache_env(tmp_path, PYTHONPATH=str(Path(__file__).parent))
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)


@pytest.mark.slow
def test_svf_saves_its_vectors_under_zero3_without_16bit_gathering(tmp_path, capsys):
    """Without ``stage3_gather_16bit_weights_on_model_save`` transformers hands the saving rank an empty state
    dict; the SVF vectors are gathered on every rank instead, and load back."""
    from rlvr.tuning import load_adapted

    finished = launch_arm_matrix(tmp_path, capsys, ["svf"], 29583, stage3_gather_16bit_weights_on_model_save=False)
    assert_identical_collectives(tmp_path / "trace", finished)
    policy, _ = load_adapted(tmp_path / "out" / "svf" / "model")
    moved = [p for n, p in policy.named_parameters() if n.endswith("_svf_dz")]
    assert moved and any(p.abs().max() > 0 for p in moved)
