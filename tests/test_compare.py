"""rlvr compare and rlvr report: real runs, real numbers in the tables, determinism, resume."""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest

from rlvr.cli.main import CONFIG_DIR, main
from rlvr.experiment.compare import plan_runs, run_compare
from rlvr.report.summary import write_report
from rlvr.run.evaluation import pass_at_k

COMPARE_CONFIG = str(CONFIG_DIR / "compare" / "quickstart.yaml")
TINY = [
    "model.tiny.num_layers=1",
    "model.tiny.hidden_size=32",
    "model.tiny.expert_size=32",
    "model.tiny.num_experts=4",
    "data.num_train=64",
    "data.num_eval=8",
    "eval.every=2",
    "eval.sampled_completions=2",
    "eval.pass_k=2",
    "warm_start.max_steps=4",
    "warm_start.eval_every=2",
    "warm_start.num_dev=8",
    "grpo.max_steps=4",
    "grpo.logging_steps=1",
    "grpo.per_device_train_batch_size=8",
    "grpo.num_generations=4",
    "grpo.max_completion_length=16",
    "grpo.disable_tqdm=true",
]
TIMING_KEYS = re.compile(r"step_time|runtime|per_second|seconds")


def tiny_overrides(tmp_path, name="compare"):
    return [*TINY, f"output_dir={tmp_path / name}", f"warm_start.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One real compare: arms full and forking, seed 0."""
    tmp_path = tmp_path_factory.mktemp("compare")
    assert (
        main(
            ["compare", "--config", COMPARE_CONFIG, "--arms", "full,forking", "--seeds", "0", *tiny_overrides(tmp_path)]
        )
        == 0
    )
    return tmp_path / "compare"


def _table_row(report: str, arm: str) -> list[str]:
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells and cells[0] == arm and len(cells) == 12:
            return cells
    raise AssertionError(f"no summary row for {arm}")


def test_report_tables_hold_the_runs_numbers(compared):
    report = (compared / "report.md").read_text()
    for arm in ("full", "forking"):
        summary = json.loads((compared / f"{arm}-seed0" / "summary.json").read_text())
        cells = _table_row(report, arm)
        assert cells[1] == "0"
        assert cells[2].startswith(f"{summary['eval_after']['greedy_accuracy']:.3f} [")  # mean [95% interval]
        assert cells[3].startswith(f"{summary['eval_after']['sampled_accuracy']:.3f} [")
        assert len(summary["eval_after"]["greedy_correct"]) == summary["eval_after"]["num_problems"] == 8
        assert cells[8] == f"{summary['gradient_tokens']:.0f}"
        assert summary["decoded_tokens"] > 0 and cells[9] == f"{summary['decoded_tokens']:.0f}"
        assert cells[4] == ("—" if arm == "full" else "full")  # the baseline
        assert summary["arm"] == arm and summary["steps"] == 4
    full = json.loads((compared / "full-seed0" / "summary.json").read_text())["gradient_tokens"]
    forking = json.loads((compared / "forking-seed0" / "summary.json").read_text())["gradient_tokens"]
    assert 0.15 * full < forking < 0.35 * full  # about rho of the tokens carry gradient
    full_after = json.loads((compared / "full-seed0" / "summary.json").read_text())["eval_after"]
    forking_after = json.loads((compared / "forking-seed0" / "summary.json").read_text())["eval_after"]
    difference = forking_after["greedy_accuracy"] - full_after["greedy_accuracy"]
    assert _table_row(report, "forking")[5].startswith(f"{difference:+.3f} [")  # paired difference to full
    assert f"- forking vs full: {difference:+.3f} [" in report and "of the gradient tokens" in report
    for figure in ("accuracy.png", "training.png", "entropy.png", "expert_load.png", "routing.png"):
        assert (compared / figure).stat().st_size > 5000, figure


def test_eval_runs_at_the_configured_interval_with_pass_at_k(compared):
    records = [json.loads(line) for line in (compared / "full-seed0" / "metrics.jsonl").read_text().splitlines()]
    evals = [record for record in records if "eval/greedy_accuracy" in record]
    assert [record["step"] for record in evals] == [0, 2, 4]
    assert all(0.0 <= record["eval/pass@2"] <= 1.0 for record in evals)


def test_compare_resumes_without_rerunning_finished_runs(compared, tmp_path):
    output_dir, runs = plan_runs([COMPARE_CONFIG], tiny_overrides(compared.parent), ["full", "forking"], [0])
    assert output_dir == compared and all(run.finished for run in runs)
    (runs[1].directory / "summary.json").unlink()  # as if the forking run had been interrupted
    trained = []
    run_compare(output_dir, runs, train_fn=lambda config: trained.append((config.arm, config.seed)), say=lambda _: None)
    assert trained == [("forking", 0)]


def test_report_names_missing_runs(compared, tmp_path):
    manifest = json.loads((compared / "compare.json").read_text())
    manifest["runs"].append({"arm": "random", "seed": 0, "directory": "random-seed0"})
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "compare.json").write_text(json.dumps(manifest))
    for run in ("full-seed0",):
        (partial / run).symlink_to(compared / run)
    text = write_report([partial]).read_text()
    assert "**Missing runs (2)**" in text and "random seed 0" in text and "forking seed 0" in text
    assert _table_row(text, "full")[2] != "n/a"


