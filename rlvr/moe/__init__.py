"""Router-aware updates for MoE policies (plain PyTorch, model-agnostic through adapters).

* :mod:`rlvr.moe.config`    -- the ``moe`` config section (:class:`MoEConfig`)
* :mod:`rlvr.moe.updates`   -- :class:`RouterAwareUpdates`: a config's gates, losses and analytics on one forward
* :mod:`rlvr.moe.adapters`  -- find routers and sparse MoE blocks (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, GPT-OSS)
* :mod:`rlvr.moe.positions` -- completion-token masks -> decision positions (one-position shift)
* :mod:`rlvr.moe.gates`     -- per-position gradient gates, weights read at backward time
* :mod:`rlvr.moe.hooks`     -- forward hooks that record routing and apply the gates
* :mod:`rlvr.moe.losses`    -- token-scoped load-balancing loss and router z-loss
* :mod:`rlvr.moe.stats`     -- routing analytics: forking vs other tokens

May import only :mod:`rlvr.utils` (no TRL); the trainer's components apply it.
"""

from rlvr.moe.adapters import ADAPTERS, MoEAdapter, MoELayer, UnknownMoEArchitecture, find_moe_layers
from rlvr.moe.config import MoEConfig
from rlvr.moe.gates import GateWeights, gate_gradient
from rlvr.moe.hooks import ForwardRouting, RoutingHooks
from rlvr.moe.losses import load_balancing_loss, router_z_loss
from rlvr.moe.positions import decision_positions
from rlvr.moe.stats import LayerRouting, layer_routing, summarize

__all__ = [
    "ADAPTERS",
    "ForwardRouting",
    "GateWeights",
    "LayerRouting",
    "MoEAdapter",
    "MoEConfig",
    "MoELayer",
    "RoutingHooks",
    "UnknownMoEArchitecture",
    "decision_positions",
    "find_moe_layers",
    "gate_gradient",
    "layer_routing",
    "load_balancing_loss",
    "router_z_loss",
    "summarize",
]
