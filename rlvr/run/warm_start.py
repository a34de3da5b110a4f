"""Supervised warm start: make a random tiny policy partly right so that RL gets a reward signal.

A random MoE never writes a correct answer, so every GRPO group has zero reward variance and zero
advantage. A short SFT run on the task's worked solutions (TRL's ``SFTTrainer``) fixes that. Accuracy
of such runs rises suddenly rather than steadily, so the checkpoint is chosen by evaluation: training
stops at the first dev-accuracy check that reaches ``warm_start.target_accuracy``.

The result is cached on disk under a key derived from everything that shapes it (model, task,
warm-start settings, seed), written to a temporary directory and renamed when complete, so an
interrupted warm start is never picked up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from rlvr.data import ArithmeticTask, generate_problems, make_prompt, problems_to_dataset
from rlvr.models import remove_stale_staging, save_weights_on_this_rank, staging_name
from rlvr.run.evaluation import evaluate_accuracy
from rlvr.run.progress import use_compact_progress
from rlvr.utils.options import ConfigError, option, require

logger = logging.getLogger(__name__)

DONE_FILE = "warm_start.json"


@dataclass
class WarmStartConfig:
    """The ``warm_start`` config section."""

    enabled: str = option(
        "auto", "supervised warm start before RL: auto (only for tiny models), true, false", ("auto", "true", "false")
    )
    target_accuracy: float = option(0.3, "stop once greedy dev accuracy reaches this (a partly right policy)")
    max_steps: int = option(1500, "upper bound on supervised steps")
    eval_every: int = option(50, "steps between dev-accuracy checks")
    learning_rate: float = option(3e-3, "supervised learning rate")
    batch_size: int = option(32, "supervised batch size")
    num_dev: int = option(100, "dev problems used to pick the checkpoint (disjoint from the eval set)")
    cache_dir: str = option("~/.cache/rlvr/warm_start", "where warm-started checkpoints are cached, keyed by config")
    seed: int | None = option(None, "seed of the tiny model's init and its warm start (default: the run seed)")
    num_train: int | None = option(
        None, "worked problems the warm start trains on (default: data.num_train; set it when RL uses a small set)"
    )

    def validate(self) -> None:
        require(0.0 < self.target_accuracy <= 1.0, "target_accuracy", "must be in (0, 1]")
        for name in ("max_steps", "eval_every", "batch_size", "num_dev"):
            require(getattr(self, name) >= 1, name, "must be >= 1")
        require(self.num_train is None or self.num_train >= 1, "num_train", "must be >= 1 (or unset)")


@dataclass(frozen=True)
class WarmStartJob:
    """One warm start: its own section, and the values of the run it needs (the policy, the task, seeds and
    sizes); the run config builds it (:meth:`rlvr.run.config.RunConfig.warm_start_job`)."""

    settings: WarmStartConfig
    model_name: str  # ``model.name_or_path`` as configured (``tiny:<arch>`` or a checkpoint)
    tiny: dict  # ``model.tiny`` (the embedded model's shape), part of the cache key
    task: ArithmeticTask  # ``data.task``: the problems and worked solutions it trains on
    num_train: int  # ``warm_start.num_train`` or ``data.num_train``
    chat: bool  # ``data.chat``
    system_prompt: str | None  # ``data.system_prompt``
    seed: int  # the tiny model's init and its supervised training
    data_seed: int  # the problems
    max_new_tokens: int  # generation length of the dev-accuracy checks (the run's completion length)
    configured_completion_length: int | None  # ``grpo.max_completion_length`` as set (None: TRL's), in the key
    eval_batch_size: int  # ``eval.batch_size``
    use_cpu: bool  # train on CPU even where an accelerator is visible (the run's ``use_cpu``)
    world_size: int = 1  # processes of the launch: under DDP each step sees world_size batches, in the key


@dataclass
class WarmStartResult:
    path: Path
    steps: int
    dev_accuracy: float
    seconds: float
    reached_target: bool
    history: list = field(default_factory=list)  # [(step, dev accuracy), ...]
    cached: bool = False


def cache_key(job: WarmStartJob) -> str:
    """Hash of everything that determines the warm-started weights."""
    warm = asdict(job.settings)
    warm.pop("cache_dir")
    warm.pop("enabled")
    warm.pop("num_train")  # the number the job trains on is below, whichever section set it
    identity = {
        "model": job.model_name,
        "checkpoint": _checkpoint_fingerprint(job.model_name),
        "tiny": job.tiny,
        "task": asdict(job.task),
        "chat": job.chat,
        "system_prompt": job.system_prompt,
        "max_completion_length": job.configured_completion_length,
        "warm_start": warm,
        "seed": job.seed,
        "data_seed": job.data_seed,
        "num_train": job.num_train,
        "world_size": job.world_size,
        "format": 1,
    }
    if launcher_bf16():  # a launcher that asks for bf16 trains a different warm start (float32 keys unchanged)
        identity["bf16"] = True
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def launcher_bf16() -> bool:
    """Whether the launcher (``accelerate launch`` with an accelerate config such as TRL's zero3.yaml) asks for
    bf16 mixed precision."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16"


def _checkpoint_fingerprint(name_or_path: str) -> list | None:
    """(name, size, modification time) of each file of a local checkpoint: a checkpoint rewritten at the
    same path (e.g. rebuilt by ``rlvr upcycle``) must not reuse the warm start of its old weights."""
    directory = Path(name_or_path)
    if not directory.is_dir():
        return None  # a hub id or an embedded tiny model: the name says it all
    return sorted(
        (item.name, item.stat().st_size, item.stat().st_mtime_ns) for item in directory.iterdir() if item.is_file()
    )


class _StopAtAccuracy(TrainerCallback):
    """Evaluate greedy dev accuracy every ``every`` steps; stop once it reaches ``target``."""

    def __init__(self, evaluate: Callable[[object], float], every: int, target: float):
        self.evaluate, self.every, self.target = evaluate, every, target
        self.history: list[tuple[int, float]] = []
        self.reached = False

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return control
        accuracy = self.evaluate(model)
        self.history.append((state.global_step, accuracy))
        logger.info("warm start step %d: dev accuracy %.3f", state.global_step, accuracy)
        if accuracy >= self.target:
            self.reached = True
            control.should_training_stop = True
        return control


def run_warm_start(
    job: WarmStartJob,
    base_path: Path,
    tokenizer: PreTrainedTokenizerBase,
    reward_fn: Callable[..., list],
    eval_expressions: set[str],
) -> WarmStartResult:
    """Warm-start the policy at ``base_path`` (or reuse the cached result) and return where it is."""
    warm = job.settings
    cache_dir = Path(os.path.expanduser(warm.cache_dir))
    target_dir = cache_dir / f"warm-{cache_key(job)}"
    done_file = target_dir / DONE_FILE
    if done_file.exists():
        info = json.loads(done_file.read_text())
        return WarmStartResult(path=target_dir, cached=True, **info)

    task = job.task
    train_problems = generate_problems(task, "train", job.num_train, job.data_seed)
    # Dev problems come from the eval half of the problem space but never from the eval set itself,
    # so that choosing the checkpoint does not peek at the numbers reported later.
    try:
        dev_pool = generate_problems(task, "eval", warm.num_dev + len(eval_expressions), job.data_seed + 7919)
    except ValueError as error:
        raise ConfigError(
            f"warm_start.num_dev (dev problems come from the eval split, beside data.num_eval): {error}"
        ) from None
    dev_problems = [p for p in dev_pool if p.expression not in eval_expressions][: warm.num_dev]
    dev_prompts = [make_prompt(p.question, job.system_prompt, job.chat) for p in dev_problems]
    dev_answers = [p.answer for p in dev_problems]

    def dev_accuracy(model) -> float:
        result = evaluate_accuracy(
            model, tokenizer, dev_prompts, dev_answers, reward_fn, job.max_new_tokens, job.eval_batch_size
        )
        return result.greedy_accuracy

    dataset = problems_to_dataset(train_problems, job.system_prompt, with_solutions=True, chat=job.chat)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    stopper = _StopAtAccuracy(dev_accuracy, warm.eval_every, warm.target_accuracy)
    remove_stale_staging(cache_dir)  # what a crashed launch left
    scratch = staging_name(target_dir)
    args = SFTConfig(
        output_dir=str(scratch),
        max_steps=warm.max_steps,
        per_device_train_batch_size=warm.batch_size,
        learning_rate=warm.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(20, warm.max_steps // 10),
        completion_only_loss=True,
        logging_steps=warm.max_steps,  # progress is reported by the dev-accuracy checks
        save_strategy="no",
        report_to=[],
        seed=job.seed,
        bf16=launcher_bf16(),  # DeepSpeed refuses a precision other than the launcher's; a plain run: float32
        use_cpu=job.use_cpu,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    start = time.time()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[stopper])
    use_compact_progress(trainer)
    trainer.train()
    seconds = time.time() - start
    # The RL trainer in this process builds its own Accelerator, in bf16 by TRL's default on a GPU:
    # forget this fp32 run's mixed-precision state so that it may.
    AcceleratorState._reset_state()
    steps, accuracy = stopper.history[-1] if stopper.history else (trainer.state.global_step, float("nan"))
    if not stopper.reached:
        logger.warning(
            "warm start reached dev accuracy %.3f after %d steps, below warm_start.target_accuracy=%.2f; "
            "RL may get little reward signal (raise warm_start.max_steps)",
            accuracy,
            steps,
            warm.target_accuracy,
        )
    info = {
        "steps": steps,
        "dev_accuracy": accuracy,
        "seconds": seconds,
        "reached_target": stopper.reached,
        "history": stopper.history,
    }
    trainer.model.config.get_text_config().output_router_logits = False  # SFTTrainer turned it on; see load_pretrained
    save_weights_on_this_rank(trainer.model, scratch / "model")
    tokenizer.save_pretrained(scratch / "model")
    (scratch / "model" / DONE_FILE).write_text(json.dumps(info, indent=1))
    publish_directory(scratch / "model", target_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return WarmStartResult(path=target_dir, **info)


def publish_directory(staging: Path, target: Path) -> None:
    """Rename the fully written ``staging`` directory to ``target`` in one step, so that other ranks of a
    launch and concurrent runs see all of it or nothing; when another process published ``target``
    first, keep theirs and drop ``staging``."""
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
