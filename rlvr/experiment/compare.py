"""``rlvr compare``: every arm x seed on the same data, then one report.

Arms are overlays (``rlvr/configs/arms/<arm>.yaml``) on one base config, so two runs differ only in
their arm (and seed). Runs go to ``<output_dir>/<arm>-seed<seed>/``. A run counts as finished when
its ``summary.json`` exists (written last), so an interrupted compare skips finished runs and starts
unfinished ones over. Every run's config is validated before the first run starts.

With ``upcycle.inits`` (see :mod:`rlvr.experiment.starting_policies`), every arm also runs from each starting
policy as built with each of ``upcycle.construction_seeds``: runs go to
``<output_dir>/<init>-<arm>-c<construction seed>-seed<seed>/`` and are labelled ``<init>+<arm>``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlvr.experiment.starting_policies import UpcycleConfig, build_policies, run_overrides
from rlvr.report.runs import MANIFEST
from rlvr.run.config import RunConfig, load_config
from rlvr.utils.options import ConfigError, option, require, require_integers
from rlvr.utils.packaged import arm_names, arm_path


@dataclass
class CompareConfig:
    """The ``compare`` config section."""

    arms: list = option(
        ["full", "forking", "random", "bottom"],
        "arms to run (rlvr/configs/arms/<arm>.yaml overlays): full, forking, forking_router, hybrid, random, bottom; "
        "tree, tree_treerl, full_g6 (rollouts); engine_exact, tis, mis, replay, replay_mis (mismatch)",
    )
    seeds: list = option([0, 1, 2], "seeds; every arm runs once per seed on the same data")
    contrasts: list = option(
        [],
        "more paired comparisons for the report, as 'arm:baseline' (e.g. tree:full_g6); every arm is compared "
        "with full anyway",
    )

    def validate(self) -> None:
        require_integers(self.seeds, "seeds")
        require(len(self.arms) > 0, "arms", "needs at least one arm")
        require(len(set(map(str, self.arms))) == len(self.arms), "arms", "lists an arm twice")
        for index, contrast in enumerate(self.contrasts):
            names = str(contrast).split(":")
            require(
                len(names) == 2 and all(names) and names[0] != names[1],
                f"contrasts[{index}]",
                f"must be 'arm:baseline' with two different arms; got {contrast!r}",
            )
            for name in names:
                require(
                    name in arm_names(), f"contrasts[{index}]", f"unknown arm {name!r}; one of {', '.join(arm_names())}"
                )

    def contrast_pairs(self, arms: list[str]) -> list[tuple[str, str]]:
        """The contrasts whose two arms both run (a compare restricted with --arms drops the others)."""
        pairs = [tuple(str(contrast).split(":")) for contrast in self.contrasts]
        return [(arm, baseline) for arm, baseline in pairs if arm in arms and baseline in arms]


@dataclass
class ExperimentConfig(RunConfig):
    """The config ``rlvr compare`` reads: the run config of every run, and the experiment's own sections.

    Each planned run keeps this config (its ``compare``/``upcycle`` values go to the run's ``config.yaml``,
    where the report reads the construction seed); the recipe reads only the :class:`RunConfig` part.
    """

    compare: CompareConfig = option(CompareConfig, "rlvr compare: which arms and seeds")
    upcycle: UpcycleConfig = option(
        UpcycleConfig, "rlvr compare with starting policies built by upcycling (Branch-Train-MiX)"
    )

    def validate(self) -> None:
        super().validate()
        if not self.upcycle.inits:
            return
        require(self.data.embedded, "upcycle.inits", "needs the embedded task (its domains)")
        if "btx" in self.upcycle.inits:
            domains = len(self.data.task.domains)
            require(domains >= 2, "data.task.domains", "btx needs at least two domains (one dense expert each)")
            require(
                self.upcycle.num_experts == domains,
                "upcycle.num_experts",
                f"btx makes one expert per domain: must be {domains}",
            )


def load_experiment_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """An experiment config from YAML files and overrides, validated (see :func:`rlvr.run.config.load_config`)."""
    return load_config(paths, overrides, ExperimentConfig)


@dataclass
class PlannedRun:
    arm: str  # the label runs are grouped by: the arm, or "<init>+<arm>"
    seed: int
    directory: Path
    config: ExperimentConfig
    construction: int | None = None  # upcycling compares: the starting policy's construction seed

    @property
    def finished(self) -> bool:
        return (self.directory / "summary.json").exists()


def plan_runs(
    config_paths: list[str], overrides: list[str], arms: list[str] | None, seeds: list[int] | None
) -> tuple[Path, list[PlannedRun]]:
    """The runs of a compare, each with its validated config; raises ConfigError naming the bad key or arm."""
    base = load_experiment_config(config_paths, overrides)
    arms = [str(arm) for arm in (arms or base.compare.arms)]
    seeds = [int(seed) for seed in (seeds if seeds is not None else base.compare.seeds)]
    for arm in arms:
        if arm not in arm_names():
            raise ConfigError(f"compare.arms: unknown arm {arm!r}; one of {', '.join(arm_names())}")
    output_dir = Path(base.output_dir)
    inits = list(base.upcycle.inits)
    constructions = list(base.upcycle.construction_seeds) if inits else [None]
    runs = []
    for construction in constructions:
        for seed in seeds:
            for init in inits or [None]:
                for arm in arms:
                    if init is None:
                        label, directory, starting = arm, output_dir / f"{arm}-seed{seed}", []
                    else:
                        label = f"{init}+{arm}"
                        directory = output_dir / f"{init}-{arm}-c{construction}-seed{seed}"
                        starting = run_overrides(base.upcycle, output_dir, init, construction)
                    config = load_experiment_config(
                        [*config_paths, arm_path(arm)],
                        [*overrides, *starting, f"output_dir={directory}", f"seed={seed}", f"arm={label}"],
                    )
                    runs.append(PlannedRun(label, seed, directory, config, construction))
    return output_dir, runs


def config_factory(config_paths: list[str], overrides: list[str]) -> Callable[[list[str]], ExperimentConfig]:
    """``extra overrides -> ExperimentConfig`` on the compare's base config (used to build starting policies)."""
    return lambda extra: load_experiment_config(config_paths, [*overrides, *extra])


