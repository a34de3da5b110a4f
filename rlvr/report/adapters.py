"""The report's section on adapters (``peft``): what each arm trained (method, trainable parameters, the
optimizer's state) beside its accuracy, and how far routing on forking and on other tokens moved during
training. No torch, transformers or TRL."""

from __future__ import annotations

import math

from rlvr.report.cells import fmt
from rlvr.report.runs import Run, mean_std

ROUTER_ENTROPY = ("moe/router_entropy_forking", "moe/router_entropy_other")


def _method(run: Run) -> str:
    return ((run.summary or {}).get("peft") or {}).get("method", "none")


def total_variation(a: list[float], b: list[float]) -> float:
    """Half the L1 distance between two distributions over experts."""
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b, strict=True))


def routing_shift(run: Run, tokens: str) -> float:
    """How far the experts chosen for ``tokens`` (``forking`` or ``other``) moved during training: the total
    variation distance between the expert loads of the first and the last logging window, mean over layers
    (NaN without two windows)."""
    windows = [record["expert_load"][tokens] for record in run.routing if tokens in record.get("expert_load", {})]
    if len(windows) < 2:
        return math.nan
    first, last = windows[0], windows[-1]
    return sum(total_variation(a, b) for a, b in zip(first, last, strict=True)) / len(first)


def _late_mean(run: Run, key: str, share: float = 0.2) -> float:
    """The mean of a logged metric over the last ``share`` of the run's logging steps."""
    values = run.series(key)[1]
    tail = values[-max(1, round(len(values) * share)) :] if values else []
    return sum(tail) / len(tail) if tail else math.nan


def _mean(values: list[float]) -> float:
    """The mean over runs of the values a run has (NaN where none has one)."""
    return mean_std([value for value in values if not math.isnan(value)])[0]


def adapter_rows(groups: dict[str, list[Run]]) -> list[dict]:
    rows = []
    for arm, runs in groups.items():
        finished = [run for run in runs if run.summary]
        if not finished:
            continue
        summaries = [run.summary for run in finished]
        rows.append(
            {
                "arm": arm,
                "method": _method(finished[0]),
                "runs": len(finished),
                "greedy": _mean([summary["eval_after"]["greedy_accuracy"] for summary in summaries]),
                "trainable": _mean([float(s.get("trainable_parameters", math.nan)) for s in summaries]),
                "optimizer_bytes": _mean([float(s.get("optimizer_state_bytes", math.nan)) for s in summaries]),
                "shift_forking": _mean([routing_shift(run, "forking") for run in finished]),
                "shift_other": _mean([routing_shift(run, "other") for run in finished]),
                "entropy_forking": _mean([_late_mean(run, ROUTER_ENTROPY[0]) for run in finished]),
                "entropy_other": _mean([_late_mean(run, ROUTER_ENTROPY[1]) for run in finished]),
            }
        )
    return rows


def adapter_lines(groups: dict[str, list[Run]]) -> list[str]:
    """Markdown for compares with an adapter arm (``peft.method`` other than none); empty otherwise."""
    if not any(_method(run) != "none" for runs in groups.values() for run in runs if run.summary):
        return []
    lines = [
        "",
        "## Adapters: what each arm trained, and where routing moved",
        "",
        "Trainable parameters: what the optimizer updated (adapters and routers, or every weight); optimizer "
        "state: the bytes of its state after training (AdamW: two moments per trainable parameter), on the main "
        "process. Routing shift: total variation distance between the experts chosen in the first and in the "
        "last logging window, mean over layers, on the tokens each arm selected for the policy gradient (forking "
        "arms: the forking tokens; full: every token) and on the others (0: the same experts, 1: "
        "disjoint ones); part of it is sampling noise (different completions in two windows), so compare arms "
        "with each other rather than with 0. Router entropy: over the last fifth of the logging steps. Means "
        "over runs.",
        "",
        "| arm | method | runs | greedy | trainable parameters | optimizer state (MiB) | routing shift, selected "
        "| routing shift, other | router entropy, selected | router entropy, other |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in adapter_rows(groups):
        megabytes = row["optimizer_bytes"] / 2**20
        lines.append(
            f"| {row['arm']} | {row['method']} | {row['runs']} | {fmt(row['greedy'])} | "
            f"{fmt(row['trainable'], digits=0)} | {fmt(megabytes, digits=2)} | {fmt(row['shift_forking'])} | "
            f"{fmt(row['shift_other'])} | {fmt(row['entropy_forking'])} | {fmt(row['entropy_other'])} |"
        )
    return lines
