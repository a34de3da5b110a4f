"""Every cross-rank collective rlvr issues, in one place.

Two rules that a CPU test over gloo does not enforce by itself:

* NCCL, the backend of multi-GPU runs, serves CUDA tensors only. Each tensor is moved to the accelerator's
  device for the collective and the result moved back to where the caller's tensor lives.
* Every rank must issue the same collectives, in the same order, with the same dtypes and shapes. Padding
  keeps the dtype (accelerate's ``pad_across_processes`` builds ``new_zeros(...) + pad_index``, which turns
  a bool mask into int64 on the ranks that pad and not on the others), the shapes are agreed by one
  collective of their own first, and nothing here branches on a rank's data.

On one process (:class:`OneProcess`) every method is the identity and issues nothing. No other rlvr module
calls a collective (``tests/test_collectives.py`` checks the sources).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

# dtypes that some backend cannot all-gather (gloo: bool, int16), sent as a wider one and cast back
WIRE_DTYPES = {torch.bool: torch.uint8, torch.int16: torch.int32}


class Collectives:
    """Sum, gather and broadcast across the ranks of the default process group, on ``device``.

    Every method issues its collectives whatever this rank holds (one process group of any size; a
    one-rank NCCL group still moves the tensors to the GPU and back). :meth:`of` picks
    :class:`OneProcess` when there is nothing to talk to.

    Args:
        device: the accelerator's device (``accelerator.device``): where every collective runs.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    @staticmethod
    def of(accelerator) -> Collectives:
        """The collectives of ``accelerator``'s launch: :class:`OneProcess` on one process."""
        if accelerator.num_processes == 1:
            return OneProcess()
        return Collectives(accelerator.device)

    @property
    def num_processes(self) -> int:
        return dist.get_world_size()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``values`` over ranks (same shape and dtype on every rank), on the
        caller's device; the caller's tensor is left as it was."""
        wire = values.detach().to(device=self.device, dtype=WIRE_DTYPES.get(values.dtype, values.dtype), copy=True)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        return wire.to(device=values.device, dtype=values.dtype)

    def gather_rows(self, values: torch.Tensor, pad_value: float | int | bool = 0) -> torch.Tensor:
        """(B, d1, ...) rows of every rank, in rank order: (world * B, max d1, ...), each rank's rows padded
        with ``pad_value`` along every dimension after the first to the largest size any rank has. The
        dtype is kept (bool masks included). Every rank must hold the same number of rows B."""
        shape = torch.tensor(values.shape, device=self.device, dtype=torch.int64)  # (D,)
        shapes = self._all_gather(shape)  # (world, D): one collective of fixed size, then the data
        rows = shapes[:, 0].tolist()
        if len(set(rows)) != 1:  # the same answer on every rank: all raise, none waits
            raise ValueError(f"gather_rows needs the same number of rows on every rank, got {rows}")
        target = shapes.max(dim=0).values.tolist()
        wire_dtype = WIRE_DTYPES.get(values.dtype, values.dtype)
        padded = torch.full(target, pad_value, dtype=wire_dtype, device=self.device)
        padded[tuple(slice(0, size) for size in values.shape)] = values.detach().to(self.device, wire_dtype)
        return self._all_gather(padded).flatten(0, 1).to(device=values.device, dtype=values.dtype)

    def gather_objects(self, objects: list) -> list:
        """The concatenation of every rank's list of picklable objects, in rank order."""
        gathered: list[Any] = [None] * self.num_processes
        with self._current_device():
            dist.all_gather_object(gathered, objects)
        return [item for rank_objects in gathered for item in rank_objects]

    def broadcast_objects(self, objects: list, source: int) -> list:
        """``objects`` of rank ``source`` on every rank (in place, as ``broadcast_object_list``; also returned)."""
        with self._current_device():
            dist.broadcast_object_list(objects, src=source, device=self.device)
        return objects

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world, *tensor.shape) from a tensor of the same shape and dtype on every rank, on ``device``."""
        world = self.num_processes
        gathered = tensor.new_empty((world * tensor.size(0), *tensor.shape[1:]))  # gloo: along dim 0
        dist.all_gather_into_tensor(gathered, tensor.contiguous())
        return gathered.view(world, *tensor.shape)

    def _current_device(self):
        """Object collectives pick their CUDA device from the current one: make it ours."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()


class OneProcess(Collectives):
    """A launch of one process: every collective is the identity and nothing is issued."""

    def __init__(self):
        super().__init__("cpu")

    @property
    def num_processes(self) -> int:
        return 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def gather_rows(self, values: torch.Tensor, pad_value: float | int | bool = 0) -> torch.Tensor:
        return values

    def gather_objects(self, objects: list) -> list:
        return list(objects)

    def broadcast_objects(self, objects: list, source: int) -> list:
        return objects
