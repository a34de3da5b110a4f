"""rlvr.moe: adapters, gradient gates, scoped router losses and routing analytics."""

from __future__ import annotations

import math

import pytest
import torch
from host_reads import count_host_reads
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from rlvr.models import ARCHITECTURES, TinyMoESpec, build_char_tokenizer, build_tiny_moe
from rlvr.moe import (
    RoutingHooks,
    UnknownMoEArchitecture,
    decision_positions,
    find_moe_layers,
    layer_routing,
    load_balancing_loss,
    router_z_loss,
    summarize,
)
from rlvr.moe.stats import routing_by_layer

SPEC = TinyMoESpec(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, expert_size=32, num_experts=4, top_k=2)
BATCH, LENGTH = 3, 9


def float64_model(architecture: str, seed: int = 0):
    tokenizer = build_char_tokenizer()
    model = build_tiny_moe(architecture, SPEC, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    model.set_experts_implementation("eager")  # grouped_mm rejects float64
    return model.double().train()


def random_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 90, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[0, :3] = 0  # left padding
    in_scope = torch.rand(BATCH, LENGTH, generator=generator) < 0.4  # (B, L) positions kept
    targets = torch.randn(BATCH, LENGTH, generator=generator, dtype=torch.float64)
    return input_ids, attention_mask, in_scope, targets


def objective(model, input_ids, attention_mask, targets):
    """A scalar that depends on every position (so every router gets gradient)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    return (logits.logsumexp(-1) * targets * attention_mask).sum()


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def mix(values, in_scope_rows, outside):
    """Reference gate: in-scope rows unchanged, other rows' gradient scaled by ``outside``."""
    scale = in_scope_rows.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return scale * values + (1 - scale) * (outside * values + (1 - outside) * values.detach())


# --------------------------------------------------------------------------------------------------
# Adapters


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_adapters_find_every_layer_and_recompute_gate_weights(architecture):
    model = float64_model(architecture)
    layers = find_moe_layers(model)
    assert len(layers) == SPEC.num_layers and all(layer.num_experts == 4 and layer.top_k == 2 for layer in layers)
    hidden = torch.randn(11, SPEC.hidden_size, dtype=torch.float64)
    for layer in layers:
        logits, weights, indices = layer.route(hidden)
        torch.testing.assert_close(layer.adapter.gate_weights(logits, indices, layer.router), weights)


def test_unknown_architecture_lists_what_was_looked_for():
    with pytest.raises(UnknownMoEArchitecture, match="Qwen3MoeSparseMoeBlock.*MixtralSparseMoeBlock"):
        find_moe_layers(nn.Sequential(nn.Linear(2, 2)))


def test_decision_positions_shift_by_one():
    completion = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)  # (B, C=3)
    positions = decision_positions(completion, 5)  # prompt of 2 tokens
    assert positions.tolist() == [[False, True, False, True, False], [False, False, True, True, False]]


# --------------------------------------------------------------------------------------------------
# Gradient gates


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("outside", [0.0, 0.25])
def test_router_gate_equals_detaching_out_of_scope_router_outputs(architecture, outside):
    input_ids, attention_mask, in_scope, targets = random_batch()
    gated = float64_model(architecture)
    hooks = RoutingHooks(gated, gate_routers=True, gate_experts=False)
    routing = hooks.begin(BATCH, LENGTH)
    value = objective(gated, input_ids, attention_mask, targets)
    routing.router_gate.set(in_scope, outside)  # known only after the forward, as in the trainer
    value.backward()
    hooks.end()

    reference = float64_model(architecture)
    rows = in_scope.reshape(-1)
    for layer in find_moe_layers(reference):
        layer.router.register_forward_hook(
            lambda module, inputs, output: tuple(
                mix(part, rows, outside) if part.is_floating_point() else part for part in output
            )  # every float output (logits and weights, or Llama 4's scores and logits); indices as they are
        )
    expected = objective(reference, input_ids, attention_mask, targets)
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    actual, wanted = grads_of(gated), grads_of(reference)
    assert actual.keys() == wanted.keys()
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-10, atol=1e-12, msg=name)
    routers = [f"{layer.name}.{layer.adapter.router_attribute}." for layer in find_moe_layers(gated)]
    router_grads = [actual[n] for n in actual if n.startswith(tuple(routers)) and "bias" not in n]
    assert router_grads and all(g.abs().sum() > 0 for g in router_grads)


