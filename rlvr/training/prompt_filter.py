"""DAPO's dynamic sampling behind TRL's ``_generate_and_score_completions`` (``prompts.filter: dynamic``).

DAPO (Yu et al., 2025, arXiv 2503.14476, section 3.2): a group whose G rewards are all equal has zero
advantage and gives no policy gradient. Dynamic sampling drops such groups and samples more prompts until the
batch is full of groups with reward variance. As verl ships it (``algorithm.filter_groups``), each extra
generation call samples a whole generation batch of new prompts, and after ``max_num_gen_batches`` calls the
step trains on what there is.

Here every rank keeps whole groups of its own rows (so the rule "a group stays on one rank" holds) and every
rank makes the same number of generation calls (each call issues TRL's collectives): a rank that is full
still samples while another is short. The batch handed to TRL has the size TRL asked for, so gradient
accumulation, ``steps_per_generation`` and the loss normalisation see a full batch; when the calls run out,
the missing groups are filled with zero-variance ones (logged as ``prompts/short_groups``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlvr.collectives import Collectives
from rlvr.prompts.assembly import assemble_rows
from rlvr.prompts.config import PromptsConfig
from rlvr.prompts.groups import draw_prompts, informative_groups
from rlvr.rollouts import GROUP_IDS_KEY, ROUTING_KEY
from rlvr.rollouts.batch import group_ids
from rlvr.training.selection import loss_mask


class DynamicSampling:
    """Refills a training generation batch with groups that have reward variance.

    Args:
        settings: the ``prompts`` section.
        collectives: the cross-rank collectives.
        dataset: the training prompts (rows as TRL's dataloader yields them).
        group_size: G, completions per prompt.
        seed: the run's seed (the refill draws are a function of it, the step and the draw).
        rank, world: this process among the ranks.
        pad_token_id: the tokenizer's pad token.
    """

    def __init__(
        self,
        settings: PromptsConfig,
        collectives: Collectives,
        dataset,
        group_size: int,
        seed: int,
        rank: int,
        world: int,
        pad_token_id: int,
    ):
        self.settings, self.collectives, self.dataset = settings, collectives, dataset
        self.group_size, self.seed, self.rank, self.world = group_size, seed, rank, world
        self.pad_token_id = pad_token_id

    def produce(
        self,
        produce: Callable[[list[dict]], tuple[dict, dict[str, float]]],
        rewards: Callable[[], torch.Tensor],
        inputs: list[dict],
        step: int,
    ) -> tuple[dict, list[dict[str, float]], dict[str, float]]:
        """A generation batch of ``len(inputs)`` rows, informative groups first.

        Args:
            produce: rows -> (batch, metrics): TRL's generation and scoring with rlvr's keys (one call).
            rewards: the (B_all,) weighted rewards of every rank's rows in the call just made.
            inputs: this rank's rows of the generation batch (whole groups).
            step: the optimizer step (refill draws depend on it).

        Returns the batch, the metrics of each generation call, and the ``prompts/*`` metrics (all ranks).
        """
        G = self.group_size
        if len(inputs) % G:
            raise ValueError(
                f"prompts.filter=dynamic keeps whole groups on each process: its {len(inputs)} rows per "
                "generation batch (per_device_train_batch_size x steps_per_generation) must be a multiple of "
                f"num_generations ({G})"
            )
        needed = len(inputs) // G  # groups of this rank
        batches, call_metrics, kept, spare = [], [], [], []
        rows = inputs
        while True:
            batch, metrics = produce(rows)
            call_metrics.append(metrics)
            informative = informative_groups(rewards(), G, self.settings.variance_tolerance)  # (groups, all ranks)
            mine = informative[self.rank * needed : (self.rank + 1) * needed].tolist()
            for group, has_variance in enumerate(mine):
                (kept if has_variance else spare).append((len(batches), group))
            batches.append(batch)
            device = batch["completion_mask"].device
            short = torch.tensor(float(max(needed - len(kept), 0)), device=device)
            if float(self.collectives.sum(short)) == 0.0 or len(batches) >= self.settings.max_draws:
                break
            drawn = draw_prompts(len(self.dataset), self.world * needed, self.seed, step, len(batches))
            rows = [
                self.dataset[index] for index in drawn[self.rank * needed : (self.rank + 1) * needed] for _ in range(G)
            ]
        picks = kept[:needed] + spare[: max(needed - len(kept), 0)]
        out = assemble_rows(
            batches,
            [(draw, group * G + row) for draw, group in picks for row in range(G)],
            self.pad_token_id,
            routing_key=ROUTING_KEY,
            recomputed=(GROUP_IDS_KEY, "num_items_in_batch"),
        )
        out[GROUP_IDS_KEY] = group_ids(len(inputs), G, self.rank, device)
        out["num_items_in_batch"] = self.collectives.sum(loss_mask(out).sum())  # TRL's: global, this batch's
        generated = len(batches) * needed
        counts = torch.tensor(
            [generated, generated - needed, max(needed - len(kept), 0)], dtype=torch.float64, device=device
        )
        drawn_groups, dropped, short_groups = self.collectives.sum(counts).tolist()
        trained = self.world * needed
        prompt_metrics = {
            "prompts/generation_calls": float(len(batches)),
            "prompts/drawn": drawn_groups,
            "prompts/dropped": dropped,
            "prompts/short_groups": short_groups,
            "prompts/trained_zero_variance_share": short_groups / trained,
        }
        return out, call_metrics, prompt_metrics
