"""Expert parallelism through transformers: each rank holds ``num_experts / ep_size`` of every MoE layer's
experts, tokens reach them by all-to-all, and the dense weights are sharded by FSDP2 over every rank.

DeepSpeed ZeRO-3 gathers all of a layer's experts on every rank for every forward and backward, though a
token activates ``top_k`` of them; expert parallelism moves the tokens instead. transformers builds it at
load time from the model family's ``base_model_ep_plan`` (``DistributedConfig(ep_size=..., fsdp_size=...)``);
TRL's ``GRPOTrainer`` trains such a model unchanged, and rlvr's router-aware machinery sees the same router
outputs and expert-block inputs and outputs per rank as under data parallelism (the experts' all-to-all happens
inside the block). Tensor parallelism stays off: GRPO slices each generation batch by process index, so every
rank must hold its own batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from rlvr.utils.options import option, require

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass
class ParallelConfig:
    """The ``parallel`` config section (launch with ``rlvr launch --ep N``)."""

    ep_size: int = option(
        1,
        "expert parallelism: ranks that split each MoE layer's experts (1: off; N > 1: the policy loads through "
        "transformers' DistributedConfig, experts sharded over N ranks, dense weights under FSDP2; no DeepSpeed)",
    )

    def validate(self) -> None:
        require(self.ep_size >= 1, "ep_size", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.ep_size > 1


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_expert_parallel(settings: ParallelConfig, text_config, world: int) -> None:
    """What expert parallelism cannot run with, as one-line errors naming ``parallel.ep_size``: the launch
    (:func:`check_launch`) and the model (a family with an expert-parallel plan, experts the ranks can split)."""
    check_launch(settings, world)
    ep = settings.ep_size
    if not getattr(type(text_config), "base_model_ep_plan", None):
        raise ValueError(
            f"parallel.ep_size={ep}: transformers has no expert-parallel plan for {text_config.model_type} "
            "(base_model_ep_plan); use DeepSpeed ZeRO (rlvr launch --zero 3)"
        )
    experts = next((getattr(text_config, name) for name in EXPERT_COUNT_FIELDS if hasattr(text_config, name)), None)
    if not experts or experts % ep:
        raise ValueError(f"parallel.ep_size={ep} must divide the number of experts per layer ({experts})")


def check_launch(settings: ParallelConfig, world: int) -> None:
    """The processes of the launch can hold ``ep_size`` expert shards, without DeepSpeed (checked before any
    model is built)."""
    ep = settings.ep_size
    if world == 1:
        raise ValueError(f"parallel.ep_size={ep}: expert parallelism needs {ep} processes (rlvr launch --ep {ep})")
    if world % ep:
        raise ValueError(f"parallel.ep_size={ep} must divide the number of processes ({world})")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError(
            f"parallel.ep_size={ep}: a DeepSpeed launch shards every parameter itself (ZeRO); expert parallelism "
            "shards experts through transformers and FSDP2 instead: launch with rlvr launch --ep, not --zero"
        )


def distributed_config(settings: ParallelConfig, world: int):
    """transformers' ``DistributedConfig``: experts over ``ep_size`` ranks, FSDP2 over all ``world`` (tp 1)."""
    from transformers.distributed import DistributedConfig

    return DistributedConfig(ep_size=settings.ep_size, fsdp_size=world)


@contextlib.contextmanager
def gathered_for_generation(model):
    """Under FSDP2 (the dense weights of an expert-parallel policy): every FSDP module keeps its weights gathered
    from its first forward to the end of the block, so generation gathers them once per call instead of once
    per decoded token (torch's ``set_reshard_after_forward``, whose documentation suggests this for evaluation);
    afterwards each resharded and set back as for training (the root, as FSDP2 sets it, keeps its own). Does
    nothing to a model without FSDP2 modules."""
    from torch.distributed.fsdp import FSDPModule

    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not modules:
        yield
        return
    root = modules[0]
    root.set_reshard_after_forward(False)
    try:
        yield
    finally:
        root.set_reshard_after_forward(True)
        root.set_reshard_after_forward(False, recurse=False)
        for module in modules:
            module.reshard()


def full_tensors(named_parameters):
    """``(name, tensor)`` pairs with every sharded one (a DTensor: an expert-parallel or FSDP2 weight) gathered
    whole: ``full_tensor()`` is a collective, so every rank iterates, as TRL's weight sync does."""
    from torch.distributed.tensor import DTensor

    for name, tensor in named_parameters:
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sync_full_tensors(generation) -> None:
    """TRL's vLLM weight sync (``VLLMGeneration._iter_named_params``) made to send whole tensors of a policy
    loaded with expert parallelism: without FSDP set up through accelerate it would send each rank's shard."""
    iterate = generation._iter_named_params
    generation._iter_named_params = lambda: full_tensors(iterate())
