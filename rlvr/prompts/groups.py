"""Groups without reward variance, and the draws of prompts that refill a generation batch."""

from __future__ import annotations

import torch


def informative_groups(rewards: torch.Tensor, group_size: int, tolerance: float = 1e-6) -> torch.Tensor:
    """Which groups have reward variance: (B,) weighted rewards, each group's ``group_size`` rows consecutive,
    NaN for an unscorable row (left out, as TRL leaves it out of the group's mean and std). A group is
    informative when the population std of its scorable rewards exceeds ``tolerance``; a group with fewer
    than two scorable rows has none. Returns (B / group_size,) bool.

    DAPO (Yu et al., 2025, arXiv 2503.14476) drops such groups: with every reward equal the group-relative
    advantage is zero, so they give no policy gradient."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not hold whole groups of {group_size}")
    grouped = rewards.detach().double().view(-1, group_size)  # (N, G)
    scored = ~torch.isnan(grouped)
    count = scored.sum(dim=1)  # (N,)
    values = grouped.nan_to_num(0.0)
    mean = values.sum(dim=1) / count.clamp(min=1)
    variance = ((values - mean.unsqueeze(1)) ** 2 * scored).sum(dim=1) / count.clamp(min=1)
    return (count >= 2) & (variance.sqrt() > tolerance)


def draw_prompts(dataset_size: int, count: int, seed: int, step: int, draw: int) -> list[int]:
    """``count`` dataset indices for refill ``draw`` of optimizer step ``step``: a uniform draw without
    replacement (with replacement once ``count`` exceeds the dataset), the same on every rank and after a
    resume (a function of its arguments alone)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + draw)
    if count <= dataset_size:
        return torch.randperm(dataset_size, generator=generator)[:count].tolist()
    return torch.randint(dataset_size, (count,), generator=generator).tolist()
