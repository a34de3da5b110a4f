"""Bootstrap intervals and verdicts of the compare report: hand-computed cases and an exhaustive bootstrap."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rlvr.report.intervals import Interval, mean_interval, paired_difference, verdict


def test_constant_scores_have_a_zero_width_interval():
    assert mean_interval([[1, 1, 1], [1, 1, 1]]) == Interval(1.0, 1.0, 1.0)
    assert mean_interval([[0, 0, 0, 0]]) == Interval(0.0, 0.0, 0.0)


def test_a_constant_shift_is_found_exactly():
    rng = np.random.default_rng(1)
    baseline = rng.random((3, 50)).tolist()
    shifted = [[value + 0.1 for value in seed] for seed in baseline]
    difference = paired_difference(shifted, baseline)
    assert difference.estimate == pytest.approx(0.1)
    # every replicate draws the same problems for both arms, but each arm its own seeds: the interval is
    # the shift plus the spread of seed means, and contains the shift
    assert difference.low <= 0.1 <= difference.high
    one_seed = paired_difference([shifted[0]], [baseline[0]])
    assert one_seed.low == pytest.approx(0.1) and one_seed.high == pytest.approx(0.1)  # fully paired: no noise


def test_identical_arms_differ_by_exactly_zero():
    scores = [[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    difference = paired_difference(scores, scores)
    assert difference.estimate == 0.0 and difference.low <= 0.0 <= difference.high
    assert paired_difference([scores[0]], [scores[0]]) == Interval(0.0, 0.0, 0.0)


def test_one_seed_matches_the_exhaustive_bootstrap():
    """With one seed only the problems are resampled: every one of the n^n resamples of 5 problems,
    enumerated, gives the exact bootstrap distribution; the Monte Carlo percentiles must match it."""
    scores = [0.0, 1.0, 1.0, 0.0, 1.0]
    n = len(scores)
    exact = np.array([np.mean([scores[i] for i in draw]) for draw in itertools.product(range(n), repeat=n)])
    low, high = np.percentile(exact, [2.5, 97.5])
    interval = mean_interval([scores], replicates=200_000)
    assert interval.estimate == pytest.approx(0.6)
    assert interval.low == pytest.approx(low, abs=0.01) and interval.high == pytest.approx(high, abs=0.01)


def test_paired_one_seed_difference_matches_the_exhaustive_bootstrap():
    arm, base = [1, 1, 0, 1], [0, 1, 0, 0]
    n = len(arm)
    exact = np.array([np.mean([arm[i] - base[i] for i in draw]) for draw in itertools.product(range(n), repeat=n)])
    low, high = np.percentile(exact, [2.5, 97.5])
    interval = paired_difference([arm], [base], replicates=200_000)
    assert interval.estimate == pytest.approx(0.5)
    assert interval.low == pytest.approx(low, abs=0.01) and interval.high == pytest.approx(high, abs=0.01)


def test_pairing_narrows_the_interval():
    """Two arms that agree on which problems are hard: the paired interval of their difference is much
    narrower than what two independent intervals would suggest."""
    rng = np.random.default_rng(0)
    difficulty = rng.random(200)
    base = [(difficulty > 0.5).astype(float).tolist()]
    arm = [((difficulty > 0.5) | (rng.random(200) < 0.15)).astype(float).tolist()]
    paired = paired_difference(arm, base)
    separate = mean_interval(arm), mean_interval(base)
    assert paired.high - paired.low < 0.5 * (
        (separate[0].high - separate[0].low) + (separate[1].high - separate[1].low)
    )
    assert paired.low > 0  # the arm only adds right answers: the paired test sees it


def test_bad_inputs_are_refused_and_empty_inputs_are_nan():
    with pytest.raises(ValueError, match="same problems"):
        mean_interval([[1, 0], [1]])
    with pytest.raises(ValueError, match="different problems"):
        paired_difference([[1, 0]], [[1, 0, 1]])
    assert math.isnan(mean_interval([]).estimate) and math.isnan(paired_difference([[1]], []).estimate)


@pytest.mark.parametrize(
    "interval, expected",
    [
        (
            Interval(-0.008, -0.04, 0.03),
            "forking vs full: -0.008 [-0.040, +0.030], no detectable difference with 20% of the gradient tokens",
        ),
        (
            Interval(-0.22, -0.27, -0.17),
            "forking vs full: -0.220 [-0.270, -0.170], worse than full with 20% of the gradient tokens",
        ),
        (
            Interval(0.05, 0.01, 0.09),
            "forking vs full: +0.050 [+0.010, +0.090], better than full with 20% of the gradient tokens",
        ),
        (Interval(math.nan, math.nan, math.nan), "forking vs full: n/a (no per-problem eval records)"),
    ],
)
def test_verdicts_say_what_the_interval_says(interval, expected):
    assert verdict("forking", "full", interval, token_share=0.2) == expected


CLUSTERS = [0, 0, 1, 1, 1, 2]  # construction seed of each run (uneven on purpose)


def _exhaustive_cluster_means(values, clusters):
    """Every one of the C^C cluster draws, enumerated: the mean over the drawn clusters' runs."""
    distinct = sorted(set(clusters))
    means = []
    for draw in itertools.product(distinct, repeat=len(distinct)):
        chosen = [value for cluster in draw for value, c in zip(values, clusters, strict=True) if c == cluster]
        means.append(np.mean(chosen))
    return np.array(means)


