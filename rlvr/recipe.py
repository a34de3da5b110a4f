"""The training recipe: config in, trained policy and a summary out. Read it top to bottom.

1. data      -- prompts/answers for training, a held-out eval set
2. policy    -- tiny MoE (saved, then loaded like a hub model) or a hub/local checkpoint
3. warm start (tiny policies) -- SFT until partly right, cached
4. rewards   -- verifiable checkers, weighted
5. eval before, ForkingGRPOTrainer.train(), eval after
6. outputs   -- metrics.jsonl, forking_tokens.jsonl, summary.json, model/
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import TrainerCallback, set_seed
from trl import GRPOConfig

from rlvr.checkpoints import MarkCompleteCheckpoints, latest_complete_checkpoint, truncate_jsonl
from rlvr.config import ConfigError, RunConfig, to_dict
from rlvr.data import generate_problems, make_prompt, problems_to_dataset, read_source, to_prompt_answer
from rlvr.evaluation import EvalResult, evaluate_accuracy
from rlvr.models import is_tiny, load_pretrained, save_tiny_policy, tiny_architecture
from rlvr.progress import use_compact_progress
from rlvr.rewards.registry import resolve_reward
from rlvr.trainer import ForkingGRPOTrainer
from rlvr.warmstart import WarmStartResult, run_warm_start

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: Dataset  # columns: prompt, answer
    eval_prompts: list
    eval_answers: list[str]
    eval_expressions: set[str]  # embedded task only: keeps warm-start dev problems out of the eval set
    eval_groups: list[str] | None = None  # embedded task with several domains: the domain of each eval problem
    eval_solutions: list[str] | None = None  # embedded task: worked solutions (teacher-forced routing analysis)


@dataclass
class RunResult:
    output_dir: Path
    before: EvalResult | None
    after: EvalResult | None
    warm_start: WarmStartResult | None
    train_seconds: float
    steps: int
    gradient_tokens: int = 0  # completion tokens whose policy-gradient loss weight was non-zero (all ranks)
    wall_seconds: float = 0.0
    world_size: int = 1


def prepare_data(config: RunConfig) -> PreparedData:
    data = config.data
    if data.source == "arithmetic":
        try:
            train_problems = generate_problems(data.task, "train", data.num_train, config.data_seed())
            eval_problems = generate_problems(data.task, "eval", data.num_eval, config.data_seed())
        except ValueError as error:  # the task's problem space is smaller than asked for
            raise ConfigError(f"data.num_train / data.num_eval: {error}") from None
        return PreparedData(
            train=problems_to_dataset(train_problems, data.system_prompt, chat=data.chat),
            eval_prompts=[make_prompt(p.question, data.system_prompt, data.chat) for p in eval_problems],
            eval_answers=[p.answer for p in eval_problems],
            eval_expressions={p.expression for p in eval_problems},
            eval_groups=[p.domain for p in eval_problems] if len(data.task.domains) > 1 else None,
            eval_solutions=[p.solution for p in eval_problems],
        )

    def load(split: str, limit: int) -> Dataset:
        raw = read_source(data.source, split, data.config_name)
        if limit:
            raw = raw.select(range(min(limit, len(raw))))
        return to_prompt_answer(
            raw,
            data.question_column,
            data.answer_column,
            data.answer_format,
            data.system_prompt,
            data.chat,
            source_name=f"{data.source} [{split}]",
        )

    train = load(data.train_split, data.num_train)
    eval_set = load(data.eval_split, data.num_eval) if data.eval_split and data.num_eval else None
    return PreparedData(
        train=train,
        eval_prompts=list(eval_set["prompt"]) if eval_set is not None else [],
        eval_answers=list(eval_set["answer"]) if eval_set is not None else [],
        eval_expressions=set(),
    )


def resolve_rewards(config: RunConfig) -> tuple[list[Callable], list[float] | None, Callable]:
    """The reward functions for TRL, their weights, and the accuracy function for evaluation.

    Accuracy uses the first function only (the verifier): shaping rewards must not count as correct.
    """
    functions = [_reward_function(str(name), config) for name in config.reward.functions]
    weights = [float(w) for w in config.reward.weights] if config.reward.weights else None
    return functions, weights, functions[0]


def _reward_function(name: str, config: RunConfig) -> Callable:
    """Rewards with settings get them from the ``reward`` section; others resolve by name."""
    reward = config.reward
    if name == "math_accuracy":
        return resolve_reward(
            name,
            budget_seconds=reward.budget_seconds,
            failure_score=reward.failure_score,
            workers=reward.workers,
            fallbacks=tuple(reward.fallbacks),
            gold_column=reward.gold_column,
            float_rounding=reward.float_rounding,
            numeric_precision=reward.numeric_precision,
            strict=reward.strict,
            allow_set_relation_comp=reward.allow_set_relation_comp,
        )
    if name == "overlong_penalty":
        max_length = config.max_completion_length()
        return resolve_reward(name, max_length=max_length, cache=reward.overlong_buffer or max(1, max_length // 5))
    return resolve_reward(name)


def prepare_policy(config: RunConfig, data: PreparedData, accuracy_fn: Callable):
    """Load the policy; tiny policies are built, saved, warm-started (cached) and loaded back."""
    warm_result = None
    name = config.model.name_or_path
    if is_tiny(name):
        cache = Path(os.path.expanduser(config.warm_start.cache_dir))
        spec_key = json.dumps([name, vars(config.model.tiny), config.warm_start_seed()], sort_keys=True)
        base = cache / f"base-{hashlib.sha256(spec_key.encode()).hexdigest()[:16]}"
        if not (base / "config.json").exists():
            save_tiny_policy(tiny_architecture(name), config.model.tiny, base, seed=config.warm_start_seed())
        name = str(base)
        wants_warm_start = config.warm_start.enabled in ("auto", "true")
    else:
        wants_warm_start = config.warm_start.enabled == "true"
    if wants_warm_start:
        _, tokenizer = load_pretrained(name, config.model.dtype, config.model.trust_remote_code)
        warm_result = run_warm_start(config, Path(name), tokenizer, accuracy_fn, data.eval_expressions)
        name = str(warm_result.path)
    model, tokenizer = load_pretrained(name, config.model.dtype, config.model.trust_remote_code)
    return model, tokenizer, warm_result


class MetricsFile(TrainerCallback):
    """Append every log record (train and eval) to ``metrics.jsonl`` as one JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def evaluate(config: RunConfig, model, tokenizer, data: PreparedData, accuracy_fn, label: str) -> EvalResult | None:
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


