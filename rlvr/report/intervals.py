"""Intervals and verdicts for the compare report: a paired bootstrap over seeds and shared eval problems.

Every arm of a compare is evaluated on the same problems, so arm differences are paired by problem.
Each bootstrap replicate draws the problems with replacement (one draw shared by every arm: the
pairing) and, for each arm, its seeds with replacement; an arm's score is the mean over the drawn
seeds of the mean over the drawn problems (Efron & Tibshirani, 1993, ch. 13, percentile intervals;
resampling both levels follows the two-stage bootstrap of Davison & Hinkley, 1997, sec. 3.8).

Runs that share more than an RL seed (an upcycling compare's runs built from one construction seed share
their starting policy) are not independent draws: given ``clusters`` (a cluster id per run), a replicate
draws whole clusters with replacement instead of runs, the same clusters for both arms of a paired
difference (the cluster bootstrap, Davison & Hinkley, 1997, sec. 3.8), so the interval covers how much
the result depends on how the starting policy was built. Plain numpy, no training stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REPLICATES = 4000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float  # the statistic on the data as observed
    low: float
    high: float

    def format(self, digits: int = 3, signed: bool = False) -> str:
        if math.isnan(self.estimate):
            return "n/a"
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}]"


def _scores(per_seed: list[list[float]]) -> np.ndarray:
    """(seeds, problems) scores; every seed must score the same problems."""
    lengths = {len(scores) for scores in per_seed}
    if len(lengths) != 1:
        raise ValueError(f"every seed must score the same problems; got lengths {sorted(lengths)}")
    return np.asarray(per_seed, dtype=np.float64)


def _replicate_means(scores: np.ndarray, problem_draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(replicates,) mean over resampled seeds of the mean over the shared resampled problems."""
    seeds = scores.shape[0]
    seed_draws = rng.integers(0, seeds, size=(problem_draws.shape[0], seeds))  # (R, S)
    per_seed = scores[:, problem_draws].mean(axis=2)  # (S, R): each seed's mean over the drawn problems
    return np.take_along_axis(per_seed.T, seed_draws, axis=1).mean(axis=1)  # (R,)


def _cluster_index(clusters: list, runs: int) -> tuple[np.ndarray, list]:
    """(S,) index of each run's cluster in the sorted distinct cluster ids, and those ids."""
    if len(clusters) != runs:
        raise ValueError(f"clusters: one id per run needed, got {len(clusters)} for {runs} runs")
    distinct = sorted(set(clusters))
    return np.asarray([distinct.index(cluster) for cluster in clusters]), distinct


def _cluster_means(scores: np.ndarray, problem_draws: np.ndarray, index: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(replicates,) mean over the runs of the drawn clusters (each as often as drawn) of the mean over the
    drawn problems. ``draws``: (R, C) cluster draws."""
    per_seed = scores[:, problem_draws].mean(axis=2).T  # (R, S)
    counts = np.stack([(draws == cluster).sum(axis=1) for cluster in range(index.max() + 1)], axis=1)  # (R, C)
    weights = counts[:, index].astype(np.float64)  # (R, S): how often each run's cluster was drawn
    return (weights * per_seed).sum(axis=1) / weights.sum(axis=1)


def _percentiles(values: np.ndarray, estimate: float) -> Interval:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def mean_interval(
    per_seed: list[list[float]], replicates: int = REPLICATES, seed: int = 0, clusters: list | None = None
) -> Interval:
    """Mean score over seeds x problems with its bootstrap interval (``clusters``: resample those instead
    of runs)."""
    if not per_seed or not per_seed[0]:
        return Interval(math.nan, math.nan, math.nan)
    scores = _scores(per_seed)
    rng = np.random.default_rng(seed)
    problems = rng.integers(0, scores.shape[1], size=(replicates, scores.shape[1]))  # (R, N)
    if clusters is None:
        return _percentiles(_replicate_means(scores, problems, rng), float(scores.mean()))
    index, distinct = _cluster_index(clusters, scores.shape[0])
    draws = rng.integers(0, len(distinct), size=(replicates, len(distinct)))  # (R, C)
    return _percentiles(_cluster_means(scores, problems, index, draws), float(scores.mean()))


def paired_difference(
    arm: list[list[float]],
    baseline: list[list[float]],
    replicates: int = REPLICATES,
    seed: int = 0,
    clusters: tuple[list, list] | None = None,
) -> Interval:
    """Mean score of ``arm`` minus that of ``baseline`` (same eval problems, in the same order), with its
    bootstrap interval; problems are drawn once per replicate for both, seeds separately for each, or
    (``clusters``: the cluster ids of the arm's runs and of the baseline's) the same clusters for both."""
    if not arm or not baseline or not arm[0] or not baseline[0]:
        return Interval(math.nan, math.nan, math.nan)
    arm_scores, baseline_scores = _scores(arm), _scores(baseline)
    if arm_scores.shape[1] != baseline_scores.shape[1]:
        raise ValueError(f"arms scored different problems: {arm_scores.shape[1]} vs {baseline_scores.shape[1]}")
    rng = np.random.default_rng(seed)
    problems = rng.integers(0, arm_scores.shape[1], size=(replicates, arm_scores.shape[1]))  # (R, N)
    estimate = float(arm_scores.mean() - baseline_scores.mean())
    if clusters is None:
        differences = _replicate_means(arm_scores, problems, rng) - _replicate_means(baseline_scores, problems, rng)
        return _percentiles(differences, estimate)
    arm_index, arm_distinct = _cluster_index(clusters[0], arm_scores.shape[0])
    baseline_index, baseline_distinct = _cluster_index(clusters[1], baseline_scores.shape[0])
    if arm_distinct != baseline_distinct:
        raise ValueError(f"paired clusters differ: {arm_distinct} vs {baseline_distinct}")
    draws = rng.integers(0, len(arm_distinct), size=(replicates, len(arm_distinct)))  # (R, C), shared
    differences = _cluster_means(arm_scores, problems, arm_index, draws) - _cluster_means(
        baseline_scores, problems, baseline_index, draws
    )
    return _percentiles(differences, estimate)


def verdict(
    arm: str,
    baseline: str,
    difference: Interval,
    token_share: float | None = None,
    decoded_share: float | None = None,
) -> str:
    """One line in plain words, e.g. ``forking vs full: -0.008 [-0.040, +0.030], no detectable difference``;
    ``token_share`` / ``decoded_share``: the arm's gradient / decoded tokens relative to the baseline's."""
    if math.isnan(difference.estimate):
        return f"{arm} vs {baseline}: n/a (no per-problem eval records)"
    if difference.low > 0:
        finding = f"better than {baseline}"
    elif difference.high < 0:
        finding = f"worse than {baseline}"
    else:
        finding = "no detectable difference"
    shares = []
    if token_share is not None and not math.isnan(token_share):
        shares.append(f"{token_share:.0%} of the gradient tokens")
    if decoded_share is not None and not math.isnan(decoded_share):
        shares.append(f"{decoded_share:.0%} of the decoded tokens")
    tokens = f" with {' and '.join(shares)}" if shares else ""
    return f"{arm} vs {baseline}: {difference.format(signed=True)}, {finding}{tokens}"
