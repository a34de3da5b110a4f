"""``rlvr report RUN_DIR...``: one ``report.md`` with tables and PNG figures from finished (or partial) runs.

Reads what runs write (``summary.json``, ``metrics.jsonl``, ``forking_tokens.jsonl``, ``routing.jsonl``,
``config.yaml``), groups runs by arm, and renders whatever exists: a report of a half-finished compare
says which runs are missing.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlvr.bootstrap import Interval, mean_interval, paired_difference, verdict
from rlvr.compare import MANIFEST


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

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a logged metric, in step order (last value wins per step)."""
        points = {}
        for record in self.metrics:
            value = record.get(key)
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                points[record["step"]] = float(value)
        steps = sorted(points)
        return steps, [points[step] for step in steps]


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
        summary=summary,
        metrics=_read_jsonl(directory / "metrics.jsonl"),
        forking=_read_jsonl(directory / "forking_tokens.jsonl"),
        routing=_read_jsonl(directory / "routing.jsonl"),
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
                missing.append(f"{entry['arm']} seed {entry['seed']} ({directory})")
        if not planned:
            runs += [load_run(child) for child in sorted(path.iterdir()) if (child / "summary.json").exists()]
    return runs, missing


# --------------------------------------------------------------------------------------------------
# Numbers


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def mean_curve(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every run, mean and std over runs."""
    series = [dict(zip(*run.series(key), strict=True)) for run in runs]
    series = [s for s in series if s]
    if not series:
        return [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    means, stds = [], []
    for step in steps:
        mean, std = _mean_std([s[step] for s in series])
        means.append(mean)
        stds.append(std)
    return steps, means, stds


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
    full_tokens = _mean_std([float(run.summary.get("gradient_tokens", math.nan)) for run in full])[0]
    rows = []
    for arm, runs in groups.items():
        finished = _finished(runs)
        greedy, sampled = _per_problem(finished, "greedy_correct"), _per_problem(finished, "sampled_correct")
        best = [max(run.series("eval/greedy_accuracy")[1], default=math.nan) for run in finished]
        steps, means, _ = mean_curve(finished, "eval/greedy_accuracy")
        reach = next((s for s, m in zip(steps, means, strict=True) if m >= full_interval.low), None)
        tokens = _mean_std([float(run.summary.get("gradient_tokens", math.nan)) for run in finished])[0]
        rows.append(
            {
                "arm": arm,
                "seeds": ", ".join(str(run.seed) for run in finished),
                "greedy": mean_interval(greedy) if greedy else _no_records(finished, "greedy_accuracy"),
                "sampled": mean_interval(sampled) if sampled else _no_records(finished, "sampled_accuracy"),
                "greedy_vs_full": paired_difference(greedy, full_greedy) if arm != "full" and full_greedy else None,
                "sampled_vs_full": paired_difference(sampled, full_sampled) if arm != "full" and full_sampled else None,
                "best": _mean_std(best),
                "reaches_full": reach if full_greedy and not math.isnan(full_interval.low) else None,
                "gradient_tokens": tokens,
                "token_share": tokens / full_tokens if full_tokens and not math.isnan(full_tokens) else math.nan,
                "train_seconds": _mean_std([float(run.summary.get("train_seconds", math.nan)) for run in finished])[0],
            }
        )
    return rows


def _no_records(runs: list[Run], key: str) -> Interval:
    """Runs without per-problem records (older summaries): the mean, no interval."""
    mean = _mean_std([run.summary["eval_after"][key] for run in runs])[0]
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


# --------------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _load_heatmap(figure, axis, loads: list[list[float]], title: str, vmax: float, label: str) -> None:
    """(layers, E) expert loads as an image, one row per layer."""
    image = axis.imshow(loads, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    axis.set_title(title, fontsize=10)
    axis.set_xlabel("expert")
    axis.set_ylabel("layer")
    axis.set_xticks(range(len(loads[0])))
    axis.set_yticks(range(len(loads)))
    figure.colorbar(image, ax=axis, label=label)


def split_panels(groups: dict[str, list[Run]], panels: list[tuple[str, str]]) -> tuple[list, list[str]]:
    """Panels worth drawing, and notes on the training metrics left out because every run logged one
    constant value (the clip fraction of on-policy runs, one optimiser step per generation batch, is
    always 0). Eval accuracy is always drawn: a flat accuracy is a finding."""
    present, flat = [], []
    for key, label in panels:
        values = {v for runs in groups.values() for run in runs for v in run.series(key)[1]}
        if len(values) > 1 or (values and key.startswith("eval/")):
            present.append((key, label))
        elif values:
            flat.append(f"{label} (always {values.pop():g})")
    return present, flat


def plot_curves(groups: dict[str, list[Run]], panels: list[tuple[str, str]], path: Path, title: str) -> bool:
    """One panel per (metric key, label): mean over seeds per arm, with a ±1 std band."""
    plt = _pyplot()
    present, _ = split_panels(groups, panels)
    if not present:
        return False
    columns = min(2, len(present))
    rows = math.ceil(len(present) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.8 * rows), squeeze=False)
    for axis, (key, label) in zip(axes.flat, present, strict=False):
        for arm, runs in groups.items():
            steps, means, stds = mean_curve(runs, key)
            if not steps:
                continue
            (line,) = axis.plot(steps, means, marker="o" if len(steps) < 15 else None, label=f"{arm} (n={len(runs)})")
            axis.fill_between(
                steps,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                color=line.get_color(),
                alpha=0.2,
            )
        axis.set_xlabel("training step")
        axis.set_ylabel(label)
        axis.set_title(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(present) :]:
        axis.axis("off")
    figure.suptitle(title)
    _save_figure(plt, figure, path)
    return True


def plot_entropy(groups: dict[str, list[Run]], path: Path) -> bool:
    """Log-scale histogram of completion-token entropy, early vs late, forking threshold marked."""
    plt = _pyplot()
    arms = [arm for arm, runs in groups.items() if any(run.forking for run in runs)]
    if not arms:
        return False
    figure, axes = plt.subplots(1, len(arms), figsize=(5.5 * len(arms), 3.8), squeeze=False)
    for axis, arm in zip(axes.flat, arms, strict=True):
        runs = [run for run in groups[arm] if run.forking]
        for phase, pick, metric_pick in (("early", 0, 0), ("late", -1, -1)):
            edges, counts = None, None
            for run in runs:
                histogram = run.forking[pick].get("entropy_histogram")
                if not histogram:
                    continue
                edges = histogram["edges"]
                counts = (
                    histogram["counts"]
                    if counts is None
                    else [a + b for a, b in zip(counts, histogram["counts"], strict=True)]
                )
            if counts is None:
                continue
            total = max(sum(counts), 1)
            axis.stairs([c / total for c in counts], edges, label=f"{phase} (step {runs[0].forking[pick]['step']})")
            thresholds = [run.series("forking/threshold")[1] for run in runs]
            thresholds = [t[metric_pick] for t in thresholds if t]
            if thresholds:
                axis.axvline(
                    statistics.fmean(thresholds),
                    linestyle="--",
                    color="C1" if phase == "late" else "C0",
                    label=f"{phase} forking threshold {statistics.fmean(thresholds):.2g}",
                )
        axis.set_xscale("log")
        axis.set_xlabel("token entropy (nats, log scale)")
        axis.set_ylabel("share of completion tokens")
        axis.set_title(f"{arm}: completion-token entropy")
        axis.legend(fontsize=7)
    _save_figure(plt, figure, path)
    return True


def plot_expert_load(groups: dict[str, list[Run]], path: Path) -> bool:
    """Per-layer expert load on forking vs other tokens (last logging step, first seed of each arm)."""
    plt = _pyplot()
    arms = [arm for arm, runs in groups.items() if any(run.routing for run in runs)]
    if not arms:
        return False
    figure, axes = plt.subplots(len(arms), 2, figsize=(11, 2.8 * len(arms) + 1), squeeze=False)
    for row, arm in enumerate(arms):
        run = next(run for run in groups[arm] if run.routing)
        loads = run.routing[-1]["expert_load"]
        top = max((max(map(max, loads[kind])) for kind in ("forking", "other") if kind in loads), default=1.0)
        for column, kind in enumerate(("forking", "other")):
            axis = axes[row][column]
            if kind not in loads:
                axis.axis("off")
                continue
            title = f"{arm} seed {run.seed}: {kind} tokens (step {run.routing[-1]['step']})"
            _load_heatmap(figure, axis, loads[kind], title, top, "share of assignments")
    _save_figure(plt, figure, path)
    return True


def plot_domain_routing(groups: dict[str, list[Run]], path: Path) -> bool:
    """Per-layer expert load of each domain's solution tokens after RL (first seed of each arm)."""
    plt = _pyplot()
    arms = [arm for arm, runs in groups.items() if any((run.domain_routing or {}).get("after") for run in runs)]
    if not arms:
        return False
    domains = next(run.domain_routing["after"]["domains"] for run in groups[arms[0]] if run.domain_routing)
    figure, axes = plt.subplots(
        len(arms), len(domains), figsize=(4.2 * len(domains), 2.2 * len(arms) + 1), squeeze=False
    )
    for row, arm in enumerate(arms):
        run = next(run for run in groups[arm] if (run.domain_routing or {}).get("after"))
        after = run.domain_routing["after"]
        for column, domain in enumerate(domains):
            axis = axes[row][column]
            loads = [layer["loads"].get(domain) for layer in after["layers"]]
            if any(load is None for load in loads):
                axis.axis("off")
                continue
            _load_heatmap(figure, axis, loads, f"{arm}: {domain} tokens", 1.0, "share")
    _save_figure(plt, figure, path)
    return True


def domain_sections(groups: dict[str, list[Run]], compare_dirs: list[Path]) -> list[str]:
    """Markdown for multi-domain runs: starting policies, per-domain accuracy and routing (empty otherwise)."""
    lines: list[str] = []
    for directory in compare_dirs:
        record = directory / "policies" / "policies.json"
        if record.exists():
            built = json.loads(record.read_text())
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
    if tuned and compare_dirs:
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
                before = _mean_std(
                    [
                        ((run.summary.get("eval_before") or {}).get("by_group") or {})
                        .get(domain, {})
                        .get("greedy_accuracy", math.nan)
                        for run in runs
                    ]
                )[0]
                after = _mean_std([run.summary["eval_after"]["by_group"][domain]["greedy_accuracy"] for run in runs])[0]
                sampled = _mean_std(
                    [run.summary["eval_after"]["by_group"][domain]["sampled_accuracy"] for run in runs]
                )[0]
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
            before = _mean_std(
                [(run.domain_routing.get("before") or {}).get("mean_js_bits", math.nan) for run in runs]
            )[0]
            after = _mean_std([run.domain_routing["after"]["mean_js_bits"] for run in runs])[0]
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


# --------------------------------------------------------------------------------------------------
# The report


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by arm, the full arm first."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r.arm != "full", r.arm, r.seed)):
        groups[run.arm].append(run)
    return groups


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


def summary_markdown(paths: list[Path]) -> str:
    """The summary table of the runs under ``paths``, as printed at the end of ``rlvr compare``."""
    runs, _ = find_runs(paths)
    return "\n".join(summary_lines(group_runs(runs))) + "\n"


# (file, panels, figure title) of the curve figures: one panel per (metric key, label)
CURVE_PANELS = [
    (
        "accuracy.png",
        "Held-out accuracy vs training step (mean ± std over seeds)",
        [("eval/greedy_accuracy", "greedy accuracy"), ("eval/sampled_accuracy", "sampled accuracy")],
    ),
    (
        "training.png",
        "Training curves",
        [
            ("reward", "reward"),
            ("kl", "KL to reference"),
            ("clip_ratio/region_mean", "clip fraction"),
            ("entropy", "mean token entropy (nats)"),
        ],
    ),
    (
        "routing.png",
        "Routing on forking vs other tokens",
        [("moe/specialization_js", "routing specialisation (JS, bits)"), ("moe/routing_drift", "routing drift")],
    ),
]


def _curves(name: str):
    _, title, panels = next(entry for entry in CURVE_PANELS if entry[0] == name)
    return lambda groups, path: plot_curves(groups, panels, path, title)


# The report's figures, in order: (file, section title, draw(groups, path) -> drawn?)
FIGURES = [
    ("accuracy.png", "Eval accuracy", _curves("accuracy.png")),
    ("training.png", "Reward, KL, clipping and entropy", _curves("training.png")),
    ("entropy.png", "Completion-token entropy, early vs late", plot_entropy),
    ("expert_load.png", "Expert load per layer: forking vs other tokens", plot_expert_load),
    ("routing.png", "Routing specialisation and drift", _curves("routing.png")),
    ("domain_routing.png", "Expert load per layer of each domain's tokens, after RL", plot_domain_routing),
]


def write_report(paths: list[Path], out_dir: Path | None = None) -> Path:
    runs, missing = find_runs(paths)
    out_dir = out_dir or paths[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    lines = ["# rlvr report", ""]
    lines.append(f"Runs: {len(runs)} ({', '.join(f'{arm} x{len(rs)}' for arm, rs in groups.items()) or 'none'}).")
    if missing:
        lines += ["", f"**Missing runs ({len(missing)})**, not in the tables or figures:", *[f"- {m}" for m in missing]]
    lines += ["", "## Summary", "", *summary_lines(groups)]
    figures = []
    for name, title, draw in FIGURES:
        if draw(groups, out_dir / name):
            figures.append((title, name))
    lines += domain_sections(groups, [path for path in paths if (path / MANIFEST).exists()])
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
