"""The ``rlvr`` command line.

    rlvr quickstart                      # warm start + forking-token GRPO on the embedded tiny MoE
    rlvr train --config configs/quickstart.yaml --forking.rho 0.3 grpo.learning_rate=1e-5
    rlvr compare --config configs/compare/quickstart.yaml   # arms x seeds on the same data, then report.md
    rlvr report runs/compare             # report.md + figures from run or compare directories
    rlvr launch --zero 3 --nproc 8 -- train --config my.yaml   # DeepSpeed ZeRO through accelerate launch
    rlvr validate --config F             # check a config and print it resolved, building nothing

Every config key can be overridden as ``--section.key value`` or ``section.key=value``;
``rlvr train --help`` lists them all with their defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import yaml

from rlvr import __version__
from rlvr.config import ConfigError, format_help, load_config, to_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"
ARMS_DIR = CONFIG_DIR / "arms"


def _arm_names() -> list[str]:
    return sorted(path.stem for path in ARMS_DIR.glob("*.yaml"))


def _add_config_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--config", action="append", required=required, metavar="FILE",
        help="YAML config; repeat to overlay several files (later ones win)",
    )
    parser.add_argument(
        "--arm", choices=_arm_names(), metavar="ARM",
        help=f"overlay configs/arms/ARM.yaml, one of: {', '.join(_arm_names())}",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir (resume=true)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlvr",
        description="Entropy-focused RL fine-tuning (forking-token GRPO) for Mixture-of-Experts models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'rlvr train --help' for every config key.",
    )
    parser.add_argument("--version", action="version", version=f"rlvr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "Config keys (override with --key value or key=value):\n" + format_help()

    train = commands.add_parser(
        "train",
        help="train a policy with ForkingGRPOTrainer from a YAML config",
        description="Train with forking-token GRPO. Example:\n"
        "  rlvr train --config configs/quickstart.yaml --forking.rho 0.3 grpo.max_steps=50\n"
        "  rlvr train --config configs/quickstart.yaml --arm full      # the full-update baseline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help,
        allow_abbrev=False,  # "--c 1" must not be read as --config
    )
    _add_config_arguments(train, required=True)

    quickstart = commands.add_parser(
        "quickstart",
        help="warm-start the embedded tiny MoE, then forking-token GRPO, eval before/after",
        description="Runs configs/quickstart.yaml (overrides allowed, e.g. grpo.max_steps=20;\n"
        "--arm full runs the full-update baseline instead of forking tokens).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help,
        allow_abbrev=False,  # "--c 1" must not be read as --config
    )
    _add_config_arguments(quickstart, required=False)

    compare = commands.add_parser(
        "compare",
        help="run every arm x seed on the same data, then write report.md",
        description="The central experiment: arms are overlays (configs/arms/*.yaml) on one base config.\n"
        "Runs go to <output_dir>/<arm>-seed<seed>/; finished runs are skipped, so an interrupted compare resumes.\n"
        "With upcycle.inits, every arm also runs from each starting policy (Branch-Train-MiX, sparse upcycling, scratch).\n"
        "Examples:\n  rlvr compare --config configs/compare/quickstart.yaml --arms full,forking --seeds 0,1\n"
        "  rlvr compare --config configs/compare/upcycle.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help,
        allow_abbrev=False,
    )
    compare.add_argument("--config", action="append", required=True, metavar="FILE", help="base YAML config (repeatable)")
    compare.add_argument("--arms", help="comma-separated arms (default: compare.arms of the config)")
    compare.add_argument("--seeds", help="comma-separated integer seeds (default: compare.seeds of the config)")

    report = commands.add_parser(
        "report",
        help="write report.md and figures from run or compare directories",
        description="Example:\n  rlvr report runs/compare            # a compare directory\n"
        "  rlvr report runs/a runs/b --out runs/ab",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    report.add_argument("directories", nargs="+", metavar="RUN_DIR", help="run directories or compare directories")
    report.add_argument("--out", help="where report.md and the figures go (default: the first directory)")

    launch = commands.add_parser(
        "launch",
        help="run an rlvr command under DeepSpeed ZeRO through accelerate launch",
        description="Builds, prints and runs the accelerate launch command. Examples:\n"
        "  rlvr launch --zero 3 --nproc 8 -- train --config my.yaml\n"
        "  rlvr launch --zero 3 --offload --nproc 8 --nnodes 2 --node-rank 0 --main-addr 10.0.0.1 -- train --config my.yaml\n"
        "  rlvr launch --zero 2 --nproc 2 -- quickstart          # on a CPU box: 2 processes over gloo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    from rlvr.launch import add_arguments

    add_arguments(launch)

    upcycle = commands.add_parser(
        "upcycle",
        help="build an MoE checkpoint from dense ones (Branch-Train-MiX or sparse upcycling)",
        description="BTX: expert i of every layer is dense model i's feed-forward layer, the rest is averaged.\n"
        "Sparse: one dense model's feed-forward layer copied into --num-experts experts. Families: Qwen3 -> Qwen3-MoE,\n"
        "Mistral/Llama -> Mixtral. The output loads with AutoModelForCausalLM.from_pretrained. Examples:\n"
        "  rlvr upcycle --dense ckpt/math ckpt/code --out ckpt/btx --top-k 1 --router-init mean_hidden \\\n"
        "      --router-samples math.jsonl code.jsonl\n"
        "  rlvr upcycle --method sparse --dense ckpt/base --num-experts 8 --top-k 2 --out ckpt/sparse",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    from rlvr.upcycle import METHODS, ROUTER_INITS

    upcycle.add_argument("--dense", nargs="+", required=True, metavar="DIR", help="dense checkpoints (btx: one per expert)")
    upcycle.add_argument("--out", required=True, metavar="DIR", help="where the MoE checkpoint goes (must be new or empty)")
    upcycle.add_argument("--method", choices=METHODS, default="btx", help="btx (default) or sparse")
    upcycle.add_argument("--num-experts", type=int, help="experts per layer (sparse; btx: number of dense models)")
    upcycle.add_argument("--top-k", type=int, default=1, help="experts per token (default 1)")
    upcycle.add_argument("--router-init", choices=ROUTER_INITS, default="random",
                         help="random (default), zero (uniform routing), mean_hidden (btx: each domain's mean hidden state)")
    upcycle.add_argument("--router-samples", nargs="+", metavar="FILE",
                         help="mean_hidden: one text file per dense model, one sample per line (.jsonl: its 'text' field)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the MoE's random init (default 0)")
    upcycle.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    check = commands.add_parser(
        "validate",
        help="validate a config and print it fully resolved (builds no model)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_help,
        allow_abbrev=False,  # "--c 1" must not be read as --config
    )
    _add_config_arguments(check, required=True)
    return parser


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


def _run_training(config) -> int:
    from rlvr.recipe import is_main_process, summary_table, train

    _quiet_libraries()
    result = train(config)
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


def _run_compare(args, overrides) -> int:
    from rlvr.compare import plan_runs, run_compare
    from rlvr.recipe import train
    from rlvr.report import write_report

    try:
        seeds = None if args.seeds is None else [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        print(f"rlvr compare: config error: --seeds: expected comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    arms = None if args.arms is None else [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    try:
        output_dir, runs = plan_runs(args.config, overrides, arms, seeds)
    except ConfigError as error:
        print(f"rlvr compare: config error: {error}", file=sys.stderr)
        return 2
    _quiet_libraries()
    if runs and runs[0].config.upcycle.inits:
        from rlvr.compare import config_factory
        from rlvr.upcycle_policies import build_policies

        build_policies(config_factory(args.config, overrides), output_dir)
    run_compare(output_dir, runs, train)
    report = write_report([output_dir])
    text = report.read_text()
    summary = text.split("## Summary", 1)[-1].split("\n## ", 1)[0]
    print("\n" + "=" * 72 + "\nrlvr compare: summary" + summary.rstrip())
    print(f"\nreport: {report} (figures next to it)")
    return 0


def _run_report(args) -> int:
    from rlvr.report import write_report

    directories = [Path(d) for d in args.directories]
    for directory in directories:
        if not directory.is_dir():
            print(f"rlvr report: {directory} is not a directory", file=sys.stderr)
            return 2
    report = write_report(directories, Path(args.out) if args.out else None)
    print(f"report: {report}")
    return 0


def _read_samples(path: str) -> list[str]:
    """Router samples: one per line; in a .jsonl file, the ``text`` field of each record."""
    from rlvr.upcycle import UpcycleError

    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UpcycleError(f"{path}: line {number} is not a JSON object with a 'text' field") from None
    return texts


def _run_upcycle(args) -> int:
    from rlvr.upcycle import UpcycleError, upcycle

    try:
        samples = [_read_samples(path) for path in args.router_samples] if args.router_samples else None
        out = upcycle(args.dense, args.out, method=args.method, num_experts=args.num_experts, top_k=args.top_k,
                      router_init=args.router_init, router_samples=samples, seed=args.seed, overwrite=args.overwrite)
    except (UpcycleError, OSError) as error:
        print(f"rlvr upcycle: {error}", file=sys.stderr)
        return 2
    print(f"rlvr upcycle: {args.method} MoE written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "launch":  # everything after "--" is the command to launch
        split = argv.index("--") if "--" in argv else len(argv)
        from rlvr.launch import launch

        args = _parser().parse_args(argv[:split])
        return launch(args, argv[split + 1 :])
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    if args.command == "report":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return _run_report(args)
    if args.command == "upcycle":
        if overrides:
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        return _run_upcycle(args)
    from rlvr.data import DataError

    if args.command == "compare":
        try:
            return _run_compare(args, overrides)
        except DataError as error:
            print(f"rlvr compare: data error: {error}", file=sys.stderr)
            return 2
    paths = list(args.config or [])
    if args.command == "quickstart":
        paths.insert(0, str(QUICKSTART_CONFIG))
    if args.arm:
        paths.append(str(ARMS_DIR / f"{args.arm}.yaml"))
        overrides = [f"arm={args.arm}", *overrides]
    if getattr(args, "resume", False):
        overrides = [*overrides, "resume=true"]
    try:
        if args.command == "quickstart" and not QUICKSTART_CONFIG.is_file():
            raise ConfigError(
                f"quickstart config not found at {QUICKSTART_CONFIG}; install from a source checkout (pip install -e .)"
            )
        config = load_config(paths, overrides)
    except ConfigError as error:
        print(f"rlvr {args.command}: config error: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        print("config OK", file=sys.stderr)
        return 0

    try:
        return _run_training(config)
    except DataError as error:
        print(f"rlvr {args.command}: data error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:  # found once the run directory is read (e.g. --resume of a finished run)
        print(f"rlvr {args.command}: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
