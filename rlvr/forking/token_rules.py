"""Entropy interventions as token rules: which completion tokens get how much policy gradient.

Each rule reads the tokens of one selection unit (a micro-batch, gathered across ranks as the forking
selection gathers it) and says, per token, one of three things the loss forward can apply:

* ``clip_cov``  -- Clip-Cov (Cui et al., 2025, *The Entropy Mechanism of Reinforcement Learning for Reasoning
  Language Models*, arXiv 2505.22617, and its code in verl's ``core_algos.py``): per token
  ``cov = (A - mean A) * (log p - mean log p)`` over the unit's tokens; the gradient of a random
  ``max(int(r * N), 1)`` of the tokens with ``lb < cov < ub`` is stopped (paper: r = 2e-4, lb = 1, ub = 5),
  tokens PPO's ratio clip already clips left out as verl leaves them out. Returns a keep mask. Only the policy
  gradient stops: an entropy bonus (``grpo.entropy_coef``) still averages over every token it covers without
  the rule, as verl's does over every response token (the trainer computes it itself then).
* ``kl_cov``    -- KL-Cov (same paper): the top ``max(int(k * N), 1)`` tokens by ``cov`` get the penalty
  ``coef * |log p - log p_old|`` added to their per-token loss (paper: k = 2e-3 for 7B, 2e-4 for 32B,
  coef = 1). Returns a penalty mask. Under fully on-policy training ``log p = log p_old`` in value and the
  gradient of ``|x|`` at 0 is 0, so the penalty does nothing: the trainer refuses it there.
* ``entropy_advantage`` -- entropy-based advantage shaping (Cheng et al., 2025, *Reasoning with Exploration:
  An Entropy Perspective*, arXiv 2506.14758): ``A' = A + min(alpha * H.detach(), |A| / kappa)``, per token.
  A zero advantage stays zero. Returns the (B, T) advantages.

* ``archer``    -- Archer's dual-token constraints (Wang et al., 2025, *Stabilizing Knowledge, Promoting
  Reasoning: Dual-Token Constraints for RLVR*, arXiv 2507.15778, and its code, ArcherCodeR's ``dp_actor.py``):
  every token keeps its gradient; within each response the tokens whose entropy exceeds the response's
  ``q``-quantile (``torch.nanquantile``, q = 0.8) are reasoning tokens, clipped at ``1 +- eps_reasoning`` (0.5)
  with no KL term, the others knowledge tokens, clipped at ``1 +- eps_knowledge`` (0.2) with the KL term
  (``grpo.beta``). Returns a (B, T) clip range and the tokens without KL.
* ``stapo``     -- S2T, silencing spurious tokens (Liu et al., 2026, *STAPO: Stabilizing Reinforcement Learning for
  LLMs by Silencing Rare Spurious Tokens*, arXiv 2602.15620): the gradient of a token is stopped when its
  advantage is positive, its probability below ``tau_p`` (0.01) and its entropy below ``tau_h``, the unit's
  ``q``-quantile of entropy (q = 0.05). Returns a keep mask.
* ``gtpo`` / ``grpo_s`` -- entropy-weighted rewards (Tan et al., 2025, *GTPO and GRPO-S: Token and Sequence-Level
  Reward Shaping with Policy Entropy*, arXiv 2508.04349). In each group, a completion with a positive
  advantage is a success (outcome +1), one with a negative advantage a failure (-1). GTPO rewards the token at
  position t of a success ``a1 + a2 * d_t * H_{i,t} / sum_{k in S_t} H_{k,t}`` (S_t: the successes with a
  token at t, d_t = |S_t|) and of a failure ``-a1 - a2 * h_t * (1 / H_{j,t}) / sum_{k in F_t} 1 / H_{k,t}``,
  then normalises the group's token rewards (mean, std over its real tokens). GRPO-S does the same per
  sequence with each completion's mean entropy and normalises over the group's completions. A group without
  both a success and a failure keeps advantage 0, as under DAPO's dynamic sampling the paper builds on (its
  entropy terms alone would otherwise make advantages of a group without a reward signal). Returns (B, T)
  advantages. No code of the authors was available to port; this follows the paper's definitions.

Ties in ``cov`` are broken toward the earlier token (row-major), so a selection is a function of its inputs.
``N`` counts the unit's real completion tokens (``mask``); padding never enters a mean or a selection.
Shapes: ``B`` rows, ``T`` completion positions. Plain PyTorch, no TRL import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlvr.utils.options import option, require

RULES = ("none", "clip_cov", "kl_cov", "entropy_advantage", "archer", "stapo", "gtpo", "grpo_s")
STOPPING_RULES = ("clip_cov", "stapo")  # rules that stop tokens' policy gradient through the loss weights


@dataclass
class TokenRulesConfig:
    """The ``token_rules`` config section: one entropy intervention applied in the loss forward."""

    rule: str = option(
        "none",
        "none; clip_cov: stop the gradient of a random share of high-covariance tokens; kl_cov: penalise "
        "|log p - log p_old| on the highest-covariance tokens; entropy_advantage: A + min(alpha H, |A| / kappa); "
        "archer: a looser clip and no KL on each response's high-entropy tokens; stapo: silence spurious tokens; "
        "gtpo / grpo_s: entropy-weighted token / sequence rewards",
        RULES,
    )
    clip_cov_ratio: float = option(2e-4, "clip_cov: share r of the unit's tokens whose gradient is stopped")
    clip_cov_lb: float = option(1.0, "clip_cov: only tokens with covariance above this are candidates")
    clip_cov_ub: float = option(5.0, "clip_cov: only tokens with covariance below this are candidates")
    kl_cov_ratio: float = option(2e-3, "kl_cov: share k of the unit's tokens, the highest by covariance, penalised")
    kl_cov_coef: float = option(1.0, "kl_cov: weight of |log p - log p_old| on the penalised tokens")
    alpha: float = option(0.4, "entropy_advantage: weight of the detached token entropy added to the advantage")
    kappa: float = option(2.0, "entropy_advantage: the entropy term is at most |A| / kappa")
    archer_quantile: float = option(
        0.8, "archer: a response's tokens with entropy above this quantile of its entropies are reasoning tokens"
    )
    archer_clip_knowledge: float = option(0.2, "archer: clip range 1 +- this on knowledge (low-entropy) tokens")
    archer_clip_reasoning: float = option(0.5, "archer: clip range 1 +- this on reasoning (high-entropy) tokens")
    stapo_probability: float = option(0.01, "stapo: a spurious token's probability is below this (tau_p)")
    stapo_entropy_quantile: float = option(
        0.05, "stapo: a spurious token's entropy is below this quantile of the unit's token entropies (tau_h)"
    )
    gtpo_outcome_weight: float = option(1.0, "gtpo / grpo_s: weight a1 of the outcome (+1 success, -1 failure)")
    gtpo_entropy_weight: float = option(1.0, "gtpo / grpo_s: weight a2 of the entropy-weighted share")

    def validate(self) -> None:
        require(0.0 < self.clip_cov_ratio <= 1.0, "clip_cov_ratio", f"must be in (0, 1]; got {self.clip_cov_ratio}")
        require(
            self.clip_cov_lb < self.clip_cov_ub,
            "clip_cov_lb",
            f"must be below clip_cov_ub ({self.clip_cov_ub}); got {self.clip_cov_lb}",
        )
        require(0.0 < self.kl_cov_ratio <= 1.0, "kl_cov_ratio", f"must be in (0, 1]; got {self.kl_cov_ratio}")
        require(self.kl_cov_coef >= 0.0, "kl_cov_coef", f"must be >= 0; got {self.kl_cov_coef}")
        require(self.alpha >= 0.0, "alpha", f"must be >= 0; got {self.alpha}")
        require(self.kappa > 0.0, "kappa", f"must be > 0; got {self.kappa}")
        require(0.0 < self.archer_quantile < 1.0, "archer_quantile", f"must be in (0, 1); got {self.archer_quantile}")
        for key in ("archer_clip_knowledge", "archer_clip_reasoning"):
            require(0.0 < getattr(self, key) < 1.0, key, f"must be in (0, 1); got {getattr(self, key)}")
        require(
            0.0 < self.stapo_probability <= 1.0, "stapo_probability", f"must be in (0, 1]; got {self.stapo_probability}"
        )
        for key in ("gtpo_outcome_weight", "gtpo_entropy_weight"):
            require(getattr(self, key) >= 0.0, key, f"must be >= 0; got {getattr(self, key)}")
        require(
            0.0 <= self.stapo_entropy_quantile <= 1.0,
            "stapo_entropy_quantile",
            f"must be in [0, 1]; got {self.stapo_entropy_quantile}",
        )


@dataclass
class TokenRuleInputs:
    """What a rule reads: one selection unit's tokens, every tensor (B, T), detached."""

    advantages: torch.Tensor  # per-token advantages (a sequence advantage repeated along T)
    log_probs: torch.Tensor  # log p of the sampled tokens under the policy being trained
    entropies: torch.Tensor  # the policy's token entropies
    mask: torch.Tensor  # bool: real completion tokens (and, combined with forking, the selected ones)
    generator: torch.Generator | None = None  # clip_cov's random draw (the same stream on every rank)
    clipped: torch.Tensor | None = None  # bool: tokens PPO's ratio clip already clips (not clip_cov candidates)
    groups: torch.Tensor | None = None  # (B,) each row's prompt group (gtpo, grpo_s)


