"""The report's selective-rollouts section, on hand-made runs whose numbers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlvr.report.runs import Run

CONFIG = {"data": {"num_train": 96}, "grpo": {"per_device_train_batch_size": 64, "num_generations": 8}}  # 12 steps


def make_run(tmp_path, arm, seed, *, zero_variance, tokens_per_step, seconds_per_step, accuracies, prompts=None):
    """Logs at steps 6, 12, ..., 36 (three epochs of 12 steps); evals at 0, 12, 24, 36."""
    metrics = []
    for index, step in enumerate(range(6, 37, 6)):
        record = {
            "step": step,
            "frac_reward_zero_std": zero_variance[index],
            "rollout/decoded_tokens_total": tokens_per_step * step,
            "rollout/generation_seconds_total": seconds_per_step * step,
            "rollout/all_right_groups": [0.0, 0.1, 0.25, 0.25, 0.5, 0.5][index],
        }
        metrics.append(record | (prompts or {}))
    metrics += [{"step": step, "eval/greedy_accuracy": a} for step, a in zip((0, 12, 24, 36), accuracies, strict=True)]
    summary = {
        "decoded_tokens": tokens_per_step * 36,
        "generation_seconds": seconds_per_step * 36,
        "eval_after": {"greedy_accuracy": accuracies[-1]},
    }
    return Run(tmp_path / f"{arm}{seed}", arm, seed, summary, metrics=metrics, config=CONFIG)


def groups_of(tmp_path):
    rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # full: the zero-variance share grows by epoch
    full = [
        make_run(
            tmp_path,
            "full",
            seed,
            zero_variance=rising,
            tokens_per_step=100,
            seconds_per_step=2.0,
            accuracies=[0.2, 0.3, 0.4, 0.5],
        )
        for seed in (0, 1)
    ]
    dynamic_prompts = {"prompts/drawn": 16.0, "prompts/dropped": 8.0, "prompts/trained_zero_variance_share": 0.0}
    dynamic = [
        make_run(
            tmp_path,
            "dynamic",
            seed,
            zero_variance=[0.5] * 6,
            tokens_per_step=200,
            seconds_per_step=4.0,
            accuracies=[0.2, 0.5, 0.5, 0.5],
            prompts=dynamic_prompts,
        )
        for seed in (0, 1)
    ]
    skip_prompts = dynamic_prompts | {"prompts/drawn": 10.0, "prompts/dropped": 2.0, "prompts/skipped": 6.0}
    skip = [
        make_run(
            tmp_path,
            "skip_both",
            seed,
            zero_variance=[0.2] * 6,
            tokens_per_step=50,
            seconds_per_step=1.5,
            accuracies=[0.2, 0.4, 0.5, 0.6],
            prompts=skip_prompts | {"prompts/predictor_precision": 0.8, "prompts/predictor_recall": 0.5},
        )
        for seed in (0, 1)
    ]
    return {"full": full, "dynamic": dynamic, "skip_both": skip}


def test_zero_variance_share_per_epoch_buckets_log_rows_by_the_epoch_their_step_ends_in(tmp_path):
    from rlvr.report.prompts import steps_per_epoch, zero_variance_by_epoch

    groups = groups_of(tmp_path)
    assert steps_per_epoch(groups["full"][0]) == 12
    assert zero_variance_by_epoch(groups["full"]) == pytest.approx([0.15, 0.35, 0.55])
    assert zero_variance_by_epoch([Run(tmp_path, "x", 0, {}, metrics=groups["full"][0].metrics)]) == []  # no config


def test_costs_to_reach_fulls_final_accuracy_and_ratios(tmp_path):
    """full ends at 0.5 and first reaches it at step 36 (3600 tokens, 72 s); dynamic reaches it at step 12
    (2400 tokens, 48 s: 0.67x); skip_both at step 24 (1200 tokens, 36 s: 0.33x and 0.5x)."""
    from rlvr.report.prompts import cost_rows, selective_lines

    groups = groups_of(tmp_path)
    rows = {row["arm"]: row for row in cost_rows(groups)}
    assert (rows["full"]["reach_step"], rows["full"]["decoded_to_reach"], rows["full"]["seconds_to_reach"]) == (
        36,
        3600,
        72,
    )
    assert (rows["dynamic"]["reach_step"], rows["dynamic"]["decoded_to_reach"]) == (12, 2400)
    skip = rows["skip_both"]
    assert (skip["reach_step"], skip["decoded_to_reach"], skip["seconds_to_reach"]) == (24, 1200, 36)
    assert skip["sampled_per_step"] == 10 and skip["skipped_per_step"] == 6 and skip["precision"] == pytest.approx(0.8)
    assert math.isnan(rows["full"]["skipped_per_step"])
    text = "\n".join(selective_lines(groups))
    assert "| skip_both | 2 | 0.600 | 10.00 | 6.00 | 2.00 | 0.20 | 0.00 | 0.80 | 0.50 |" in text
    assert "1200 (0.33x) (0.50x)" in text  # decoded to reach: against full (3600) and dynamic (2400)
    assert "36.0 (0.50x) (0.75x)" in text  # seconds to reach: against full (72) and dynamic (48)
    assert "| full | 0.15 / 0.05 | 0.35 / 0.25 | 0.55 / 0.50 |" in text  # zero-variance / all-right


def test_no_section_without_selective_arms_and_the_seconds_figure(tmp_path):
    from rlvr.report.figures import plot_accuracy_per_generation_second
    from rlvr.report.prompts import selective_lines

    groups = groups_of(tmp_path)
    assert selective_lines({"full": groups["full"]}) == []
    assert plot_accuracy_per_generation_second(groups, tmp_path / "seconds.png")
    assert (tmp_path / "seconds.png").stat().st_size > 5000
    for runs in groups.values():  # runs that never logged generation seconds: no figure
        for run in runs:
            run.metrics = [{k: v for k, v in r.items() if k != "rollout/generation_seconds_total"} for r in run.metrics]
    assert not plot_accuracy_per_generation_second(groups, tmp_path / "none.png")


def test_an_arm_already_at_fulls_accuracy_before_rl_is_said_so(tmp_path):
    from rlvr.report.prompts import cost_rows, selective_lines

    groups = groups_of(tmp_path)
    for run in groups["skip_both"]:  # its accuracy before RL already is full's final 0.5
        run.metrics = [r | {"eval/greedy_accuracy": 0.5} if r.get("step") == 0 else r for r in run.metrics]
    skip = {row["arm"]: row for row in cost_rows(groups)}["skip_both"]
    assert skip["reach_step"] == 0 and math.isnan(skip["decoded_to_reach"])
    line = next(line for line in selective_lines(groups) if line.startswith("| skip_both |"))
    assert "| before RL |" in line


def test_skip_rate_against_pass_rate_from_the_per_prompt_record(tmp_path):
    """Two skip runs: always-solved prompts were skipped 3 times in 4 (6 of 8 candidacies), never-solved ones 1 in
    4, the one in between never; a prompt never sampled (skipped twice) is its own bucket."""
    from rlvr.report.prompts import prompt_figures, skip_by_pass_rate, skip_lines

    def row(prompt_id, pass_rate, sampled, skipped):
        return {"prompt_id": prompt_id, "pass_rate": pass_rate, "sampled": sampled, "skipped": skipped}

    groups = groups_of(tmp_path)
    groups["skip_both"][0].prompts = [row("a", 1.0, 1, 3), row("b", 0.0, 3, 1), row("c", 0.25, 4, 0)]
    groups["skip_both"][1].prompts = [row("a", 1.0, 1, 3), row("d", None, 0, 2)]
    buckets = skip_by_pass_rate(groups["skip_both"])
    assert buckets[0] == (1.0, 1) and buckets[1] == (0.25, 1) and buckets[2] == (0.0, 1)
    assert math.isnan(buckets[3][0]) and buckets[3][1] == 0 and buckets[4] == (0.75, 2)
    line = next(line for line in skip_lines(groups) if line.startswith("| skip_both |"))
    assert line == "| skip_both | 1.00 (1) | 0.25 (1) | 0.00 (1) | n/a (0) | 0.75 (2) |"
    assert not any(line.startswith("| full |") for line in skip_lines(groups))  # it skipped nothing
    assert prompt_figures(groups, tmp_path) == [
        ("Skip rate against pass rate, one point per sampled prompt and run", "skip_pass_rate.png")
    ]
    assert (tmp_path / "skip_pass_rate.png").stat().st_size > 5000