RUN_FILES = (
    "summary.json",
    "metrics.jsonl",
    "forking_tokens.jsonl",
    "routing.jsonl",
    "config.yaml",
    "eval_before.json",
    "domain_routing.json",
)


def domain_routing(config: RunConfig, model, tokenizer, data: PreparedData) -> dict | None:
    """Per-domain expert loads on the eval problems' worked solutions (MoE policy, several domains)."""
    if not data.eval_groups or not data.eval_solutions or not config.eval.enabled:
        return None
    from rlvr.evaluation import gathered_parameters, render_prompts
    from rlvr.moe import UnknownMoEArchitecture
    from rlvr.moe.domains import routing_by_domain

    try:
        with gathered_parameters(model):
            return routing_by_domain(
                model,
                tokenizer,
                render_prompts(tokenizer, data.eval_prompts),
                data.eval_solutions,
                data.eval_groups,
                batch_size=config.eval.batch_size,
            )
    except UnknownMoEArchitecture:  # a dense policy routes nothing
        return None


class PeriodicEval(TrainerCallback):
    """Evaluate every ``every`` steps during training (the final step is evaluated after training)."""

    def __init__(self, every: int, run_eval: Callable[[object, int], None]):
        self.every, self.run_eval = every, run_eval

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps and state.is_world_process_zero:
            self.run_eval(model, state.global_step)
        return control


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, accelerate, deepspeed set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def write_eval_record(path: Path, step: int, result: EvalResult | None) -> None:
    """Append one ``eval/*`` record to the metrics file (rank 0 only)."""
    if result is None or not is_main_process():
        return
    record = {
        "step": step,
        "eval/greedy_accuracy": result.greedy_accuracy,
        "eval/sampled_accuracy": result.sampled_accuracy,
        "eval/mean_completion_tokens": result.mean_completion_tokens,
    }
    if result.k:
        record[f"eval/pass@{result.k}"] = result.pass_at_k
    for group, accuracies in result.by_group.items():
        record[f"eval/greedy_accuracy/{group}"] = accuracies["greedy_accuracy"]
        record[f"eval/sampled_accuracy/{group}"] = accuracies["sampled_accuracy"]
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def train(config: RunConfig) -> RunResult:
    """Run one training job described by ``config`` (already validated)."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_complete_checkpoint(output_dir) if config.resume else None
    max_steps = int(config.grpo.get("max_steps", -1) or -1)
    if checkpoint is not None and 0 < max_steps <= checkpoint[1]:
        # transformers' Trainer would run one more step before it checks max_steps
        raise ConfigError(
            f"resume: {checkpoint[0].name} is at step {checkpoint[1]} and grpo.max_steps is {max_steps}, so training "
            "had already finished; raise grpo.max_steps to train on, or leave out --resume to start over"
        )
    if config.resume and checkpoint is None and is_main_process():
        logger.info("no complete checkpoint in %s: starting from the beginning", output_dir)
    if checkpoint is not None and is_main_process():
        logger.info("resuming from %s (step %d)", checkpoint[0], checkpoint[1])
        for name in ("metrics.jsonl", "forking_tokens.jsonl", "routing.jsonl"):  # forget what came after it
            truncate_jsonl(output_dir / name, checkpoint[1])
    stale = [name for name in RUN_FILES if (output_dir / name).exists()]
    if stale and checkpoint is None and is_main_process():  # an earlier run's outputs would mix with this one's
        logger.info("starting over in %s: replacing %s", output_dir, ", ".join(stale))
        for name in stale:
            (output_dir / name).unlink()
    if is_main_process():
        (output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    metrics_path = output_dir / "metrics.jsonl"
    run_start = time.time()
    set_seed(config.seed)

    data = prepare_data(config)
    reward_functions, reward_weights, accuracy_fn = resolve_rewards(config)
    grpo_kwargs = config.grpo_kwargs()
    if reward_weights is not None:
        grpo_kwargs["reward_weights"] = reward_weights
    # Built before the model is loaded: under DeepSpeed ZeRO-3 this makes from_pretrained partition the
    # weights as they load (zero3_init_flag) instead of materialising the full model on every rank.
    grpo_args = GRPOConfig(**grpo_kwargs)
    model, tokenizer, warm_result = prepare_policy(config, data, accuracy_fn)

    before_file = output_dir / "eval_before.json"
    if checkpoint is not None and before_file.exists():  # evaluated before the interruption
        before = EvalResult(**json.loads(before_file.read_text()))
    else:
        before = evaluate(config, model, tokenizer, data, accuracy_fn, "eval before RL")
        write_eval_record(metrics_path, 0, before)
        if before is not None and is_main_process():
            before_file.write_text(json.dumps(dataclasses.asdict(before)))
    routing_file = output_dir / "domain_routing.json"
    routing_before = None
    if checkpoint is not None and routing_file.exists():
        routing_before = json.loads(routing_file.read_text()).get("before")
    elif checkpoint is None:
        routing_before = domain_routing(config, model, tokenizer, data)
        if routing_before is not None and is_main_process():
            routing_file.write_text(json.dumps({"before": routing_before}))
    set_seed(config.seed)
    callbacks = [MetricsFile(metrics_path), MarkCompleteCheckpoints()]
    if config.eval.enabled and config.eval.every and data.eval_prompts:
        callbacks.append(
            PeriodicEval(
                config.eval.every,
                lambda policy, step: write_eval_record(
                    metrics_path, step, evaluate(config, policy, tokenizer, data, accuracy_fn, f"eval at step {step}")
                ),
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
        callbacks=callbacks,
    )
    use_compact_progress(trainer)
    start = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint[0]) if checkpoint else None)
    train_seconds = time.time() - start
    after = evaluate(config, trainer.model, tokenizer, data, accuracy_fn, "eval after RL")
    write_eval_record(metrics_path, trainer.state.global_step, after)
    routing_after = domain_routing(config, trainer.model, tokenizer, data)
    if routing_after is not None and is_main_process():
        routing_file.write_text(json.dumps({"before": routing_before, "after": routing_after}))

    if config.save_model:
        trainer.save_model(str(output_dir / "model"))
        tokenizer.save_pretrained(output_dir / "model")
    gradient_tokens = trainer.gradient_tokens
    if trainer.accelerator.num_processes > 1:  # each rank counted its own rows
        gradient_tokens = int(trainer.accelerator.reduce(torch.tensor(gradient_tokens), reduction="sum"))
    result = RunResult(
        output_dir,
        before,
        after,
        warm_result,
        train_seconds,
        trainer.state.global_step,
        gradient_tokens=gradient_tokens,
        wall_seconds=time.time() - run_start,
        world_size=trainer.accelerator.num_processes,
    )
    if trainer.accelerator.is_main_process:
        write_summary(config, result)
    return result


def write_summary(config: RunConfig, result: RunResult) -> None:
    summary = {
        "output_dir": str(result.output_dir),
        "arm": config.arm,
        "seed": config.seed,
        "model": config.model.name_or_path,
        "forking": vars(config.forking),
        "moe": vars(config.moe),
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "wall_seconds": result.wall_seconds,
        "gradient_tokens": result.gradient_tokens,
        "world_size": result.world_size,
        "eval_before": result.before.as_dict() if result.before else None,
        "eval_after": result.after.as_dict() if result.after else None,
        "warm_start": None
        if result.warm_start is None
        else {
            "path": str(result.warm_start.path),
            "steps": result.warm_start.steps,
            "dev_accuracy": result.warm_start.dev_accuracy,
            "cached": result.warm_start.cached,
        },
    }
    (result.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def summary_table(result: RunResult) -> str:
    """A small fixed-width table of eval accuracy before and after RL."""
    if result.before is None and result.after is None:
        return f"(evaluation off) {result.steps} RL steps in {result.train_seconds:.0f} s"
    rows = [("", "greedy acc", "sampled acc", "problems")]
    for label, res in (("before RL", result.before), ("after RL", result.after)):
        if res is not None:
            sampled = "n/a" if res.sampled_accuracy != res.sampled_accuracy else f"{res.sampled_accuracy:.3f}"
            rows.append((label, f"{res.greedy_accuracy:.3f} ± {res.greedy_stderr:.3f}", sampled, str(res.num_problems)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if result.before and result.after:
        delta = result.after.greedy_accuracy - result.before.greedy_accuracy
        lines.append(
            f"greedy accuracy change: {delta:+.3f}   ({result.steps} RL steps in {result.train_seconds:.0f} s)"
        )
    return "\n".join(lines)
