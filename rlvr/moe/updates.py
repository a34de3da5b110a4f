"""Router-aware updates for one training forward: gates, scoped router losses, analytics.

:class:`RouterAwareUpdates` turns a :class:`rlvr.moe.config.MoEConfig` into actions on a forward recorded by
:class:`rlvr.moe.hooks.RoutingHooks`. A trainer calls :meth:`begin` before its loss forward and
:meth:`finish` once the forking tokens of that forward are known (before backward). Plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from rlvr.moe.config import MoEConfig
from rlvr.moe.hooks import ForwardRouting, RoutingHooks
from rlvr.moe.losses import SumAcrossRanks, load_balancing_loss, router_z_loss
from rlvr.moe.positions import decision_positions
from rlvr.moe.stats import routing_by_layer, summarize


def correction_bias(layer) -> torch.Tensor | None:
    """The aux-loss-free correction bias of a router: on the router (DeepSeek-V3, GLM-4.5, dots1), in its
    ``moe_statics`` (ERNIE-4.5) or on the block (MiniMax-M2); None for routers without one."""
    for holder in (layer.router, getattr(layer.router, "moe_statics", None), layer.block):
        bias = getattr(holder, "e_score_correction_bias", None)
        if bias is not None:
            return bias
    return None


class RouterAwareUpdates:
    """Gates, router losses and routing analytics of an MoE policy, as its :class:`MoEConfig` asks."""

    def __init__(
        self, model: nn.Module, config: MoEConfig, sum_across_ranks: SumAcrossRanks | None = None, world_size: int = 1
    ):
        """``sum_across_ranks`` (an all-reduce sum) pools router-loss statistics over ``world_size`` ranks
        when ``config.router_loss_batch == "global"``; every rank must then call :meth:`finish` in step."""
        self.config = config
        pooled = config.router_loss_batch == "global" and world_size > 1 and sum_across_ranks is not None
        self._pooling = {"sum_across_ranks": sum_across_ranks, "world_size": world_size} if pooled else {}
        self.hooks = RoutingHooks(
            model,
            gate_routers=config.router_gate_scope != "all",
            gate_experts=config.expert_gate_scope != "all",
        )
        self.layers = self.hooks.layers
        # Per-layer expert loads accumulated on the device between logging steps: {"forking"|"other":
        # (layers, E) sums of the forwards that had such tokens, and how many forwards that was}
        self._load_sums: dict[str, torch.Tensor] = {}
        self._load_counts: dict[str, torch.Tensor] = {}
        # Aux-loss-free balancing (DeepSeek-V3, Liu et al., 2024, sec. 2.1.2): expert loads of the completion
        # tokens since the last optimizer step, per layer with a correction bias.
        self._biased = [layer for layer in self.layers if correction_bias(layer) is not None]
        self._biased_positions = [layer.index for layer in self._biased]  # their place in a forward's records
        if config.update_correction_bias and not self._biased:
            raise ValueError("moe.update_correction_bias: this model's routers have no correction bias")
        self._bias_loads: torch.Tensor | None = None  # (biased layers, E) on the routers' device, float32 counts

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.router.parameters()]

    def freeze_routers(self) -> None:
        for parameter in self.router_parameters():
            parameter.requires_grad_(False)

    def begin(self, batch: int, length: int, forced: torch.Tensor | None = None) -> None:
        self.hooks.begin(batch, length, forced)

    def abort(self) -> None:
        self.hooks.release()

    def release(self) -> None:
        """Call after the backward of the training forward (replay and gates stay on until then)."""
        self.hooks.release()

    def finish(
        self,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        keep: torch.Tensor,
        analytics: bool,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Set the gates of the recorded forward and return ``(router loss to add, metrics)``, the metrics as
        0-d device tensors (nothing here reads a value to the host).

        Args:
            attention_mask: (B, L) real (non-padding) positions of the forward's input.
            loss_mask: (B, C) completion tokens in the loss.
            keep: (B, C) forking tokens.
        """
        routing: ForwardRouting | None = self.hooks.end()
        if routing is None or not routing.logits:
            return None, {}
        length = attention_mask.shape[1]
        completion = decision_positions(loss_mask, length)  # (B, L)
        forking = decision_positions(keep & loss_mask.bool(), length)  # (B, L)
        scopes = {"all": attention_mask.bool(), "completion": completion, "forking": forking}

        config = self.config
        routing.router_gate.set(
            None if config.router_gate_scope == "all" else scopes[config.router_gate_scope], config.router_gate_outside
        )
        routing.expert_gate.set(
            None if config.expert_gate_scope == "all" else scopes[config.expert_gate_scope], config.expert_gate_outside
        )

        probabilities = [
            layer.adapter.router_probabilities(logits)
            for layer, logits in zip(self.layers, routing.logits, strict=True)
        ]
        if config.update_correction_bias and torch.is_grad_enabled():
            self._count_bias_loads(routing.indices, completion.reshape(-1))
        loss, metrics = None, {}
        if config.load_balancing_coef > 0 and config.load_balancing_scope != "none":
            balance, value = load_balancing_loss(
                probabilities, routing.indices, scopes[config.load_balancing_scope].reshape(-1), **self._pooling
            )
            loss = config.load_balancing_coef * balance
            metrics["moe/load_balancing_loss"] = value
        if config.z_loss_coef > 0 and config.z_loss_scope != "none":
            z_loss, value = router_z_loss(routing.logits, scopes[config.z_loss_scope].reshape(-1), **self._pooling)
            loss = config.z_loss_coef * z_loss if loss is None else loss + config.z_loss_coef * z_loss
            metrics["moe/z_loss"] = value
        if analytics:
            layers = routing_by_layer(
                routing.indices,
                probabilities,
                forking.reshape(-1),
                completion.reshape(-1),
                live_indices=routing.live_indices or None,
                sum_across_ranks=self._pooling.get("sum_across_ranks"),  # every rank's tokens, as one batch
            )
            metrics.update(summarize(layers))
            for name, loads in (("forking", layers.load_forking), ("other", layers.load_other)):
                present = ~loads.isnan().any()  # a forward without such tokens adds nothing
                if name not in self._load_sums:
                    self._load_sums[name] = torch.zeros_like(loads)
                    self._load_counts[name] = torch.zeros((), dtype=torch.int64, device=loads.device)
                self._load_sums[name] += torch.where(present, loads, 0.0)
                self._load_counts[name] += present
        return loss, metrics

    def _count_bias_loads(self, indices: list[torch.Tensor], tokens: torch.Tensor) -> None:
        """Add the experts chosen for ``tokens`` (N,) bool to each biased layer's load (on the device)."""
        for row, position in enumerate(self._biased_positions):
            chosen = indices[position]  # (N, k)
            if self._bias_loads is None:
                self._bias_loads = torch.zeros(len(self._biased), self.hooks.num_experts, device=chosen.device)
            weights = tokens.to(chosen.device, torch.float32).repeat_interleave(chosen.shape[-1])  # (N * k,)
            self._bias_loads[row].scatter_add_(0, chosen.reshape(-1).long(), weights)

    @torch.no_grad()
    def update_correction_bias(self) -> None:
        """After an optimizer step: ``bias += rate * sign(mean load - load)`` per expert, from the loads since
        the last step (summed over ranks when router losses pool globally); then start counting again."""
        if not self.config.update_correction_bias:
            return
        loads = self._bias_loads
        if loads is None:  # no tokens counted on this rank (its other ranks may have some)
            loads = torch.zeros(len(self._biased), self.hooks.num_experts, device=self.layers[0].router.weight.device)
        if self._pooling:
            loads = self._pooling["sum_across_ranks"](loads.to(self.layers[0].router.weight.device))
        for row, layer in enumerate(self._biased):
            bias = correction_bias(layer)
            step = self.config.correction_bias_rate * torch.sign(loads[row].mean() - loads[row])  # (E,); 0 if no loads
            bias.add_(step.to(bias.device, bias.dtype).view_as(bias))
        self._bias_loads = None

    def pop_expert_loads(self) -> dict[str, list[list[float]]]:
        """Mean per-layer expert loads since the last call: {"forking"|"other": [[E floats] per layer]}."""
        counts = {name: int(count) for name, count in self._load_counts.items()}  # read once per logging step
        loads = {
            name: (self._load_sums[name] / counts[name]).tolist() for name in ("forking", "other") if counts.get(name)
        }
        self._load_sums.clear()
        self._load_counts.clear()
        return loads
