"""Data: the embedded arithmetic task and loaders for HF datasets, all mapped to (prompt, answer)."""

from rlvr.data.arithmetic import DOMAINS, ArithmeticTask, Problem, generate_problems, solve, split_of
from rlvr.data.loader import DataConfig, DataError, extract_answer, read_source, to_prompt_answer
from rlvr.data.records import make_prompt, problems_to_dataset

__all__ = [
    "ArithmeticTask",
    "DOMAINS",
    "DataConfig",
    "DataError",
    "Problem",
    "extract_answer",
    "generate_problems",
    "make_prompt",
    "problems_to_dataset",
    "read_source",
    "solve",
    "split_of",
    "to_prompt_answer",
]
