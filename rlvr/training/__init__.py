"""The components ``ForkingGRPOTrainer`` hands its TRL overrides to, one job each.

* :mod:`rlvr.training.selection`: the state of one loss forward and the forking-token selection across
  ranks, with what is recorded of it (selection metrics, gradient tokens, the forking-token log);
* :mod:`rlvr.training.forwards`: the loss forward through the sparse LM head, and TRL's forward with an
  engine's experts replayed;
* :mod:`rlvr.training.setup`: what the trainer builds once (router-aware updates, the rollout checks, the
  engine behind TRL's vLLM interface, the LM-head choice, the router learning rate, full-checkpoint loads);
* :mod:`rlvr.training.callbacks`: the Trainer callbacks (correction-bias updates, rollout totals kept in
  checkpoints).

A new capability adds a component here and one line in an override, not a block in the trainer.
"""
