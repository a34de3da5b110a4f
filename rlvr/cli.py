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
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlvr import __version__
from rlvr.config import ConfigError, RunConfig, format_help, to_dict
from rlvr.packaged import CONFIG_ROOT, QUICKSTART, arm_names, arm_path, copy_config, list_configs, resolve_config
from rlvr.shutdown import end_distributed, exit_process

CONFIG_DIR = CONFIG_ROOT  # the packaged configs (rlvr/configs/)


def _quiet_libraries() -> None:
    """Keep the console to rlvr's progress bars and TRL's training log."""
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.basicConfig(level=logging.INFO, format="[rlvr] %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices
    for noisy in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


# ---------------------------------------------------------------- train, quickstart, validate


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=required,
        metavar="FILE",
        help="YAML config: a path or a packaged name (rlvr configs lists them); repeat to overlay (later wins)",
    )
    parser.add_argument(
        "--arm",
        choices=arm_names(),
        metavar="ARM",
        help=f"overlay the packaged arm ARM, one of: {', '.join(arm_names())}",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir (resume=true)"
    )


def _run_config(args: argparse.Namespace, overrides: list[str]):
    """The validated config of ``train``/``quickstart``/``validate``: files, arm overlay, overrides."""
    paths = [resolve_config(value, args.command) for value in args.config or []]
    if args.command == "quickstart":
        paths.insert(0, QUICKSTART)
    if args.arm:
        paths.append(arm_path(args.arm))
        overrides = [f"arm={args.arm}", *overrides]
    if args.resume:
        overrides = [*overrides, "resume=true"]
    return _single_run_config(paths, overrides, args.command)


def _single_run_config(paths: list, overrides: list[str], command: str) -> RunConfig:
    """The config of one run. A file may also hold ``rlvr compare``'s sections (``compare``, ``upcycle``: the
    packaged compare and model configs do), read with the experiment's config and not used by one run;
    starting policies built by upcycling exist only inside a compare, so ``upcycle.inits`` is refused."""
    from rlvr.compare import load_experiment_config

    config = load_experiment_config(paths, overrides)
    if config.upcycle.inits:
        raise ConfigError(
            f"upcycle.inits: starting policies are built by 'rlvr compare'; rlvr {command} trains "
            "model.name_or_path (set upcycle.inits=[] to train it, or run the file with rlvr compare)"
        )
    return config


def run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    config = _run_config(args, overrides)
    from rlvr.recipe import is_main_process, summary_table, train

    _quiet_libraries()
    try:
        result = train(config)
    finally:
        end_distributed()
    if not is_main_process():  # one summary per launch
        return 0
    print("\n" + "=" * 72)
    print(f"rlvr: finished {config.model.name_or_path} in {config.output_dir}")
    if result.warm_start is not None:
        source = "cached" if result.warm_start.cached else f"{result.warm_start.seconds:.0f} s"
        print(
            f"warm start: {result.warm_start.steps} SFT steps, dev accuracy {result.warm_start.dev_accuracy:.3f} "
            f"({source}: {result.warm_start.path})"
        )
    print(summary_table(result))
    forking_log = Path(config.output_dir) / "forking_tokens.jsonl"
    if forking_log.exists():
        last = json.loads(forking_log.read_text().splitlines()[-1])
        if last["examples"]:
            print(f"forking tokens (marked « ») at step {last['step']}: {last['examples'][0]!r}")
    print(f"metrics: {Path(config.output_dir) / 'metrics.jsonl'}   summary: {Path(config.output_dir) / 'summary.json'}")
    return 0


def run_validate(args: argparse.Namespace, overrides: list[str]) -> int:
    config = _run_config(args, overrides)
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    print("config OK", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- compare, report


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="base YAML config: a path or a packaged name (quickstart = compare/quickstart); repeatable",
    )
    parser.add_argument("--arms", help="comma-separated arms (default: compare.arms of the config)")
    parser.add_argument("--seeds", help="comma-separated integer seeds (default: compare.seeds of the config)")


