"""math-verify on one answer span and one gold answer: parse both, compare every candidate pair.

Runs where math-verify's ``signal.alarm`` timeouts work (a worker process's main thread, or the
caller's main thread); :mod:`rlvr.rewards.pool` bounds it from outside as well. Never raises.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import product

from rlvr.rewards.extraction import BOXED, TAG, last_answer_number

# Per-item outcome codes.
OK, PARSE_FAILURE, TIMEOUT, ERROR = "ok", "parse_failure", "timeout", "error"


@dataclass(frozen=True)
class VerifySettings:
    """math-verify's comparison knobs (``math_verify.verify``), with its defaults."""

    float_rounding: int = 6  # decimal places floats are rounded to before comparing
    numeric_precision: int = 15  # significant digits of numeric evaluation
    strict: bool = True  # variables matter; a set never equals a tuple
    allow_set_relation_comp: bool = False  # compare sets with relations both ways ((1,2) vs 1 < x < 2)

    def as_dict(self) -> dict:
        return asdict(self)


def verify_span(
    kind: str,
    text: str,
    fallbacks: tuple[str, ...],
    gold: str,
    settings: VerifySettings,
    budget_seconds: float,
    use_signals: bool,
) -> tuple[float, str]:
    """Score one answer span against one gold answer: (1.0 or 0.0, outcome). Never raises."""
    seconds = max(1, math.ceil(budget_seconds)) if use_signals else None
    try:
        from math_verify import parse

        gold_parsed = parse(gold, _gold_configs(), parsing_timeout=seconds, raise_on_error=True)
        predicted = _parse_span(kind, text, fallbacks, seconds)
        if not gold_parsed or not predicted:
            return 0.0, PARSE_FAILURE
        return _compare(gold_parsed, predicted, settings, seconds)
    except BaseException as error:  # noqa: BLE001 -- a reward must never raise
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return 0.0, (TIMEOUT if type(error).__name__ == "TimeoutException" else ERROR)


def _gold_configs() -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(), ExprExtractionConfig())


def _parse_span(kind: str, text: str, fallbacks: tuple[str, ...], seconds: int | None) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if kind == BOXED:
        configs = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
        return parse(f"$\\boxed{{{text}}}$", configs, parsing_timeout=seconds, raise_on_error=True)
    candidates = []
    if kind == TAG:  # an explicit answer span: read it as LaTeX, like a box, besides the plain rules
        latex = text if any(d in text for d in ("$", "\\(", "\\[")) else f"${text}$"
        candidates += parse(latex, (LatexExtractionConfig(),), parsing_timeout=seconds, raise_on_error=True)
    return candidates + _parse_unboxed(text, fallbacks, seconds)


def _parse_unboxed(text: str, fallbacks: tuple[str, ...], seconds: int | None) -> list:
    """math-verify's LaTeX extraction and rlvr's strict last number; the later one in the text wins."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    def parse_with(target: str, *configs) -> list:
        return parse(target, configs, parsing_timeout=seconds, raise_on_error=True)

    latex = parse_with(text, LatexExtractionConfig()) if "latex" in fallbacks else []
    number = last_answer_number(text) if "last_number" in fallbacks else None
    if number is None:
        return latex
    if latex:
        # math-verify's own order decides between the LaTeX answer and a plain one (the rightmost, with
        # "answer is" anchors first); rlvr only replaces its plain-number pick by the strict one.
        both = parse_with(text, LatexExtractionConfig(), ExprExtractionConfig())
        if both and str(both[0]) == str(latex[0]):
            return latex
    return parse_with(number, ExprExtractionConfig())


def _compare(gold: list, predicted: list, settings: VerifySettings, seconds: int | None) -> tuple[float, str]:
    """1.0 when any (gold, prediction) candidate pair is equal; a pair that errs or times out counts as
    unequal without stopping the others (math-verify's ``raise_on_error=True`` would stop at the first)."""
    from math_verify import verify

    timed_out = False
    for gold_candidate, predicted_candidate in product(gold, predicted):
        try:
            if verify(
                gold_candidate, predicted_candidate, timeout_seconds=seconds, raise_on_error=True, **settings.as_dict()
            ):
                return 1.0, OK
        except Exception:  # noqa: BLE001 -- this pair cannot be compared; try the next
            continue
        except BaseException as error:
            if type(error).__name__ != "TimeoutException":
                raise
            timed_out = True
    return 0.0, (TIMEOUT if timed_out else OK)
