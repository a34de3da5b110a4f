"""One training run, top to bottom: the run's config (``config.py``: ``RunConfig``, its sections and the rules
tying them), the recipe (``recipe.py``: data, rewards, policy, warm start, evaluation, ``ForkingGRPOTrainer``,
outputs), the supervised warm start of tiny policies (``warm_start.py``), held-out evaluation
(``evaluation.py``), the run directory (``directory.py``), the recipe's Trainer callbacks (``callbacks.py``),
complete checkpoints (``checkpoints.py``) and compact progress bars (``progress.py``). Inside, each module
imports only those listed after it here in ARCHITECTURE.md's layer table; the package imports the trainer and
everything below it, and the experiment and the command line import it.
"""
