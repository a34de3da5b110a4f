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
* ``archer``: the (B, T) clip range replaces TRL's ``epsilon_low`` and ``epsilon_high`` for the forward (TRL's
  ``clamp(ratio, 1 - eps_low, 1 + eps_high)`` takes tensors), and the reference log-probs of the reasoning
  tokens are set to the policy's own (detached), so that TRL's k3 KL term and its gradient are 0 there; both put
  back after the loss. TRL's KL term is a token mean over all the micro-batch's tokens where the authors' code
  means it over the knowledge tokens alone (1 / 0.8 larger per token at q = 0.8): the arm scales ``grpo.beta``.
* ``stapo``: the keep mask multiplies the loss weights, as Clip-Cov's (the silenced tokens leave the sum, not
  the normaliser).
* ``gtpo`` / ``grpo_s``: their (B, T) advantages replace TRL's, as entropy_advantage's; the rule reads every rank's
  rows with their prompt groups, which must be whole in the micro-batch (``steps_per_generation=1``).

Candidates are the real completion tokens, or the forking tokens with ``forking.policy_tokens=forking``
("Clip-Cov among forking tokens").
"""

from __future__ import annotations

import torch

from rlvr.forking.selection import ForkingConfig
from rlvr.forking.token_rules import STOPPING_RULES, TokenRuleInputs, TokenRulesConfig, apply_rule, kl_cov_penalty
from rlvr.rollouts import GROUP_IDS_KEY
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
    if rule in STOPPING_RULES and getattr(args, "use_adaptive_entropy", False):
        raise ConfigError(
            f"token_rules.rule={rule}: rlvr computes the entropy bonus itself (on every token, not only those the "
            "rule leaves a gradient), which TRL's adaptive entropy controller does not drive; use a fixed "
            "grpo.entropy_coef"
        )
    if rule == "archer" and forking.policy_tokens == "forking":
        raise ConfigError(
            "token_rules.rule=archer: Archer keeps every token's gradient and sets its own high-entropy tokens per "
            "response (a looser clip, no KL); use forking.policy_tokens=all"
        )
    clipped_losses = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    if rule == "archer" and (args.loss_type not in clipped_losses or args.importance_sampling_level != "token"):
        raise ConfigError(
            f"token_rules.rule=archer: sets a clip range per token, which grpo.loss_type={args.loss_type} with "
            f"importance_sampling_level={args.importance_sampling_level} has not; use loss_type dapo (or grpo, "
            "bnpo, dr_grpo, luspo) with token-level importance sampling"
        )
    if rule in ("gtpo", "grpo_s") and args.steps_per_generation != 1:
        raise ConfigError(
            f"token_rules.rule={rule}: compares the completions of a group with each other, so every micro-batch "
            f"must hold whole groups; grpo.steps_per_generation={args.steps_per_generation} splits TRL's shuffled "
            "generation batch: set grpo.steps_per_generation=1 (and gradient_accumulation_steps=1)"
        )
    on_policy = args.num_iterations == 1 and args.steps_per_generation <= args.gradient_accumulation_steps
    if rule == "kl_cov" and on_policy:
        raise ConfigError(
            "token_rules.rule=kl_cov: every optimizer step is on-policy (grpo.num_iterations=1 and "
            "steps_per_generation <= gradient_accumulation_steps), so log p = log p_old and |log p - log p_old| has "
            "no gradient: set grpo.num_iterations >= 2 (or steps_per_generation above gradient_accumulation_steps)"
        )


class TokenRuleStep:
    """Applies one token rule in each loss forward of ``trainer`` (a ``ForkingGRPOTrainer``), reading its
    ``token_rules`` section (the rule, not ``none``), its ``forking`` section (which tokens are candidates), its
    collectives, its seed (clip_cov's draw: one stream per micro-step, the same on every rank), its rank, and
    TRL's clip range (tokens the ratio clip already clips are not clip_cov's; archer replaces it per token)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.settings, self.forking = trainer.token_rules, trainer.forking
        self.collectives: Collectives = trainer.collectives
        self.seed, self.rank = int(trainer.args.seed), trainer.accelerator.process_index
        self.epsilons = (trainer.epsilon_low, trainer.epsilon_high)

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
        groups = inputs.get(GROUP_IDS_KEY) if self.settings.rule in ("gtpo", "grpo_s") else None  # (B,)
        gather = self.collectives.gather_rows
        unit = TokenRuleInputs(
            advantages=gather(advantages, 0.0),  # (world * B, T_max)
            log_probs=gather(log_probs.detach(), 0.0),
            entropies=gather(state.entropies.detach(), 0.0),
            mask=gather(candidates, False),
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + step + 7_919),
            clipped=None if clipped is None else gather(clipped, False),
            groups=None if groups is None else gather(groups, -1),  # (world * B,)
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
            original = inputs["advantages"]
            inputs["advantages"] = effect.advantages[mine].to(original.dtype)
            state.undo.append(lambda: inputs.__setitem__("advantages", original))
        if effect.clip_range is not None:
            self._clip_per_token(state, effect.clip_range[mine].to(log_probs.dtype))
        if effect.no_kl is not None and "ref_per_token_logps" in inputs:
            reference = inputs["ref_per_token_logps"]  # (B, T); k3 KL and its gradient vanish where it equals log p
            inputs["ref_per_token_logps"] = torch.where(effect.no_kl[mine], log_probs.detach(), reference)
            state.undo.append(lambda: inputs.__setitem__("ref_per_token_logps", reference))
        tokens = unit.mask.sum().clamp(min=1)
        metrics = {"token_rules/touched_share": effect.touched.sum() / tokens}
        if effect.covariance is not None:
            metrics["token_rules/mean_covariance"] = effect.covariance.sum() / tokens
        return metrics

    def _clip_per_token(self, state: LossForward, clip_range: torch.Tensor) -> None:
        """TRL's clip range replaced by a (B, T) one for this forward, put back after the loss."""
        trainer, original = self.trainer, (self.trainer.epsilon_low, self.trainer.epsilon_high)
        trainer.epsilon_low = trainer.epsilon_high = clip_range

        def put_back():
            trainer.epsilon_low, trainer.epsilon_high = original

        state.undo.append(put_back)

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
