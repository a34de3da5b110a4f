"""Data: the embedded tasks (``arithmetic.py``, ``countdown.py``), loaders for local files and HF datasets
(``loader.py``), the training and evaluation rows of a source (``splits.py``), all mapped to (prompt, answer)
(``records.py``). May import only :mod:`rlvr.utils` (no TRL); rewards and the run use it.
"""

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
