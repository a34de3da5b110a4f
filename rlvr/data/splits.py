"""The training rows and the evaluation rows of a data source, and where the evaluation rows came from.

A source read by split (a hub dataset, a saved dataset dict) evaluates on ``data.eval_split``. A source
without splits (one ``.jsonl``/``.json``/``.parquet``/``.csv`` file, one saved ``Dataset``) has only its rows:
``data.eval_fraction`` of them are held out, drawn with ``data.seed`` before ``data.num_train`` and
``data.num_eval`` take their first rows, so the held-out rows are the same whatever those numbers are. Or the
evaluation rows come from a second source (``data.eval_source``). Evaluating on the training rows happens only
when asked for (``data.eval_split`` naming the training split), and the run's summary says so.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from datasets import Dataset

from rlvr.data.loader import DataConfig, DataError, has_splits, read_source, to_prompt_answer

logger = logging.getLogger(__name__)


@dataclass
class TrainEvalRows:
    """The rows a run trains and evaluates on (``prompt``, ``answer`` columns), and their provenance."""

    train: Dataset
    eval: Dataset | None  # None: no evaluation
    eval_from: str  # where the evaluation rows came from, in words (for the summary)
    eval_on_training_rows: bool = False  # asked for explicitly: data.eval_split is the training split

    def record(self) -> dict:
        """What the run's summary keeps: row counts, the evaluation rows' origin, and how many evaluation prompts
        are also training prompts (0 unless the source repeats questions, or evaluation is on the training rows)."""
        trained = {_text(prompt) for prompt in self.train["prompt"]}
        evaluated = [_text(prompt) for prompt in self.eval["prompt"]] if self.eval is not None else []
        return {
            "train_rows": len(self.train),
            "eval_rows": len(evaluated),
            "eval_from": self.eval_from,
            "eval_on_training_rows": self.eval_on_training_rows,
            "eval_prompts_also_trained": sum(prompt in trained for prompt in evaluated),
        }


def _text(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def held_out_indices(num_rows: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) row indices of a source of ``num_rows`` rows: ``round(fraction * num_rows)`` rows (at
    least one) drawn with ``seed`` are held out; both lists keep the file's order."""
    held = max(1, round(fraction * num_rows))
    if held >= num_rows:
        raise DataError(
            f"data.eval_fraction={fraction}: holding out {held} of {num_rows} rows leaves none to train on; "
            "use more rows, a smaller eval_fraction, or data.eval_source"
        )
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = sorted(order[:held])
    chosen = set(held_out)
    return [index for index in range(num_rows) if index not in chosen], held_out


def load_train_eval(data: DataConfig, seed: int) -> TrainEvalRows:
    """The training and evaluation rows of ``data`` (not the embedded task), each cut to ``num_train`` /
    ``num_eval`` first rows (0 rows to train on: all). Raises :class:`DataError` naming the setting to change."""

    def mapped(raw: Dataset, source: str, split: str, limit: int) -> Dataset:
        if limit:
            raw = raw.select(range(min(limit, len(raw))))
        return to_prompt_answer(
            raw,
            data.question_column,
            data.answer_column,
            data.answer_format,
            data.system_prompt,
            data.chat,
            source_name=f"{source} [{split}]",
        )

    raw_train = read_source(data.source, data.train_split, data.config_name)
    if not data.eval_split or not data.num_eval:
        return TrainEvalRows(mapped(raw_train, data.source, data.train_split, data.num_train), None, "none")
    if data.eval_source is not None:
        raw_eval = read_source(data.eval_source, data.eval_split, data.config_name)
        train = mapped(raw_train, data.source, data.train_split, data.num_train)
        evaluated = mapped(raw_eval, data.eval_source, data.eval_split, data.num_eval)
        split = f" [{data.eval_split}]" if has_splits(data.eval_source) else ""
        origin = f"data.eval_source {data.eval_source}{split}"
        return TrainEvalRows(train, evaluated, origin)
    if data.eval_split == data.train_split:
        logger.warning(
            "data.eval_split=%r is the training split: evaluation accuracy is measured on rows the policy trains on",
            data.eval_split,
        )
        train = mapped(raw_train, data.source, data.train_split, data.num_train)
        evaluated = mapped(raw_train, data.source, data.train_split, data.num_eval)
        return TrainEvalRows(train, evaluated, f"the training rows of {data.source}", eval_on_training_rows=True)
    if has_splits(data.source):
        raw_eval = read_source(data.source, data.eval_split, data.config_name)
        train = mapped(raw_train, data.source, data.train_split, data.num_train)
        evaluated = mapped(raw_eval, data.source, data.eval_split, data.num_eval)
        return TrainEvalRows(train, evaluated, f"{data.source} [{data.eval_split}]")
    if data.eval_fraction == 0:
        raise DataError(
            f"{data.source} has no splits, so data.eval_split={data.eval_split!r} names none of its rows: hold some "
            "out (data.eval_fraction > 0), name a file to evaluate on (data.eval_source), evaluate on the training "
            f"rows (data.eval_split={data.train_split}) or not at all (data.eval_split=null)"
        )
    every_row = mapped(raw_train, data.source, data.train_split, 0)  # bad rows named by their place in the file
    train_rows, held_out = held_out_indices(len(every_row), data.eval_fraction, seed)
    train, evaluated = every_row.select(train_rows), every_row.select(held_out)
    if data.num_train:
        train = train.select(range(min(data.num_train, len(train))))
    evaluated = evaluated.select(range(min(data.num_eval, len(evaluated))))
    origin = f"{len(held_out)} rows of {data.source} held out (data.eval_fraction={data.eval_fraction}, seed {seed})"
    return TrainEvalRows(train, evaluated, origin)
