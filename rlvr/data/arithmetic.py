"""The embedded verifiable task: multi-step integer arithmetic with a boxed answer.

A problem is a chain of operations, e.g. ``Compute: 23+45-17``. Its worked solution writes one step
per line, left to right, and ends with the answer in ``\\boxed{}``::

    23+45=68
    68-17=51
    \\boxed{51}

Problems come from one or more *domains*, skills that tiny dense models can learn apart (the inputs
of Branch-Train-MiX upcycling): ``addition`` (chains of + and -) and ``multiplication`` (a product of
two factors, then + or - further numbers, e.g. ``7*8+3``; the product comes first, so left to right is
also the usual order of operations); ``reverse`` (``Reverse: cabd`` -> ``\\boxed{dbac}``) shares no
solution token with them but the box, a domain pair with real seams. ``countdown``
(:mod:`rlvr.data.countdown`) asks to reach a target from given numbers and has several solution paths
per problem.

Generation is deterministic for a seed. Train and eval problems come from disjoint halves of the
problem space (a hash of the problem text decides which split a problem belongs to), so an eval
problem can never appear in training, whatever the seeds and sizes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from rlvr.data.countdown import gold_answer, random_countdown, worked_steps
from rlvr.utils.options import option

SPLITS = ("train", "eval")
DOMAINS = ("addition", "multiplication", "countdown", "reverse")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class ArithmeticTask:
    """Distribution of problems. Each field is a knob of the ``data.task`` config section."""

    min_terms: int = option(2, "fewest numbers in a problem (>= 2)")
    max_terms: int = option(3, "most numbers in a problem")
    max_operand: int = option(50, "numbers are drawn from 1..max_operand")
    operators: str = option("+-", "operators to draw from, a subset of '+-'")
    eval_fraction: float = option(0.1, "share of the problem space reserved for eval")
    domains: list = option(
        ["addition"],
        "skills problems are drawn from, uniformly: addition (+/- chains), multiplication (a*b then +/-), "
        "countdown (reach a target from given numbers), reverse (write a word of letters backwards)",
    )
    max_factor: int = option(9, "multiplication: factors are drawn from 2..max_factor")
    countdown_numbers: int = option(3, "countdown: numbers to combine, each used once")
    countdown_min_numbers: int = option(
        0,
        "countdown: a spread of difficulty: each problem combines countdown_min_numbers..countdown_numbers "
        "numbers, drawn uniformly (0: always countdown_numbers; two numbers need min(countdown_min_paths, 2) paths)",
    )
    countdown_max: int = option(9, "countdown: numbers are drawn from 1..countdown_max")
    countdown_min_paths: int = option(2, "countdown: only targets reachable by at least this many expressions")
    reverse_alphabet: int = option(10, "reverse: words use the first this many lowercase letters (2..26)")
    reverse_min_length: int = option(3, "reverse: shortest word")
    reverse_max_length: int = option(5, "reverse: longest word")

    def validate(self) -> None:
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"need 2 <= min_terms <= max_terms, got {self.min_terms} and {self.max_terms}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.operators or set(self.operators) - set("+-"):
            raise ValueError(f"operators must be a non-empty subset of '+-', got {self.operators!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if (
            not self.domains
            or any(domain not in DOMAINS for domain in self.domains)
            or len(set(self.domains)) < len(self.domains)
        ):
            raise ValueError(f"domains must be distinct names from {', '.join(DOMAINS)}; got {self.domains}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
        if not 2 <= self.countdown_numbers <= 5:
            raise ValueError(f"countdown_numbers must be in 2..5, got {self.countdown_numbers}")
        if self.countdown_min_numbers and not 2 <= self.countdown_min_numbers <= self.countdown_numbers:
            raise ValueError(
                f"countdown_min_numbers must be 0 (off) or in 2..countdown_numbers ({self.countdown_numbers}), "
                f"got {self.countdown_min_numbers}"
            )
        if not 2 <= self.reverse_alphabet <= len(LETTERS):
            raise ValueError(f"reverse_alphabet must be in 2..{len(LETTERS)}, got {self.reverse_alphabet}")
        if not 1 <= self.reverse_min_length <= self.reverse_max_length:
            raise ValueError(
                f"need 1 <= reverse_min_length <= reverse_max_length, got {self.reverse_min_length} "
                f"and {self.reverse_max_length}"
            )
        if self.countdown_max < 2 or self.countdown_min_paths < 1:
            raise ValueError(
                f"need countdown_max >= 2 and countdown_min_paths >= 1, got {self.countdown_max} "
                f"and {self.countdown_min_paths}"
            )


@dataclass(frozen=True)
class Problem:
    question: str  # what the user asks, e.g. "Compute: 23+45-17"
    expression: str  # "23+45-17"
    solution: str  # worked steps ending in \boxed{answer}
    answer: str  # "51"
    domain: str = "addition"  # one of DOMAINS


def split_of(expression: str, eval_fraction: float) -> str:
    """Which split owns a problem: a stable hash of its text, independent of seeds."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def solve(terms: list[int], operators: list[str]) -> tuple[str, int]:
    """Worked left-to-right solution of ``terms[0] op terms[1] op ...`` and its value."""
    lines, value = worked_steps(terms, operators)
    return "\n".join([*lines, f"\\boxed{{{value}}}"]), value


