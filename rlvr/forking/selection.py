"""Forking-token selection: which completion tokens carry the policy gradient.

*Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM
Reasoning* (Wang et al., 2025, arXiv 2506.01939) keeps the policy-gradient loss only on the top
``rho`` (~20%) highest-entropy completion tokens, the "forking tokens". Their code takes an exact
top-k with ``k = ceil(rho * n)`` per micro-batch and normalises the loss by the selected tokens.

This module is plain PyTorch (no TRL import) so that every rule here is testable on tensors:

* :func:`count_to_keep`        -- ``k = ceil(rho * n)`` without float noise (0.2 * 15 is 3, not 4).
* :func:`select_forking_tokens` -- exact-k selection per scope unit, deterministic tie-breaking.
* :func:`loss_weights`          -- the selection as per-token loss weights, normalised over the selected
  tokens (the paper) or over all completion tokens (TRL's ``top_entropy_quantile``).
* :func:`selection_stats`       -- threshold, kept fraction, entropy of kept vs dropped tokens.
* :class:`ForkingConfig`        -- the ``forking`` config section; :data:`LOSS_NORMALIZATION_UNITS` says
  over which unit each TRL loss type averages, and so how the selected-token normaliser is counted.

Shapes: ``B`` sequences (rows), ``T`` completion positions. ``mask`` marks real (non-padding)
completion tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlvr.utils.options import ConfigError, option, require

SELECTIONS = ("top", "bottom", "random")
SCOPES = ("micro_batch", "sequence", "group")

# The unit over which each TRL (1.16) loss type averages its per-token losses, and so the unit in which
# "selected" normalisation counts completion (n) and selected (k) tokens:
#   sequence         -- each sequence's mean (or sum) first, then the batch mean;
#   micro_batch      -- this rank's micro-batch (bnpo: its token count; dr_grpo: a constant B x max length);
#   generation_batch -- the token count of the whole generation batch, summed over ranks.
LOSS_NORMALIZATION_UNITS = {
    "grpo": "sequence",
    "sapo": "sequence",
    "luspo": "sequence",
    "bnpo": "micro_batch",
    "dr_grpo": "micro_batch",
    "dapo": "generation_batch",
    "cispo": "generation_batch",
    "vespo": "generation_batch",
}


def loss_normalization_unit(loss_type: str) -> str:
    """The unit of :data:`LOSS_NORMALIZATION_UNITS`; a loss type rlvr does not know is a config error."""
    if loss_type not in LOSS_NORMALIZATION_UNITS:
        raise ConfigError(
            f"grpo.loss_type: rlvr does not know how {loss_type!r} normalises its loss, so it cannot weight the "
            f"forking tokens correctly; one of {', '.join(LOSS_NORMALIZATION_UNITS)}"
        )
    return LOSS_NORMALIZATION_UNITS[loss_type]


# Relative slack applied before the ceiling: rho * n computed in binary floating point can land a hair
# above an integer (0.2 * 15 = 3.0000000000000004), which a plain ceil would turn into one extra token.
_CEIL_RELATIVE_SLACK = 1e-9


def count_to_keep(rho: float, n: torch.Tensor) -> torch.Tensor:
    """Number of tokens to keep, ``ceil(rho * n)``, for each entry of ``n`` (an integer tensor).

    ``rho = 0`` keeps nothing, ``rho = 1`` keeps everything, any ``rho > 0`` keeps at least one token
    of a non-empty unit (the paper's ``ceil``).
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    exact = rho * n.to(torch.float64)
    k = torch.ceil(exact * (1.0 - _CEIL_RELATIVE_SLACK)).to(torch.long)
    return torch.minimum(k, n.to(torch.long))


def _unit_ids(mask: torch.Tensor, scope: str, group_ids: torch.Tensor | None) -> torch.Tensor:
    """Scope unit of every position, (B, T) long: which tokens compete for the same k."""
    B, T = mask.shape
    if scope == "micro_batch":
        return torch.zeros(B, T, dtype=torch.long, device=mask.device)
    if scope == "sequence":
        return torch.arange(B, device=mask.device).unsqueeze(1).expand(B, T)
    if scope == "group":
        if group_ids is None:
            raise ValueError("scope='group' needs group_ids, a (B,) tensor naming the prompt of each row")
        if group_ids.shape != (B,):
            raise ValueError(f"group_ids must have shape ({B},), got {tuple(group_ids.shape)}")
        # Re-index to 0..G-1 so that arbitrary ids (e.g. global prompt indices) work: rank of each row's id
        # among the distinct ids, from a sort (torch.unique would read its output size on the host).
        ids = group_ids.to(mask.device)
        order = torch.sort(ids, stable=True).indices  # (B,)
        sorted_ids = ids[order]
        starts = torch.ones_like(sorted_ids, dtype=torch.long)
        starts[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
        dense = torch.empty_like(starts)
        dense[order] = torch.cumsum(starts, 0) - 1
        return dense.unsqueeze(1).expand(B, T)
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _priority(entropies: torch.Tensor, selection: str, generator: torch.Generator | None) -> torch.Tensor:
    """Sort key, (B, T) float64: higher is kept first. NaN entropies are never preferred."""
    values = entropies.detach().to(torch.float64)
    if selection == "top":
        priority = values
    elif selection == "bottom":
        priority = -values
    elif selection == "random":
        # Drawn on the CPU so that one seed gives one selection on every device and rank.
        priority = torch.rand(values.shape, generator=generator, dtype=torch.float64).to(values.device)
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    lowest = torch.finfo(torch.float64).min
    return torch.nan_to_num(priority, nan=lowest, posinf=torch.finfo(torch.float64).max, neginf=lowest)


def select_forking_tokens(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    rho: float,
    selection: str = "top",
    scope: str = "micro_batch",
    group_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick exactly ``k = ceil(rho * n)`` completion tokens in each scope unit.

    Args:
        entropies: (B, T) per-token entropy of the policy's next-token distribution.
        mask: (B, T) bool or 0/1; True for real completion tokens, False for padding.
        rho: fraction of tokens to keep, in [0, 1] (the paper uses 0.2).
        selection: ``"top"`` highest entropy (the paper), ``"bottom"`` lowest entropy, ``"random"``
            uniformly random tokens (a control with the same token count).
        scope: unit in which ``k`` is counted: ``"micro_batch"`` (all rows together, the paper's
            code), ``"sequence"`` (each row), ``"group"`` (rows sharing a ``group_ids`` value: the
            completions of one prompt).
        group_ids: (B,) prompt id of each row, required for ``scope="group"``.
        generator: random source for ``selection="random"`` (CPU generator).

    Returns:
        (B, T) bool mask of kept tokens. Padding is never kept; an empty unit keeps nothing.

    Ties are broken deterministically: among equal entropies the earlier token (row-major order:
    lower row, then lower position) is kept first. This is what makes the count exact; a
    ``entropy >= quantile`` threshold (TRL's ``top_entropy_quantile``) keeps every tied token.
    """
    if entropies.dim() != 2:
        raise ValueError(f"entropies must be (B, T), got shape {tuple(entropies.shape)}")
    if mask.shape != entropies.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != entropies shape {tuple(entropies.shape)}")
    valid = mask.bool()
    B, T = valid.shape
    if B * T == 0:
        return torch.zeros_like(valid)

    units = _unit_ids(valid, scope, group_ids).reshape(-1)  # (N,) in [0, B)
    priority = _priority(entropies, selection, generator).reshape(-1)  # (N,)
    flat_valid = valid.reshape(-1)  # (N,)
    num_units = B  # an upper bound (units are rows or groups of rows): no host read of the largest id

    # Order tokens by (unit, valid first, priority descending, flat index ascending). Stable sorts
    # applied from the least to the most significant key give that lexicographic order.
    order = torch.sort(priority, descending=True, stable=True).indices
    order = order[torch.sort(flat_valid[order].to(torch.int8), descending=True, stable=True).indices]
    order = order[torch.sort(units[order], stable=True).indices]

    # Rank of each sorted token within its unit = sorted position - first sorted position of the unit.
    # Counts by scatter_add into a fixed-size tensor (bincount reads its output size on the host on CUDA).
    tokens_per_unit = torch.zeros(num_units, dtype=torch.long, device=units.device).scatter_add_(
        0, units, torch.ones_like(units)
    )  # (U,)
    unit_start = torch.cumsum(tokens_per_unit, 0) - tokens_per_unit  # (U,)
    sorted_units = units[order]
    rank_in_unit = torch.arange(order.numel(), device=order.device) - unit_start[sorted_units]

    valid_per_unit = torch.zeros(num_units, dtype=torch.long, device=units.device).scatter_add_(
        0, units, flat_valid.long()
    )  # (U,)
    k_per_unit = count_to_keep(rho, valid_per_unit)  # (U,)
    keep_sorted = (rank_in_unit < k_per_unit[sorted_units]) & flat_valid[order]

    keep = torch.zeros_like(flat_valid)
    keep[order] = keep_sorted
    return keep.view(B, T)


NORMALIZATIONS = ("selected", "all")


def loss_weights(
    keep: torch.Tensor,
    mask: torch.Tensor,
    normalization: str = "selected",
    per_sequence: bool = False,
    totals: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Turn a selection into per-token loss weights, (B, T) float64 (exact n / k; the caller casts).

    A trainer that normalises its policy loss by the number of completion tokens ``n`` (as TRL does)
    and multiplies the per-token loss by these weights computes:

    * ``normalization="all"``: ``sum_kept(loss) / n`` -- TRL's ``top_entropy_quantile`` behaviour:
      dropping tokens also shrinks the loss (and the gradient) by the kept fraction.
    * ``normalization="selected"``: ``sum_kept(loss) / k`` -- the paper: a mean over the selected
      tokens. Kept tokens get weight ``n / k``; dropped tokens and padding get 0.

    Args:
        keep: (B, T) bool selection from :func:`select_forking_tokens`.
        mask: (B, T) real completion tokens.
        normalization: ``"selected"`` or ``"all"``.
        per_sequence: count ``n`` and ``k`` per row (for losses that average each sequence first,
            like TRL's ``grpo`` loss type) instead of over the whole tensor.
        totals: optional ``(n, k)`` scalar tensors to use instead of this tensor's counts, e.g. counts
            summed over all ranks when the loss is normalised globally.
    """
    keep_f = (keep.bool() & mask.bool()).to(torch.float64)
    if normalization == "all":
        return keep_f
    if normalization != "selected":
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    mask_f = mask.bool().to(torch.float64)
    if per_sequence:
        n, k = mask_f.sum(dim=1, keepdim=True), keep_f.sum(dim=1, keepdim=True)  # (B, 1)
    elif totals is not None:
        n, k = (t.to(keep_f.device, torch.float64) for t in totals)
    else:
        n, k = mask_f.sum(), keep_f.sum()
    scale = torch.where(k > 0, n / k.clamp(min=1.0), torch.zeros_like(k))
    return keep_f * scale


@dataclass
class SelectionStats:
    """What a selection kept, for logging, as 0-d tensors on the selection's device (no host read).
    Entropy means and the threshold are NaN when their set is empty."""

    kept_fraction: torch.Tensor  # kept tokens / real completion tokens
    kept_tokens: torch.Tensor  # int64
    total_tokens: torch.Tensor  # int64
    threshold: torch.Tensor  # entropy at the boundary: lowest kept ("top"), highest kept ("bottom"), NaN ("random")
    entropy_kept: torch.Tensor
    entropy_dropped: torch.Tensor

    def as_metrics(self) -> dict[str, torch.Tensor]:
        """The ``forking/*`` metrics a trainer logs."""
        return {
            "forking/threshold": self.threshold,
            "forking/kept_fraction": self.kept_fraction,
            "forking/kept_tokens": self.kept_tokens,
            "forking/entropy_kept": self.entropy_kept,
            "forking/entropy_dropped": self.entropy_dropped,
        }


def selection_stats(entropies: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, selection: str) -> SelectionStats:
    """Summarise a selection made by :func:`select_forking_tokens` on the same tensors, on their device
    (masked sums, no boolean indexing and no host read: a trainer reads them once per logging step)."""
    valid = mask.bool()
    kept = keep.bool() & valid
    dropped = valid & ~kept
    values = entropies.detach().float()
    n_valid, n_kept = valid.sum(), kept.sum()  # int64

    def mean_of(where: torch.Tensor) -> torch.Tensor:  # 0/0 = NaN for an empty set
        return torch.where(where, values, 0.0).sum() / where.sum()

    nan = values.new_full((), math.nan)
    if selection == "random":
        threshold = nan
    elif selection == "top":
        threshold = torch.where(kept, values, math.inf).amin() if values.numel() else nan
    else:
        threshold = torch.where(kept, values, -math.inf).amax() if values.numel() else nan
    threshold = torch.where(n_kept > 0, threshold, nan)
    return SelectionStats(
        kept_fraction=n_kept / n_valid,  # NaN without real tokens
        kept_tokens=n_kept,
        total_tokens=n_valid,
        threshold=threshold,
        entropy_kept=mean_of(kept),
        entropy_dropped=mean_of(dropped),
    )


def quantile_threshold_mask(entropies: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """TRL's rule (``top_entropy_quantile=rho``), for comparison: keep ``entropy >= quantile(1 - rho)``.

    With ties at the threshold this keeps more than ``rho`` of the tokens; it exists here so that tests
    and benchmarks can show the difference with :func:`select_forking_tokens`.
    """
    valid = mask.bool()
    values = entropies[valid].float()
    if values.numel() == 0:
        return torch.zeros_like(valid)
    threshold = torch.quantile(values, 1.0 - rho)
    return (entropies >= threshold) & valid


@dataclass
class ForkingConfig:
    """The ``forking`` config section: which tokens carry the policy gradient and how the loss treats them."""

    rho: float = option(0.2, "fraction of completion tokens selected as forking tokens (the paper: 0.2)")
    selection: str = option(
        "top", "which tokens: top (highest entropy), bottom (lowest), random (same count)", SELECTIONS
    )
    scope: str = option(
        "micro_batch", "unit in which k = ceil(rho * n) is counted (micro_batch is gathered across ranks)", SCOPES
    )
    policy_tokens: str = option(
        "forking",
        "tokens in the policy-gradient loss: forking (the selection) or all (full/hybrid arms)",
        ("forking", "all"),
    )
    loss_normalization: str = option(
        "selected",
        "normalise the loss over the selected tokens (the paper) or all completion tokens (TRL)",
        NORMALIZATIONS,
    )
    mask_kl: bool = option(False, "let the KL penalty's gradient flow only through forking tokens")
    mask_entropy_bonus: bool = option(True, "apply the entropy bonus on forking tokens only (TRL's behaviour)")
    log_examples: int = option(2, "completions per logging step written with their forking tokens marked")
    sparse_lm_head: str = option(
        "auto",
        "LM head backward on the forking tokens only: auto (on CPU, when it is exact and rho < 0.75), true (whenever "
        "exact; an error otherwise), false (TRL's fused head on every token)",
        ("auto", "true", "false"),
    )
    sparse_head_kernel: str = option(
        "auto",
        "the sparse head's projections: auto (TRL's fused ChunkedLogProbFunction on CUDA/XPU, rlvr's row chunks "
        "elsewhere), rlvr, trl",
        ("auto", "rlvr", "trl"),
    )

    def validate(self) -> None:
        require(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1]; got {self.rho}")
        require(self.log_examples >= 0, "log_examples", "must be >= 0")


class _GradientMask(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by a fixed (B, T) mask."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype), None


def mask_gradient(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` (B, T) unchanged, with the gradient kept only where ``keep`` (B, T) is true: keeps a term
    that covers every token (e.g. the KL penalty) from sending gradient through the dropped tokens."""
    return _GradientMask.apply(values, keep)
