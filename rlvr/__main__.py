"""``python -m rlvr ...`` is ``rlvr ...``."""

from rlvr.cli import entry_point

entry_point()
