"""Ending a rank of a multi-process run: process groups destroyed while Python is alive, then exit.

Left to interpreter shutdown, gloo's worker threads can still release a tensor after Python has
started finalizing; the GIL they then ask for aborts the rank with 'terminate called without an
active exception' (pytorch/pytorch#190489), turning a finished CPU run into a failed launch.
:func:`end_distributed` destroys the process groups after training; :func:`exit_process` then ends a
rank with ``os._exit`` once its ``atexit`` handlers, logs and standard streams are flushed. Scripts of
your own can call both the same way (``tests/library_steps.py`` does).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys

_was_distributed = False  # this process was a rank of a multi-process run


def end_distributed() -> None:
    """Destroy every process group of this process, if one was initialised."""
    global _was_distributed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _was_distributed = True
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """``sys.exit(code)``; a rank of a multi-process run skips interpreter finalization (see above)."""
    if not _was_distributed:
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
