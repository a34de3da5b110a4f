"""Build an MoE checkpoint from dense checkpoints of one family.

* **Branch-Train-MiX** (BTX; Sukhbaatar et al., 2024, "Branch-Train-MiX: Mixing Expert LLMs into a
  Mixture-of-Experts LLM", sec. 2.2): expert ``i`` of every MoE layer is the feed-forward layer of dense
  model ``i`` (each trained on its own domain); every other parameter (embeddings, attention, norms, LM
  head) is the average of the dense models' parameters; the router is new.
* **Sparse upcycling** (Komatsuzaki et al., 2022, "Sparse Upcycling: Training Mixture-of-Experts from
  Dense Checkpoints"): one dense model's feed-forward layer copied into every expert, the rest kept.

Router initialisation: ``random`` (the MoE's own init), ``zero`` (uniform routing at the start), or
``mean_hidden`` (BTX only): router row ``i`` of layer ``l`` is the mean over a few samples of domain
``i`` of the hidden state that enters layer ``l``'s feed-forward block in dense model ``i``, minus
the mean of those domain means, so that a token resembling domain ``i`` scores highest on expert ``i``.

Families: Qwen3 dense -> Qwen3-MoE, Mistral/Llama dense -> Mixtral. Every input is checked before
anything is written: same family and shapes, the same tokenizer, a new output directory. The output
is a plain transformers checkpoint (``AutoModelForCausalLM.from_pretrained``) plus ``upcycle.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen3MoeConfig,
)

from rlvr.models import built_whole, remove_stale_staging, save_weights_on_this_rank, staging_name

METHODS = ("btx", "sparse")
ROUTER_INITS = ("random", "zero", "mean_hidden")
MANIFEST = "upcycle.json"


class UpcycleError(ValueError):
    """Inputs that cannot be upcycled together; raised before anything is written."""


@dataclass(frozen=True)
class Family:
    """How one dense architecture maps onto its MoE counterpart."""

    moe_config_class: type
    experts_key: str  # the MoE config's field for the number of experts
    expert_width_key: str  # the MoE config's field for the width of one expert
    dense_only_keys: tuple[str, ...] = ()  # dense config fields the MoE config does not take


FAMILIES: dict[str, Family] = {
    "qwen3": Family(Qwen3MoeConfig, "num_experts", "moe_intermediate_size", ("layer_types", "max_window_layers")),
    "mistral": Family(MixtralConfig, "num_local_experts", "intermediate_size"),
    "llama": Family(
        MixtralConfig, "num_local_experts", "intermediate_size", ("mlp_bias", "attention_bias", "pretraining_tp")
    ),
}
_FFN = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")


def _load_dense(path: str) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    looks_local = Path(path).is_absolute() or path.startswith(".") or path.count("/") != 1  # hub ids are "org/name"
    if looks_local and not Path(path).is_dir():
        raise UpcycleError(f"{path}: no such checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UpcycleError(f"{path}: not a loadable checkpoint ({str(error).splitlines()[0]})") from None
    if config.model_type not in FAMILIES:
        raise UpcycleError(
            f"{path}: model_type {config.model_type!r} cannot be upcycled; supported dense families: "
            + ", ".join(sorted(FAMILIES))
        )
    if config.model_type == "llama" and (
        getattr(config, "mlp_bias", False) or getattr(config, "attention_bias", False)
    ):
        raise UpcycleError(
            f"{path}: a Llama with MLP or attention biases has no Mixtral counterpart (Mixtral has no biases)"
        )
    return config, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _check_compatible(
    paths: Sequence[str], configs: list[PretrainedConfig], states: list[dict], tokenizers: list[PreTrainedTokenizerBase]
) -> None:
    families = {config.model_type for config in configs}
    if len(families) > 1:
        listing = ", ".join(f"{path} ({config.model_type})" for path, config in zip(paths, configs, strict=True))
        raise UpcycleError(f"dense models of different families cannot be mixed: {listing}")
    for path, state in zip(paths[1:], states[1:], strict=True):
        if state.keys() != states[0].keys():
            raise UpcycleError(f"{path} has different parameters from {paths[0]}")
        for name, tensor in state.items():
            if tensor.shape != states[0][name].shape:
                raise UpcycleError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, {paths[0]} has {tuple(states[0][name].shape)}"
                )
    reference = tokenizers[0]
    for path, tokenizer in zip(paths[1:], tokenizers[1:], strict=True):
        if (
            tokenizer.get_vocab() != reference.get_vocab()
            or tokenizer.all_special_tokens != reference.all_special_tokens
        ):
            raise UpcycleError(f"{path} and {paths[0]} have different tokenizers (vocabulary or special tokens)")


def moe_config_from_dense(dense: PretrainedConfig, num_experts: int, top_k: int) -> PretrainedConfig:
    """The MoE config whose experts have the shape of ``dense``'s feed-forward layer."""
    family = FAMILIES[dense.model_type]
    values = dense.to_dict()
    for key in ("architectures", "model_type", "transformers_version", "_name_or_path", *family.dense_only_keys):
        values.pop(key, None)
    values.update(
        {
            family.experts_key: num_experts,
            family.expert_width_key: dense.intermediate_size,
            "num_experts_per_tok": top_k,
            "output_router_logits": False,
        }
    )
    if family.moe_config_class is Qwen3MoeConfig:
        values.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    return family.moe_config_class(**values)


