"""How far the sampler's numbers are from the trainer's: log-prob and routing mismatch of one batch.

When completions come from an inference engine (vLLM, SGLang, or any sampler with its own kernels and
precision), the trainer's log-probabilities of the same tokens differ from the sampler's, and for MoE
policies routers choose different experts ("Stabilizing MoE Reinforcement Learning by Aligning
Training and Inference Routers", Ma et al., 2025, arXiv 2510.11370: ~10% of (token, layer) routing
decisions differ between vLLM and the trainer on Qwen3-30B-A3B, 94% of tokens have a flip in some
layer). These functions measure that on one batch, in float64, over the completion tokens only:

* :func:`logprob_mismatch`: per-token KL of the sampler from the trainer (the k3 estimator,
  ``(r - 1) - log r`` with ``r = p_train / p_sample``, on tokens drawn from the sampler: unbiased and
  non-negative; Schulman, 2020), mean and max ``|log p_train - log p_sample|`` (TRL's
  ``sampling/sampling_logp_difference``), and the share of tokens whose ratio ``r`` exceeds 2;
* :func:`routing_flips`: the share of (token, layer) decisions whose top-k expert *set* differs, and of
  tokens with a flip in any layer;
* :func:`importance_sampling_drops`: what TRL's importance-sampling correction (``token_mask`` /
  ``sequence_mask``, the "MIS" of the same paper) masks: the share of tokens or of sequences dropped.

Tokens whose sampling log-prob is NaN (an engine could not score them) are left out, as TRL leaves them
out of its own mismatch metrics. A metric with nothing to measure is absent from the result, never 0.
"""

from __future__ import annotations

import math

import torch


def logprob_mismatch(
    sampling_logps: torch.Tensor, training_logps: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """(B, T) sampler and trainer log-probs of the sampled tokens, (B, T) completion mask.

    Returns ``mismatch/kl_k3`` (mean over tokens), ``mismatch/logp_diff_mean``, ``mismatch/logp_diff_max``
    and ``mismatch/ratio_above_2`` (share of tokens)."""
    log_ratio = training_logps.double() - sampling_logps.double()  # (B, T) log r
    valid = mask.bool() & ~torch.isnan(log_ratio)
    log_ratio = log_ratio[valid]  # (N,)
    if log_ratio.numel() == 0:
        return {}
    k3 = torch.expm1(log_ratio) - log_ratio  # (r - 1) - log r
    return {
        "mismatch/kl_k3": float(k3.mean()),
        "mismatch/logp_diff_mean": float(log_ratio.abs().mean()),
        "mismatch/logp_diff_max": float(log_ratio.abs().max()),
        "mismatch/ratio_above_2": float((log_ratio > math.log(2.0)).double().mean()),
    }


def routing_flips(sampler_experts: torch.Tensor, trainer_experts: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """(B, L, layers, k) experts chosen by the sampler and by the trainer at the same positions, (B, L)
    positions to count (completion tokens the sampler ran; positions a record marks -1 are left out).

    Returns ``mismatch/router_flips`` (share of (token, layer) decisions whose expert set differs) and
    ``mismatch/tokens_with_flip`` (share of tokens with a flip in any layer)."""
    sampler_sorted = torch.sort(sampler_experts.long(), dim=-1).values
    trainer_sorted = torch.sort(trainer_experts.long(), dim=-1).values
    recorded = (sampler_sorted >= 0).all(dim=-1) & (trainer_sorted >= 0).all(dim=-1)  # (B, L, layers)
    decisions = recorded & mask.bool().unsqueeze(-1)  # (B, L, layers)
    if not decisions.any():
        return {}
    flipped = (sampler_sorted != trainer_sorted).any(dim=-1) & decisions  # (B, L, layers)
    tokens = decisions.any(dim=-1)  # (B, L)
    return {
        "mismatch/router_flips": float(flipped.sum()) / float(decisions.sum()),
        "mismatch/tokens_with_flip": float(flipped.any(dim=-1).sum()) / float(tokens.sum()),
    }


def importance_sampling_drops(
    sampling_logps: torch.Tensor,
    training_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> dict[str, float]:
    """The share TRL's masking importance-sampling correction drops: of tokens (``token_mask``) or of
    sequences (``sequence_mask``: the sequence's summed log-ratio), with the ratio outside
    ``[clip_min, clip_max]`` (None: unbounded). Truncating modes drop nothing: ``{}``."""
    if mode not in ("token_mask", "sequence_mask"):
        return {}
    low = math.log(clip_min) if clip_min else -math.inf  # None or 0: no lower bound
    high = math.inf if clip_max is None else math.log(clip_max)
    log_ratio = ((training_logps.double() - sampling_logps.double()) * mask).nan_to_num(0.0)  # (B, T), as TRL
    if mode == "sequence_mask":
        rows = mask.bool().any(dim=1)  # sequences with a completion token
        if not rows.any():
            return {}
        per_sequence = log_ratio.sum(dim=1)[rows]  # (S,)
        dropped = (per_sequence < low) | (per_sequence > high)
        return {"mismatch/is_dropped_sequences": float(dropped.double().mean())}
    valid = mask.bool()
    if not valid.any():
        return {}
    tokens = log_ratio[valid]
    dropped = (tokens < low) | (tokens > high)
    return {"mismatch/is_dropped_tokens": float(dropped.double().mean())}
