"""Adapters: train a few parameters of an MoE policy instead of all of them (the ``peft`` config section).

* :mod:`rlvr.tuning.config`  -- the ``peft`` section (:class:`AdapterConfig`)
* :mod:`rlvr.tuning.targets` -- which linear layers, routed-expert matrices and routers an adapter trains
* :mod:`rlvr.tuning.lora`    -- LoRA through PEFT, the fused routed experts included (``target_parameters``)
* :mod:`rlvr.tuning.svf`     -- singular-value fine-tuning (Transformer²), rlvr's own
* :mod:`rlvr.tuning.loading` -- the PEFT or SVF config of a run, a trained adapter loaded onto its base policy
* :mod:`rlvr.tuning.plain`   -- the adapted policy as plain weights under the base model's names (inference engines)

May import :mod:`rlvr.moe`, :mod:`rlvr.models` and :mod:`rlvr.utils` (PEFT, not TRL).
"""

from rlvr.tuning.config import AdapterConfig
from rlvr.tuning.loading import adapter_config, load_adapted
from rlvr.tuning.svf import SVFConfig, apply_svf, load_svf, merged, save_svf, svf_state

__all__ = [
    "AdapterConfig",
    "SVFConfig",
    "adapter_config",
    "apply_svf",
    "load_adapted",
    "load_svf",
    "merged",
    "save_svf",
    "svf_state",
]
