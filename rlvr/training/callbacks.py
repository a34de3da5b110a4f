"""The Trainer callbacks ``ForkingGRPOTrainer`` adds: correction-bias updates, and rlvr's state kept in each
checkpoint (the rollout totals; under ``prompts.filter`` the generation counter, the per-prompt record, the
prompt history and the pass-rate probe)."""

from __future__ import annotations

import abc
import json
import logging
import os

import torch
from transformers import TrainerCallback

from rlvr.moe.updates import RouterAwareUpdates
from rlvr.prompts.history import PromptHistory
from rlvr.prompts.probe import PassRateProbe
from rlvr.rollouts import Rollouts
from rlvr.training.prompt_filter import PromptFilter

logger = logging.getLogger(__name__)


class CorrectionBiasUpdate(TrainerCallback):
    """Run :meth:`RouterAwareUpdates.update_correction_bias` after each optimizer step."""

    def __init__(self, updates: RouterAwareUpdates):
        self.updates = updates

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.updates.update_correction_bias()


class CheckpointedState(TrainerCallback, abc.ABC):
    """State of rlvr's that a resumed run must continue from: ``ForkingGRPOTrainer._save_checkpoint`` writes
    :meth:`state` into each checkpoint as ``FILE`` (JSON; :meth:`write` / :meth:`read` say otherwise); when a
    run resumes from a checkpoint (wherever it is: :func:`load_checkpointed_state`), :meth:`load` reads it back
    before the first step. The same on every rank, so every rank reads the same file."""

    FILE = ""
    WHAT = ""  # what the state is, in words

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

    def load_from(self, checkpoint: str) -> None:
        """Read :meth:`state` back from ``checkpoint``; a checkpoint without the file (written by a run without
        this state: other settings, or TRL's own trainer) starts it afresh, and says so."""
        saved = os.path.join(checkpoint, self.FILE)
        if not os.path.isfile(saved):
            logger.warning("resuming from %s: it has no %s, so %s starts afresh", checkpoint, self.FILE, self.WHAT)
            return
        self.load(self.read(saved))


class RolloutTotals(CheckpointedState):
    """The rollout totals (decoded tokens, generation seconds) across a resume."""

    FILE = "rlvr_rollouts.json"
    WHAT = "the rollout totals (decoded tokens, generation seconds)"

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
    WHAT = "the prompt history (zero-variance streaks, GRESO's exploration)"

    def __init__(self, history: PromptHistory):
        self.history = history

    def state(self) -> dict:
        return self.history.state_dict()

    def load(self, state: dict) -> None:
        self.history.load_state_dict(state)


class PromptFilterState(CheckpointedState):
    """The prompt filter's generation counter (its draws are keyed by it) and per-prompt record; also GRESO's
    once-per-step adaptation (at each optimizer step's end) and the record written as ``prompts.jsonl`` into
    the output directory at each logging step (and into each checkpoint)."""

    FILE = "rlvr_prompt_filter.json"
    WHAT = "the prompt filter's draws and per-prompt record"

    def __init__(self, chooser: PromptFilter):
        self.chooser = chooser

    def state(self) -> dict:
        return {"generations": self.chooser.generations, "record": self.chooser.record.state_dict()}

    def load(self, state: dict) -> None:
        self.chooser.generations = int(state["generations"])
        self.chooser.record.load_state_dict(state["record"])

    def save(self, directory: str) -> None:
        super().save(directory)
        self.write_record(directory)

    def write_record(self, directory: str) -> None:
        history = self.chooser.history
        self.chooser.record.write(directory, history.streaks if history is not None else None)

    def on_step_end(self, args, state, control, **kwargs):
        self.chooser.end_step()

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.write_record(args.output_dir)


class PromptProbeState(CheckpointedState):
    """The pass-rate probe of ``prompts.predictor=probe|both``: its fitted weights and the observed groups it
    is refitted on (saved with torch, as their features are the policy's hidden size wide)."""

    FILE = "rlvr_prompt_probe.pt"
    WHAT = "the pass-rate probe"

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


def load_checkpointed_state(trainer, checkpoint: str | None) -> None:
    """rlvr's state kept in ``checkpoint`` (the one ``trainer.train(resume_from_checkpoint=...)`` resumes from,
    in the output directory or not) back into every :class:`CheckpointedState` callback; nothing when not
    resuming."""
    if checkpoint is None:
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, CheckpointedState):
            callback.load_from(checkpoint)


def save_checkpointed_state(trainer) -> None:
    """rlvr's state kept in checkpoints (every :class:`CheckpointedState` callback: the rollout totals, the prompt
    history and probe) into the checkpoint the trainer just wrote, from the process that saves."""
    directory = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
    if trainer.args.should_save and os.path.isdir(directory):
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, CheckpointedState):
                callback.save(directory)
