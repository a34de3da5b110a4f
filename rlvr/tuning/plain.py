"""A policy with adapters as a plain model: what an inference engine loads, under the base model's names.

LoRA (PEFT): ``merge_adapter`` folds ``B A`` into the base weights, the names lose PEFT's wrappers
(``base_layer``, the routers' ``modules_to_save`` copies), and ``unmerge_adapter`` takes the update out again,
as TRL's vLLM weight sync does. SVF: :func:`rlvr.tuning.svf.merged`. A policy without adapters is itself.
"""

from __future__ import annotations

import contextlib
import copy

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
        policy.merge_adapter()
        try:
            state = policy.get_base_model().state_dict()
            yield {base: tensor for name, tensor in state.items() if (base := _base_name(name)) is not None}
        finally:
            policy.unmerge_adapter()
        return
    with merged(policy):
        yield policy.state_dict()


def plain_copy(policy: nn.Module) -> nn.Module:
    """A deep copy of the policy as a plain model, adapters folded in (forwards and hooks are the caller's)."""
    if is_peft_model(policy):
        return copy.deepcopy(policy).merge_and_unload()
    with merged(policy):
        return copy.deepcopy(policy)
