"""Policies: tiny MoE factory, offline tokenizer, the shared ``from_pretrained`` loading path, ZeRO-3
partitioning helpers (``partitioned.py``), expert parallelism through transformers (``parallel.py``) and MoE
upcycling of dense policies (``upcycle.py``: Branch-Train-MiX, sparse upcycling). May import only
:mod:`rlvr.utils` (no TRL)."""

from rlvr.models.loading import (
    DTYPES,
    TINY_PREFIX,
    ModelConfig,
    is_tiny,
    load_pretrained,
    save_tiny_policy,
    save_weights_on_this_rank,
    tiny_architecture,
)
from rlvr.models.partitioned import built_whole, gathered_whole, remove_stale_staging, staging_name
from rlvr.models.tiny import ARCHITECTURES, DENSE_ARCHITECTURES, TinyMoESpec, build_tiny_moe, tiny_moe_config
from rlvr.models.tokenizer import build_char_tokenizer

__all__ = [
    "ARCHITECTURES",
    "DENSE_ARCHITECTURES",
    "DTYPES",
    "ModelConfig",
    "TINY_PREFIX",
    "TinyMoESpec",
    "build_char_tokenizer",
    "built_whole",
    "gathered_whole",
    "build_tiny_moe",
    "is_tiny",
    "load_pretrained",
    "remove_stale_staging",
    "save_tiny_policy",
    "save_weights_on_this_rank",
    "staging_name",
    "tiny_architecture",
    "tiny_moe_config",
]
