"""Exact checkers of rlvr's embedded tasks: arithmetic (the boxed integer), reverse (the boxed word) and
countdown (the boxed expression); ``embedded_exact`` picks the arithmetic or reverse checker per problem."""

from __future__ import annotations

import re

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


WORD = re.compile(r"[a-z]+")


def _letters_score(completion, gold) -> float:
    """1.0 when ``gold`` is a lowercase word and the last ``\\boxed{}`` holds exactly it (surrounding spaces
    aside): no case folding, no inner spaces or punctuation, no partial credit."""
    gold = str(gold)
    if not WORD.fullmatch(gold):
        return 0.0
    boxed = last_boxed(completion_text(completion))
    return 1.0 if boxed is not None and boxed.strip() == gold else 0.0


def letters_exact(completions: list, answer: list, **_: object) -> list[float]:
    """The reverse task's checker: 1.0 when the last ``\\boxed{}`` holds exactly the gold word, else 0.0."""
    return [_letters_score(completion, gold) for completion, gold in zip(completions, answer, strict=True)]


def embedded_exact(completions: list, answer: list, **_: object) -> list[float]:
    """Mixed arithmetic and reverse problems: a gold word is checked by :func:`letters_exact`, anything else by
    :func:`arithmetic_exact` (a word is never an integer, so neither checker can pass the other's problems)."""
    return [
        _letters_score(completion, gold) if WORD.fullmatch(str(gold)) else arithmetic_exact([completion], [gold])[0]
        for completion, gold in zip(completions, answer, strict=True)
    ]


class CountdownExact:
    """Countdown checker: 1.0 when the last ``\\boxed{}`` holds an expression that uses exactly the given
    numbers (each once, + - * and parentheses only) and equals the target (:mod:`rlvr.data.countdown`).

    Args:
        partial_credit: score of an expression that uses the numbers exactly but misses the target
            (default 0: a shaped reward a policy can settle for).
    """

    __name__ = "countdown_exact"

    def __init__(self, partial_credit: float = 0.0):
        if not 0.0 <= partial_credit < 1.0:
            raise ValueError(f"partial_credit must be in [0, 1), got {partial_credit}")
        self.partial_credit = partial_credit

    def __call__(self, completions: list, answer: list, **_: object) -> list[float]:
        from rlvr.data.countdown import check_countdown

        scores = []
        for completion, gold in zip(completions, answer, strict=True):
            try:
                expression = last_boxed(completion_text(completion))
            except Exception:  # noqa: BLE001 -- e.g. an object whose str() raises
                expression = None
            scores.append(check_countdown(expression, str(gold), self.partial_credit))
        return scores


countdown_exact = CountdownExact()
