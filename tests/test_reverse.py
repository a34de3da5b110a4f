"""The reverse task (the letters half of the seamed domain pair): generator and exact checkers, with
wrong-but-similar answers that must score 0."""

import pytest

from rlvr.data.arithmetic import ArithmeticTask, generate_problems, split_of
from rlvr.rewards.task import arithmetic_exact, embedded_exact, letters_exact

TASK = ArithmeticTask(domains=["addition", "reverse"], max_operand=9, max_terms=3, eval_fraction=0.3)


def test_reverse_problems_are_deterministic_disjoint_and_solved_by_their_solution():
    train = generate_problems(TASK, "train", 200, seed=3)
    assert train == generate_problems(TASK, "train", 200, seed=3)
    evaluation = generate_problems(TASK, "eval", 60, seed=3)
    assert not {p.expression for p in train} & {p.expression for p in evaluation}
    words = [p for p in train if p.domain == "reverse"]
    assert 60 < len(words) < 140  # the two domains are drawn uniformly
    for problem in words:
        word = problem.question.removeprefix("Reverse: ")
        assert problem.answer == word[::-1] and set(word) <= set("abcdefghij") and 3 <= len(word) <= 5
        assert split_of(problem.expression, TASK.eval_fraction) == "train"
        assert letters_exact([problem.solution], [problem.answer]) == [1.0]
        assert embedded_exact([problem.solution], [problem.answer]) == [1.0]
    # the seam: a reverse solution has no digit, an arithmetic one no letter outside the box command
    assert all(not any(c.isdigit() for c in p.solution) for p in words)
    assert all(not set(p.solution.replace("\\boxed", "")) & set("abcdefghij") for p in train if p.domain != "reverse")


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{dcb}",  # a letter short
        "\\boxed{dcbaa}",  # a letter more
        "\\boxed{abcd}",  # not reversed
        "\\boxed{DCBA}",  # case
        "\\boxed{d c b a}",  # spaced
        "\\boxed{dcba.}",  # punctuation inside
        "\\boxed{dcba} then \\boxed{abcd}",  # the last box counts
        "dcba",  # no box
        "\\boxed{dcba",  # unclosed
        "\\boxed{}",
        "\\boxed{dcba}}" + "\\boxed{x}",
        "\\boxed{\\text{dcba}}",
        "\\boxed{dcba\\n}",
    ],
)
def test_wrong_but_similar_words_score_zero(completion):
    assert letters_exact([completion], ["dcba"]) == [0.0]
    assert embedded_exact([completion], ["dcba"]) == [0.0]


def test_surrounding_spaces_and_chat_messages_are_accepted():
    assert letters_exact(["so \\boxed{ dcba }"], ["dcba"]) == [1.0]
    assert letters_exact([[{"role": "assistant", "content": "\\boxed{dcba}"}]], ["dcba"]) == [1.0]


def test_neither_checker_passes_the_other_domains_problems():
    assert letters_exact(["\\boxed{19}"], ["19"]) == [0.0]  # a number is not a word
    assert arithmetic_exact(["\\boxed{dcba}"], ["dcba"]) == [0.0]
    assert embedded_exact(["\\boxed{19}", "\\boxed{ 19 }", "\\boxed{18}"], ["19", "19", "19"]) == [1.0, 1.0, 0.0]
    assert embedded_exact(["\\boxed{19}"], ["dcba"]) == [0.0]
    assert embedded_exact(["\\boxed{dcba}"], ["19"]) == [0.0]


def test_reverse_knobs_are_validated():
    for bad in (
        {"reverse_alphabet": 1},
        {"reverse_alphabet": 27},
        {"reverse_min_length": 0},
        {"reverse_max_length": 2},
    ):
        with pytest.raises(ValueError, match="reverse_"):
            ArithmeticTask(domains=["reverse"], **bad).validate()
