"""Format rewards."""

from __future__ import annotations

from rewards.text import completion_text, last_boxed


def boxed_format(completions: list, **_: object) -> list[float]:
    """1.0 when the completion contains a complete ``\\boxed{...}`` answer, else 0.0."""
    return [1.0 if last_boxed(completion_text(c)) is not None else 0.0 for c in completions]
