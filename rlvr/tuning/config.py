"""The ``peft`` config section: train adapters instead of the whole policy.

* ``lora``: LoRA (Hu et al., 2021) through PEFT: ``nn.Linear`` layers with ``target_modules``, and the routed
  experts' fused 3D parameters with PEFT's ``target_parameters`` (a rank-``r`` pair per expert), routers as
  full parameters (PEFT's ``modules_to_save``) or frozen.
* ``svf``: singular-value fine-tuning (Transformer², Sun et al., 2025, arXiv 2501.06252): one vector per
  matrix scales its singular values (:mod:`rlvr.tuning.svf`); rlvr's own, PEFT has no SVF.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from rlvr.utils.options import ConfigError, option, require

METHODS = ("none", "lora", "svf")
ROUTER_CHOICES = ("train", "freeze")


def require_peft(key: str = "method") -> None:
    """A one-line error when the optional PEFT dependency is missing."""
    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{key}: lora needs the PEFT library; install it with pip install -e '.[peft]'")


@dataclass
class AdapterConfig:
    """The ``peft`` section."""

    method: str = option(
        "none",
        "none: train every weight; lora: LoRA adapters (PEFT); svf: a vector per matrix scaling its singular "
        "values (Transformer²)",
        METHODS,
    )
    rank: int = option(8, "lora: rank r of each adapter (per expert for the routed experts)")
    alpha: float = option(16.0, "lora: scaling alpha (the update is alpha / r x B A)")
    dropout: float = option(0.0, "lora: dropout on the adapters' input (linear layers only; 0 with experts)")
    target_modules: list = option(
        ["self_attn"],
        "linear layers adapted: names of layers (q_proj) or of modules whose linear layers are all taken "
        "(self_attn: every attention projection)",
    )
    experts: bool = option(True, "adapt the routed experts (fused 3D parameters, every expert its own adapter)")
    routers: str = option("train", "routers: train as full parameters (they are tiny) or freeze", ROUTER_CHOICES)
    svf_cache_dir: str = option(
        "", "svf: where the singular value decompositions are cached ('' = beside the policy when writable)"
    )

    def validate(self) -> None:
        require(self.rank >= 1, "rank", f"must be >= 1; got {self.rank}")
        require(self.alpha > 0, "alpha", f"must be > 0; got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1); got {self.dropout}")
        require(
            isinstance(self.target_modules, list) and all(isinstance(t, str) and t for t in self.target_modules),
            "target_modules",
            f"must be a list of module names; got {self.target_modules!r}",
        )
        require(
            bool(self.target_modules) or self.experts or self.method == "none",
            "target_modules",
            "is empty and peft.experts is false: the adapter would train nothing",
        )
        if self.method == "lora":
            require(
                self.dropout == 0.0 or not self.experts,
                "dropout",
                "must be 0 with peft.experts=true: PEFT's LoRA on fused expert parameters has no dropout",
            )
            require_peft("method")

    @property
    def enabled(self) -> bool:
        return self.method != "none"
