"""Routing analytics: how routing on forking tokens differs from routing on the other completion tokens.

For each MoE layer, over the decision positions of one training forward:

* ``load_forking`` / ``load_other`` (E,): share of the top-k assignments that went to each expert,
  for forking tokens and for the other completion tokens (each sums to 1);
* ``specialization``: Jensen-Shannon divergence (base 2, in [0, 1]) between those two loads,
  0 when forking tokens use the experts exactly like the others;
* ``router_entropy_forking`` / ``router_entropy_other``: mean entropy (nats) of the routing
  distribution on each token class;
* ``imbalance``: max expert load x E over all completion tokens (1 = perfectly balanced, E = one expert);
* ``drift`` (with routing replay): share of tokens whose live top-k set differs from the replayed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LayerRouting:
    load_forking: list[float]
    load_other: list[float]
    specialization: float
    router_entropy_forking: float
    router_entropy_other: float
    imbalance: float
    drift: float


def expert_load(indices: torch.Tensor, tokens: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) share of the top-k assignments of the chosen ``tokens`` (N,) bool that go to each expert."""
    chosen = indices[tokens.bool()].reshape(-1)
    if chosen.numel() == 0:
        return torch.full((num_experts,), math.nan, dtype=torch.float64)
    counts = torch.bincount(chosen.long().cpu(), minlength=num_experts).to(torch.float64)
    return counts / counts.sum()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions (NaN if either is undefined)."""
    if torch.isnan(p).any() or torch.isnan(q).any():
        return math.nan
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        nonzero = a > 0
        return (a[nonzero] * torch.log2(a[nonzero] / b[nonzero])).sum()

    return float(0.5 * kl(p, m) + 0.5 * kl(q, m))


def mean_entropy(probabilities: torch.Tensor, tokens: torch.Tensor) -> float:
    rows = probabilities[tokens.bool()].to(torch.float64)
    if rows.shape[0] == 0:
        return math.nan
    return float(-(rows * torch.log(rows.clamp(min=1e-30))).sum(-1).mean())


def layer_routing(
    indices: torch.Tensor,
    probabilities: torch.Tensor,
    forking: torch.Tensor,
    completion: torch.Tensor,
    replayed_indices: torch.Tensor | None = None,
    live_indices: torch.Tensor | None = None,
) -> LayerRouting:
    """Analytics of one layer. ``indices`` (N, k), ``probabilities`` (N, E), ``forking``/``completion`` (N,) bool.

    ``forking`` must be a subset of ``completion``; "other" tokens are completion tokens not forking.
    """
    num_experts = probabilities.shape[-1]
    forking, completion = forking.bool().reshape(-1), completion.bool().reshape(-1)
    other = completion & ~forking
    load_forking = expert_load(indices, forking, num_experts)
    load_other = expert_load(indices, other, num_experts)
    load_all = expert_load(indices, completion, num_experts)
    drift = math.nan
    if replayed_indices is not None and live_indices is not None and bool(completion.any()):
        same = torch.sort(replayed_indices, -1).values == torch.sort(live_indices, -1).values
        drift = float((~same.all(-1))[completion].to(torch.float64).mean())
    return LayerRouting(
        load_forking=load_forking.tolist(),
        load_other=load_other.tolist(),
        specialization=js_divergence(load_forking, load_other),
        router_entropy_forking=mean_entropy(probabilities, forking),
        router_entropy_other=mean_entropy(probabilities, other),
        imbalance=float(load_all.max() * num_experts) if not torch.isnan(load_all).any() else math.nan,
        drift=drift,
    )


@dataclass
class RoutingByLayer:
    """:class:`LayerRouting` of every layer as device tensors: loads (layers, E), the rest (layers,)."""

    load_forking: torch.Tensor
    load_other: torch.Tensor
    specialization: torch.Tensor
    router_entropy_forking: torch.Tensor
    router_entropy_other: torch.Tensor
    imbalance: torch.Tensor
    drift: torch.Tensor | None  # None: routing was not replayed

    def layer(self, index: int) -> LayerRouting:
        """One layer's analytics read to the host."""
        scalars = [self.specialization, self.router_entropy_forking, self.router_entropy_other, self.imbalance]
        drift = math.nan if self.drift is None else float(self.drift[index])
        return LayerRouting(
            self.load_forking[index].tolist(),
            self.load_other[index].tolist(),
            *(float(values[index]) for values in scalars),
            drift,
        )


