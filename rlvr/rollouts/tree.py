"""Forking-tree sampling with transformers' ``generate``: roots, then branches that reuse the roots' KV cache.

For the G completions of each prompt (see :mod:`rlvr.rollouts.branching` for the tree and its rules):

1. ``M`` roots per prompt, one ``generate`` call for the whole batch; a logits processor records the
   entropy of each sampling distribution at the sampling temperature (the quantity the forking-token
   selection uses), from the scores ``generate`` already has: no extra forward.
2. ``N`` branch positions per root (:func:`rlvr.rollouts.branching.branch_positions`).
3. One ``generate`` call for every branch. A branch at position ``p`` continues ``prompt + root[:p]``: its
   KV cache is the root's, cut to ``P + p - 1`` tokens, so only the token before the branch is fed again
   (it yields the distribution of token ``p``, which is sampled afresh). Branches of different positions
   share one call by right-aligning their caches: each row is left-padded to the longest context,
   the attention mask hides the padding, and position ids follow the mask as in any left-padded batch.
   Each branch stops at its own budget, ``max_new_tokens - p``, so a leaf is never longer than a root
   may be. Caches that cannot be cut this way (sliding-window or linear-attention layers) or
   ``reuse_cache=false``: the branch re-reads its whole prefix instead (same samples, more compute).
4. Leaves in layout order: ``root 0, its N branches, root 1, ...`` per prompt.

The cost is counted as it is spent: ``decoded_tokens`` are the completion tokens sampled (a shared
prefix once); ``leaf_tokens`` what the leaves hold (what G i.i.d. samples of the same lengths decode).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, StoppingCriteria
from transformers.cache_utils import DynamicLayer

from rlvr.moe.replay import NOT_RECORDED, RolloutRecord, rollout_record
from rlvr.rollouts.branching import NO_POSITION, TreeLayout, branch_positions, tree_layout
from rlvr.rollouts.config import RolloutConfig


class SamplingEntropy(LogitsProcessor):
    """Records, per decoding step, the entropy of ``softmax(scores / temperature)``; scores pass unchanged.

    transformers applies user processors before its temperature/top-k/top-p warpers, so the scores here
    are the model's (float32) logits: dividing by the temperature gives the distribution the forking
    selection scores (top-k/top-p truncation is not part of it)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []  # per step (B,) float32

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        log_probs = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        entropy = -(log_probs.exp() * log_probs).nan_to_num(0.0).sum(dim=-1)  # -inf logits contribute 0
        self.steps.append(entropy)
        return scores

    def entropies(self) -> torch.Tensor:
        """(B, steps) entropies of every sampled position."""
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(0, 0)


class RowBudget(StoppingCriteria):
    """Row ``i`` is done once it has ``budget[i]`` new tokens (transformers pads finished rows)."""

    def __init__(self, start_length: int, budget: torch.Tensor):
        self.start_length, self.budget = start_length, budget

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.start_length
        return generated >= self.budget.to(input_ids.device)


@dataclass
class GenerationCost:
    """What sampling one generation batch cost on this rank and, for forking trees, where they branched."""

    decoded_tokens: int  # completion tokens sampled: roots + each branch's own continuation (i.i.d.: all)
    leaf_tokens: int  # completion tokens the leaves hold (shared prefixes counted per leaf)
    leaves: int
    generation_seconds: float
    cache_reused: bool = False
    fallback_branches: int = 0  # branches without an eligible position: i.i.d. samples of the prompt
    branch_relative_positions: list[float] = field(default_factory=list)  # position / root length
    branch_entropies: list[float] = field(default_factory=list)  # entropy at the branch position


@dataclass
class TreeRollout:
    completion_ids: list[list[int]]  # per leaf, EOS included, no padding
    layout: TreeLayout
    stats: GenerationCost
    routing: RolloutRecord | None = None  # per leaf, when sampled with routing hooks (routing replay)


class _Recording:
    """Records the experts of one ``generate`` call with ``hooks`` (a no-op without them)."""

    def __init__(self, hooks):
        self.hooks, self.forwards = hooks, None

    def __enter__(self):
        if self.hooks is not None:
            self.hooks.start_recording()
        return self

    def __exit__(self, *exc):
        if self.hooks is not None:
            self.forwards = self.hooks.stop_recording()


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and attention mask of left-padded ``rows``."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[index, width - len(row) :] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) ids and attention mask of right-padded ``rows`` (completions, as a training batch holds them)."""
    ids, mask = left_pad([row[::-1] for row in rows], pad_id)
    return ids.flip(1), mask.flip(1)


def completion_lengths(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B,) tokens up to and including the first EOS (the whole row when there is none)."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))  # (B, C)
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completions.shape[1])
    return first.cpu()