def _random_problem(task: ArithmeticTask, rng: random.Random) -> Problem:
    domain = task.domains[0] if len(task.domains) == 1 else rng.choice(task.domains)
    if domain == "countdown":
        return _countdown_problem(task, rng)
    if domain == "reverse":
        return _reverse_problem(task, rng)
    num_terms = rng.randint(task.min_terms, task.max_terms)
    if domain == "multiplication":
        terms = [rng.randint(2, task.max_factor), rng.randint(2, task.max_factor)]
        terms += [rng.randint(1, task.max_operand) for _ in range(num_terms - 2)]
        operators = ["*"] + [rng.choice(task.operators) for _ in range(num_terms - 2)]
    else:
        terms = [rng.randint(1, task.max_operand) for _ in range(num_terms)]
        operators = [rng.choice(task.operators) for _ in range(num_terms - 1)]
    expression = str(terms[0]) + "".join(f"{op}{t}" for op, t in zip(operators, terms[1:], strict=True))
    solution, value = solve(terms, operators)
    return Problem(
        question=f"Compute: {expression}", expression=expression, solution=solution, answer=str(value), domain=domain
    )


def _countdown_problem(task: ArithmeticTask, rng: random.Random) -> Problem:
    count, min_paths = task.countdown_numbers, task.countdown_min_paths
    if task.countdown_min_numbers and task.countdown_min_numbers < count:  # else the draws of a fixed count
        count = rng.randint(task.countdown_min_numbers, count)
    if count == 2:  # two numbers reach a target in at most two ways (a+b and b+a; a*b and b*a)
        min_paths = min(min_paths, 2)
    drawn = None
    while drawn is None:  # numbers that reach no target in min_paths ways are drawn again
        drawn = random_countdown(rng, count, task.countdown_max, min_paths)
    numbers, target, solution = drawn
    listed = ", ".join(map(str, numbers))
    return Problem(
        question=f"Reach {target} with {listed}: use each number once and + - *.",
        expression=gold_answer(numbers, target),
        solution=solution,
        answer=gold_answer(numbers, target),
        domain="countdown",
    )


def _reverse_problem(task: ArithmeticTask, rng: random.Random) -> Problem:
    """A word of random letters to write backwards; its solution shares no token with arithmetic's but the box."""
    length = rng.randint(task.reverse_min_length, task.reverse_max_length)
    word = "".join(rng.choice(LETTERS[: task.reverse_alphabet]) for _ in range(length))
    backwards = word[::-1]
    return Problem(
        question=f"Reverse: {word}",
        expression=f"reverse {word}",
        solution=f"\\boxed{{{backwards}}}",
        answer=backwards,
        domain="reverse",
    )


def _larger_space_hint(task: ArithmeticTask) -> str:
    hints = []
    if "reverse" in task.domains:
        hints.append("raise reverse_alphabet or reverse_max_length")
    if any(domain in ("addition", "multiplication") for domain in task.domains):
        hints.append("raise max_operand or max_terms")
    if "countdown" in task.domains:
        hints.append("raise countdown_max or lower countdown_min_paths")
    return " / ".join(hints)


def generate_problems(task: ArithmeticTask, split: str, count: int, seed: int) -> list[Problem]:
    """``count`` distinct problems of one split, the same list for the same arguments.

    Raises if the split's share of the problem space is too small to hold ``count`` distinct problems.
    """
    task.validate()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # Seed from (seed, split) so that the train and eval streams differ even for the same seed.
    rng = random.Random(f"{seed}:{split}")
    problems: dict[str, Problem] = {}
    attempts, max_attempts = 0, 200 * count + 1000
    while len(problems) < count:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could only find {len(problems)} distinct {split} problems out of {count} requested; "
                f"{_larger_space_hint(task)}, or ask for fewer problems"
            )
        problem = _random_problem(task, rng)
        if problem.expression not in problems and split_of(problem.expression, task.eval_fraction) == split:
            problems[problem.expression] = problem
    return list(problems.values())
