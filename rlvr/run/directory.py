"""The run directory: what a run writes, and what a resumed run finds there.

``<output_dir>/`` holds ``config.yaml`` (the validated config), ``metrics.jsonl`` (every train and
eval record), ``forking_tokens.jsonl`` and ``routing.jsonl`` (written by the trainer),
``eval_before.json`` and ``domain_routing.json`` (cached so that a resumed run does not evaluate the
starting policy again), ``prompts.jsonl`` (under ``prompts.filter``: what happened to each prompt),
``summary.json`` (written last: a run with one has finished) and ``model/``.

Only rank 0 writes; :func:`is_main_process` is the one rank-0 test of the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlvr.run.checkpoints import latest_complete_checkpoint, truncate_jsonl
from rlvr.run.config import RunConfig
from rlvr.run.evaluation import EvalResult
from rlvr.run.warm_start import WarmStartResult
from rlvr.utils.options import ConfigError, to_dict

logger = logging.getLogger(__name__)

RUN_FILES = (
    "summary.json",
    "metrics.jsonl",
    "forking_tokens.jsonl",
    "routing.jsonl",
    "config.yaml",
    "eval_before.json",
    "domain_routing.json",
    "prompts.jsonl",
)
GROWING_FILES = ("metrics.jsonl", "forking_tokens.jsonl", "routing.jsonl")  # cut back to the checkpoint on resume


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (torchrun, accelerate, deepspeed set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


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
    decoded_tokens: int = 0  # completion tokens sampled for training (a forking tree's shared prefix once)
    generation_seconds: float = 0.0  # wall time spent sampling training completions
    trainable_parameters: int = 0  # parameters the optimizer updated (adapters: the adapters and routers)
    optimizer_state_bytes: int = 0  # bytes of the optimizer's state on the main process after training
    data_rows: dict | None = None  # rlvr.data.splits.TrainEvalRows.record(): counts, where the eval rows came from


@dataclass
class RunDirectory:
    path: Path
    checkpoint: tuple[Path, int] | None  # the complete checkpoint a resumed run continues from, with its step

    @classmethod
    def open(cls, config: RunConfig) -> RunDirectory:
        """Create or reuse ``config.output_dir``: resume from its newest complete checkpoint (``resume``),
        or start over (an earlier run's files are removed, so they cannot mix with this run's)."""
        path = Path(config.output_dir)
        path.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_complete_checkpoint(path) if config.resume else None
        max_steps = int(config.grpo.get("max_steps", -1) or -1)
        if checkpoint is not None and 0 < max_steps <= checkpoint[1]:
            # transformers' Trainer would run one more step before it checks max_steps
            raise ConfigError(
                f"resume: {checkpoint[0].name} is at step {checkpoint[1]} and grpo.max_steps is {max_steps}, so "
                "training had already finished; raise grpo.max_steps to train on, or leave out --resume to start over"
            )
        if is_main_process():
            if config.resume and checkpoint is None:
                logger.info("no complete checkpoint in %s: starting from the beginning", path)
            if checkpoint is not None:
                logger.info("resuming from %s (step %d)", checkpoint[0], checkpoint[1])
                for name in GROWING_FILES:  # forget what came after the checkpoint
                    truncate_jsonl(path / name, checkpoint[1])
            stale = [name for name in RUN_FILES if (path / name).exists()]
            if stale and checkpoint is None:
                logger.info("starting over in %s: replacing %s", path, ", ".join(stale))
                for name in stale:
                    (path / name).unlink()
            (path / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        return cls(path, checkpoint)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def resume_from(self) -> str | None:
        return str(self.checkpoint[0]) if self.checkpoint else None

    def eval_before(self, evaluate: Callable[[], EvalResult | None]) -> EvalResult | None:
        """The starting policy's eval: cached from before an interruption, else run and recorded at step 0."""
        cached = self.path / "eval_before.json"
        if self.checkpoint is not None and cached.exists():
            return EvalResult(**json.loads(cached.read_text()))
        result = evaluate()
        self.write_eval_record(0, result)
        if result is not None and is_main_process():
            cached.write_text(json.dumps(dataclasses.asdict(result)))
        return result

    def domain_routing_before(self, measure: Callable[[], dict | None]) -> dict | None:
        """Per-domain routing of the starting policy: cached on resume, else measured and written."""
        cached = self.path / "domain_routing.json"
        if self.checkpoint is not None:
            return json.loads(cached.read_text()).get("before") if cached.exists() else None
        routing = measure()
        if routing is not None and is_main_process():
            cached.write_text(json.dumps({"before": routing}))
        return routing

    def write_domain_routing(self, before: dict | None, after: dict | None) -> None:
        if after is not None and is_main_process():
            (self.path / "domain_routing.json").write_text(json.dumps({"before": before, "after": after}))

    def write_eval_record(self, step: int, result: EvalResult | None) -> None:
        """Append one ``eval/*`` record to the metrics file."""
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
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_summary(self, config: RunConfig, result: RunResult) -> None:
        """``summary.json``, written last: its presence marks the run finished (``rlvr compare`` skips it)."""
        if not is_main_process():
            return
        warm = result.warm_start
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
            "decoded_tokens": result.decoded_tokens,
            "generation_seconds": result.generation_seconds,
            "peft": vars(config.peft),
            "trainable_parameters": result.trainable_parameters,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "rollout": vars(config.rollout),
            "world_size": result.world_size,
            "data": result.data_rows,
            "eval_before": result.before.as_dict() if result.before else None,
            "eval_after": result.after.as_dict() if result.after else None,
            "warm_start": None
            if warm is None
            else {
                "path": str(warm.path),
                "steps": warm.steps,
                "dev_accuracy": warm.dev_accuracy,
                "cached": warm.cached,
            },
        }
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))


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
    rows = result.data_rows
    if rows and rows["eval_rows"]:
        lines.append(f"evaluated on: {rows['eval_rows']} rows, {rows['eval_from']}")
        if rows["eval_on_training_rows"] or rows["eval_prompts_also_trained"]:
            lines.append(
                f"WARNING: {rows['eval_prompts_also_trained']} of the {rows['eval_rows']} evaluation prompts are also "
                "training prompts: these accuracies are not held-out accuracies"
            )
    return "\n".join(lines)
