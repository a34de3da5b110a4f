"""Tiny policies built from transformers config classes: Mixture-of-Experts ones, and the dense
models that ``rlvr upcycle`` turns into MoEs.

The same modelling code as the real models (``Qwen/Qwen3-30B-A3B``, ``allenai/OLMoE-1B-7B-0125``,
``mistralai/Mixtral-8x7B-v0.1``, ``Qwen/Qwen3-8B``...), shrunk to a few layers and randomly
initialised, so that every code path of rlvr (routers, fused experts, TRL's fused LM head) runs on a
laptop CPU in seconds. A dense model uses ``expert_size`` as its feed-forward width, so that its
feed-forward layer has the shape of one expert of the MoE of the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Dots1Config,
    Ernie4_5_MoeConfig,
    Glm4MoeConfig,
    GptOssConfig,
    GraniteMoeConfig,
    HunYuanMoEV1Config,
    Llama4TextConfig,
    LlamaConfig,
    MiniMaxM2Config,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

from rlvr.utils.options import option, require


@dataclass
class TinyMoESpec:
    """Size of a tiny MoE policy; every architecture shares these knobs."""

    num_layers: int = option(2, "decoder layers, each with a sparse MoE block")
    hidden_size: int = option(64, "model width")
    num_heads: int = option(4, "attention heads (hidden_size must divide by it)")
    num_kv_heads: int = option(2, "key/value heads (grouped-query attention)")
    expert_size: int = option(128, "intermediate size of each expert")
    num_experts: int = option(8, "experts per MoE block (E)")
    top_k: int = option(2, "experts each token is routed to (k)")
    max_positions: int = option(512, "longest prompt + completion, in tokens")

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "expert_size", "num_experts", "top_k"):
            require(getattr(self, name) >= 1, name, f"must be >= 1; got {getattr(self, name)}")
        require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")
        require(self.top_k <= self.num_experts, "top_k", "must be <= num_experts")


def _qwen3_moe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return Qwen3MoeConfig(
        **common,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        intermediate_size=spec.expert_size,
        decoder_sparse_step=1,
        norm_topk_prob=True,
    )


def _qwen2_moe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return Qwen2MoeConfig(
        **common,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        intermediate_size=spec.expert_size,
        shared_expert_intermediate_size=spec.expert_size,
        decoder_sparse_step=1,
    )


def _olmoe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return OlmoeConfig(
        **common, num_experts=spec.num_experts, num_experts_per_tok=spec.top_k, intermediate_size=spec.expert_size
    )


def _local_experts(spec: TinyMoESpec) -> dict:
    """The expert keys of the Mixtral-style configs (Mixtral, GPT-OSS, GraniteMoE, MiniMax-M2, Llama 4)."""
    return {
        "num_local_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k,
        "intermediate_size": spec.expert_size,
    }


def _mixtral(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return MixtralConfig(**common, **_local_experts(spec))


def _gpt_oss(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return GptOssConfig(
        **common,
        **_local_experts(spec),
        layer_types=["full_attention"] * spec.num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _deepseek_style(config_class):
    """DeepSeek-V3-style routing: sigmoid scores with a correction bias, group-limited top-k (2 groups, the
    experts of 1 chosen, when each group can hold top_k experts), normalised and scaled weights, 1 shared expert."""

    def build(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
        groups = 2 if spec.num_experts % 2 == 0 and spec.num_experts // 2 >= max(spec.top_k, 2) else 1
        return config_class(
            **common,
            n_routed_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            moe_intermediate_size=spec.expert_size,
            intermediate_size=spec.expert_size,
            n_shared_experts=1,
            n_group=groups,
            topk_group=1,
            first_k_dense_replace=0,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
        )

    return build


def _deepseek_v3(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    """Multi-head latent attention: one key/value head per query head, rope and no-rope halves of head_dim."""
    head_dim = spec.hidden_size // spec.num_heads
    attention = {key: value for key, value in common.items() if key != "head_dim"}
    attention.update(
        num_key_value_heads=spec.num_heads,
        q_lora_rank=None,
        kv_lora_rank=max(8, spec.hidden_size // 2),
        qk_rope_head_dim=head_dim,
        qk_nope_head_dim=head_dim,
        v_head_dim=head_dim,
    )
    return _deepseek_style(DeepseekV3Config)(spec, attention)


def _qwen3_next(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    """Qwen3-Next with full attention in every layer (its gated-delta-net layers do not touch routing)."""
    return Qwen3NextConfig(
        **common,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        intermediate_size=spec.expert_size,
        shared_expert_intermediate_size=spec.expert_size,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        layer_types=["full_attention"] * spec.num_layers,
    )


def _qwen3_5_moe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    """The text model of Qwen3.5-MoE, full attention in every layer (as the tiny Qwen3-Next)."""
    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(
        **common,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        shared_expert_intermediate_size=spec.expert_size,
        layer_types=["full_attention"] * spec.num_layers,
    )


def _hunyuan_v1_moe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return HunYuanMoEV1Config(
        **common, num_experts=spec.num_experts, moe_topk=spec.top_k, intermediate_size=spec.expert_size
    )


def _ernie4_5_moe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return Ernie4_5_MoeConfig(
        **common,
        moe_num_experts=spec.num_experts,
        moe_k=spec.top_k,
        moe_intermediate_size=spec.expert_size,
        intermediate_size=spec.expert_size,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        moe_layer_interval=1,
    )


def _granitemoe(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    """GraniteMoE divides its logits by ``logits_scaling``: the LM heads' logit scale is exercised too."""
    return GraniteMoeConfig(
        **common,
        **_local_experts(spec),
        logits_scaling=4.0,
    )


