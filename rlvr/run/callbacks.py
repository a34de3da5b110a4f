"""Trainer callbacks of the recipe: the metrics file and evaluation during training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback


class MetricsFile(TrainerCallback):
    """Append every log record (train and eval) to ``metrics.jsonl`` as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class PeriodicEval(TrainerCallback):
    """Evaluate every ``every`` steps during training (the final step is evaluated after training)."""

    def __init__(self, every: int, run_eval: Callable[[object, int], None]):
        self.every, self.run_eval = every, run_eval

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps and state.is_world_process_zero:
            self.run_eval(model, state.global_step)
        return control
