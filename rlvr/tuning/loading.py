"""The adapter a run trains (a PEFT ``LoraConfig`` or an :class:`SVFConfig`), and a trained one loaded back."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from rlvr.models.loading import load_pretrained
from rlvr.tuning.config import AdapterConfig
from rlvr.tuning.lora import lora_config
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
    if is_svf_directory(directory):
        recorded = json.loads((directory / "svf_config.json").read_text())["base_model_name_or_path"]
        model, tokenizer = load_pretrained(base or recorded, dtype)
        return load_svf(model, directory), tokenizer
    if (directory / PEFT_CONFIG_FILE).is_file():
        from peft import PeftModel

        recorded = json.loads((directory / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"]
        model, tokenizer = load_pretrained(base or recorded, dtype)
        return PeftModel.from_pretrained(model, str(directory)), tokenizer
    raise ValueError(f"{directory} holds no adapter ({PEFT_CONFIG_FILE} or svf_config.json)")


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts of a policy as trained: ``trainable``, ``total`` (adapters and factors included)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
