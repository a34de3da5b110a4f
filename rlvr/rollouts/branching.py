"""Where a forking tree branches, what it looks like, and TreeRL's segment advantages. Plain torch.

A forking tree for one prompt: ``M`` roots sampled i.i.d., then ``N`` branches per root, each re-sampled
from ``root[:position]`` at one of the root's highest-entropy completion positions (the forking tokens:
*Beyond the 80/20 Rule*, Wang et al., 2025; TreeRL, Hou et al., 2025, arXiv 2506.11902, branches at the
tokens of highest entropy too). The branch token itself is sampled again, so every token of a leaf is
drawn from the policy given its prefix; a leaf is still not an i.i.d. sample of pi(y | x): the branch
position is chosen from the entropies of the whole root, tokens after it included, and the G leaves of a
group share prefixes (README, "What a leaf is"). ``M * (1 + N) = G`` leaves per prompt.

A leaf is described by two numbers (:class:`TreeLayout`): the index, within its group, of the root it
grew from (itself for a root) and its branch position (``0`` for a root, and for a branch that found no
candidate position: it starts at the first completion token, an i.i.d. sample of the prompt that shares
nothing with its root).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NO_POSITION = -1


def branch_positions(
    entropies: torch.Tensor,
    lengths: torch.Tensor,
    branches: int,
    min_prefix: int = 1,
    min_suffix: int = 1,
    min_spacing: int = 1,
) -> torch.Tensor:
    """The ``branches`` highest-entropy branch positions of each root, greedily, under the rules.

    Args:
        entropies: (M, C) entropy of the distribution that sampled each completion token (padding ignored).
        lengths: (M,) completion lengths, EOS included: positions ``>= length`` are never chosen.
        branches: N, branch positions per root.
        min_prefix: no branch at positions ``< min_prefix`` (the first tokens).
        min_suffix: no branch at positions ``> length - 1 - min_suffix`` (the last tokens; with
            ``min_suffix=0`` the EOS token itself may be re-sampled).
        min_spacing: two positions of one root are at least this far apart (1: distinct positions).

    Returns:
        (M, N) int64 positions in descending entropy order (ties: the earlier position first);
        :data:`NO_POSITION` where a root has fewer than N eligible positions (see the module docstring
        for what the sampler does with those).
    """
    if min_prefix < 0 or min_suffix < 0 or min_spacing < 1 or branches < 0:
        raise ValueError("min_prefix and min_suffix must be >= 0, min_spacing >= 1, branches >= 0")
    roots, width = entropies.shape
    chosen = torch.full((roots, branches), NO_POSITION, dtype=torch.long)
    if branches == 0 or width == 0:
        return chosen
    positions = torch.arange(width)
    eligible = (positions >= min_prefix) & (positions <= lengths.cpu().unsqueeze(1) - 1 - min_suffix)  # (M, C)
    scores = entropies.detach().double().cpu().masked_fill(~eligible, -math.inf)
    # descending entropy, ties broken by position: a stable sort of the negated scores
    order = torch.sort(-scores, dim=1, stable=True).indices  # (M, C)
    for root in range(roots):
        taken: list[int] = []
        for position in order[root].tolist():
            if len(taken) == branches or scores[root, position] == -math.inf:
                break
            if all(abs(position - other) >= min_spacing for other in taken):
                taken.append(position)
        chosen[root, : len(taken)] = torch.tensor(taken, dtype=torch.long)
    return chosen


@dataclass(frozen=True)
class TreeLayout:
    """The leaves of one generation batch's trees, in row order (each group's G rows consecutive)."""

    origin: torch.Tensor  # (B,) int64: row, within its group, of the root each leaf grew from (a root: itself)
    position: torch.Tensor  # (B,) int64: branch position in the completion (0: a root or an i.i.d. fallback)
    group_size: int

    def is_root(self) -> torch.Tensor:
        """(B,) bool: the leaf is a root (sampled from the prompt, not branched)."""
        index_in_group = torch.arange(self.origin.numel(), device=self.origin.device) % self.group_size
        return self.origin == index_in_group


def tree_layout(branch_table: torch.Tensor, group_size: int) -> TreeLayout:
    """The layout of prompts whose roots branch at ``branch_table`` (U * M, N) positions, leaves ordered
    per prompt as ``root 0, its N branches, root 1, its N branches, ...``. A branch without a position
    (:data:`NO_POSITION`) becomes an i.i.d. sample: its own root, at position 0."""
    roots, branches = branch_table.shape
    per_root = 1 + branches
    origin, position = [], []
    for root in range(roots):
        first = (root * per_root) % group_size
        origin.append(first)
        position.append(0)
        for column in range(branches):
            index = first + 1 + column
            branch = int(branch_table[root, column])
            origin.append(first if branch != NO_POSITION else index)
            position.append(max(branch, 0))
    return TreeLayout(torch.tensor(origin), torch.tensor(position), group_size)


def treerl_advantages(rewards: torch.Tensor, layout: TreeLayout, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """TreeRL's process-supervised advantages from the tree (Hou et al., 2025, arXiv 2506.11902, eq. 3-4).

    Every node of a tree is a segment of tokens shared by the leaves below it; its value ``V`` is the mean
    reward of those leaves. A token in segment ``s`` gets

        R(s) = [(V(s) - V(prompt)) + (V(s) - V(parent(s)))] / sqrt(|leaves below s|)

    (a global and a local advantage, re-weighted so that segments shared by many leaves do not dominate).
    Here a root is split at its sorted branch positions ``q_1 < ... < q_n``: the root's segment
    ``[q_k, q_(k+1))`` is shared by the root and the branches at ``q_(k+1), ...``; a branch at ``q_j``
    owns ``[q_j, end)`` below the root's segment ``[q_(j-1), q_j)``; the parent of a root's first
    segment is the prompt.

    Args:
        rewards: (B,) leaf rewards (each group's G rows consecutive); NaN: unscorable, left out of every
            value, its own advantages 0.
        layout: the trees (:func:`tree_layout`).
        lengths: (B,) completion lengths of the leaves (their tokens beyond get 0).
        width: T, the completion width of the batch.

    Returns:
        (B, T) per-token advantages (float64 arithmetic, ``rewards``' dtype).
    """
    rows = rewards.numel()
    group_size = layout.group_size
    out = torch.zeros(rows, width, dtype=torch.float64)
    values = rewards.detach().double().cpu()
    origin, position, lengths = layout.origin.cpu(), layout.position.cpu(), lengths.cpu()
    for start in range(0, rows, group_size):
        group = range(start, start + group_size)
        prompt_value = values[start : start + group_size].nanmean()
        for root in sorted({start + int(origin[row]) for row in group}):
            members = [row for row in group if start + int(origin[row]) == root]
            branches = sorted((int(position[row]), row) for row in members if row != root)
            cuts = [0] + [q for q, _ in branches]  # segment k of the root: [cuts[k], cuts[k + 1])
            parent_value = prompt_value
            for k, begin in enumerate(cuts):
                below = [root] + [row for _, row in branches[k:]]  # the root and the later branches
                value = values[below].nanmean()
                scored = int((~torch.isnan(values[below])).sum())  # the weight counts the leaves in the value
                score = ((value - prompt_value) + (value - parent_value)) / math.sqrt(max(scored, 1))
                end = cuts[k + 1] if k + 1 < len(cuts) else width
                for row in below:  # every leaf below holds this segment's tokens
                    out[row, begin:end] = score
                if k < len(branches):  # the branch leaving at cuts[k + 1] owns the rest of its completion
                    q, branch = branches[k]
                    own = values[branch]
                    out[branch, q:] = (own - prompt_value) + (own - value)  # one leaf below: sqrt(1)
                parent_value = value
    beyond = torch.arange(width).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T) padding
    unscorable = torch.isnan(values).unsqueeze(1)  # (B, 1): no reward, no signal (as TRL does)
    return out.masked_fill(beyond | unscorable, 0.0).nan_to_num(0.0).to(rewards.dtype)
