"""The report's adapters section, on hand-made runs whose numbers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from rlvr.report.adapters import adapter_lines, adapter_rows, routing_shift, total_variation
from rlvr.report.runs import Run


def make_run(tmp_path, arm, seed, method, trainable, loads, entropies=(1.0, 2.0)):
    """``loads``: per logging window, the forking-token expert loads of two layers over two experts."""
    routing = [
        {"step": 10 * (i + 1), "expert_load": {"forking": window, "other": [[0.5, 0.5], [0.5, 0.5]]}}
        for i, window in enumerate(loads)
    ]
    metrics = [
        {"step": 10 * (i + 1), "moe/router_entropy_forking": entropies[0] + i, "moe/router_entropy_other": entropies[1]}
        for i in range(5)
    ]
    summary = {
        "peft": {"method": method},
        "trainable_parameters": trainable,
        "optimizer_state_bytes": 8 * trainable,
        "eval_after": {"greedy_accuracy": 0.5},
    }
    return Run(tmp_path / f"{arm}{seed}", arm, seed, summary, metrics=metrics, routing=routing)


def test_total_variation_and_routing_shift_by_hand(tmp_path):
    assert total_variation([1.0, 0.0], [0.0, 1.0]) == 1.0
    assert total_variation([0.5, 0.5], [0.75, 0.25]) == 0.25
    run = make_run(
        tmp_path, "svf", 0, "svf", 10, [[[1.0, 0.0], [0.5, 0.5]], [[0.9, 0.1], [0.2, 0.8]], [[0.0, 1.0], [0.5, 0.5]]]
    )
    assert routing_shift(run, "forking") == pytest.approx((1.0 + 0.0) / 2)  # first vs last window, mean of layers
    assert routing_shift(run, "other") == 0.0
    assert math.isnan(routing_shift(make_run(tmp_path, "a", 0, "none", 1, [[[1.0, 0.0], [1.0, 0.0]]]), "forking"))


def test_the_section_lists_each_arm_with_its_parameters_and_state(tmp_path):
    stay = [[[0.5, 0.5], [0.5, 0.5]]] * 2
    groups = {
        "forking": [make_run(tmp_path, "forking", s, "none", 1000, stay) for s in (0, 1)],
        "svf": [
            make_run(tmp_path, "svf", s, "svf", 40 + 20 * s, [[[1.0, 0.0], [1.0, 0.0]], [[0.5, 0.5], [1.0, 0.0]]])
            for s in (0, 1)
        ],
    }
    rows = {row["arm"]: row for row in adapter_rows(groups)}
    assert rows["svf"]["trainable"] == 50 and rows["svf"]["optimizer_bytes"] == 400
    assert rows["svf"]["shift_forking"] == pytest.approx(0.25) and rows["forking"]["shift_forking"] == 0.0
    assert rows["svf"]["entropy_forking"] == 5.0  # the last fifth of five logging steps: the last one, 1 + 4
    lines = adapter_lines(groups)
    assert lines[1] == "## Adapters: what each arm trained, and where routing moved"
    assert "| svf | svf | 2 | 0.500 | 50 | 0.00 | 0.250 | 0.000 | 5.000 | 2.000 |" in lines


def test_no_section_without_an_adapter_arm(tmp_path):
    stay = [[[0.5, 0.5], [0.5, 0.5]]] * 2
    assert adapter_lines({"full": [make_run(tmp_path, "full", 0, "none", 10, stay)]}) == []
