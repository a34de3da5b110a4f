"""Where a completion's answer is: cheap, linear-time cuts made before math-verify sees anything.

A policy under RL learns whatever the reward lets it get away with, so every rule here is written
against look-alike wrong answers (``(1,3)`` for 13, ``x < 3`` for 3, ``.4`` for 4):

1. ``\\boxed{...}``: the last box wins. Boxes that directly follow each other, separated only by
   commas, ``and``, ``or`` or spacing (``\\boxed{1}, \\boxed{2}``), form one answer (``\\boxed{1, 2}``):
   several boxed answers are a list, and a hedge (``\\boxed{3} or \\boxed{4}``) matches no single gold.
2. Without a box, the configured fallbacks, in this order:

   - ``answer_tag``: the content of the last ``<answer>...</answer>``;
   - ``latex``: math-verify's own LaTeX extraction over the completion's tail (``$...$``, ``\\[...\\]``);
   - ``last_number``: the last number of the tail, only as a whole token in an answer position
     (see :func:`last_answer_number`); when ``latex`` is on too, whichever comes last in the text wins,
     as in math-verify.

Nothing here parses mathematics; the spans go to :mod:`rlvr.rewards.equivalence` in a worker process.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlvr.rewards.text import completion_text, last_boxed

FALLBACKS = ("answer_tag", "latex", "last_number")
DEFAULT_FALLBACKS = FALLBACKS

# Span kinds handed to the worker.
BOXED, TAG, TEXT = "boxed", "tag", "text"
_MAX_JOINED_BOXES = 16
_BOX_SEPARATOR = re.compile(r"(?:\s|,|;|\$|\\[,;:! ]|\\quad|\\qquad|\\text\{\s*(?:and|or|,)\s*\}|\b(?:and|or)\b)*\Z")


@dataclass(frozen=True)
class AnswerSpan:
    """The part of a completion that holds its answer.

    ``kind`` is ``boxed`` (``text`` is the box content), ``tag`` (an ``<answer>`` tag's content) or
    ``text`` (the completion's tail, for math-verify's extraction); ``fallbacks`` says which
    unboxed extractions the worker may use on a ``tag`` or ``text`` span.
    """

    kind: str
    text: str
    fallbacks: tuple[str, ...] = ()


def find_answer(
    completion: object, fallbacks: tuple[str, ...] = DEFAULT_FALLBACKS, max_chars: int = 1000
) -> AnswerSpan | None:
    """The answer span of a completion, or None when it has none (or it is longer than ``max_chars``)."""
    text = completion_text(completion)
    if not text.strip():
        return None
    boxed = boxed_answer(text)
    if boxed is not None:
        return AnswerSpan(BOXED, boxed) if boxed.strip() and len(boxed) <= max_chars else None
    unboxed = tuple(f for f in fallbacks if f in ("latex", "last_number"))
    if "answer_tag" in fallbacks:
        tag = last_answer_tag(text)
        if tag is not None:
            return AnswerSpan(TAG, tag, unboxed) if tag.strip() and len(tag) <= max_chars else None
    if unboxed:
        return AnswerSpan(TEXT, tail(text, max_chars), unboxed)
    return None


def boxed_answer(text: str) -> str | None:
    """The last ``\\boxed{}``'s content, joined with the boxes right before it (``1, 2`` from
    ``\\boxed{1}, \\boxed{2}``); None without a complete box."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    last = last_boxed(text[start:])
    if last is None:
        return None
    parts = [last]
    while len(parts) < _MAX_JOINED_BOXES:
        previous = text.rfind("\\boxed{", 0, start)
        if previous < 0:
            break
        content = last_boxed(text[previous:start])
        if content is None:
            break
        closing = previous + len("\\boxed{") + len(content) + 1  # just after the box's '}'
        if not _BOX_SEPARATOR.match(text, closing, start):  # only separators between the two boxes
            break
        parts.append(content)
        start = previous
    return ", ".join(reversed(parts))


