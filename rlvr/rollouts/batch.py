"""The generation batch: what rlvr adds to the rows TRL produces, and the calls the trainer delegates.

``ForkingGRPOTrainer`` overrides two TRL methods on the generation side and hands both to
:class:`Rollouts`: ``_generate_and_score_completions`` (one generation batch: sampling, rewards,
advantages, old-policy log-probs) and ``_generate_single_turn`` (the sampling itself).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlvr.rollouts.routing import ReplayRecorder

GROUP_IDS_KEY = "rlvr_group_ids"  # (B,) global prompt index of each row, added to TRL's generation batch
ROUTING_KEY = "rlvr_routing"  # (B, P + C, layers, k) recorded experts for routing replay, travels with the rows


def group_ids(rows: int, group_size: int, process_index: int, device: torch.device) -> torch.Tensor:
    """The global prompt index of each of this rank's ``rows``: TRL's ``RepeatSampler`` puts the
    ``group_size`` completions of one prompt on consecutive global rows, and rank ``process_index`` holds
    global rows ``[process_index * rows, (process_index + 1) * rows)``. Returns (B,) int64."""
    first_row = process_index * rows
    return (torch.arange(rows, device=device) + first_row) // group_size


class Rollouts:
    """The generation side of ``ForkingGRPOTrainer``.

    Args:
        replay: records routing while the batch is produced (a no-op for ``routing_replay: none`` and
            dense policies).
    """

    def __init__(self, replay: ReplayRecorder):
        self.replay = replay

    def produce_batch(self, produce: Callable[[], dict], group_size: int, process_index: int) -> dict:
        """Run TRL's ``_generate_and_score_completions`` (``produce``) and add rlvr's keys to its batch:
        the routing record (:data:`ROUTING_KEY`) and each row's prompt group (:data:`GROUP_IDS_KEY`)."""
        self.replay.start_batch()
        batch = produce()
        self.replay.finish_batch(batch, ROUTING_KEY)
        prompt_ids = batch["prompt_ids"]  # (B, P)
        batch[GROUP_IDS_KEY] = group_ids(prompt_ids.size(0), group_size, process_index, prompt_ids.device)
        return batch

    def generate(self, generate: Callable, *args, **kwargs):
        """TRL's ``_generate_single_turn`` (``generate``), with routing recorded when replay asks for it."""
        with self.replay.rollout():
            return generate(*args, **kwargs)
