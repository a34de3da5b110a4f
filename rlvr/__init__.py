"""rlvr: entropy-focused RL fine-tuning (forking-token GRPO) for Mixture-of-Experts language models.

The public API, a drop-in for TRL's ``GRPOTrainer`` in your own script::

    from trl import GRPOConfig
    from rlvr import ForkingConfig, ForkingGRPOTrainer, MoEConfig, RolloutConfig, math_accuracy

    trainer = ForkingGRPOTrainer(
        model="Qwen/Qwen3-30B-A3B", reward_funcs=math_accuracy, args=GRPOConfig(...), train_dataset=dataset,
        forking=ForkingConfig(rho=0.2), moe=MoEConfig(router_gate_scope="forking"),
        rollout=RolloutConfig(mode="forking_tree"),  # optional: sample G completions as forking trees
    )
    trainer.train()

Names are imported on first use, so ``import rlvr`` (and the ``rlvr`` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ForkingGRPOTrainer": "rlvr.trainer",
    "ForkingConfig": "rlvr.config",
    "MoEConfig": "rlvr.config",
    "RolloutConfig": "rlvr.rollouts",
    "PromptsConfig": "rlvr.prompts",
    "TokenRulesConfig": "rlvr.token_rules",
    "SVFConfig": "rlvr.tuning",
    "load_adapted": "rlvr.tuning",
    "select_forking_tokens": "rlvr.forking",
    "MathAccuracy": "rlvr.rewards",
    "math_accuracy": "rlvr.rewards",
    "arithmetic_exact": "rlvr.rewards",
    "boxed_format": "rlvr.rewards",
    "think_answer_format": "rlvr.rewards",
    "OverlongPenalty": "rlvr.rewards",
    "TinyMoESpec": "rlvr.models",
    "build_tiny_moe": "rlvr.models",
    "save_tiny_policy": "rlvr.models",
    "build_char_tokenizer": "rlvr.models",
    "upcycle_moe": "rlvr.upcycle",  # rlvr.upcycle.upcycle; the submodule itself is rlvr.upcycle
}
_RENAMED = {"upcycle_moe": "upcycle"}

__all__ = [  # the names of _EXPORTS, spelled out for linters and IDEs
    "ForkingConfig",
    "ForkingGRPOTrainer",
    "MathAccuracy",
    "MoEConfig",
    "OverlongPenalty",
    "PromptsConfig",
    "RolloutConfig",
    "SVFConfig",
    "TinyMoESpec",
    "TokenRulesConfig",
    "__version__",
    "arithmetic_exact",
    "boxed_format",
    "build_char_tokenizer",
    "build_tiny_moe",
    "load_adapted",
    "math_accuracy",
    "save_tiny_policy",
    "select_forking_tokens",
    "think_answer_format",
    "upcycle_moe",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from rlvr.config import ForkingConfig, MoEConfig
    from rlvr.forking import select_forking_tokens
    from rlvr.models import TinyMoESpec, build_char_tokenizer, build_tiny_moe, save_tiny_policy
    from rlvr.prompts import PromptsConfig
    from rlvr.rewards import (
        MathAccuracy,
        OverlongPenalty,
        arithmetic_exact,
        boxed_format,
        math_accuracy,
        think_answer_format,
    )
    from rlvr.rollouts import RolloutConfig
    from rlvr.token_rules import TokenRulesConfig
    from rlvr.trainer import ForkingGRPOTrainer
    from rlvr.tuning import SVFConfig, load_adapted
    from rlvr.upcycle import upcycle as upcycle_moe


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlvr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
