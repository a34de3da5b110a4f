"""The report's figures (matplotlib, written as PNG): which exist is the table :data:`FIGURES`."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from rlvr.report.runs import DECODED_TOTAL, GENERATION_SECONDS_TOTAL, Run, cost_curve, mean_curve


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


def arm_colour(groups: dict[str, list[Run]], arm: str) -> str:
    """The arm's colour, the same in every panel and figure of a report (its place among the arms)."""
    return f"C{list(groups).index(arm) % 10}"


def _line_with_band(
    axis, xs: list[float], means: list[float], stds: list[float], label: str, colour: str | None = None
) -> None:
    """A mean curve with its ±1 std band over seeds."""
    (line,) = axis.plot(xs, means, marker="o" if len(xs) < 15 else None, label=label, color=colour)
    lows = [m - s for m, s in zip(means, stds, strict=True)]
    highs = [m + s for m, s in zip(means, stds, strict=True)]
    axis.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)


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
            _line_with_band(axis, steps, means, stds, f"{arm} (n={len(runs)})", arm_colour(groups, arm))
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


def plot_accuracy_against_cost(
    groups: dict[str, list[Run]], path: Path, total: str = DECODED_TOTAL, x_label: str = "", title: str = ""
) -> bool:
    """Greedy eval accuracy against what training spent by each eval, a logged running ``total`` (mean over
    seeds, ±1 std band): decoded completion tokens or generation seconds."""
    curves = {arm: cost_curve(runs, "eval/greedy_accuracy", total) for arm, runs in groups.items()}
    curves = {arm: curve for arm, curve in curves.items() if len(curve[0]) > 1}
    if not curves or all(max(curve[0]) == 0 for curve in curves.values()):
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for arm, (spent, means, stds) in curves.items():
        _line_with_band(axis, spent, means, stds, f"{arm} (n={len(groups[arm])})", arm_colour(groups, arm))
    axis.set_xlabel(x_label)
    axis.set_ylabel("greedy accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle(title)
    _save_figure(plt, figure, path)
    return True


def plot_accuracy_per_decoded_token(groups: dict[str, list[Run]], path: Path) -> bool:
    label, title = "completion tokens decoded for training (cumulative)", "Eval accuracy against decoded tokens"
    return plot_accuracy_against_cost(groups, path, DECODED_TOTAL, label, title)


def plot_accuracy_per_generation_second(groups: dict[str, list[Run]], path: Path) -> bool:
    label = "seconds spent generating training completions (cumulative, mean over ranks)"
    return plot_accuracy_against_cost(
        groups, path, GENERATION_SECONDS_TOTAL, label, "Eval accuracy against generation seconds"
    )


def plot_accuracy_against_entropy(groups: dict[str, list[Run]], path: Path) -> bool:
    """Each run's final greedy accuracy against its mean token entropy over the last quarter of training (one
    point per run, coloured by arm): does keeping entropy keep accuracy?"""
    points = {}
    for arm, runs in groups.items():
        for run in runs:
            steps, entropies = run.series("entropy")
            accuracy = (run.summary or {}).get("eval_after", {}).get("greedy_accuracy")
            if len(steps) < 2 or accuracy is None:
                continue
            late = [value for step, value in zip(steps, entropies, strict=True) if step > 0.75 * steps[-1]]
            points.setdefault(arm, []).append((sum(late) / len(late), float(accuracy)))
    if sum(len(values) for values in points.values()) < 2:
        return False
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 4.2))
    for arm, values in points.items():
        xs, ys = [x for x, _ in values], [y for _, y in values]
        axis.scatter(xs, ys, label=f"{arm} (n={len(values)})", color=arm_colour(groups, arm))
    axis.set_xlabel("mean token entropy, last quarter of training (nats)")
    axis.set_ylabel("greedy accuracy after RL")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.suptitle("Accuracy against entropy, one point per run")
    _save_figure(plt, figure, path)
    return True


def plot_entropy(groups: dict[str, list[Run]], path: Path) -> bool:
    """Log-scale histogram of completion-token entropy, early vs late, the arm's selection threshold marked."""
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
                    label=f"{phase} selection threshold {statistics.fmean(thresholds):.2g}",
                )
        axis.set_xscale("log")
        axis.set_xlabel("token entropy (nats, log scale)")
        axis.set_ylabel("share of completion tokens")
        axis.set_title(f"{arm}: completion-token entropy")
        axis.legend(fontsize=7)
    _save_figure(plt, figure, path)
    return True


def plot_expert_load(groups: dict[str, list[Run]], path: Path) -> bool:
    """Per-layer expert load on the arm's selected vs unselected tokens (last logging step, first seed of each
    arm; top arms select the forking tokens)."""
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
            label = {"forking": "selected", "other": "unselected"}[kind]  # top arms select the forking tokens
            title = f"{arm} seed {run.seed}: {label} tokens (step {run.routing[-1]['step']})"
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


# (file, panels, figure title) of the curve figures: one panel per (metric key, label)
OWN_SHARE_LINES = [  # (phase, key in each layer's record, label, colour, line style)
    ("before", "own_share", "start of RL, all tokens", "k", "--"),
    ("after", "own_share", "after RL, all tokens", "k", "-"),
    ("after", "own_share_forking", "after RL, forking tokens", "C3", "-"),
    ("after", "own_share_other", "after RL, other tokens", "C0", "-"),
]


