"""Countdown: deterministic problems with several solution paths, and a verifier that cannot be fooled."""

from __future__ import annotations

import pytest

from rlvr.data import ArithmeticTask, generate_problems
from rlvr.data.countdown import check_countdown, expression_text, left_to_right, parse_gold, solution_paths
from rlvr.rewards import resolve_reward
from rlvr.rewards.text import last_boxed

TASK = ArithmeticTask(domains=["countdown"], eval_fraction=0.2)


def test_generation_is_deterministic_and_splits_are_disjoint():
    train = generate_problems(TASK, "train", 300, seed=0)
    assert train == generate_problems(TASK, "train", 300, seed=0)
    evaluation = generate_problems(TASK, "eval", 100, seed=0)
    assert not {p.expression for p in train} & {p.expression for p in evaluation}
    assert {p.expression for p in generate_problems(TASK, "train", 300, seed=1)} != {p.expression for p in train}


def test_every_problem_is_solved_by_its_solution_and_has_several_paths():
    for problem in generate_problems(TASK, "train", 200, seed=0):
        target, numbers = parse_gold(problem.answer)
        assert f"Reach {target} with" in problem.question
        assert check_countdown(last_boxed(problem.solution), problem.answer) == 1.0
        paths = solution_paths(tuple(numbers))[target]
        assert len(paths) >= TASK.countdown_min_paths
        assert all(left_to_right(terms, ops) == target for terms, ops in paths)


def test_warm_start_solutions_are_drawn_among_the_valid_paths():
    """The worked solution is one valid path drawn at random, not always the same (say, the first) one."""
    problems = generate_problems(TASK, "train", 300, seed=0)
    not_first = 0
    for problem in problems:
        target, numbers = parse_gold(problem.answer)
        paths = solution_paths(tuple(numbers))[target]
        boxed = last_boxed(problem.solution)
        assert boxed in {expression_text(terms, ops) for terms, ops in paths}
        not_first += boxed != expression_text(*paths[0])
    assert not_first > 0.3 * len(problems)


@pytest.mark.parametrize(
    "terms, ops, text",
    [
        ((3, 5, 8), ("+", "*"), "(3+5)*8"),
        ((5, 3, 8), ("*", "+"), "5*3+8"),
        ((9, 2, 4), ("-", "-"), "9-2-4"),
        ((2, 3, 4), ("*", "*"), "2*3*4"),
        ((1, 2, 3), ("+", "-"), "1+2-3"),
    ],
)
def test_boxed_expressions_mean_what_the_steps_computed(terms, ops, text):
    assert expression_text(terms, ops) == text
    assert eval(text) == left_to_right(terms, ops)  # noqa: S307 -- test literal


ANSWER = "23 from 3,5,8"


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("5*3+8", 1.0),
        ("8+5*3", 1.0),
        ("3*5+8", 1.0),
        (" (5*3)+8 ", 1.0),
        ("8+3*5", 1.0),
        ("5*3+7", 0.0),  # wrong number
        ("5*3+8+0", 0.0),  # an extra number
        ("5*3", 0.0),  # a number left out
        ("5*5-2", 0.0),  # a number used twice, another missing
        ("23", 0.0),  # the target alone
        ("8+15", 0.0),  # an intermediate result passed off as a number
        ("5*3+8=23", 0.0),
        ("5**3+8", 0.0),
        ("5/3+8", 0.0),
        ("-5*3+8+31", 0.0),
        ("5*(3+8", 0.0),
        ("__import__('os')", 0.0),
        ("5*3+08", 0.0),
        ("", 0.0),
        (None, 0.0),
        ("(" * 60 + "5" + ")" * 60, 0.0),
        ("9" * 5000, 0.0),
        ("1+" * 2000 + "1", 0.0),
    ],
)
def test_verifier_right_wrong_malformed_and_hostile(expression, expected):
    assert check_countdown(expression, ANSWER) == expected


def test_partial_credit_is_off_by_default_and_only_for_honest_misses():
    assert check_countdown("5+3+8", ANSWER) == 0.0
    assert check_countdown("5+3+8", ANSWER, partial_credit=0.1) == 0.1
    assert check_countdown("5+3+7", ANSWER, partial_credit=0.1) == 0.0  # wrong numbers get nothing
    assert check_countdown("5*3+8", "not a gold answer") == 0.0


def test_reward_reads_the_last_box_of_plain_and_chat_completions():
    reward = resolve_reward("countdown_exact")
    completions = [
        "5*3=15\n15+8=23\n\\boxed{5*3+8}",
        [{"role": "assistant", "content": "\\boxed{8+3*5}"}],
        "\\boxed{23}",
        "no box",
        None,
    ]
    assert reward(completions, answer=[ANSWER] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    shaped = resolve_reward("countdown_exact", partial_credit=0.2)
    assert shaped(["\\boxed{5+3+8}"], answer=[ANSWER]) == [0.2]
    with pytest.raises(ValueError, match="partial_credit"):
        resolve_reward("countdown_exact", partial_credit=1.5)


def test_a_spread_of_difficulty_mixes_problem_sizes_and_keeps_fixed_size_problems_unchanged():
    """countdown_min_numbers draws each problem's size; unset, the problem list is the same as before."""
    mixed = ArithmeticTask(domains=["countdown"], eval_fraction=0.2, countdown_min_numbers=2, countdown_min_paths=3)
    sizes = [len(parse_gold(problem.answer)[1]) for problem in generate_problems(mixed, "train", 200, seed=0)]
    assert set(sizes) == {2, 3} and 0.3 < sizes.count(2) / len(sizes) < 0.7
    for problem in generate_problems(mixed, "train", 200, seed=0):
        target, numbers = parse_gold(problem.answer)
        assert check_countdown(last_boxed(problem.solution), problem.answer) == 1.0
        assert len(solution_paths(tuple(numbers))[target]) >= (2 if len(numbers) == 2 else 3)
    same_size = ArithmeticTask(domains=["countdown"], eval_fraction=0.2, countdown_min_numbers=3)
    assert generate_problems(same_size, "train", 50, seed=0) == generate_problems(TASK, "train", 50, seed=0)


@pytest.mark.parametrize("value", [1, 4])
def test_countdown_min_numbers_out_of_range_names_the_key(value):
    with pytest.raises(ValueError, match="countdown_min_numbers"):
        ArithmeticTask(domains=["countdown"], countdown_min_numbers=value).validate()
