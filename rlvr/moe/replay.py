"""Routing replay: lay recorded expert choices out over the (B, P + C) training input.

Routing replay forces, in a training forward, the experts that were chosen when the data was
produced, while gate weights are recomputed from the live router logits so the router keeps
learning. It keeps the experts of a sample fixed while the policy moves, which stabilises RL on MoE
models when routing shifts ("Routing Replay" in GSPO, Zheng et al., 2025, arXiv 2507.18071; rollout
routing replay, "R3", in "Stabilizing MoE Reinforcement Learning by Aligning Training and Inference
Routers", Ma et al., 2025):

* ``old_policy``: recorded in the old-policy forward TRL runs on a generation batch that is reused
  for several optimiser steps (with one step per batch the old policy is the current one, nothing
  is recorded and replay is a no-op);
* ``rollout``: recorded during ``generate``: the prefill forward covers the prompt, each decoding step
  one completion position. The last completion position is never run during generation and keeps
  its live routing.

Records are int16 (int32 beyond 32767 experts), shape (B, P + C, layers, k), -1 = not recorded. This
module lays records out; :mod:`rlvr.rollouts.routing` records them while a batch is produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOT_RECORDED = -1


def compact_dtype(num_experts: int) -> torch.dtype:
    return torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32


def stitch_forwards(forwards: list[torch.Tensor], batch: int, length: int, num_experts: int) -> torch.Tensor:
    """Old-policy record: forwards over row chunks of one (B, L) input -> (B, L, layers, k)."""
    rows = torch.cat(forwards, dim=0)  # (B * L, layers, k)
    if rows.shape[0] != batch * length:
        raise RuntimeError(f"recorded {rows.shape[0]} routing rows for a ({batch}, {length}) input")
    return rows.reshape(batch, length, *rows.shape[1:]).to(compact_dtype(num_experts))


@dataclass
class RolloutRecord:
    """The experts of a batch as ``generate`` ran it, before they are laid out over a training input.

    ``prompt``: (B, P_gen, layers, k), the prompt as generate saw it (left-padded to P_gen).
    ``completion``: (B, S, layers, k), completion position ``j`` in row ``j`` (its token was fed at
    decoding step ``j + 1``); positions generate never ran hold :data:`NOT_RECORDED`.
    """

    prompt: torch.Tensor
    completion: torch.Tensor


def rollout_record(forwards: list[torch.Tensor], batch: int) -> RolloutRecord:
    """The forwards of one ``generate`` call: prefill (B * P_gen rows), then one forward of B rows per step."""
    if not forwards:
        raise RuntimeError("no routing was recorded during generation")
    prefill, steps = forwards[0], forwards[1:]
    layers, top_k = prefill.shape[1:]
    for step, record in enumerate(steps, start=1):
        if record.shape[0] != batch:
            raise RuntimeError(f"decoding step {step} recorded {record.shape[0]} rows for {batch} sequences")
    prompt = prefill.reshape(batch, prefill.shape[0] // batch, layers, top_k)
    completion = torch.stack(steps, dim=1) if steps else prefill.new_empty(batch, 0, layers, top_k)
    return RolloutRecord(prompt, completion)


def lay_out(record: RolloutRecord, prompt_length: int, completion_length: int, num_experts: int) -> torch.Tensor:
    """A rollout record over the (B, P + C) training input -> (B, P + C, layers, k).

    The prompt is left-padded in both layouts, so it is aligned on its right end. The last completion
    position is never fed during generation and stays :data:`NOT_RECORDED` (live routing).
    """
    batch, generated_prompt, layers, top_k = record.prompt.shape
    out = torch.full(
        (batch, prompt_length + completion_length, layers, top_k), NOT_RECORDED, dtype=compact_dtype(num_experts)
    )
    shared = min(generated_prompt, prompt_length)
    out[:, prompt_length - shared : prompt_length] = record.prompt[:, generated_prompt - shared :].to(out.dtype)
    steps = min(record.completion.shape[1], max(completion_length - 1, 0))
    out[:, prompt_length : prompt_length + steps] = record.completion[:, :steps].to(out.dtype)
    return out


def stitch_rollout(
    forwards: list[torch.Tensor], batch: int, prompt_length: int, completion_length: int, num_experts: int
) -> torch.Tensor:
    """Rollout record of one ``generate`` call -> (B, P + C, layers, k) (:func:`rollout_record`, :func:`lay_out`)."""
    return lay_out(rollout_record(forwards, batch), prompt_length, completion_length, num_experts)
