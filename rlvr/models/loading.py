"""One loading path for every policy: hub ids, local checkpoints, and the embedded tiny models.

``tiny:<architecture>`` builds a random tiny MoE and its offline tokenizer, saves both to a directory
and then loads them back through :func:`load_pretrained`, the very function that loads
``Qwen/Qwen3-30B-A3B`` from the hub. The tiny path therefore tests the real loading code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlvr.models.parallel import ParallelConfig, check_expert_parallel, distributed_config, world_size
from rlvr.models.partitioned import built_whole, gathered_whole
from rlvr.models.tiny import ARCHITECTURES, DENSE_ARCHITECTURES, TinyMoESpec, build_tiny_moe, tiny_moe_config
from rlvr.models.tokenizer import build_char_tokenizer
from rlvr.utils.options import option, require

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class ModelConfig:
    """The ``model`` config section: which policy to load and how."""

    name_or_path: str = option(
        "tiny:qwen3_moe",
        "policy: 'tiny:<arch>' (embedded random MoE, arch in "
        + ", ".join(sorted(ARCHITECTURES))
        + "; or dense: "
        + ", ".join(sorted(DENSE_ARCHITECTURES))
        + "), a hub id (Qwen/Qwen3-30B-A3B) or a local checkpoint directory",
    )
    tiny: TinyMoESpec = option(TinyMoESpec, "size of the embedded tiny MoE (used with 'tiny:<arch>')")
    dtype: str = option("float32", "weights dtype when loading", choices=tuple(DTYPES))
    trust_remote_code: bool = option(False, "allow custom modelling code from the hub")

    def validate(self) -> None:
        if is_tiny(self.name_or_path):
            known = sorted(ARCHITECTURES) + sorted(DENSE_ARCHITECTURES)
            architecture = tiny_architecture(self.name_or_path)
            require(
                architecture in known,
                "name_or_path",
                f"unknown tiny architecture {architecture!r}; one of {', '.join(known)}",
            )


def is_tiny(name_or_path: str) -> bool:
    return name_or_path.startswith(TINY_PREFIX)


def tiny_architecture(name_or_path: str) -> str:
    """``"tiny:olmoe"`` -> ``"olmoe"``."""
    return name_or_path[len(TINY_PREFIX) :]


def save_tiny_policy(architecture: str, spec: TinyMoESpec, directory: str | os.PathLike, seed: int = 0) -> Path:
    """Build a random tiny MoE with the offline tokenizer and save both to ``directory``. Under a ZeRO-3 launch
    it is built whole (:func:`rlvr.models.partitioned.built_whole`): the same policy a one-process run builds."""
    directory = Path(directory)
    tokenizer = build_char_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    # Some model types make AutoTokenizer load their own tokenizer class, which can add special tokens
    # (Qwen3.5-MoE adds an unk token): size the model to the tokenizer as it loads back next to its config.
    tiny_moe_config(architecture, spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).save_pretrained(
        directory
    )
    tokenizer.save_pretrained(directory)
    vocabulary = len(AutoTokenizer.from_pretrained(directory))
    with built_whole():
        model = build_tiny_moe(architecture, spec, vocabulary, tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    save_weights_on_this_rank(model, directory)  # replaces the config written above
    return directory


def save_weights_on_this_rank(model: PreTrainedModel, directory: str | os.PathLike) -> None:
    """``model.save_pretrained(directory)`` with the weights written by this process, whatever its rank.

    transformers >= 5.25 writes weights only on global rank 0 once ``torch.distributed`` is initialised.
    Each rank of a launch builds its own copy of a tiny policy or a warm start in a staging directory and
    publishes it (:func:`rlvr.run.warm_start.publish_directory`); without its weights, a rank that published
    first would leave a directory with a config and no model under the shared name. A model partitioned by
    ZeRO-3 is gathered first: then every rank must call this, as every rank of a launch does.
    """
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # instance attribute, this call only
    try:
        with gathered_whole(model):
            model.save_pretrained(directory)
    finally:
        del model.should_save_on_this_rank


def expose_backbone(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model.base_model`` the decoder backbone where the class's ``base_model_prefix`` names no
    attribute, and return ``model``.

    TRL's fused LM head and rlvr's sparse head take hidden states from ``model.base_model``.
    Llama4ForCausalLM declares ``base_model_prefix = "language_model"`` but keeps its backbone at
    ``.model``, so there ``base_model`` is the model itself and the fused forward finds no hidden states;
    the prefix set on the instance points it at the backbone (loading and saving read the class's).
    """
    if model.base_model is model and isinstance(getattr(model, "model", None), PreTrainedModel):
        model.base_model_prefix = "model"
    return model


def load_pretrained(
    name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, parallel: ParallelConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer with ``from_pretrained`` (hub id or local directory); with
    ``parallel.ep_size > 1``, its experts sharded over the ranks (:mod:`rlvr.models.parallel`).

    The tokenizer is set up for RL: left padding, a pad token (the eos token when it has none).
    """
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {}
    if parallel is not None and parallel.enabled:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        check_expert_parallel(parallel, config.get_text_config(), world_size())
        kwargs["distributed_config"] = distributed_config(parallel, world_size())
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs
    )
    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        # Saved by a trainer that computed the MoE aux loss (e.g. SFTTrainer). Left on, every generate()
        # call computes that loss per decoding step and crashes on left-padded batches; router losses
        # belong to the training forward, which asks for router logits explicitly.
        text_config.output_router_logits = False
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def runs_as_reference(model: torch.nn.Module) -> bool:
    """Whether a PEFT policy's forward now computes TRL's reference log-probs: every adapter disabled
    (``PeftModel.disable_adapter()``) or the adapter named ``ref`` active (TRL's ``use_adapter``). False for
    a model without adapters."""
    if not getattr(model, "peft_config", None):
        return False
    if getattr(model, "active_adapter", None) == "ref":
        return True
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return bool(module.disable_adapters)  # disable_adapter() switches every tuner layer together
    return False
