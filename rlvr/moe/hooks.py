"""Forward hooks on every router and MoE block: record routing, replay it, apply gradient gates.

:class:`RoutingHooks` is the one object a trainer holds. It has three modes:

* **training forward** (between :meth:`begin` and :meth:`end`): record each router's logits (with
  gradient, for router losses) and chosen experts; optionally force recorded experts (routing replay:
  the experts come from the record, the gate weights are recomputed from the live logits so the router
  still learns); wrap router outputs and block outputs in gradient gates whose weights the trainer
  fills in after the forward, once it knows the forking tokens;
* **recording** (between :meth:`start_recording` and :meth:`stop_recording`, without gradient): keep
  the experts each router chooses itself in every forward, e.g. the old-policy forward or each step of
  ``generate``; a forward that also replays (:meth:`begin` with ``forced``) records the router's own choice
  and runs with the forced experts;
* otherwise the hooks do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rlvr.moe.adapters import MoELayer, find_moe_layers
from rlvr.moe.gates import GateWeights, gate_gradient


@dataclass
class ForwardRouting:
    """What the routers did in one recorded forward over a (B, L) input."""

    shape: tuple[int, int]  # (B, L)
    logits: list[torch.Tensor] = field(default_factory=list)  # per layer (N, E), N = B * L, with gradient
    indices: list[torch.Tensor] = field(default_factory=list)  # per layer (N, k) experts used
    live_indices: list[torch.Tensor] = field(default_factory=list)  # per layer (N, k) router's own choice (replay)
    forced: torch.Tensor | None = None  # (N, layers, k) experts to replay; -1 = use the live choice
    complete: bool = False  # recorded; later calls (activation-checkpoint recomputation) only replay and gate
    router_gate: GateWeights = field(default_factory=lambda: GateWeights("router"))
    expert_gate: GateWeights = field(default_factory=lambda: GateWeights("expert"))


class RoutingHooks:
    """Hooks on all MoE layers of a model; see the module docstring."""

    def __init__(self, model: nn.Module, gate_routers: bool = True, gate_experts: bool = True):
        self.layers: list[MoELayer] = find_moe_layers(model)
        self.gate_routers, self.gate_experts = gate_routers, gate_experts
        self.current: ForwardRouting | None = None
        self._recorded: list[tuple[int, torch.Tensor]] | None = None  # (layer index, (N, k)) per router call
        self._handles = []
        for layer in self.layers:
            # prepend=True: transformers' own router-logit recorder must see the gated outputs.
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer), prepend=True))
            if gate_experts:
                self._handles.append(layer.gated_module.register_forward_hook(self._block_hook, prepend=True))

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    def begin(self, batch: int, length: int, forced: torch.Tensor | None = None) -> ForwardRouting:
        """Start a training forward over a (B, L) input; ``forced`` (B, L, layers, k) replays recorded experts."""
        if forced is not None:
            if tuple(forced.shape) != (batch, length, len(self.layers), self.layers[0].top_k):
                raise ValueError(
                    f"recorded routing has shape {tuple(forced.shape)}, the forward needs "
                    f"{(batch, length, len(self.layers), self.layers[0].top_k)}"
                )
            forced = forced.reshape(batch * length, len(self.layers), -1)
        self.current = ForwardRouting(shape=(batch, length), forced=forced)
        return self.current

    def start_recording(self) -> None:
        self._recorded = []

    def stop_recording(self) -> list[torch.Tensor]:
        """The experts chosen in each forward since :meth:`start_recording`, as (N_f, layers, k) tensors."""
        recorded, self._recorded = self._recorded or [], None
        forwards, layers = [], len(self.layers)
        for start in range(0, len(recorded) - layers + 1, layers):
            calls = recorded[start : start + layers]
            if [index for index, _ in calls] != list(range(layers)):
                raise RuntimeError("router calls were not recorded one forward at a time")
            forwards.append(torch.stack([indices for _, indices in calls], dim=1))
        return forwards

    def end(self) -> ForwardRouting | None:
        """Stop recording the training forward. Replay and gates stay active until :meth:`release`, because
        activation checkpointing re-runs the forward during backward and must route it the same way."""
        if self.current is not None:
            self.current.complete = True
        return self.current

    def release(self) -> None:
        """Forget the training forward (after its backward)."""
        self.current = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---------------------------------------------------------------------------------------------

    def _router_hook(self, layer: MoELayer):
        def hook(module, inputs, output):
            routing = self.current
            if self._recorded is not None and not torch.is_grad_enabled():  # the router's own (live) choice
                self._recorded.append((layer.index, layer.adapter.unpack(output, module)[2].detach()))
                if routing is None or routing.forced is None:
                    return output
                # else: a no-grad forward that also replays (the old-policy forward under routing replay)
            if routing is None:
                return output
            logits, weights, indices = layer.adapter.unpack(output, module)
            if logits.shape[0] != routing.shape[0] * routing.shape[1]:
                return output  # not the recorded forward's layout (e.g. a nested call)
            if routing.forced is not None:
                recorded = routing.forced[:, layer.index, :].to(device=indices.device, dtype=indices.dtype)
                live, indices = indices, torch.where(recorded >= 0, recorded, indices)
                weights = layer.adapter.gate_weights(logits, indices, layer.router).to(weights.dtype)
                if not routing.complete and torch.is_grad_enabled():
                    routing.live_indices.append(live.detach())
            if self.gate_routers:
                logits = gate_gradient(logits, routing.router_gate)
                weights = gate_gradient(weights, routing.router_gate)
            if not routing.complete and torch.is_grad_enabled():
                routing.logits.append(logits)
                routing.indices.append(indices.detach())
            return layer.adapter.pack(logits, weights, indices, output)

        return hook

    def _block_hook(self, module, inputs, output):
        routing = self.current
        if routing is None or not torch.is_grad_enabled():
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        batch, length = routing.shape
        if hidden.shape[:2] != routing.shape and not (hidden.dim() == 2 and hidden.shape[0] % (batch * length) == 0):
            return output  # neither (B, L, H) nor the routed experts' flattened (N, H) or (E * N, H)
        if isinstance(output, tuple):  # GPT-OSS returns (hidden_states, router_scores)
            return (gate_gradient(output[0], routing.expert_gate), *output[1:])
        return gate_gradient(output, routing.expert_gate)
