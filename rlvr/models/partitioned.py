"""Policies rlvr builds and saves itself under DeepSpeed ZeRO-3 (``zero3_init_flag``).

Under a ZeRO-3 launch transformers builds every model inside ``deepspeed.zero.Init``: each rank holds a
slice of each parameter and the rest are empty (shape 0) tensors. A policy rlvr builds itself (a random tiny
MoE, an upcycled MoE) is built whole instead, so that it is the same policy a one-process run builds; and a
partitioned model (the warm start's, trained under ZeRO-3) is gathered before ``save_pretrained`` reads it,
which otherwise fails on the empty slices (``chunk expects chunks to be greater than 0``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def built_whole() -> Iterator[None]:
    """Models constructed in this block are not partitioned, whatever the launch: transformers' ZeRO-3 switch
    (the DeepSpeed config it holds) is off inside it and restored after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps it here; no public getter exists
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def gathered(parameters: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """The full ``parameters`` within the block when DeepSpeed ZeRO-3 has partitioned them (a collective: every
    rank must enter, in the same order; writes from ``modifier_rank`` kept); a no-op otherwise."""
    if not any(hasattr(p, "ds_id") for p in parameters):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank)


def gathered_whole(model: torch.nn.Module):
    """Every parameter of ``model`` whole on this rank within the block (see :func:`gathered`)."""
    return gathered(list(model.parameters()))


def staging_name(target: Path) -> Path:
    """Where this process builds ``target`` before publishing it: beside it, named by host and process, so
    that a crashed launch's leftovers can be told apart (:func:`remove_stale_staging`)."""
    return target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_stale_staging(directory: Path) -> list[Path]:
    """Remove the staging folders under ``directory`` that a process of this host left when it died (its
    process id no longer runs); returns them. Staging folders of live processes, and of other hosts sharing
    the directory, are kept."""
    prefix = f".tmp-{socket.gethostname()}-"
    removed = []
    for path in directory.glob(f"*{prefix}*") if directory.is_dir() else ():
        pid = path.name.rsplit(prefix, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True
