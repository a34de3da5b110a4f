"""Reward functions: TRL's interface, plain and conversational completions."""

import pytest

from rlvr.rewards import arithmetic_exact, boxed_format, math_accuracy
from rlvr.rewards.registry import resolve_reward
from rlvr.rewards.text import last_boxed


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
    assert resolve_reward("rlvr.rewards.math:math_accuracy") is math_accuracy
    with pytest.raises(ValueError, match="known: .*arithmetic_exact"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("no_such_module:f")


def test_think_answer_format():
    from rlvr.rewards.format import think_answer_format

    good = "<think>a+b</think>\n<answer>3</answer>"
    assert think_answer_format([good, "<answer>3</answer>", "<think>x</think><answer>3</answer> trailing", ""]) == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (100, -1.0), (101, -1.0), (5000, -1.0)],
)
def test_overlong_penalty_is_daPO_soft_punishment(length, expected):
    from rlvr.rewards.format import OverlongPenalty

    penalty = OverlongPenalty(max_length=100, cache=20)
    assert penalty(["x"], completion_ids=[[7] * length]) == [pytest.approx(expected)]


def test_overlong_penalty_settings_are_checked_and_built_from_config():
    from rlvr.rewards.format import OverlongPenalty
    from rlvr.run.config import ConfigError, load_config
    from rlvr.run.recipe import resolve_rewards

    with pytest.raises(ValueError, match="cache"):
        OverlongPenalty(max_length=10, cache=0)
    config = load_config(
        None, ["reward.functions=[arithmetic_exact, overlong_penalty]", "grpo.max_completion_length=50"]
    )
    functions, _, accuracy = resolve_rewards(config)
    assert accuracy is functions[0] and (functions[1].max_length, functions[1].cache) == (50, 10)
    with pytest.raises(ConfigError, match="reward.overlong_buffer: must be <= grpo.max_completion_length"):
        load_config(None, ["reward.overlong_buffer=60", "grpo.max_completion_length=50"])
