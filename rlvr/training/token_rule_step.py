"""The ``token_rules`` entropy intervention inside the loss forward: the rule of :mod:`rlvr.forking.token_rules` applied
over the micro-batch of every rank (gathered as the forking selection gathers it), and what each rank's loss
takes from it.

* ``clip_cov``: the rule's keep mask multiplies the forking weights TRL's loss applies per token (with
  ``forking.policy_tokens=all``: weight 1 on every real token, 0 on the stopped ones), without renormalising:
  the stopped tokens leave the sum, not the normaliser, as in verl's ``corr``.
* ``kl_cov``: ``coef * |log p - log p_old|`` on the penalised tokens, a token mean over the micro-batch's real
  tokens (verl's ``token-mean``) added to TRL's loss; TRL keeps its ratio clipping (verl's ``kl_cov`` loss has
  none: at the ratio of 1 of a first pass over a batch they agree).
* ``entropy_advantage``: the shaped (B, T) advantages replace ``inputs["advantages"]`` for the forward that
  computed them (TRL reads them after the forward); the caller puts the originals back.

Candidates are the real completion tokens, or the forking tokens with ``forking.policy_tokens=forking``
("Clip-Cov among forking tokens").
"""

from __future__ import annotations

import torch

from rlvr.forking.selection import ForkingConfig
from rlvr.forking.token_rules import TokenRuleInputs, TokenRulesConfig, apply_rule, kl_cov_penalty
from rlvr.training.selection import LossForward, loss_mask
from rlvr.utils.collectives import Collectives
from rlvr.utils.options import ConfigError


def check_token_rules(settings: TokenRulesConfig, forking: ForkingConfig, args) -> None:
    """What a rule cannot run with, as one-line errors naming the key."""
    rule = settings.rule
    if rule in ("clip_cov", "kl_cov") and forking.scope != "micro_batch":
        raise ConfigError(
            f"token_rules.rule={rule}: the covariance of A and log p is taken over the micro-batch of every rank; "
            f"forking.scope={forking.scope} would split it (within one sequence A is constant and every "
            "covariance is 0): use forking.scope=micro_batch"
        )
    if forking.selection != "top" and forking.policy_tokens == "forking":
        raise ConfigError(
            f"token_rules.rule={rule}: forking.selection={forking.selection} is a control arm of the forking "
            "selection, not a selection to combine a rule with: use selection top or policy_tokens all"
        )
    if rule == "clip_cov" and getattr(args, "use_adaptive_entropy", False):
        raise ConfigError(
            "token_rules.rule=clip_cov: rlvr computes the entropy bonus itself (on every token, not only those "
            "Clip-Cov leaves a gradient), which TRL's adaptive entropy controller does not drive; use a fixed "
            "grpo.entropy_coef"
        )
    on_policy = args.num_iterations == 1 and args.steps_per_generation <= args.gradient_accumulation_steps
    if rule == "kl_cov" and on_policy:
        raise ConfigError(
            "token_rules.rule=kl_cov: every optimizer step is on-policy (grpo.num_iterations=1 and "
            "steps_per_generation <= gradient_accumulation_steps), so log p = log p_old and |log p - log p_old| has "
            "no gradient: set grpo.num_iterations >= 2 (or steps_per_generation above gradient_accumulation_steps)"
        )


class TokenRuleStep:
    """Applies one token rule in each loss forward.

    Args:
        settings: the ``token_rules`` section (its rule is not ``none``).
        forking: the ``forking`` section (which tokens are candidates).
        collectives: the cross-rank collectives.
        seed: the run's seed (clip_cov's draw: one stream per micro-step, the same on every rank).
        rank: this process's index.
        epsilons: TRL's (epsilon_low, epsilon_high): tokens the ratio clip already clips are not clip_cov's.
    """

    def __init__(
        self,
        settings: TokenRulesConfig,
        forking: ForkingConfig,
        collectives: Collectives,
        seed: int,
        rank: int,
        epsilons: tuple[float, float],
    ):
        self.settings, self.forking, self.collectives = settings, forking, collectives
        self.seed, self.rank, self.epsilons = seed, rank, epsilons

    def apply(self, state: LossForward, log_probs: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """The rule on this forward: ``state``'s weights, advantages or penalty changed in place. Returns the
        ``token_rules/*`` metrics (device tensors, over all ranks)."""
        inputs, selection = state.inputs, state.selection
        state.log_probs = log_probs  # (B, T) with gradient: KL-Cov's penalty reads it after TRL's loss
        mask = loss_mask(inputs).bool()  # (B, T)
        candidates = mask & selection.keep if self.forking.policy_tokens == "forking" else mask
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        advantages = advantages.expand_as(log_probs).to(log_probs.dtype)  # (B, T)
        clipped = self._clipped(inputs, log_probs.detach(), advantages)
        gather = self.collectives.gather_rows
        unit = TokenRuleInputs(
            advantages=gather(advantages, 0.0),  # (world * B, T_max)
            log_probs=gather(log_probs.detach(), 0.0),
            entropies=gather(state.entropies.detach(), 0.0),
            mask=gather(candidates, False),
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7_919),
            clipped=None if clipped is None else gather(clipped, False),
        )
        effect = apply_rule(self.settings.rule, unit, self.settings)
        rows, length = mask.shape
        mine = (slice(self.rank * rows, (self.rank + 1) * rows), slice(0, length))
        if effect.keep is not None:
            weights = selection.weights if self.forking.policy_tokens == "forking" else mask.to(log_probs.dtype)
            selection.weights = weights * effect.keep[mine].to(weights.dtype)
        if effect.penalty is not None:
            state.penalty = effect.penalty[mine]
        if effect.advantages is not None:
            state.original_advantages = inputs["advantages"]
            inputs["advantages"] = effect.advantages[mine].to(inputs["advantages"].dtype)
        tokens = unit.mask.sum().clamp(min=1)
        metrics = {"token_rules/touched_share": effect.touched.sum() / tokens}
        if effect.covariance is not None:
            metrics["token_rules/mean_covariance"] = effect.covariance.sum() / tokens
        return metrics

    def penalty_loss(self, state: LossForward, accumulation: float) -> torch.Tensor | None:
        """KL-Cov's term for this micro-batch (None for the other rules), scaled as TRL scales its loss."""
        if state.penalty is None:
            return None
        inputs = state.inputs
        old = inputs.get("old_per_token_logps")
        old = state.log_probs.detach() if old is None else old
        term = kl_cov_penalty(state.log_probs, old, state.penalty, self.settings.kl_cov_coef)  # (B, T)
        return term.sum() / loss_mask(inputs).sum().clamp(min=1) / accumulation

    def _clipped(self, inputs: dict, log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor | None:
        """(B, T) bool: tokens PPO's ratio clip clips (verl's ``clip_by_origin``); None on-policy (no old
        log-probs: the ratio is 1 and nothing is clipped)."""
        old = inputs.get("old_per_token_logps")
        if old is None or self.settings.rule != "clip_cov":
            return None
        ratio = torch.exp(log_probs - old)
        low, high = self.epsilons
        return ((advantages > 0) & (ratio > 1 + high)) | ((advantages < 0) & (ratio < 1 - low))
