"""Router losses over a chosen set of token positions.

* Load balancing (Switch Transformer, Fedus et al., 2021, eqs. 4-6; the form Mixtral and transformers
  use): ``E * sum_e f_e * P_e``, where ``f_e`` is the share of top-k assignments that go to expert e
  and ``P_e`` the mean routing probability of e, both pooled over layers and over the chosen tokens.
  With every non-padding token chosen it equals transformers' ``load_balancing_loss_func``.
* Router z-loss (ST-MoE, Zoph et al., 2022, eq. 5): mean over chosen tokens of ``logsumexp(logits)^2``,
  averaged over layers; keeps router logits small and routing numerically stable.
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probabilities: list[torch.Tensor], indices: list[torch.Tensor], token_weights: torch.Tensor
) -> torch.Tensor:
    """Switch-style load-balancing loss over the tokens with non-zero ``token_weights``.

    Args:
        probabilities: per layer (N, E) routing distribution (with gradient).
        indices: per layer (N, k) chosen experts.
        token_weights: (N,) 0/1 (or fractional) weight of each token; all zero gives 0, not NaN.
    """
    num_experts = probabilities[0].shape[-1]
    weights = token_weights.reshape(-1).to(torch.float32)
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    probability_sum = torch.zeros(num_experts, dtype=torch.float32, device=weights.device)
    rows = weights.new_zeros(())
    for layer_probabilities, layer_indices in zip(probabilities, indices):
        top_k = layer_indices.shape[-1]
        assignments = assignments.scatter_add(0, layer_indices.reshape(-1), weights.repeat_interleave(top_k))
        probability_sum = probability_sum + (layer_probabilities.float() * weights.unsqueeze(-1)).sum(dim=0)
        rows = rows + weights.sum()
    if float(rows) == 0.0:
        return probability_sum.sum() * 0.0  # keeps the graph, no NaN
    return num_experts * torch.sum((assignments / rows) * (probability_sum / rows))


def router_z_loss(logits: list[torch.Tensor], token_weights: torch.Tensor) -> torch.Tensor:
    """Mean over chosen tokens and layers of ``logsumexp(router_logits)^2``."""
    weights = token_weights.reshape(-1).to(torch.float32)
    total = weights.sum()
    per_layer = [(torch.logsumexp(layer.float(), dim=-1).square() * weights).sum() for layer in logits]
    if float(total) == 0.0:
        return torch.stack(per_layer).sum() * 0.0
    return torch.stack(per_layer).mean() / total