def last_answer_tag(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>``, or None."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    return None if start < 0 else text[start + len("<answer>") : end].strip()


def tail(text: str, max_chars: int) -> str:
    """The last ``max_chars`` characters, starting at a line break when one is in range, so that a
    cut never opens in the middle of a ``$...$``."""
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    newline = cut.find("\n")
    return cut[newline + 1 :] if newline >= 0 else cut


# ---------------------------------------------------------------- the plain-number fallback
# A number as written: thousands groups, a decimal point or comma, or a leading point, then an optional
# '/denominator'. Whether the digits form *one* number is checked on the whole run (_WELL_FORMED).
_DIGIT_RUN = re.compile(r"\.?\d(?:[\d,.]*\d)?(?:/\d+)?")
_SPACE_GROUPS = re.compile(r"(?<![\d.,])\d{1,3}(?: \d{3})* \Z")  # '1 000 000': thousands grouped by spaces
_WELL_FORMED = re.compile(r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)(?:/\d+)?\Z")
# Left of a number in an answer position: start, space, '=', ':', or a currency sign. Anything that
# makes it part of a larger expression disqualifies it.
_BAD_BEFORE = set("<>≤≥≠≈~!([{,;/×÷*+-−^_|\\")
_RELATIONS = ("!=", "<=", ">=", "=<", "=>", "=/=")
_BAD_AFTER = set(")]}^_/*×÷<>≤≥≠=|\\")
_BAD_WORD_BEFORE = {"or", "and", "nor", "not", "than", "except", "plus", "minus", "times", "over", "between", "from"}
_BAD_WORD_AFTER = {
    "or",
    "and",
    "nor",
    "pi",
    "π",
    "sqrt",
    "i",
    "x",
    "y",
    "z",
    "n",
    "k",
    "times",
    "plus",
    "minus",
    "over",
}
_WORD_BEFORE = re.compile(r"(\\?)([A-Za-z]+)\s*\Z")
_WORD_AFTER = re.compile(r"\s*([A-Za-zπ√]+)")
_PERCENT = re.compile(r"\s*(?:%|percent\b)")
# Units a number may be glued to ('5cm', '1,000.99m²'); single letters ('5m', '3x') may be variables.
_GLUED_UNIT = re.compile(r"(?:[cmk]?m[²³23]?|cm|mm|km|kg|mg|ml|mL|ft|mph|sec|min|hrs?|lbs?|oz|°[CF]?)(?![A-Za-z0-9])")
_SIGNS = "-−+"


def last_answer_number(text: str) -> str | None:
    """The last number of ``text`` when it stands alone as an answer, as math-verify should read it.

    Only the *last* run of digits counts, and only if it is one well-formed number (``1,000.5``,
    ``-3``, ``.4``, ``2,74`` -- a decimal comma, as math-verify reads it --, ``1/2``, ``15%``) that is
    not glued to a word, an operator, a relation, a bracket or a list: ``(1,3)``, ``x < 3``,
    ``\\frac13``, ``3\\pi``, ``1 or 2``, ``2^10``, ``12:00`` and ``1,0,0,0`` give None. A number after
    ``=`` counts (``x = 5``). The trade-off: a right answer glued to its unit (``5cm``) or written
    as an operation (``2^10``) is not found either; box the answer to avoid both.
    """
    match = None
    for match in _DIGIT_RUN.finditer(text):
        pass
    if match is None:
        return None
    start, end = match.span()
    body = match.group()
    if not _WELL_FORMED.match(body):
        return None
    grouped = _SPACE_GROUPS.search(text, 0, start) if re.match(r"\d{3}(?:\.\d+)?\Z", body) else None
    if grouped:
        start = grouped.start()
    if start > 0 and text[start - 1] in _SIGNS:
        start -= 1
        if start > 0 and (text[start - 1].isalnum() or text[start - 1] in ")]}"):
            return None  # a binary minus or plus: '3-5', 'x+1'
    before = text[:start]
    if before and (
        before[-1].isalnum() or before[-1] in "._'\"`" or (before[-1] == ":" and before[:-1][-1:].isdigit())
    ):
        return None  # glued to a word, a number or a time: 'x3', 'AZ2', '12:00'
    stripped = before.rstrip()
    if stripped and (stripped[-1] in _BAD_BEFORE or stripped.endswith(_RELATIONS)):
        return None
    word = _WORD_BEFORE.search(stripped)
    if word and (word.group(1) or word.group(2).lower() in _BAD_WORD_BEFORE):
        return None  # a LaTeX command ('\\neq 5', '\\frac 1 3') or a hedging/operation word
    after = text[end:]
    percent = _PERCENT.match(after)
    if percent:
        after = after[percent.end() :]
    unit = _GLUED_UNIT.match(after)
    if unit:
        after = after[unit.end() :]
    elif after and (after[0].isalnum() or after[0] in "_'"):
        return None  # glued to a word or a variable: '3x', '2A', '3pi'
    rest = after.lstrip()
    if rest and (rest[0] in _BAD_AFTER or (rest[0] in ",;:" and rest[1:].lstrip()[:1].isdigit())):
        return None  # closes a bracket, continues an expression or a list: '(1,3)', '3, 4', '5 = x'
    word = _WORD_AFTER.match(after)
    if word and word.group(1).lower() in _BAD_WORD_AFTER:
        return None
    return text[start:end].replace(" ", "") + (percent.group().strip() if percent else "")


# ---------------------------------------------------------------- gold answers
_PLAIN_NUMBER = re.compile(r"[-−+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)(?:/\d+)?\s*%?\Z")
_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def gold_answer_text(gold: object) -> str | None:
    """The gold answer as math-verify should read it, or None when it is empty.

    - GSM8K's ``reasoning #### 42``: what follows the last ``####``, thousands commas removed.
    - LaTeX with its own delimiters (``$\\frac{1}{3}$``, ``\\boxed{3}``): as it is.
    - A plain number (``42``, ``-3.5``, ``1,000``, ``1/2``, ``15%``): as it is, for math-verify's number
      rules. A comma that is not a thousands separator is a decimal comma, as math-verify reads it:
      ``1,22`` is 1.22. Write a two-element set as ``1, 22`` or ``\\{1, 22\\}``.
    - Anything else (``\\frac{1}{3}``, ``(3,2,7)``, ``[0,1)``, ``odd``, ``f(y)=y``): wrapped in ``$...$``.
    """
    if gold is None:
        return None
    text = str(gold).strip()
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not text:
        return None
    if any(delimiter in text for delimiter in _LATEX_DELIMITERS) or _PLAIN_NUMBER.match(text):
        return text
    return f"${text}$"
