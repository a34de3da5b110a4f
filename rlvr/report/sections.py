"""The report's sections beyond the summary: per-domain routing of multi-domain compares (expert
specialisation before and after RL), and the training-inference mismatch of runs sampled by an engine of
their own. No torch, transformers or TRL."""

from __future__ import annotations

import math

from rlvr.report.cells import baseline_of, construction_clusters, fmt, interval_cell
from rlvr.report.intervals import Interval, mean_interval, paired_difference
from rlvr.report.runs import Run, mean_std


def routing_measure(runs: list[Run], key: str, phase: str) -> Interval:
    """Mean over runs of one per-domain routing measure (``before`` or ``after`` RL), with a bootstrap
    interval over runs (over construction seeds where the runs have them)."""
    measured = [run for run in runs if not math.isnan((run.domain_routing.get(phase) or {}).get(key, math.nan))]
    values = [[run.domain_routing[phase][key]] for run in measured]
    return (
        mean_interval(values, clusters=construction_clusters(measured))
        if values
        else Interval(math.nan, math.nan, math.nan)
    )


def domain_sections(groups: dict[str, list[Run]], starting_policies: list[dict]) -> list[str]:
    """Markdown for multi-domain runs: starting policies, per-domain accuracy and routing (empty otherwise)."""
    lines: list[str] = []
    if starting_policies:
        lines += [
            "",
            "## Starting policies",
            "",
            "Dense warm starts behind the upcycled MoEs, per construction seed (supervised; the seed stops at "
            "the first dev check reaching the target accuracy, each branch trains a fixed number of steps on its "
            "domain; dev accuracy on the branch's own domain).",
            "",
            "| construction seed | dense model | SFT steps | dev accuracy |",
            "|---|---|---|---|",
        ]
        for construction, built in starting_policies:
            lines += [
                f"| {construction} | {name} | {info['steps']} | {fmt(info['dev_accuracy'])} |"
                for name, info in built.items()
                if not name.startswith("routing_")
            ]
        as_built = [
            (construction, name[len("routing_") : -len("_as_built")], info)
            for construction, built in starting_policies
            for name, info in built.items()
            if name.startswith("routing_") and info
        ]
        if as_built:
            lines += [
                "",
                "Routing of each upcycled MoE as built (before any MoE training): JS between the domains' expert "
                "loads and the own-expert share (see Per-domain routing), means over layers.",
                "",
                "| construction seed | init | JS (bits) | own share |",
                "|---|---|---|---|",
            ]
            for construction, init, info in as_built:
                own = fmt(info.get("mean_own_share", math.nan))
                lines.append(f"| {construction} | {init} | {fmt(info['mean_js_bits'])} | {own} |")
    tuned = {
        arm: runs[0].summary["warm_start"]
        for arm, runs in groups.items()
        if runs and runs[0].summary and runs[0].summary.get("warm_start")
    }
    if tuned and starting_policies:  # runs of a compare
        lines += [
            "",
            "Supervised fine-tuning on the mixed task before RL (the run's warm start; mean over runs):",
            "",
            "| arm | SFT steps | dev accuracy |",
            "|---|---|---|",
        ]
        for arm, runs in groups.items():
            warm = [run.summary["warm_start"] for run in runs if run.summary and run.summary.get("warm_start")]
            if warm:
                steps = mean_std([float(info["steps"]) for info in warm])[0]
                accuracy = mean_std([info["dev_accuracy"] for info in warm])[0]
                lines.append(f"| {arm} | {fmt(steps, digits=0)} | {fmt(accuracy)} |")
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
                cells += [f"{fmt(before)} -> {fmt(after)}", fmt(sampled)]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    routed = {arm: [run for run in runs if (run.domain_routing or {}).get("after")] for arm, runs in groups.items()}
    routed = {arm: runs for arm, runs in routed.items() if runs}
    if routed:
        lines += [
            "",
            "## Per-domain routing",
            "",
            "Each domain's worked eval solutions, teacher-forced through the policy. JS = Jensen-Shannon divergence "
            "between the domains' expert loads (bits, mean over layers; 0 = routed alike, 1 = disjoint experts with "
            "two domains). Own share = share of a domain's tokens whose top-1 expert is the domain's own expert (the "
            "one-to-one domain -> expert matching that fits best), mean over domains and layers: with two domains "
            "and two experts 0.5 = routed alike, 1 = each domain wholly on its own expert. Forking / other: the same "
            "on the top-rho solution tokens by the policy's entropy and on the rest. Before = after the fine-tuning "
            "on the mix, at the start of RL. Mean over runs [95% bootstrap interval; runs built from one construction "
            "seed are resampled together].",
            "",
            "| arm | runs | JS before -> after (bits) | own share before -> after | after RL: forking / other |",
            "|---|---|---|---|---|",
        ]
        for arm, runs in routed.items():
            cells = [
                f"{interval_cell(routing_measure(runs, key, 'before'))} -> "
                f"{interval_cell(routing_measure(runs, key, 'after'))}"
                for key in ("mean_js_bits", "mean_own_share")
            ]
            cells.append(
                f"{interval_cell(routing_measure(runs, 'mean_own_share_forking', 'after'))} / "
                f"{interval_cell(routing_measure(runs, 'mean_own_share_other', 'after'))}"
            )
            lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
        verdicts = routing_verdict_lines(routed)
        if verdicts:
            lines += ["", "**Routing verdicts** (own share after RL, difference to the baseline, 95% interval):", ""]
            lines += [f"- {line}" for line in verdicts]
    return lines


