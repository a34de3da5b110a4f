"""Reward functions: TRL's interface, plain and conversational completions."""

import pytest

from rewards import arithmetic_exact, boxed_format, math_accuracy
from rewards.registry import resolve_reward
from rewards.text import last_boxed


def test_last_boxed_handles_nesting_and_truncation():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{12") is None
    assert last_boxed("no box") is None


def test_arithmetic_exact_plain_and_chat():
    completions = ["3+4=7\n\\boxed{7}", [{"role": "assistant", "content": "\\boxed{-2}"}], "\\boxed{7.0}", "", None]
    assert arithmetic_exact(completions, answer=["7", "-2", "7", "7", "7"]) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_math_accuracy_uses_math_verify_equivalence():
    completions = ["so \\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}", "garbage }{"]
    assert math_accuracy(completions, answer=["0.5", "\\frac{1}{2}", "4", "1"]) == [1.0, 1.0, 0.0, 0.0]


def test_boxed_format():
    assert boxed_format(["\\boxed{1}", "1"]) == [1.0, 0.0]


def test_resolve_reward_by_name_and_import_path():
    assert resolve_reward("arithmetic_exact") is arithmetic_exact
    assert resolve_reward("rewards.math:math_accuracy") is math_accuracy
    with pytest.raises(ValueError, match="known: .*arithmetic_exact"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module:f")
