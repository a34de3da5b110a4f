"""Forking-tree rollouts: branch positions, tree layout, TreeRL advantages, and exact KV-cache reuse."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from rlvr.models import load_pretrained
from rlvr.rollouts.branching import NO_POSITION, TreeLayout, branch_positions, tree_layout, treerl_advantages
from rlvr.rollouts.config import RolloutConfig
from rlvr.rollouts.tree import ForkingTreeSampler, aligned_prefix_cache, croppable, left_pad, right_pad

# --------------------------------------------------------------------------------------------------
# Branch positions


def test_branch_positions_take_the_highest_entropy_under_the_rules():
    entropies = torch.tensor([[0.1, 0.9, 0.8, 0.7, 0.2, 0.95, 0.3, 0.5]])  # (1, 8)
    lengths = torch.tensor([8])
    # no rule but distinct positions: the 3 highest
    assert branch_positions(entropies, lengths, 3, 0, 0, 1).tolist() == [[5, 1, 2]]
    # spacing 2: 5, then 1 (2 is too close to 1), then 3
    assert branch_positions(entropies, lengths, 3, 0, 0, 2).tolist() == [[5, 1, 3]]
    # min_prefix 2 drops 1; min_suffix 3 drops positions > 8 - 1 - 3 = 4, so 5 goes too
    assert branch_positions(entropies, lengths, 2, 2, 3, 1).tolist() == [[2, 3]]


def test_branch_positions_never_after_eos_nor_in_padding_and_fall_back_when_short():
    entropies = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    lengths = torch.tensor([3, 5])  # row 0 ends (EOS) at position 2; its 9.0s are padding
    chosen = branch_positions(entropies, lengths, 2, 0, 0, 1)
    assert chosen.tolist() == [[2, 1], [0, 1]]
    short = branch_positions(entropies, lengths, 4, 1, 1, 1)  # row 0 may use only position 1
    assert short.tolist() == [[1, NO_POSITION, NO_POSITION, NO_POSITION], [1, 2, 3, NO_POSITION]]


@pytest.mark.parametrize("length", [0, 1])
def test_one_token_and_empty_roots_have_no_branch_position(length):
    chosen = branch_positions(torch.rand(2, 4), torch.tensor([length, length]), 2, 1, 1, 1)
    assert (chosen == NO_POSITION).all()


def test_ties_take_the_earlier_position_and_results_are_deterministic():
    entropies = torch.full((3, 6), 0.5)
    first = branch_positions(entropies, torch.tensor([6, 6, 6]), 3, 0, 0, 2)
    assert first.tolist() == [[0, 2, 4]] * 3
    assert torch.equal(first, branch_positions(entropies.clone(), torch.tensor([6, 6, 6]), 3, 0, 0, 2))


def test_config_rejects_a_tree_that_does_not_make_g_leaves():
    assert RolloutConfig(branches=3).roots_per_prompt(8) == 2
    with pytest.raises(ValueError, match="branches: .* must divide num_generations \\(6\\)"):
        RolloutConfig(branches=3).roots_per_prompt(6)


# --------------------------------------------------------------------------------------------------
# Layout and TreeRL advantages


def test_tree_layout_groups_g_leaves_per_prompt_and_turns_fallbacks_into_roots():
    table = torch.tensor([[3, 7], [5, NO_POSITION], [2, 4], [1, 6]])  # 2 prompts x 2 roots, N = 2
    layout = tree_layout(table, group_size=6)
    assert layout.origin.tolist() == [0, 0, 0, 3, 3, 5, 0, 0, 0, 3, 3, 3]
    assert layout.position.tolist() == [0, 3, 7, 0, 5, 0, 0, 2, 4, 0, 1, 6]
    assert layout.is_root().tolist() == [True, False, False, True, False, True] + [True, False, False, True] + [
        False,
        False,
    ]


def test_treerl_advantages_on_a_hand_computed_tree():
    """One prompt, G = 4: root A branches at 2 (leaf B) and 4 (leaf C); root D has no branch.

    rewards A=1, B=0, C=1, D=0. V(prompt) = 0.5.
    A's segment [0,2): leaves {A,B,C}, V=2/3, parent prompt: ((2/3-.5)+(2/3-.5))/sqrt(3)
    A's segment [2,4): leaves {A,C}, V=1, parent V=2/3: ((1-.5)+(1-2/3))/sqrt(2)
    A's segment [4,end): leaves {A}, V=1, parent V=1: (0.5 + 0)/1
    B's own [2,end): V=0, parent 2/3: ((0-.5)+(0-2/3))/1
    C's own [4,end): V=1, parent 1: ((1-.5)+(1-1))/1
    D: V=0, parent prompt: ((0-.5)+(0-.5))/1
    """
    layout = TreeLayout(origin=torch.tensor([0, 0, 0, 3]), position=torch.tensor([0, 2, 4, 0]), group_size=4)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    lengths = torch.tensor([6, 5, 6, 3])
    advantages = treerl_advantages(rewards, layout, lengths, width=7)
    s0 = ((2 / 3 - 0.5) * 2) / math.sqrt(3)
    s1 = ((1 - 0.5) + (1 - 2 / 3)) / math.sqrt(2)
    s2 = 0.5
    b = (0 - 0.5) + (0 - 2 / 3)
    c = 0.5
    d = -1.0
    expected = torch.tensor(
        [
            [s0, s0, s1, s1, s2, s2, 0],
            [s0, s0, b, b, b, 0, 0],
            [s0, s0, s1, s1, c, c, 0],
            [d, d, d, 0, 0, 0, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)


def test_treerl_leaves_an_unscorable_leaf_out_of_values_and_weights():
    """The tree above with B unscorable (NaN): V(prompt) = 2/3 over A, C, D; A's first segment holds {A, C}
    scored, so its weight is 1/sqrt(2), not 1/sqrt(3); B's own tokens get 0."""
    layout = TreeLayout(origin=torch.tensor([0, 0, 0, 3]), position=torch.tensor([0, 2, 4, 0]), group_size=4)
    rewards = torch.tensor([1.0, float("nan"), 1.0, 0.0], dtype=torch.float64)
    advantages = treerl_advantages(rewards, layout, torch.tensor([6, 5, 6, 3]), width=7)
    prompt = 2 / 3
    s0 = ((1 - prompt) * 2) / math.sqrt(2)  # {A, B, C}: value 1 over A and C
    s1 = ((1 - prompt) + (1 - 1)) / math.sqrt(2)  # {A, C}
    s2 = c = 1 - prompt
    d = (0 - prompt) * 2
    expected = torch.tensor(
        [
            [s0, s0, s1, s1, s2, s2, 0],
            [0, 0, 0, 0, 0, 0, 0],
            [s0, s0, s1, s1, c, c, 0],
            [d, d, d, 0, 0, 0, 0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The sampler on a tiny float64 MoE


@pytest.fixture(scope="module")
def float64_policy(tiny_checkpoint):
    model, tokenizer = load_pretrained(tiny_checkpoint(), "float64")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # grouped_mm rejects float64
    model.eval()
    return model, tokenizer


def _prompts(tokenizer, group_size: int) -> list[list[int]]:
    texts = ["1+2=", "7-3+1=", "9="]  # different lengths: left padding matters
    return [tokenizer(text)["input_ids"] for text in texts for _ in range(group_size)]


def test_a_branch_continuing_the_root_reproduces_its_logits_at_every_position(float64_policy):
    """KV-cache reuse is exact: branches at different positions, in one right-aligned batch, fed the root's
    own tokens, give the logits of one full forward over the root (float64)."""
    model, tokenizer = float64_policy
    prompts = [tokenizer(text)["input_ids"] for text in ("1+2=", "7-3+1=")]
    input_ids, mask = left_pad(prompts, tokenizer.pad_token_id)  # (2, P)
    torch.manual_seed(0)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        do_sample=True,
        max_new_tokens=10,
        return_dict_in_generate=True,
        eos_token_id=None,  # full-length roots
        pad_token_id=tokenizer.pad_token_id,
    )
    assert croppable(out.cache)
    width_p = input_ids.shape[1]
    roots = out.sequences[:, width_p:]  # (2, 10)
    full_mask = torch.cat([mask, torch.ones_like(roots)], dim=1)
    with torch.no_grad():
        reference = model(
            input_ids=out.sequences, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)
        ).logits  # (2, P + 10, V)
    branch_root = torch.tensor([0, 1, 0, 1])
    position = torch.tensor([1, 4, 6, 0])  # different cut points in one batch, one at the first token
    width = width_p + int(position.max())
    sampler = ForkingTreeSampler(RolloutConfig(), [tokenizer.eos_token_id], tokenizer.pad_token_id)
    ids, branch_mask = sampler._aligned_contexts(input_ids, mask, roots, branch_root, position, width)
    cache = aligned_prefix_cache(out.cache, branch_root, width_p + position - 1, width - 1)
    steps = 3  # feed root[p-1], root[p], root[p+1] (the prompt's last token when p = 0)
    fed = torch.stack(
        [
            torch.cat([input_ids[r, -1:], roots[r]])[p : p + steps]  # token p-1 of the completion, then on
            for r, p in zip(branch_root.tolist(), position.tolist(), strict=True)
        ]
    )  # (Nb, steps)
    attention = torch.cat([branch_mask, torch.ones(len(fed), steps - 1, dtype=branch_mask.dtype)], dim=1)
    ids_with_fed = torch.cat([ids[:, :-1], fed], dim=1)
    assert torch.equal(ids[:, -1], fed[:, 0])  # the cached context ends one token before the fed ones
    positions = (attention.cumsum(-1) - 1)[:, -steps:]
    with torch.no_grad():
        logits = model(
            input_ids=ids_with_fed[:, -steps:], attention_mask=attention, position_ids=positions, cache=cache
        ).logits  # (Nb, steps, V)
    for row, (r, p) in enumerate(zip(branch_root.tolist(), position.tolist(), strict=True)):
        expected = reference[r, width_p + p - 1 : width_p + p - 1 + steps]
        torch.testing.assert_close(logits[row], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_greedy_branches_repeat_their_root_and_every_group_has_g_leaves(float64_policy, reuse_cache):
    """With greedy decoding a branch re-samples exactly its root's tokens: leaves equal their root."""
    model, tokenizer = float64_policy
    settings = RolloutConfig(mode="forking_tree", branches=3, min_prefix=1, min_suffix=1, reuse_cache=reuse_cache)
    sampler = ForkingTreeSampler(settings, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    config = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    rollout = sampler.sample(model, _prompts(tokenizer, 8), 8, config)
    assert len(rollout.completion_ids) == 24 and rollout.stats.leaves == 24
    assert rollout.stats.cache_reused is reuse_cache
    for index, completion in enumerate(rollout.completion_ids):
        root = rollout.completion_ids[(index // 8) * 8 + int(rollout.layout.origin[index])]
        assert completion == root, index
    assert rollout.stats.decoded_tokens < rollout.stats.leaf_tokens


@pytest.mark.parametrize("cache_implementation", ["dynamic", pytest.param("offloaded", marks=pytest.mark.gpu)])
def test_branches_reuse_the_roots_cache_when_a_cache_implementation_is_set(float64_policy, cache_implementation):
    """grpo.cache_implementation reaches the generation config; generate() refuses it beside a given cache,
    so the branches drop it (the roots' cache is what they continue) and leaves still equal their greedy root."""
    model, tokenizer = float64_policy
    settings = RolloutConfig(mode="forking_tree", branches=3, min_prefix=1, min_suffix=1, reuse_cache=True)
    sampler = ForkingTreeSampler(settings, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=12,
        pad_token_id=tokenizer.pad_token_id,
        cache_implementation=cache_implementation,
    )
    rollout = sampler.sample(model, _prompts(tokenizer, 8), 8, config)
    assert rollout.stats.cache_reused and config.cache_implementation == cache_implementation  # the caller's kept
    for index, completion in enumerate(rollout.completion_ids):
        assert completion == rollout.completion_ids[(index // 8) * 8 + int(rollout.layout.origin[index])], index


def test_sampled_trees_share_prefixes_are_deterministic_and_count_their_tokens(float64_policy):
    model, tokenizer = float64_policy
    settings = RolloutConfig(mode="forking_tree", branches=1, min_prefix=1, min_suffix=1, min_spacing=1)
    sampler = ForkingTreeSampler(settings, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    config = GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    first = sampler.sample(model, _prompts(tokenizer, 4), 4, config)
    torch.manual_seed(3)
    again = sampler.sample(model, _prompts(tokenizer, 4), 4, config)
    assert first.completion_ids == again.completion_ids
    layout = first.layout
    shared = 0
    for index, completion in enumerate(first.completion_ids):
        root = first.completion_ids[(index // 4) * 4 + int(layout.origin[index])]
        p = int(layout.position[index])
        assert completion[:p] == root[:p]  # a leaf shares its root's prefix token for token
        assert len(completion) <= 12
        if not layout.is_root()[index]:
            shared += p
    assert first.stats.leaf_tokens - first.stats.decoded_tokens == shared
    assert all(0.0 <= q < 1.0 for q in first.stats.branch_relative_positions)


@pytest.mark.parametrize("reuse_cache", [True, False])
def test_branch_routing_records_equal_a_fresh_recording_of_each_leaf(float64_policy, reuse_cache):
    """Routing replay of a tree: every leaf's record (a branch's prefix copied from its root, then its own
    decoding steps) holds the experts that one teacher-forced forward over prompt + leaf chooses."""
    from rlvr.moe.hooks import RoutingHooks
    from rlvr.moe.replay import NOT_RECORDED, lay_out

    model, tokenizer = float64_policy
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    try:
        settings = RolloutConfig(mode="forking_tree", branches=3, min_prefix=1, min_suffix=1, reuse_cache=reuse_cache)
        sampler = ForkingTreeSampler(settings, [tokenizer.eos_token_id], tokenizer.pad_token_id)
        config = GenerationConfig(do_sample=True, max_new_tokens=10, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(5)
        rollout = sampler.sample(model, _prompts(tokenizer, 4), 4, config, routing_hooks=hooks)
        prompts = _prompts(tokenizer, 4)
        completions = rollout.completion_ids
        assert rollout.routing is not None and rollout.routing.prompt.shape[0] == len(completions)
        prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)  # (B, P)
        completion_ids, completion_mask = right_pad(completions, tokenizer.pad_token_id)  # (B, C)
        width = completion_ids.shape[1]
        record = lay_out(rollout.routing, prompt_ids.shape[1], width, hooks.num_experts)  # (B, P + C, layers, k)

        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention = torch.cat([prompt_mask, completion_mask], dim=1)
        hooks.start_recording()
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0))
        (fresh,) = hooks.stop_recording()
        fresh = fresh.reshape(*input_ids.shape, *fresh.shape[1:])  # (B, P + C, layers, k)
    finally:
        hooks.remove()
    prompt_width = prompt_ids.shape[1]
    branched = 0
    for row, completion in enumerate(completions):
        # every real token but the leaf's last (never fed during generation) was recorded
        real = torch.zeros(input_ids.shape[1], dtype=torch.bool)
        real[:prompt_width] = prompt_mask[row].bool()
        real[prompt_width : prompt_width + len(completion) - 1] = True
        assert (record[row, real] != NOT_RECORDED).all(), row
        same = torch.sort(record[row, real].long(), -1).values == torch.sort(fresh[row, real].long(), -1).values
        assert same.all(), row
        branched += int(not rollout.layout.is_root()[row] and rollout.layout.position[row] > 0)
    assert branched > 0
