"""The ``moe`` config section: router-aware updates and routing analytics of an MoE policy.

Gates and token-scoped router losses act on the positions whose next token is a completion
(``completion``) or a forking token (``forking``); see :class:`rlvr.moe.updates.RouterAwareUpdates`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlvr.utils.options import option, require

GATE_SCOPES = ("all", "completion", "forking")
ROUTER_LOSS_SCOPES = ("none", "all", "completion", "forking")
REPLAY_SOURCES = ("none", "old_policy", "rollout")


@dataclass
class MoEConfig:
    router_gate_scope: str = option(
        "all", "positions whose router gradient is kept: all, completion decisions, or forking decisions", GATE_SCOPES
    )
    router_gate_outside: float = option(0.0, "router-gradient weight of positions outside router_gate_scope (0 = none)")
    expert_gate_scope: str = option(
        "all", "positions whose MoE-block-output gradient is kept (same choices as router_gate_scope)", GATE_SCOPES
    )
    expert_gate_outside: float = option(0.0, "expert-gradient weight of positions outside expert_gate_scope")
    load_balancing_coef: float = option(0.0, "coefficient of rlvr's load-balancing loss (Switch form); 0 = off")
    load_balancing_scope: str = option("completion", "tokens the load-balancing loss covers", ROUTER_LOSS_SCOPES)
    z_loss_coef: float = option(0.0, "coefficient of the router z-loss (ST-MoE); 0 = off")
    z_loss_scope: str = option("completion", "tokens the router z-loss covers", ROUTER_LOSS_SCOPES)
    router_loss_batch: str = option(
        "global",
        "tokens the router losses pool: global (every rank's micro-batch; Qiu et al. 2025, same loss at any "
        "process count) or local (each rank's own, as transformers' aux loss)",
        ("global", "local"),
    )
    router_lr_multiplier: float = option(1.0, "router learning rate = grpo.learning_rate x this")
    freeze_router: bool = option(False, "do not train the routers at all")
    routing_replay: str = option(
        "none",
        "force recorded experts in training forwards: none, old_policy (recorded in TRL's old-policy forward), "
        "rollout (the experts the sampler chose: generate, the copy engine, or vLLM with routed experts returned)",
        REPLAY_SOURCES,
    )
    analytics: bool = option(True, "log routing on forking vs other tokens (MoE models)")
    update_correction_bias: bool = option(
        False,
        "DeepSeek-V3-style routers: update the aux-loss-free correction bias during RL (off: RL frameworks "
        "such as NeMo-RL set its update rate to 0 for GRPO)",
    )
    correction_bias_rate: float = option(
        1e-3, "bias update per optimizer step: +rate for under-loaded experts, -rate for over-loaded (DeepSeek-V3)"
    )

    def validate(self) -> None:
        for name in ("router_gate_outside", "expert_gate_outside"):
            require(0.0 <= getattr(self, name) <= 1.0, name, f"must be in [0, 1]; got {getattr(self, name)}")
        for name in ("load_balancing_coef", "z_loss_coef"):
            require(getattr(self, name) >= 0.0, name, "must be >= 0")
        require(
            self.router_lr_multiplier > 0.0, "router_lr_multiplier", "must be > 0 (use moe.freeze_router to freeze)"
        )

    def is_default(self) -> bool:
        return self == MoEConfig()

    def needs_recorded_routing(self) -> bool:
        """Whether the loss forward must record its routing (gates, router losses or replay are on)."""
        return (
            self.router_gate_scope != "all"
            or self.expert_gate_scope != "all"
            or self.load_balancing_coef > 0
            or self.z_loss_coef > 0
            or self.routing_replay != "none"
        )