def _minimax_m2(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    return MiniMaxM2Config(
        **common,
        **_local_experts(spec),
        router_jitter_noise=0.0,
    )


def _llama4(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
    """Llama 4 text: every layer an MoE (``interleave_moe_layer_step=1``), RoPE on every layer."""
    return Llama4TextConfig(
        **common,
        **_local_experts(spec),
        intermediate_size_mlp=spec.expert_size,
        interleave_moe_layer_step=1,
        no_rope_layers=[1] * spec.num_layers,
        attention_chunk_size=spec.max_positions,
    )


def _dense(config_class):
    def build(spec: TinyMoESpec, common: dict) -> PretrainedConfig:
        return config_class(**common, intermediate_size=spec.expert_size)

    return build


# Adding an architecture: one function from the spec to its transformers config.
ARCHITECTURES = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "olmoe": _olmoe,
    "mixtral": _mixtral,
    "gpt_oss": _gpt_oss,
    "deepseek_v3": _deepseek_v3,
    "glm4_moe": _deepseek_style(Glm4MoeConfig),
    "dots1": _deepseek_style(Dots1Config),
    "qwen3_next": _qwen3_next,
    "hunyuan_v1_moe": _hunyuan_v1_moe,
    "ernie4_5_moe": _ernie4_5_moe,
    "granitemoe": _granitemoe,
    "minimax_m2": _minimax_m2,
    "qwen3_5_moe": _qwen3_5_moe,
    "llama4": _llama4,
}
# Dense models (one feed-forward layer of width expert_size per block), the inputs of ``rlvr upcycle``.
DENSE_ARCHITECTURES = {
    "qwen3": _dense(Qwen3Config),
    "mistral": _dense(MistralConfig),
    "llama": _dense(LlamaConfig),
}


def tiny_moe_config(
    architecture: str, spec: TinyMoESpec, vocab_size: int, pad_token_id: int, eos_token_id: int
) -> PretrainedConfig:
    """The transformers config of a tiny model of ``architecture`` (a key of ``ARCHITECTURES`` or
    ``DENSE_ARCHITECTURES``)."""
    builders = ARCHITECTURES | DENSE_ARCHITECTURES
    if architecture not in builders:
        raise ValueError(f"unknown tiny architecture {architecture!r}; known: {sorted(builders)}")
    if spec.hidden_size % spec.num_heads:
        raise ValueError(f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.hidden_size // spec.num_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        # Router logits are requested by the training forward only: with this True, generate() on
        # left-padded prompts of different lengths crashes in the per-step aux loss.
        output_router_logits=False,
    )
    return builders[architecture](spec, common)


def build_tiny_moe(
    architecture: str, spec: TinyMoESpec, vocab_size: int, pad_token_id: int, eos_token_id: int, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (MoE, or dense for a dense architecture); the same seed
    gives the same weights."""
    config = tiny_moe_config(architecture, spec, vocab_size, pad_token_id, eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = pad_token_id
    model.generation_config.eos_token_id = eos_token_id
    return model
