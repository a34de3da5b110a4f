"""DeepSpeed ZeRO-3 and sparse MoE blocks: register the blocks as leaf modules before DeepSpeed wraps
a model (the trainer also does it for the models TRL loads itself from an id)."""

from __future__ import annotations

import torch
from transformers.integrations import is_deepspeed_zero3_enabled

from rlvr.moe.adapters import UnknownMoEArchitecture, register_zero3_leaf_modules


def register_zero3_leaves(model: torch.nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, mark the model's sparse MoE blocks as leaf modules (see
    :func:`rlvr.moe.adapters.register_zero3_leaf_modules`); a dense model has none."""
    if not is_deepspeed_zero3_enabled():
        return
    try:
        register_zero3_leaf_modules(model)
    except UnknownMoEArchitecture:
        pass
