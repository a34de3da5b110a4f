"""The report's section on selective rollouts (``prompts.filter``): where each arm's generation went (prompts
sampled, skipped before sampling, dropped after), what it cost against ``full`` and ``dynamic`` (decoded tokens,
generation seconds, both to reach ``full``'s final accuracy), the zero-variance share of the sampled groups
per epoch, and which prompts a skipping arm skipped: its skip rate against their pass rate (``prompts.jsonl``).
No torch, transformers or TRL."""

from __future__ import annotations

import math
from pathlib import Path

from rlvr.report.cells import fmt
from rlvr.report.figures import _pyplot, _save_figure
from rlvr.report.runs import DECODED_TOTAL, GENERATION_SECONDS_TOTAL, Run, mean_curve, mean_std

ZERO_VARIANCE = "frac_reward_zero_std"  # TRL's share of sampled groups whose rewards all agree (every call)
ALL_RIGHT = "rollout/all_right_groups"  # the share of sampled groups whose completions were all right


def _per_run_mean(runs: list[Run], key: str) -> float:
    """Mean over runs of a metric's mean over the run's logging steps (NaN where no run logged it)."""
    return mean_std([sum(values) / len(values) for values in (run.series(key)[1] for run in runs) if values])[0]


def steps_per_epoch(run: Run) -> float:
    """Optimizer steps in which ``full`` trains on as many prompts as the training set holds (NaN when the run's
    config does not say): num_train / (per_device_train_batch_size x ranks x accumulation / num_generations)."""
    grpo, data = run.config.get("grpo") or {}, run.config.get("data") or {}
    ranks = (run.summary or {}).get("world_size") or 1
    try:
        rows = grpo["per_device_train_batch_size"] * ranks * grpo.get("gradient_accumulation_steps", 1)
        return data["num_train"] / (rows / grpo["num_generations"])
    except (KeyError, TypeError, ZeroDivisionError):
        return math.nan


def reach(runs: list[Run], target: float) -> tuple[int | None, float, float]:
    """The first eval step at which the mean greedy accuracy of ``runs`` is at least ``target``, and the mean
    decoded tokens and generation seconds spent by then (NaN when never reached)."""
    steps, means, _ = mean_curve(runs, "eval/greedy_accuracy")
    step = next((step for step, mean in zip(steps, means, strict=True) if mean >= target), None)
    if step is None or step == 0:  # never, or already before RL (nothing was spent to reach it)
        return step, math.nan, math.nan
    spent = [
        mean_std([run.total_at(total, step) for run in runs])[0] for total in (DECODED_TOTAL, GENERATION_SECONDS_TOTAL)
    ]
    return step, spent[0], spent[1]


def _ratio(value: float, reference: float) -> str:
    return "" if math.isnan(value) or not reference or math.isnan(reference) else f" ({value / reference:.2f}x)"


def cost_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """Per arm: prompts per step, decoded tokens and generation seconds (run totals and to reach ``full``'s final
    mean greedy accuracy, the point estimate), each also as a ratio to ``full`` and ``dynamic``."""
    full = groups.get("full")
    target = mean_std([run.summary["eval_after"]["greedy_accuracy"] for run in full])[0] if full else math.nan
    rows = []
    for arm, runs in groups.items():
        step, tokens_to_reach, seconds_to_reach = reach(runs, target) if full else (None, math.nan, math.nan)
        rows.append(
            {
                "arm": arm,
                "runs": len(runs),
                "greedy": mean_std([run.summary["eval_after"]["greedy_accuracy"] for run in runs])[0],
                "sampled_per_step": _per_run_mean(runs, "prompts/drawn"),
                "skipped_per_step": _per_run_mean(runs, "prompts/skipped"),
                "dropped_per_step": _per_run_mean(runs, "prompts/dropped"),
                "sampled_zero_variance": _per_run_mean(runs, ZERO_VARIANCE),
                "trained_zero_variance": _per_run_mean(runs, "prompts/trained_zero_variance_share"),
                "precision": _per_run_mean(runs, "prompts/predictor_precision"),
                "recall": _per_run_mean(runs, "prompts/predictor_recall"),
                "decoded": mean_std([float(run.summary.get("decoded_tokens", math.nan)) for run in runs])[0],
                "seconds": mean_std([float(run.summary.get("generation_seconds", math.nan)) for run in runs])[0],
                "reach_step": step,
                "decoded_to_reach": tokens_to_reach,
                "seconds_to_reach": seconds_to_reach,
            }
        )
    return rows


