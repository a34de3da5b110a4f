"""``rlvr.config`` is :mod:`rlvr.run.config` (``RunConfig``, ``load_config``), the same module under its
earlier name, for scripts that import it from here."""

import sys

from rlvr.run import config as _run_config

sys.modules[__name__] = _run_config
