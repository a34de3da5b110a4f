"""The safety model of the math reward, and the counters it logs.

Real RL runs die in reward functions, and learn to game weak ones. Here every completion is scored
within ``budget_seconds`` whatever it holds, from any thread or process; a failure is scored
``failure_score`` and counted, never raised; a look-alike wrong answer scores 0:

1. Cheap, linear-time preparation in the caller (:mod:`rlvr.rewards.extraction`): the completion's
   text (plain or chat messages) is cut to its answer span -- the last ``\\boxed{...}`` or, failing
   that, the configured fallbacks -- and a span longer than ``max_answer_chars`` is no answer.
2. math-verify ``parse`` + ``verify`` of the span against the gold answer
   (:mod:`rlvr.rewards.equivalence`) in a worker process (:class:`rlvr.rewards.pool.WorkerPool`),
   whose main thread may use math-verify's own signal timeouts and which the caller kills and
   replaces when it misses the deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewardStats:
    """Counts since the last :meth:`pop`: what the trainer logs per reward function."""

    calls: int = 0
    scored: int = 0
    total: float = 0.0
    no_answer: int = 0  # no boxed answer and no fallback matched, or unusable gold answer
    parse_failures: int = 0  # math-verify could not parse the answer or the gold
    timeouts: int = 0
    errors: int = 0
    extra: dict = field(default_factory=dict)

    def as_metrics(self, name: str) -> dict[str, float]:
        n = max(self.scored, 1)
        return {
            f"rewards/{name}/failures": float(self.timeouts + self.errors),
            f"rewards/{name}/timeouts": float(self.timeouts),
            f"rewards/{name}/parse_failure_rate": (self.parse_failures + self.no_answer) / n,
        }