def routing_verdict_lines(routed: dict[str, list[Run]], key: str = "mean_own_share") -> list[str]:
    """Per init+arm against sparse+arm: the difference of the mean own-expert share after RL, with a
    bootstrap interval over runs, in plain words."""
    lines = []
    for arm, runs in routed.items():
        baseline = baseline_of(arm, routed)
        if baseline is None or "+" not in arm:
            continue
        values = [[run.domain_routing["after"].get(key, math.nan)] for run in runs]
        reference = [[run.domain_routing["after"].get(key, math.nan)] for run in routed[baseline]]
        if [run.replicate for run in runs] != [run.replicate for run in routed[baseline]]:
            continue  # not the same construction and RL seeds: no pairing
        clusters = (
            None
            if construction_clusters(runs) is None
            else (construction_clusters(runs), construction_clusters(routed[baseline]))
        )
        difference = paired_difference(values, reference, clusters=clusters)
        if math.isnan(difference.estimate):
            continue
        finding = (
            f"higher than {baseline}"
            if difference.low > 0
            else f"lower than {baseline}"
            if difference.high < 0
            else "no detectable difference"
        )
        lines.append(f"{arm} vs {baseline}: {difference.format(signed=True)}, {finding}")
    return lines


MISMATCH_COLUMNS = [  # (logged key, column)
    ("mismatch/router_flips", "router flips"),
    ("mismatch/tokens_with_flip", "tokens with a flip"),
    ("mismatch/kl_k3", "KL (k3)"),
    ("mismatch/logp_diff_mean", "mean abs dlogp"),
    ("mismatch/ratio_above_2", "ratio > 2"),
    ("mismatch/is_dropped_sequences", "IS-dropped sequences"),
    ("mismatch/is_dropped_tokens", "IS-dropped tokens"),
]


def collapsed(run: Run, window: int = 5) -> bool:
    """Whether a run's training reward fell and did not recover: the mean of its last ``window`` logged
    rewards is below half its best ``window``-log mean and below its first."""
    _, rewards = run.series("reward")
    if len(rewards) < 2 * window:
        return False
    means = [sum(rewards[i : i + window]) / window for i in range(len(rewards) - window + 1)]
    return means[-1] < 0.5 * max(means) and means[-1] < means[0]


def mismatch_lines(groups: dict[str, list[Run]]) -> list[str]:
    """The mismatch table: per arm, each ``mismatch/*`` metric averaged over a run's logging steps (mean ±
    std over runs), and the runs that collapsed. Empty when no run sampled with an engine of its own."""
    columns = [
        (key, name) for key, name in MISMATCH_COLUMNS if any(r.series(key)[0] for rs in groups.values() for r in rs)
    ]
    if not columns:
        return []
    lines = [
        "",
        "## Training-inference mismatch",
        "",
        "Each training batch's sampler (engine) against the trainer, averaged over a run's logging steps, mean ± "
        "std over runs: router flips = share of (token, layer) decisions whose expert set differs between the "
        "engine and the trainer's own routers; tokens with a flip = share of completion tokens with a flip in "
        "any layer; KL (k3) = per-token KL of the sampler from the trainer, with the trainer's log-probs as "
        "training computes them (under routing replay: on the engine's experts); mean abs dlogp = mean |log "
        "p_train - log p_sample|; ratio > 2 = share of tokens with p_train / p_sample > 2; IS-dropped = share "
        "TRL's masking importance sampling gives no gradient; collapsed = runs whose training reward fell below "
        "half its best 5-log mean and below its first, and stayed there.",
        "",
        "| arm | " + " | ".join(name for _, name in columns) + " | collapsed |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for arm, runs in groups.items():
        cells = []
        for key, _ in columns:
            per_run = [sum(values) / len(values) for values in (run.series(key)[1] for run in runs) if values]
            mean, std = mean_std(per_run)
            cells.append(f"{mean:.3g} ± {std:.2g}" if per_run else "—")
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {sum(collapsed(run) for run in runs)}/{len(runs)} |")
    return lines