@torch.no_grad()
def domain_mean_hidden(model, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """(layers, H) mean over real tokens of ``texts`` of the input of each layer's feed-forward block."""
    num_layers = len(model.model.layers)
    sums = [None] * num_layers
    count = 0
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_hook(
            lambda module, inputs, output, index=index: captured.__setitem__(index, inputs[0])
        )
        for index, layer in enumerate(model.model.layers)
    ]
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
            if ids.numel() == 0:
                continue
            model(input_ids=ids)
            for index in range(num_layers):
                hidden = captured[index].reshape(-1, captured[index].shape[-1]).sum(0)  # (H,)
                sums[index] = hidden if sums[index] is None else sums[index] + hidden
            count += ids.numel()
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise UpcycleError(f"no tokens in the router samples for {model.name_or_path}")
    return torch.stack(sums) / count


def upcycle(
    dense_paths: Sequence[str],
    output_dir: str | os.PathLike,
    method: str = "btx",
    num_experts: int | None = None,
    top_k: int = 1,
    router_init: str = "random",
    router_samples: Sequence[Sequence[str]] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an MoE checkpoint to ``output_dir`` built from ``dense_paths`` (see the module docstring).

    Args:
        dense_paths: BTX: one dense checkpoint per expert; sparse: exactly one.
        num_experts: sparse: experts per layer (required); BTX: must equal ``len(dense_paths)`` if given.
        top_k: experts per token in the MoE.
        router_init: one of :data:`ROUTER_INITS`.
        router_samples: ``mean_hidden``: texts of each dense model's domain, one list per dense model.
        seed: seed of the MoE's random init (router under ``random``).
    """
    paths = [str(path) for path in dense_paths]
    output_dir = Path(output_dir)
    if method not in METHODS:
        raise UpcycleError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if router_init not in ROUTER_INITS:
        raise UpcycleError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    if method == "btx":
        if len(paths) < 2:
            raise UpcycleError(f"btx needs at least 2 dense models (one per expert), got {len(paths)}")
        if num_experts not in (None, len(paths)):
            raise UpcycleError(
                f"btx makes one expert per dense model: num_experts must be {len(paths)}, got {num_experts}"
            )
        num_experts = len(paths)
    else:
        if len(paths) != 1:
            raise UpcycleError(f"sparse upcycling copies one dense model, got {len(paths)}")
        if not num_experts or num_experts < 1:
            raise UpcycleError("sparse upcycling needs num_experts >= 1")
        if router_init == "mean_hidden":
            raise UpcycleError("router_init 'mean_hidden' needs one domain per expert (btx); use random or zero")
    if not 1 <= top_k <= num_experts:
        raise UpcycleError(f"top_k must be in 1..{num_experts}, got {top_k}")
    if router_init == "mean_hidden" and (router_samples is None or len(router_samples) != len(paths)):
        raise UpcycleError(f"router_init 'mean_hidden' needs one list of sample texts per dense model ({len(paths)})")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UpcycleError(f"{output_dir} exists and is not empty (pass overwrite to replace it)")

    with built_whole():  # under a ZeRO-3 launch too: the dense models and the MoE whole on this rank
        loaded = [_load_dense(path) for path in paths]
    configs, models = [config for config, _ in loaded], [model for _, model in loaded]
    states = [{name: tensor.detach() for name, tensor in model.state_dict().items()} for model in models]
    tokenizers = [AutoTokenizer.from_pretrained(path) for path in paths]
    _check_compatible(paths, configs, states, tokenizers)

    moe_config = moe_config_from_dense(configs[0], num_experts, top_k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with built_whole():
            moe = AutoModelForCausalLM.from_config(moe_config, dtype=torch.float32)
    moe_state = moe.state_dict()
    sources = states if method == "btx" else states * num_experts  # (E,) dense state feeding each expert
    merged = {}
    for name in states[0]:
        if name.endswith(_FFN):
            continue
        if name not in moe_state:
            raise UpcycleError(f"{paths[0]}: parameter {name} has no place in {type(moe).__name__}")
        merged[name] = torch.stack([state[name] for state in states]).mean(0)  # BTX: average; sparse: the one model
    for index in range(configs[0].num_hidden_layers):
        prefix = f"model.layers.{index}.mlp"
        merged[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [  # (E, 2I, H): gate rows, then up rows
                torch.cat([source[f"{prefix}.gate_proj.weight"], source[f"{prefix}.up_proj.weight"]])
                for source in sources
            ]
        )
        merged[f"{prefix}.experts.down_proj"] = torch.stack(
            [source[f"{prefix}.down_proj.weight"] for source in sources]
        )  # (E, H, I)
        router = moe_state[f"{prefix}.gate.weight"]  # (E, H)
        if router_init == "zero":
            merged[f"{prefix}.gate.weight"] = torch.zeros_like(router)
        elif router_init == "random":
            merged[f"{prefix}.gate.weight"] = router
    if router_init == "mean_hidden":
        means = torch.stack(
            [
                domain_mean_hidden(model, tokenizer, samples)
                for model, tokenizer, samples in zip(models, tokenizers, router_samples, strict=True)
            ]
        )  # (E, layers, H)
        centred = means - means.mean(0, keepdim=True)
        for index in range(configs[0].num_hidden_layers):
            merged[f"model.layers.{index}.mlp.gate.weight"] = centred[:, index]
    missing = set(moe_state) - set(merged)
    if missing:
        raise UpcycleError(f"parameters of the MoE not filled: {sorted(missing)[:5]}")
    moe.load_state_dict(merged, strict=True)

    staging = staging_name(output_dir)
    remove_stale_staging(output_dir.parent)
    moe.generation_config = models[0].generation_config
    save_weights_on_this_rank(moe, staging)
    tokenizers[0].save_pretrained(staging)
    manifest = {
        "method": method,
        "dense_models": paths,
        "num_experts": num_experts,
        "top_k": top_k,
        "router_init": router_init,
        "seed": seed,
        "moe_model_type": moe_config.model_type,
        "router_samples": [len(samples) for samples in router_samples] if router_init == "mean_hidden" else None,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)
    return output_dir
