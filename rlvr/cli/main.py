"""The ``rlvr`` command line (also ``python -m rlvr``).

    rlvr quickstart                      # warm start + forking-token GRPO on the embedded tiny MoE
    rlvr train --config quickstart --forking.rho 0.3 --learning_rate 1e-5   # TRL's own flags work too
    rlvr compare --config quickstart     # arms x seeds on the same data, then report.md
    rlvr report runs/compare             # report.md + figures from run or compare directories
    rlvr launch --zero 3 --nproc 8 -- train --config my.yaml   # DeepSpeed ZeRO through accelerate launch
    rlvr validate --config F             # check a config and print it resolved, building nothing
    rlvr configs                         # the packaged configs; --copy NAME to edit one

Every config key can be overridden as ``--section.key value`` or ``section.key=value``; a bare
``GRPOConfig`` field (``--max_steps 3``) means ``grpo.max_steps``. ``rlvr train --help`` lists every key.

Each command is one (add-arguments, run) pair in :data:`COMMANDS`; every rlvr error type is turned
into one ``rlvr <command>: <kind> error: ...`` line and exit code 2 by :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from rlvr import __version__
from rlvr.cli.commands import (
    add_compare_arguments,
    add_config_arguments,
    add_configs_arguments,
    add_launch_arguments,
    add_report_arguments,
    add_upcycle_arguments,
    run_compare,
    run_configs,
    run_report,
    run_train,
    run_upcycle,
    run_validate,
)
from rlvr.cli.shutdown import exit_process
from rlvr.run.config import ConfigError, RunConfig, format_help
from rlvr.utils.packaged import CONFIG_ROOT

CONFIG_DIR = CONFIG_ROOT  # the packaged configs (rlvr/configs/)


# ---------------------------------------------------------------- the parser


@dataclass(frozen=True)
class Command:
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    takes_overrides: bool = False  # accepts config keys (--key value / key=value) after its own arguments
    config_schema: Callable[[], type] = lambda: RunConfig  # the config class whose keys --help lists


def _experiment_schema() -> type:
    from rlvr.experiment.compare import ExperimentConfig

    return ExperimentConfig


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train a policy with ForkingGRPOTrainer from a YAML config",
        "Train with forking-token GRPO. Examples:\n"
        "  rlvr train --config quickstart --forking.rho 0.3 --max_steps 50\n"
        "  rlvr train --config my.yaml --arm full            # the full-update baseline",
        add_config_arguments,
        run_train,
        takes_overrides=True,
    ),
    "quickstart": Command(
        "warm-start the embedded tiny MoE, then forking-token GRPO, eval before/after",
        "Runs the packaged quickstart config (overrides allowed, e.g. grpo.max_steps=20;\n"
        "--arm full runs the full-update baseline instead of forking tokens).",
        lambda parser: add_config_arguments(parser, required=False),
        run_train,
        takes_overrides=True,
    ),
    "compare": Command(
        "run every arm x seed on the same data, then write report.md",
        "The central experiment: arms are packaged overlays (rlvr configs lists them) on one base config.\n"
        "Runs go to <output_dir>/<arm>-seed<seed>/; finished runs are skipped, so an interrupted compare resumes.\n"
        "With upcycle.inits, every arm also runs from each starting policy\n"
        "(Branch-Train-MiX, sparse upcycling, scratch).\n"
        "Examples:\n  rlvr compare --config quickstart --arms full,forking --seeds 0,1\n"
        "  rlvr compare --config upcycle",
        add_compare_arguments,
        run_compare,
        takes_overrides=True,
        config_schema=_experiment_schema,
    ),
    "report": Command(
        "write report.md and figures from run or compare directories",
        "Examples:\n  rlvr report runs/compare            # a compare directory\n"
        "  rlvr report runs/a runs/b --out runs/ab",
        add_report_arguments,
        run_report,
    ),
    "launch": Command(
        "run an rlvr command under DeepSpeed ZeRO through accelerate launch",
        "Builds, prints and runs the accelerate launch command. Examples:\n"
        "  rlvr launch --zero 3 --nproc 8 -- train --config my.yaml\n"
        "  rlvr launch --zero 3 --offload --nproc 8 --nnodes 2 --node-rank 0 --main-addr 10.0.0.1 \\\n"
        "      -- train --config my.yaml\n"
        "  rlvr launch --zero 2 --nproc 2 -- quickstart          # on a CPU box: 2 processes over gloo",
        add_launch_arguments,
        lambda args, rest: 0,  # run by main(): everything after '--' is the launched command
    ),
    "upcycle": Command(
        "build an MoE checkpoint from dense ones (Branch-Train-MiX or sparse upcycling)",
        "BTX: expert i of every layer is dense model i's feed-forward layer, the rest is averaged.\n"
        "Sparse: one dense model's feed-forward layer copied into --num-experts experts.\n"
        "Families: Qwen3 -> Qwen3-MoE, Mistral/Llama -> Mixtral.\n"
        "The output loads with AutoModelForCausalLM.from_pretrained. Examples:\n"
        "  rlvr upcycle --dense ckpt/math ckpt/code --out ckpt/btx --top-k 1 --router-init mean_hidden \\\n"
        "      --router-samples math.jsonl code.jsonl\n"
        "  rlvr upcycle --method sparse --dense ckpt/base --num-experts 8 --top-k 2 --out ckpt/sparse",
        add_upcycle_arguments,
        run_upcycle,
    ),
    "validate": Command(
        "validate a config and print it fully resolved (builds no model)",
        "Example:\n  rlvr validate --config quickstart --arm bottom --max_steps 10",
        add_config_arguments,
        run_validate,
        takes_overrides=True,
    ),
    "configs": Command(
        "list the packaged configs, or copy one out to edit",
        "Examples:\n  rlvr configs\n  rlvr configs --copy quickstart --to my.yaml\n"
        "  rlvr configs --copy models/qwen3_30b_a3b",
        add_configs_arguments,
        run_configs,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlvr",
        description="Entropy-focused RL fine-tuning (forking-token GRPO) for Mixture-of-Experts models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'rlvr train --help' for every config key.",
    )
    parser.add_argument("--version", action="version", version=f"rlvr {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = (
        "Config keys (override with --key value or key=value; bare GRPOConfig fields mean grpo.<key>;\n"
        "rlvr compare's own sections, compare and upcycle, are listed by 'rlvr compare --help'):\n"
    )
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(
            name,
            help=command.help,
            description=command.description,
            allow_abbrev=False,  # "--c 1" is no --config
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=config_help + format_help(command.config_schema()) if command.takes_overrides else None,
        )
        command.add_arguments(subparser)
    return parser


def _error_label(error: ValueError) -> str | None:
    """The label of an rlvr error's one-line message (each is a ValueError); None for anything else,
    which is a bug and keeps its traceback."""
    from rlvr.data import DataError
    from rlvr.models.upcycle import UpcycleError

    labels = ((ConfigError, "config error: "), (DataError, "data error: "), (UpcycleError, ""))
    return next((label for kind, label in labels if isinstance(error, kind)), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "launch":  # everything after "--" is the command to launch
        from rlvr.cli.launch import launch

        split = argv.index("--") if "--" in argv else len(argv)
        return launch(parser.parse_args(argv[:split]), argv[split + 1 :])
    args, overrides = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if overrides and not command.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        return command.run(args, overrides)
    except ValueError as error:  # ConfigError, DataError and UpcycleError subclass it
        label = _error_label(error)
        if label is None:
            raise
        print(f"rlvr {args.command}: {label}{error}", file=sys.stderr)
        return 2


def entry_point() -> None:
    """``rlvr`` and ``python -m rlvr``: :func:`main`, then exit (see :mod:`rlvr.cli.shutdown` for ranks)."""
    exit_process(main())


if __name__ == "__main__":
    entry_point()
