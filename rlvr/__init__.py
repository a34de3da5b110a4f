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
import importlib.abc
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ForkingGRPOTrainer": "rlvr.trainer",
    "ForkingConfig": "rlvr.forking",
    "MoEConfig": "rlvr.moe",
    "RolloutConfig": "rlvr.rollouts",
    "PromptsConfig": "rlvr.prompts",
    "TokenRulesConfig": "rlvr.forking.token_rules",
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
    "upcycle_moe": "rlvr.models.upcycle",  # the function upcycle of that module
}
_RENAMED = {"upcycle_moe": "upcycle"}

# modules that moved into packages -> where they are now (rlvr.config, rlvr.trainer, rlvr.report and
# rlvr.forking keep their names; importing one of these says where it went)
MOVED = {
    "rlvr.commands": "rlvr.cli.commands",
    "rlvr.launch": "rlvr.cli.launch",
    "rlvr.shutdown": "rlvr.cli.shutdown",
    "rlvr.compare": "rlvr.experiment.compare",
    "rlvr.upcycle_policies": "rlvr.experiment.starting_policies",
    "rlvr.bootstrap": "rlvr.report.intervals",
    "rlvr.runs": "rlvr.report.runs",
    "rlvr.report_sections": "rlvr.report.sections",
    "rlvr.report_prompts": "rlvr.report.prompts",
    "rlvr.report_adapters": "rlvr.report.adapters",
    "rlvr.report_cells": "rlvr.report.cells",
    "rlvr.report_figures": "rlvr.report.figures",
    "rlvr.recipe": "rlvr.run.recipe",
    "rlvr.run_dir": "rlvr.run.directory",
    "rlvr.callbacks": "rlvr.run.callbacks",
    "rlvr.checkpoints": "rlvr.run.checkpoints",
    "rlvr.progress": "rlvr.run.progress",
    "rlvr.warmstart": "rlvr.run.warm_start",
    "rlvr.evaluation": "rlvr.run.evaluation",
    "rlvr.trl_loading": "rlvr.training.trl_loading",
    "rlvr.vllm_routing": "rlvr.training.vllm_routing",
    "rlvr.forking_log": "rlvr.forking.log",
    "rlvr.sparse_head": "rlvr.training.sparse_head",
    "rlvr.token_rules": "rlvr.forking.token_rules",
    "rlvr.upcycle": "rlvr.models.upcycle",
    "rlvr.configuration": "rlvr.utils.options",
    "rlvr.collectives": "rlvr.utils.collectives",
    "rlvr.device_metrics": "rlvr.utils.device_metrics",
    "rlvr.packaged": "rlvr.utils.packaged",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    """Importing a module by its name before it moved into a package fails with one line naming its place."""

    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED:
            raise ModuleNotFoundError(f"{fullname} moved: import {MOVED[fullname]}", name=fullname)
        return None


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())  # before any finder: these names are never modules now

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
    from rlvr.forking import ForkingConfig, select_forking_tokens
    from rlvr.forking.token_rules import TokenRulesConfig
    from rlvr.models import TinyMoESpec, build_char_tokenizer, build_tiny_moe, save_tiny_policy
    from rlvr.models.upcycle import upcycle as upcycle_moe
    from rlvr.moe import MoEConfig
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
    from rlvr.trainer import ForkingGRPOTrainer
    from rlvr.tuning import SVFConfig, load_adapted


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlvr' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
