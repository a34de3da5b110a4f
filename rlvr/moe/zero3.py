"""DeepSpeed ZeRO-3 and sparse MoE blocks: register the blocks as leaf modules before DeepSpeed wraps
a model, including the models TRL loads itself from an id (the policy, and the reference model)."""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def zero3_leaves_as_trl_loads():
    """Register ZeRO-3 leaf modules on every model TRL loads from an id inside ``GRPOTrainer.__init__``.

    Given a model id, TRL builds the policy with ``create_model_from_path`` and, with ``beta > 0``, the
    reference model too, which it hands to DeepSpeed before ``__init__`` returns. Leaf registration
    must happen in between, so TRL's loader is wrapped for the duration of ``__init__``.
    """
    from trl.trainer import grpo_trainer

    original = grpo_trainer.create_model_from_path

    def create_and_register(*args, **kwargs):
        model = original(*args, **kwargs)
        register_zero3_leaves(model)
        return model

    grpo_trainer.create_model_from_path = create_and_register
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = original
