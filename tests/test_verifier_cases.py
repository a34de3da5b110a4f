"""math_accuracy against look-alike wrong answers, right answers in many notations, and raw math-verify.

Every wrong answer below is shaped like its gold (a tuple, interval, set, relation, fraction, decimal
or hedge built from the gold's digits): a reward that scores one of them 1.0 is a reward hack.
"""

from __future__ import annotations

import logging

import pytest

from rlvr.rewards.extraction import boxed_answer, find_answer, gold_answer_text, last_answer_number
from rlvr.rewards.math import MathAccuracy

logging.getLogger("math_verify").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def reward():
    return MathAccuracy(workers=0)  # in the main thread: math-verify's own timeouts


# (gold, completion): every one must score 0.
WRONG = [
    ("13", "The pair is $(1,3)$"),
    ("13", "The pair is (1,3)"),
    ("13", "(1, 3)"),
    ("13", "$x = \\frac13$"),
    ("13", "\\boxed{(1,3)}"),
    ("13", "\\boxed{1,3}"),
    ("4", ".4"),
    ("4", "The answer is 0.4."),
    ("274", "2,74"),
    ("327", "$(p,q,r)=(3,2,7)$"),
    ("327", "(p,q,r)=(3,2,7)"),
    ("2", "$\\frac{1+\\sqrt{5}}{2}$"),
    ("2", "(1+sqrt(5))/2"),
    ("2", "\\frac{1}{2}"),
    ("2", "\\sqrt{2}"),
    ("5", "$x \\neq 5$"),
    ("5", "x != 5"),
    ("5", "x ≠ 5"),
    ("3", "Area is $3\\pi$"),
    ("3", "Area is 3pi"),
    ("3", "Area is 3 pi"),
    ("3", "\\boxed{3\\pi}"),
    ("3", "The answer is 3x"),
    ("3", "\\boxed{3x}"),
    ("8", "The set is $\\{2, 8\\}$"),
    ("8", "The set is {2, 8}"),
    ("7", "The interval is [0, 7)"),
    ("3", "x < 3"),
    ("3", "x > 3"),
    ("3", "x <= 3"),
    ("3", "$x \\geq 3$"),
    ("3", "\\boxed{x \\le 3}"),
    ("1000", "1,0,0,0"),
    ("12", "The answer is 1 or 2"),
    ("2", "The answer is 1 or 2"),
    ("4", "\\boxed{3} or \\boxed{4}"),
    ("4", "\\boxed{3}, \\boxed{4}"),
    ("4", "<answer>3 or 4</answer>"),
    ("4", "<answer>x < 4</answer>"),
    ("3", "The answer is 1/3"),
    ("4", "The answer is 3/4"),
    ("10", "2^10"),
    ("0", "The meeting is at 12:00"),
    ("3", "The answer is -3"),
    ("-3", "The answer is 3"),
    ("2", "5 - 3"),
    ("0.5", "5"),
    ("5", "0.5"),
    ("50", "5.0"),
    ("15", "1.5"),
    ("100", "10%"),
    ("9", "3^2"),
    ("123", "\\boxed{1}, \\boxed{2}, \\boxed{3}"),
    ("Janet ... #### 18", "The answer is 1.8"),
    ("\\frac{1}{3}", "$0.33$"),
    ("(1,3)", "$[1,3]$"),
    ("\\{1,2,3\\}", "$\\{1,2\\}$"),
    ("5", "\\boxed{5"),
    ("5", "\\boxed{}"),
    ("5", ""),
]

