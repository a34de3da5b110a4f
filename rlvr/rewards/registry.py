"""Reward functions by name, or by ``module:function`` import path for user code, and the ``reward``
config section that picks and weights them.

Plain rewards are functions; rewards with settings (time budgets, lengths) are classes built by
:func:`resolve_reward` with keyword settings, which :meth:`RewardConfig.build` takes from the config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from rlvr.rewards.extraction import FALLBACKS
from rlvr.rewards.format import OverlongPenalty, boxed_format, think_answer_format
from rlvr.rewards.math import MathAccuracy, math_accuracy
from rlvr.rewards.task import CountdownExact, arithmetic_exact, countdown_exact, embedded_exact, letters_exact
from rlvr.utils.options import ConfigError, option, require

RewardFunction = Callable[..., list]

REWARDS: dict[str, RewardFunction] = {
    "arithmetic_exact": arithmetic_exact,
    "letters_exact": letters_exact,
    "embedded_exact": embedded_exact,
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


@dataclass
class RewardConfig:
    """The ``reward`` config section. The first function is the verifier that evaluation counts as accuracy."""

    functions: list = option(
        ["arithmetic_exact"],
        "reward functions: names (arithmetic_exact, letters_exact, embedded_exact, countdown_exact, math_accuracy, "
        "boxed_format) or module:function",
    )
    weights: list | None = option(None, "one weight per reward function (default: all 1.0)")
    budget_seconds: float = option(2.0, "math_accuracy: time allowed per completion before it scores failure_score")
    failure_score: float = option(0.0, "math_accuracy: score of a completion whose verification timed out or failed")
    workers: int = option(2, "math_accuracy: verification processes (hard time bound); 0 = in-process, main thread")
    fallbacks: list = option(
        ["answer_tag", "latex", "last_number"],
        "math_accuracy: where to look without a \\boxed{} answer (answer_tag, latex, last_number; [] = boxed only)",
    )
    gold_column: str | None = option(
        None, "math_accuracy: column with the gold answers (default: answer, else solution)"
    )
    float_rounding: int = option(
        6, "math_accuracy: decimal places floats are rounded to before comparing (math-verify)"
    )
    numeric_precision: int = option(15, "math_accuracy: significant digits of numeric evaluation (math-verify)")
    strict: bool = option(True, "math_accuracy: variables matter and sets never equal tuples (math-verify strict)")
    allow_set_relation_comp: bool = option(
        False, "math_accuracy: an interval also equals the relation of a gold (1 < x < 2 vs (1,2)), both ways"
    )
    overlong_buffer: int = option(
        0, "overlong_penalty: tokens before grpo.max_completion_length where the DAPO penalty ramps to -1 (0: a fifth)"
    )

    def validate(self) -> None:
        require(len(self.functions) > 0, "functions", "needs at least one reward function")
        for index, name in enumerate(self.functions):
            try:
                check_reward_name(str(name))
            except ValueError as error:
                raise ConfigError(f"functions[{index}]: {error}") from None
        require(self.budget_seconds > 0, "budget_seconds", "must be > 0")
        require(self.workers >= 0, "workers", "must be >= 0")
        require(self.overlong_buffer >= 0, "overlong_buffer", "must be >= 0")
        require(self.float_rounding >= 0, "float_rounding", "must be >= 0")
        require(self.numeric_precision >= 1, "numeric_precision", "must be >= 1")
        for index, fallback in enumerate(self.fallbacks):
            require(
                fallback in FALLBACKS, f"fallbacks[{index}]", f"must be one of {', '.join(FALLBACKS)}; got {fallback!r}"
            )
        if self.weights is not None:
            require(
                len(self.weights) == len(self.functions),
                "weights",
                f"needs {len(self.functions)} weights (one per function); got {len(self.weights)}",
            )

    def build(self, max_completion_length: int) -> tuple[list[RewardFunction], list[float] | None, RewardFunction]:
        """The reward functions for TRL, their weights, and the accuracy function for evaluation.

        Accuracy uses the first function only (the verifier): shaping rewards must not count as correct.
        """
        functions = [self._function(str(name), max_completion_length) for name in self.functions]
        weights = [float(weight) for weight in self.weights] if self.weights else None
        return functions, weights, functions[0]

    def _function(self, name: str, max_completion_length: int) -> RewardFunction:
        """Rewards with settings get them from this section; others resolve by name."""
        if name == "math_accuracy":
            return resolve_reward(
                name,
                budget_seconds=self.budget_seconds,
                failure_score=self.failure_score,
                workers=self.workers,
                fallbacks=tuple(self.fallbacks),
                gold_column=self.gold_column,
                float_rounding=self.float_rounding,
                numeric_precision=self.numeric_precision,
                strict=self.strict,
                allow_set_relation_comp=self.allow_set_relation_comp,
            )
        if name == "overlong_penalty":
            buffer = self.overlong_buffer or max(1, max_completion_length // 5)
            return resolve_reward(name, max_length=max_completion_length, cache=buffer)
        return resolve_reward(name)
