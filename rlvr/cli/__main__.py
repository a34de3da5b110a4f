"""``python -m rlvr.cli ...`` is ``rlvr ...`` (the form ``accelerate launch -m`` runs)."""

from rlvr.cli.main import entry_point

entry_point()
