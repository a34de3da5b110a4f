"""Does each domain find "its" expert? Per-layer expert loads of each domain's tokens.

The question Branch-Train-MiX (Sukhbaatar et al., 2024, sec. 4.4) asks of a merged MoE: route the
worked solutions of each domain's problems through the policy (teacher-forced, so every policy sees
the same tokens) and count, per layer, which experts process each domain's solution tokens. Loads are
measured at the decision positions of the solution tokens (the position whose output predicts a
token; see :mod:`rlvr.moe.positions`), as everywhere else in rlvr.moe.

Per layer this gives each domain's load distribution over experts, their Jensen-Shannon divergence
(in bits: 0 = routed alike, 1 = disjoint experts, with two domains) and each domain's top expert.
"""

from __future__ import annotations

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


@torch.no_grad()
def routing_by_domain(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    domains: Sequence[str],
    batch_size: int = 32,
) -> dict:
    """Per-layer expert loads of each domain's completion tokens, teacher-forced.

    Args:
        prompts: rendered prompt texts (chat template applied).
        completions: the text the model is made to read after each prompt (e.g. the gold solution).
        domains: the domain of each pair.

    Returns:
        ``{"domains": [...], "tokens": {domain: n}, "layers": [{"loads": {domain: [E]}, "js_bits": float,
        "top_expert": {domain: int}}, ...], "mean_js_bits": float}``.
    """
    if not (len(prompts) == len(completions) == len(domains)):
        raise ValueError("prompts, completions and domains must have the same length")
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    num_layers, num_experts = len(hooks.layers), hooks.num_experts
    counts: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(num_layers, num_experts, dtype=torch.float64))
    tokens: dict[str, int] = defaultdict(int)
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
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            (recorded,) = hooks.stop_recording()  # (B * L, layers, k) experts of this forward
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
    layers = []
    for layer in range(num_layers):
        loads = {domain: (counts[domain][layer] / counts[domain][layer].sum().clamp_min(1)) for domain in ordered}
        layers.append(
            {
                "loads": {domain: load.tolist() for domain, load in loads.items()},
                "js_bits": _js_bits(list(loads.values())) if len(ordered) > 1 else 0.0,
                "top_expert": {domain: int(load.argmax()) for domain, load in loads.items()},
            }
        )
    return {
        "domains": ordered,
        "tokens": dict(tokens),
        "layers": layers,
        "mean_js_bits": sum(layer["js_bits"] for layer in layers) / max(len(layers), 1),
    }
