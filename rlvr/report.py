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
from rlvr.report_figures import CURVE_PANELS, FIGURES, own_share_figures, split_panels
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


def baseline_of(arm: str, groups: dict[str, list[Run]]) -> str | None:
    """The arm a row is compared with: ``full`` for the plain arms; ``sparse+<arm>`` for the other starting
    policies of an upcycling compare (compute-matched sparse upcycling is the control BTX must beat)."""
    if "+" in arm:
        init, plain = arm.split("+", 1)
        baseline = f"sparse+{plain}"
        return baseline if init != "sparse" and baseline in groups else None
    return "full" if arm != "full" and "full" in groups else None


def _clusters(runs: list[Run]) -> list | None:
    """The construction seed of each run, where runs come from built starting policies: runs sharing one
    are resampled together (rlvr.bootstrap); None for plain compares (each run is its own draw)."""
    constructions = [run.construction for run in runs]
    return None if any(construction is None for construction in constructions) else constructions


def _mean_summary(runs: list[Run], key: str) -> float:
    """Mean over runs of a number in their summaries (NaN where none has it)."""
    values = [run.summary.get(key) for run in runs]
    return mean_std([math.nan if value is None else float(value) for value in values])[0]


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
        clusters = _clusters(finished)
        versus_greedy = versus_sampled = reach = None
        token_share = decoded_share = decoded_to_reach = reach_share = math.nan
        decoded = _mean_summary(finished, "decoded_tokens")
        if baseline is not None:
            reference = _finished(groups[baseline])
            paired = [run.replicate for run in finished] == [run.replicate for run in reference]
            reference_greedy = _per_problem(reference, "greedy_correct")
            reference_sampled = _per_problem(reference, "sampled_correct")
            pairs = None if clusters is None else (clusters, _clusters(reference))
            if paired and greedy and reference_greedy:
                versus_greedy = paired_difference(greedy, reference_greedy, clusters=pairs)
            if paired and sampled and reference_sampled:
                versus_sampled = paired_difference(sampled, reference_sampled, clusters=pairs)
            final = mean_interval(reference_greedy, clusters=_clusters(reference))
            if reference_greedy and not math.isnan(final.low):
                reach_step = _reach_step(finished, final.low)
                reach = "no" if reach_step is None else reach_step
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
            clusters = None if _clusters(runs) is None else (_clusters(runs), _clusters(reference))
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


def _routing_measure(runs: list[Run], key: str, phase: str) -> Interval:
    """Mean over runs of one per-domain routing measure (``before`` or ``after`` RL), with a bootstrap
    interval over runs (over construction seeds where the runs have them)."""
    measured = [run for run in runs if not math.isnan((run.domain_routing.get(phase) or {}).get(key, math.nan))]
    values = [[run.domain_routing[phase][key]] for run in measured]
    return mean_interval(values, clusters=_clusters(measured)) if values else Interval(math.nan, math.nan, math.nan)


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
                f"| {construction} | {name} | {info['steps']} | {_fmt(info['dev_accuracy'])} |"
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
                own = _fmt(info.get("mean_own_share", math.nan))
                lines.append(f"| {construction} | {init} | {_fmt(info['mean_js_bits'])} | {own} |")
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
                lines.append(f"| {arm} | {_fmt(steps, digits=0)} | {_fmt(accuracy)} |")
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
                f"{_interval_cell(_routing_measure(runs, key, 'before'))} -> "
                f"{_interval_cell(_routing_measure(runs, key, 'after'))}"
                for key in ("mean_js_bits", "mean_own_share")
            ]
            cells.append(
                f"{_interval_cell(_routing_measure(runs, 'mean_own_share_forking', 'after'))} / "
                f"{_interval_cell(_routing_measure(runs, 'mean_own_share_other', 'after'))}"
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
        clusters = None if _clusters(runs) is None else (_clusters(runs), _clusters(routed[baseline]))
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


def _interval_cell(interval: Interval) -> str:
    if math.isnan(interval.low):
        return _fmt(interval.estimate)
    return interval.format()


def summary_lines(groups: dict[str, list[Run]], contrasts: list[tuple[str, str]] | None = None) -> list[str]:
    """The summary table (markdown lines) with its legend, then the verdict lines (and those of the
    compare's ``contrasts``)."""
    lines = [
        "Eval accuracy after RL: mean over runs x eval problems with a 95% bootstrap interval (problems and "
        "runs resampled; runs built from one construction seed are resampled together); baseline = the arm "
        "each row is compared with (full; sparse+<arm> for the other starting policies of an upcycling compare); "
        "vs baseline = paired difference on the same problems and "
        "seeds; best = best mean greedy accuracy of any eval during training; reaches baseline = first eval step "
        "where the arm's mean greedy accuracy is inside the baseline's final interval; seeds = RL seeds (cC/sS: "
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
            f"| {row['arm']} | {row['seeds']} | {_interval_cell(row['greedy'])} | {_interval_cell(row['sampled'])} | "
            f"{row['baseline'] or '—'} | {versus} | {_fmt(*row['best'])} | {reach} | "
            f"{_fmt(row['gradient_tokens'], digits=0)} | {_fmt(row['decoded_tokens'], digits=0)} | "
            f"{_reach_cell(row)} | {_fmt(row['train_seconds'], digits=0)} |"
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


def _reach_cell(row: dict) -> str:
    if math.isnan(row["decoded_to_reach"]):
        return "—"
    share = row["decoded_to_reach_share"]
    return _fmt(row["decoded_to_reach"], digits=0) + ("" if math.isnan(share) else f" ({share:.2f}x)")


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
    lines += mismatch_lines(groups)
    lines += domain_sections(groups, records.starting_policies)
    figures += own_share_figures(groups, out_dir)
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
