"""What happened to each prompt under ``prompts.filter``: how often it was sampled, skipped before sampling,
dropped for a group without reward variance, its pass rate and its last skip probability.

The filter's metrics count per step; this keeps the per-prompt view, so a user can see whether the filter
skips the prompts the policy always solves or the ones it never does (``prompts.jsonl`` in the run directory and
in each checkpoint, one JSON object per prompt; the report plots skip rate against pass rate). Every rank keeps
the same record: the filter hands it every rank's prompts of each generation call.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

FILE = "prompts.jsonl"
PREVIEW_CHARACTERS = 120


@dataclass
class PromptStats:
    """One prompt's counts (a prompt is known by :func:`rlvr.prompts.history.prompt_key`)."""

    preview: str = ""  # the start of the prompt's last message
    sampled: int = 0  # groups generated for it
    skipped: int = 0  # times it was a candidate and skipped before sampling
    zero_variance: int = 0  # sampled groups without reward variance
    dropped: int = 0  # of those, left out of the training batch (the others filled a batch the draws left short)
    passed: float = 0.0  # sum over its sampled groups of the share of completions above prompts.solved_reward
    skip_probability: float = 0.0  # the last predicted probability that it gives no variance (skip only)

    @property
    def pass_rate(self) -> float | None:
        return self.passed / self.sampled if self.sampled else None


def preview(prompt) -> str:
    """The start of a prompt's text (a chat prompt: its last message's content)."""
    text = prompt[-1].get("content", "") if isinstance(prompt, list) and prompt else prompt
    return " ".join(str(text).split())[:PREVIEW_CHARACTERS]


class PromptRecord:
    """Per-prompt counts of a run (the same on every rank)."""

    def __init__(self):
        self.prompts: dict[str, PromptStats] = {}

    def stats(self, key: str, text: str = "") -> PromptStats:
        stats = self.prompts.setdefault(key, PromptStats())
        stats.preview = stats.preview or text
        return stats

    def observe_call(
        self,
        sampled: list[tuple[str, str]],
        pass_rates: list[float],
        informative: list[bool],
        considered: list[tuple[str, str, float, bool]],
    ) -> None:
        """One generation call, every rank's: the sampled prompts (key, preview) with their groups' pass rates and
        whether each had reward variance; the candidates considered before it (key, preview, skip probability,
        skipped)."""
        for (key, text), pass_rate, has_variance in zip(sampled, pass_rates, informative, strict=True):
            stats = self.stats(key, text)
            stats.sampled += 1
            stats.passed += pass_rate
            stats.zero_variance += not has_variance
        for key, text, probability, skipped in considered:
            stats = self.stats(key, text)
            stats.skip_probability = probability
            stats.skipped += skipped

    def observe_dropped(self, keys: list[str]) -> None:
        for key in keys:
            self.stats(key).dropped += 1

    def rows(self, streaks: dict[str, list] | None = None) -> list[dict]:
        """One dict per prompt, most sampled first: its id, counts, pass rate and (with a history) the current
        run of zero-variance groups (``[kind, times]``)."""
        rows = []
        for key, stats in self.prompts.items():
            row = {"prompt_id": key, **asdict(stats), "pass_rate": stats.pass_rate}
            del row["passed"]
            if streaks is not None:
                row["zero_variance_streak"] = streaks.get(key, [None, 0])
            rows.append(row)
        return sorted(rows, key=lambda row: (-row["sampled"], -row["skipped"], row["prompt_id"]))

    def write(self, directory: str, streaks: dict[str, list] | None = None) -> None:
        """``prompts.jsonl`` in ``directory`` (replaced whole: each write is the record so far)."""
        path = os.path.join(directory, FILE)
        staging = f"{path}.tmp-{os.getpid()}"
        with open(staging, "w") as handle:
            for row in self.rows(streaks):
                handle.write(json.dumps(row) + "\n")
        os.replace(staging, path)

    def state_dict(self) -> dict:
        return {key: asdict(stats) for key, stats in self.prompts.items()}

    def load_state_dict(self, state: dict) -> None:
        self.prompts = {key: PromptStats(**values) for key, values in state.items()}
