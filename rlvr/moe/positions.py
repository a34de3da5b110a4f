"""Completion-token masks -> masks over the positions whose routing decided those tokens.

The logit at sequence position t predicts the token at t + 1. Completion token j sits at absolute
position P + j of the (B, P + C) training input (P = prompt length including left padding), so the
routing decisions that produced it were made at hidden position P + j - 1.
"""

from __future__ import annotations

import torch


def decision_positions(completion_mask: torch.Tensor, sequence_length: int) -> torch.Tensor:
    """(B, C) mask over completion tokens -> (B, L) mask over the positions that predicted them.

    Args:
        completion_mask: (B, C) bool/0-1, which completion tokens are selected.
        sequence_length: L = P + C, the length of the forward's input.
    """
    batch, completion_length = completion_mask.shape
    if completion_length > sequence_length - 1:
        raise ValueError(
            f"{completion_length} completion tokens need a prompt of at least one token in {sequence_length}"
        )
    prompt_length = sequence_length - completion_length
    positions = torch.zeros(batch, sequence_length, dtype=torch.bool, device=completion_mask.device)
    positions[:, prompt_length - 1 : sequence_length - 1] = completion_mask.bool()
    return positions
