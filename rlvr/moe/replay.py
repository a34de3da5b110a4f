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


def stitch_rollout(
    forwards: list[torch.Tensor], batch: int, prompt_length: int, completion_length: int, num_experts: int
) -> torch.Tensor:
    """Rollout record: prefill (B * P_gen rows) + one forward of B rows per decoding step -> (B, P + C, layers, k).

    The prompt is left-padded in both layouts, so it is aligned on its right end.
    """
    if not forwards:
        raise RuntimeError("no routing was recorded during generation")
    prefill, steps = forwards[0], forwards[1:]
    layers, top_k = prefill.shape[1:]
    generated_prompt = prefill.shape[0] // batch
    out = torch.full(
        (batch, prompt_length + completion_length, layers, top_k), NOT_RECORDED, dtype=compact_dtype(num_experts)
    )
    prefill = prefill.reshape(batch, generated_prompt, layers, top_k)
    shared = min(generated_prompt, prompt_length)
    out[:, prompt_length - shared : prompt_length] = prefill[:, generated_prompt - shared :].to(out.dtype)
    # Decoding step s (1-based) ran on generated token s - 1, at training position P + s - 1.
    for step, record in enumerate(steps[: max(completion_length - 1, 0)], start=1):
        if record.shape[0] != batch:
            raise RuntimeError(f"decoding step {step} recorded {record.shape[0]} rows for {batch} sequences")
        out[:, prompt_length + step - 1] = record.to(out.dtype)
    return out
