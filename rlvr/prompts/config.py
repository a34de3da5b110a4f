"""The ``prompts`` config section: which prompts a training step spends its generation on."""

from __future__ import annotations

from dataclasses import dataclass

from rlvr.utils.options import option, require

FILTERS = ("none", "dynamic", "skip")
PREDICTORS = ("", "history", "probe", "both")  # "": unset (skip uses history)


@dataclass
class PromptsConfig:
    """The ``prompts`` config section (also ``ForkingGRPOTrainer(prompts=...)``)."""

    filter: str = option(
        "none",
        "none: TRL's batches; dynamic: DAPO's dynamic sampling (drop groups without reward variance, sample more "
        "prompts until the generation batch is full of informative groups); skip: also skip, before sampling, "
        "prompts predicted to give no variance (GRESO)",
        FILTERS,
    )
    max_draws: int = option(
        4, "dynamic: generation calls per generation batch at most (the first included); then train on what is there"
    )
    variance_tolerance: float = option(
        1e-6,
        "a group has no reward variance when the std of its weighted rewards is at most this (TRL's "
        "normalize_then_sum: of the weighted sum of each function's group-normalised rewards)",
    )
    predictor: str = option(
        "",
        "skip: how a prompt's chance of a zero-variance group is predicted before sampling (unset: history); "
        "history: GRESO's rule "
        "from the prompt's own past groups; probe: a pass-rate probe on the policy's representation of the prompt "
        "(no history needed); both: skip with the larger of the two probabilities",
        PREDICTORS,
    )
    target_zero_variance: float = option(
        0.25, "skip: share of sampled groups without variance the skip probabilities steer toward (GRESO)"
    )
    solved_reward: float = option(
        0.5, "skip: a group without variance whose reward is above this is all-right (else all-wrong)"
    )
    candidate_rounds: int = option(
        4, "skip: extra draws of candidate prompts per generation call to replace the skipped ones"
    )
    refill: bool = option(
        True,
        "skip: replace skipped prompts by further candidates and groups without variance by more calls (false: one "
        "call on the prompts not skipped, nothing decoded for the skipped ones: their places in the batch are rows "
        "without loss tokens)",
    )

    def validate(self) -> None:
        require(self.max_draws >= 1, "max_draws", "must be >= 1 (the first generation call)")
        require(self.variance_tolerance >= 0.0, "variance_tolerance", "must be >= 0")
        require(0.0 < self.target_zero_variance < 1.0, "target_zero_variance", "must be in (0, 1)")
        require(self.candidate_rounds >= 0, "candidate_rounds", "must be >= 0")
        require(self.refill or self.filter == "skip", "refill", "false applies to filter=skip only")
        require(
            not self.predictor or self.filter == "skip",
            "predictor",
            f"applies to filter=skip only (filter is {self.filter!r}: nothing is predicted before sampling)",
        )

    @property
    def skip_predictor(self) -> str | None:
        """What predicts skips: history, probe or both under filter=skip (history when unset); else None."""
        return (self.predictor or "history") if self.filter == "skip" else None

    @property
    def drops_groups(self) -> bool:
        return self.filter != "none"
