"""Verifiable reward functions with TRL's interface: ``f(completions, **columns) -> list[float]``, and
several functions' rewards combined as TRL combines them (``aggregation.py``). May import :mod:`rlvr.data` and
:mod:`rlvr.utils` (no TRL: a reward function is a plain function)."""

from rlvr.rewards.format import OverlongPenalty, boxed_format, think_answer_format
from rlvr.rewards.math import MathAccuracy, math_accuracy
from rlvr.rewards.registry import REWARDS, resolve_reward
from rlvr.rewards.task import arithmetic_exact
from rlvr.rewards.text import completion_text, last_boxed

__all__ = [
    "REWARDS",
    "MathAccuracy",
    "OverlongPenalty",
    "arithmetic_exact",
    "boxed_format",
    "completion_text",
    "last_boxed",
    "math_accuracy",
    "resolve_reward",
    "think_answer_format",
]
