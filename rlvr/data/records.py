"""The schema every data source is mapped to, and the conversion to TRL's dataset format.

A row for GRPO has ``prompt`` (a list of chat messages, TRL's conversational format, or a plain
string) and ``answer`` (the gold answer the reward functions check). Warm-start rows also have
``completion`` (the worked solution as an assistant message).
"""

from __future__ import annotations

from datasets import Dataset

from rlvr.data.arithmetic import Problem


def make_prompt(question: str, system_prompt: str | None = None, chat: bool = True) -> list[dict] | str:
    """A prompt in TRL's conversational format (``chat=True``) or as plain text."""
    if not chat:
        return question if not system_prompt else f"{system_prompt}\n{question}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def problems_to_dataset(
    problems: list[Problem], system_prompt: str | None = None, with_solutions: bool = False, chat: bool = True
) -> Dataset:
    """GRPO rows (``prompt``, ``answer``, ``domain``), plus ``completion`` for supervised warm start."""
    rows = {
        "prompt": [make_prompt(p.question, system_prompt, chat) for p in problems],
        "answer": [p.answer for p in problems],
        "domain": [p.domain for p in problems],
    }
    if with_solutions:
        rows["completion"] = [[{"role": "assistant", "content": p.solution}] if chat else p.solution for p in problems]
    return Dataset.from_dict(rows)
