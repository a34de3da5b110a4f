"""Where the routers and sparse MoE blocks of each architecture live, and how each turns logits into gate weights.

Most transformers 5.x MoEs have a router module whose forward returns
``(router_logits (N, E), gate_weights (N, k), expert_indices (N, k))`` over the flattened N = B * T
tokens, and a sparse MoE block that feeds those indices and weights to fused experts; a router that
returns something else (Llama 4: dense scores and logits) is read through the adapter's ``unpack`` and
``pack``. An adapter names the block class, the router attribute, and the formula that turns logits into
gate weights (needed to recompute weights from live logits when routing is replayed).

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
    # Where the expert gate sits: the block's output, or (blocks with shared experts beside the routed
    # ones) the output of the routed experts module only, so that shared experts are never gated.
    routed_experts_attribute: str | None = None

    def route(self, block: nn.Module, router: nn.Module, hidden: torch.Tensor):
        """Call the router as its block does; returns the router's own output."""
        return router(hidden)

    def unpack(self, router_output, router: nn.Module):
        """The router's output as ``(logits (N, E), gate weights (N, k), indices (N, k))``."""
        return router_output

    def pack(self, logits: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, router_output):
        """The inverse of :meth:`unpack`: what the block expects from its router, from (possibly replayed or
        gradient-gated) logits, weights and indices."""
        return logits, weights, indices

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

    name, block_class, routed_experts_attribute = "qwen2_moe", "Qwen2MoeSparseMoeBlock", "experts"


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


class DeepseekV3Adapter(MoEAdapter):
    """DeepSeek-V3 routing (aux-loss-free balancing): sigmoid scores; experts are chosen on the scores plus
    ``e_score_correction_bias`` within the best ``topk_group`` of ``n_group`` groups; the gate weights are
    the chosen scores *without* the bias, normalised (``norm_topk_prob``) and scaled by
    ``routed_scaling_factor``. Load balancing uses the normalised scores. A shared expert runs beside
    the routed ones and is never gated."""

    name, block_class, routed_experts_attribute = "deepseek_v3", "DeepseekV3MoE", "experts"

    def router_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=-1, keepdim=True)

    def gate_weights(self, logits, indices, router):
        weights = torch.sigmoid(logits.float()).gather(-1, indices)  # the router works in float32
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor


class Glm4MoeAdapter(DeepseekV3Adapter):
    """GLM-4.5/4.6: DeepSeek-V3 routing."""

    name, block_class = "glm4_moe", "Glm4MoeMoE"


class Dots1Adapter(DeepseekV3Adapter):
    """dots.llm1: DeepSeek-V3 routing."""

    name, block_class = "dots1", "Dots1MoE"


class Qwen3NextAdapter(MoEAdapter):
    """Qwen3-Next: Qwen3 routing, and a shared expert (with a sigmoid gate) beside the routed ones."""

    name, block_class, routed_experts_attribute = "qwen3_next", "Qwen3NextSparseMoeBlock", "experts"


class RenormalisedSoftmaxAdapter(MoEAdapter):
    """Softmax over all experts, top-k, the chosen probabilities always renormalised (no flag)."""

    def gate_weights(self, logits, indices, router):
        weights = torch.softmax(logits, dim=1, dtype=torch.float).gather(-1, indices)
        return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype)


class HunYuanMoEAdapter(RenormalisedSoftmaxAdapter):
    """Hunyuan-MoE: a shared MLP beside the routed experts."""

    name, block_class, routed_experts_attribute = "hunyuan_v1_moe", "HunYuanMoEV1Moe", "experts"


class Qwen35MoeAdapter(RenormalisedSoftmaxAdapter):
    """Qwen3.5-MoE (text): a shared expert with a sigmoid gate beside the routed experts."""

    name, block_class, routed_experts_attribute = "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "experts"


