"""Which prompts a training step spends its generation on (selective rollouts).

A GRPO group whose G rewards are all equal has zero advantage: it gives no gradient, yet its G completions
were decoded in full. :class:`PromptsConfig` (the ``prompts`` section) says what to do about it;
:mod:`rlvr.prompts.groups` finds the groups without reward variance, :mod:`rlvr.prompts.history` predicts
them before sampling (GRESO) and :mod:`rlvr.prompts.assembly` builds a generation batch from the groups that
stay, and :mod:`rlvr.prompts.record` keeps what happened to each prompt. Plain torch: the trainer wires them
into TRL (:mod:`rlvr.training.prompt_filter`). May import :mod:`rlvr.moe` and :mod:`rlvr.utils` (no TRL).
"""

from rlvr.prompts.config import FILTERS, PREDICTORS, PromptsConfig

__all__ = ["FILTERS", "PREDICTORS", "PromptsConfig"]
