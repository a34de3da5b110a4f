"""Reward functions by name, or by ``module:function`` import path for user code."""

from __future__ import annotations

import importlib
from typing import Callable

from rewards.format import boxed_format
from rewards.math import math_accuracy
from rewards.task import arithmetic_exact

RewardFunction = Callable[..., list]

REWARDS: dict[str, RewardFunction] = {
    "arithmetic_exact": arithmetic_exact,
    "math_accuracy": math_accuracy,
    "boxed_format": boxed_format,
}


def resolve_reward(name: str) -> RewardFunction:
    """A registered reward (``"math_accuracy"``) or an importable one (``"my_pkg.rewards:score"``)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import reward {name!r}: {error}") from None
        if not callable(function):
            raise ValueError(f"reward {name!r} is not callable")
        return function
    raise ValueError(f"unknown reward {name!r}; known: {sorted(REWARDS)}, or give 'module:function'")
