"""What each ``rlvr`` command does: its own arguments and its run, one pair per command (the table that
maps names to them is :data:`rlvr.cli.main.COMMANDS`). Heavy imports happen inside the runs, so ``rlvr --help``
stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import yaml

from rlvr.cli.shutdown import end_distributed
from rlvr.run.config import ConfigError, RunConfig, to_dict
from rlvr.utils.packaged import CONFIG_ROOT, QUICKSTART, arm_names, arm_path, copy_config, list_configs, resolve_config


def quiet_libraries() -> None:
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


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
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
    from rlvr.experiment.compare import load_experiment_config

    config = load_experiment_config(paths, overrides)
    if config.upcycle.inits:
        raise ConfigError(
            f"upcycle.inits: starting policies are built by 'rlvr compare'; rlvr {command} trains "
            "model.name_or_path (set upcycle.inits=[] to train it, or run the file with rlvr compare)"
        )
    return config


def run_train(args: argparse.Namespace, overrides: list[str]) -> int:
    config = _run_config(args, overrides)
    from rlvr.run.recipe import is_main_process, summary_table, train

    quiet_libraries()
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
    from rlvr.experiment.compare import config_factory, plan_runs
    from rlvr.experiment.compare import run_compare as run_all
    from rlvr.report.runs import CompareRecords
    from rlvr.report.summary import summary_lines, write_report
    from rlvr.run.recipe import train

    try:
        seeds = None if args.seeds is None else [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    arms = None if args.arms is None else [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    paths = [str(resolve_config(value, "compare")) for value in args.config]
    output_dir, runs = plan_runs(paths, overrides, arms, seeds)
    quiet_libraries()
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
    from rlvr.report.summary import write_report

    directories = [Path(d) for d in args.directories]
    for directory in directories:
        if not directory.is_dir():
            raise ConfigError(f"{directory} is not a directory")
    print(f"report: {write_report(directories, Path(args.out) if args.out else None)}")
    return 0


# ---------------------------------------------------------------- upcycle, launch, configs


def add_upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    from rlvr.models.upcycle import METHODS, ROUTER_INITS

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
    from rlvr.models.upcycle import UpcycleError

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
    from rlvr.models.upcycle import upcycle

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
    from rlvr.cli.launch import add_arguments

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
