"""The adapter a run trains (a PEFT ``LoraConfig`` or an :class:`SVFConfig`), and a trained one loaded back."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from rlvr.models.loading import load_pretrained
from rlvr.tuning.config import AdapterConfig
from rlvr.tuning.lora import lora_config
from rlvr.tuning.svf import CONFIG_FILE as SVF_CONFIG_FILE
from rlvr.tuning.svf import SVFConfig, is_svf_directory, load_svf

PEFT_CONFIG_FILE = "adapter_config.json"


def adapter_config(settings: AdapterConfig, model: nn.Module):
    """What to pass as ``peft_config=`` to the trainer for the ``peft`` section: a ``peft.LoraConfig``, an
    :class:`SVFConfig`, or None (``method: none``)."""
    if settings.method == "lora":
        return lora_config(settings, model)
    if settings.method == "svf":
        return SVFConfig(list(settings.target_modules), settings.experts, settings.routers, settings.svf_cache_dir)
    return None


def is_adapter_directory(directory: str | Path) -> bool:
    """Whether ``directory`` holds a trained adapter (PEFT's or SVF vectors) rather than a full policy."""
    return is_svf_directory(directory) or (Path(directory) / PEFT_CONFIG_FILE).is_file()


def load_adapted(directory: str | Path, dtype: str = "float32", base: str | None = None):
    """``(policy, tokenizer)``: the base policy an adapter in ``directory`` was trained on (``base``, or the
    path the adapter recorded), with the adapter applied: PEFT's ``PeftModel.from_pretrained`` for LoRA,
    :func:`rlvr.tuning.svf.load_svf` for SVF vectors."""
    directory = Path(directory)
    if not is_adapter_directory(directory):
        raise ValueError(f"{directory} holds no adapter ({PEFT_CONFIG_FILE} or {SVF_CONFIG_FILE})")
    svf = is_svf_directory(directory)
    record = json.loads((directory / (SVF_CONFIG_FILE if svf else PEFT_CONFIG_FILE)).read_text())
    model, tokenizer = load_pretrained(base or record["base_model_name_or_path"], dtype)
    if svf:
        return load_svf(model, directory), tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory)), tokenizer
