"""Countdown: reach a target from given numbers with + - * (each number exactly once).

Unlike a fixed chain of operations, a countdown problem has several valid solution paths, so a policy
must *choose* which two numbers and which operation come next: genuine forking decisions, the regime
*Beyond the 80/20 Rule* (Wang et al., 2025) studies. A worked solution combines the numbers left to
right, one step per line, and boxes the whole expression::

    Reach 23 with 3, 5, 8: use each number once and + - *.

    5*3=15
    15+8=23
    \\boxed{5*3+8}

The warm start trains on one valid path drawn at random per problem, so that the policy's
uncertainty sits on the choice of numbers and operations. :func:`check_countdown` verifies an answer
(the boxed expression uses exactly the given numbers and equals the target); the gold answer string
carries both (``"23 from 3,5,8"``), so every evaluator that passes ``answer=`` can check it.
"""

from __future__ import annotations

import ast
import random
from functools import lru_cache
from itertools import permutations, product

OPERATORS = "+-*"
MAX_EXPRESSION_CHARS = 100  # longer boxed answers are not parsed (hostile inputs stay cheap)


def worked_steps(terms, operators) -> tuple[list[str], int]:
    """The left-to-right combination one step per line (``5*3=15``), and its value. Shared with the
    arithmetic task's solutions."""
    lines, value = [], terms[0]
    for operator, term in zip(operators, terms[1:], strict=True):
        result = {"+": value + term, "-": value - term, "*": value * term}[operator]
        lines.append(f"{value}{operator}{term}={result}")
        value = result
    return lines, value


def left_to_right(terms: tuple[int, ...], operators: tuple[str, ...]) -> int:
    return worked_steps(terms, operators)[1]


def expression_text(terms: tuple[int, ...], operators: tuple[str, ...]) -> str:
    """The left-to-right combination as an ordinary expression: ``(3+5)*8``, ``5*3+8``."""
    text, has_sum = str(terms[0]), False
    for operator, term in zip(operators, terms[1:], strict=True):
        if operator == "*" and has_sum:
            text, has_sum = f"({text})*{term}", False
        else:
            text, has_sum = f"{text}{operator}{term}", has_sum or operator in "+-"
    return text


@lru_cache(maxsize=4096)
def solution_paths(numbers: tuple[int, ...]) -> dict[int, list[tuple[tuple[int, ...], tuple[str, ...]]]]:
    """Every left-to-right path over all the numbers, by the value it reaches (distinct expressions)."""
    paths: dict[int, dict[str, tuple]] = {}
    for terms in set(permutations(numbers)):
        for operators in product(OPERATORS, repeat=len(numbers) - 1):
            value = left_to_right(terms, operators)
            paths.setdefault(value, {}).setdefault(expression_text(terms, operators), (terms, operators))
    return {value: sorted(found.values()) for value, found in paths.items()}


def worked_solution(terms: tuple[int, ...], operators: tuple[str, ...]) -> str:
    lines, _ = worked_steps(terms, operators)
    return "\n".join([*lines, f"\\boxed{{{expression_text(terms, operators)}}}"])


def random_countdown(
    rng: random.Random, count: int, largest: int, min_paths: int
) -> tuple[tuple[int, ...], int, str] | None:
    """(numbers, target, worked solution of a random valid path); None when the drawn numbers reach no
    positive target in at least ``min_paths`` ways (the caller draws again)."""
    numbers = tuple(sorted(rng.randint(1, largest) for _ in range(count)))
    paths = solution_paths(numbers)
    targets = sorted(value for value, found in paths.items() if value > 0 and len(found) >= min_paths)
    if not targets:
        return None
    target = rng.choice(targets)
    terms, operators = rng.choice(paths[target])
    return numbers, target, worked_solution(terms, operators)


def gold_answer(numbers: tuple[int, ...], target: int) -> str:
    return f"{target} from {','.join(map(str, numbers))}"


def parse_gold(answer: str) -> tuple[int, list[int]] | None:
    """``"23 from 3,5,8"`` -> (23, [3, 5, 8]); None if it is not in that form."""
    try:
        target, _, numbers = str(answer).partition(" from ")
        return int(target), sorted(int(n) for n in numbers.split(","))
    except ValueError:
        return None


def _evaluate(node: ast.AST, constants: list[int]) -> int:
    """An expression of non-negative integers, +, - and * only (parentheses allowed)."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, constants)
    if isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0:
        constants.append(node.value)
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = _evaluate(node.left, constants), _evaluate(node.right, constants)
        return (
            left + right
            if isinstance(node.op, ast.Add)
            else left - right
            if isinstance(node.op, ast.Sub)
            else left * right
        )
    raise ValueError("only integers, +, - and * are allowed")


def check_countdown(expression: str | None, answer: str, partial_credit: float = 0.0) -> float:
    """1.0 when ``expression`` uses exactly the answer's numbers (each once) and equals its target;
    ``partial_credit`` when it uses them exactly but misses the target; else 0.0. Never raises."""
    gold = parse_gold(answer)
    if expression is None or gold is None or len(expression) > MAX_EXPRESSION_CHARS:
        return 0.0
    target, numbers = gold
    if any(char not in "0123456789+-*() " for char in expression):
        return 0.0
    try:
        constants: list[int] = []
        value = _evaluate(ast.parse(expression.strip(), mode="eval"), constants)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0
    if sorted(constants) != numbers:
        return 0.0
    return 1.0 if value == target else partial_credit