def write_manifest(output_dir: Path, runs: list[PlannedRun]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    arms = list(dict.fromkeys(run.arm for run in runs))
    manifest = {
        "arms": arms,
        "contrasts": [list(pair) for pair in runs[0].config.compare.contrast_pairs(arms)] if runs else [],
        "seeds": list(dict.fromkeys(run.seed for run in runs)),
        "runs": [
            {"arm": run.arm, "seed": run.seed, "construction": run.construction, "directory": run.directory.name}
            for run in runs
        ],
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def run_compare(
    output_dir: Path,
    runs: list[PlannedRun],
    train_fn: Callable[[RunConfig], object],
    say=print,
    compare_config: Callable[[list[str]], ExperimentConfig] | None = None,
) -> list[PlannedRun]:
    """Train every unfinished run in order; returns the runs trained now. ``compare_config`` (upcycling
    compares): ``extra overrides -> RunConfig``, to build each construction seed's starting policies just
    before its first run."""
    write_manifest(output_dir, runs)
    trained, durations, built = [], [], set()
    for number, run in enumerate(runs, start=1):
        seeds = f"seed={run.seed}" if run.construction is None else f"construction={run.construction} seed={run.seed}"
        label = f"run {number}/{len(runs)}: arm={run.arm} {seeds}"
        if run.finished:
            say(f"[compare] {label}: finished earlier, skipped ({run.directory})")
            continue
        if run.construction is not None and compare_config is not None and run.construction not in built:
            build_policies(compare_config, run.config.upcycle, output_dir, run.construction, say=say)
            built.add(run.construction)
        remaining = sum(1 for later in runs[number - 1 :] if not later.finished)
        eta = (
            f", ETA {sum(durations) / len(durations) * remaining / 60:.0f} min for {remaining} runs"
            if durations
            else ""
        )
        say(f"[compare] {label} -> {run.directory}{eta}")
        start = time.time()
        train_fn(run.config)
        durations.append(time.time() - start)
        trained.append(run)
    return trained
