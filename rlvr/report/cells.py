"""Cells and groupings shared by the report's sections: number formats, interval cells, which arm a row is
compared with, and which runs resample together. No torch, transformers or TRL."""

from __future__ import annotations

import math

from rlvr.report.intervals import Interval
from rlvr.report.runs import Run


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def baseline_of(arm: str, groups: dict[str, list[Run]]) -> str | None:
    """The arm a row is compared with: ``full`` for the plain arms; ``sparse+<arm>`` for the other starting
    policies of an upcycling compare (compute-matched sparse upcycling is the control BTX must beat)."""
    if "+" in arm:
        init, plain = arm.split("+", 1)
        baseline = f"sparse+{plain}"
        return baseline if init != "sparse" and baseline in groups else None
    return "full" if arm != "full" and "full" in groups else None


def construction_clusters(runs: list[Run]) -> list | None:
    """The construction seed of each run, where runs come from built starting policies: runs sharing one
    are resampled together (rlvr.report.intervals); None for plain compares (each run is its own draw)."""
    constructions = [run.construction for run in runs]
    return None if any(construction is None for construction in constructions) else constructions


def interval_cell(interval: Interval) -> str:
    if math.isnan(interval.low):
        return fmt(interval.estimate)
    return interval.format()