def expert_gated(architecture: str, seed: int):
    """A float64 model whose expert gate kept only the in-scope positions of one backward, and that batch."""
    batch = random_batch(seed)
    input_ids, attention_mask, in_scope, targets = batch
    gated = float64_model(architecture)
    hooks = RoutingHooks(gated, gate_routers=False, gate_experts=True)
    routing = hooks.begin(BATCH, LENGTH)
    value = objective(gated, input_ids, attention_mask, targets)
    routing.expert_gate.set(in_scope, 0.0)
    value.backward()
    hooks.end()
    return gated, batch


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_expert_gate_equals_detaching_out_of_scope_block_outputs(architecture):
    gated, (input_ids, attention_mask, in_scope, targets) = expert_gated(architecture, 1)

    reference = float64_model(architecture)

    def detach_outside(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        scale = in_scope.to(hidden.dtype).unsqueeze(-1)
        hidden = scale * hidden + (1 - scale) * hidden.detach()
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for layer in find_moe_layers(reference):
        layer.block.register_forward_hook(detach_outside)
    objective(reference, input_ids, attention_mask, targets).backward()
    actual, wanted = grads_of(gated), grads_of(reference)
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-10, atol=1e-12, msg=name)


def test_scope_all_with_weight_one_is_bit_identical():
    input_ids, attention_mask, in_scope, targets = random_batch(2)
    plain = float64_model("qwen3_moe")
    objective(plain, input_ids, attention_mask, targets).backward()
    gated = float64_model("qwen3_moe")
    hooks = RoutingHooks(gated)
    routing = hooks.begin(BATCH, LENGTH)
    value = objective(gated, input_ids, attention_mask, targets)
    routing.router_gate.set(torch.ones(BATCH, LENGTH, dtype=torch.bool), 0.0)  # every position in scope
    routing.expert_gate.set(None, 0.0)  # scope "all": no gate
    value.backward()
    for name, grad in grads_of(plain).items():
        assert torch.equal(grad, dict(gated.named_parameters())[name].grad), name


def test_hooks_do_nothing_outside_a_recorded_forward():
    model = float64_model("olmoe")
    hooks = RoutingHooks(model)
    with torch.no_grad():
        model(input_ids=torch.randint(5, 90, (2, 4)))
    assert hooks.current is None
    routing = hooks.begin(2, 4)
    with torch.no_grad():  # generation / old log-probs: no recording
        model(input_ids=torch.randint(5, 90, (2, 4)))
    assert routing.logits == []


# --------------------------------------------------------------------------------------------------
# Router losses


def test_load_balancing_scope_all_equals_transformers():
    generator = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(BATCH * LENGTH, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    attention_mask = torch.ones(BATCH, LENGTH)
    attention_mask[0, :4] = 0
    probabilities = [torch.softmax(layer, -1) for layer in logits]
    indices = [torch.topk(p, 2, dim=-1).indices for p in probabilities]
    ours, value = load_balancing_loss(probabilities, indices, attention_mask.reshape(-1))
    assert value == pytest.approx(float(ours))
    theirs = load_balancing_loss_func(logits, num_experts=6, top_k=2, attention_mask=attention_mask)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=1e-8)
    # no attention mask form
    ones, _ = load_balancing_loss(probabilities, indices, torch.ones(BATCH * LENGTH))
    torch.testing.assert_close(ones.double(), load_balancing_loss_func(logits, 6, 2).double(), rtol=1e-6, atol=1e-8)


def test_router_losses_on_empty_scope_are_zero_not_nan():
    logits = [torch.randn(5, 4, requires_grad=True)]
    indices = [torch.topk(logits[0], 2).indices]
    empty = torch.zeros(5)
    balance, _ = load_balancing_loss([torch.softmax(logits[0], -1)], indices, empty)
    z_loss, _ = router_z_loss(logits, empty)
    assert balance.item() == 0.0 and z_loss.item() == 0.0
    (balance + z_loss).backward()
    assert torch.isfinite(logits[0].grad).all()


def test_z_loss_matches_definition_on_chosen_tokens():
    logits = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)]
    chosen = torch.tensor([1, 0, 1, 1, 0, 0.0])
    expected = sum(torch.logsumexp(layer[chosen.bool()], -1).square().mean() for layer in logits) / 2
    torch.testing.assert_close(router_z_loss(logits, chosen)[0].double(), expected)


