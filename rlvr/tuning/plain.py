"""A policy with adapters as a plain model: what an inference engine loads, under the base model's names.

LoRA (PEFT): ``merge_adapter`` folds ``B A`` into the base weights and the names lose PEFT's wrappers
(``base_layer``, the routers' ``modules_to_save`` copies), as TRL's vLLM weight sync does. TRL then takes the
update out again with ``unmerge_adapter``, which computes W + BA - BA: in bf16 the frozen base weights drift by
rounding at every sync (1e-2 after 200 syncs of an r=8 layer). Here the base weights are restored from an
exact copy instead. SVF: :func:`rlvr.tuning.svf.merged` (also restores a copy). A policy without adapters is
itself.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from accelerate.utils import is_peft_model
from torch import nn

from rlvr.tuning.svf import merged


def _base_name(name: str) -> str | None:
    """The base model's name of a PEFT state entry; None for entries the base model does not have."""
    if "lora_" in name or ".original_module." in name:
        return None
    return name.replace(".modules_to_save.default.", ".").replace(".base_layer", "")


@contextlib.contextmanager
def plain_state(policy: nn.Module):
    """Within the block: the policy's weights and buffers by the base model's names, adapters folded in."""
    if is_peft_model(policy):
        exact = {name: tensor.clone() for name, tensor in policy.state_dict().items() if ".base_layer." in name}
        policy.merge_adapter()  # writes into the wrapped (base_layer) weights only
        try:
            state = policy.get_base_model().state_dict()
            yield {base: tensor for name, tensor in state.items() if (base := _base_name(name)) is not None}
        finally:
            policy.unmerge_adapter()  # PEFT's merged flags back; the weights are W up to rounding only
            current = policy.state_dict()
            with torch.no_grad():
                for name, tensor in exact.items():
                    current[name].copy_(tensor)
        return
    with merged(policy):
        yield policy.state_dict()


def plain_copy(policy: nn.Module) -> nn.Module:
    """A deep copy of the policy as a plain model, adapters folded in (forwards and hooks are the caller's)."""
    if is_peft_model(policy):
        return copy.deepcopy(policy).merge_and_unload()
    with merged(policy):
        return copy.deepcopy(policy)
