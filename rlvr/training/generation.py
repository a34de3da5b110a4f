"""The generation side as the trainer hands it over: a training or eval batch produced through
:class:`rlvr.rollouts.Rollouts` (and refilled by :class:`rlvr.training.prompt_filter.PromptFilter` when
``prompts.filter`` asks), what it adds to TRL's logs, and the policy as TRL samples with it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from trl.models import unwrap_model_for_generation

from rlvr.models.parallel import gathered_for_generation
from rlvr.rollouts import Rollouts
from rlvr.training.prompt_filter import PromptFilter


def produce_batch(
    trainer, rollouts: Rollouts, sampling: PromptFilter | None, trl_produce: Callable[[list[dict]], dict], inputs
) -> dict:
    """TRL's ``_generate_and_score_completions`` (``trl_produce``) on ``inputs`` through ``rollouts``, its metrics
    into TRL's logs; training batches chosen and refilled by ``sampling`` (``prompts.filter``) when given."""
    training, rank = trainer.model.training, trainer.accelerator.process_index
    metrics_of_mode = trainer._metrics["train" if training else "eval"]
    group_size = trainer.num_generations if training else trainer.num_generations_eval

    calls: list[dict[str, float]] = []  # each generation call's rollout/* and mismatch/* metrics

    def produce(rows: list[dict]) -> tuple[dict, dict[str, float]]:
        batch, metrics = rollouts.produce_batch(functools.partial(trl_produce, rows), group_size, rank, training)
        calls.append(metrics)
        return batch, metrics

    if sampling is None or not training:
        batch = produce(inputs)[0]
    else:
        batch, prompt_metrics = sampling.produce(
            produce, lambda: (rollouts.batch_rewards, rollouts.compared_rewards), inputs, trainer.state.global_step
        )
        for key, value in prompt_metrics.items():
            metrics_of_mode[key].append(value)
    log_batch(rollouts, merge_calls(calls), metrics_of_mode, trainer._logs)
    return batch


def sample(
    trainer,
    rollouts: Rollouts,
    trl_generate: Callable,
    prompt_ids,
    images,
    multimodal_fields,
    num_generations,
    *args,
    **kwargs,
):
    """TRL's ``_generate_single_turn`` (``trl_generate``) through ``rollouts``: i.i.d. as TRL samples, or forking
    trees. Under expert parallelism the dense weights FSDP2 shards are gathered once for the whole call
    (:func:`rlvr.models.parallel.gathered_for_generation`), not in every decoding forward."""
    with gathered_for_generation(trainer.model):
        if not rollouts.branches(trainer.model.training):
            return rollouts.generate(
                trl_generate, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        if images is not None or multimodal_fields:
            raise ValueError("rollout.mode=forking_tree supports text-only prompts")
        with generation_model(trainer) as model:
            return rollouts.generate_tree(model, prompt_ids, num_generations, trainer.generation_config)


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


SUMMED = ("rollout/decoded_tokens", "rollout/generation_seconds", "rollout/branches", "rollout/fallback_branches")
RUNNING_TOTALS = ("rollout/decoded_tokens_total", "rollout/generation_seconds_total")  # logged as the latest value


def merge_calls(calls: list[dict[str, float]]) -> dict[str, float]:
    """The metrics of one generation batch made by several generation calls: counts and seconds summed, the
    running total the last call's, every other value (shares, means, mismatch) the mean over the calls."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(key for metrics in calls for key in metrics):
        values = [metrics[key] for metrics in calls if key in metrics]
        if key in SUMMED:
            merged[key] = sum(values)
        elif key in RUNNING_TOTALS:
            merged[key] = values[-1]
        else:
            merged[key] = sum(values) / len(values)
    return merged


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
        if key in RUNNING_TOTALS:  # logged as its latest value
            trl_metrics[key] = [value]
        else:
            trl_metrics[key].append(value)
