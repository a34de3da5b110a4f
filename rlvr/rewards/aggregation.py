"""Several reward functions' rewards as one number per completion, the two ways TRL's GRPO combines them.

TRL's ``GRPOConfig.multi_objective_aggregation``:

* ``sum_then_normalize`` (the default): the weighted sum of the functions' rewards; the group advantage is
  relative to the group's mean (and std) of that sum.
* ``normalize_then_sum`` (GDPO, arXiv 2601.05242): each function's rewards are first
  normalised within the group, ``(r - mean) / (std + 1e-4)`` (Bessel-corrected std, NaN left out), and the
  weighted sum of those is what the advantage is computed from (then normalised over the batch). A group
  whose weighted sum is constant can still have an advantage here: r1 = [1, 0] with weight 1 and r2 = [0, 2]
  with weight 0.5 sum to [1, 1], while their normalised sum is [0.5, -0.5].

A completion for which every function returned None is unscorable: NaN in both.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def weighted_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B,) weighted sum of (B, F) rewards (NaN: that function returned None), NaN where every function did."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (B,)
    summed = (rewards_per_func * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return summed.masked_fill(unscorable, float("nan"))


def compared_rewards(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, group_size: int, aggregation: str
) -> torch.Tensor:
    """(B,) what TRL's group advantage compares within each group of ``group_size`` consecutive rows: the
    weighted rewards, or with ``normalize_then_sum`` the weighted sum of the group-normalised rewards."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if aggregation == "sum_then_normalize":
        return weighted_rewards(rewards_per_func, weights)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (B,)
    grouped = rewards_per_func.view(-1, group_size, rewards_per_func.size(1))  # (N, G, F)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # (N, 1, F)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    variance = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
    std = torch.where(count > 1, variance.sqrt(), torch.full_like(variance, float("nan")))
    normalised = ((grouped - mean) / (std + 1e-4)).view_as(rewards_per_func)  # (B, F)
    summed = (normalised * weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    return summed.masked_fill(unscorable, float("nan"))