# (gold, completion): every one must score 1.
RIGHT = [
    ("\\frac{1}{3}", "$\\frac13$"),
    ("\\frac{1}{3}", "The answer is $\\frac{1}{3}$."),
    ("(3,2,7)", "$(3,2,7)$"),
    ("[0,1)", "$[0,1)$"),
    ("(0,1]", "The interval is $(0, 1]$."),
    ("odd", "$odd$"),
    ("f(y)=y", "$f(y) = y$"),
    ("12:00", "\\boxed{12:00}"),
    ("\\{1,2,3\\}", "\\boxed{1},\\boxed{2},\\boxed{3}"),
    ("\\{1,2\\}", "$\\{2, 1\\}$"),
    ("1,22", "1.22"),
    ("42", "The answer is 42."),
    ("42", "\\boxed{42}"),
    ("42", "$42$"),
    ("42", "\\[ 42 \\]"),
    ("42", "<answer>42</answer>"),
    ("12", "<answer>The answer is 12</answer>"),
    ("1000", "\\boxed{1,000}"),
    ("1000", "The total is 1,000 dollars."),
    ("1000", "1 000"),
    ("7425000", "7,425,000"),
    ("0.5", "\\boxed{\\frac{1}{2}}"),
    ("\\frac{1}{2}", "The answer is 1/2."),
    ("0.4", ".4"),
    ("-5", "so x = -5"),
    ("5", "so x = 5"),
    ("5", "$x = 5$"),
    ("3", "\\boxed{x = 3}"),
    ("Natalia sold ... #### 72", "She has 72 clips.\n#### 72"),
    ("12", "\\boxed{12\\text{ cm}}"),
    ("12", "It is 12 cm."),
    ("12", "It is 12cm."),
    ("1000.99", "which is 1,000.99m²"),
    ("10\\%", "\\boxed{10\\%}"),
    ("\\sqrt{2}", "<answer>\\sqrt{2}</answer>"),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}"),
    ("(x+1)^2", "\\boxed{x^2 + 2x + 1}"),
    ("\\frac{\\sqrt{3}}{2}", "$\\frac{\\sqrt3}{2}$"),
    ("3", "the final answer is $3$. I hope it is correct."),
    ("7.78", "Final Answer: The final answer is 7.78."),
    ("2/3", "so the probability that Alice wins is 2/3."),
    ("120", "The volume of $ABCDEFGH$ is 120. I hope it is correct."),
    ("10455", "Final Answer: The final answer is $10,455$. I hope it is correct."),
    ("4", "first \\boxed{3} then corrected \\boxed{4}"),
    ("1 < x < 2", "$(1,2)$"),
    ("101", "$a+2z = 2z + a = 101$"),
    ("$\\{1,3\\} \\cup \\{2,4\\}$", "$\\{1,2,3,4\\}$"),
]


@pytest.mark.parametrize("gold, completion", WRONG, ids=[f"wrong{i}" for i in range(len(WRONG))])
def test_look_alike_wrong_answers_score_zero(reward, gold, completion):
    assert reward([completion], answer=[gold]) == [0.0]


@pytest.mark.parametrize("gold, completion", RIGHT, ids=[f"right{i}" for i in range(len(RIGHT))])
def test_right_answers_in_any_notation_score_one(reward, gold, completion):
    assert reward([completion], answer=[gold]) == [1.0]


def test_the_case_lists_are_large_enough():
    assert len(WRONG) >= 40 and len(RIGHT) >= 40


# Examples of math-verify's README and docstrings, written as completions: rlvr must reach math-verify's
# own verdict, computed here (not copied), on each.
DOCUMENTED = [
    ("${1,3} \\cup {2,4}$", "${1,2,3,4}$"),
    ("$\\frac{1}{2}$", "The answer is $\\frac{1}{2}$"),
    ("$\\frac{1}{2}$", "The answer is 1/2"),
    ("$1 < x < 2$", "$(1,2)$"),
    ("$(1,2)$", "$1 < x < 2$"),
    ("$101$", "$a+2z = 2z + a = 101$"),
    ("$a+2z = 2z + a = 101$", "$101$"),
    ("$0.1$", "$10\\%$"),
    ("$10$", "$10 cm$"),
    ("$\\frac{1}{3}$", "$frac13$"),
    ("$\\frac{1}{3}$", "$0.333$"),
    ("$\\sqrt{2}$", "\\[ \\sqrt{2} \\]"),
    ("$\\beta$", "$β$"),
    ("$x = 1$", "$1$"),
    ("$2$", "AZYUK2A"),
    ("$7425000$", "7,425,000"),
    ("$1000.99$", "1,000.99€"),
    ("$\\{1, 2\\}$", "$\\{2, 1\\}$"),
    ("$[0,9)$", "$[0,1)$"),
]