@pytest.mark.parametrize("loss_name", ["load_balancing", "z_loss"])
def test_router_losses_pooled_over_ranks_equal_the_one_process_loss(loss_name):
    """Global-batch pooling: the mean over ranks of each rank's loss (what gradient averaging sees) equals
    the loss over all tokens in one process, in value and in gradient; shards of unequal size."""
    generator = torch.Generator().manual_seed(3)
    tokens, experts, layers = 23, 5, 2
    logits = [
        torch.randn(tokens, experts, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(layers)
    ]
    chosen = (torch.rand(tokens, generator=generator) < 0.6).double()  # a scope: some tokens count
    shards = [slice(0, 9), slice(9, tokens)]  # rank 0 holds 9 tokens, rank 1 holds 14

    def loss_of(rows, **pooling):
        shard_logits = [layer[rows] for layer in logits]
        if loss_name == "z_loss":
            return router_z_loss(shard_logits, chosen[rows], **pooling)
        probabilities = [torch.softmax(layer, -1) for layer in shard_logits]
        indices = [torch.topk(layer, 2, dim=-1).indices for layer in shard_logits]
        return load_balancing_loss(probabilities, indices, chosen[rows], **pooling)

    one_loss, one_value = loss_of(slice(0, tokens))
    one_gradients = torch.autograd.grad(one_loss, logits)

    recorded = []  # a two-rank all-reduce, replayed: record each rank's statistics, then hand back their sum
    for rows in shards:
        loss_of(rows, sum_across_ranks=lambda stats: recorded.append(stats) or stats, world_size=2)
    total = recorded[0] + recorded[1]
    rank_losses, rank_values = zip(
        *(loss_of(rows, sum_across_ranks=lambda stats: total, world_size=2) for rows in shards), strict=True
    )
    mean_loss = (rank_losses[0] + rank_losses[1]) / 2
    torch.testing.assert_close(mean_loss.double(), one_loss.double(), rtol=1e-6, atol=1e-9)
    assert rank_values[0] == rank_values[1] == pytest.approx(one_value, rel=1e-6)
    for pooled, single in zip(torch.autograd.grad(mean_loss, logits), one_gradients, strict=True):
        torch.testing.assert_close(pooled, single, rtol=1e-5, atol=1e-9)
    # without pooling the two ranks' mean is a different loss: the test can tell them apart
    local_mean = (loss_of(shards[0])[0] + loss_of(shards[1])[0]) / 2
    assert abs(float(local_mean.detach()) - float(one_loss.detach())) > 1e-4


# --------------------------------------------------------------------------------------------------
# Analytics


def test_analytics_on_a_hand_built_routing():
    # 4 experts, top-1 for clarity. Tokens 0-1 forking -> expert 0; tokens 2-5 other -> experts 0,1,2,3.
    indices = torch.tensor([[0], [0], [0], [1], [2], [3], [3]])
    probabilities = torch.tensor([[1.0, 0, 0, 0]] * 2 + [[0.25] * 4] * 4 + [[0.5, 0.5, 0, 0]])
    forking = torch.tensor([1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    completion = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # the last token is a prompt token
    layer = layer_routing(indices, probabilities, forking, completion)
    assert layer.load_forking == [1.0, 0.0, 0.0, 0.0]
    assert layer.load_other == [0.25, 0.25, 0.25, 0.25]
    # JS(p, q) with p = (1,0,0,0), q uniform: m = (5/8, 1/8, 1/8, 1/8)
    expected_js = 0.5 * math.log2(1 / (5 / 8)) + 0.5 * (
        0.25 * math.log2(0.25 / (5 / 8)) + 0.75 * math.log2(0.25 / (1 / 8))
    )
    assert layer.specialization == pytest.approx(expected_js)
    assert layer.router_entropy_forking == pytest.approx(0.0)
    assert layer.router_entropy_other == pytest.approx(math.log(4))
    assert layer.imbalance == pytest.approx(3 / 6 * 4)  # expert 0 has 3 of 6 completion assignments
    assert math.isnan(layer.drift)
    replayed = torch.tensor([[0], [1], [0], [1], [2], [3], [0]])
    drifted = layer_routing(
        indices, probabilities, forking, completion, replayed_indices=replayed, live_indices=indices
    )
    assert drifted.drift == pytest.approx(1 / 6)  # token 1 differs; token 6 is not a completion token
    both = routing_by_layer([indices, indices], [probabilities] * 2, forking, completion, [indices, replayed])
    metrics = {key: float(value) for key, value in summarize(both).items()}
    assert metrics["moe/specialization_js"] == pytest.approx(expected_js)
    assert metrics["moe/routing_drift"] == pytest.approx(1 / 12)  # mean of the layers' 0 and 1/6
    assert metrics["moe/layer1/specialization_js"] == pytest.approx(expected_js)
    assert "moe/routing_drift" not in summarize(routing_by_layer([indices], [probabilities], forking, completion))


def test_analytics_with_no_forking_tokens_give_nan_not_errors():
    indices = torch.tensor([[0], [1]])
    layer = layer_routing(
        indices, torch.full((2, 2), 0.5), torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    )
    assert math.isnan(layer.specialization) and math.isnan(layer.router_entropy_forking)
    assert layer.load_other == [0.5, 0.5]


# --------------------------------------------------------------------------------------------------
# Routing replay


def record_routing(model, hooks, input_ids, attention_mask):
    hooks.start_recording()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    (forward,) = hooks.stop_recording()
    return logits, forward.reshape(*input_ids.shape, *forward.shape[1:])  # (B, L, layers, k)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_replaying_own_routing_reproduces_logits_exactly(architecture):
    input_ids, attention_mask, _, _ = random_batch(3)
    model = float64_model(architecture)
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    live_logits, recorded = record_routing(model, hooks, input_ids, attention_mask)
    assert recorded.shape == (BATCH, LENGTH, SPEC.num_layers, SPEC.top_k)
    routing = hooks.begin(BATCH, LENGTH, forced=recorded)
    replayed_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    hooks.end()
    assert torch.equal(replayed_logits, live_logits)
    for used, live in zip(routing.indices, routing.live_indices, strict=True):
        assert torch.equal(used, live)


@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_replay_after_a_weight_change_uses_recorded_experts_and_trains_the_router(architecture):
    input_ids, attention_mask, _, targets = random_batch(4)
    model = float64_model(architecture)
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    _, recorded = record_routing(model, hooks, input_ids, attention_mask)
    layers = find_moe_layers(model)
    with torch.no_grad():
        for layer in layers:  # move the routers far enough that their own choices change
            layer.router.weight.add_(torch.randn_like(layer.router.weight))
    routing = hooks.begin(BATCH, LENGTH, forced=recorded)
    objective(model, input_ids, attention_mask, targets).backward()
    hooks.end()
    for index, (used, live) in enumerate(zip(routing.indices, routing.live_indices, strict=True)):
        assert torch.equal(used, recorded[:, :, index].reshape(-1, SPEC.top_k).to(used.dtype))
    assert any(not torch.equal(used, live) for used, live in zip(routing.indices, routing.live_indices, strict=True))
    for layer in layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_forced_routing_with_wrong_shape_is_refused():
    model = float64_model("qwen3_moe")
    hooks = RoutingHooks(model)
    with pytest.raises(ValueError, match="recorded routing has shape"):
        hooks.begin(2, 5, forced=torch.zeros(2, 4, SPEC.num_layers, SPEC.top_k, dtype=torch.int16))


@pytest.mark.parametrize("architecture", ["qwen3_moe", "olmoe"])
def test_rollout_record_matches_the_full_forward_routing(architecture):
    """Routing recorded step by step during generate(), stitched to the (B, P + C) layout, equals the
    routing of one forward over prompt + completion (same weights): the position bookkeeping is right."""
    from rlvr.moe.replay import NOT_RECORDED, stitch_rollout

    model = float64_model(architecture).eval()
    tokenizer = build_char_tokenizer()
    prompts = tokenizer(["Compute: 1+2", "9-4+3"], return_tensors="pt", padding=True)
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    hooks.start_recording()
    with torch.no_grad():
        generated = model.generate(
            **prompts, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    forwards = hooks.stop_recording()
    batch, prompt_length = prompts["input_ids"].shape
    completion_length = generated.shape[1] - prompt_length
    stitched = stitch_rollout(forwards, batch, prompt_length, completion_length, SPEC.num_experts)

    attention = torch.cat([prompts["attention_mask"], torch.ones(batch, completion_length, dtype=torch.long)], 1)
    _, full = record_routing(model, hooks, generated, attention)
    recorded = stitched[..., 0] != NOT_RECORDED  # (B, L, layers)
    assert recorded[:, : prompt_length + completion_length - 1].all() and not recorded[:, -1].any()
    real = attention.bool()[:, :, None].expand_as(recorded) & recorded  # padding routing is arbitrary
    same_set = torch.sort(stitched.long(), -1).values == torch.sort(full.long(), -1).values
    assert same_set.all(-1)[real].all()


def random_routing(seed: int, tokens: int, layers: int, completion_share: float, experts: int = 6):
    """Per layer (N, E) router probabilities, the top-2 experts used and a live choice from noisier scores; (N,)
    forking and completion masks."""
    generator = torch.Generator().manual_seed(seed)
    probabilities = [torch.softmax(torch.randn(tokens, experts, generator=generator), -1) for _ in range(layers)]
    used = [torch.topk(p, 2).indices for p in probabilities]
    live = [torch.topk(p + 0.3 * torch.rand(tokens, experts, generator=generator), 2).indices for p in probabilities]
    completion = torch.rand(tokens, generator=generator) < completion_share
    forking = completion & (torch.rand(tokens, generator=generator) < 0.3)
    return probabilities, used, live, forking, completion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_analytics_match_the_per_layer_reference(seed):
    tokens, layers = 50, 3
    probabilities, used, live, forking, completion = random_routing(seed, tokens, layers, completion_share=0.7)
    with count_host_reads() as reads:
        routing = routing_by_layer(used, probabilities, forking, completion, live_indices=live)
        summarize(routing)
    assert reads == []
    for index in range(layers):
        fast = routing.layer(index)
        slow = layer_routing(used[index], probabilities[index], forking, completion, used[index], live[index])
        for name in ("specialization", "router_entropy_forking", "router_entropy_other", "imbalance", "drift"):
            assert getattr(fast, name) == pytest.approx(getattr(slow, name), rel=1e-5, abs=1e-6), name
        assert fast.load_forking == pytest.approx(slow.load_forking)
        assert fast.load_other == pytest.approx(slow.load_other)


@pytest.mark.parametrize("seed", [0, 1])
def test_analytics_pooled_over_ranks_are_those_of_the_whole_batch(seed):
    """Two ranks' tokens pooled by one all-reduce of their sums: the loads, entropies, imbalance, drift and
    specialisation one process holding both halves computes (they were each rank's own: rank 0's logged
    specialisation was 0.037 where the whole batch's is 0.003). Rank 1 has no forking token."""
    tokens = 40
    probabilities, used, live, forking, completion = random_routing(seed, tokens, layers=2, completion_share=0.8)
    forking[25:] = False
    whole = routing_by_layer(used, probabilities, forking, completion, live_indices=live)
    halves = [slice(0, 25), slice(25, tokens)]
    sent = []

    def keep(values):  # rank 1's all-reduce: remember what it sends
        sent.append(values.clone())
        return values

    def rank(part, total):
        return routing_by_layer(
            [u[part] for u in used],
            [p[part] for p in probabilities],
            forking[part],
            completion[part],
            live_indices=[v[part] for v in live],
            sum_across_ranks=total,
        )

    rank(halves[1], keep)
    pooled = rank(halves[0], lambda values: values + sent[0])  # rank 0: its sums plus rank 1's
    for name in ("specialization", "router_entropy_forking", "router_entropy_other", "imbalance", "drift"):
        torch.testing.assert_close(getattr(pooled, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled.load_forking, whole.load_forking)
    alone = rank(halves[0], None)
    assert not torch.allclose(alone.specialization, whole.specialization)


@pytest.mark.parametrize("empty", ["forking", "other", "completion"])
def test_vectorised_analytics_of_an_empty_token_class_are_nan_like_the_reference(empty):
    generator = torch.Generator().manual_seed(3)
    probabilities = [torch.softmax(torch.randn(8, 4, generator=generator), -1) for _ in range(2)]
    used = [torch.topk(p, 2).indices for p in probabilities]
    completion = torch.ones(8, dtype=torch.bool) if empty != "completion" else torch.zeros(8, dtype=torch.bool)
    forking = {"forking": torch.zeros(8, dtype=torch.bool), "other": completion}.get(empty, completion)
    routing = routing_by_layer(used, probabilities, forking, completion, live_indices=used)
    for index in range(2):
        fast, slow = routing.layer(index), layer_routing(used[index], probabilities[index], forking, completion)
        for name in ("specialization", "router_entropy_forking", "router_entropy_other", "imbalance"):
            assert math.isnan(getattr(fast, name)) == math.isnan(getattr(slow, name)), name
    assert math.isnan(routing.layer(0).specialization)
    metrics = summarize(routing)
    assert math.isnan(metrics["moe/specialization_js"])
    assert math.isnan(metrics["moe/routing_drift"]) == (empty == "completion")


def test_moe_blocks_become_zero3_leaf_modules():
    from deepspeed.utils import z3_leaf_module

    from rlvr.moe.adapters import register_zero3_leaf_modules

    for architecture in ("qwen3_moe", "gpt_oss"):
        model = float64_model(architecture)
        names = register_zero3_leaf_modules(model)
        assert names == [type(find_moe_layers(model)[0].block).__name__]
        assert all(z3_leaf_module(layer.block) for layer in find_moe_layers(model))
        assert not z3_leaf_module(model.model.layers[0].self_attn)


# --------------------------------------------------------------------------------------------------
# Correction biases (DeepSeek-V3-style and ERNIE-4.5 routers) and shared experts

BIASED_FAMILIES = ["deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe", "minimax_m2"]
SHARED_EXPERT_FAMILIES = {  # family: the parameter-name part of its shared expert
    "deepseek_v3": "shared_experts",
    "glm4_moe": "shared_experts",
    "dots1": "shared_experts",
    "ernie4_5_moe": "shared_experts",
    "qwen3_next": "shared_expert",
    "qwen3_5_moe": "shared_expert",
    "hunyuan_v1_moe": "shared_mlp",
    "llama4": "shared_expert",
    "qwen2_moe": "shared_expert",
}


def set_correction_bias(model, seed: int | None = 5):
    """A learned-looking aux-loss-free bias (seed None: zero), large enough to change the chosen experts."""
    from rlvr.moe.updates import correction_bias

    generator = torch.Generator().manual_seed(seed or 0)
    for layer in find_moe_layers(model):
        bias = correction_bias(layer)
        values = torch.randn(bias.shape, generator=generator, dtype=bias.dtype) if seed is not None else 0.0
        with torch.no_grad():
            bias.copy_(values * torch.ones_like(bias))
    return model


@pytest.mark.parametrize("architecture", BIASED_FAMILIES)
def test_gate_weights_leave_the_correction_bias_out(architecture):
    model = set_correction_bias(float64_model(architecture))
    unbiased = set_correction_bias(float64_model(architecture), seed=None)
    hidden = torch.randn(17, SPEC.hidden_size, dtype=torch.float64)
    for layer, plain in zip(find_moe_layers(model), find_moe_layers(unbiased), strict=True):
        logits, weights, indices = layer.route(hidden)
        assert torch.equal(layer.adapter.gate_weights(logits, indices, layer.router), weights)
        _, _, indices_without_bias = plain.route(hidden)
        assert not torch.equal(indices.sort(-1).values, indices_without_bias.sort(-1).values)  # the bias matters
        probabilities = layer.adapter.router_probabilities(logits)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(17), rtol=0, atol=1e-6)


@pytest.mark.parametrize("architecture", BIASED_FAMILIES)
def test_replay_with_bias_and_group_limits_reproduces_logits_exactly(architecture):
    input_ids, attention_mask, _, _ = random_batch(6)
    model = set_correction_bias(float64_model(architecture))
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    live_logits, recorded = record_routing(model, hooks, input_ids, attention_mask)
    hooks.begin(BATCH, LENGTH, forced=recorded)
    assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, live_logits)
    hooks.end()


@pytest.mark.parametrize("architecture", sorted(SHARED_EXPERT_FAMILIES))
def test_expert_gate_leaves_the_shared_expert_alone(architecture):
    """The gate equals detaching the routed experts' output out of scope; the shared expert's gradient
    (every token passes through it) is untouched."""
    gated, (input_ids, attention_mask, in_scope, targets) = expert_gated(architecture, 7)

    reference = float64_model(architecture)
    rows = in_scope.reshape(-1)
    for layer in find_moe_layers(reference):
        # (N, H), or Llama 4's every-expert-on-every-token (E * N, H), expert-major
        layer.block.experts.register_forward_hook(
            lambda module, inputs, output: mix(output, rows.repeat(output.shape[0] // rows.numel()), 0.0)
        )
    objective(reference, input_ids, attention_mask, targets).backward()
    actual, wanted = grads_of(gated), grads_of(reference)
    for name in wanted:
        torch.testing.assert_close(actual[name], wanted[name], rtol=1e-10, atol=1e-12, msg=name)
    shared = [name for name in actual if SHARED_EXPERT_FAMILIES[architecture] in name]
    assert shared and all(actual[name].abs().sum() > 0 for name in shared)
