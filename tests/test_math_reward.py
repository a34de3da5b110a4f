"""math_accuracy: correct on tricky answer pairs, bounded and never raising on garbage, any thread or process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlvr.rewards.math import MathAccuracy

BUDGET = 1.0
HARD_LIMIT = BUDGET + 1.0 + 1.5  # budget + the pool's kill grace + slack for a loaded machine


@pytest.fixture(scope="module")
def verifier():
    reward = MathAccuracy(budget_seconds=BUDGET, workers=1)
    reward(["\\boxed{1}"], answer=["1"])  # start the worker once
    yield reward
    reward.close()


TRICKY = [
    # (completion, gold, expected)
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1.0),
    ("\\boxed{(0, 1]}", "(0,1]", 1.0),
    ("\\boxed{[0, 1]}", "(0,1]", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("the answer is \\boxed{12\\text{ cm}}", "12", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("first \\boxed{3} then corrected \\boxed{4}", "4", 1.0),
    ("first \\boxed{4} then corrected \\boxed{3}", "4", 0.0),
    ("She has 72 clips.\n#### 72", "Natalia sold ... #### 72", 1.0),
    ("<answer>\\sqrt{2}</answer>", "\\sqrt{2}", 1.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{-7}", "7", 0.0),
    ("\\boxed{}", "0", 0.0),
]


@pytest.mark.parametrize("completion, gold, expected", TRICKY)
def test_tricky_pairs(verifier, completion, gold, expected):
    assert verifier([completion], answer=[gold]) == [expected]


def test_conversational_completions_and_gsm8k_gold(verifier):
    completions = [[{"role": "assistant", "content": "So \\boxed{18}."}], [{"role": "assistant", "content": None}]]
    assert verifier(completions, answer=["Janet ... #### 18", "#### 3"]) == [1.0, 0.0]


GARBAGE = [
    None,
    "",
    " ",
    "\\boxed{",
    "}" * 10_000,
    "{" * 10_000 + "\\boxed{1}",
    "\\boxed{" + "{" * 5000 + "}" * 5000 + "}",
    "x" * 2_000_000,
    "\\boxed{9^{9^{9^{9^{9}}}}}",
    "\\boxed{" + "(" * 3000 + "}",
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{\\infty - \\infty}",
    "\x00\x01\ufffd",
    12345,
    object(),
]


@pytest.mark.parametrize("completion", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_never_raises_and_stays_in_budget(verifier, completion):
    start = time.monotonic()
    scores = verifier([completion], answer=["1"])
    assert time.monotonic() - start < HARD_LIMIT
    assert scores in ([0.0], [1.0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    completion=st.one_of(
        st.text(max_size=300),
        st.text(alphabet="\\{}^_()[]0123456789+-*/=x.,boxedfrac ", max_size=200).map(lambda t: "\\boxed{" + t + "}"),
    ),
    gold=st.one_of(st.none(), st.text(max_size=30), st.integers().map(str)),
)
def test_fuzz_returns_a_score_within_the_budget(verifier, completion, gold):
    start = time.monotonic()
    scores = verifier([completion], answer=[gold])
    assert time.monotonic() - start < HARD_LIMIT
    assert len(scores) == 1 and scores[0] in (0.0, 1.0)


def test_timeouts_score_the_failure_value_and_are_counted():
    reward = MathAccuracy(budget_seconds=BUDGET, failure_score=-1.0)
    try:
        reward.pop_stats()
        start = time.monotonic()
        scores = reward(["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{2}"], answer=["1", "2"])
        assert time.monotonic() - start < 2 * HARD_LIMIT + 1.0  # includes starting the worker
        assert scores == [-1.0, 1.0]
        stats = reward.pop_stats()
        assert stats.timeouts == 1 and stats.errors == 0
        assert reward.stats.as_metrics("math_accuracy")  # fresh counters after pop
    finally:
        reward.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_works_from_a_worker_thread(workers):
    reward = MathAccuracy(budget_seconds=BUDGET, workers=workers)
    results = []
    thread = threading.Thread(target=lambda: results.append(reward(["\\boxed{\\frac{6}{4}}"], answer=["1.5"])))
    thread.start()
    thread.join(timeout=60)
    reward.close()
    assert results == [[1.0]]


def test_works_inside_a_subprocess():
    code = "from rlvr.rewards import math_accuracy; print(math_accuracy(['\\\\boxed{3}', 'no'], answer=['3', '3']))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip().splitlines()[-1] == "[1.0, 0.0]"


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="budget_seconds"):
        MathAccuracy(budget_seconds=0)
    with pytest.raises(ValueError, match="workers"):
        MathAccuracy(workers=-1)