def plot_own_share(init: str, groups: dict[str, list[Run]], path: Path) -> bool:
    """Per-layer own-expert share of one starting policy's runs, one panel per arm: start vs end of RL, and
    forking vs other tokens after RL (mean over runs, band = min..max over runs)."""
    arms = [
        arm
        for arm, runs in groups.items()
        if arm.startswith(f"{init}+") and any((run.domain_routing or {}).get("after") for run in runs)
    ]
    if not arms:
        return False
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(arms), figsize=(4.6 * len(arms), 3.4), squeeze=False, sharey=True)
    for axis, arm in zip(axes[0], arms, strict=True):
        runs = [run for run in groups[arm] if (run.domain_routing or {}).get("after")]
        layers = range(0)
        for phase, key, label, colour, line in OWN_SHARE_LINES:
            per_run = [
                [layer.get(key, math.nan) for layer in (run.domain_routing.get(phase) or {}).get("layers", [])]
                for run in runs
            ]
            per_run = [values for values in per_run if values and not any(math.isnan(v) for v in values)]
            if not per_run:
                continue
            layers = range(len(per_run[0]))
            means = [statistics.fmean(values[layer] for values in per_run) for layer in layers]
            axis.plot(list(layers), means, color=colour, linestyle=line, marker="o", label=label)
            axis.fill_between(
                list(layers),
                [min(values[layer] for values in per_run) for layer in layers],
                [max(values[layer] for values in per_run) for layer in layers],
                color=colour,
                alpha=0.12,
            )
        axis.set_title(f"{arm} ({len(runs)} runs)", fontsize=10)
        axis.set_xlabel("layer")
        axis.set_xticks(list(layers))
        axis.set_ylim(0.0, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("own-expert share")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    _save_figure(plt, figure, path)
    return True


def own_share_figures(groups: dict[str, list[Run]], out_dir: Path) -> list[tuple[str, str]]:
    """One figure per starting policy of an upcycling compare: ``(title, file name)`` of those drawn."""
    inits = list(dict.fromkeys(arm.split("+", 1)[0] for arm in groups if "+" in arm))
    drawn = []
    for init in inits:
        name = f"own_share_{init}.png"
        if plot_own_share(init, groups, out_dir / name):
            drawn.append((f"Own-expert share per layer: {init} (mean over runs, band: min to max)", name))
    return drawn


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
        "Routing on each arm's selected vs unselected tokens (top arms: the forking tokens)",
        [("moe/specialization_js", "routing specialisation (JS, bits)"), ("moe/routing_drift", "routing drift")],
    ),
    (
        "entropy_dynamics.png",
        "Entropy dynamics: the policy's token entropy, on the tokens each arm selects (top: the highest-entropy "
        "forking tokens; bottom: the lowest-entropy; random: a random share) and on the rest, and what the rules "
        "touched",
        [
            ("entropy", "mean token entropy (nats)"),
            ("forking/entropy_kept", "entropy of the arm's selected tokens"),
            ("forking/entropy_dropped", "entropy of its unselected tokens"),
            ("moe/router_entropy_forking", "router entropy, selected tokens"),
            ("moe/router_entropy_other", "router entropy, unselected tokens"),
            ("token_rules/touched_share", "share of tokens a token rule touched"),
        ],
    ),
    (
        "mismatch.png",
        "Training-inference mismatch of the sampled batches",
        [
            ("mismatch/router_flips", "router flips (share of token x layer decisions)"),
            ("mismatch/kl_k3", "per-token KL, sampler vs trainer (k3)"),
            ("mismatch/logp_diff_mean", "mean |log p_train - log p_sample|"),
            ("mismatch/is_dropped_sequences", "sequences dropped by IS masking"),
        ],
    ),
]


def _curves(name: str):
    _, title, panels = next(entry for entry in CURVE_PANELS if entry[0] == name)
    return lambda groups, path: plot_curves(groups, panels, path, title)


# The report's figures, in order: (file, section title, draw(groups, path) -> drawn?)
FIGURES = [
    ("accuracy.png", "Eval accuracy", _curves("accuracy.png")),
    ("accuracy_tokens.png", "Eval accuracy against decoded tokens", plot_accuracy_per_decoded_token),
    ("accuracy_seconds.png", "Eval accuracy against generation seconds", plot_accuracy_per_generation_second),
    ("training.png", "Reward, KL, clipping and entropy", _curves("training.png")),
    ("entropy.png", "Completion-token entropy, early vs late", plot_entropy),
    ("expert_load.png", "Expert load per layer: each arm's selected vs unselected tokens", plot_expert_load),
    ("routing.png", "Routing specialisation and drift", _curves("routing.png")),
    ("entropy_dynamics.png", "Entropy dynamics per arm", _curves("entropy_dynamics.png")),
    ("accuracy_entropy.png", "Accuracy against entropy", plot_accuracy_against_entropy),
    ("mismatch.png", "Training-inference mismatch over training", _curves("mismatch.png")),
    ("domain_routing.png", "Expert load per layer of each domain's tokens, after RL", plot_domain_routing),
]
