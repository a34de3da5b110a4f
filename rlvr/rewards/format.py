"""Format and shaping rewards."""

from __future__ import annotations

import re

from rlvr.rewards.text import completion_text, last_boxed

_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)


def boxed_format(completions: list, **_: object) -> list[float]:
    """1.0 when the completion contains a complete ``\\boxed{...}`` answer, else 0.0."""
    return [1.0 if last_boxed(completion_text(c)) is not None else 0.0 for c in completions]


def think_answer_format(completions: list, **_: object) -> list[float]:
    """1.0 for ``<think>...</think><answer>...</answer>`` completions (the DeepSeek-R1 template), else 0.0."""
    return [1.0 if _THINK_ANSWER.match(completion_text(c)) else 0.0 for c in completions]


class OverlongPenalty:
    """DAPO's soft overlong punishment (Yu et al., 2025, "DAPO", arXiv 2503.14476, eq. 13).

    With ``L = max_length`` and a buffer of ``cache`` tokens, a completion of ``n`` tokens scores
    0 when ``n <= L - cache``, ``((L - cache) - n) / cache`` (from 0 down to -1) inside the buffer,
    and -1 beyond ``L``. Lengths come from TRL's ``completion_ids`` (tokens, not characters).
    """

    __name__ = "overlong_penalty"

    def __init__(self, max_length: int, cache: int):
        if max_length < 1 or not 0 < cache <= max_length:
            raise ValueError(f"need max_length >= 1 and 0 < cache <= max_length, got {max_length} and {cache}")
        self.max_length, self.cache = max_length, cache

    def penalty(self, length: int) -> float:
        start = self.max_length - self.cache
        if length <= start:
            return 0.0
        if length <= self.max_length:
            return (start - length) / self.cache
        return -1.0

    def __call__(self, completions: list, completion_ids: list | None = None, **_: object) -> list[float]:
        if completion_ids is None:
            raise ValueError("overlong_penalty needs completion_ids (TRL passes them to reward functions)")
        return [self.penalty(len(ids)) for ids in completion_ids]
