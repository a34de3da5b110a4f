"""``rlvr report RUN_DIR...``: one ``report.md`` with tables and PNG figures from finished (or partial) runs.

Everything is loaded first (:class:`rlvr.runs.CompareRecords`), then rendered: the summary table with
bootstrap intervals and verdict lines, the figures of :data:`rlvr.report_figures.FIGURES`, the
multi-domain sections, the forking tokens, the list of runs. A report of a half-finished compare says
which runs are missing.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from rlvr.bootstrap import Interval, mean_interval, paired_difference, verdict
from rlvr.report_figures import CURVE_PANELS, FIGURES, split_panels
from rlvr.runs import CompareRecords, Run, mean_curve, mean_std


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _per_problem(runs: list[Run], key: str) -> list[list[float]]:
    """(seeds, problems) per-problem scores after RL (``greedy_correct`` or ``sampled_correct``), one row per
    run that recorded them."""
    rows = [run.summary["eval_after"].get(key) or [] for run in runs]
    return [row for row in rows if row]


def _finished(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.summary and run.summary.get("eval_after")]


def summary_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """One row per arm: accuracies with bootstrap intervals over seeds x problems, the paired difference
    to the full arm, and the first eval at which the arm's mean greedy accuracy enters the full arm's
    final interval (a noise-tolerant "steps to full")."""
    full = _finished(groups.get("full", []))
    full_greedy = _per_problem(full, "greedy_correct")
    full_sampled = _per_problem(full, "sampled_correct")
    full_interval = mean_interval(full_greedy)
    full_tokens = mean_std([float(run.summary.get("gradient_tokens", math.nan)) for run in full])[0]
    rows = []
    for arm, runs in groups.items():
        finished = _finished(runs)
        greedy, sampled = _per_problem(finished, "greedy_correct"), _per_problem(finished, "sampled_correct")
        best = [max(run.series("eval/greedy_accuracy")[1], default=math.nan) for run in finished]
        steps, means, _ = mean_curve(finished, "eval/greedy_accuracy")
        reach = next((s for s, m in zip(steps, means, strict=True) if m >= full_interval.low), None)
        tokens = mean_std([float(run.summary.get("gradient_tokens", math.nan)) for run in finished])[0]
        rows.append(
            {
                "arm": arm,
                "seeds": ", ".join(str(run.seed) for run in finished),
                "greedy": mean_interval(greedy) if greedy else _no_records(finished, "greedy_accuracy"),
                "sampled": mean_interval(sampled) if sampled else _no_records(finished, "sampled_accuracy"),
                "greedy_vs_full": paired_difference(greedy, full_greedy) if arm != "full" and full_greedy else None,
                "sampled_vs_full": paired_difference(sampled, full_sampled) if arm != "full" and full_sampled else None,
                "best": mean_std(best),
                "reaches_full": reach if full_greedy and not math.isnan(full_interval.low) else None,
                "gradient_tokens": tokens,
                "token_share": tokens / full_tokens if full_tokens and not math.isnan(full_tokens) else math.nan,
                "train_seconds": mean_std([float(run.summary.get("train_seconds", math.nan)) for run in finished])[0],
            }
        )
    return rows


def _no_records(runs: list[Run], key: str) -> Interval:
    """Runs without per-problem records (older summaries): the mean, no interval."""
    mean = mean_std([run.summary["eval_after"][key] for run in runs])[0]
    return Interval(mean, math.nan, math.nan)


def verdict_lines(rows: list[dict], accuracy: str = "greedy") -> list[str]:
    """One plain-words line per arm of :func:`summary_rows` against the full arm (``greedy`` or
    ``sampled`` accuracy after RL)."""
    return [
        verdict(row["arm"], "full", row[f"{accuracy}_vs_full"], row["token_share"])
        for row in rows
        if row[f"{accuracy}_vs_full"] is not None
    ]


def top_forking_tokens(runs: list[Run], count: int = 10) -> list[tuple[str, int]]:
    counts: Counter[str] = Counter()
    for run in runs:
        for record in run.forking:
            for token, n in record.get("top_forking_tokens", []):
                counts[token] += n
    return counts.most_common(count)


def domain_sections(groups: dict[str, list[Run]], starting_policies: list[dict]) -> list[str]:
    """Markdown for multi-domain runs: starting policies, per-domain accuracy and routing (empty otherwise)."""
    lines: list[str] = []
    for built in starting_policies:
        if built:
            lines += [
                "",
                "## Starting policies",
                "",
                "Dense warm starts behind the upcycled MoEs (supervised; the seed stops "
                "at the first dev check reaching the target accuracy, each branch trains a fixed number of steps on "
                "its domain; dev accuracy on the branch's own domain).",
                "",
                "| dense model | SFT steps | dev accuracy |",
                "|---|---|---|",
            ]
            lines += [
                f"| {name} | {info['steps']} | {_fmt(info['dev_accuracy'])} |"
                for name, info in built.items()
                if not name.startswith("routing_")
            ]
            as_built = {
                name[len("routing_") : -len("_as_built")]: info
                for name, info in built.items()
                if name.startswith("routing_") and info
            }
            if as_built:
                lines += [
                    "",
                    "Routing of each upcycled MoE as built (before any MoE training): JS between the domains' "
                    "expert loads, mean over layers, and each domain's top expert in layer 0.",
                    "",
                    "| init | JS (bits) | layer-0 top expert |",
                    "|---|---|---|",
                ]
                for init, info in as_built.items():
                    first = info["layers"][0]
                    tops = ", ".join(
                        f"{d} {first['top_expert'][d]} ({first['loads'][d][first['top_expert'][d]]:.2f})"
                        for d in info["domains"]
                    )
                    lines.append(f"| {init} | {_fmt(info['mean_js_bits'])} | {tops} |")
    tuned = {
        arm: runs[0].summary["warm_start"]
        for arm, runs in groups.items()
        if runs and runs[0].summary and runs[0].summary.get("warm_start")
    }
    if tuned and starting_policies:  # runs of a compare
        lines += [
            "",
            "Supervised fine-tuning on the mixed task before RL (the run's warm start):",
            "",
            "| arm | SFT steps | dev accuracy |",
            "|---|---|---|",
        ]
        lines += [f"| {arm} | {info['steps']} | {_fmt(info['dev_accuracy'])} |" for arm, info in tuned.items()]
    by_group = {
        arm: [run for run in runs if run.summary and (run.summary.get("eval_after") or {}).get("by_group")]
        for arm, runs in groups.items()
    }
    by_group = {arm: runs for arm, runs in by_group.items() if runs}
    if by_group:
        domains = list(next(iter(by_group.values()))[0].summary["eval_after"]["by_group"])
        lines += [
            "",
            "## Per-domain accuracy",
            "",
            "Greedy accuracy before -> after RL and sampled accuracy after RL, "
            "per domain of the eval problems (mean over seeds).",
            "",
            "| arm | " + " | ".join(f"{d}: greedy | {d}: sampled" for d in domains) + " |",
            "|---|" + "---|---|" * len(domains),
        ]
        for arm, runs in by_group.items():
            cells = []
            for domain in domains:
                before = mean_std(
                    [
                        ((run.summary.get("eval_before") or {}).get("by_group") or {})
                        .get(domain, {})
                        .get("greedy_accuracy", math.nan)
                        for run in runs
                    ]
                )[0]
                after = mean_std([run.summary["eval_after"]["by_group"][domain]["greedy_accuracy"] for run in runs])[0]
                sampled = mean_std([run.summary["eval_after"]["by_group"][domain]["sampled_accuracy"] for run in runs])[
                    0
                ]
                cells += [f"{_fmt(before)} -> {_fmt(after)}", _fmt(sampled)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    routed = {arm: [run for run in runs if (run.domain_routing or {}).get("after")] for arm, runs in groups.items()}
    routed = {arm: runs for arm, runs in routed.items() if runs}
    if routed:
        lines += [
            "",
            "## Per-domain routing",
            "",
            "Each domain's worked eval solutions, teacher-forced through the policy: "
            "Jensen-Shannon divergence between the domains' expert loads (bits, mean over layers; 0 = routed "
            "alike, 1 = disjoint experts with two domains), before -> after RL, and each domain's top expert and "
            "its share per layer after RL (first seed).",
            "",
            "| arm | JS before -> after (bits) | top expert per layer after RL |",
            "|---|---|---|",
        ]
        for arm, runs in routed.items():
            before = mean_std([(run.domain_routing.get("before") or {}).get("mean_js_bits", math.nan) for run in runs])[
                0
            ]
            after = mean_std([run.domain_routing["after"]["mean_js_bits"] for run in runs])[0]
            first = runs[0].domain_routing["after"]
            per_layer = "; ".join(
                f"L{index}: "
                + ", ".join(
                    f"{domain} {layer['top_expert'][domain]} "
                    f"({layer['loads'][domain][layer['top_expert'][domain]]:.2f})"
                    for domain in first["domains"]
                )
                for index, layer in enumerate(first["layers"])
            )
            lines.append(f"| {arm} | {_fmt(before)} -> {_fmt(after)} | {per_layer} |")
    return lines


def _interval_cell(interval: Interval) -> str:
    if math.isnan(interval.low):
        return _fmt(interval.estimate)
    return interval.format()


def summary_lines(groups: dict[str, list[Run]]) -> list[str]:
    """The summary table (markdown lines) with its legend, then the verdict lines."""
    lines = [
        "Eval accuracy after RL: mean over seeds x eval problems with a 95% bootstrap interval (problems and "
        "seeds resampled); vs full = paired difference to the full arm on the same problems; best = best mean "
        "greedy accuracy of any eval during training; reaches full = first eval step where the arm's mean greedy "
        "accuracy is inside the full arm's final interval; gradient tokens = completion tokens with a non-zero "
        "policy-gradient weight per run; train time = wall-clock seconds of the RL phase (no warm start, no evals).",
        "",
        "| arm | seeds | greedy acc | sampled acc | greedy vs full | best greedy | reaches full | gradient tokens "
        "| train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = summary_rows(groups)
    for row in rows:
        versus = "—" if row["greedy_vs_full"] is None else row["greedy_vs_full"].format(signed=True)
        reach = "—" if row["arm"] == "full" else (row["reaches_full"] if row["reaches_full"] is not None else "no")
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {_interval_cell(row['greedy'])} | {_interval_cell(row['sampled'])} | "
            f"{versus} | {_fmt(*row['best'])} | {reach} | {_fmt(row['gradient_tokens'], digits=0)} | "
            f"{_fmt(row['train_seconds'], digits=0)} |"
        )
    for accuracy in ("greedy", "sampled"):
        verdicts = verdict_lines(rows, accuracy)
        if verdicts:
            lines += ["", f"**Verdicts on {accuracy} accuracy** after RL (difference to full, 95% interval):", ""]
            lines += [f"- {line}" for line in verdicts]
    return lines


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
    lines += ["", "## Summary", "", *summary_lines(groups)]
    figures = []
    for name, title, draw in FIGURES:
        if draw(groups, out_dir / name):
            figures.append((title, name))
    lines += domain_sections(groups, records.starting_policies)
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
                f"{_fmt(before.get('greedy_accuracy', math.nan))} -> {_fmt(after.get('greedy_accuracy', math.nan))} |"
            )
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