def run_compare(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlvr.compare import config_factory, plan_runs
    from rlvr.compare import run_compare as run_all
    from rlvr.recipe import train
    from rlvr.report import summary_lines, write_report
    from rlvr.runs import CompareRecords

    try:
        seeds = None if args.seeds is None else [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    arms = None if args.arms is None else [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    paths = [str(resolve_config(value, "compare")) for value in args.config]
    output_dir, runs = plan_runs(paths, overrides, arms, seeds)
    _quiet_libraries()
    try:
        run_all(output_dir, runs, train, compare_config=config_factory(paths, overrides))
    finally:
        end_distributed()
    records = CompareRecords.load([output_dir])  # every run's files, read once for the report and the summary
    report = write_report([output_dir], records=records)
    print(
        "\n"
        + "=" * 72
        + "\nrlvr compare: summary\n\n"
        + "\n".join(summary_lines(records.groups, records.contrasts)).rstrip()
    )
    print(f"\nreport: {report} (figures next to it)")
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directories", nargs="+", metavar="RUN_DIR", help="run directories or compare directories")
    parser.add_argument("--out", help="where report.md and the figures go (default: the first directory)")


def run_report(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlvr.report import write_report

    directories = [Path(d) for d in args.directories]
    for directory in directories:
        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory")
    print(f"report: {write_report(directories, Path(args.out) if args.out else None)}")
    return 0


# ---------------------------------------------------------------- upcycle, launch, configs


def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    from rlvr.upcycle import METHODS, ROUTER_INITS

    parser.add_argument(
        "--dense", nargs="+", required=True, metavar="DIR", help="dense checkpoints (btx: one per expert)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="where the MoE checkpoint goes (must be new or empty)"
    )
    parser.add_argument("--method", choices=METHODS, default="btx", help="btx (default) or sparse")
    parser.add_argument("--num-experts", type=int, help="experts per layer (sparse; btx: number of dense models)")
    parser.add_argument("--top-k", type=int, default=1, help="experts per token (default 1)")
    parser.add_argument(
        "--router-init",
        choices=ROUTER_INITS,
        default="random",
        help="random (default), zero (uniform routing), mean_hidden (btx: each domain's mean hidden state)",
    )
    parser.add_argument(
        "--router-samples",
        nargs="+",
        metavar="FILE",
        help="mean_hidden: one text file per dense model, one sample per line (.jsonl: its 'text' field)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the MoE's random init (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _read_samples(path: str) -> list[str]:
    """Router samples: one per line; in a .jsonl file, the ``text`` field of each record."""
    from rlvr.upcycle import UpcycleError

    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise UpcycleError(f"{path}: {error.strerror or error}") from None
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UpcycleError(f"{path}: line {number} is not a JSON object with a 'text' field") from None
    return texts


def run_upcycle(args: argparse.Namespace, overrides: list[str]) -> int:
    from rlvr.upcycle import upcycle

    samples = [_read_samples(path) for path in args.router_samples] if args.router_samples else None
    out = upcycle(
        args.dense,
        args.out,
        method=args.method,
        num_experts=args.num_experts,
        top_k=args.top_k,
        router_init=args.router_init,
        router_samples=samples,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(f"rlvr upcycle: {args.method} MoE written to {out}")
    return 0


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    from rlvr.launch import add_arguments

    add_arguments(parser)


def add_configs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--copy", metavar="NAME", help="copy the packaged config NAME out to edit it")
    parser.add_argument(
        "--to", default=".", metavar="PATH", help="destination file or directory of --copy (default: .)"
    )


def run_configs(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.copy:
        print(f"rlvr configs: copied {args.copy} to {copy_config(args.copy, args.to)}")
        return 0
    listing = list_configs()
    width = max(len(name) for name, _ in listing)
    print(f"Packaged configs ({CONFIG_ROOT}); use a name as --config NAME, or copy one with --copy NAME:")
    for name, summary in listing:
        print(f"  {name.ljust(width)}  {summary}")
    return 0


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
    from rlvr.compare import ExperimentConfig

    return ExperimentConfig


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train a policy with ForkingGRPOTrainer from a YAML config",
        "Train with forking-token GRPO. Examples:\n"
        "  rlvr train --config quickstart --forking.rho 0.3 --max_steps 50\n"
        "  rlvr train --config my.yaml --arm full            # the full-update baseline",
        _add_config_arguments,
        run_train,
        takes_overrides=True,
    ),
    "quickstart": Command(
        "warm-start the embedded tiny MoE, then forking-token GRPO, eval before/after",
        "Runs the packaged quickstart config (overrides allowed, e.g. grpo.max_steps=20;\n"
        "--arm full runs the full-update baseline instead of forking tokens).",
        lambda parser: _add_config_arguments(parser, required=False),
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
        _add_config_arguments,
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
    from rlvr.upcycle import UpcycleError

    labels = ((ConfigError, "config error: "), (DataError, "data error: "), (UpcycleError, ""))
    return next((label for kind, label in labels if isinstance(error, kind)), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "launch":  # everything after "--" is the command to launch
        from rlvr.launch import launch

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
    """``rlvr`` and ``python -m rlvr``: :func:`main`, then exit (see :mod:`rlvr.shutdown` for ranks)."""
    exit_process(main())


if __name__ == "__main__":
    entry_point()
