"""LoRA on an MoE policy through PEFT, the routed experts included.

LoRA (Hu et al., 2021, arXiv 2106.09685) adds ``alpha / r x B A`` to a frozen weight. PEFT (>= 0.17) reaches
the fused 3D expert parameters of transformers 5 through ``target_parameters``: for a parameter of E experts
it keeps ``A`` (r E, in) and ``B`` (out, r E), one rank-r pair per expert, and adds their product to the
parameter for the duration of the experts' forward (``lora.ParamWrapper``). That is how every family in
:data:`rlvr.moe.ADAPTERS` gets expert LoRA here: all of them store ``experts.gate_up_proj`` and
``experts.down_proj`` as fused parameters. (For GPT-OSS PEFT reads the transposed layout from the experts'
``is_transposed``; Llama 4's experts, also transposed, do not say so, so PEFT names A and B the other way
round there; the update is still a rank-r matrix per expert, zero at init, and trains the same.)

Routers train as full parameters through PEFT's ``modules_to_save`` (a trainable copy beside the frozen
original, saved with the adapter), or stay frozen. The wrapped policy keeps its sparse blocks' classes, so
:mod:`rlvr.moe` finds routers and experts inside it as in a plain policy.
"""

from __future__ import annotations

from torch import nn

from rlvr.tuning.config import AdapterConfig, require_peft
from rlvr.tuning.targets import Targets, resolve_targets


def lora_config(settings: AdapterConfig, model: nn.Module):
    """The ``peft.LoraConfig`` for ``model``: the resolved linear layers and expert parameters as PEFT targets
    (full module paths, so nothing else matches), routers in ``modules_to_save`` when they train."""
    require_peft("peft.method")
    from peft import LoraConfig

    targets = resolve_targets(model, settings.target_modules, settings.experts)
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets.linear) or None,
        target_parameters=[expert.key for expert in targets.experts] or None,
        modules_to_save=list(targets.routers) if settings.routers == "train" else None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_parameter_count(targets: Targets, model: nn.Module, rank: int) -> int:
    """Trainable LoRA parameters for ``targets`` at ``rank`` (routers not included): r (in + out) per linear
    layer, r E (in + out) per expert parameter; computed from shapes, so it works on the meta device."""
    count = 0
    for path in targets.linear:
        layer = model.get_submodule(path)
        count += rank * (layer.in_features + layer.out_features)
    for expert in targets.experts:
        experts, rows, columns = getattr(model.get_submodule(expert.path), expert.name).shape
        count += rank * experts * (rows + columns)
    return count