def zero_variance_by_epoch(runs: list[Run], key: str = ZERO_VARIANCE) -> list[float]:
    """Mean over runs of ``key`` (a share logged every logging step) per epoch of training steps
    (:func:`steps_per_epoch`; a log row belongs to the epoch its step ends in)."""
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        length = steps_per_epoch(run)
        if math.isnan(length):
            continue
        epochs: dict[int, list[float]] = {}
        for step, value in zip(*run.series(key), strict=True):
            epochs.setdefault(math.ceil(step / length) - 1, []).append(value)
        for epoch, values in epochs.items():
            per_epoch.setdefault(epoch, []).append(sum(values) / len(values))
    return [
        mean_std(per_epoch[epoch])[0] if epoch in per_epoch else math.nan
        for epoch in range(max(per_epoch, default=-1) + 1)
    ]


def selective_lines(groups: dict[str, list[Run]]) -> list[str]:
    """Markdown for compares with selective rollouts (an arm that logged ``prompts/*``); empty otherwise."""
    if not any(run.series("prompts/drawn")[0] for runs in groups.values() for run in runs):
        return []
    rows = {row["arm"]: row for row in cost_rows(groups)}
    references = [arm for arm in ("full", "dynamic") if arm in rows]
    lines = [
        "",
        "## Selective rollouts: where generation went",
        "",
        "Per optimizer step, mean over logging steps and runs: sampled = prompts whose G completions were decoded; "
        "skipped = candidates passed over before sampling (never decoded); dropped = sampled groups not trained on "
        "(beyond the batch). Zero-variance shares: of the sampled groups (TRL's frac_reward_zero_std, every "
        "generation call) and of the trained ones (groups filling a batch the draws could not fill). Precision and "
        'recall of the skip predictor\'s "no variance" call (skip probability >= 0.5) against what the sampled '
        "groups showed: measured on the prompts that were sampled, which include the skipped-by-chance-not "
        "candidates (the exploration floor is the audited share). Decoded tokens and generation seconds are run "
        'totals; "to reach full" = spent by the first eval whose mean greedy accuracy reaches full\'s final mean '
        f"(the point estimate; ratios in brackets are against {' and '.join(references)}; before RL: the arm's "
        "accuracy before RL already reached it, so nothing was spent to reach it).",
        "",
        "| arm | runs | greedy | sampled/step | skipped/step | dropped/step | zero-var sampled | zero-var trained "
        "| precision | recall | decoded tokens | generation s | reaches full at | decoded to reach "
        "| seconds to reach |",
        "|---|" + "---|" * 14,
    ]
    for arm, row in rows.items():
        costs = [
            fmt(row[key], digits=digits) + "".join(_ratio(row[key], rows[reference][key]) for reference in references)
            for key, digits in (("decoded", 0), ("seconds", 1), ("decoded_to_reach", 0), ("seconds_to_reach", 1))
        ]
        shares = [fmt(row[key], digits=2) for key in ("sampled_per_step", "skipped_per_step", "dropped_per_step")]
        quality = [fmt(row[key], digits=2) for key in ("sampled_zero_variance", "trained_zero_variance")]
        quality += [fmt(row[key], digits=2) for key in ("precision", "recall")]
        reached = {None: "no", 0: "before RL"}.get(row["reach_step"], str(row["reach_step"]))
        lines.append(
            f"| {arm} | {row['runs']} | {fmt(row['greedy'])} | "
            + " | ".join([*shares, *quality, costs[0], costs[1], reached, costs[2], costs[3]])
            + " |"
        )
    by_epoch = {arm: zero_variance_by_epoch(runs) for arm, runs in groups.items()}
    right_by_epoch = {arm: zero_variance_by_epoch(runs, ALL_RIGHT) for arm, runs in groups.items()}
    epochs = max((len(values) for values in by_epoch.values()), default=0)
    if epochs:
        lines += [
            "",
            "Zero-variance share of the sampled groups per epoch / of them, the all-right share (an epoch = the "
            "optimizer steps in which full trains on as many prompts as the training set holds; mean over runs). "
            "Where the all-right share rises, prompts are becoming always solved: the regime in which skipping pays.",
            "",
            "| arm | " + " | ".join(str(epoch + 1) for epoch in range(epochs)) + " |",
            "|---|" + "---|" * epochs,
        ]
        for arm, values in by_epoch.items():
            rights = right_by_epoch[arm] + [math.nan] * (epochs - len(right_by_epoch[arm]))
            cells = [
                fmt(value, digits=2) + ("" if math.isnan(right) else f" / {right:.2f}")
                for value, right in zip(values, rights, strict=False)
            ]
            lines.append(f"| {arm} | " + " | ".join(cells + ["—"] * (epochs - len(values))) + " |")
    return lines


