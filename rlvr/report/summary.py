"""``rlvr report RUN_DIR...``: one ``report.md`` with tables and PNG figures from finished (or partial) runs.

Everything is loaded first (:class:`rlvr.report.runs.CompareRecords`), then rendered: the summary table with
bootstrap intervals and verdict lines, the figures of :data:`rlvr.report.figures.FIGURES`, the
multi-domain sections, the forking tokens, the list of runs. A report of a half-finished compare says
which runs are missing.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from rlvr.report.adapters import adapter_lines
from rlvr.report.cells import baseline_of, construction_clusters, fmt, interval_cell
from rlvr.report.figures import CURVE_PANELS, FIGURES, own_share_figures, split_panels
from rlvr.report.intervals import Interval, mean_interval, paired_difference, verdict
from rlvr.report.prompts import prompt_figures, selective_lines, skip_lines
from rlvr.report.runs import CompareRecords, Run, mean_curve, mean_std
from rlvr.report.sections import collapsed, domain_sections, mismatch_lines, routing_verdict_lines

__all__ = [  # the sections' functions are the report's too
    "baseline_of",
    "collapsed",
    "contrast_lines",
    "domain_sections",
    "mismatch_lines",
    "routing_verdict_lines",
    "summary_lines",
    "summary_rows",
    "top_forking_tokens",
    "verdict_lines",
    "write_report",
]


def _per_problem(runs: list[Run], key: str) -> list[list[float]]:
    """(seeds, problems) per-problem scores after RL (``greedy_correct`` or ``sampled_correct``), one row per
    run that recorded them."""
    rows = [run.summary["eval_after"].get(key) or [] for run in runs]
    return [row for row in rows if row]


def _finished(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.summary and run.summary.get("eval_after")]


def _mean_summary(runs: list[Run], key: str) -> float:
    """Mean over runs of a number in their summaries (NaN where none has it)."""
    values = [run.summary.get(key) for run in runs]
    return mean_std([math.nan if value is None else float(value) for value in values])[0]


STARTS_INSIDE = "cannot tell (starts inside)"


def _reach_step(runs: list[Run], low: float) -> int | None:
    """The first eval step at which the mean greedy accuracy of ``runs`` is at least ``low``."""
    steps, means, _ = mean_curve(runs, "eval/greedy_accuracy")
    return next((step for step, mean in zip(steps, means, strict=True) if mean >= low), None)


def _decoded_at(runs: list[Run], step: int | None) -> float:
    """Mean over runs of the training tokens decoded by ``step`` (NaN if never reached or not logged)."""
    return math.nan if step is None else mean_std([run.decoded_tokens_at(step) for run in runs])[0]


def summary_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """One row per arm: accuracies with bootstrap intervals over seeds x problems, the paired difference
    to its baseline (:func:`baseline_of`), and the first eval at which the arm's mean greedy accuracy
    enters the baseline's final interval (a noise-tolerant "steps to baseline"), with the tokens decoded
    by then against those the baseline decoded to enter its own final interval. Runs pair by their
    replicate (construction seed, RL seed)."""
    rows = []
    for arm, runs in groups.items():
        finished = _finished(runs)
        greedy, sampled = _per_problem(finished, "greedy_correct"), _per_problem(finished, "sampled_correct")
        best = [max(run.series("eval/greedy_accuracy")[1], default=math.nan) for run in finished]
        tokens = _mean_summary(finished, "gradient_tokens")
        baseline = baseline_of(arm, groups)
        clusters = construction_clusters(finished)
        versus_greedy = versus_sampled = reach = None
        token_share = decoded_share = decoded_to_reach = reach_share = math.nan
        decoded = _mean_summary(finished, "decoded_tokens")
        if baseline is not None:
            reference = _finished(groups[baseline])
            paired = [run.replicate for run in finished] == [run.replicate for run in reference]
            reference_greedy = _per_problem(reference, "greedy_correct")
            reference_sampled = _per_problem(reference, "sampled_correct")
            pairs = None if clusters is None else (clusters, construction_clusters(reference))
            if paired and greedy and reference_greedy:
                versus_greedy = paired_difference(greedy, reference_greedy, clusters=pairs)
            if paired and sampled and reference_sampled:
                versus_sampled = paired_difference(sampled, reference_sampled, clusters=pairs)
            final = mean_interval(reference_greedy, clusters=construction_clusters(reference))
            if reference_greedy and not math.isnan(final.low):
                reach_step = _reach_step(finished, final.low)
                reach = "no" if reach_step is None else reach_step
                if reach_step == 0:  # it started inside the interval: the interval cannot tell it from full
                    reach, reach_step = STARTS_INSIDE, None
                decoded_to_reach = _decoded_at(finished, reach_step)
                reference_to_reach = _decoded_at(reference, _reach_step(reference, final.low))
                if reference_to_reach > 0:  # NaN when not logged; 0 when the baseline started inside it
                    reach_share = decoded_to_reach / reference_to_reach
            reference_decoded = _mean_summary(reference, "decoded_tokens")
            decoded_share = decoded / reference_decoded if reference_decoded else math.nan
            reference_tokens = _mean_summary(reference, "gradient_tokens")
            if reference_tokens and not math.isnan(reference_tokens) and "+" not in arm:  # arms, not inits
                token_share = tokens / reference_tokens
        rows.append(
            {
                "arm": arm,
                "baseline": baseline,
                "seeds": ", ".join(run.replicate_label for run in finished),
                "greedy": mean_interval(greedy, clusters=clusters)
                if greedy
                else _no_records(finished, "greedy_accuracy"),
                "sampled": mean_interval(sampled, clusters=clusters)
                if sampled
                else _no_records(finished, "sampled_accuracy"),
                "greedy_vs_baseline": versus_greedy,
                "sampled_vs_baseline": versus_sampled,
                "best": mean_std(best),
                "reaches_baseline": reach,
                "gradient_tokens": tokens,
                "token_share": token_share,
                "decoded_tokens": decoded,
                "decoded_share": decoded_share,
                "decoded_to_reach": decoded_to_reach,
                "decoded_to_reach_share": reach_share,
                "train_seconds": mean_std([float(run.summary.get("train_seconds", math.nan)) for run in finished])[0],
            }
        )
    return rows


def _no_records(runs: list[Run], key: str) -> Interval:
    """Runs without per-problem records (older summaries): the mean, no interval."""
    mean = mean_std([run.summary["eval_after"][key] for run in runs])[0]
    return Interval(mean, math.nan, math.nan)


def verdict_lines(rows: list[dict], accuracy: str = "greedy") -> list[str]:
    """One plain-words line per arm of :func:`summary_rows` against its baseline (``greedy`` or
    ``sampled`` accuracy after RL)."""
    return [
        verdict(
            row["arm"],
            row["baseline"],
            row[f"{accuracy}_vs_baseline"],
            row["token_share"],
            row["decoded_share"] if abs(row["decoded_share"] - 1.0) > 0.005 else None,  # shown where they differ
        )
        for row in rows
        if row[f"{accuracy}_vs_baseline"] is not None
    ]


def contrast_lines(groups: dict[str, list[Run]], contrasts: list[tuple[str, str]]) -> list[str]:
    """Verdict lines for the extra (arm, baseline) pairs a compare asked for (``compare.contrasts``), on
    greedy and sampled accuracy, paired on problems and seeds like the comparisons with full."""
    lines = []
    for accuracy in ("greedy", "sampled"):
        for arm, baseline in contrasts:
            runs, reference = _finished(groups.get(arm, [])), _finished(groups.get(baseline, []))
            if not runs or [run.replicate for run in runs] != [run.replicate for run in reference]:
                continue  # not run (yet), or not the same seeds: nothing to pair
            ours = _per_problem(runs, f"{accuracy}_correct")
            theirs = _per_problem(reference, f"{accuracy}_correct")
            if not ours or not theirs:
                continue
            clusters = (
                None
                if construction_clusters(runs) is None
                else (construction_clusters(runs), construction_clusters(reference))
            )
            difference = paired_difference(ours, theirs, clusters=clusters)
            shares = [
                _mean_summary(runs, key) / _mean_summary(reference, key)
                for key in ("gradient_tokens", "decoded_tokens")
            ]
            prefix = "" if accuracy == "greedy" else "(sampled) "
            lines.append(prefix + verdict(arm, baseline, difference, *shares))
    return lines


def top_forking_tokens(runs: list[Run], count: int = 10) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter()
    for run in runs:
        for record in run.forking:
            for token, n in record.get("top_forking_tokens", []):
                counts[token] += n
    return counts.most_common(count)


def summary_lines(groups: dict[str, list[Run]], contrasts: list[tuple[str, str]] | None = None) -> list[str]:
    """The summary table (markdown lines) with its legend, then the verdict lines (and those of the
    compare's ``contrasts``)."""
    lines = [
        "Eval accuracy after RL: mean over runs x eval problems with a 95% bootstrap interval (problems and "
        "runs resampled; runs built from one construction seed are resampled together); baseline = the arm "
        "each row is compared with (full; sparse+<arm> for the other starting policies of an upcycling compare); "
        "vs baseline = paired difference on the same problems and "
        "seeds; best = best mean greedy accuracy of any eval during training; reaches baseline = first eval step "
        "where the arm's mean greedy accuracy is inside the baseline's final interval (cannot tell: the arm's "
        "accuracy before RL already was, so the interval cannot tell it from the baseline); seeds = RL seeds (cC/sS: "
        "construction seed C, RL seed S); gradient tokens = completion tokens with a non-zero policy-gradient "
        "weight per run; decoded tokens = completion tokens sampled for training per run (a forking tree's "
        "shared prefixes once); decoded to reach baseline = tokens decoded by the reaches-baseline step, and "
        "their ratio to the tokens the baseline decoded to enter its own final interval; train time = "
        "wall-clock seconds of the RL phase (no warm start, no evals).",
        "",
        "| arm | seeds | greedy acc | sampled acc | baseline | greedy vs baseline | best greedy | reaches baseline "
        "| gradient tokens | decoded tokens | decoded to reach baseline | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = summary_rows(groups)
    for row in rows:
        versus = "—" if row["greedy_vs_baseline"] is None else row["greedy_vs_baseline"].format(signed=True)
        reach = "—" if row["reaches_baseline"] is None else row["reaches_baseline"]
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {interval_cell(row['greedy'])} | {interval_cell(row['sampled'])} | "
            f"{row['baseline'] or '—'} | {versus} | {fmt(*row['best'])} | {reach} | "
            f"{fmt(row['gradient_tokens'], digits=0)} | {fmt(row['decoded_tokens'], digits=0)} | "
            f"{_reach_cell(row)} | {fmt(row['train_seconds'], digits=0)} |"
        )
    for accuracy in ("greedy", "sampled"):
        verdicts = verdict_lines(rows, accuracy)
        if verdicts:
            lines += [
                "",
                f"**Verdicts on {accuracy} accuracy** after RL (difference to the baseline, 95% interval):",
                "",
            ]
            lines += [f"- {line}" for line in verdicts]
    extra = contrast_lines(groups, contrasts or [])
    if extra:
        lines += ["", "**Contrasts** asked for by the compare (arm vs baseline, 95% interval):", ""]
        lines += [f"- {line}" for line in extra]
    return lines


def _reach_cell(row: dict) -> str:
    if math.isnan(row["decoded_to_reach"]):
        return "—"
    share = row["decoded_to_reach_share"]
    return fmt(row["decoded_to_reach"], digits=0) + ("" if math.isnan(share) else f" ({share:.2f}x)")


def write_report(paths: list[Path], out_dir: Path | None = None, records: CompareRecords | None = None) -> Path:
    """``report.md`` and its figures for the runs under ``paths`` (``records``: already loaded from them)."""
    records = records or CompareRecords.load(paths)
    runs, missing, groups = records.runs, records.missing, records.groups
    out_dir = out_dir or paths[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# rlvr report", ""]
    lines.append(f"Runs: {len(runs)} ({', '.join(f'{arm} x{len(rs)}' for arm, rs in groups.items()) or 'none'}).")
    if missing:
        lines += ["", f"**Missing runs ({len(missing)})**, not in the tables or figures:", *[f"- {m}" for m in missing]]
    lines += ["", "## Summary", "", *summary_lines(groups, records.contrasts)]
    figures = []
    for name, title, draw in FIGURES:
        if draw(groups, out_dir / name):
            figures.append((title, name))
    lines += selective_lines(groups) + skip_lines(groups)
    lines += adapter_lines(groups)
    lines += mismatch_lines(groups)
    lines += domain_sections(groups, records.starting_policies)
    figures += own_share_figures(groups, out_dir) + prompt_figures(groups, out_dir)
    for title, name in figures:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    flat = [note for _, _, panels in CURVE_PANELS for note in split_panels(groups, panels)[1]]
    if flat:
        lines += ["", f"Left out of the figures, constant in every run: {'; '.join(flat)}."]
    lines += [
        "",
        "## Most frequent forking tokens",
        "",
        "Counts summed over the top-20 list of each logging step (selected tokens, also in arms whose loss "
        "uses all tokens).",
        "",
        "| arm | tokens (count) |",
        "|---|---|",
    ]
    for arm, arm_runs in groups.items():
        tokens = ", ".join(f"`{token!r}` ({n})" for token, n in top_forking_tokens(arm_runs))
        lines.append(f"| {arm} | {tokens or 'n/a'} |")
    lines += ["", "## Runs", "", "| arm | seed | directory | steps | greedy before -> after |", "|---|---|---|---|---|"]
    for arm, arm_runs in groups.items():
        for run in arm_runs:
            s = run.summary or {}
            before, after = (s.get("eval_before") or {}), (s.get("eval_after") or {})
            lines.append(
                f"| {arm} | {run.seed} | {run.directory} | {s.get('steps', 'unfinished')} | "
                f"{fmt(before.get('greedy_accuracy', math.nan))} -> {fmt(after.get('greedy_accuracy', math.nan))} |"
            )
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
