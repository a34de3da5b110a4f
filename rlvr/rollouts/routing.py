"""Routing recorded while a generation batch is produced, for routing replay in its training forwards.

What is replayed, and why, is :mod:`rlvr.moe.replay`'s docstring; this module decides *when* routing is
recorded: during ``generate`` (``moe.routing_replay: rollout``) or in the old-policy forward that TRL runs
on a batch reused for several optimiser steps (``old_policy``).
"""

from __future__ import annotations

import contextlib

import torch

from rlvr.moe.replay import RolloutRecord, lay_out, rollout_record, stitch_forwards


class ReplayRecorder:
    """Records the experts of one generation batch and lays them out for its training forwards.

    A trainer calls :meth:`start_batch` before producing a batch, wraps generation in :meth:`rollout`
    and each policy forward of the batch in :meth:`old_policy_forward`, and calls :meth:`finish_batch`
    on the batch (a dict with ``prompt_ids`` and ``completion_ids``) to attach the record under ``key``.
    With ``source="none"`` every call is a no-op.
    """

    def __init__(self, hooks, source: str):
        self.hooks, self.source = hooks, source  # hooks: rlvr.moe.hooks.RoutingHooks (None for dense models)
        self._forwards: list[torch.Tensor] | None = None
        self._leaf_record: RolloutRecord | None = None  # laid out per leaf by a tree sampler
        self._old_policy_pending = False  # the next policy forward is TRL's old-policy forward

    def start_batch(self) -> None:
        self._forwards, self._leaf_record = None, None
        self._old_policy_pending = self.source == "old_policy"

    @contextlib.contextmanager
    def rollout(self):
        """Record every forward of ``generate`` (``source="rollout"``)."""
        if self.source != "rollout":
            yield
            return
        if self._forwards is not None:
            raise RuntimeError("moe.routing_replay=rollout supports single-turn generation only (no tool calls)")
        self.hooks.start_recording()
        try:
            yield
        finally:
            self._forwards = self.hooks.stop_recording()

    def rollout_hooks(self):
        """The hooks a sampler that calls ``generate`` more than once records with (None: nothing to record).
        It hands the per-leaf result back with :meth:`keep_record`."""
        return self.hooks if self.source == "rollout" else None

    def keep_record(self, record: RolloutRecord) -> None:
        if self._forwards is not None or self._leaf_record is not None:
            raise RuntimeError("moe.routing_replay=rollout supports single-turn generation only (no tool calls)")
        self._leaf_record = record

    @contextlib.contextmanager
    def old_policy_forward(self, is_policy: bool):
        """Record the first policy forward of the batch, TRL's old-policy forward (``source="old_policy"``);
        reference log-probs come later, from the reference model or with adapters disabled."""
        record = self._old_policy_pending and is_policy and self._forwards is None
        if record:
            self.hooks.start_recording()
        try:
            yield
        finally:
            if record:
                self._forwards = self.hooks.stop_recording()

    def finish_batch(self, batch: dict, key: str) -> None:
        forwards, self._forwards, self._old_policy_pending = self._forwards, None, False
        record, self._leaf_record = self._leaf_record, None
        rows, prompt_length = batch["prompt_ids"].shape
        completion_length = batch["completion_ids"].shape[1]
        if forwards and self.source == "rollout":  # one generate call: its forwards are the record
            record = rollout_record(forwards, rows)
        if record is not None:
            batch[key] = lay_out(record, prompt_length, completion_length, self.hooks.num_experts)
        elif forwards:
            batch[key] = stitch_forwards(forwards, rows, prompt_length + completion_length, self.hooks.num_experts)
