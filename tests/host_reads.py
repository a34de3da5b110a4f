"""Counting host reads: the tensor methods that copy a value to the host (on a GPU, each one waits for every
kernel queued before it), and boolean-mask indexing (its output size is data-dependent: a device sync)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

import rlvr

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
RLVR_DIR = os.path.dirname(rlvr.__file__)


@dataclass(frozen=True)
class Read:
    kind: str  # a method of HOST_READS, or "bool-index"
    file: str  # the caller: the first frame outside torch
    line: int

    @property
    def in_rlvr(self) -> bool:
        return self.file.startswith(RLVR_DIR)


def _caller(depth: int = 2) -> tuple[str, int]:
    frame = sys._getframe(depth)
    while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return (frame.f_code.co_filename, frame.f_lineno) if frame is not None else ("?", 0)


class Reads(list):
    """The :class:`Read` seen so far; nothing is counted inside :meth:`paused`."""

    watching = True

    @contextlib.contextmanager
    def paused(self):
        self.watching = False
        try:
            yield
        finally:
            self.watching = True


@contextlib.contextmanager
def count_host_reads():
    """Yield the :class:`Reads` made from Python while active (reads inside torch's C++ are not seen)."""
    reads = Reads()
    originals = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "__getitem__")}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if reads.watching:
                reads.append(Read(name, *_caller()))
            return original(self, *args, **kwargs)

        return wrapper

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if reads.watching and any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts):
            reads.append(Read("bool-index", *_caller()))
        return originals["__getitem__"](self, index)

    for name in HOST_READS:
        setattr(torch.Tensor, name, counting(name, originals[name]))
    torch.Tensor.__getitem__ = getitem
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