def test_the_cluster_bootstrap_matches_the_exhaustive_one():
    """One problem, six runs in three clusters: the exact distribution of the cluster bootstrap is the
    27 cluster draws; the Monte Carlo percentiles must match it, and resampling runs instead is narrower."""
    values = [0.2, 0.3, 0.6, 0.7, 0.65, 0.1]
    exact = _exhaustive_cluster_means(values, CLUSTERS)
    low, high = np.percentile(exact, [2.5, 97.5], method="inverted_cdf")  # 27 atoms: the discrete quantiles
    interval = mean_interval([[v] for v in values], replicates=200_000, clusters=CLUSTERS)
    assert interval.estimate == pytest.approx(np.mean(values), abs=1e-12)
    assert interval.low == pytest.approx(low, abs=0.01) and interval.high == pytest.approx(high, abs=0.01)
    runs = mean_interval([[v] for v in values], replicates=200_000)
    assert runs.high - runs.low < interval.high - interval.low


def test_the_paired_cluster_bootstrap_draws_the_same_clusters_for_both_arms():
    """Arm = baseline + a shift that depends on the cluster: the exact distribution enumerates the shared
    cluster draws; a construction-seed effect common to both arms cancels."""
    base = [0.2, 0.3, 0.6, 0.7, 0.65, 0.1]
    shift = {0: 0.05, 1: 0.15, 2: 0.10}
    arm = [b + shift[c] for b, c in zip(base, CLUSTERS, strict=True)]
    exact = _exhaustive_cluster_means(arm, CLUSTERS) - _exhaustive_cluster_means(base, CLUSTERS)
    low, high = np.percentile(exact, [2.5, 97.5], method="inverted_cdf")
    interval = paired_difference(
        [[v] for v in arm], [[v] for v in base], replicates=200_000, clusters=(CLUSTERS, CLUSTERS)
    )
    assert interval.estimate == pytest.approx(np.mean(arm) - np.mean(base), abs=1e-12)
    assert interval.low == pytest.approx(low, abs=0.01) and interval.high == pytest.approx(high, abs=0.01)
    assert interval.low > 0.04  # the big spread between clusters cancels in the pairing
    with pytest.raises(ValueError, match="paired clusters differ"):
        paired_difference([[0.0]], [[0.0]], clusters=([0], [1]))
    with pytest.raises(ValueError, match="one id per run"):
        mean_interval([[0.0], [1.0]], clusters=[0])
