"""The training recipe: config in, trained policy and a summary out. Read :func:`train` top to bottom.

1. data      -- prompts/answers for training, a held-out eval set
2. rewards   -- verifiable checkers, weighted; the first is the accuracy of evaluation
3. policy    -- tiny MoE (saved, then loaded like a hub model) or a hub/local checkpoint, warm-started
               when tiny (cached)
4. eval before RL, then ForkingGRPOTrainer.train(), then eval after RL
5. outputs   -- the run directory (:mod:`rlvr.run.directory`): metrics.jsonl, summary.json, model/
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset
from transformers import set_seed
from trl import GRPOConfig

from rlvr.data import generate_problems, make_prompt, problems_to_dataset
from rlvr.data.splits import TrainEvalRows, load_train_eval
from rlvr.models import (
    gathered_whole,
    is_tiny,
    load_pretrained,
    remove_stale_staging,
    save_tiny_policy,
    staging_name,
    tiny_architecture,
)
from rlvr.moe import UnknownMoEArchitecture
from rlvr.moe.domains import routing_by_domain
from rlvr.run.callbacks import MetricsFile, PeriodicEval
from rlvr.run.checkpoints import MarkCompleteCheckpoints
from rlvr.run.config import RunConfig
from rlvr.run.directory import RunDirectory, RunResult, is_main_process, summary_table
from rlvr.run.evaluation import EvalResult, evaluate_accuracy, render_prompts
from rlvr.run.progress import use_compact_progress
from rlvr.run.warm_start import publish_directory, run_warm_start
from rlvr.trainer import ForkingGRPOTrainer
from rlvr.tuning import adapter_config
from rlvr.utils.options import ConfigError

__all__ = ["RunResult", "is_main_process", "summary_table", "train"]


def train(config: RunConfig) -> RunResult:
    """Run one training job described by ``config`` (already validated)."""
    config.check_launch()  # e.g. expert parallelism over more processes than launched
    run = RunDirectory.open(config)  # resume or start over; config.yaml
    run_start = time.time()
    set_seed(config.seed)

    data = prepare_data(config)
    reward_functions, reward_weights, accuracy_fn = resolve_rewards(config)
    # Built before the model is loaded: under DeepSpeed ZeRO-3 this makes from_pretrained partition the
    # weights as they load (zero3_init_flag) instead of materialising the full model on every rank.
    grpo_kwargs = config.grpo_kwargs()
    if reward_weights is not None:
        grpo_kwargs["reward_weights"] = reward_weights
    grpo_args = GRPOConfig(**grpo_kwargs)
    model, tokenizer, warm_result = prepare_policy(config, data, accuracy_fn)

    def evaluate(policy, label: str) -> EvalResult | None:
        return evaluate_policy(config, policy, tokenizer, data, accuracy_fn, label)

    before = run.eval_before(lambda: evaluate(model, "eval before RL"))
    routing_before = run.domain_routing_before(lambda: domain_routing(config, model, tokenizer, data))

    set_seed(config.seed)
    callbacks = [MetricsFile(run.metrics_path), MarkCompleteCheckpoints()]
    if config.eval.enabled and config.eval.every and data.eval_prompts:
        callbacks.append(
            PeriodicEval(
                config.eval.every,
                lambda policy, step: run.write_eval_record(step, evaluate(policy, f"eval at step {step}")),
            )
        )
    trainer = ForkingGRPOTrainer(
        model=model,
        reward_funcs=reward_functions,
        args=grpo_args,
        train_dataset=data.train,
        processing_class=tokenizer,
        forking=config.forking,
        moe=config.moe,
        rollout=config.rollout,
        prompts=config.prompts,
        token_rules=config.token_rules,
        peft_config=adapter_config(config.peft, model),
        callbacks=callbacks,
    )
    use_compact_progress(trainer)
    start = time.time()
    trainer.train(resume_from_checkpoint=run.resume_from)
    train_seconds = time.time() - start

    after = evaluate(trainer.model, "eval after RL")
    run.write_eval_record(trainer.state.global_step, after)
    run.write_domain_routing(routing_before, domain_routing(config, trainer.model, tokenizer, data))
    if config.save_model:
        trainer.save_model(str(run.path / "model"))
        tokenizer.save_pretrained(run.path / "model")
    result = RunResult(
        run.path,
        before,
        after,
        warm_result,
        train_seconds,
        trainer.state.global_step,
        gradient_tokens=trainer.gradient_tokens_all_ranks(),
        wall_seconds=time.time() - run_start,
        world_size=trainer.accelerator.num_processes,
        decoded_tokens=trainer.rollouts.decoded_tokens_total,
        generation_seconds=trainer.rollouts.generation_seconds_total,
        trainable_parameters=trainable_parameter_count(trainer.model),
        optimizer_state_bytes=optimizer_state_bytes(trainer.optimizer),
        data_rows=data.rows,
    )
    run.write_summary(config, result)
    return result


def trainable_parameter_count(model) -> int:
    """Parameters the optimizer updates, counted at full size under ZeRO-3 (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` on this process (Adam: two moments per trainable parameter)."""
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", {})  # accelerate wraps the optimizer
    return sum(
        value.numel() * value.element_size()
        for per_parameter in state.values()
        for value in per_parameter.values()
        if hasattr(value, "numel")
    )


@dataclass
class PreparedData:
    train: Dataset  # columns: prompt, answer
    eval_prompts: list
    eval_answers: list[str]
    eval_expressions: set[str]  # embedded task only: keeps warm-start dev problems out of the eval set
    eval_groups: list[str] | None = None  # embedded task with several domains: the domain of each eval problem
    eval_solutions: list[str] | None = None  # embedded task: worked solutions (teacher-forced routing analysis)
    rows: dict | None = None  # TrainEvalRows.record(): row counts and where the evaluation rows came from


def prepare_data(config: RunConfig) -> PreparedData:
    data = config.data
    if data.source == "arithmetic":
        try:
            train_problems = generate_problems(data.task, "train", data.num_train, config.data_seed())
            eval_problems = generate_problems(data.task, "eval", data.num_eval, config.data_seed())
        except ValueError as error:  # the task's problem space is smaller than asked for
            raise ConfigError(f"data.num_train / data.num_eval: {error}") from None
        train = problems_to_dataset(train_problems, data.system_prompt, chat=data.chat)
        eval_prompts = [make_prompt(p.question, data.system_prompt, data.chat) for p in eval_problems]
        origin = f"embedded task problems held out from training (data.task.eval_fraction={data.task.eval_fraction})"
        return PreparedData(
            train=train,
            eval_prompts=eval_prompts,
            eval_answers=[p.answer for p in eval_problems],
            eval_expressions={p.expression for p in eval_problems},
            eval_groups=[p.domain for p in eval_problems] if len(data.task.domains) > 1 else None,
            eval_solutions=[p.solution for p in eval_problems],
            rows=TrainEvalRows(train, Dataset.from_dict({"prompt": eval_prompts}), origin).record(),
        )

    rows = load_train_eval(data, config.data_seed())  # DataError names the setting to change
    return PreparedData(
        train=rows.train,
        eval_prompts=list(rows.eval["prompt"]) if rows.eval is not None else [],
        eval_answers=list(rows.eval["answer"]) if rows.eval is not None else [],
        eval_expressions=set(),
        rows=rows.record(),
    )


def resolve_rewards(config: RunConfig) -> tuple[list[Callable], list[float] | None, Callable]:
    """The reward functions for TRL, their weights, and the accuracy function (the first: the verifier)."""
    return config.reward.build(config.max_completion_length())


def prepare_policy(config: RunConfig, data: PreparedData, accuracy_fn: Callable):
    """Load the policy; tiny policies are built, saved, warm-started (cached) and loaded back."""
    warm_result = None
    name = config.model.name_or_path
    if is_tiny(name):
        cache = Path(os.path.expanduser(config.warm_start.cache_dir))
        spec_key = json.dumps([name, vars(config.model.tiny), config.warm_start_seed()], sort_keys=True)
        base = cache / f"base-{hashlib.sha256(spec_key.encode()).hexdigest()[:16]}"
        remove_stale_staging(cache)  # what a crashed launch left
        if not base.exists():  # built beside its final name: never a config without weights under it
            staging = staging_name(base)
            save_tiny_policy(tiny_architecture(name), config.model.tiny, staging, seed=config.warm_start_seed())
            publish_directory(staging, base)
        name = str(base)
        wants_warm_start = config.warm_start.enabled in ("auto", "true")
    else:
        wants_warm_start = config.warm_start.enabled == "true"
    if wants_warm_start:
        _, tokenizer = load_pretrained(name, config.model.dtype, config.model.trust_remote_code)
        warm_result = run_warm_start(config.warm_start_job(), Path(name), tokenizer, accuracy_fn, data.eval_expressions)
        name = str(warm_result.path)
    model, tokenizer = load_pretrained(name, config.model.dtype, config.model.trust_remote_code, config.parallel)
    return model, tokenizer, warm_result


def evaluate_policy(
    config: RunConfig, model, tokenizer, data: PreparedData, accuracy_fn: Callable, label: str
) -> EvalResult | None:
    """Held-out greedy and sampled accuracy of ``model`` (None when evaluation is off or there is no eval set)."""
    if not config.eval.enabled or not data.eval_prompts:
        return None
    max_new_tokens = config.eval.max_new_tokens or config.max_completion_length()
    return evaluate_accuracy(
        model,
        tokenizer,
        data.eval_prompts,
        data.eval_answers,
        accuracy_fn,
        max_new_tokens,
        batch_size=config.eval.batch_size,
        num_samples=config.eval.sampled_completions,
        temperature=config.eval.temperature,
        seed=config.seed,
        progress=label,
        k=config.eval.pass_k,
        groups=data.eval_groups,
    )


def domain_routing(config: RunConfig, model, tokenizer, data: PreparedData) -> dict | None:
    """Per-domain expert loads on the eval problems' worked solutions (MoE policy, several domains)."""
    if not data.eval_groups or not data.eval_solutions or not config.eval.enabled:
        return None
    try:
        with gathered_whole(model):
            return routing_by_domain(
                model,
                tokenizer,
                render_prompts(tokenizer, data.eval_prompts),
                data.eval_solutions,
                data.eval_groups,
                batch_size=config.eval.batch_size,
                rho=config.forking.rho,
            )
    except UnknownMoEArchitecture:  # a dense policy routes nothing
        return None
