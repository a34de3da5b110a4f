"""Where the routers and sparse MoE blocks of each architecture live, and how each turns logits into gate weights.

Every supported transformers 5.x MoE has a router module whose forward returns
``(router_logits (N, E), gate_weights (N, k), expert_indices (N, k))`` over the flattened N = B * T
tokens, and a sparse MoE block that feeds those indices and weights to fused experts. An adapter
names the block class, the router attribute, and the formula that turns logits into gate weights
(needed to recompute weights from live logits when routing is replayed).

Adding an architecture is one small subclass registered in :data:`ADAPTERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnknownMoEArchitecture(ValueError):
    """The model has no sparse MoE block that any adapter knows."""


class MoEAdapter:
    """How to find and read the MoE layers of one architecture family."""

    name: str = ""
    block_class: str = ""  # class name of the sparse MoE block, e.g. "Qwen3MoeSparseMoeBlock"
    router_attribute: str = "gate"  # attribute of the block holding the router module

    def router_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, E) routing distribution over all experts (for load balancing and analytics)."""
        return torch.softmax(logits.float(), dim=-1)

    def gate_weights(self, logits: torch.Tensor, indices: torch.Tensor, router: nn.Module) -> torch.Tensor:
        """(N, k) weights of the experts in ``indices`` computed from ``logits``, as the router would."""
        probabilities = torch.softmax(logits.float(), dim=-1)
        weights = probabilities.gather(-1, indices)
        if getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype)


class Qwen3MoeAdapter(MoEAdapter):
    name, block_class = "qwen3_moe", "Qwen3MoeSparseMoeBlock"


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE: the shared expert and its sigmoid gate sit beside the router; only the routed part is gated."""

    name, block_class = "qwen2_moe", "Qwen2MoeSparseMoeBlock"


class OlmoeAdapter(MoEAdapter):
    name, block_class = "olmoe", "OlmoeSparseMoeBlock"


class MixtralAdapter(MoEAdapter):
    name, block_class = "mixtral", "MixtralSparseMoeBlock"

    def gate_weights(self, logits, indices, router):
        probabilities = torch.softmax(logits.float(), dim=-1).gather(-1, indices)
        return probabilities / probabilities.sum(dim=-1, keepdim=True)  # Mixtral always renormalises, in float32


class GptOssAdapter(MoEAdapter):
    """GPT-OSS: top-k on raw logits (with a bias), softmax over the k chosen logits only."""

    name, block_class, router_attribute = "gpt_oss", "GptOssMLP", "router"

    def gate_weights(self, logits, indices, router):
        chosen = logits.gather(-1, indices)
        return torch.softmax(chosen, dim=-1, dtype=chosen.dtype)


ADAPTERS: tuple[MoEAdapter, ...] = (
    Qwen3MoeAdapter(),
    Qwen2MoeAdapter(),
    OlmoeAdapter(),
    MixtralAdapter(),
    GptOssAdapter(),
)


@dataclass
class MoELayer:
    """One sparse MoE block of a model."""

    index: int  # 0-based among the model's MoE blocks, in module order
    name: str  # module path, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    adapter: MoEAdapter

    @property
    def num_experts(self) -> int:
        return int(self.router.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every sparse MoE block of ``model`` with its router, or :class:`UnknownMoEArchitecture`."""
    by_class = {adapter.block_class: adapter for adapter in ADAPTERS}
    layers = []
    for name, module in model.named_modules():
        adapter = by_class.get(type(module).__name__)
        if adapter is None:
            continue
        router = getattr(module, adapter.router_attribute, None)
        if router is None:
            raise UnknownMoEArchitecture(
                f"{name} ({type(module).__name__}) has no router at .{adapter.router_attribute}"
            )
        layers.append(MoELayer(len(layers), name, module, router, adapter))
    if not layers:
        known = ", ".join(f"{a.block_class} ({a.name})" for a in ADAPTERS)
        raise UnknownMoEArchitecture(
            f"no sparse MoE block found in {type(model).__name__}; rlvr.moe looked for: {known}. "
            "Add an adapter in rlvr/moe/adapters.py for this architecture."
        )
    return layers


def register_zero3_leaf_modules(model: nn.Module) -> list[str]:
    """Mark every sparse MoE block as a DeepSpeed ZeRO-3 leaf module; returns the block class names.

    ZeRO-3 gathers parameters module by module as the forward reaches them. Inside an MoE block,
    ranks route their tokens to different experts, so per-expert gathers can diverge between ranks
    and hang; a leaf module is gathered whole on every rank.
    """
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(layer.block) for layer in find_moe_layers(model)}, key=lambda cls: cls.__name__)
    set_z3_leaf_modules(model, classes)
    return [cls.__name__ for cls in classes]
