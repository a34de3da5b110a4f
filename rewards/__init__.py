"""Verifiable reward functions with TRL's interface: ``f(completions, **columns) -> list[float]``."""

from rewards.format import boxed_format
from rewards.math import math_accuracy
from rewards.registry import REWARDS, resolve_reward
from rewards.task import arithmetic_exact
from rewards.text import completion_text, last_boxed

__all__ = [
    "REWARDS",
    "arithmetic_exact",
    "boxed_format",
    "completion_text",
    "last_boxed",
    "math_accuracy",
    "resolve_reward",
]
