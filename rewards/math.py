"""Math accuracy: math-verify equivalence of the completion's answer and the gold answer, bounded and safe.

``math_accuracy`` is a ready instance of :class:`MathAccuracy` with the defaults; build your own for
other budgets (``MathAccuracy(budget_seconds=5, workers=4)``). See :mod:`rewards.verifier` for the
safety model.
"""

from __future__ import annotations

import multiprocessing
import threading

from rewards.pool import ERROR, OK, PARSE_FAILURE, TIMEOUT, WorkerPool, verify_pair
from rewards.verifier import RewardStats, extract_answer, gold_answer_text


class MathAccuracy:
    """TRL reward function: 1.0 when the answer is mathematically equal to the gold answer, else 0.0.

    Args:
        budget_seconds: time allowed per completion; a completion that exceeds it scores ``failure_score``.
        failure_score: score of a completion whose verification timed out or failed unexpectedly.
        workers: verification processes (the hard budget: a stuck one is killed and replaced). ``0``
            verifies in the calling process with math-verify's signal timeouts, which bound Python-level
            work in the main thread only; other threads then fall back to one worker process. The
            default, 2, was measured fastest (``benchmarks/reward_throughput.py``, 2 CPU cores:
            1.2-1.6x math-verify called directly at 64-512 completions per call; 1 worker: 0.9-1.1x).
        fallbacks: where to look when there is no ``\\boxed{}``: ``answer_tag``, ``last_number``.
        max_answer_chars: longest answer span passed to math-verify (from the end).
    """

    __name__ = "math_accuracy"  # TRL names reward columns after the function

    def __init__(
        self,
        budget_seconds: float = 2.0,
        failure_score: float = 0.0,
        workers: int = 2,
        fallbacks: tuple[str, ...] = ("answer_tag", "last_number"),
        max_answer_chars: int = 1000,
    ):
        if budget_seconds <= 0:
            raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.budget_seconds, self.failure_score, self.workers = budget_seconds, failure_score, workers
        self.fallbacks, self.max_answer_chars = tuple(fallbacks), max_answer_chars
        self.stats = RewardStats()
        self._pool: WorkerPool | None = None

    def __call__(self, completions: list, answer: list | None = None, **_: object) -> list[float]:
        completions = list(completions or [])
        golds = list(answer) if answer is not None else [None] * len(completions)
        golds += [None] * (len(completions) - len(golds))
        self.stats.calls += 1
        scores = [0.0] * len(completions)
        pairs, positions = [], []
        for position, (completion, gold) in enumerate(zip(completions, golds)):
            try:
                answer_text = extract_answer(completion, self.fallbacks, self.max_answer_chars)
                gold_text = gold_answer_text(gold)
            except Exception:  # noqa: BLE001 -- e.g. an object whose str() raises
                answer_text = gold_text = None
            if answer_text is None or gold_text is None:
                self.stats.no_answer += 1
                continue
            pairs.append((answer_text, gold_text))
            positions.append(position)
        for position, (score, outcome) in zip(positions, self._verify(pairs)):
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

    def _verify(self, pairs: list[tuple[str, str]]) -> list[tuple[float, str]]:
        if not pairs:
            return []
        in_main_thread = threading.current_thread() is threading.main_thread()
        if self.workers == 0 and (in_main_thread or multiprocessing.current_process().daemon):
            return [verify_pair(a, g, self.budget_seconds, use_signals=in_main_thread) for a, g in pairs]
        if self._pool is None:
            self._pool = WorkerPool(max(self.workers, 1), self.budget_seconds)
        try:
            return self._pool.verify(pairs)
        except Exception:  # noqa: BLE001 -- the pool itself broke: score everything as failed
            return [(0.0, ERROR)] * len(pairs)

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
