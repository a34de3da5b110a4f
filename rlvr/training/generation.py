"""The generation side as the trainer hands it over: the policy as TRL samples with it, and what a produced
batch adds to TRL's logs."""

from __future__ import annotations

import contextlib

import torch
from trl.models import unwrap_model_for_generation

from rlvr.rollouts import Rollouts


@contextlib.contextmanager
def generation_model(trainer):
    """The policy as TRL's ``_generate_single_turn`` samples with it (unwrapped, ZeRO-3 weights gathered)."""
    with (
        unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ) as unwrapped_model,
        torch.no_grad(),
        trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
    ):
        yield unwrapped_model


def log_batch(rollouts: Rollouts, metrics: dict[str, float], trl_metrics: dict, trl_logs: dict) -> None:
    """A produced batch's ``rollout/*`` and ``mismatch/*`` ``metrics`` into TRL's metrics of the mode
    (``trl_metrics``: key -> list), and, with TreeRL advantages, the advantages the loss used into TRL's
    completions table (``trl_logs["advantages"]``, where TRL put its group advantages)."""
    if rollouts.logged_advantages is not None:
        logged = trl_logs["advantages"]  # a deque: TRL appended this batch's rows last
        used = rollouts.logged_advantages[-len(logged) :] if len(logged) else []
        for index, value in enumerate(used, start=len(logged) - len(used)):
            logged[index] = value
    for key, value in metrics.items():
        if key == "rollout/decoded_tokens_total":  # a running total: logged as its latest value
            trl_metrics[key] = [value]
        else:
            trl_metrics[key].append(value)