def croppable(cache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention layer that can be cut and re-aligned."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)


def aligned_prefix_cache(cache, rows: torch.Tensor, kept: torch.Tensor, width: int) -> DynamicCache:
    """A cache of ``rows`` of ``cache``, row ``i`` cut to its first ``kept[i]`` tokens and right-aligned
    in ``width`` slots (the slots before it are zeros, hidden by the attention mask)."""
    slots = torch.arange(width)  # (S,)
    shift = (width - kept).unsqueeze(1)  # (Nb, 1)
    source = (slots.unsqueeze(0) - shift).clamp(min=0)  # (Nb, S) slot j holds token j - shift
    padding = slots.unsqueeze(0) < shift  # (Nb, S)
    layers = []
    for layer in cache.layers:
        pair = []
        for states in (layer.keys, layer.values):  # (R, H, L, D)
            picked = states[rows.to(states.device)]  # (Nb, H, L, D)
            index = source.to(states.device)[:, None, :, None].expand(-1, picked.shape[1], -1, picked.shape[3])
            aligned = torch.gather(picked, 2, index)  # (Nb, H, S, D)
            pair.append(aligned.masked_fill(padding.to(states.device)[:, None, :, None], 0.0))
        layers.append(tuple(pair))
    return DynamicCache(ddp_cache_data=layers)


class ForkingTreeSampler:
    """Samples each prompt's G completions as forking trees (see the module docstring)."""

    def __init__(self, settings: RolloutConfig, eos_token_ids: list[int], pad_token_id: int):
        self.settings = settings
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def sample(
        self,
        model,
        prompt_ids: list[list[int]],
        group_size: int,
        generation_config: GenerationConfig,
        routing_hooks=None,
    ) -> TreeRollout:
        """Leaves for ``prompt_ids`` (B rows, each prompt repeated on ``group_size`` consecutive rows).

        ``routing_hooks`` (:class:`rlvr.moe.hooks.RoutingHooks`): record the experts of every leaf for
        routing replay; a branch's prefix takes its root's record, copied exactly."""
        start = time.perf_counter()
        settings = self.settings
        roots_per_prompt = settings.roots_per_prompt(group_size)
        if len(prompt_ids) % group_size:
            raise ValueError(f"forking_tree: {len(prompt_ids)} rows do not hold whole groups of {group_size}")
        prompts = prompt_ids[::group_size]
        for index, prompt in enumerate(prompts):
            if any(row != prompt for row in prompt_ids[index * group_size : (index + 1) * group_size]):
                raise ValueError("forking_tree: the rows of one group must repeat one prompt (TRL's RepeatSampler)")
        device = model.device
        max_new_tokens = int(generation_config.max_new_tokens)
        temperature = float(generation_config.temperature or 1.0)

        # 1. roots
        root_prompts = [prompt for prompt in prompts for _ in range(roots_per_prompt)]
        input_ids, attention_mask = left_pad(root_prompts, self.pad_token_id)  # (R, P)
        entropy = SamplingEntropy(temperature)
        with _Recording(routing_hooks) as root_routing:
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config,
                logits_processor=[entropy],
                return_dict_in_generate=True,
                max_new_tokens=max_new_tokens,
            )
        prompt_width = input_ids.shape[1]
        roots = output.sequences[:, prompt_width:].cpu()  # (R, Cr)
        root_lengths = completion_lengths(roots, self.eos_token_ids)  # (R,)
        entropies = entropy.entropies().cpu()  # (R, Cr)

        # 2. where each root branches
        table = branch_positions(
            entropies,
            root_lengths,
            settings.branches,
            settings.min_prefix,
            settings.min_suffix,
            settings.min_spacing,
        )  # (R, N)
        layout = tree_layout(table, group_size)
        branch_root = torch.arange(table.shape[0]).repeat_interleave(settings.branches)  # (Nb,)
        branch_position = table.reshape(-1).clamp(min=0)  # (Nb,) fallbacks start at 0
        fallback = int((table == NO_POSITION).sum())

        # 3. every branch in one call
        # row i: its root's padded prompt and root[:p_i], right-aligned (a left-padded batch)
        width = prompt_width + int(branch_position.max())
        branch_ids, branch_mask = self._aligned_contexts(
            input_ids, attention_mask, roots, branch_root, branch_position, width
        )
        reuse = settings.reuse_cache and croppable(output.cache)
        extra, branch_config = {}, generation_config
        if reuse:  # the root's cache cut to P + p_i - 1 tokens; otherwise generate re-reads every context
            kept = prompt_width + branch_position - 1
            extra["cache"] = aligned_prefix_cache(output.cache, branch_root, kept, width - 1)
            # generate() refuses a cache together with a cache_implementation ("dynamic", "offloaded"):
            # the roots were sampled with it, the branches continue in the cache it made
            branch_config = copy.deepcopy(generation_config)
            branch_config.cache_implementation = None
        budget = max_new_tokens - branch_position  # (Nb,)
        context_width = branch_ids.shape[1]
        with _Recording(routing_hooks) as branch_routing:
            branches = model.generate(
                input_ids=branch_ids.to(device),
                attention_mask=branch_mask.to(device),
                generation_config=branch_config,
                stopping_criteria=[RowBudget(context_width, budget)],
                max_new_tokens=int(budget.max()),
                **extra,
            )
        continuations = branches[:, context_width:].cpu()  # (Nb, Cb)
        lengths = torch.minimum(completion_lengths(continuations, self.eos_token_ids), budget)

        # 4. leaves in layout order
        completions: list[list[int]] = []
        per_root = 1 + settings.branches
        for root in range(roots.shape[0]):
            completions.append(roots[root, : int(root_lengths[root])].tolist())
            for column in range(settings.branches):
                branch = root * settings.branches + column
                prefix = roots[root, : int(branch_position[branch])].tolist()
                completions.append(prefix + continuations[branch, : int(lengths[branch])].tolist())
        assert len(completions) == len(prompts) * roots_per_prompt * per_root == len(prompt_ids)

        routing = None
        if routing_hooks is not None:
            routing = _leaf_routing(
                rollout_record(root_routing.forwards, roots.shape[0]),
                branch_routing.forwards[1:],
                branch_position,
                settings.branches,
                max(len(completion) for completion in completions),
            )

        real = table != NO_POSITION  # (R, N)
        relative = table.double() / root_lengths.double().unsqueeze(1)
        at_branch = entropies.gather(1, table.clamp(min=0)) if entropies.numel() else torch.zeros_like(relative)
        stats = GenerationCost(
            decoded_tokens=int(root_lengths.sum() + lengths.sum()),
            leaf_tokens=sum(len(completion) for completion in completions),
            leaves=len(completions),
            generation_seconds=time.perf_counter() - start,
            cache_reused=reuse,
            fallback_branches=fallback,
            branch_relative_positions=relative[real].tolist(),
            branch_entropies=at_branch[real].tolist(),
        )
        return TreeRollout(completions, layout, stats, routing)

    def _aligned_contexts(
        self,
        root_ids: torch.Tensor,
        root_mask: torch.Tensor,
        roots: torch.Tensor,
        branch_root: torch.Tensor,
        position: torch.Tensor,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Nb, width) ids and attention mask: row i is its root's left-padded prompt ((R, P) ``root_ids``
        and ``root_mask``) then ``roots[i][:p_i]``, right-aligned, so that its cached slots line up."""
        prompt_width = root_ids.shape[1]
        ids = torch.full((branch_root.numel(), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((branch_root.numel(), width), dtype=root_mask.dtype)
        for row, (root, p) in enumerate(zip(branch_root.tolist(), position.tolist(), strict=True)):
            begin = width - prompt_width - p
            ids[row, begin : begin + prompt_width] = root_ids[root]
            ids[row, begin + prompt_width :] = roots[root, :p]
            mask[row, begin : begin + prompt_width] = root_mask[root]
            mask[row, begin + prompt_width :] = 1
        return ids, mask


def _leaf_routing(
    roots: RolloutRecord, branch_steps: list[torch.Tensor], position: torch.Tensor, branches: int, width: int
) -> RolloutRecord:
    """Per-leaf routing in layout order. A branch at ``p`` holds its root's record for the prompt and
    completion positions ``< p`` (the shared prefix, copied), then its own decoding steps: the branch's
    first forward re-reads the token before ``p`` (the root's record has it already), its step ``s`` feeds
    completion position ``p + s - 1``. ``branch_steps``: (Nb, layers, k) per decoding step after the first."""
    root_count, _, layers, top_k = roots.prompt.shape
    per_root = 1 + branches
    completion = torch.full((root_count * per_root, width, layers, top_k), NOT_RECORDED, dtype=roots.completion.dtype)
    steps = (
        torch.stack(branch_steps, dim=1) if branch_steps else completion.new_empty(position.numel(), 0, layers, top_k)
    )
    root_width = min(roots.completion.shape[1], width)
    for root in range(root_count):
        completion[root * per_root, :root_width] = roots.completion[root, :root_width]
        for column in range(branches):
            branch = root * branches + column
            leaf = root * per_root + 1 + column
            p = int(position[branch])
            completion[leaf, :p] = roots.completion[root, :p]
            own = min(steps.shape[1], width - p)
            completion[leaf, p : p + own] = steps[branch, :own]
    prompt = roots.prompt.repeat_interleave(per_root, dim=0)  # (B, P_gen, layers, k)
    return RolloutRecord(prompt, completion)