class Ernie45MoeAdapter(MoEAdapter):
    """ERNIE-4.5-MoE: softmax; experts chosen on probabilities plus a correction bias (``moe_statics``);
    weights are the chosen probabilities renormalised (sum clamped at ``norm_min``); shared experts beside."""

    name, block_class, routed_experts_attribute = "ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", "experts"

    def gate_weights(self, logits, indices, router):
        weights = torch.softmax(logits.float(), dim=1, dtype=torch.float).gather(-1, indices)
        weights = weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=router.norm_min)
        return weights.to(router.weight.dtype)  # the router returns the hidden states' dtype


class GraniteMoeAdapter(GptOssAdapter):
    """GraniteMoE: top-k on the logits, softmax over the k chosen ones."""

    name, block_class, router_attribute = "granitemoe", "GraniteMoeMoE", "router"

    def gate_weights(self, logits, indices, router):
        return super().gate_weights(logits, indices, router).to(router.weight.dtype)  # type_as(hidden states)


class MiniMaxM2Adapter(DeepseekV3Adapter):
    """MiniMax-M2: sigmoid scores, experts chosen on scores plus the block's ``e_score_correction_bias``
    (passed to the router as an argument), weights = chosen scores renormalised; no groups, no scaling."""

    name, block_class, routed_experts_attribute = "minimax_m2", "MiniMaxM2SparseMoeBlock", None

    def route(self, block, router, hidden):
        return router(hidden, block.e_score_correction_bias)

    def gate_weights(self, logits, indices, router):
        weights = torch.sigmoid(logits.float()).gather(-1, indices)
        return weights / weights.sum(dim=-1, keepdim=True)


class Llama4Adapter(MoEAdapter):
    """Llama 4 (text): the router returns ``(scores (N, E), logits (N, E))``, scores being the sigmoid of the
    top-k logits and 0 elsewhere. The block scales each expert's *input* by its score and runs every expert
    on every token (an unchosen expert sees zeros, which its bias-free SwiGLU maps to zeros), so the routed
    experts' output is (E * N, H), expert-major; a shared expert runs beside them and is never gated.
    Weights: the sigmoid of the chosen logits, not normalised. Load balancing uses the normalised scores."""

    name, block_class, router_attribute, routed_experts_attribute = "llama4", "Llama4TextMoe", "router", "experts"

    def unpack(self, router_output, router):
        scores, logits = router_output  # (N, E) each
        indices = torch.topk(logits, router.top_k, dim=-1).indices  # the router's own choice, recomputed
        return logits, scores.gather(-1, indices), indices

    def pack(self, logits, weights, indices, router_output):
        scores = torch.zeros_like(router_output[0]).scatter(-1, indices, weights.to(router_output[0].dtype))
        return scores, logits

    def router_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(logits.float())
        return scores / scores.sum(dim=-1, keepdim=True)

    def gate_weights(self, logits, indices, router):
        return torch.sigmoid(logits.float().gather(-1, indices)).to(logits.dtype)


ADAPTERS: tuple[MoEAdapter, ...] = (
    Qwen3MoeAdapter(),
    Qwen2MoeAdapter(),
    OlmoeAdapter(),
    MixtralAdapter(),
    GptOssAdapter(),
    DeepseekV3Adapter(),
    Glm4MoeAdapter(),
    Dots1Adapter(),
    Qwen3NextAdapter(),
    HunYuanMoEAdapter(),
    Ernie45MoeAdapter(),
    GraniteMoeAdapter(),
    MiniMaxM2Adapter(),
    Qwen35MoeAdapter(),
    Llama4Adapter(),
)


@dataclass
class MoELayer:
    """One sparse MoE block of a model."""

    index: int  # 0-based among the model's MoE blocks, in module order
    name: str  # module path, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    adapter: MoEAdapter

    def route(self, hidden: torch.Tensor):
        """This layer's router on (N, H) hidden states, called as its block calls it:
        ``(logits (N, E), gate weights (N, k), indices (N, k))``."""
        return self.adapter.unpack(self.adapter.route(self.block, self.router, hidden), self.router)

    @property
    def gated_module(self) -> nn.Module:
        """The module whose output the expert gate scales: the routed experts, or the whole block."""
        attribute = self.adapter.routed_experts_attribute
        return self.block if attribute is None else getattr(self.block, attribute)

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
