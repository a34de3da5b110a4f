"""The ``rlvr`` command line: the parser and the table of commands (``main.py``), what each command does
(``commands.py``), ``rlvr launch`` building an accelerate + DeepSpeed command (``launch.py``) and the clean end
of a multi-process run (``shutdown.py``). The top layer: it may import every other package; nothing imports it.
"""

from rlvr.cli.main import main

__all__ = ["entry_point", "main"]


def entry_point() -> None:
    """The ``rlvr`` console script."""
    from rlvr.cli.main import entry_point as run

    run()
