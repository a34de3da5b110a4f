"""The Trainer callbacks ``ForkingGRPOTrainer`` adds: correction-bias updates and the rollout totals."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from rlvr.moe.updates import RouterAwareUpdates
from rlvr.rollouts import Rollouts


class CorrectionBiasUpdate(TrainerCallback):
    """Run :meth:`RouterAwareUpdates.update_correction_bias` after each optimizer step."""

    def __init__(self, updates: RouterAwareUpdates):
        self.updates = updates

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.updates.update_correction_bias()


class RolloutTotals(TrainerCallback):
    """Reads the rollout totals (decoded tokens, generation seconds) back when a run resumes from a
    checkpoint; ``ForkingGRPOTrainer._save_checkpoint`` writes them into it."""

    FILE = "rlvr_rollouts.json"

    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    def save(self, directory: str) -> None:
        totals = {
            "decoded_tokens_total": self.rollouts.decoded_tokens_total,
            "generation_seconds_total": self.rollouts.generation_seconds_total,
        }
        with open(os.path.join(directory, self.FILE), "w") as handle:
            json.dump(totals, handle)

    def on_train_begin(self, args, state, control, **kwargs):
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.FILE)
        if state.global_step > 0 and os.path.isfile(saved):  # resumed from that checkpoint
            with open(saved) as handle:
                totals = json.load(handle)
            self.rollouts.decoded_tokens_total = int(totals["decoded_tokens_total"])
            self.rollouts.generation_seconds_total = float(totals["generation_seconds_total"])
