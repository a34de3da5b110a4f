"""Selective rollouts behind TRL's ``_generate_and_score_completions``: ``prompts.filter`` dynamic and skip.

* ``dynamic``: DAPO's dynamic sampling (Yu et al., 2025, arXiv 2503.14476, section 3.2). A group whose G
  rewards are all equal has zero advantage and gives no policy gradient; such groups are dropped and more
  prompts sampled until the batch is full of groups with reward variance. As in verl
  (``algorithm.filter_groups``), each extra generation call samples a whole generation batch of new prompts.
  Where they part: after ``max_num_gen_batches`` calls verl raises (its advice: easier data, or 0 for no
  limit); after ``prompts.max_draws`` calls rlvr trains on what there is, fills the batch with zero-variance
  groups and logs how many (``prompts/short_groups``).
* ``skip``: before each call, every prompt is skipped with GRESO's probability (:mod:`rlvr.prompts.history`)
  and replaced by further candidates; after it, groups still without variance are dropped as above.
* ``skip`` with ``refill=false``: one call on the prompts not skipped; nothing replaces the skipped ones, whose
  places in the batch are rows without loss tokens (copies of a sampled row with an empty completion mask and
  zero advantage), and every sampled group is trained on as TRL would. With beta = 0 a zero-variance group has
  zero policy gradient, so this is TRL's step minus the skipped prompts' decoding (the loss normaliser of token
  -counting loss types loses their tokens). Every rank decodes the same number of groups per call (the most any
  rank kept; the others take back their least likely skipped prompts).

Further prompts (refills, skip's candidates) are drawn without replacement (:class:`rlvr.prompts.groups.PromptDraws`):
never one already sampled in the optimizer step, never one twice in a generation batch, never the same on two
ranks. The draws and skip decisions are keyed by a count of generation batches, checkpointed with the per-prompt
record (:mod:`rlvr.prompts.record`), so several generation batches per optimizer step draw differently and a
resumed run draws what the uninterrupted one would; GRESO's exploration probabilities adapt once per optimizer
step (:meth:`PromptFilter.end_step`).

Every rank keeps whole groups of its own rows (so a group stays on one rank) and every rank makes the same
number of generation calls (each call issues TRL's collectives): a rank that is full still samples while
another is short. The batch handed to TRL has the size TRL asked for, so gradient accumulation,
``steps_per_generation`` and the loss normalisation see a full batch; when the calls run out, the missing
groups are filled with zero-variance ones (``prompts/short_groups``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlvr.prompts.assembly import assemble_rows
from rlvr.prompts.config import PromptsConfig
from rlvr.prompts.groups import PromptDraws, informative_groups
from rlvr.prompts.history import FLOOR, RIGHT, WRONG, PromptHistory, prompt_key
from rlvr.prompts.probe import PassRateProbe, zero_variance_probability
from rlvr.prompts.record import PromptRecord, preview
from rlvr.rollouts import GROUP_IDS_KEY, ROUTING_KEY
from rlvr.rollouts.batch import group_ids
from rlvr.training.selection import loss_mask
from rlvr.utils.collectives import Collectives

COUNTS = 11  # the per-call counts summed over ranks (see _metrics)


class PromptFilter:
    """Chooses the prompts of a training generation batch and keeps the groups with reward variance.

    Args:
        settings: the ``prompts`` section.
        collectives: the cross-rank collectives.
        dataset: the training prompts (rows as TRL's dataloader yields them).
        group_size: G, completions per prompt.
        seed: the run's seed (draws and skip decisions are a function of it, the generation batch's number and
            the call).
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
        featurize: Callable[[list[dict]], torch.Tensor] | None = None,
        hidden_size: int = 0,
    ):
        self.settings, self.collectives, self.dataset = settings, collectives, dataset
        self.group_size, self.seed, self.rank, self.world = group_size, seed, rank, world
        self.pad_token_id, self.featurize = pad_token_id, featurize
        predictor = settings.skip_predictor
        self.history = None
        if predictor in ("history", "both"):
            self.history = PromptHistory(settings.target_zero_variance, settings.solved_reward)
        self.probe = PassRateProbe(hidden_size) if predictor in ("probe", "both") else None
        self.skips, self.refill = predictor is not None, settings.refill
        self.record = PromptRecord()  # what happened to each prompt (prompts.jsonl)
        self.generations = 0  # training generation batches produced (checkpointed): the draws are keyed by it
        self._step: int | None = None
        self._step_keys: set[str] = set()  # prompts this rank sampled in the current optimizer step
        self._pending = [0.0, 0.0, 0.0]  # this optimizer step's sampled, all-right and all-wrong groups (all ranks)
        self._keys: dict[int, str] = {}  # dataset index -> prompt key

    def produce(
        self,
        produce: Callable[[list[dict]], tuple[dict, dict[str, float]]],
        rewards: Callable[[], tuple[torch.Tensor, torch.Tensor]],
        inputs: list[dict],
        step: int,
    ) -> tuple[dict, dict[str, float]]:
        """A generation batch of ``len(inputs)`` rows, informative groups first.

        Args:
            produce: rows -> (batch, metrics): TRL's generation and scoring with rlvr's keys (one call).
            rewards: the (B_all,) weighted rewards of every rank's rows in the call just made, and the (B_all,)
                values TRL's group advantage compares (``Rollouts.compared_rewards``: informative groups vary in these).
            inputs: this rank's rows of the generation batch (whole groups).
            step: the optimizer step (the prompts sampled in it are not drawn again in it).

        Returns the batch and the ``prompts/*`` metrics (all ranks).
        """
        if step != self._step:  # a new optimizer step
            self._step, self._step_keys = step, set()
        generation, self.generations = self.generations, self.generations + 1
        G = self.group_size
        needed = len(inputs) // G  # groups of this rank (whole groups: checked when the filter is built)
        prompts = [inputs[group * G] for group in range(needed)]
        self._step_keys.update(prompt_key(row) for row in prompts)
        excluded = set(self.collectives.gather_objects(sorted(self._step_keys)))  # every rank's, this step
        draws = PromptDraws(len(self.dataset), self._key_of, excluded, self.seed, generation, self.rank, self.world)
        batches, kept, spare, call_keys = [], [], [], []
        counts = torch.zeros(COUNTS, dtype=torch.float64)  # see _metrics
        while True:
            call = len(batches)
            predicted, features, considered = [False] * len(prompts), None, []
            if self.skips:
                prompts, predicted, features, considered = self._choose(prompts, draws, generation, call)
                counts[3] += sum(skipped for *_, skipped in considered)
            call_keys.append([prompt_key(row) for row in prompts])  # (groups,) this rank's, this call
            self._step_keys.update(call_keys[-1])
            sampled = len(prompts)  # the same on every rank
            batch, _ = produce([row for row in prompts for _ in range(G)])
            call_rewards, compared = rewards()  # (B_all,), (B_all,)
            unscored = torch.isnan(call_rewards.view(-1, G)).all(dim=1).nonzero()  # (groups,) all ranks: agreed
            if len(unscored):
                group = int(unscored[0])
                rank, index = divmod(group, sampled)
                raise ValueError(
                    f"prompts.filter: every reward function returned None for all {G} completions of a group "
                    f"(group {index} of process {rank} in generation call {call + 1} of step {step}): it cannot "
                    "be told informative or not; return a number for at least one completion of every prompt"
                )
            informative = informative_groups(compared, G, self.settings.variance_tolerance)  # (groups, all ranks)
            mine = informative[self.rank * sampled : (self.rank + 1) * sampled].tolist()
            for group, has_variance in enumerate(mine):  # without refill every sampled group is trained on
                (kept if has_variance or not self.refill else spare).append((call, group))
            counts += self._observe(
                prompts, call_keys[-1], predicted, features, informative, call_rewards, sampled, considered
            )
            counts[0] += sampled
            batches.append(batch)
            device = batch["completion_mask"].device
            if not self.refill or len(batches) >= self.settings.max_draws:
                break
            missing = torch.tensor(float(max(needed - len(kept), 0)), device=device)
            if float(self.collectives.sum(missing)) == 0.0:
                break
            prompts = [self.dataset[index] for index in draws.take(needed)]
        if self.refill:  # the informative groups first, then zero-variance ones where the draws ran out
            short, empty = max(needed - len(kept), 0), 0
            picks = kept[:needed] + spare[:short]
            dropped = [call_keys[call][group] for call, group in spare[short:]]
            self.record.observe_dropped(self.collectives.gather_objects(dropped))
        else:  # every sampled group; the skipped places hold a sampled row, emptied below
            short, empty = mine.count(False), needed - len(kept)
            picks = kept + [(0, 0)] * empty
        out = assemble_rows(
            batches,
            [(call, group * G + row) for call, group in picks for row in range(G)],
            self.pad_token_id,
            routing_key=ROUTING_KEY,
            recomputed=(GROUP_IDS_KEY, "num_items_in_batch"),
        )
        if empty:
            out["completion_mask"][-empty * G :] = 0
            out["advantages"][-empty * G :] = 0
        out[GROUP_IDS_KEY] = group_ids(len(inputs), G, self.rank, device)
        out["num_items_in_batch"] = self.collectives.sum(loss_mask(out).sum())  # TRL's: global, this batch's
        counts[1], counts[2] = float(counts[0]) - (needed - empty), float(short)
        counts[9], counts[10] = empty, draws.repeated
        return out, self._metrics(self.collectives.sum(counts.to(device)).tolist(), len(batches), needed)

    def end_step(self) -> None:
        """GRESO's adaptation of the exploration probabilities, once per optimizer step, from the shares of the
        step's sampled groups that were all-right and all-wrong (``PromptFilterState`` calls it at step end)."""
        sampled, right, wrong = self._pending
        if self.history is not None and sampled:
            self.history.adapt(right / sampled, wrong / sampled)  # the same on every rank
        self._pending = [0.0, 0.0, 0.0]

    def _key_of(self, index: int) -> str:
        if index not in self._keys:
            self._keys[index] = prompt_key(self.dataset[index])
        return self._keys[index]

    def _choose(
        self, candidates: list[dict], draws: PromptDraws, generation: int, call: int
    ) -> tuple[list[dict], list[bool], torch.Tensor | None, list[tuple[str, str, float, bool]]]:
        """This rank's prompts for one call: each candidate skipped with its predicted probability, replaced by
        candidates drawn afresh (``prompts.candidate_rounds`` draws at most), the batch topped up with the
        least likely skipped ones. Without refill: no further candidates, and the batch is topped up only to the
        number of prompts the rank keeping the most kept (at least one), so every rank decodes as many. Returns
        the prompts, whether each was predicted to give no variance (skip probability >= 0.5), their (N, D)
        features (the probe's; else None) and every candidate considered as (key, preview, skip probability,
        skipped).

        The probe's features are a forward of the policy, a collective under ZeRO-3, and how many rounds a rank
        needs depends on its own skip draws: the ranks agree on each further round, and every rank draws and
        featurizes it (a rank already full discards it)."""
        needed = len(candidates)
        generator = torch.Generator().manual_seed(
            ((self.seed * 1_000_003 + generation) * 1_009 + call) * 131 + self.rank
        )
        chosen, passed, rounds = [], [], 0
        batch = list(candidates)
        while True:
            for row, probability, feature in zip(batch, *self._skip_probabilities(batch), strict=True):
                if len(chosen) >= needed:
                    break
                if float(torch.rand((), generator=generator)) < probability:
                    passed.append((probability, len(passed), row, feature))
                else:
                    chosen.append((probability, row, feature))
            if not self.refill or rounds >= self.settings.candidate_rounds or not self._any_rank_short(chosen, needed):
                break
            rounds += 1
            batch = [self.dataset[index] for index in draws.take(needed)]
        wanted = needed
        if not self.refill:  # the most any rank kept
            kept = torch.tensor([float(max(len(chosen), 1))], device=self.collectives.device)
            wanted = int(self.collectives.gather_rows(kept.view(1, 1)).max())
        ordered = sorted(passed, key=lambda item: item[:2])  # the least likely to give no variance first
        top_up, still_skipped = ordered[: wanted - len(chosen)], ordered[wanted - len(chosen) :]
        chosen += [(probability, row, feature) for probability, _, row, feature in top_up]
        considered = [(prompt_key(row), preview(row["prompt"]), p, False) for p, row, _ in chosen]
        considered += [(prompt_key(row), preview(row["prompt"]), p, True) for p, _, row, _ in still_skipped]
        features = torch.stack([feature for _, _, feature in chosen]) if self.probe is not None else None
        predicted = [probability >= 0.5 for probability, _, _ in chosen]
        return [row for _, row, _ in chosen], predicted, features, considered

    def _any_rank_short(self, chosen: list, needed: int) -> bool:
        """Whether any rank chose fewer than ``needed`` prompts (the same answer on every rank). Only the probe
        runs forwards, so without one each rank decides alone."""
        short = len(chosen) < needed
        if self.probe is None:
            return short
        return float(self.collectives.sum(torch.tensor(float(short), device=self.collectives.device))) > 0

    def _skip_probabilities(self, rows: list[dict]) -> tuple[list[float], list]:
        """Each row's skip probability (the larger of the history's and the probe's where both predict) and
        its features (None without a probe)."""
        history = [self.history.skip_probability(prompt_key(row)) if self.history else 0.0 for row in rows]
        if self.probe is None:
            return history, [None] * len(rows)
        features = self.featurize(rows).float().cpu()  # (N, D)
        pass_rates = self.probe.predict(features)
        if pass_rates is None:  # too few groups seen to predict
            return history, list(features)
        probe = zero_variance_probability(pass_rates.double(), self.group_size).clamp(max=1 - FLOOR).tolist()
        return [max(h, p) for h, p in zip(history, probe, strict=True)], list(features)

    def _observe(self, prompts, keys, predicted, features, informative, rewards, sampled, considered) -> torch.Tensor:
        """Every rank's groups of a call into the per-prompt record, the history and the probe (the same on every
        rank), and this rank's counts: [.., .., .., .., all-right groups, all-wrong groups, predicted and without
        variance, predicted with variance, not predicted and without variance, .., ..] (the rest is counted by
        ``produce``)."""
        grouped = rewards.detach().double().view(len(informative), -1)  # (groups, G), all ranks
        scored = ~torch.isnan(grouped)
        passes = ((grouped > self.settings.solved_reward) & scored).sum(1) / scored.sum(1).clamp(min=1)  # (groups,)
        mine = slice(self.rank * sampled, (self.rank + 1) * sampled)
        rows = [(key, preview(row["prompt"])) for key, row in zip(keys, prompts, strict=True)]
        every_rank = self.collectives.gather_objects([(rows, considered)])  # one item per rank
        sampled_rows = [row for rank_rows, _ in every_rank for row in rank_rows]  # (groups,)
        self.record.observe_call(
            sampled_rows, passes.tolist(), informative.tolist(), [c for _, rank_c in every_rank for c in rank_c]
        )
        kinds = [None] * len(informative)
        if self.history is not None:
            means = torch.nanmean(grouped, dim=1).tolist()
            kinds = [
                self.history.observe(key, bool(i), m)
                for (key, _), i, m in zip(sampled_rows, informative.tolist(), means, strict=True)
            ]
        if self.probe is not None:  # every rank fits the same probe on every rank's groups
            all_features = self.collectives.gather_rows(features.to(rewards.device), 0.0)  # (groups, D)
            self.probe.observe(all_features, passes)
        zero = [not value for value in informative[mine].tolist()]
        counts = torch.zeros(COUNTS, dtype=torch.float64)
        counts[4] = sum(kind == RIGHT for kind in kinds[mine])
        counts[5] = sum(kind == WRONG for kind in kinds[mine])
        counts[6] = sum(p and z for p, z in zip(predicted, zero, strict=True))
        counts[7] = sum(p and not z for p, z in zip(predicted, zero, strict=True))
        counts[8] = sum(z and not p for p, z in zip(predicted, zero, strict=True))
        return counts

    def _metrics(self, counts: list[float], calls: int, needed: int) -> dict[str, float]:
        generated, dropped, short, skipped, right, wrong, true_pos, false_pos, false_neg, empty, repeated = counts
        trained = self.world * needed - empty  # sampled groups in the batch (skipped places without refill aside)
        metrics = {
            "prompts/generation_calls": float(calls),
            "prompts/drawn": generated,
            "prompts/dropped": dropped,
            "prompts/short_groups": short,
            "prompts/trained_zero_variance_share": short / trained,
            "prompts/repeated_draws": repeated,  # drawn after the training set was used up in this batch
        }
        self._pending = [a + b for a, b in zip(self._pending, (generated, right, wrong), strict=True)]
        if self.history is not None:  # adapted once per optimizer step (end_step)
            metrics["prompts/explore_right"] = self.history.explore[RIGHT]
            metrics["prompts/explore_wrong"] = self.history.explore[WRONG]
        if self.skips:
            metrics["prompts/skipped"] = skipped
            if true_pos + false_pos:
                metrics["prompts/predictor_precision"] = true_pos / (true_pos + false_pos)
            if true_pos + false_neg:
                metrics["prompts/predictor_recall"] = true_pos / (true_pos + false_neg)
        if not self.refill:
            metrics["prompts/empty_groups"] = empty
        return metrics
