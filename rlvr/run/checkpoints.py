"""Complete checkpoints and resuming a killed run.

TRL (through transformers' Trainer) saves ``<output_dir>/checkpoint-<step>/`` with the weights,
optimizer, scheduler, RNG states and trainer state, and restores all of them with
``resume_from_checkpoint``. A process killed while saving leaves a directory that looks like a
checkpoint but is not one, so rlvr marks a checkpoint complete only after the trainer has finished
writing it (the ``on_save`` callback runs after the save) and resumes from the newest marked one.
Run files that grew past the checkpoint (``metrics.jsonl`` and friends) are cut back to it, so a
resumed run's logs read as if it had never stopped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import TrainerCallback

COMPLETE_MARKER = "rlvr_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class MarkCompleteCheckpoints(TrainerCallback):
    """Write :data:`COMPLETE_MARKER` into each checkpoint once the trainer has saved all of it."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if directory.is_dir():
                marker = directory / COMPLETE_MARKER
                temporary = marker.with_suffix(".tmp")
                temporary.write_text(json.dumps({"step": state.global_step}))
                os.replace(temporary, marker)
        return control


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, int] | None:
    """The newest checkpoint of ``output_dir`` that was saved completely, with its step; None if none."""
    found = []
    directory = Path(output_dir)
    if not directory.is_dir():
        return None
    for child in directory.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and (child / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), child))
    if not found:
        return None
    step, path = max(found)
    return path, step


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Drop the records of ``path`` logged after ``max_step`` (and a partial last line); returns how many were kept."""
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= max_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return len(kept)
