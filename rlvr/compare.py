"""``rlvr compare``: every arm x seed on the same data, then one report.

Arms are overlays (``rlvr/configs/arms/<arm>.yaml``) on one base config, so two runs differ only in
their arm (and seed). Runs go to ``<output_dir>/<arm>-seed<seed>/``. A run counts as finished when
its ``summary.json`` exists (written last), so an interrupted compare skips finished runs and starts
unfinished ones over. Every run's config is validated before the first run starts.

With ``upcycle.inits`` (see :mod:`rlvr.upcycle_policies`), every arm also runs from each starting
policy as built with each of ``upcycle.construction_seeds``: runs go to
``<output_dir>/<init>-<arm>-c<construction seed>-seed<seed>/`` and are labelled ``<init>+<arm>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlvr.configuration import ConfigError, option, require, require_integers
from rlvr.packaged import arm_names, arm_path
from rlvr.upcycle_policies import build_policies, run_overrides

if TYPE_CHECKING:
    from rlvr.config import RunConfig

MANIFEST = "compare.json"


@dataclass
class CompareConfig:
    """The ``compare`` config section."""

    arms: list = option(
        ["full", "forking", "random", "bottom"],
        "arms to run (rlvr/configs/arms/<arm>.yaml overlays): full, forking, forking_router, hybrid, random, bottom",
    )
    seeds: list = option([0, 1, 2], "seeds; every arm runs once per seed on the same data")

    def validate(self) -> None:
        require_integers(self.seeds, "seeds")
        require(len(self.arms) > 0, "arms", "needs at least one arm")
        require(len(set(map(str, self.arms))) == len(self.arms), "arms", "lists an arm twice")


@dataclass
class PlannedRun:
    arm: str  # the label runs are grouped by: the arm, or "<init>+<arm>"
    seed: int
    directory: Path
    config: RunConfig
    construction: int | None = None  # upcycling compares: the starting policy's construction seed

    @property
    def finished(self) -> bool:
        return (self.directory / "summary.json").exists()


def plan_runs(
    config_paths: list[str], overrides: list[str], arms: list[str] | None, seeds: list[int] | None
) -> tuple[Path, list[PlannedRun]]:
    """The runs of a compare, each with its validated config; raises ConfigError naming the bad key or arm."""
    from rlvr.config import load_config  # rlvr.config composes CompareConfig: imported when first used

    base = load_config(config_paths, overrides)
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
                        starting = run_overrides(base, output_dir, init, construction)
                    config = load_config(
                        [*config_paths, arm_path(arm)],
                        [*overrides, *starting, f"output_dir={directory}", f"seed={seed}", f"arm={label}"],
                    )
                    runs.append(PlannedRun(label, seed, directory, config, construction))
    return output_dir, runs


def config_factory(config_paths: list[str], overrides: list[str]):
    """``extra overrides -> RunConfig`` on the compare's base config (used to build starting policies)."""
    from rlvr.config import load_config

    return lambda extra: load_config(config_paths, [*overrides, *extra])


def write_manifest(output_dir: Path, runs: list[PlannedRun]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "arms": list(dict.fromkeys(run.arm for run in runs)),
        "seeds": list(dict.fromkeys(run.seed for run in runs)),
        "runs": [
            {"arm": run.arm, "seed": run.seed, "construction": run.construction, "directory": run.directory.name}
            for run in runs
        ],
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))


def run_compare(output_dir: Path, runs: list[PlannedRun], train_fn, say=print, compare_config=None) -> list[PlannedRun]:
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
            build_policies(compare_config, output_dir, run.construction, say=say)
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
