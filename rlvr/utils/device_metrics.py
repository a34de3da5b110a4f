"""Metrics kept on the device between logging steps, read to the host once per logging step.

A value read with ``.item()`` (or ``float(tensor)``, ``.tolist()``) makes the host wait for every kernel
queued before it: on a GPU, one such read per micro-step stalls the step. The training step therefore adds
its metrics here as 0-d device tensors, and the trainer drains them when it logs, with one host copy for
all of them.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class DeviceMetrics:
    """Per-key lists of 0-d tensors; :meth:`drain` returns them as floats, in the order they were added."""

    def __init__(self):
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, key: str, value: torch.Tensor) -> None:
        """Keep ``value`` (a 0-d tensor, any device; NaN allowed) for the next :meth:`drain`. No host read."""
        self._values[key].append(value.detach().reshape(()).float())

    def update(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.add(key, value)

    def drain(self) -> dict[str, list[float]]:
        """Every value added since the last drain, read with one host copy, and start again."""
        values, self._values = self._values, defaultdict(list)
        keys = list(values)
        if not keys:
            return {}
        device = values[keys[0]][0].device
        flat = torch.stack([value.to(device) for key in keys for value in values[key]]).tolist()
        drained, start = {}, 0
        for key in keys:
            drained[key] = flat[start : start + len(values[key])]
            start += len(values[key])
        return drained
