"""``python -m rlvr ...`` is ``rlvr ...``."""

from rlvr.cli.main import entry_point

entry_point()
