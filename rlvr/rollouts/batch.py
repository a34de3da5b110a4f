"""The generation batch: how it is sampled, what rlvr adds to the rows TRL produces, what it cost.

``ForkingGRPOTrainer`` overrides TRL's generation-side methods and hands them to :class:`Rollouts`:
``_generate_and_score_completions`` (one generation batch: sampling, rewards, advantages, old-policy
log-probs), ``_generate_single_turn`` (the sampling itself) and ``_calculate_rewards`` (the rewards,
which the tree-aware advantage needs).

With ``rollout.mode: iid`` the sampling is TRL's, unchanged. With ``forking_tree`` the training
batches' completions are forking trees (:mod:`rlvr.rollouts.tree`); TRL's own evaluation batches stay
i.i.d. Either way the batch reports its cost: tokens decoded, generation wall time, where trees branched.

When an engine with numerics of its own samples (``rollout.engine: copy``, or vLLM), each batch also
reports how far the engine's numbers are from the trainer's (:mod:`rlvr.rollouts.mismatch`): log-prob
mismatch, routing flips, what importance-sampling masking drops (``mismatch/*``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from rlvr.rewards.aggregation import compared_rewards, weighted_rewards
from rlvr.rewards.extraction import find_answer
from rlvr.rollouts.branching import treerl_advantages
from rlvr.rollouts.config import RolloutConfig
from rlvr.rollouts.mismatch import importance_sampling_drops, logprob_mismatch, routing_flips
from rlvr.rollouts.routing import EngineSample, ReplayRecorder
from rlvr.rollouts.tree import ForkingTreeSampler, GenerationCost, TreeRollout

GROUP_IDS_KEY = "rlvr_group_ids"  # (B,) global prompt index of each row, added to TRL's generation batch
ROUTING_KEY = "rlvr_routing"  # (B, P + C, layers, k) recorded experts for routing replay, travels with the rows


def group_ids(rows: int, group_size: int, process_index: int, device: torch.device) -> torch.Tensor:
    """The global prompt index of each of this rank's ``rows``: TRL's ``RepeatSampler`` puts the
    ``group_size`` completions of one prompt on consecutive global rows, and rank ``process_index`` holds
    global rows ``[process_index * rows, (process_index + 1) * rows)``. Returns (B,) int64."""
    first_row = process_index * rows
    return (torch.arange(rows, device=device) + first_row) // group_size


def distinct_answers(completions: list, group_size: int) -> float:
    """Mean number of distinct answers per group of ``group_size`` consecutive completions. The answer is
    the span the verifiers read (:func:`rlvr.rewards.extraction.find_answer`); a completion without one
    counts as the answer "none"."""
    answers = []
    for completion in completions:
        span = find_answer(completion)
        answers.append(" ".join(span.text.split()) if span is not None else None)
    groups = [answers[start : start + group_size] for start in range(0, len(answers), group_size)]
    return sum(len(set(group)) for group in groups) / max(len(groups), 1)


def settled_groups(rewards: torch.Tensor, group_size: int, solved_reward: float) -> tuple[float, float]:
    """Shares of the groups (``group_size`` consecutive rows of the (B,) weighted ``rewards``, NaN unscorable)
    whose scorable rewards are all equal and above ``solved_reward`` (all right) or not above it (all wrong):
    the groups that give no policy gradient, by kind. A group with no scorable row counts as neither."""
    grouped = rewards.detach().double().view(-1, group_size)  # (N, G)
    scored = ~torch.isnan(grouped)
    low = grouped.nan_to_num(float("inf")).min(dim=1).values  # (N,)
    high = grouped.nan_to_num(float("-inf")).max(dim=1).values
    settled = scored.any(dim=1) & (high - low <= 1e-6)
    right = settled & (low > solved_reward)
    groups = max(grouped.size(0), 1)
    return float(right.sum()) / groups, float((settled & ~right).sum()) / groups


class Rollouts:
    """The generation side of ``ForkingGRPOTrainer``.

    Args:
        replay: records routing while the batch is produced (a no-op for ``routing_replay: none`` and
            dense policies).
        settings: the ``rollout`` section (how completions are sampled).
        eos_token_ids, pad_token_id: the tokenizer's, for the tree sampler.
        sum_across_ranks: sums a tensor over ranks (the identity on one process;
            :meth:`rlvr.utils.collectives.Collectives.sum` in the trainer).
        gather: ``(tensor, pad_value)`` -> the (B_all, ...) rows of every rank, padded after dim 0 with
            ``pad_value``, dtype kept (the identity on one process;
            :meth:`rlvr.utils.collectives.Collectives.gather_rows`).
    """

    def __init__(
        self,
        replay: ReplayRecorder,
        settings: RolloutConfig | None = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        sum_across_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda values: values,
        gather: Callable[[torch.Tensor, float], torch.Tensor] = lambda values, pad_value: values,
    ):
        self.replay = replay
        self.settings = settings or RolloutConfig()
        self.sum_across_ranks = sum_across_ranks
        self.gather = gather
        self.engine = None  # set by attach_engine: an engine with numerics of its own samples the batches
        self.measure_forward: Callable[[dict], torch.Tensor] | None = None
        self.importance_sampling: tuple[str, float | None, float | None] | None = None
        self.sampler = None
        if self.settings.mode == "forking_tree":
            if eos_token_ids is None or pad_token_id is None:
                raise ValueError("rollout.mode=forking_tree needs the tokenizer's eos and pad token ids")
            self.sampler = ForkingTreeSampler(self.settings, eos_token_ids, pad_token_id)
        self.last_layout = None  # the TreeLayout of the last forking-tree batch (for inspection)
        self.logged_advantages: list[float] | None = None  # treerl: each row's mean advantage, all ranks
        self.decoded_tokens_total = 0  # training batches, all ranks: the x-axis of "accuracy per decoded token"
        self.generation_seconds_total = 0.0  # training batches, mean over ranks
        self._tree: TreeRollout | None = None
        self._cost: GenerationCost | None = None
        self._rewards: torch.Tensor | None = None  # (B_all,) weighted rewards of the batch, all ranks
        self._compared: torch.Tensor | None = None  # (B_all,) what TRL's advantage compares within a group
        self.aggregation = "sum_then_normalize"  # TRL's multi_objective_aggregation
        self._distinct_answers: float | None = None
        self._settled: tuple[float, float] | None = None  # shares of all-right and all-wrong groups
        self.solved_reward = 0.5  # a settled group above this reward is all-right (``prompts.solved_reward``)

    @property
    def batch_rewards(self) -> torch.Tensor:
        """(B_all,) weighted rewards of every rank's rows in the batch being produced (NaN: unscorable)."""
        if self._rewards is None:
            raise RuntimeError("the batch's rewards were not observed (TRL's _calculate_rewards did not run)")
        return self._rewards

    @property
    def compared_rewards(self) -> torch.Tensor:
        """(B_all,) what TRL's group advantage compares within each group of the batch being produced: the
        weighted rewards, or under ``normalize_then_sum`` the weighted sum of group-normalised rewards
        (:mod:`rlvr.rewards.aggregation`). A group without variance in these has zero advantage."""
        if self._compared is None:
            raise RuntimeError("the batch's rewards were not observed (TRL's _calculate_rewards did not run)")
        return self._compared

    def attach_engine(
        self,
        engine,
        measure_forward: Callable[[dict], torch.Tensor],
        importance_sampling: tuple[str, float | None, float | None] | None,
    ) -> None:
        """Batches are sampled by an engine with numerics of its own: measure the mismatch of each.

        Args:
            engine: after each generation call, ``engine.take_routing()`` returns the experts it chose per row
                (a list of :class:`rlvr.rollouts.engine_routing.EngineRouting`, or None).
            measure_forward: the trainer's no-grad log-probs (B, C) of a batch's completions, for batches
                whose old-policy log-probs TRL did not compute.
            importance_sampling: TRL's correction as ``(mode, clip_min, clip_max)``, or None when it is off.
        """
        self.engine, self.measure_forward, self.importance_sampling = engine, measure_forward, importance_sampling

    def branches(self, training: bool) -> bool:
        """Whether this batch is sampled as forking trees (training batches in ``forking_tree`` mode)."""
        return self.sampler is not None and training

    def produce_batch(
        self, produce: Callable[[], dict], group_size: int, process_index: int, training: bool = True
    ) -> tuple[dict, dict[str, float]]:
        """Run TRL's ``_generate_and_score_completions`` (``produce``) and add rlvr's keys to its batch:
        the routing record (:data:`ROUTING_KEY`), each row's prompt group (:data:`GROUP_IDS_KEY`) and,
        with ``rollout.advantage=treerl``, TreeRL's (B, C) advantages. Returns the batch and its metrics."""
        self.replay.start_batch()
        self._tree = self._cost = self._rewards = self._compared = self._distinct_answers = self._settled = None
        self.logged_advantages = None
        batch = produce()
        training_logps = None
        if self.engine is not None and "sampling_per_token_logps" in batch:
            training_logps = batch.get("old_per_token_logps")
            if training_logps is None:  # TRL ran no old-policy forward (no correction, one step per batch)
                training_logps = self.measure_forward(batch)
        trainer_routing = self.replay.finish_batch(batch, ROUTING_KEY)
        prompt_ids = batch["prompt_ids"]  # (B, P)
        rows = prompt_ids.size(0)
        batch[GROUP_IDS_KEY] = group_ids(rows, group_size, process_index, prompt_ids.device)
        if self._tree is not None and self.settings.advantage == "treerl":
            if self._rewards is None:
                raise RuntimeError("rollout.advantage=treerl: the batch's rewards were not observed")
            local = self._rewards[process_index * rows : (process_index + 1) * rows]  # (B,)
            lengths = batch["completion_mask"].sum(dim=1)  # (B,)
            width = batch["completion_ids"].size(1)
            advantages = treerl_advantages(local.cpu(), self._tree.layout, lengths.cpu(), width)  # (B, C)
            batch["advantages"] = advantages.to(device=prompt_ids.device, dtype=batch["advantages"].dtype)
            # what TRL's completions table shows per row: the mean advantage over the completion's tokens
            row_means = advantages.sum(dim=1) / lengths.cpu().clamp(min=1)  # (B,)
            self.logged_advantages = self.gather(row_means.to(prompt_ids.device), 0.0).tolist()  # (B_all,)
        metrics = self._metrics(training)
        if training_logps is not None:
            metrics.update(self._mismatch(batch, training_logps, trainer_routing))
        self.last_layout = self._tree.layout if self._tree is not None else None
        self._tree = None
        return batch, metrics

    def generate(self, generate: Callable, prompt_ids: list[list[int]], *args, **kwargs):
        """TRL's ``_generate_single_turn`` (``generate``), with routing recorded when replay asks for it (by
        the policy's hooks during ``generate``, or as the engine returned it)."""
        start = time.perf_counter()
        if self.engine is None:
            with self.replay.rollout():
                completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
        else:
            completion_ids, logprobs = generate(prompt_ids, *args, **kwargs)
            self.replay.keep_engine_sample(
                EngineSample(
                    [len(ids) for ids in prompt_ids], [len(ids) for ids in completion_ids], self.engine.take_routing()
                )
            )
        tokens = sum(len(ids) for ids in completion_ids)
        seconds = time.perf_counter() - start
        if self._cost is None:
            self._cost = GenerationCost(tokens, tokens, len(completion_ids), seconds)
        else:  # a multi-turn batch (tool calls) samples again for the rows that called a tool
            self._cost.decoded_tokens += tokens
            self._cost.leaf_tokens += tokens
            self._cost.generation_seconds += seconds
        return completion_ids, logprobs

    def generate_tree(self, model, prompt_ids: list[list[int]], group_size: int, generation_config):
        """The completions of ``prompt_ids`` as forking trees, in the ``(completion_ids, logprobs)`` form of
        TRL's ``_generate_single_turn`` (no sampling log-probs: TRL computes them for the policy)."""
        tree = self.sampler.sample(
            model, prompt_ids, group_size, generation_config, routing_hooks=self.replay.rollout_hooks()
        )
        if tree.routing is not None:
            self.replay.keep_record(tree.routing)
        self._tree, self._cost = tree, tree.stats
        return tree.completion_ids, None

    def observe_rewards(
        self, rewards_per_func: torch.Tensor, weights: torch.Tensor, completions: list, group_size: int
    ):
        """TRL's ``_calculate_rewards`` result ((B_all, F), all ranks) with the reward weights (F,), and the
        completions of all ranks: the rewards TreeRL's advantage needs and the distinct answers per group."""
        self._rewards = weighted_rewards(rewards_per_func, weights)
        if self._rewards.numel() % group_size == 0:
            self._compared = compared_rewards(rewards_per_func, weights, group_size, self.aggregation)
        self._distinct_answers = distinct_answers(completions, group_size)
        if self._rewards.numel() % group_size == 0:
            self._settled = settled_groups(self._rewards, group_size, self.solved_reward)

    def _metrics(self, training: bool) -> dict[str, float]:
        """``rollout/*`` metrics of the batch just produced, summed or averaged over ranks."""
        cost = self._cost
        if cost is None:  # generation bypassed (e.g. a custom rollout_func): nothing was measured
            return {}
        positions, entropies = cost.branch_relative_positions, cost.branch_entropies
        local = torch.tensor(
            [
                cost.decoded_tokens,
                cost.leaf_tokens,
                cost.leaves,
                cost.generation_seconds,
                1.0,
                sum(positions),
                len(positions),
                sum(entropies),
                cost.fallback_branches,
            ],
            dtype=torch.float64,
        )
        decoded, leaf_tokens, leaves, seconds, ranks, position_sum, branched, entropy_sum, fallback = (
            self.sum_across_ranks(local).tolist()
        )
        metrics = {
            "rollout/decoded_tokens": decoded,
            "rollout/decoded_tokens_per_completion": decoded / max(leaves, 1.0),
            "rollout/decoded_share": decoded / max(leaf_tokens, 1.0),
            "rollout/generation_seconds": seconds / ranks,
        }
        if self._distinct_answers is not None:
            metrics["rollout/distinct_answers"] = self._distinct_answers
        if self._settled is not None:
            metrics["rollout/all_right_groups"], metrics["rollout/all_wrong_groups"] = self._settled
        if self._tree is not None:
            metrics["rollout/branches"] = branched
            metrics["rollout/fallback_branches"] = fallback
            if branched:
                metrics["rollout/branch_relative_position"] = position_sum / branched
                metrics["rollout/branch_entropy"] = entropy_sum / branched
        if training:
            self.decoded_tokens_total += int(decoded)
            self.generation_seconds_total += seconds / ranks
            metrics["rollout/decoded_tokens_total"] = float(self.decoded_tokens_total)
            metrics["rollout/generation_seconds_total"] = self.generation_seconds_total
        return metrics

    def _mismatch(self, batch: dict, training_logps: torch.Tensor, trainer_routing: torch.Tensor | None) -> dict:
        """``mismatch/*`` metrics of the batch over all ranks: the engine's sampling log-probs against the
        trainer's (B, C), the engine's experts against those the trainer's routers chose (B, P + C, layers, k),
        and the share TRL's masking importance-sampling correction drops."""
        mask = batch["completion_mask"]  # (B, C)
        if "tool_mask" in batch:
            mask = mask * batch["tool_mask"]
        sampling = self.gather(batch["sampling_per_token_logps"].float(), 0.0)  # (B_all, C)
        training = self.gather(training_logps.float(), 0.0)  # (B_all, C)
        completion_mask = self.gather(mask, 0)  # (B_all, C)
        metrics = logprob_mismatch(sampling, training, completion_mask)
        if self.importance_sampling is not None:
            metrics |= importance_sampling_drops(sampling, training, completion_mask, *self.importance_sampling)
        prompt_width, completion_width = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
        engine = self.replay.engine_record(prompt_width, completion_width)
        if engine is not None and trainer_routing is not None:
            device = mask.device
            positions = torch.cat([torch.zeros_like(batch["prompt_ids"]), mask.long()], dim=1)  # (B, P + C)
            metrics |= routing_flips(  # int32: collective backends do not all gather int16
                self.gather(engine.to(device=device, dtype=torch.int32), -1),
                self.gather(trainer_routing.to(device=device, dtype=torch.int32), -1),
                self.gather(positions, 0),
            )
        return metrics
