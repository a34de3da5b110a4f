"""A generation batch built from chosen rows of several: the groups a filter keeps, whatever call sampled them.

Each call of TRL's ``_generate_and_score_completions`` pads its own rows: prompts on the left to its widest
prompt, completions on the right to its longest completion. Rows of different calls are brought to common
widths the same way before they are stacked, so every tensor keeps its layout (and a left-padded prompt
stays left-padded next to its completion).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlvr.moe.replay import NOT_RECORDED

# per-row (B, P) tensors, left-padded, and their pad value (None: the tokenizer's pad token)
PROMPT_SIDE = {"prompt_ids": None, "prompt_mask": 0}
# per-row (B, C) tensors (or (B, 1) sequence-level values), right-padded
COMPLETION_SIDE = {
    "completion_ids": None,
    "completion_mask": 0,
    "tool_mask": 0,
    "old_per_token_logps": 0.0,
    "ref_per_token_logps": 0.0,
    "sampling_per_token_logps": 0.0,
    "importance_sampling_ratio": 0.0,
    "advantages": 0.0,  # (B,) group advantages, or (B, C) TreeRL's
}


def assemble_rows(
    batches: list[dict],
    picks: list[tuple[int, int]],
    pad_token_id: int,
    routing_key: str | None = None,
    recomputed: tuple[str, ...] = (),
) -> dict:
    """The rows ``picks`` ((batch index, row index), in the new batch's order) of ``batches``.

    Args:
        batches: TRL generation batches (``prompt_ids`` (B, P) left-padded, ``completion_ids`` (B, C), ...).
        pad_token_id: the tokenizer's pad token, for ids.
        routing_key: the key of a (B, P + C, layers, k) routing record, padded on both sides with
            ``NOT_RECORDED`` (its first P positions are the prompt's).
        recomputed: keys the caller sets itself afterwards (left out here).

    Raises ValueError naming a key this does not know how to lay out (no row is silently dropped).
    """
    keys = set(batches[0])
    for index, batch in enumerate(batches[1:], start=1):
        if set(batch) != keys:
            raise ValueError(f"generation batch {index} has keys {sorted(set(batch) ^ keys)} the first does not")
    known = set(PROMPT_SIDE) | set(COMPLETION_SIDE) | {routing_key} | set(recomputed)
    unknown = sorted(keys - known)
    if unknown:
        raise ValueError(
            f"prompts.filter cannot lay out the batch key {unknown[0]!r} (text-only batches are supported)"
        )
    prompt_width = max(batch["prompt_ids"].size(1) for batch in batches)
    completion_width = max(batch["completion_ids"].size(1) for batch in batches)
    per_token = {  # (B, C) in every call; a (B, 1) value of a call with C > 1 is per sequence in every call
        key
        for key in keys & set(COMPLETION_SIDE)
        if all(b[key].dim() == 2 and b[key].size(1) == b["completion_ids"].size(1) for b in batches)
    }
    padded = [_pad(batch, prompt_width, completion_width, pad_token_id, routing_key, per_token) for batch in batches]
    offsets = [0]
    for batch in batches:
        offsets.append(offsets[-1] + batch["prompt_ids"].size(0))
    rows = torch.tensor([offsets[b] + r for b, r in picks], dtype=torch.long)
    out = {}
    for key in keys - set(recomputed):
        stacked = torch.cat([batch[key] for batch in padded])
        out[key] = stacked[rows.to(stacked.device)]
    return out


def _pad(
    batch: dict, prompt_width: int, completion_width: int, pad_token_id: int, routing_key: str | None, per_token: set
) -> dict:
    prompt, completion = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
    left, right = prompt_width - prompt, completion_width - completion
    out = {}
    for key, value in batch.items():
        if key in PROMPT_SIDE:
            fill = pad_token_id if PROMPT_SIDE[key] is None else PROMPT_SIDE[key]
            out[key] = F.pad(value, (left, 0), value=fill)
        elif key in per_token:
            fill = pad_token_id if COMPLETION_SIDE[key] is None else COMPLETION_SIDE[key]
            out[key] = F.pad(value, (0, right), value=fill)
        elif key == routing_key:  # (B, P + C, layers, k)
            head = F.pad(value[:, :prompt], (0, 0, 0, 0, left, 0), value=NOT_RECORDED)
            tail = F.pad(value[:, prompt:], (0, 0, 0, 0, 0, right), value=NOT_RECORDED)
            out[key] = torch.cat([head, tail], dim=1)
        else:  # (B,) per row, (B, 1) per sequence
            out[key] = value
    return out