def routing_by_layer(
    indices: list[torch.Tensor],
    probabilities: list[torch.Tensor],
    forking: torch.Tensor,
    completion: torch.Tensor,
    live_indices: list[torch.Tensor] | None = None,
    sum_across_ranks=None,
) -> RoutingByLayer:
    """:func:`layer_routing` for every layer at once, on the device: masked sums over stacked tensors, no
    boolean indexing and no host read (a trainer reads the metrics once per logging step).

    ``indices`` per layer (N, k) (the experts used), ``probabilities`` per layer (N, E),
    ``forking``/``completion`` (N,) bool, ``live_indices`` per layer (N, k) when routing was replayed.
    ``sum_across_ranks`` (an all-reduce sum; every rank calls this in step): the statistics of every rank's
    tokens, pooled as one batch (expert counts, entropy sums and token counts summed before any ratio), so a
    multi-process run logs what one process holding the whole batch would. Statistics of an empty token class
    are NaN.
    """
    forking, completion = forking.bool().reshape(-1), completion.bool().reshape(-1)
    other = completion & ~forking
    used = torch.stack(indices).long()  # (layers, N, k)
    probs = torch.stack([p.detach().float() for p in probabilities])  # (layers, N, E)
    layers, _, top_k = used.shape
    num_experts = probs.shape[-1]

    def counts(tokens: torch.Tensor) -> torch.Tensor:  # (layers, E) top-k assignments of the tokens per expert
        weights = tokens.to(torch.float32).repeat_interleave(top_k).expand(layers, -1)  # (layers, N * k)
        return torch.zeros(layers, num_experts, device=used.device).scatter_add_(1, used.reshape(layers, -1), weights)

    router_entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum(-1)  # (layers, N)
    sums = [counts(forking), counts(other), counts(completion)]  # 3 x (layers, E)
    sums += [(router_entropy * forking).sum(-1), (router_entropy * other).sum(-1)]  # 2 x (layers,)
    sums += [torch.stack([forking.sum(), other.sum(), completion.sum()]).to(torch.float32).to(used.device)]  # (3,)
    if live_indices is not None:
        live = torch.stack(live_indices).long().to(used.device)
        differs = ~(torch.sort(used, -1).values == torch.sort(live, -1).values).all(-1)  # (layers, N)
        sums.append((differs & completion).sum(-1).to(torch.float32))  # (layers,)
    if sum_across_ranks is not None:
        sizes = [part.numel() for part in sums]
        pooled = sum_across_ranks(torch.cat([part.reshape(-1) for part in sums]))
        sums = [piece.view_as(part) for piece, part in zip(pooled.split(sizes), sums, strict=True)]
    count_forking, count_other, count_all, entropy_forking, entropy_other, tokens = sums[:6]

    def loads(assignments: torch.Tensor) -> torch.Tensor:  # (layers, E), rows sum to 1 (NaN if no tokens)
        return assignments / assignments.sum(-1, keepdim=True)

    load_forking, load_other, load_all = loads(count_forking), loads(count_other), loads(count_all)
    mixture = 0.5 * (load_forking + load_other)

    def kl_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.where(p > 0, p * torch.log2(p / q.clamp(min=1e-30)), torch.zeros_like(p)).sum(-1)

    specialization = 0.5 * kl_bits(load_forking, mixture) + 0.5 * kl_bits(load_other, mixture)
    # kl_bits skips NaN entries (p > 0 is False): an empty class must still give NaN
    specialization = torch.where(load_forking.isnan().any(-1) | load_other.isnan().any(-1), math.nan, specialization)
    return RoutingByLayer(
        load_forking=load_forking,
        load_other=load_other,
        specialization=specialization,
        router_entropy_forking=entropy_forking / tokens[0],
        router_entropy_other=entropy_other / tokens[1],
        imbalance=load_all.amax(-1) * num_experts,
        drift=sums[6] / tokens[2] if live_indices is not None else None,  # NaN without completion tokens
    )


def summarize(routing: RoutingByLayer) -> dict[str, torch.Tensor]:
    """Metrics for logging as 0-d device tensors: means over layers (NaN-aware, NaN when every layer is)
    plus the specialisation of each layer; ``moe/routing_drift`` only when routing was replayed."""
    metrics = {
        "moe/specialization_js": torch.nanmean(routing.specialization),
        "moe/router_entropy_forking": torch.nanmean(routing.router_entropy_forking),
        "moe/router_entropy_other": torch.nanmean(routing.router_entropy_other),
        "moe/load_imbalance": torch.nanmean(routing.imbalance),
    }
    if routing.drift is not None:
        metrics["moe/routing_drift"] = torch.nanmean(routing.drift)
    for index, value in enumerate(routing.specialization):
        metrics[f"moe/layer{index}/specialization_js"] = value
    return metrics
