"""Load question/answer data from HF ``datasets`` (hub name or local file) into rlvr's schema.

Sources: a hub dataset name (``openai/gsm8k``), a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file,
or a directory saved with ``Dataset.save_to_disk``. Columns are configurable; GSM8K-style answers
(``"...reasoning... #### 42"``) are reduced to the final answer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from rlvr.data.arithmetic import ArithmeticTask
from rlvr.data.records import make_prompt
from rlvr.utils.options import option, require

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ANSWER_FORMATS = ("raw", "gsm8k")
MAX_REPORTED_BAD_ROWS = 5


@dataclass
class DataConfig:
    """The ``data`` config section: where prompts and gold answers come from."""

    source: str = option(
        "arithmetic",
        "'arithmetic' (embedded task), a local .jsonl/.json/.parquet/.csv file, a dataset directory, or a hub name",
    )
    config_name: str | None = option(None, "hub dataset config (e.g. 'main' for openai/gsm8k)")
    train_split: str = option("train", "split to train on (hub datasets and dataset dicts)")
    eval_split: str | None = option(
        "test",
        "held-out split to evaluate on (null: no evaluation; the train split: the training rows, with a warning)",
    )
    eval_source: str | None = option(
        None, "evaluate on this file, directory or hub dataset (its split data.eval_split) instead of data.source"
    )
    eval_fraction: float = option(
        0.1,
        "a source without splits (one file, one saved dataset): share of its rows held out for evaluation, "
        "drawn with data.seed (0: refuse to evaluate it without data.eval_source)",
    )
    question_column: str = option("question", "column holding the question")
    answer_column: str = option("answer", "column holding the gold answer")
    answer_format: str = option(
        "raw", "how to read the gold answer ('gsm8k' keeps what follows '####')", ANSWER_FORMATS
    )
    system_prompt: str | None = option(None, "optional system message put before every question")
    chat: bool = option(True, "conversational prompts (chat template) instead of plain text")
    num_train: int = option(4000, "training problems (embedded task: generated; files: first N rows, 0 = all)")
    num_eval: int = option(200, "evaluation problems (first N of the eval split)")
    task: ArithmeticTask = option(ArithmeticTask, "embedded arithmetic task: terms, operand range, eval share")
    seed: int | None = option(
        None, "seed of the embedded task's problems (default: the run seed; fix it to share data across seeds)"
    )

    @property
    def embedded(self) -> bool:
        return self.source == "arithmetic"

    def validate(self) -> None:
        require(self.num_train >= 0, "num_train", "must be >= 0")
        require(self.num_eval >= 0, "num_eval", "must be >= 0")
        require(0.0 <= self.eval_fraction < 1.0, "eval_fraction", "must be in [0, 1)")
        if self.eval_source is not None:
            require(not self.embedded, "eval_source", "applies to data sources other than the embedded task")
        if self.embedded:
            require(self.num_train > 0, "num_train", "must be > 0 for the embedded task")


class DataError(ValueError):
    """A data source that cannot be mapped to prompts and answers; the message names rows and columns."""


def has_splits(source: str) -> bool:
    """Whether ``source`` is read by split: a hub dataset, a saved dataset dict or a folder of data files. One
    local file or one saved ``Dataset`` is a single set of rows (:func:`read_source` ignores the split)."""
    path = Path(source).expanduser()
    if path.is_file():
        return False
    if path.is_dir() and (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return False
    return True


def read_source(source: str, split: str, config_name: str | None = None) -> Dataset:
    """Read one split of a hub dataset, a local data file or a local dataset directory.

    Every failure to read is a :class:`DataError` of one line naming the file (and the line or the
    reader's complaint), raised before any model is built.
    """
    path = Path(source).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        if builder == "json":
            check_json_file(path)
        return _load(source, split, lambda: load_dataset(builder, data_files=str(path), split="train"))
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = load_from_disk(str(path))
            if isinstance(loaded, DatasetDict):
                if split not in loaded:
                    raise DataError(f"{source}: no split {split!r}; available: {sorted(loaded)}")
                return loaded[split]
            return loaded
        return _load(source, split, lambda: load_dataset(str(path), config_name, split=split))  # a folder of data files
    if source.startswith((".", "/", "~")) or source.endswith(tuple(FILE_BUILDERS)):
        raise DataError(f"{source}: no such file or directory")
    return _load(source, split, lambda: load_dataset(source, config_name, split=split))  # e.g. "openai/gsm8k", "main"


def check_json_file(path: Path) -> None:
    """A ``.json`` or ``.jsonl`` file must hold JSON objects (one per line, or one JSON document)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    stripped = text.strip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    if path.suffix.lower() == ".json" and stripped[0] in "[{":
        try:
            json.loads(stripped)
            return
        except json.JSONDecodeError:
            if stripped[0] == "[":  # one JSON array: the error position is the useful message
                raise DataError(f"{path}: not valid JSON: {_json_error(stripped)}") from None
    for number, line in enumerate(text.splitlines(), start=1):  # JSON lines
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")


def _json_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return f"{error.msg} at line {error.lineno}, column {error.colno}"
    return "unknown error"


def _load(source: str, split: str, read) -> Dataset:
    """Run a ``datasets`` reader; its errors become one line naming the source (its own error log is muted)."""
    library_logger = logging.getLogger("datasets")
    level = library_logger.level
    library_logger.setLevel(logging.CRITICAL)
    try:
        return read()
    except DataError:
        raise
    except FileNotFoundError as error:
        raise DataError(f"{source}: not found ({error})") from None
    except ValueError as error:
        if "split" in str(error).lower():  # datasets: 'Unknown split "x". Should be one of [...]'
            raise DataError(f"{source}: no split {split!r} ({error})") from None
        raise DataError(f"{source}: cannot read: {_root_cause(error)}") from None
    except Exception as error:  # noqa: BLE001 -- pyarrow/pandas parse errors surface as DatasetGenerationError
        if type(error).__module__.startswith(("datasets", "pyarrow", "pandas")) or isinstance(error, OSError):
            raise DataError(f"{source}: cannot read: {_root_cause(error)}") from None
        raise
    finally:
        library_logger.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """The innermost exception's message: the parser's own words (line, column, expected fields)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def extract_answer(raw: object, answer_format: str) -> str:
    """The gold answer as a string; ``gsm8k`` keeps what follows the last ``####``."""
    text = str(raw).strip()
    if answer_format == "gsm8k":
        if "####" not in text:
            raise ValueError("has no '####' marker")
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def to_prompt_answer(
    dataset: Dataset,
    question_column: str = "question",
    answer_column: str = "answer",
    answer_format: str = "raw",
    system_prompt: str | None = None,
    chat: bool = True,
    source_name: str = "dataset",
) -> Dataset:
    """Map rows to ``{"prompt", "answer"}``; raise :class:`DataError` naming every bad row (up to 5)."""
    if answer_format not in ANSWER_FORMATS:
        raise DataError(f"data.answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    for role, column in (("question_column", question_column), ("answer_column", answer_column)):
        if column not in dataset.column_names:
            raise DataError(
                f"{source_name}: data.{role}={column!r} is not a column; available columns: {dataset.column_names}"
            )
    prompts, answers, problems = [], [], []
    for index, (question, answer) in enumerate(zip(dataset[question_column], dataset[answer_column], strict=True)):
        if question is None or not str(question).strip():
            problems.append(f"row {index}, column {question_column!r}: empty question")
            continue
        if answer is None or not str(answer).strip():
            problems.append(f"row {index}, column {answer_column!r}: empty answer")
            continue
        try:
            answers.append(extract_answer(answer, answer_format))
        except ValueError as error:
            problems.append(f"row {index}, column {answer_column!r}: {error} (answer_format={answer_format!r})")
            continue
        prompts.append(make_prompt(str(question), system_prompt, chat))
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED_BAD_ROWS])
        more = (
            f"\n  ... and {len(problems) - MAX_REPORTED_BAD_ROWS} more" if len(problems) > MAX_REPORTED_BAD_ROWS else ""
        )
        raise DataError(f"{source_name}: {len(problems)} bad row(s) of {len(dataset)}:\n  {shown}{more}")
    return Dataset.from_dict({"prompt": prompts, "answer": answers})
