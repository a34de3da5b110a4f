"""Reward functions by name, or by ``module:function`` import path for user code.

Plain rewards are functions; rewards with settings (time budgets, lengths) are classes built by
:func:`resolve_reward` with keyword settings (``rlvr.recipe`` passes them from the ``reward`` config).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rlvr.rewards.format import OverlongPenalty, boxed_format, think_answer_format
from rlvr.rewards.math import MathAccuracy, math_accuracy
from rlvr.rewards.task import CountdownExact, arithmetic_exact, countdown_exact

RewardFunction = Callable[..., list]

REWARDS: dict[str, RewardFunction] = {
    "arithmetic_exact": arithmetic_exact,
    "countdown_exact": countdown_exact,
    "math_accuracy": math_accuracy,
    "boxed_format": boxed_format,
    "think_answer_format": think_answer_format,
}
FACTORIES: dict[str, type] = {
    "math_accuracy": MathAccuracy,
    "overlong_penalty": OverlongPenalty,
    "countdown_exact": CountdownExact,
}
KNOWN = sorted(set(REWARDS) | set(FACTORIES))


def resolve_reward(name: str, **settings: object) -> RewardFunction:
    """A registered reward (``"math_accuracy"``), one built with ``settings``, or an importable one
    (``"my_pkg.rewards:score"``). Unknown names raise ValueError listing the known ones."""
    if name in FACTORIES and (settings or name not in REWARDS):
        return FACTORIES[name](**settings)
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
    raise ValueError(f"unknown reward {name!r}; known: {KNOWN}, or give 'module:function'")


def check_reward_name(name: str) -> None:
    """Raise ValueError if ``name`` is neither a known reward nor an importable ``module:function``."""
    if name not in KNOWN:
        resolve_reward(name)