@pytest.mark.parametrize("gold, completion", DOCUMENTED)
def test_agrees_with_raw_math_verify_on_its_documented_examples(reward, gold, completion):
    from math_verify import parse, verify

    raw = float(verify(parse(gold), parse(completion)))
    assert reward([completion], answer=[gold]) == [raw]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 42.", "42"),
        ("x = -5", "-5"),
        ("1,000.5 dollars", "1,000.5"),
        ("2,74", "2,74"),
        ("1 000", "1000"),
        ("15%", "15%"),
        ("so 1/2", "1/2"),
        ("costs $5.", "5"),
        ("#### 72", "72"),
        ("(1,3)", None),
        ("x < 3", None),
        ("3x", None),
        ("1 or 2", None),
        ("2^10", None),
        ("12:00", None),
        ("1,0,0,0", None),
        ("\\frac13", None),
        ("3 - 5", None),
        ("x+1", None),
        ("\\neq 5", None),
        ("", None),
        ("no digits", None),
        ("3, 4", None),
        ("5 = x", None),
        ("5cm", "5"),
        ("5 apples", "5"),
    ],
)
def test_last_answer_number_takes_whole_tokens_in_answer_positions(text, expected):
    assert last_answer_number(text) == expected


def test_boxes_side_by_side_form_one_answer_and_words_split_them():
    assert boxed_answer("\\boxed{1}, \\boxed{2} and $\\boxed{3}$") == "1, 2, 3"
    assert boxed_answer("first \\boxed{3} then corrected \\boxed{4}") == "4"
    assert boxed_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert boxed_answer("\\boxed{12") is None and boxed_answer("none") is None


def test_answer_spans_are_bounded():
    assert find_answer("\\boxed{" + "1" * 2000 + "}", max_chars=1000) is None  # an over-long box is no answer
    span = find_answer("x" * 5000 + "\nThe answer is 7.", max_chars=1000)
    assert span.kind == "text" and len(span.text) <= 1000 and span.text.endswith("7.")
    assert find_answer("The answer is 7.", fallbacks=()) is None  # boxed answers only


def test_gold_answers_are_read_deliberately():
    assert gold_answer_text("Natalia ... #### 1,000") == "1000"
    assert gold_answer_text("1,22") == "1,22"  # a decimal comma, as math-verify reads it
    assert gold_answer_text("-3.5") == "-3.5" and gold_answer_text("15%") == "15%"
    assert gold_answer_text("\\frac{1}{3}") == "$\\frac{1}{3}$"
    assert gold_answer_text("$x$") == "$x$" and gold_answer_text("\\boxed{3}") == "\\boxed{3}"
    assert gold_answer_text("  ") is None and gold_answer_text(None) is None


def test_gold_comes_from_answer_or_solution_or_a_named_column(reward):
    assert reward(["\\boxed{3}"], solution=["3"]) == [1.0]  # TRL's math datasets
    assert reward(["\\boxed{3}"], answer=["3"], solution=["4"]) == [1.0]  # answer first
    named = MathAccuracy(workers=0, gold_column="target")
    assert named(["\\boxed{3}"], target=["3"], answer=["4"]) == [1.0]
    with pytest.raises(TypeError, match="answer= or solution="):
        reward(["\\boxed{3}"], prompts=["p"])
    with pytest.raises(TypeError, match="target="):
        named(["\\boxed{3}"], answer=["3"])


def test_one_failing_candidate_pair_does_not_stop_the_others(reward):
    from math_verify import parse, verify

    with pytest.raises(Exception):  # math-verify itself, asked to raise, stops at the first bad pair
        verify(parse("$12:00$"), parse("$\\boxed{12:00}$"), raise_on_error=True)
    assert reward(["\\boxed{12:00}"], answer=["12:00"]) == [1.0]


def test_math_verify_settings_are_passed_through():
    completion, gold = ["$\\boxed{0.333}$"], ["\\frac{1}{3}"]
    assert MathAccuracy(workers=0)(completion, answer=gold) == [0.0]
    assert MathAccuracy(workers=0, float_rounding=3)(completion, answer=gold) == [1.0]
    assert MathAccuracy(workers=0)(["\\boxed{y + 1}"], answer=["x + 1"]) == [0.0]  # variables matter
    assert MathAccuracy(workers=0, strict=False)(["\\boxed{y + 1}"], answer=["x + 1"]) == [1.0]
    assert MathAccuracy(workers=0)(["$1 < x < 2$"], answer=["(1,2)"]) == [0.0]
    assert MathAccuracy(workers=0, allow_set_relation_comp=True)(["$1 < x < 2$"], answer=["(1,2)"]) == [1.0]


def test_settings_reach_the_worker_processes():
    reward = MathAccuracy(workers=1, float_rounding=3)
    try:
        assert reward(["$\\boxed{0.333}$", "\\boxed{0.5}"], answer=["\\frac{1}{3}", "\\frac{1}{3}"]) == [1.0, 0.0]
    finally:
        reward.close()
