"""Does each domain find "its" expert? Per-layer expert loads of each domain's tokens.

The question Branch-Train-MiX (Sukhbaatar et al., 2024, sec. 4.4) asks of a merged MoE: route the
worked solutions of each domain's problems through the policy (teacher-forced, so every policy sees
the same tokens) and count, per layer, which experts process each domain's solution tokens. Loads are
measured at the decision positions of the solution tokens (the position whose output predicts a
token; see :mod:`rlvr.moe.positions`), as everywhere else in rlvr.moe.

Per layer this gives each domain's load distribution over experts, their Jensen-Shannon divergence
(in bits: 0 = routed alike, 1 = disjoint experts, with two domains) and each domain's top expert.

A measure a reader can picture: each domain's **own expert** is the one the one-to-one matching of
domains to experts that fits the top-1 choices best gives it (the same rule for every init, so BTX's
merge order is not assumed); the **own share** is the share of a domain's tokens whose top-1 expert is
its own, averaged over domains. With two domains 0.5 means routed alike and 1.0 means each domain
wholly on its own expert. It is also measured on the forking tokens (the top ``rho`` of solution tokens
by the policy's entropy, Wang et al., 2025) and on the others, with the same matching.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from rlvr.moe.hooks import RoutingHooks
from rlvr.moe.positions import decision_positions


def _js_bits(distributions: list[torch.Tensor]) -> float:
    """Jensen-Shannon divergence (base 2) of several distributions with equal weights."""
    stacked = torch.stack(distributions).double()  # (D, E)
    mixture = stacked.mean(0)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log2(p.clamp_min(1e-300))).sum(-1)

    return float(entropy(mixture) - entropy(stacked).mean())


def own_experts(top1_loads: dict[str, torch.Tensor]) -> dict[str, int]:
    """The one-to-one matching of domains to experts that maximises the summed top-1 share (exhaustive:
    domains are few). ``top1_loads``: per domain, the (E,) share of its tokens whose top-1 expert is each."""
    domains = list(top1_loads)
    num_experts = len(next(iter(top1_loads.values())))
    if len(domains) > num_experts:
        return {}
    best = max(
        itertools.permutations(range(num_experts), len(domains)),
        key=lambda experts: sum(float(top1_loads[d][e]) for d, e in zip(domains, experts, strict=True)),
    )
    return dict(zip(domains, best, strict=True))


def _own_share(
    top1: torch.Tensor, of_domain: dict[str, torch.Tensor], own: dict[str, int], subset: torch.Tensor
) -> float:
    """Mean over domains of the share of the ``subset`` of a domain's tokens (``of_domain``: (tokens,) masks)
    that pick its own expert first (NaN when a domain has no such token)."""
    shares = []
    for domain, expert in own.items():
        rows = subset & of_domain[domain]
        if not rows.any():
            return math.nan
        shares.append(float((top1[rows] == expert).double().mean()))
    return sum(shares) / len(shares)


def _mean(values: list[float]) -> float:
    values = [value for value in values if not math.isnan(value)]
    return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def routing_by_domain(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    domains: Sequence[str],
    batch_size: int = 32,
    rho: float = 0.2,
) -> dict:
    """Per-layer expert loads of each domain's completion tokens, teacher-forced.

    Args:
        prompts: rendered prompt texts (chat template applied).
        completions: the text the model is made to read after each prompt (e.g. the gold solution).
        domains: the domain of each pair.

    Returns:
        ``{"domains": [...], "tokens": {domain: n}, "layers": [{"loads": {domain: [E]}, "js_bits": float,
        "top_expert": {domain: int}, "own_expert": {domain: int}, "own_share": float, "own_share_forking":
        float, "own_share_other": float}, ...], "mean_js_bits": float, "mean_own_share": float, ...}``;
        ``rho``: the share of solution tokens (all domains pooled) counted as forking.
    """
    if not (len(prompts) == len(completions) == len(domains)):
        raise ValueError("prompts, completions and domains must have the same length")
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    num_layers, num_experts = len(hooks.layers), hooks.num_experts
    counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(num_layers, num_experts, dtype=torch.float64))
    tokens: dict[str, int] = defaultdict(int)
    top1_rows, entropy_rows, token_domains = [], [], []  # per solution token: (layers,) experts, entropy, domain
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            tokenizer.padding_side = "left"
            prompt = tokenizer(list(prompts[chunk]), return_tensors="pt", padding=True, add_special_tokens=False)
            tokenizer.padding_side = "right"
            completion = tokenizer(
                list(completions[chunk]), return_tensors="pt", padding=True, add_special_tokens=False
            )
            input_ids = torch.cat([prompt["input_ids"], completion["input_ids"]], 1).to(device)  # (B, P + C)
            attention_mask = torch.cat([prompt["attention_mask"], completion["attention_mask"]], 1).to(
                device
            )  # (B, P + C)
            positions = decision_positions(completion["attention_mask"], input_ids.shape[1]).cpu()  # (B, L)
            # positions counted from each row's first real token, so that padding does not shift them
            position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)  # (B, L)
            hooks.start_recording()
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            (recorded,) = hooks.stop_recording()  # (B * L, layers, k) experts of this forward
            log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, L, V)
            entropy = -(log_probs.exp() * log_probs).sum(-1).cpu()  # (B, L)
            flat = positions.reshape(-1)  # (B * L,)
            top1_rows.append(recorded[flat.to(recorded.device), :, 0].cpu())  # (tokens, layers)
            entropy_rows.append(entropy.reshape(-1)[flat])  # (tokens,)
            token_domains += [
                label for label, row in zip(domains[chunk], positions, strict=True) for _ in range(int(row.sum()))
            ]
            for domain in dict.fromkeys(domains[chunk]):
                of_domain = torch.tensor([label == domain for label in domains[chunk]])  # (B,)
                rows = (positions & of_domain[:, None]).reshape(-1)  # (B * L,)
                tokens[domain] += int(rows.sum())
                for layer in range(num_layers):
                    chosen = recorded[rows.to(recorded.device), layer].reshape(-1)  # (tokens * k,)
                    counts[domain][layer] += torch.bincount(chosen.cpu(), minlength=num_experts).double()
    finally:
        hooks.remove()
        tokenizer.padding_side = padding_side
        model.train(was_training)
    ordered = list(dict.fromkeys(domains))
    top1 = torch.cat(top1_rows) if top1_rows else torch.zeros(0, num_layers, dtype=torch.long)  # (tokens, layers)
    entropies = torch.cat(entropy_rows) if entropy_rows else torch.zeros(0)  # (tokens,)
    forking = torch.zeros(len(entropies), dtype=torch.bool)  # (tokens,) the top rho by entropy
    forking[torch.argsort(entropies, descending=True, stable=True)[: math.ceil(rho * len(entropies))]] = True
    everything = torch.ones(len(entropies), dtype=torch.bool)  # (tokens,)
    of_domain = {
        domain: torch.tensor([label == domain for label in token_domains], dtype=torch.bool) for domain in ordered
    }
    layers = []
    for layer in range(num_layers):
        loads = {domain: (counts[domain][layer] / counts[domain][layer].sum().clamp_min(1)) for domain in ordered}
        top1_loads = {
            domain: torch.bincount(top1[of_domain[domain], layer], minlength=num_experts).double() for domain in ordered
        }
        own = own_experts({domain: load / load.sum().clamp_min(1) for domain, load in top1_loads.items()})
        layers.append(
            {
                "loads": {domain: load.tolist() for domain, load in loads.items()},
                "js_bits": _js_bits(list(loads.values())) if len(ordered) > 1 else 0.0,
                "top_expert": {domain: int(load.argmax()) for domain, load in loads.items()},
                "own_expert": own,
                "own_share": _own_share(top1[:, layer], of_domain, own, everything) if own else math.nan,
                "own_share_forking": _own_share(top1[:, layer], of_domain, own, forking) if own else math.nan,
                "own_share_other": _own_share(top1[:, layer], of_domain, own, ~forking) if own else math.nan,
            }
        )
    return {
        "domains": ordered,
        "tokens": dict(tokens),
        "layers": layers,
        "mean_js_bits": sum(layer["js_bits"] for layer in layers) / max(len(layers), 1),
        "forking_rho": rho,
        "mean_own_share": _mean([layer["own_share"] for layer in layers]),
        "mean_own_share_forking": _mean([layer["own_share_forking"] for layer in layers]),
        "mean_own_share_other": _mean([layer["own_share_other"] for layer in layers]),
    }
