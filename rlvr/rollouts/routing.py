"""Routing recorded while a generation batch is produced, for routing replay and mismatch measurement.

What is replayed, and why, is :mod:`rlvr.moe.replay`'s docstring; this module decides *when* routing is
recorded: during ``generate`` (``moe.routing_replay: rollout``), by the engine that sampled the batch (the
copy engine or vLLM, which return the experts they chose: also ``rollout``), or in the old-policy forward
that TRL runs on the batch (``old_policy``).

When an engine with numerics of its own sampled the batch, the trainer's first forward over it (TRL's
old-policy forward, or one the trainer runs to measure) replays the engine's experts under
``rollout`` replay, so that TRL's old log-probs and importance weights are those of the routing that
training will use (rollout routing replay, R3: Ma et al., 2025, arXiv 2510.11370), and records the
experts the trainer's own routers choose, so that routing flips between engine and trainer can be counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlvr.moe.replay import RolloutRecord, lay_out, rollout_record, stitch_forwards
from rlvr.rollouts.engine_routing import EngineRouting, decoder_layer_indices, engine_routing_record


@dataclass
class EngineSample:
    """What an engine returned for this process's rows: their lengths, and the experts it chose (None: it
    returned none, e.g. a dense policy or vLLM started without ``enable_return_routed_experts``)."""

    prompt_lengths: list[int]
    completion_lengths: list[int]
    routings: list[EngineRouting] | None


class ReplayRecorder:
    """Records the experts of one generation batch and lays them out for its training forwards.

    A trainer calls :meth:`start_batch` before producing a batch, wraps generation in :meth:`rollout` (or
    hands an engine's output to :meth:`keep_engine_sample`), wraps each policy forward of the batch in
    :meth:`old_policy_forward`, and calls :meth:`finish_batch` on the batch (a dict with ``prompt_ids`` and
    ``completion_ids``) to attach the record under ``key``. With ``source="none"`` and no engine every call
    is a no-op.

    Args:
        hooks: the policy's :class:`rlvr.moe.hooks.RoutingHooks` (None for a dense policy).
        source: ``moe.routing_replay``: none, old_policy or rollout.
        measure: also record the trainer's own routing in the batch's first policy forward (when an engine
            with numerics of its own samples), for :meth:`finish_batch` to return.
    """

    def __init__(self, hooks, source: str, measure: bool = False):
        self.hooks, self.source = hooks, source
        self.measure = measure and hooks is not None
        self._generate_forwards: list[torch.Tensor] | None = None  # recorded during generate
        self._policy_forwards: list[torch.Tensor] | None = None  # recorded in the first policy forward
        self._leaf_record: RolloutRecord | None = None  # laid out per leaf by a tree sampler
        self._engine: EngineSample | None = None
        self._engine_records: dict[tuple[int, int], torch.Tensor | None] = {}  # laid out, by (P, C)
        self._first_forward_pending = False  # the next policy forward is the batch's first (TRL's old-policy)

    def start_batch(self) -> None:
        self._generate_forwards = self._policy_forwards = self._leaf_record = self._engine = None
        self._engine_records = {}
        self._first_forward_pending = True

    @contextlib.contextmanager
    def rollout(self):
        """Record every forward of ``generate`` (``source="rollout"``)."""
        if self.source != "rollout":
            yield
            return
        if self._generate_forwards is not None:
            raise RuntimeError("moe.routing_replay=rollout supports single-turn generation only (no tool calls)")
        self.hooks.start_recording()
        try:
            yield
        finally:
            self._generate_forwards = self.hooks.stop_recording()

    def rollout_hooks(self):
        """The hooks a sampler that calls ``generate`` more than once records with (None: nothing to record).
        It hands the per-leaf result back with :meth:`keep_record`."""
        return self.hooks if self.source == "rollout" else None

    def keep_record(self, record: RolloutRecord) -> None:
        if self._generate_forwards is not None or self._leaf_record is not None:
            raise RuntimeError("moe.routing_replay=rollout supports single-turn generation only (no tool calls)")
        self._leaf_record = record

    def keep_engine_sample(self, sample: EngineSample) -> None:
        """The lengths and routed experts an engine returned for this process's rows."""
        if self._engine is not None:
            raise RuntimeError("an engine-sampled batch supports single-turn generation only (no tool calls)")
        if self.source == "rollout" and self.hooks is not None and sample.routings is None:
            raise RuntimeError(
                "moe.routing_replay=rollout: the engine returned no routed experts (vLLM >= 0.14 returns them when "
                "started with enable_return_routed_experts=True, `vllm serve --enable-return-routed-experts`)"
            )
        self._engine = sample

    def engine_record(self, prompt_width: int, completion_width: int) -> torch.Tensor | None:
        """The engine's experts over a (B, P + C) input, (B, P + C, layers, k); None without them."""
        if self._engine is None or self._engine.routings is None or self.hooks is None:
            return None
        widths = (prompt_width, completion_width)
        if widths not in self._engine_records:
            self._engine_records[widths] = self._lay_out_engine(prompt_width, completion_width)
        return self._engine_records[widths]

    def _lay_out_engine(self, prompt_width: int, completion_width: int) -> torch.Tensor:
        layers = self.hooks.layers
        return engine_routing_record(
            self._engine.routings,
            self._engine.prompt_lengths,
            self._engine.completion_lengths,
            prompt_width,
            completion_width,
            num_experts=self.hooks.num_experts,
            top_k=layers[0].top_k,
            moe_layers=decoder_layer_indices([layer.name for layer in layers]),
        )

    @contextlib.contextmanager
    def old_policy_forward(self, is_policy: bool, prompt_width: int | None = None, completion_width: int = 0):
        """The batch's first policy forward (TRL's old-policy forward; reference log-probs come later, from
        the reference model or with adapters disabled). Records the trainer's routing in it (``old_policy``
        replay, or measuring), and yields the (B, P + C, layers, k) experts to replay in it: the engine's under
        ``rollout`` replay, else None. ``prompt_width`` and ``completion_width``: P and C of the forward's input."""
        first = self._first_forward_pending and is_policy
        if is_policy:
            self._first_forward_pending = False
        record = first and self.hooks is not None and (self.source == "old_policy" or self.measure)
        forced = None
        if first and self.source == "rollout" and prompt_width is not None:
            forced = self.engine_record(prompt_width, completion_width)
        if record:
            self.hooks.start_recording()
        try:
            yield forced
        finally:
            if record:
                self._policy_forwards = self.hooks.stop_recording()

    def finish_batch(self, batch: dict, key: str) -> torch.Tensor | None:
        """Attach the replay record to ``batch`` under ``key``. Returns the routing the trainer's own routers
        chose in the batch's first policy forward, (B, P + C, layers, k), when it was recorded (else None)."""
        generate_forwards, policy_forwards = self._generate_forwards, self._policy_forwards
        leaf_record, self._leaf_record = self._leaf_record, None
        self._generate_forwards = self._policy_forwards = None
        self._first_forward_pending = False
        rows, prompt_length = batch["prompt_ids"].shape
        completion_length = batch["completion_ids"].shape[1]
        trainer_routing = None
        if policy_forwards:
            trainer_routing = stitch_forwards(
                policy_forwards, rows, prompt_length + completion_length, self.hooks.num_experts
            )
        if self.source == "rollout":
            if generate_forwards:  # one generate call: its forwards are the record
                leaf_record = rollout_record(generate_forwards, rows)
            if leaf_record is not None:
                batch[key] = lay_out(leaf_record, prompt_length, completion_length, self.hooks.num_experts)
            else:
                engine = self.engine_record(prompt_length, completion_length)
                if engine is not None:
                    batch[key] = engine
        elif self.source == "old_policy" and trainer_routing is not None:
            batch[key] = trainer_routing
        return trainer_routing
