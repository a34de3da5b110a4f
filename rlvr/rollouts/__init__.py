"""How completions are produced: the generation side of a training step.

TRL's ``GRPOTrainer`` samples the completions of a generation batch; :class:`rlvr.rollouts.batch.Rollouts`
is what ``ForkingGRPOTrainer``'s generation overrides delegate to. It samples i.i.d. (TRL's) or as forking
trees (:mod:`rlvr.rollouts.tree`, configured by :class:`RolloutConfig`), records the routing of MoE policies
for routing replay (:mod:`rlvr.rollouts.routing`), tags each row with its prompt group and measures what
sampling cost. The rollout engine with numerics of its own (:mod:`rlvr.rollouts.copy_engine`), the layout
of an engine's routed experts (:mod:`rlvr.rollouts.engine_routing`) and the mismatch metrics
(:mod:`rlvr.rollouts.mismatch`) live here too. Code that changes *what is sampled* belongs in this package,
not in the trainer. May import tuning, moe, rewards, data, models and utils (no TRL).
"""

from rlvr.rollouts.batch import GROUP_IDS_KEY, ROUTING_KEY, Rollouts
from rlvr.rollouts.config import RolloutConfig
from rlvr.rollouts.routing import ReplayRecorder

__all__ = ["GROUP_IDS_KEY", "ROUTING_KEY", "ReplayRecorder", "RolloutConfig", "Rollouts"]
