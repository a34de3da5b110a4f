"""GRESO's pre-rollout rule: skip a prompt whose recent groups had no reward variance, with a probability
that grows with how many times in a row that happened and keeps a floor of exploration.

GRESO (Zheng et al., 2025, arXiv 2506.02177; code Infini-AI-Lab/GRESO on verl): a prompt that was
all-right (or all-wrong) ``z`` times in a row is skipped with probability ``1 - max(p ** z, 0.01)``, where
``p`` is an exploration probability kept separately for all-right and all-wrong prompts. After each step
``p`` moves by 0.01 within [0.05, 0.95]: down (skip more) while the share of sampled groups of that kind is
at or above its target, up otherwise; the targets are 1/3 (all-right) and 2/3 (all-wrong) of the target
zero-variance share, GRESO's split.

What rlvr changes: GRESO labels a prompt by the mean of its 0/1 rewards (all-right >= 0.98, all-wrong
<= 0.11). rlvr's rewards are weighted sums that need not be 0/1, so a group counts only when it truly has no
variance (:func:`rlvr.prompts.groups.informative_groups`), and its kind is whether its common reward is above
``solved_reward``. GRESO counts per epoch (each prompt once per epoch); here per time a prompt is sampled.
GRESO starts skipping and adapting ``p`` after the first epoch, once every prompt has a history; rlvr skips
and adapts from the first optimizer step (a prompt not yet sampled has no streak, so it is never skipped).
A prompt is known by a hash of its prompt field, the same on every rank and across a resume.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

RIGHT, WRONG = "right", "wrong"
MIN_P, MAX_P, STEP, FLOOR = 0.05, 0.95, 0.01, 0.01  # GRESO's exploration bounds, step and skip floor


def prompt_key(row: dict) -> str:
    """A stable id of a dataset row's prompt (a string or a chat as a list of messages)."""
    text = json.dumps(row["prompt"], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class PromptHistory:
    """Each prompt's run of zero-variance groups, and GRESO's two exploration probabilities.

    Args:
        target_zero_variance: the share of sampled groups without variance the probabilities steer toward.
        solved_reward: a zero-variance group whose common reward is above this is all-right, else all-wrong.
    """

    target_zero_variance: float = 0.25
    solved_reward: float = 0.5
    explore: dict[str, float] = field(default_factory=lambda: {RIGHT: 0.5, WRONG: 0.5})
    streaks: dict[str, list] = field(default_factory=dict)  # key -> [kind, times in a row]

    def skip_probability(self, key: str) -> float:
        """1 - max(p ** z, 0.01) for a prompt z times in a row without variance of one kind; 0 for any other."""
        streak = self.streaks.get(key)
        if streak is None:
            return 0.0
        kind, times = streak
        return 1.0 - max(self.explore[kind] ** times, FLOOR)

    def observe(self, key: str, informative: bool, reward: float) -> str | None:
        """Record one sampled group of ``key``; returns its kind (``right``/``wrong``) when it had no variance."""
        if informative or math.isnan(reward):
            self.streaks.pop(key, None)
            return None
        kind = RIGHT if reward > self.solved_reward else WRONG
        streak = self.streaks.get(key)
        self.streaks[key] = [kind, streak[1] + 1 if streak is not None and streak[0] == kind else 1]
        return kind

    def adapt(self, right_share: float, wrong_share: float) -> None:
        """GRESO's step: skip more of a kind while its share of sampled groups is at or above its target."""
        targets = {RIGHT: self.target_zero_variance / 3, WRONG: self.target_zero_variance * 2 / 3}
        for kind, share in ((RIGHT, right_share), (WRONG, wrong_share)):
            step = -STEP if share >= targets[kind] else STEP
            self.explore[kind] = min(max(self.explore[kind] + step, MIN_P), MAX_P)

    def state_dict(self) -> dict:
        return {"explore": dict(self.explore), "streaks": {key: list(value) for key, value in self.streaks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.explore = {kind: float(value) for kind, value in state["explore"].items()}
        self.streaks = {key: [value[0], int(value[1])] for key, value in state["streaks"].items()}
