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


class PromptDraws:
    """The further prompts one rank draws during one generation batch (refills and skip's candidates), without
    replacement: never a prompt already sampled in this optimizer step on any rank, never one twice, never one
    another rank draws.

    Every rank walks the same seeded permutation of the dataset (a function of the seed and the generation
    batch's number, so the same after a resume), passes over prompts in ``excluded`` and over repeats of a prompt
    already dealt (rows with the same prompt are one prompt), and deals the rest round-robin: rank r takes the
    r-th, (r + world)-th, ... of them. Ranks may take different numbers; the deal stays disjoint. Once the
    dataset is used up, a new permutation is dealt and prompts repeat (counted in ``repeated``).

    Args:
        size: rows of the dataset.
        key_of: a row index -> its prompt's key (:func:`rlvr.prompts.history.prompt_key`).
        excluded: keys of the prompts no draw may return (those already sampled this step, every rank's).
        seed, generation: the run's seed and the generation batch's number (the draws are a function of them).
        rank, world: this process among the ranks.
    """

    def __init__(self, size: int, key_of, excluded: set[str], seed: int, generation: int, rank: int, world: int):
        self.size, self.key_of, self.seed, self.generation = size, key_of, seed, generation
        self.rank, self.world = rank, world
        self.repeated = 0  # prompts this rank drew after the dataset was used up
        self._cycle, self._dealt, self._turn = 0, set(excluded), 0
        self._order, self._position = self._permutation(), 0

    def take(self, count: int) -> list[int]:
        """This rank's next ``count`` row indices."""
        taken = []
        while len(taken) < count:
            index = self._next()
            if self._turn % self.world == self.rank:
                taken.append(index)
                self.repeated += self._cycle > 0
            self._turn += 1
        return taken

    def _next(self) -> int:
        """The next row of the walk whose prompt was not dealt or excluded (a new permutation when none is left)."""
        for _ in range(2):
            while self._position < self.size:
                index = self._order[self._position]
                self._position += 1
                key = self.key_of(index)
                if key not in self._dealt:
                    self._dealt.add(key)
                    return index
            self._cycle += 1  # the dataset is used up: deal it again
            self._dealt, self._order, self._position = set(), self._permutation(), 0
        raise ValueError("the training set has no prompts to draw")

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.generation) * 1_009 + self._cycle)
        return torch.randperm(self.size, generator=generator).tolist()
