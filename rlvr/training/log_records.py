"""What rlvr adds around each of TRL's log records: the failure counts of rlvr's reward functions and the step's
device metrics before it, the forking-token and routing record after it."""

from __future__ import annotations

from rlvr.forking.log import ForkingTokenLog
from rlvr.moe.updates import RouterAwareUpdates
from rlvr.training.selection import ForkingSelection


def before_log(trainer, selection: ForkingSelection, logs: dict[str, float]) -> None:
    """Into ``logs`` (a training record: it has a loss): each reward function's failure, timeout and
    parse-failure counts since the last record; into TRL's metrics of the mode: the step's device metrics
    (one host read; TRL averages them)."""
    for function in trainer.reward_funcs:
        pop_stats = getattr(function, "pop_stats", None)
        if callable(pop_stats) and "loss" in logs:
            logs.update(pop_stats().as_metrics(getattr(function, "__name__", type(function).__name__)))
    mode = "train" if trainer.model.training else "eval"
    for key, values in selection.step_metrics[mode].drain().items():
        trainer._metrics[mode][key].extend(values)


def after_log(trainer, forking_log: ForkingTokenLog | None, updates: RouterAwareUpdates | None) -> None:
    """The forking tokens logged since the last record, with the experts' loads, into the run directory (main
    process)."""
    if trainer.accelerator.is_main_process and forking_log is not None:
        loads = updates.pop_expert_loads() if updates is not None else None
        forking_log.write(trainer.args.output_dir, trainer.state.global_step, trainer.processing_class, loads)