def test_identical_seeds_and_configs_give_identical_metrics(tmp_path):
    def run(name):
        overrides = [*TINY, f"output_dir={tmp_path / name}", f"warm_start.cache_dir={tmp_path / 'cache'}"]
        assert main(["quickstart", "--arm", "forking", *overrides]) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not TIMING_KEYS.search(k)} for line in lines]

    first, second = run("a"), run("b")
    assert len(first) > 4 and first == second


def test_compare_rejects_unknown_arms_and_bad_seeds(capsys, tmp_path):
    assert main(["compare", "--config", COMPARE_CONFIG, "--arms", "full,best", *tiny_overrides(tmp_path)]) == 2
    assert "compare.arms: unknown arm 'best'" in capsys.readouterr().err
    assert main(["compare", "--config", COMPARE_CONFIG, "--seeds", "0,x", *tiny_overrides(tmp_path)]) == 2
    assert "--seeds: expected comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("n, c, k", [(4, 0, 1), (4, 1, 1), (4, 2, 2), (5, 3, 4), (8, 8, 3), (6, 1, 6)])
def test_pass_at_k_matches_brute_force(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    expected = sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected)
    with pytest.raises(ValueError):
        pass_at_k(n, c, n + 1)


def test_decoded_tokens_to_reach_the_baseline_and_the_accuracy_per_token_figure(tmp_path):
    """Hand-made runs: the tree arm enters full's final interval at step 20 having decoded 300 tokens;
    full enters it at step 30 (its last eval) having decoded 900: 300 / 900 = 0.33x."""
    from rlvr.report.figures import plot_accuracy_per_decoded_token
    from rlvr.report.runs import Run
    from rlvr.report.summary import summary_rows

    def run(arm, seed, accuracies, per_step, correct):
        metrics = [{"step": step, "rollout/decoded_tokens_total": per_step * step} for step in (10, 20, 30)]
        metrics += [
            {"step": step, "eval/greedy_accuracy": a} for step, a in zip((0, 10, 20, 30), accuracies, strict=True)
        ]
        after = {"greedy_accuracy": accuracies[-1], "sampled_accuracy": 0.0, "greedy_correct": correct}
        summary = {"decoded_tokens": per_step * 30, "gradient_tokens": 100, "eval_after": after}
        return Run(tmp_path / f"{arm}{seed}", arm, seed, summary, metrics=metrics)

    correct = [1.0] * 6 + [0.0] * 4  # 0.6 on every seed; full is below its final interval until step 30
    groups = {
        "full": [run("full", seed, [0.0, 0.1, 0.1, 0.6], 30, correct) for seed in (0, 1)],
        "tree": [run("tree", seed, [0.0, 0.1, 0.6, 0.6], 15, correct) for seed in (0, 1)],
    }
    rows = {row["arm"]: row for row in summary_rows(groups)}
    tree = rows["tree"]
    assert tree["reaches_baseline"] == 20 and tree["decoded_to_reach"] == 300
    assert tree["decoded_to_reach_share"] == pytest.approx(300 / 900)
    assert tree["decoded_share"] == pytest.approx(0.5) and tree["decoded_tokens"] == 450
    assert plot_accuracy_per_decoded_token(groups, tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").stat().st_size > 5000
    for group in groups.values():  # runs that never logged decoded tokens: no figure, no ratio
        for member in group:
            member.metrics = [r for r in member.metrics if "rollout/decoded_tokens_total" not in r]
    assert not plot_accuracy_per_decoded_token(groups, tmp_path / "none.png")
    assert math.isnan({row["arm"]: row for row in summary_rows(groups)}["tree"]["decoded_to_reach"])


def test_an_arm_starting_inside_the_baselines_interval_cannot_tell_not_reaches_at_zero(tmp_path):
    """An arm whose accuracy before RL already lies inside the baseline's final interval "reached" it at step 0
    with 0 tokens decoded: the table said "reaches baseline 0", which reads as matching full for free."""
    from rlvr.report.runs import Run
    from rlvr.report.summary import STARTS_INSIDE, summary_lines, summary_rows

    def run(arm, seed, accuracies):
        metrics = [{"step": step, "rollout/decoded_tokens_total": 10 * step} for step in (10, 20)]
        metrics += [{"step": step, "eval/greedy_accuracy": a} for step, a in zip((0, 10, 20), accuracies, strict=True)]
        correct = [1.0] * 5 + [0.0] * 5
        after = {"greedy_accuracy": accuracies[-1], "sampled_accuracy": 0.0, "greedy_correct": correct}
        return Run(tmp_path / f"{arm}{seed}", arm, seed, {"decoded_tokens": 200, "eval_after": after}, metrics=metrics)

    groups = {
        "full": [run("full", seed, [0.1, 0.3, 0.5]) for seed in (0, 1)],
        "bottom": [run("bottom", seed, [0.45, 0.5, 0.5]) for seed in (0, 1)],  # inside full's final interval
        "forking": [run("forking", seed, [0.1, 0.5, 0.5]) for seed in (0, 1)],
    }
    rows = {row["arm"]: row for row in summary_rows(groups)}
    assert rows["bottom"]["reaches_baseline"] == STARTS_INSIDE and math.isnan(rows["bottom"]["decoded_to_reach"])
    assert rows["forking"]["reaches_baseline"] == 10 and rows["forking"]["decoded_to_reach"] == 100
    table = "\n".join(summary_lines(groups))
    bottom_line = next(line for line in table.splitlines() if line.startswith("| bottom |"))
    assert "cannot tell (starts inside)" in bottom_line and "| 0 |" not in bottom_line


def test_contrasts_pair_two_arms_in_the_report(tmp_path):
    """compare.contrasts adds verdicts for arm pairs other than "vs full": the manifest carries them, the
    report pairs the arms' per-problem results; pairs with an arm that did not run are left out."""
    from rlvr.experiment.compare import CompareConfig
    from rlvr.report.runs import Run
    from rlvr.report.summary import summary_lines

    def run(arm, seed, correct, decoded):
        after = {"greedy_accuracy": sum(correct) / len(correct), "sampled_accuracy": 0.0}
        after |= {"greedy_correct": correct, "sampled_correct": correct}
        summary = {"decoded_tokens": decoded, "gradient_tokens": 100, "eval_after": after}
        return Run(tmp_path / f"{arm}{seed}", arm, seed, summary)

    better, worse = [1.0] * 30 + [0.0] * 10, [1.0] * 10 + [0.0] * 30
    groups = {
        "full": [run("full", seed, worse, 300) for seed in (0, 1)],
        "tree": [run("tree", seed, better, 150) for seed in (0, 1)],
        "full_g6": [run("full_g6", seed, worse, 150) for seed in (0, 1)],
    }
    settings = CompareConfig(contrasts=["tree:full_g6", "tree_treerl:tree"])
    settings.validate()
    pairs = settings.contrast_pairs(list(groups))
    assert pairs == [("tree", "full_g6")]  # tree_treerl did not run
    text = "\n".join(summary_lines(groups, pairs))
    assert "**Contrasts**" in text
    assert "- tree vs full_g6: +0.500 [" in text and "better than full_g6" in text
    assert "100% of the gradient tokens and 100% of the decoded tokens" in text
    assert "(sampled) tree vs full_g6: +0.500" in text
    assert "**Contrasts**" not in "\n".join(summary_lines(groups, []))
    # the manifest carries the contrasts to the report
    from rlvr.experiment.compare import ExperimentConfig, PlannedRun, write_manifest
    from rlvr.report.runs import CompareRecords

    config = ExperimentConfig()
    config.compare.contrasts = ["tree:full", "tree:full_g6"]
    planned = [PlannedRun(arm, 0, tmp_path / "m" / f"{arm}-seed0", config) for arm in ("full", "tree")]
    write_manifest(tmp_path / "m", planned)
    assert CompareRecords.load([tmp_path / "m"]).contrasts == [("tree", "full")]


def test_mismatch_table_averages_each_runs_metrics_and_counts_collapsed_runs(tmp_path):
    """Hand-made runs: the table's cells are the mean over runs of each run's mean over logging steps; a run
    whose reward falls to a quarter of its best and stays there counts as collapsed, a dip that recovers
    does not; runs without an engine add no section."""
    from rlvr.report.figures import plot_curves
    from rlvr.report.runs import Run
    from rlvr.report.summary import collapsed, mismatch_lines

    def run(arm, seed, flips, rewards):
        metrics = [{"step": 5 * (i + 1), "mismatch/router_flips": f} for i, f in enumerate(flips)]
        metrics += [{"step": 5 * (i + 1), "reward": r} for i, r in enumerate(rewards)]
        return Run(tmp_path / f"{arm}{seed}", arm, seed, {}, metrics=metrics)

    steady = [0.4] * 5 + [0.6] * 10
    dip = [0.4] * 5 + [0.1] * 5 + [0.6] * 5
    fall = [0.4] * 5 + [0.8] * 5 + [0.1] * 5
    groups = {
        "full": [run("full", 0, [0.1, 0.3], fall), run("full", 1, [0.2, 0.2], steady)],
        "replay": [run("replay", 0, [0.1, 0.1], dip), run("replay", 1, [0.1, 0.1], steady)],
    }
    assert collapsed(groups["full"][0]) and not collapsed(groups["full"][1]) and not collapsed(groups["replay"][0])
    text = "\n".join(mismatch_lines(groups))
    assert "| full | 0.2 ± 0 | 1/2 |" in text and "| replay | 0.1 ± 0 | 0/2 |" in text
    assert "| arm | router flips | collapsed |" in text  # columns only for what was logged
    from rlvr.report.figures import CURVE_PANELS

    panels = next(entry[2] for entry in CURVE_PANELS if entry[0] == "mismatch.png")
    assert plot_curves(groups, panels, tmp_path / "mismatch.png", "mismatch")
    for runs in groups.values():
        for member in runs:
            member.metrics = [r for r in member.metrics if "mismatch/router_flips" not in r]
    assert mismatch_lines(groups) == []


def test_entropy_figures_draw_per_arm_and_skip_runs_without_entropy(tmp_path):
    """The entropy-dynamics panels and accuracy against late entropy (one point per run); nothing is drawn
    from runs that logged no entropy."""
    from rlvr.report.figures import FIGURES, plot_accuracy_against_entropy
    from rlvr.report.runs import Run

    def run(arm, seed, entropy_end, accuracy):
        metrics = [
            {"step": step, "entropy": 0.2 - (0.2 - entropy_end) * step / 40, "forking/entropy_kept": 0.8}
            for step in (10, 20, 30, 40)
        ]
        return Run(tmp_path / f"{arm}{seed}", arm, seed, {"eval_after": {"greedy_accuracy": accuracy}}, metrics=metrics)

    groups = {
        "full": [run("full", s, 0.10, 0.4) for s in (0, 1)],
        "clip_cov": [run("clip_cov", s, 0.18, 0.45) for s in (0, 1)],
    }
    assert plot_accuracy_against_entropy(groups, tmp_path / "accuracy_entropy.png")
    assert (tmp_path / "accuracy_entropy.png").stat().st_size > 5000
    draw = dict((name, draw) for name, _, draw in FIGURES)["entropy_dynamics.png"]
    assert draw(groups, tmp_path / "dynamics.png")
    for runs in groups.values():
        for member in runs:
            member.metrics = []
    assert not plot_accuracy_against_entropy(groups, tmp_path / "none.png")


def test_an_arm_keeps_its_colour_in_every_panel(tmp_path, monkeypatch):
    """A panel where the first arm logged nothing (a token rule's share) still draws the second arm in the
    second arm's colour."""
    from rlvr.report import figures as report_figures
    from rlvr.report.runs import Run

    def run(arm, metrics):
        return Run(tmp_path / arm, arm, 0, {"eval_after": {"greedy_accuracy": 0.5}}, metrics=metrics)

    groups = {
        "full": [run("full", [{"step": s, "entropy": 0.2 - s / 100} for s in (10, 20)])],
        "clip_cov": [
            run(
                "clip_cov",
                [{"step": s, "entropy": 0.3 - s / 100, "token_rules/touched_share": s / 1e3} for s in (10, 20)],
            )
        ],
    }
    figures = []
    monkeypatch.setattr(report_figures, "_save_figure", lambda plt, figure, path: figures.append(figure))
    panels = [("entropy", "entropy"), ("token_rules/touched_share", "touched")]
    assert report_figures.plot_curves(groups, panels, tmp_path / "x.png", "x")
    colours = {
        line.get_label().split(" ")[0]: line.get_color() for axis in figures[0].axes for line in axis.get_lines()
    }
    by_panel = [[line.get_color() for line in axis.get_lines()] for axis in figures[0].axes[:2]]
    assert colours == {"full": "C0", "clip_cov": "C1"} and by_panel == [["C0", "C1"], ["C1"]]


def test_panels_of_selection_dependent_metrics_say_they_are_each_arms_selected_tokens():
    """forking/entropy_kept and moe/router_entropy_forking are measured on the tokens an arm selects: the
    highest-entropy ones for top arms, the lowest for bottom, a random share for random. Labelled "forking
    tokens", the panels compared different token sets under one name."""
    from rlvr.report.figures import CURVE_PANELS, FIGURES

    selection_dependent = {"forking/entropy_kept", "forking/entropy_dropped", "moe/router_entropy_forking"}
    labels = {key: label for _, _, panels in CURVE_PANELS for key, label in panels if key in selection_dependent}
    assert set(labels) == selection_dependent
    assert all("selected" in label and "forking" not in label for label in labels.values()), labels
    titles = {name: title for name, title, _ in FIGURES}
    assert "selected" in titles["expert_load.png"] and "forking vs other" not in titles["expert_load.png"]
