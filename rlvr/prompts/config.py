"""The ``prompts`` config section: which prompts a training step spends its generation on."""

from __future__ import annotations

from dataclasses import dataclass

from rlvr.configuration import option, require

FILTERS = ("none", "dynamic")


@dataclass
class PromptsConfig:
    """The ``prompts`` config section (also ``ForkingGRPOTrainer(prompts=...)``)."""

    filter: str = option(
        "none",
        "none: TRL's batches; dynamic: DAPO's dynamic sampling (drop groups without reward variance, sample more "
        "prompts until the generation batch is full of informative groups)",
        FILTERS,
    )
    max_draws: int = option(
        4, "dynamic: generation calls per generation batch at most (the first included); then train on what is there"
    )
    variance_tolerance: float = option(
        1e-6, "a group has no reward variance when the std of its weighted rewards is at most this"
    )

    def validate(self) -> None:
        require(self.max_draws >= 1, "max_draws", "must be >= 1 (the first generation call)")
        require(self.variance_tolerance >= 0.0, "variance_tolerance", "must be >= 0")

    @property
    def drops_groups(self) -> bool:
        return self.filter != "none"
