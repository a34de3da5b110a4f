"""The runs a report reads: each run directory's files, loaded once, grouped by arm.

Reads what runs write (``summary.json``, ``metrics.jsonl``, ``forking_tokens.jsonl``, ``routing.jsonl``,
``domain_routing.json``, ``config.yaml``) and what a compare writes beside them (``compare.json``, the
starting policies' ``policies/seed<C>/policies.json``). A run killed mid-write leaves a partial last line,
which is skipped.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DECODED_TOTAL = "rollout/decoded_tokens_total"  # the logged running total of decoded training tokens
GENERATION_SECONDS_TOTAL = "rollout/generation_seconds_total"  # ... and of seconds spent generating them
MANIFEST = "compare.json"  # a compare's directory: its arms, seeds and run directories (written by rlvr compare)


@dataclass
class Run:
    directory: Path
    arm: str
    seed: int
    summary: dict | None
    metrics: list[dict] = field(default_factory=list)
    forking: list[dict] = field(default_factory=list)
    routing: list[dict] = field(default_factory=list)
    domain_routing: dict | None = None  # {"before": ..., "after": ...} of rlvr.moe.domains.routing_by_domain
    construction: int | None = None  # upcycling compares: the seed the starting policy was built with
    config: dict = field(default_factory=dict)  # the run's config.yaml
    prompts: list[dict] = field(default_factory=list)  # prompts.jsonl: what prompts.filter did to each prompt

    @property
    def replicate(self) -> tuple[int, int]:
        """What pairs runs of two arms: (construction seed, RL seed)."""
        return (-1 if self.construction is None else self.construction, self.seed)

    @property
    def replicate_label(self) -> str:
        return str(self.seed) if self.construction is None else f"c{self.construction}/s{self.seed}"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a logged metric, in step order (last value wins per step)."""
        points = {}
        for record in self.metrics:
            value = record.get(key)
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                points[record["step"]] = float(value)
        steps = sorted(points)
        return steps, [points[step] for step in steps]

    def decoded_tokens_at(self, step: int) -> float:
        """Completion tokens decoded for training up to ``step`` (see :meth:`total_at`)."""
        return self.total_at(DECODED_TOTAL, step)

    def total_at(self, key: str, step: int) -> float:
        """A logged running total (``rollout/*_total``) up to ``step``: its value logged at or before it; 0 at
        step 0; NaN for runs that did not log it."""
        if step <= 0:
            return 0.0
        steps, totals = self.series(key)
        if not steps:
            return math.nan
        before = [total for logged, total in zip(steps, totals, strict=True) if logged <= step]
        return before[-1] if before else 0.0


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return records


def load_run(directory: Path) -> Run:
    config = yaml.safe_load((directory / "config.yaml").read_text()) if (directory / "config.yaml").exists() else {}
    summary_path = directory / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return Run(
        directory=directory,
        arm=str(config.get("arm") or directory.name.split("-seed")[0]),
        seed=int(config.get("seed", 0)),
        construction=(config.get("upcycle") or {}).get("construction_seed"),
        summary=summary,
        config=config,
        metrics=_read_jsonl(directory / "metrics.jsonl"),
        forking=_read_jsonl(directory / "forking_tokens.jsonl"),
        routing=_read_jsonl(directory / "routing.jsonl"),
        prompts=_read_jsonl(directory / "prompts.jsonl"),
        domain_routing=json.loads((directory / "domain_routing.json").read_text())
        if (directory / "domain_routing.json").exists()
        else None,
    )


def find_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Runs under ``paths`` (run directories or compare directories), and the planned runs that are missing."""
    runs, missing = [], []
    for path in paths:
        if (path / "config.yaml").exists():
            runs.append(load_run(path))
            continue
        manifest = path / MANIFEST
        planned = json.loads(manifest.read_text())["runs"] if manifest.exists() else []
        for entry in planned:
            directory = path / entry["directory"]
            if (directory / "summary.json").exists():
                runs.append(load_run(directory))
            else:
                built = "" if entry.get("construction") is None else f" construction {entry['construction']}"
                missing.append(f"{entry['arm']}{built} seed {entry['seed']} ({directory})")
        if not planned:
            runs += [load_run(child) for child in sorted(path.iterdir()) if (child / "summary.json").exists()]
    return runs, missing


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by arm, the full arm first."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r.arm != "full", r.arm, r.replicate)):
        groups[run.arm].append(run)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_curve(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every run, mean and std over runs."""
    series = [dict(zip(*run.series(key), strict=True)) for run in runs]
    series = [s for s in series if s]
    if not series:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    means, stds = [], []
    for step in steps:
        mean, std = mean_std([s[step] for s in series])
        means.append(mean)
        stds.append(std)
    return steps, means, stds


def cost_curve(runs: list[Run], key: str, total: str = DECODED_TOTAL) -> tuple[list[float], list[float], list[float]]:
    """A metric against what training spent: at each step of :func:`mean_curve`, the mean over runs of the
    running ``total`` by then (decoded tokens, generation seconds), and the metric's mean and std. Empty when a
    run did not log the total."""
    steps, means, stds = mean_curve(runs, key)
    tokens = [mean_std([run.total_at(total, step) for run in runs]) for step in steps]
    if any(math.isnan(mean) for mean, _ in tokens):
        return [], [], []
    return [mean for mean, _ in tokens], means, stds


@dataclass
class CompareRecords:
    """Everything a report renders, loaded before any rendering."""

    runs: list[Run]
    missing: list[str]  # planned runs without a summary
    groups: dict[str, list[Run]]  # by arm, the full arm first
    starting_policies: list[tuple[str, dict]]  # (construction seed, its policies.json) of every compare directory
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # (arm, baseline) pairs the compare asked for

    @classmethod
    def load(cls, paths: list[Path]) -> CompareRecords:
        runs, missing = find_runs(paths)
        starting, contrasts = [], []
        for path in paths:
            if (path / MANIFEST).exists():
                manifest = json.loads((path / MANIFEST).read_text())
                contrasts += [tuple(pair) for pair in manifest.get("contrasts", []) if tuple(pair) not in contrasts]
                for record in sorted((path / "policies").glob("seed*/policies.json")):
                    starting.append((record.parent.name.removeprefix("seed"), json.loads(record.read_text())))
        return cls(runs, missing, group_runs(runs), starting, contrasts)
