"""The state of one loss forward, and the forking tokens selected in it across ranks.

*Beyond the 80/20 Rule* (Wang et al., 2025, arXiv 2506.01939): the policy gradient is kept on the
``k = ceil(rho * n)`` highest-entropy completion tokens of each scope unit. :class:`ForkingSelection` runs
:func:`rlvr.forking.selection.select_forking_tokens` over the micro-batch of every rank (gathered through
:mod:`rlvr.utils.collectives`), hands back this rank's keep mask and loss weights, and records what it selected
(selection metrics, the gradient-token count, the forking-token log) as device tensors, read when logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlvr.forking.log import ForkingTokenLog
from rlvr.forking.selection import ForkingConfig, loss_weights, select_forking_tokens, selection_stats
from rlvr.forking.token_rules import STOPPING_RULES
from rlvr.rollouts import GROUP_IDS_KEY
from rlvr.utils.collectives import Collectives
from rlvr.utils.device_metrics import DeviceMetrics


@dataclass
class MicroBatchSelection:
    """The forking tokens of the micro-batch being trained on (this rank's rows)."""

    keep: torch.Tensor  # (B, T) bool
    weights: torch.Tensor  # (B, T) float loss weights (0 for dropped tokens and padding)


@dataclass
class LossForward:
    """The state one ``_compute_loss`` shares between the TRL methods it calls: set when it starts,
    filled by the loss forward (``_get_per_token_logps_and_entropies``), read by
    ``get_high_entropy_mask`` and at the end of ``_compute_loss``, dropped when it returns."""

    inputs: dict  # the micro-batch
    selection: MicroBatchSelection | None = None
    entropies: torch.Tensor | None = None  # (B, T) with gradient: for an entropy bonus on all tokens
    router_loss: torch.Tensor | None = None  # scoped load-balancing / z-loss of the forward
    log_probs: torch.Tensor | None = None  # (B, T) with gradient: for KL-Cov's penalty (token_rules)
    penalty: torch.Tensor | None = None  # (B, T) bool: KL-Cov's penalised tokens
    undo: list = field(default_factory=list)  # callables putting back what a token rule replaced for the forward


def loss_mask(inputs: dict) -> torch.Tensor:
    """TRL's per-token loss mask: completion tokens, minus tool-output tokens."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def rlvr_entropy_bonus(forking: ForkingConfig, rule: str) -> bool:
    """Whether rlvr computes the entropy bonus itself instead of TRL, whose bonus covers the tokens of the entropy
    mask rlvr hands it (the loss weights): with ``forking.mask_entropy_bonus=false`` on forking tokens (the bonus
    on every token), and with Clip-Cov or STAPO, whose stopped tokens would leave the bonus too (verl's bonus
    averages over every response token; these rules only stop the policy gradient)."""
    return (not forking.mask_entropy_bonus and forking.policy_tokens == "forking") or rule in STOPPING_RULES


def entropy_bonus_mask(forking: ForkingConfig, inputs: dict, selection: MicroBatchSelection) -> torch.Tensor:
    """(B, T) the tokens rlvr's entropy bonus averages over: the forking tokens under
    ``forking.mask_entropy_bonus`` with forking-token updates (TRL's choice), else every completion token; never
    narrowed by a token rule."""
    mask = loss_mask(inputs).bool()
    if forking.mask_entropy_bonus and forking.policy_tokens == "forking":
        mask = mask & selection.keep
    return mask


class ForkingSelection:
    """Exact top-k forking tokens over the micro-batch of every rank, and the records of them.

    Args:
        forking: the ``forking`` section (rho, selection, scope, normalisation).
        normalization_unit: the unit TRL's loss type averages over (:func:`rlvr.forking.loss_normalization_unit`).
        collectives: the cross-rank collectives (:mod:`rlvr.utils.collectives`).
        forking_log: what rank 0 writes about forking tokens.
        seed: the run's seed; the random control draws one stream per micro-step from it, the same on every rank.
        rank: this process's index among the ranks.
    """

    def __init__(
        self,
        forking: ForkingConfig,
        normalization_unit: str,
        collectives: Collectives,
        forking_log: ForkingTokenLog,
        seed: int,
        rank: int,
    ):
        self.forking, self.normalization_unit = forking, normalization_unit
        self.collectives, self.forking_log = collectives, forking_log
        self.seed, self.rank = seed, rank
        self.step_metrics = {"train": DeviceMetrics(), "eval": DeviceMetrics()}  # read when logged
        self.gradient_token_count: torch.Tensor | int = 0  # a device tensor once training: read when asked

    def select(
        self, entropies: torch.Tensor, inputs: dict, step: int, training: bool, main_process: bool
    ) -> MicroBatchSelection:
        """This rank's keep mask and loss weights for the (B, T) ``entropies`` of micro-step ``step``."""
        mask = loss_mask(inputs).bool()  # (B, T)
        group_ids = inputs.get(GROUP_IDS_KEY)
        if group_ids is None:
            group_ids = torch.arange(mask.size(0), device=mask.device)
        # k is counted over the micro-batch of every rank: gather (identities on one process), select, keep ours
        all_entropies = self.collectives.gather_rows(entropies, 0.0)  # (world * B, T_max)
        all_mask = self.collectives.gather_rows(mask, False)  # (world * B, T_max) bool on every rank
        all_group_ids = self.collectives.gather_rows(group_ids)  # (world * B,)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # identical on every rank
        forking = self.forking
        all_keep = select_forking_tokens(
            all_entropies,
            all_mask,
            forking.rho,
            forking.selection,
            forking.scope,
            group_ids=all_group_ids,
            generator=generator,
        )
        rows, length = mask.shape
        first = self.rank * rows
        keep = all_keep[first : first + rows, :length]

        unit = self.normalization_unit
        totals = (all_mask.sum(), (all_keep & all_mask.bool()).sum()) if unit == "generation_batch" else None
        weights = loss_weights(
            keep, mask, forking.loss_normalization, per_sequence=unit == "sequence", totals=totals
        ).to(entropies.dtype)
        self._record(all_entropies, all_mask, all_keep, inputs, mask, keep, training, main_process)
        return MicroBatchSelection(keep=keep, weights=weights)

    def _record(self, all_entropies, all_mask, all_keep, inputs, mask, keep, training, main_process) -> None:
        """Selection metrics (over all ranks), gradient-token count (this rank), the forking-token log (rank 0),
        all kept on the device until the next logging step (no host read here)."""
        mode = "train" if training else "eval"
        stats = selection_stats(all_entropies, all_mask, all_keep, self.forking.selection)
        self.step_metrics[mode].update(stats.as_metrics())
        if not training:
            return
        if torch.is_grad_enabled():
            counted = keep & mask.bool() if self.forking.policy_tokens == "forking" else mask.bool()
            self.gradient_token_count = self.gradient_token_count + counted.sum()
        if main_process:
            self.forking_log.add(all_entropies, all_mask, inputs["completion_ids"], mask, keep)
