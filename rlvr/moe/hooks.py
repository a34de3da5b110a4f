"""Forward hooks on every router and MoE block: record routing, apply gradient gates.

:class:`RoutingHooks` is the one object a trainer holds. Between :meth:`begin` and :meth:`end` (one
training forward) it records each router's logits (with gradient, for router losses) and chosen
experts, and wraps router outputs and block outputs in gradient gates whose weights the trainer fills
in after the forward, once it knows the forking tokens.

Outside a recorded forward (generation, old-policy and reference log-probs) the hooks do nothing.
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
    indices: list[torch.Tensor] = field(default_factory=list)  # per layer (N, k) chosen experts
    router_gate: GateWeights = field(default_factory=lambda: GateWeights("router"))
    expert_gate: GateWeights = field(default_factory=lambda: GateWeights("expert"))


class RoutingHooks:
    """Hooks on all MoE layers of a model; see the module docstring."""

    def __init__(self, model: nn.Module, gate_routers: bool = True, gate_experts: bool = True):
        self.layers: list[MoELayer] = find_moe_layers(model)
        self.gate_routers, self.gate_experts = gate_routers, gate_experts
        self.current: ForwardRouting | None = None
        self._handles = []
        for layer in self.layers:
            # prepend=True: transformers' own router-logit recorder must see the gated outputs.
            self._handles.append(
                layer.router.register_forward_hook(self._router_hook(layer), prepend=True)
            )
            if gate_experts:
                self._handles.append(layer.block.register_forward_hook(self._block_hook, prepend=True))

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts

    def begin(self, batch: int, length: int) -> ForwardRouting:
        self.current = ForwardRouting(shape=(batch, length))
        return self.current

    def end(self) -> ForwardRouting | None:
        routing, self.current = self.current, None
        return routing

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---------------------------------------------------------------------------------------------

    def _router_hook(self, layer: MoELayer):
        def hook(module, inputs, output):
            routing = self.current
            if routing is None or not torch.is_grad_enabled():
                return output
            logits, weights, indices = output
            if logits.shape[0] != routing.shape[0] * routing.shape[1]:
                return output  # not the recorded forward's layout (e.g. a nested call)
            if self.gate_routers:
                logits = gate_gradient(logits, routing.router_gate)
                weights = gate_gradient(weights, routing.router_gate)
            routing.logits.append(logits)
            routing.indices.append(indices.detach())
            return logits, weights, indices

        return hook

    def _block_hook(self, module, inputs, output):
        routing = self.current
        if routing is None or not torch.is_grad_enabled():
            return output
        if isinstance(output, tuple):  # GPT-OSS returns (hidden_states, router_scores)
            return (gate_gradient(output[0], routing.expert_gate), *output[1:])
        return gate_gradient(output, routing.expert_gate)
