"""Math accuracy: math-verify equivalence of the completion's answer and the gold answer, bounded and safe.

``math_accuracy`` is a ready instance of :class:`MathAccuracy` with the defaults; build your own for
other budgets or rules (``MathAccuracy(budget_seconds=5, workers=4, float_rounding=3)``). See
:mod:`rlvr.rewards.verifier` for the safety model and :mod:`rlvr.rewards.extraction` for where the
answer is looked for.
"""

from __future__ import annotations

import multiprocessing
import threading

from rlvr.rewards.equivalence import ERROR, OK, PARSE_FAILURE, TIMEOUT, VerifySettings, verify_span
from rlvr.rewards.extraction import DEFAULT_FALLBACKS, FALLBACKS, find_answer, gold_answer_text
from rlvr.rewards.pool import WorkerPool
from rlvr.rewards.verifier import RewardStats

GOLD_COLUMNS = ("answer", "solution")  # rlvr's datasets, and TRL's math datasets (accuracy_reward)


class MathAccuracy:
    """TRL reward function: 1.0 when the answer is mathematically equal to the gold answer, else 0.0.

    Args:
        budget_seconds: time allowed per completion; a completion that exceeds it scores ``failure_score``.
        failure_score: score of a completion whose verification timed out or failed unexpectedly.
        workers: verification processes (the hard budget: a stuck one is killed and replaced). ``0``
            verifies in the calling process with math-verify's signal timeouts, which bound Python-level
            work in the main thread only; other threads then fall back to one worker process. The
            default, 2, was measured fastest (``benchmarks/reward_throughput.py``, 2 CPU cores).
        fallbacks: where to look when there is no ``\\boxed{}``, any of ``answer_tag``, ``latex``,
            ``last_number`` (see :mod:`rlvr.rewards.extraction`); ``()`` scores only boxed answers.
        max_answer_chars: longest answer span (box or tag content, text tail) passed to math-verify.
        gold_column: the keyword that holds the gold answers; None reads ``answer``, else ``solution``.
        float_rounding, numeric_precision, strict, allow_set_relation_comp: math-verify's ``verify``
            settings (see :class:`rlvr.rewards.equivalence.VerifySettings`).
    """

    __name__ = "math_accuracy"  # TRL names reward columns after the function

    def __init__(
        self,
        budget_seconds: float = 2.0,
        failure_score: float = 0.0,
        workers: int = 2,
        fallbacks: tuple[str, ...] = DEFAULT_FALLBACKS,
        max_answer_chars: int = 1000,
        gold_column: str | None = None,
        float_rounding: int = 6,
        numeric_precision: int = 15,
        strict: bool = True,
        allow_set_relation_comp: bool = False,
    ):
        if budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        unknown = [f for f in fallbacks if f not in FALLBACKS]
        if unknown:
            raise ValueError(f"fallbacks must be among {', '.join(FALLBACKS)}; got {unknown}")
        if max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {max_answer_chars}")
        self.budget_seconds, self.failure_score, self.workers = budget_seconds, failure_score, workers
        self.fallbacks, self.max_answer_chars, self.gold_column = tuple(fallbacks), max_answer_chars, gold_column
        self.settings = VerifySettings(float_rounding, numeric_precision, strict, allow_set_relation_comp)
        self.stats = RewardStats()
        self._pool: WorkerPool | None = None

    def __call__(self, completions: list, **columns: object) -> list[float]:
        completions = list(completions or [])
        golds = self._golds(columns, len(completions))
        self.stats.calls += 1
        scores = [0.0] * len(completions)
        jobs, positions = [], []
        for position, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
            try:
                span = find_answer(completion, self.fallbacks, self.max_answer_chars)
                gold_text = gold_answer_text(gold)
            except Exception:  # noqa: BLE001 -- e.g. an object whose str() raises
                span = gold_text = None
            if span is None or gold_text is None:
                self.stats.no_answer += 1
                continue
            jobs.append((span.kind, span.text, span.fallbacks, gold_text))
            positions.append(position)
        for position, (score, outcome) in zip(positions, self._verify(jobs), strict=True):
            if outcome == OK:
                scores[position] = score
            elif outcome == PARSE_FAILURE:
                self.stats.parse_failures += 1
            else:
                scores[position] = self.failure_score
                if outcome == TIMEOUT:
                    self.stats.timeouts += 1
                else:
                    self.stats.errors += 1
        self.stats.scored += len(completions)
        self.stats.total += sum(scores)
        return scores

    def _golds(self, columns: dict, count: int) -> list:
        """The gold answers, one per completion (missing ones are None and score 0)."""
        names = (self.gold_column,) if self.gold_column else GOLD_COLUMNS
        name = next((n for n in names if columns.get(n) is not None), None)
        if name is None:
            expected = " or ".join(f"{n}=" for n in names)
            raise TypeError(f"math_accuracy needs the gold answers as {expected} (got keywords: {sorted(columns)})")
        golds = list(columns[name])[:count]
        return golds + [None] * (count - len(golds))

    def _verify(self, jobs: list[tuple]) -> list[tuple[float, str]]:
        if not jobs:
            return []
        in_main_thread = threading.current_thread() is threading.main_thread()
        if self.workers == 0 and (in_main_thread or multiprocessing.current_process().daemon):
            return [
                verify_span(
                    *job, settings=self.settings, budget_seconds=self.budget_seconds, use_signals=in_main_thread
                )
                for job in jobs
            ]
        if self._pool is None:
            self._pool = WorkerPool(max(self.workers, 1), self.budget_seconds, settings=self.settings)
        try:
            return self._pool.verify(jobs)
        except Exception:  # noqa: BLE001 -- the pool itself broke: score everything as failed
            return [(0.0, ERROR)] * len(jobs)

    def pop_stats(self) -> RewardStats:
        stats, self.stats = self.stats, RewardStats()
        return stats

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __getstate__(self):  # picklable (e.g. into a dataloader worker): the pool is not carried
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


math_accuracy = MathAccuracy()
