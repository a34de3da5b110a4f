"""Bounded, never-raising math verification on top of math-verify.

Real RL runs die in reward functions: pathological LaTeX hangs sympy, math-verify's ``signal.alarm``
timeouts raise outside the main thread, a ``None`` answer raises deep in a trainer. Here every
completion is scored within ``budget_seconds`` whatever it holds, from any thread or process, and a
failure is scored ``failure_score`` and counted, never raised:

1. Cheap, linear-time preparation in the caller: the completion's text (plain or chat messages) is
   reduced to its answer -- the last ``\\boxed{...}`` or, failing that, the configured fallbacks --
   and capped at ``max_answer_chars``.
2. math-verify ``parse`` + ``verify`` of the short answer against the gold answer in a worker
   process (:class:`rewards.pool.WorkerPool`), whose main thread may use math-verify's own signal
   timeouts and which the caller kills and replaces when it misses the deadline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rewards.text import completion_text, last_boxed

FALLBACKS = ("answer_tag", "last_number", "none")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def gold_answer_text(gold: object) -> str | None:
    """The gold answer in a form math-verify parses: bare numbers, LaTeX, or GSM8K's ``... #### 42``."""
    if gold is None:
        return None
    text = str(gold).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not text:
        return None
    return text if "\\boxed" in text or text.startswith("$") else f"${text}$"


def extract_answer(completion: object, fallbacks: tuple[str, ...] = ("answer_tag", "last_number"), max_chars: int = 1000) -> str | None:
    """The answer span of a completion as LaTeX for math-verify, or None when there is none.

    The last ``\\boxed{}`` wins; otherwise the fallbacks are tried in order: ``answer_tag``
    (``<answer>...</answer>``), ``last_number`` (the last number in the text).
    """
    text = completion_text(completion)
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return f"$\\boxed{{{boxed[-max_chars:]}}}$" if boxed.strip() else None
    for fallback in fallbacks:
        if fallback == "answer_tag":
            tags = _ANSWER_TAG.findall(text[-(max_chars * 4):])
            if tags and tags[-1].strip():
                return f"${tags[-1].strip()[-max_chars:]}$"
        elif fallback == "last_number":
            numbers = _NUMBER.findall(text[-max_chars:])
            if numbers:
                return f"${numbers[-1].replace(',', '')}$"
    return None


@dataclass
class RewardStats:
    """Counts since the last :meth:`pop`: what the trainer logs per reward function."""

    calls: int = 0
    scored: int = 0
    total: float = 0.0
    no_answer: int = 0  # no boxed answer and no fallback matched, or unusable gold answer
    parse_failures: int = 0  # math-verify could not parse the answer or the gold
    timeouts: int = 0
    errors: int = 0
    extra: dict = field(default_factory=dict)

    def as_metrics(self, name: str) -> dict[str, float]:
        n = max(self.scored, 1)
        return {
            f"rewards/{name}/failures": float(self.timeouts + self.errors),
            f"rewards/{name}/timeouts": float(self.timeouts),
            f"rewards/{name}/parse_failure_rate": (self.parse_failures + self.no_answer) / n,
        }
