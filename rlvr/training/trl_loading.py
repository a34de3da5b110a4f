"""Models TRL loads itself: ``GRPOTrainer.__init__`` given a model id builds the policy (and, with
``beta > 0``, the reference model) and hands them to DeepSpeed before it returns."""

from __future__ import annotations

import contextlib

from trl.trainer import grpo_trainer

from rlvr.moe.zero3 import register_zero3_leaves


@contextlib.contextmanager
def zero3_leaves_as_trl_loads():
    """Register ZeRO-3 leaf modules on every model TRL loads from an id inside ``GRPOTrainer.__init__``.

    Given a model id, TRL builds the policy with ``create_model_from_path`` and, with ``beta > 0``, the
    reference model too, which it hands to DeepSpeed before ``__init__`` returns. Leaf registration
    must happen in between, so TRL's loader is wrapped for the duration of ``__init__``.
    """
    original = grpo_trainer.create_model_from_path

    def create_and_register(*args, **kwargs):
        model = original(*args, **kwargs)
        register_zero3_leaves(model)
        return model

    grpo_trainer.create_model_from_path = create_and_register
    try:
        yield
    finally:
        grpo_trainer.create_model_from_path = original
