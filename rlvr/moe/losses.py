"""Router losses over a chosen set of token positions.

* Load balancing (Switch Transformer, Fedus et al., 2021, eqs. 4-6; the form Mixtral and transformers
  use): ``E * sum_e f_e * P_e``, where ``f_e`` is the share of top-k assignments that go to expert e
  and ``P_e`` the mean routing probability of e, both pooled over layers and over the chosen tokens.
  With every non-padding token chosen it equals transformers' ``load_balancing_loss_func``.
* Router z-loss (ST-MoE, Zoph et al., 2022, eq. 5): mean over chosen tokens of ``logsumexp(logits)^2``,
  averaged over layers; keeps router logits small and routing numerically stable.

Both take an optional ``sum_across_ranks`` (an all-reduce sum). With it, the token statistics are pooled
over every rank's tokens before the loss is formed: global-batch balancing (Qiu et al., 2025, "Demons in
the Detail: On Implementing Load Balancing Loss for Training Specialized Mixture-of-Expert Models"), which
they found lets experts specialise more than balancing each rank's few sequences. Each rank's returned loss
is scaled so that the mean over ranks (what gradient averaging and TRL's logged loss take) is the loss of
the pooled batch, value and gradient: a run's router losses do not depend on how many processes share it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SumAcrossRanks = Callable[[torch.Tensor], torch.Tensor]  # all-reduce sum of a detached tensor


def load_balancing_loss(
    probabilities: list[torch.Tensor],
    indices: list[torch.Tensor],
    token_weights: torch.Tensor,
    sum_across_ranks: SumAcrossRanks | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch-style load-balancing loss over the tokens with non-zero ``token_weights``.

    Args:
        probabilities: per layer (N, E) routing distribution (with gradient).
        indices: per layer (N, k) chosen experts.
        token_weights: (N,) 0/1 (or fractional) weight of each token; all zero gives 0, not NaN.
        sum_across_ranks, world_size: pool the statistics over ranks (global-batch balancing; see the
            module docstring); None = this rank's tokens only.

    Returns:
        ``(loss to back-propagate on this rank, value of the loss over the pooled tokens)``, the value a
        detached 0-d tensor (no host read).
    """
    num_experts = probabilities[0].shape[-1]
    weights = token_weights.reshape(-1).to(torch.float32)
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    probability_sum = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    rows = weights.new_zeros(())
    for layer_probabilities, layer_indices in zip(probabilities, indices, strict=True):
        top_k = layer_indices.shape[-1]
        assignments = assignments.scatter_add(0, layer_indices.reshape(-1), weights.repeat_interleave(top_k))
        probability_sum = probability_sum + (layer_probabilities.float() * weights.unsqueeze(-1)).sum(dim=0)
        rows = rows + weights.sum()
    if sum_across_ranks is not None:  # one collective: [assignments (E), probability sums (E), rows (1)]
        pooled = sum_across_ranks(torch.cat([assignments, probability_sum.detach(), rows.reshape(1)]))
        assignments, pooled_probability, rows = pooled[:num_experts], pooled[num_experts:-1], pooled[-1]
    else:
        world_size, pooled_probability = 1, probability_sum.detach()
    rows = torch.where(rows > 0, rows, 1.0)  # no tokens: every sum is 0, and so is the loss (graph kept, no NaN)
    shares = assignments / rows  # (E,) share of top-k assignments, counts carry no gradient
    value = num_experts * torch.sum(shares * pooled_probability / rows)
    # sum over ranks of this rank's probability sums / pooled rows = pooled P; x world_size undoes the mean
    return world_size * num_experts * torch.sum(shares * (probability_sum / rows)), value


def router_z_loss(
    logits: list[torch.Tensor],
    token_weights: torch.Tensor,
    sum_across_ranks: SumAcrossRanks | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over chosen tokens and layers of ``logsumexp(router_logits)^2``.

    Returns ``(loss to back-propagate on this rank, value over the pooled tokens)``; pooling as in
    :func:`load_balancing_loss`.
    """
    weights = token_weights.reshape(-1).to(torch.float32)
    total = weights.sum()
    per_layer = [(torch.logsumexp(layer.float(), dim=-1).square() * weights).sum() for layer in logits]
    local_sum = torch.stack(per_layer).mean()  # mean over layers of the per-layer sums over tokens
    if sum_across_ranks is not None:
        pooled = sum_across_ranks(torch.stack([local_sum.detach(), total]))
        pooled_sum, total = pooled[0], pooled[1]
    else:
        world_size, pooled_sum = 1, local_sum.detach()
    total = torch.where(total > 0, total, 1.0)  # no tokens: the sums are 0, and so is the loss
    return world_size * local_sum / total, pooled_sum / total
