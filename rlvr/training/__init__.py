"""The components ``ForkingGRPOTrainer`` hands its TRL overrides to, one job each.

* :mod:`rlvr.training.selection`: the state of one loss forward and the forking-token selection across
  ranks, with what is recorded of it (selection metrics, gradient tokens, the forking-token log);
* :mod:`rlvr.training.forwards`: the loss forward through the sparse LM head, and TRL's forward with an
  engine's experts replayed;
* :mod:`rlvr.training.setup`: what the trainer builds once (router-aware updates, the rollout checks, the
  engine behind TRL's vLLM interface, the LM-head choice, the router learning rate, full-checkpoint loads);
* :mod:`rlvr.training.callbacks`: the Trainer callbacks (correction-bias updates; rlvr's state kept in
  checkpoints and loaded from whichever checkpoint a run resumes from);
* :mod:`rlvr.training.generation`, :mod:`rlvr.training.prompt_filter`: a batch produced through the rollouts,
  chosen and refilled by ``prompts.filter``;
* :mod:`rlvr.training.token_rule_step`: an entropy intervention (``token_rules``) applied in the loss forward;
* :mod:`rlvr.training.sparse_head`: the LM head that pays the policy gradient's vocabulary projection for the
  forking tokens only;
* :mod:`rlvr.training.log_records`: what rlvr adds around each TRL log record;
* :mod:`rlvr.training.trl_loading`, :mod:`rlvr.training.vllm_routing`: ZeRO-3 leaves on the models TRL loads
  itself, and the routed experts kept from TRL's vLLM engine (not run against vLLM here).

With the trainer, the only package that imports TRL; it may import every package below it (rollouts, prompts,
tuning, forking, moe, rewards, data, models, utils).

A new capability adds a component here and one line in an override, not a block in the trainer.
"""
