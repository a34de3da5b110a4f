"""``rlvr launch``: build the launch command for a multi-process job, print it, run it.

``--zero 2|3``: ``accelerate launch`` with rlvr's DeepSpeed ZeRO configs. ``--ep N``: ``torchrun`` with the
run's ``parallel.ep_size=N`` (expert parallelism through transformers, dense weights under FSDP2; no
DeepSpeed). rlvr adds no process management: multi-node runs use the launcher on every node (or under
SLURM's ``srun``), with the same command and a different ``--node-rank``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from rlvr.utils.packaged import DEEPSPEED_DIR


def config_files(zero: int, offload: bool) -> tuple[Path, Path]:
    """The accelerate YAML and DeepSpeed JSON shipped in rlvr/configs/deepspeed/."""
    if zero not in (2, 3):
        raise ValueError(f"--zero must be 2 or 3, got {zero}")
    if offload and zero != 3:
        raise ValueError("--offload needs --zero 3 (deepspeed/zero3_offload.json)")
    name = "zero3_offload" if offload else f"zero{zero}"
    return DEEPSPEED_DIR / f"{name}.yaml", DEEPSPEED_DIR / f"{name}.json"


def build_command(args: argparse.Namespace, rlvr_arguments: list[str]) -> list[str]:
    if (args.zero is None) == (args.ep is None):
        raise ValueError("give one of --zero 2|3 (DeepSpeed ZeRO) and --ep N (expert parallelism)")
    if args.ep is not None:
        return expert_parallel_command(args, rlvr_arguments)
    accelerate_yaml, deepspeed_json = config_files(args.zero, args.offload)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_yaml),
        "--deepspeed_config_file",
        str(deepspeed_json),
        "--num_processes",
        str(args.nproc * args.nnodes),
        "--num_machines",
        str(args.nnodes),
        "--machine_rank",
        str(args.node_rank),
    ]
    command += node_zero(args, "--main_process_ip", "--main_process_port")
    return command + ["-m", "rlvr.cli", *rlvr_arguments]


def node_zero(args: argparse.Namespace, address_flag: str, port_flag: str) -> list[str]:
    """The launcher's flags for node 0's address (needed with several nodes) and port, in its spelling."""
    flags = []
    if args.nnodes > 1:
        if not args.main_addr:
            raise ValueError("--nnodes > 1 needs --main-addr (the address of node 0)")
        flags += [address_flag, args.main_addr]
    if args.main_port:
        flags += [port_flag, str(args.main_port)]
    return flags


def expert_parallel_command(args: argparse.Namespace, rlvr_arguments: list[str]) -> list[str]:
    """``torchrun`` on every process of every node, the run told its ``parallel.ep_size``."""
    world = args.nproc * args.nnodes
    if args.ep < 2 or world % args.ep:
        raise ValueError(f"--ep {args.ep}: needs 2 or more ranks per expert group, dividing the {world} processes")
    if args.offload:
        raise ValueError("--offload is DeepSpeed's (--zero 3); expert parallelism does not offload")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    command += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank)]
    command += node_zero(args, "--master-addr", "--master-port")
    return command + ["-m", "rlvr.cli", *rlvr_arguments, f"parallel.ep_size={args.ep}"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zero", type=int, choices=(2, 3), help="DeepSpeed ZeRO stage (or --ep)")
    parser.add_argument(
        "--ep",
        type=int,
        help="expert parallelism over N ranks (torchrun; experts sharded, dense weights under FSDP2; or --zero)",
    )
    parser.add_argument(
        "--offload", action="store_true", help="offload optimizer states and parameters to CPU (ZeRO-3)"
    )
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per node")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes")
    parser.add_argument("--node-rank", type=int, default=0, help="rank of this node (0 .. nnodes - 1)")
    parser.add_argument("--main-addr", help="address of node 0 (multi-node)")
    parser.add_argument("--main-port", type=int, help="port on node 0 (default: accelerate's)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")


def launch(args: argparse.Namespace, rlvr_arguments: list[str]) -> int:
    if not rlvr_arguments:
        print(
            "rlvr launch: give the rlvr command after --, e.g. "
            "rlvr launch --zero 3 --nproc 8 -- train --config my.yaml (or --ep 8)",
            file=sys.stderr,
        )
        return 2
    if min(args.nproc, args.nnodes) < 1 or not 0 <= args.node_rank < args.nnodes:
        print("rlvr launch: need --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes", file=sys.stderr)
        return 2
    try:
        command = build_command(args, rlvr_arguments)
    except ValueError as error:
        print(f"rlvr launch: {error}", file=sys.stderr)
        return 2
    print("rlvr launch:", shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(command)
