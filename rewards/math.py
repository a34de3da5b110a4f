"""Math accuracy with math-verify: parse the gold answer and the completion, then verify.

math-verify's default timeouts use ``signal.alarm``, which only works in the main thread; here they
are disabled (``parsing_timeout=None``, ``timeout_seconds=None``) so the reward works from any thread.
"""

from __future__ import annotations

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rewards.text import completion_text

_GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
_ANSWER_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _gold_text(gold: object) -> str:
    text = str(gold).strip()
    if "####" in text:  # GSM8K: reasoning, then "#### 42"
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    return text if "\\boxed" in text or text.startswith("$") else f"${text}$"


def math_accuracy(completions: list, answer: list, **_: object) -> list[float]:
    """1.0 when math-verify finds the completion's answer equal to the gold answer, else 0.0."""
    rewards = []
    for completion, gold in zip(completions, answer):
        try:
            gold_parsed = parse(_gold_text(gold), extraction_config=_GOLD_CONFIG, parsing_timeout=None)
            predicted = parse(completion_text(completion), extraction_config=_ANSWER_CONFIG, parsing_timeout=None)
            correct = bool(gold_parsed) and bool(predicted) and verify(gold_parsed, predicted, timeout_seconds=None)
        except Exception:  # a reward must never crash a run: unparsable input scores 0
            correct = False
        rewards.append(1.0 if correct else 0.0)
    return rewards
