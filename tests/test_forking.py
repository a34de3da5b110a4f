"""Forking-token selection against a plain Python reference, on random tensors and edge cases."""

import math

import pytest
import torch
from host_reads import count_host_reads

from rlvr.forking.selection import (
    count_to_keep,
    loss_weights,
    quantile_threshold_mask,
    select_forking_tokens,
    selection_stats,
)


def reference_selection(entropies, mask, rho, selection="top", scope="micro_batch", group_ids=None):
    """Sort (unit, priority, row-major index) in pure Python and keep ceil(rho * n) per unit."""
    B, T = entropies.shape
    units = {}
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            unit = 0 if scope == "micro_batch" else b if scope == "sequence" else int(group_ids[b])
            units.setdefault(unit, []).append((b, t))
    keep = torch.zeros(B, T, dtype=torch.bool)
    for members in units.values():
        n = len(members)
        k = min(n, math.ceil(round(rho * n, 9)))
        sign = -1.0 if selection == "top" else 1.0
        ordered = sorted(members, key=lambda bt: (sign * float(entropies[bt]), bt[0] * T + bt[1]))
        for b, t in ordered[:k]:
            keep[b, t] = True
    return keep


def random_batch(seed, B=6, T=11, ties=False, pad_prob=0.3):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many exact ties, like a near-deterministic tiny policy
        entropies = torch.randint(0, 3, (B, T), generator=g).float() * 0.01
    else:
        entropies = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > pad_prob
    return entropies, mask


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "group"])
@pytest.mark.parametrize("selection", ["top", "bottom"])
@pytest.mark.parametrize("rho", [0.0, 1e-6, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_matches_reference(scope, selection, rho, ties):
    for seed in range(5):
        entropies, mask = random_batch(seed, ties=ties)
        group_ids = torch.tensor([0, 0, 1, 1, 2, 2])
        got = select_forking_tokens(entropies, mask, rho, selection, scope, group_ids=group_ids)
        want = reference_selection(entropies, mask, rho, selection, scope, group_ids)
        assert torch.equal(got, want), (seed, scope, selection, rho)


@pytest.mark.parametrize("rho", [0.0, 1e-9, 0.2, 1 / 3, 0.8, 1.0])
def test_exact_count_even_when_all_entropies_are_equal(rho):
    entropies = torch.full((4, 15), 0.02)
    mask = torch.ones(4, 15, dtype=torch.bool)
    keep = select_forking_tokens(entropies, mask, rho)
    assert int(keep.sum()) == count_to_keep(rho, torch.tensor(60)).item()
    # Deterministic tie-breaking: the earliest tokens in row-major order.
    assert torch.equal(keep.reshape(-1).nonzero().squeeze(1), torch.arange(int(keep.sum())))
    # TRL's quantile threshold keeps every tied token instead.
    if 0 < rho < 1:
        assert int(quantile_threshold_mask(entropies, mask, rho).sum()) == 60


def test_count_to_keep_is_free_of_float_noise():
    n = torch.arange(0, 101)
    k = count_to_keep(0.2, n)
    assert k.tolist() == [math.ceil(i / 5) for i in range(101)]  # 0.2 * 15 -> 3, not 4
    assert count_to_keep(1e-12, torch.tensor([0, 1, 7])).tolist() == [0, 1, 1]
    assert count_to_keep(1.0, torch.tensor([5])).item() == 5
    with pytest.raises(ValueError):
        count_to_keep(1.5, torch.tensor([5]))


def test_padding_never_kept_even_with_highest_entropy():
    entropies = torch.tensor([[0.1, 0.2, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0, 0]])
    keep = select_forking_tokens(entropies, mask, 1.0)
    assert keep.tolist() == [[True, True, False, False]]
    assert select_forking_tokens(entropies, mask, 0.5).tolist() == [[False, True, False, False]]


def test_empty_units_keep_nothing_and_produce_no_nan():
    entropies = torch.rand(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, :2] = True  # only row 1 has tokens
    for scope in ("micro_batch", "sequence", "group"):
        keep = select_forking_tokens(entropies, mask, 0.2, scope=scope, group_ids=torch.tensor([0, 1, 2]))
        assert keep.sum() == 1 and keep[1].sum() == 1
        for per_sequence in (False, True):
            weights = loss_weights(keep, mask, "selected", per_sequence=per_sequence)
            assert torch.isfinite(weights).all()
            assert weights[0].sum() == 0 and weights[2].sum() == 0
    all_empty = torch.zeros(3, 5, dtype=torch.bool)
    assert select_forking_tokens(entropies, all_empty, 0.5).sum() == 0
    assert torch.isfinite(loss_weights(all_empty, all_empty)).all()
    stats = selection_stats(entropies, all_empty, all_empty, "top")
    assert int(stats.kept_tokens) == 0 and math.isnan(stats.kept_fraction) and math.isnan(stats.threshold)
    assert math.isnan(stats.entropy_kept) and math.isnan(stats.entropy_dropped)


def test_single_token():
    keep = select_forking_tokens(torch.tensor([[0.3]]), torch.tensor([[True]]), 0.2)
    assert keep.tolist() == [[True]]
    assert loss_weights(keep, torch.tensor([[True]])).tolist() == [[1.0]]
    assert select_forking_tokens(torch.tensor([[0.3]]), torch.tensor([[True]]), 0.0).tolist() == [[False]]


def test_zero_size_batch():
    keep = select_forking_tokens(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), 0.2)
    assert keep.shape == (0, 4)


def test_random_selection_counts_and_reproducibility():
    entropies, mask = random_batch(3)
    a = select_forking_tokens(entropies, mask, 0.3, "random", "sequence", generator=torch.Generator().manual_seed(1))
    b = select_forking_tokens(entropies, mask, 0.3, "random", "sequence", generator=torch.Generator().manual_seed(1))
    c = select_forking_tokens(entropies, mask, 0.3, "random", "sequence", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not (a & ~mask).any()
    assert a.sum(1).tolist() == count_to_keep(0.3, mask.sum(1)).tolist()


def test_random_selection_is_uniform_over_positions():
    """Over many draws every real token is kept about rho of the time, whatever its entropy."""
    entropies = torch.linspace(0, 1, 20).unsqueeze(0)
    mask = torch.ones(1, 20, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    hits = sum(select_forking_tokens(entropies, mask, 0.2, "random", generator=g).float() for _ in range(2000))
    assert torch.allclose(hits / 2000, torch.full((1, 20), 0.2), atol=0.04)


def test_group_scope_counts_per_group():
    entropies = torch.tensor([[0.9, 0.8], [0.7, 0.6], [0.1, 0.05], [0.2, 0.3]])
    mask = torch.ones(4, 2, dtype=torch.bool)
    keep = select_forking_tokens(entropies, mask, 0.25, scope="group", group_ids=torch.tensor([5, 5, 9, 9]))
    # Group 5 keeps its top token (0.9), group 9 its top token (0.3), although 0.3 < 0.8.
    assert keep.tolist() == [[True, False], [False, False], [False, False], [False, True]]
    with pytest.raises(ValueError, match="group_ids"):
        select_forking_tokens(entropies, mask, 0.25, scope="group")


def test_nan_entropies_are_never_preferred():
    entropies = torch.tensor([[float("nan"), 0.1, 0.2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert select_forking_tokens(entropies, mask, 0.3).tolist() == [[False, False, True]]
    assert select_forking_tokens(entropies, mask, 0.3, "bottom").tolist() == [[False, True, False]]


def test_bad_arguments():
    e, m = random_batch(0)
    with pytest.raises(ValueError, match="selection"):
        select_forking_tokens(e, m, 0.2, selection="best")
    with pytest.raises(ValueError, match="scope"):
        select_forking_tokens(e, m, 0.2, scope="token")
    with pytest.raises(ValueError, match="shape"):
        select_forking_tokens(e, m[:, :3], 0.2)


def test_loss_weights_normalisation_in_float64():
    """sum(loss * w) / n equals the mean over kept tokens ("selected") or sum_kept / n ("all")."""
    g = torch.Generator().manual_seed(0)
    for seed in range(10):
        entropies, mask = random_batch(seed)
        per_token_loss = torch.randn(entropies.shape, generator=g, dtype=torch.float64)
        keep = select_forking_tokens(entropies, mask, 0.2)
        n, kept = mask.sum(), keep.sum()
        selected = (per_token_loss * loss_weights(keep, mask, "selected").double() * mask).sum() / n
        assert torch.allclose(selected, per_token_loss[keep].sum() / kept)
        everything = (per_token_loss * loss_weights(keep, mask, "all").double() * mask).sum() / n
        assert torch.allclose(everything, per_token_loss[keep].sum() / n)
        # Per sequence (TRL's "grpo" loss type): mean over each row's kept tokens, rows with none give 0.
        keep_seq = select_forking_tokens(entropies, mask, 0.2, scope="sequence")
        w = loss_weights(keep_seq, mask, "selected", per_sequence=True).double()
        got = (per_token_loss * w * mask).sum(1) / mask.sum(1).clamp(min=1)
        for b in range(mask.size(0)):
            want = (
                per_token_loss[b][keep_seq[b]].mean() if keep_seq[b].any() else torch.tensor(0.0, dtype=torch.float64)
            )
            assert torch.allclose(got[b], want)


def test_loss_weights_with_global_totals():
    keep = torch.tensor([[True, False, False, False]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    weights = loss_weights(keep, mask, totals=(torch.tensor(40.0), torch.tensor(8.0)))
    assert weights.tolist() == [[5.0, 0.0, 0.0, 0.0]]


def test_selection_stats():
    entropies = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.7, 0.2, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    keep = select_forking_tokens(entropies, mask, 0.5)  # k = 3 of 6: 0.9, 0.7, 0.5
    stats = selection_stats(entropies, mask, keep, "top")
    assert int(stats.kept_tokens) == 3 and int(stats.total_tokens) == 6 and float(stats.kept_fraction) == 0.5
    assert float(stats.threshold) == pytest.approx(0.5)
    assert float(stats.entropy_kept) == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert float(stats.entropy_dropped) == pytest.approx((0.1 + 0.3 + 0.2) / 3)
    bottom = select_forking_tokens(entropies, mask, 0.5, "bottom")
    assert float(selection_stats(entropies, mask, bottom, "bottom").threshold) == pytest.approx(0.3)
    assert math.isnan(selection_stats(entropies, mask, keep, "random").threshold)
    everything = selection_stats(entropies, mask, mask, "top")  # nothing dropped: its mean is NaN
    assert math.isnan(everything.entropy_dropped) and float(everything.threshold) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------------
# No host reads: on a GPU each is a device sync in the training step


def test_the_host_read_counter_sees_reads():
    with count_host_reads() as reads:
        value = torch.ones(2)
        value.sum().item()
        bool(value.any())
        value[value > 0]
    assert [read.kind for read in reads] == ["item", "__bool__", "bool-index"]
    assert not any(read.in_rlvr for read in reads)


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "group"])
@pytest.mark.parametrize("selection", ["top", "bottom", "random"])
def test_selection_and_loss_weights_make_no_host_reads(scope, selection):
    """The per-micro-step selection runs on the device end to end (exact k included)."""
    generator = torch.Generator().manual_seed(0)
    entropies = torch.rand(6, 9, generator=generator)
    mask = torch.rand(6, 9, generator=generator) > 0.3
    group_ids = torch.tensor([7, 7, 3, 3, 11, 11])
    with count_host_reads() as reads:
        keep = select_forking_tokens(
            entropies, mask, 0.2, selection, scope, group_ids=group_ids, generator=torch.Generator().manual_seed(1)
        )
        loss_weights(keep, mask, "selected", per_sequence=scope == "sequence")
        loss_weights(keep, mask, "selected", totals=(mask.sum(), keep.sum()))
        selection_stats(entropies, mask, keep, selection)
    assert reads == []
    assert keep.any()
