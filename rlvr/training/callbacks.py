"""The Trainer callbacks ``ForkingGRPOTrainer`` adds: correction-bias updates, and rlvr's state kept in each
checkpoint (the rollout totals, the prompt history and the pass-rate probe of ``prompts.filter=skip``)."""

from __future__ import annotations

import abc
import json
import os

import torch
from transformers import TrainerCallback

from rlvr.moe.updates import RouterAwareUpdates
from rlvr.prompts.history import PromptHistory
from rlvr.prompts.probe import PassRateProbe
from rlvr.rollouts import Rollouts


class CorrectionBiasUpdate(TrainerCallback):
    """Run :meth:`RouterAwareUpdates.update_correction_bias` after each optimizer step."""

    def __init__(self, updates: RouterAwareUpdates):
        self.updates = updates

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.updates.update_correction_bias()


class CheckpointedState(TrainerCallback, abc.ABC):
    """State of rlvr's that a resumed run must continue from: ``ForkingGRPOTrainer._save_checkpoint`` writes
    :meth:`state` into each checkpoint as ``FILE`` (JSON; :meth:`write` / :meth:`read` say otherwise); when a
    run resumes from that checkpoint, :meth:`load` reads it back before the first step. The same on every
    rank, so every rank reads the same file."""

    FILE = ""

    @abc.abstractmethod
    def state(self) -> dict: ...

    @abc.abstractmethod
    def load(self, state: dict) -> None: ...

    def write(self, path: str, state: dict) -> None:
        with open(path, "w") as handle:
            json.dump(state, handle)

    def read(self, path: str) -> dict:
        with open(path) as handle:
            return json.load(handle)

    def save(self, directory: str) -> None:
        self.write(os.path.join(directory, self.FILE), self.state())

    def on_train_begin(self, args, state, control, **kwargs):
        saved = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.FILE)
        if state.global_step > 0 and os.path.isfile(saved):  # resumed from that checkpoint
            self.load(self.read(saved))


class RolloutTotals(CheckpointedState):
    """The rollout totals (decoded tokens, generation seconds) across a resume."""

    FILE = "rlvr_rollouts.json"

    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    def state(self) -> dict:
        return {
            "decoded_tokens_total": self.rollouts.decoded_tokens_total,
            "generation_seconds_total": self.rollouts.generation_seconds_total,
        }

    def load(self, state: dict) -> None:
        self.rollouts.decoded_tokens_total = int(state["decoded_tokens_total"])
        self.rollouts.generation_seconds_total = float(state["generation_seconds_total"])


class PromptHistoryState(CheckpointedState):
    """Each prompt's run of zero-variance groups and the exploration probabilities (``prompts.filter=skip``),
    so that a resumed run skips what the uninterrupted one would."""

    FILE = "rlvr_prompt_history.json"

    def __init__(self, history: PromptHistory):
        self.history = history

    def state(self) -> dict:
        return self.history.state_dict()

    def load(self, state: dict) -> None:
        self.history.load_state_dict(state)


class PromptProbeState(CheckpointedState):
    """The pass-rate probe of ``prompts.predictor=probe|both``: its fitted weights and the observed groups it
    is refitted on (saved with torch, as their features are the policy's hidden size wide)."""

    FILE = "rlvr_prompt_probe.pt"

    def __init__(self, probe: PassRateProbe):
        self.probe = probe

    def state(self) -> dict:
        return self.probe.state_dict()

    def load(self, state: dict) -> None:
        self.probe.load_state_dict(state)

    def write(self, path: str, state: dict) -> None:
        torch.save(state, path)

    def read(self, path: str) -> dict:
        return torch.load(path, weights_only=True)


def save_checkpointed_state(trainer) -> None:
    """rlvr's state kept in checkpoints (every :class:`CheckpointedState` callback: the rollout totals, the prompt
    history and probe) into the checkpoint the trainer just wrote, from the process that saves."""
    directory = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    if trainer.args.should_save and os.path.isdir(directory):
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, CheckpointedState):
                callback.save(directory)