@dataclass
class TokenRuleEffect:
    """What the loss forward applies: any of a keep mask (gradient stopped where False), a penalty mask (the
    KL-Cov term added where True), replacement (B, T) advantages, a (B, T) ``clip_range`` (the ratio clipped to
    ``[1 - clip_range, 1 + clip_range]`` per token) and the tokens left out of the KL term. ``touched`` is
    the (B, T) bool of tokens the rule changed or singled out (for the share logged)."""

    touched: torch.Tensor
    keep: torch.Tensor | None = None
    penalty: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    clip_range: torch.Tensor | None = None  # (B, T) float64 (archer)
    no_kl: torch.Tensor | None = None  # (B, T) bool (archer)
    covariance: torch.Tensor | None = None  # (B, T) float64 cov the rule selected by (clip_cov, kl_cov)


TokenRule = Callable[[TokenRuleInputs, TokenRulesConfig], TokenRuleEffect]
TOKEN_RULES: dict[str, TokenRule] = {}


def register_token_rule(name: str) -> Callable[[TokenRule], TokenRule]:
    def register(rule: TokenRule) -> TokenRule:
        TOKEN_RULES[name] = rule
        return rule

    return register


def token_covariance(advantages: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ``(A - mean A) * (log p - mean log p)`` with the means over the real tokens (``mask``), in float64;
    0 where ``mask`` is False (and everywhere when it is empty)."""
    mask = mask.bool()
    count = mask.sum().clamp(min=1)
    advantages, log_probs = advantages.detach().double(), log_probs.detach().double()
    centred_advantages = advantages - (advantages * mask).sum() / count
    centred_log_probs = log_probs - (log_probs * mask).sum() / count
    return (centred_advantages * centred_log_probs).masked_fill(~mask, 0.0)


def _count(ratio: float, tokens: int) -> int:
    """verl's ``max(int(ratio * N), 1)``, 0 for an empty unit."""
    return max(int(ratio * tokens), 1) if tokens else 0


@register_token_rule("clip_cov")
def clip_cov(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """Clip-Cov: the gradient of a random ``max(int(r * N), 1)`` of the tokens with ``lb < cov < ub`` stopped
    (all of them when fewer qualify)."""
    mask = inputs.mask.bool()
    cov = token_covariance(inputs.advantages, inputs.log_probs, mask)  # (B, T)
    candidates = mask & (cov > settings.clip_cov_lb) & (cov < settings.clip_cov_ub)
    if inputs.clipped is not None:
        candidates &= ~inputs.clipped.bool()
    candidates = candidates.flatten().nonzero().squeeze(1)  # (C,) row-major positions
    chosen = candidates[torch.randperm(len(candidates), generator=inputs.generator)][
        : _count(settings.clip_cov_ratio, int(mask.sum()))
    ]
    stopped = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    stopped[chosen] = True
    stopped = stopped.view_as(mask)
    return TokenRuleEffect(touched=stopped, keep=~stopped, covariance=cov)


@register_token_rule("kl_cov")
def kl_cov(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """KL-Cov: the top ``max(int(k * N), 1)`` real tokens by ``cov`` (ties toward the earlier token) penalised."""
    mask = inputs.mask.bool()
    covariance = token_covariance(inputs.advantages, inputs.log_probs, mask)  # (B, T)
    cov = covariance.flatten()
    real = mask.flatten().nonzero().squeeze(1)  # (N,) positions, row-major
    order = torch.sort(cov[real], descending=True, stable=True).indices  # stable: ties keep row-major order
    chosen = real[order[: _count(settings.kl_cov_ratio, len(real))]]
    penalised = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    penalised[chosen] = True
    penalised = penalised.view_as(mask)
    return TokenRuleEffect(touched=penalised, penalty=penalised, covariance=covariance)


@register_token_rule("entropy_advantage")
def entropy_advantage(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """``A + min(alpha * H.detach(), |A| / kappa)`` on real tokens; padding keeps its advantage."""
    mask = inputs.mask.bool()
    advantages = inputs.advantages
    bonus = torch.minimum(settings.alpha * inputs.entropies.detach(), advantages.abs() / settings.kappa)
    bonus = bonus.masked_fill(~mask, 0.0)
    return TokenRuleEffect(touched=mask & (bonus != 0), advantages=advantages + bonus)


@register_token_rule("archer")
def archer(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """Per response: reasoning tokens (entropy above the response's ``archer_quantile``, linear interpolation over
    its real tokens, as ``torch.nanquantile`` in the authors' code) get the clip range ``archer_clip_reasoning``
    and no KL; the rest ``archer_clip_knowledge`` and the KL term. A response without real tokens has none."""
    mask = inputs.mask.bool()
    entropies = inputs.entropies.detach().double().masked_fill(~mask, math.nan)  # (B, T)
    threshold = torch.nanquantile(entropies, settings.archer_quantile, dim=-1, keepdim=True)  # (B, 1); NaN: empty
    reasoning = (entropies > threshold) & mask
    clip_range = torch.where(
        reasoning,
        torch.tensor(settings.archer_clip_reasoning, dtype=torch.float64),
        torch.tensor(settings.archer_clip_knowledge, dtype=torch.float64),
    )
    return TokenRuleEffect(touched=reasoning, clip_range=clip_range, no_kl=reasoning)


@register_token_rule("stapo")
def stapo(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """S2T: real tokens with a positive advantage, probability below ``stapo_probability`` and entropy below the
    unit's ``stapo_entropy_quantile`` (linear interpolation over its real tokens) have their gradient stopped."""
    mask = inputs.mask.bool()
    if not bool(mask.any()):
        return TokenRuleEffect(touched=mask.clone(), keep=torch.ones_like(mask))
    entropies = inputs.entropies.detach().double()
    tau_h = torch.quantile(entropies[mask], settings.stapo_entropy_quantile)
    probabilities = inputs.log_probs.detach().double().exp()
    spurious = mask & (inputs.advantages > 0) & (probabilities < settings.stapo_probability) & (entropies < tau_h)
    return TokenRuleEffect(touched=spurious, keep=~spurious)


ENTROPY_FLOOR = 1e-6  # a failure's weight is 1 / H: an entropy of 0 counts as this
ADVANTAGE_EPS = 1e-4  # added to the std, as TRL's GRPO advantages add it


def _outcomes(inputs: TokenRuleInputs) -> torch.Tensor:
    """(B,) +1 success, -1 failure, 0 neither (a completion that scored its group's mean)."""
    if inputs.groups is None:
        raise ValueError("gtpo / grpo_s need each row's prompt group")
    return torch.sign(inputs.advantages[:, 0].double())


def _share(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``count * v / sum(v)`` over ``members`` along dim 0 (per column), 0 elsewhere; (N, ...)."""
    values = values.masked_fill(~members, 0.0)
    return members.sum(0) * values / values.sum(0).clamp(min=torch.finfo(values.dtype).tiny)


def _normalised(rewards: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` over ``members`` (unbiased std, as TRL's GRPO), 0 elsewhere."""
    count = members.sum()
    mean = (rewards * members).sum() / count.clamp(min=1)
    variance = (((rewards - mean) * members) ** 2).sum() / (count - 1).clamp(min=1)
    return ((rewards - mean) / (variance.sqrt() + ADVANTAGE_EPS)).masked_fill(~members, 0.0)


def _entropy_weighted(
    sign: torch.Tensor, entropies: torch.Tensor, success: torch.Tensor, failure: torch.Tensor, settings
) -> torch.Tensor:
    """GTPO's and GRPO-S's shaped rewards of one group: ``a1 * outcome``, plus ``a2`` times the successes'
    entropy share, minus ``a2`` times the failures' inverse-entropy share (per position or per sequence)."""
    a1, a2 = settings.gtpo_outcome_weight, settings.gtpo_entropy_weight
    inverse = 1.0 / entropies.clamp(min=ENTROPY_FLOOR)
    return a1 * sign + a2 * _share(entropies, success) - a2 * _share(inverse, failure)


@register_token_rule("gtpo")
def gtpo(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """GTPO's entropy-weighted token rewards, normalised per group over its real tokens (module docstring)."""
    mask, outcome = inputs.mask.bool(), _outcomes(inputs)
    entropies = inputs.entropies.detach().double().clamp(min=0.0)  # (B, T)
    advantages = torch.zeros_like(entropies)
    for group in torch.unique(inputs.groups):
        rows = inputs.groups == group
        real, sign = mask[rows], outcome[rows]  # (G, T), (G,)
        if not (bool((sign > 0).any()) and bool((sign < 0).any())):
            continue  # no success or no failure: no reward signal
        success, failure = real & (sign > 0)[:, None], real & (sign < 0)[:, None]
        rewards = _entropy_weighted(sign[:, None], entropies[rows], success, failure, settings)  # (G, T)
        advantages[rows] = _normalised(rewards, real)
    return TokenRuleEffect(touched=mask & (advantages != 0), advantages=advantages)


@register_token_rule("grpo_s")
def grpo_s(inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect:
    """GRPO-S: the same per sequence, with each completion's mean token entropy (module docstring)."""
    mask, outcome = inputs.mask.bool(), _outcomes(inputs)
    lengths = mask.sum(1)  # (B,)
    entropies = (inputs.entropies.detach().double().clamp(min=0.0) * mask).sum(1) / lengths.clamp(min=1)  # (B,)
    sequence = torch.zeros_like(entropies)  # (B,)
    for group in torch.unique(inputs.groups):
        rows = inputs.groups == group
        sign = outcome[rows]
        if not (bool((sign > 0).any()) and bool((sign < 0).any())):
            continue
        present = lengths[rows] > 0
        success, failure = present & (sign > 0), present & (sign < 0)
        rewards = _entropy_weighted(sign, entropies[rows], success, failure, settings)  # (G,)
        sequence[rows] = _normalised(rewards, present)
    advantages = sequence[:, None].expand_as(mask).masked_fill(~mask, 0.0)
    return TokenRuleEffect(touched=mask & (advantages != 0), advantages=advantages)


def kl_cov_penalty(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, penalty: torch.Tensor, coef: float
) -> torch.Tensor:
    """(B, T) per-token term KL-Cov adds to the policy loss: ``coef * |log p - log p_old|`` on the penalised
    tokens, 0 elsewhere (gradient through ``log_probs``)."""
    return coef * (log_probs - old_log_probs).abs() * penalty.to(log_probs.dtype)


def apply_rule(name: str, inputs: TokenRuleInputs, settings: TokenRulesConfig) -> TokenRuleEffect | None:
    """The effect of the rule ``name`` (None for ``none``)."""
    return None if name == "none" else TOKEN_RULES[name](inputs, settings)
