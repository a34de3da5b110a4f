"""How completions are produced: the generation side of a training step.

TRL's ``GRPOTrainer`` samples the completions of a generation batch; :class:`rlvr.rollouts.batch.Rollouts`
is what ``ForkingGRPOTrainer``'s generation overrides delegate to. Today it records the routing of MoE
policies while the batch is produced (:mod:`rlvr.rollouts.routing`, for routing replay) and tags each row
with its prompt group. Code that changes *what is sampled* (branching at forking tokens, a rollout engine
with its own numerics) belongs in this package, not in the trainer.
"""

from rlvr.rollouts.batch import GROUP_IDS_KEY, ROUTING_KEY, Rollouts
from rlvr.rollouts.config import RolloutConfig
from rlvr.rollouts.routing import ReplayRecorder

__all__ = ["GROUP_IDS_KEY", "ROUTING_KEY", "ReplayRecorder", "RolloutConfig", "Rollouts"]
