"""Per-token gradient gates: identity in the forward, a per-position scale in the backward.

A gate multiplies the gradient that reaches a tensor laid out over token positions (router outputs
(N, .) with N = B * L, an MoE block's output (B, L, H), or experts run on every token, (E * N, H) in
expert-major order as Llama 4 lays them out) by a weight per position. The weights are
read from a :class:`GateWeights` holder *at backward time*, because the forking-token mask is only
known after the forward (TRL computes entropies in the same forward as the loss).
"""

from __future__ import annotations

import torch


class GateWeights:
    """Mutable holder of the (B, L) gradient weights of one gate for the forward being trained on.

    ``weights = None`` means "no gate" (the gradient passes unchanged, bit for bit).
    """

    def __init__(self, name: str):
        self.name = name
        self.weights: torch.Tensor | None = None  # (B, L) float

    def set(self, in_scope: torch.Tensor | None, outside_weight: float) -> None:
        """In-scope positions get weight 1, the others ``outside_weight``; ``in_scope=None``: no gate."""
        if in_scope is None:
            self.weights = None
        else:
            self.weights = outside_weight + (1.0 - outside_weight) * in_scope.to(torch.float32)

    def clear(self) -> None:
        self.weights = None


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, holder: GateWeights) -> torch.Tensor:
        ctx.holder = holder
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights = ctx.holder.weights  # read now: set after the forward, before backward
        if weights is None:
            return grad, None
        if grad.dim() == 2:  # (N, X) router outputs, or experts run on every token, expert-major (E * N, X)
            scale = weights.reshape(-1).repeat(max(grad.shape[0] // weights.numel(), 1)).reshape(-1, 1)
        else:  # (B, L, H) block output
            scale = weights.reshape(*grad.shape[:2], *([1] * (grad.dim() - 2)))
        if scale.shape[0] != grad.shape[0]:
            raise RuntimeError(
                f"gate {ctx.holder.name}: weights cover {weights.numel()} positions, the gradient {tuple(grad.shape)}"
            )
        return grad * scale.to(device=grad.device, dtype=grad.dtype), None


def gate_gradient(values: torch.Tensor, holder: GateWeights) -> torch.Tensor:
    """``values`` unchanged; its gradient scaled per position by ``holder.weights`` at backward time."""
    if not (torch.is_grad_enabled() and values.requires_grad):
        return values
    return _ScaleGradient.apply(values, holder)
