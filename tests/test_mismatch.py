"""Mismatch metrics against plain per-token loops (float64), with NaN sampling log-probs, empty masks
and unrecorded routing."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr.rollouts.mismatch import importance_sampling_drops, logprob_mismatch, routing_flips


def _batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    sampling = -torch.rand(4, 7, generator=generator, dtype=torch.float64) * 3  # (B, T)
    training = sampling + torch.randn(4, 7, generator=generator, dtype=torch.float64) * 0.8
    mask = torch.rand(4, 7, generator=generator) < 0.7
    sampling[0, 1] = math.nan  # an engine that could not score a token
    return sampling.float(), training.float(), mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logprob_mismatch_matches_a_per_token_loop(seed):
    sampling, training, mask = _batch(seed)
    kept = [
        float(training[b, t]) - float(sampling[b, t])
        for b in range(4)
        for t in range(7)
        if mask[b, t] and not math.isnan(float(sampling[b, t]))
    ]
    metrics = logprob_mismatch(sampling, training, mask)
    assert metrics["mismatch/kl_k3"] == pytest.approx(sum(math.exp(d) - 1 - d for d in kept) / len(kept), rel=1e-12)
    assert metrics["mismatch/logp_diff_mean"] == pytest.approx(sum(abs(d) for d in kept) / len(kept), rel=1e-12)
    assert metrics["mismatch/logp_diff_max"] == pytest.approx(max(abs(d) for d in kept), rel=1e-12)
    assert metrics["mismatch/ratio_above_2"] == pytest.approx(sum(math.exp(d) > 2 for d in kept) / len(kept))
    assert metrics["mismatch/kl_k3"] >= 0


def test_identical_numbers_measure_zero_and_an_empty_mask_measures_nothing():
    sampling, _, mask = _batch(3)
    sampling = sampling.nan_to_num(-1.0)
    same = logprob_mismatch(sampling, sampling.clone(), mask)
    assert same == {
        "mismatch/kl_k3": 0.0,
        "mismatch/logp_diff_mean": 0.0,
        "mismatch/logp_diff_max": 0.0,
        "mismatch/ratio_above_2": 0.0,
    }
    empty = torch.zeros_like(mask)
    assert logprob_mismatch(sampling, sampling, empty) == {}
    assert routing_flips(torch.zeros(4, 7, 2, 2), torch.zeros(4, 7, 2, 2), empty) == {}
    assert importance_sampling_drops(sampling, sampling, empty, "sequence_mask", 0.5, 2.0) == {}


def test_routing_flips_compare_expert_sets_and_skip_unrecorded_positions():
    sampler = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 2], [1, 3]]]])  # (1, L=3, layers=2, k=2)
    trainer = torch.tensor([[[[1, 0], [2, 3]], [[4, 6], [6, 7]], [[-1, -1], [-1, -1]]]])
    mask = torch.tensor([[True, True, True]])
    metrics = routing_flips(sampler, trainer, mask)
    # position 0: same sets in another order (no flip); position 1: layer 0 flips; position 2: not recorded
    assert metrics == {"mismatch/router_flips": 1 / 4, "mismatch/tokens_with_flip": 1 / 2}
    mask = torch.tensor([[True, False, True]])
    assert routing_flips(sampler, trainer, mask) == {"mismatch/router_flips": 0.0, "mismatch/tokens_with_flip": 0.0}


@pytest.mark.parametrize("seed", [0, 1])
def test_importance_sampling_drops_match_trls_masking_rule(seed):
    sampling, training, mask = _batch(seed)
    difference = ((training.double() - sampling.double()) * mask).nan_to_num(0.0)
    low, high = 0.5, 2.0
    sequences = [b for b in range(4) if mask[b].any()]
    ratios = [math.exp(float(difference[b].sum())) for b in sequences]
    expected = sum(r < low or r > high for r in ratios) / len(sequences)
    got = importance_sampling_drops(sampling, training, mask, "sequence_mask", low, high)
    assert got == {"mismatch/is_dropped_sequences": pytest.approx(expected)}
    tokens = [math.exp(float(difference[b, t])) for b in range(4) for t in range(7) if mask[b, t]]
    expected = sum(r < low or r > high for r in tokens) / len(tokens)
    got = importance_sampling_drops(sampling, training, mask, "token_mask", low, high)
    assert got == {"mismatch/is_dropped_tokens": pytest.approx(expected)}
    assert importance_sampling_drops(sampling, training, mask, "token_truncate", low, high) == {}
    assert importance_sampling_drops(sampling, training, mask, "token_mask", None, None) == {
        "mismatch/is_dropped_tokens": 0.0
    }
