"""Exact checker of rlvr's embedded arithmetic task: the last boxed integer equals the answer."""

from __future__ import annotations

from rlvr.rewards.text import completion_text, last_boxed


def _as_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def arithmetic_exact(completions: list, answer: list, **_: object) -> list[float]:
    """1.0 when the last ``\\boxed{}`` holds the gold integer, else 0.0 (TRL reward-function interface)."""
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        predicted = _as_int(last_boxed(completion_text(completion)))
        rewards.append(1.0 if predicted is not None and predicted == _as_int(str(gold)) else 0.0)
    return rewards
