"""A pass-rate probe: predicts a prompt's pass rate from the policy's own representation of it, before any
completion is sampled, so it needs no history and works on prompts never seen.

The learned-predictor line of selective rollouts (DOTS, arXiv 2506.05316; PCL, arXiv 2510.01135) predicts a
prompt's difficulty before generation. Here the predictor is the smallest one that can be fitted online and
identically on every rank: a logistic regression on the mean-pooled last hidden states of the prompt's tokens
(one no-grad forward of the prompt, far cheaper than G completions), fitted to the pass rates the run has
observed (the share of a group's completions whose reward is above ``solved_reward``). A group of G
completions has no reward variance with probability ``p ** G + (1 - p) ** G`` when each passes independently
with probability ``p``.
"""

from __future__ import annotations

import torch


def zero_variance_probability(pass_rate: torch.Tensor, group_size: int) -> torch.Tensor:
    """P(all G pass or all G fail) for independent completions passing with ``pass_rate``: p^G + (1-p)^G."""
    return pass_rate**group_size + (1 - pass_rate) ** group_size


class PassRateProbe:
    """Logistic regression from (N, D) prompt features to pass rates, refitted on the last ``capacity``
    observed groups after every generation call (features standardised with that window's statistics).

    Args:
        dim: D, the policy's hidden size.
        capacity: observed groups kept for fitting.
        steps: full-batch optimiser steps per fit.
        l2: weight decay of the fit.
        min_groups: groups observed before the probe predicts (before that: None).
    """

    def __init__(self, dim: int, capacity: int = 1024, steps: int = 50, l2: float = 1e-4, min_groups: int = 16):
        self.dim, self.capacity, self.steps, self.l2, self.min_groups = dim, capacity, steps, l2, min_groups
        self.features = torch.zeros(0, dim)  # (M, D) float32, the newest last
        self.pass_rates = torch.zeros(0)  # (M,)
        self.weight, self.bias = torch.zeros(dim), torch.zeros(())
        self.mean, self.std = torch.zeros(dim), torch.ones(dim)

    @property
    def ready(self) -> bool:
        return len(self.pass_rates) >= self.min_groups

    def observe(self, features: torch.Tensor, pass_rates: torch.Tensor) -> None:
        """Add (N, D) features and (N,) pass rates of sampled groups, then refit (deterministic: the same data
        give the same probe on every rank)."""
        self.features = torch.cat([self.features, features.detach().float().cpu()])[-self.capacity :]
        self.pass_rates = torch.cat([self.pass_rates, pass_rates.detach().float().cpu()])[-self.capacity :]
        if self.ready:
            self._fit()

    def predict(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N,) predicted pass rates of (N, D) prompt features; None until ``min_groups`` groups were seen."""
        if not self.ready:
            return None
        standard = (features.detach().float().cpu() - self.mean) / self.std
        return torch.sigmoid(standard @ self.weight + self.bias)

    def _fit(self) -> None:
        self.mean = self.features.mean(dim=0)
        self.std = self.features.std(dim=0, unbiased=False).clamp(min=1e-6)
        standard = (self.features - self.mean) / self.std  # (M, D)
        weight = self.weight.clone().requires_grad_(True)  # warm start from the last fit
        bias = self.bias.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=self.steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logits = standard @ weight + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, self.pass_rates)
            loss = loss + self.l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()

    def state_dict(self) -> dict[str, torch.Tensor]:
        names = ("features", "pass_rates", "weight", "bias", "mean", "std")
        return {name: getattr(self, name).clone() for name in names}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            setattr(self, name, value.float().clone())