# pass-rate buckets of the per-prompt record: (label, does a pass rate belong to it)
PASS_RATE_BUCKETS = (
    ("never sampled", lambda rate: rate is None),
    ("0", lambda rate: rate is not None and rate == 0.0),
    ("(0, 0.5]", lambda rate: rate is not None and 0.0 < rate <= 0.5),
    ("(0.5, 1)", lambda rate: rate is not None and 0.5 < rate < 1.0),
    ("1", lambda rate: rate is not None and rate == 1.0),
)


def skip_by_pass_rate(runs: list[Run]) -> list[tuple[float, int]]:
    """Per pass-rate bucket of :data:`PASS_RATE_BUCKETS`: the share of the times its prompts were candidates that
    they were skipped (skipped / (skipped + sampled), pooled over the bucket's prompts and the runs; NaN with no
    prompt) and how many prompts (summed over runs)."""
    out = []
    for _, belongs in PASS_RATE_BUCKETS:
        rows = [row for run in runs for row in run.prompts if belongs(row.get("pass_rate"))]
        skipped, sampled = sum(row["skipped"] for row in rows), sum(row["sampled"] for row in rows)
        out.append((skipped / (skipped + sampled) if skipped + sampled else math.nan, len(rows)))
    return out


def skip_lines(groups: dict[str, list[Run]]) -> list[str]:
    """The table of skip rate by pass rate, for arms that skipped a prompt (empty otherwise)."""
    arms = {arm: runs for arm, runs in groups.items() if any(row["skipped"] for run in runs for row in run.prompts)}
    if not arms:
        return []
    lines = [
        "",
        "Which prompts were skipped (from each run's `prompts.jsonl`): per bucket of a prompt's pass rate (the mean "
        "share of its sampled completions above `prompts.solved_reward`), skip rate = skipped / (skipped + sampled) "
        "over its prompts and runs, with the number of prompts. A skipper that saves generation on the prompts the "
        "policy always (1) or never (0) solves shows high rates there and low ones in between.",
        "",
        "| arm | " + " | ".join(label for label, _ in PASS_RATE_BUCKETS) + " |",
        "|---|" + "---|" * len(PASS_RATE_BUCKETS),
    ]
    for arm, runs in arms.items():
        cells = [f"{fmt(rate, digits=2)} ({count})" for rate, count in skip_by_pass_rate(runs)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def prompt_figures(groups: dict[str, list[Run]], out_dir: Path) -> list[tuple[str, str]]:
    """The skip rate of every prompt against its pass rate, one panel per arm that skipped: ``(title, file)``."""
    arms = [arm for arm, runs in groups.items() if any(row["skipped"] for run in runs for row in run.prompts)]
    if not arms:
        return []
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(arms), figsize=(4.2 * len(arms), 3.6), squeeze=False)
    for axis, arm in zip(axes[0], arms, strict=True):
        rows = [row for run in groups[arm] for row in run.prompts if row.get("pass_rate") is not None]
        rates = [row["skipped"] / (row["skipped"] + row["sampled"]) for row in rows]
        axis.scatter([row["pass_rate"] for row in rows], rates, s=10, alpha=0.5)
        axis.set(title=arm, xlabel="pass rate of its sampled groups", ylabel="skip rate", xlim=(-0.05, 1.05))
    name = "skip_pass_rate.png"
    _save_figure(plt, figure, out_dir / name)
    return [("Skip rate against pass rate, one point per sampled prompt and run", name)]
