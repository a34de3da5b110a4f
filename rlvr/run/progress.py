"""Console progress: TRL's progress bar with one short line per logging step instead of a metrics dict.

Every metric still goes to ``<output_dir>/metrics.jsonl`` (see :class:`rlvr.run.callbacks.MetricsFile`);
the console shows the few numbers a person watches during a run.
"""

from __future__ import annotations

from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback

# (log key, label, format) in display order; keys absent from a log record are skipped.
CONSOLE_METRICS = (
    ("loss", "loss", "{:.4g}"),
    ("reward", "reward", "{:.3f}"),
    ("forking/kept_fraction", "kept", "{:.3f}"),
    ("forking/threshold", "threshold", "{:.3g}"),
    ("forking/entropy_kept", "H kept", "{:.3g}"),
    ("forking/entropy_dropped", "H dropped", "{:.3g}"),
    ("moe/specialization_js", "routing JS", "{:.3f}"),
    ("moe/routing_drift", "drift", "{:.3f}"),
    ("completions/mean_length", "length", "{:.1f}"),
    ("step_time", "s/step", "{:.2f}"),
)


def format_log_line(step: int, logs: dict) -> str:
    parts = [f"step {step}"]
    for key, label, fmt in CONSOLE_METRICS:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


class CompactProgressCallback(ProgressCallback):
    """A progress bar that prints :func:`format_log_line` at each logging step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            if any(key in logs for key, _, _ in CONSOLE_METRICS[:2]):
                self.training_bar.write(format_log_line(state.global_step, logs))


def use_compact_progress(trainer: Trainer) -> None:
    """Swap the trainer's progress callback for :class:`CompactProgressCallback`.

    With progress bars off (``disable_tqdm``), the console stays quiet: metrics go to the metrics file.
    """
    if trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        return
    while any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback)
