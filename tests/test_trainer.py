"""ForkingGRPOTrainer against stock TRL and against a plain reference loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from trl import GRPOConfig, GRPOTrainer

from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import ARCHITECTURES, load_pretrained
from rlvr.moe import UnknownMoEArchitecture
from rlvr.rewards.text import completion_text
from rlvr.run.config import ForkingConfig, MoEConfig
from rlvr.trainer import ForkingGRPOTrainer

GENERATIONS = 4
ROWS = 8  # 2 prompts x 4 completions per micro-batch


def odd_length_reward(completions, **_):
    """A reward with variance on a random policy, so that the policy gradient is not zero."""
    return [float(len(completion_text(c)) % 2) for c in completions]


def _dataset():
    return problems_to_dataset(generate_problems(ArithmeticTask(), "train", 16, seed=0))


def make_trainer(
    checkpoint,
    tmp_path,
    trainer_cls=ForkingGRPOTrainer,
    forking=None,
    moe=None,
    dtype="float32",
    rollout=None,
    peft_config=None,
    token_rules=None,
    **grpo,
):
    model, tokenizer = load_pretrained(checkpoint, dtype)
    if dtype == "float64" and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # grouped_mm rejects float64
    settings = (
        dict(
            output_dir=str(tmp_path),
            per_device_train_batch_size=ROWS,
            num_generations=GENERATIONS,
            max_completion_length=12,
            use_cpu=True,
            bf16=False,
            report_to=[],
            logging_steps=1,
            max_steps=2,
            beta=0.0,
            seed=0,
            save_strategy="no",
            disable_tqdm=True,
            router_aux_loss_coef=0.0,
        )
        | grpo
    )
    extra = (
        {"forking": forking or ForkingConfig(), "moe": moe, "rollout": rollout, "token_rules": token_rules}
        if trainer_cls is ForkingGRPOTrainer
        else {}
    )
    trainer = trainer_cls(
        model=model,
        reward_funcs=odd_length_reward,
        args=GRPOConfig(**settings),
        train_dataset=_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
        **extra,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def make_batch(trainer) -> dict:
    """One generation batch with random (non-zero) advantages; deterministic."""
    dataset = _dataset()
    rows = [dataset[i] for i in range(ROWS // GENERATIONS) for _ in range(GENERATIONS)]
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    advantages = torch.randn(ROWS, generator=torch.Generator().manual_seed(1))  # (B,)
    batch["advantages"] = advantages.to(batch["completion_ids"].device)
    assert batch["completion_mask"].sum() > ROWS  # real completions, not just end tokens
    return batch


def loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_grads(actual, expected, rtol=1e-5, atol=1e-7):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------------
# rho = 1 (and the full arm) is stock TRL


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize(
    "forking",
    [
        ForkingConfig(rho=1.0, loss_normalization="selected"),
        ForkingConfig(rho=1.0, loss_normalization="all"),
        ForkingConfig(rho=0.2, policy_tokens="all"),
    ],
    ids=["rho1-selected", "rho1-all", "full-arm"],
)
def test_all_tokens_equals_stock_trl(tiny_checkpoint, tmp_path, loss_type, forking):
    stock = make_trainer(tiny_checkpoint(), tmp_path / "stock", GRPOTrainer, loss_type=loss_type)
    ours = make_trainer(tiny_checkpoint(), tmp_path / "ours", forking=forking, loss_type=loss_type)
    batch = make_batch(stock)
    expected_loss, expected_grads = loss_and_grads(stock, batch)
    loss, grads = loss_and_grads(ours, batch)
    assert expected_loss != 0
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-8)
    assert_same_grads(grads, expected_grads)


# --------------------------------------------------------------------------------------------------
# rho = 0.2 against a plain float64 reference


def reference_loss(trainer, batch, rho, loss_type, scope):
    """The paper's objective written out: top-k entropy tokens, mean over the selected tokens."""
    prompt_completion = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    logits = trainer.model(input_ids=prompt_completion, attention_mask=attention).logits[:, -length - 1 : -1]
    logps_all = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    logps = logps_all.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropies = -(logps_all.exp() * logps_all).sum(-1).detach()  # (B, T)
    mask = batch["completion_mask"].bool()
    advantages = batch["advantages"].double().unsqueeze(1)  # (B, 1)
    per_token = -advantages * torch.exp(logps - logps.detach())  # (B, T): the clipped ratio is 1 on-policy

    keep = torch.zeros_like(mask)
    units = [mask] if scope == "micro_batch" else [row_mask(mask, r) for r in range(mask.size(0))]
    for unit in units:
        n = int(unit.sum())
        k = math.ceil(rho * n)
        order = torch.argsort(entropies.masked_fill(~unit, -1.0).flatten(), descending=True)[:k]
        keep.view(-1)[order] = True
        kept_values = entropies.flatten()[order]
        rest = entropies.flatten()[unit.flatten() & ~keep.flatten()]
        if k and rest.numel():  # the selection must be unambiguous for the comparison to be fair
            assert kept_values.min() - rest.max() > 1e-6
    if loss_type == "grpo":
        per_row = [(per_token[r][keep[r]]).sum() / keep[r].sum() for r in range(mask.size(0)) if keep[r].any()]
        return torch.stack(per_row).sum() / mask.size(0)
    return (per_token[keep]).sum() / keep.sum()  # dapo and bnpo: one token mean over the micro-batch


def row_mask(mask, row):
    unit = torch.zeros_like(mask)
    unit[row] = mask[row]
    return unit


@pytest.mark.parametrize(
    "loss_type, scope",
    [("dapo", "micro_batch"), ("bnpo", "micro_batch"), ("grpo", "micro_batch"), ("grpo", "sequence")],
)
def test_forking_loss_matches_reference(tiny_checkpoint, tmp_path, loss_type, scope):
    trainer = make_trainer(
        tiny_checkpoint(), tmp_path, forking=ForkingConfig(rho=0.2, scope=scope), loss_type=loss_type
    )
    batch = make_batch(trainer)
    loss, grads = loss_and_grads(trainer, batch)

    trainer.model.zero_grad(set_to_none=True)
    expected = reference_loss(trainer, batch, 0.2, loss_type, scope)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    assert_same_grads(grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_selected_vs_all_normalisation_differs_by_the_kept_fraction(tiny_checkpoint, tmp_path):
    selected = make_trainer(tiny_checkpoint(), tmp_path / "s", forking=ForkingConfig(rho=0.2), loss_type="dapo")
    everything = make_trainer(
        tiny_checkpoint(), tmp_path / "a", forking=ForkingConfig(rho=0.2, loss_normalization="all"), loss_type="dapo"
    )
    batch = make_batch(selected)
    n = int(batch["completion_mask"].sum())
    k = math.ceil(0.2 * n)
    loss_selected, _ = loss_and_grads(selected, batch)
    loss_all, _ = loss_and_grads(everything, batch)
    torch.testing.assert_close(loss_all, loss_selected * k / n, rtol=1e-5, atol=1e-8)


def test_kl_mask_keeps_kl_gradient_off_dropped_tokens(tiny_checkpoint, tmp_path):
    def grads_with(mask_kl):
        trainer = make_trainer(
            tiny_checkpoint(),
            tmp_path / str(mask_kl),
            forking=ForkingConfig(rho=0.0, mask_kl=mask_kl),
            loss_type="dapo",
            beta=0.1,
        )
        batch = make_batch(trainer)
        noise = torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(2))
        batch["ref_per_token_logps"] = batch["ref_per_token_logps"] + 0.5 * noise  # a reference that differs
        return loss_and_grads(trainer, batch)[1]

    unmasked, masked = grads_with(False), grads_with(True)
    assert sum(g.abs().sum() for g in unmasked.values()) > 0  # the KL term alone moves the policy
    assert all(g.abs().sum() == 0 for g in masked.values())  # rho=0 and masked KL: nothing moves


@pytest.mark.parametrize("mask_entropy_bonus", [True, False])
def test_entropy_bonus_scope(tiny_checkpoint, tmp_path, mask_entropy_bonus):
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        forking=ForkingConfig(rho=0.0, mask_entropy_bonus=mask_entropy_bonus),
        loss_type="dapo",
        entropy_coef=0.1,
    )
    batch = make_batch(trainer)
    batch["advantages"] = torch.zeros(ROWS)  # only the bonus remains
    loss, grads = loss_and_grads(trainer, batch)
    if mask_entropy_bonus:  # TRL applies the bonus on the selected tokens; rho=0 selects none
        assert loss == 0
    else:  # rlvr's own bonus: mean entropy over every completion token
        with torch.no_grad():
            length = batch["completion_ids"].size(1)
            ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
            attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
            logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -length - 1 : -1]
            entropy = torch.distributions.Categorical(logits=logits.double()).entropy()
            mask = batch["completion_mask"].double()
            expected = -0.1 * (entropy * mask).sum() / mask.sum()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
        assert sum(g.abs().sum() for g in grads.values()) > 0


# --------------------------------------------------------------------------------------------------
# A few real training steps per architecture


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_changes_weights_and_logs_forking_metrics(tiny_checkpoint, tmp_path, architecture):
    trainer = make_trainer(tiny_checkpoint(architecture), tmp_path, forking=ForkingConfig(rho=0.2), learning_rate=1e-2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    from rlvr.moe import find_moe_layers

    routers = tuple(f"{layer.name}.{layer.adapter.router_attribute}." for layer in find_moe_layers(trainer.model))
    assert any(name.startswith(routers) for name in changed), changed[:5]
    assert any("experts" in name for name in changed)

    logs = [entry for entry in trainer.state.log_history if "forking/kept_fraction" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert 0.2 <= entry["forking/kept_fraction"] < 0.2 + 1 / 8  # exact k = ceil(rho * n), n >= 8
        assert entry["forking/entropy_kept"] >= entry["forking/threshold"] >= entry["forking/entropy_dropped"]
    records = [json.loads(line) for line in (tmp_path / "forking_tokens.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(record["examples"]) == 2 for record in records)
    assert any("«" in example for record in records for example in record["examples"])
    assert records[0]["top_forking_tokens"]


# --------------------------------------------------------------------------------------------------
# Router-aware updates wired into the trainer


def test_forking_router_arm_trains_and_logs_routing(tiny_checkpoint, tmp_path):
    moe = MoEConfig(router_gate_scope="forking", expert_gate_scope="forking")
    trainer = make_trainer(
        tiny_checkpoint("olmoe"), tmp_path, forking=ForkingConfig(rho=0.2), moe=moe, learning_rate=1e-2
    )
    routers = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".gate.weight" in n}
    trainer.train()
    assert any(not torch.equal(p, routers[n]) for n, p in trainer.model.named_parameters() if n in routers)
    logs = [entry for entry in trainer.state.log_history if "moe/specialization_js" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert 0.0 <= entry["moe/specialization_js"] <= 1.0
        assert 1.0 <= entry["moe/load_imbalance"] <= 4.0
    records = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    loads = records[0]["expert_load"]
    assert len(loads["forking"]) == 2 and all(abs(sum(layer) - 1) < 1e-6 for layer in loads["forking"])


def test_load_balancing_loss_is_added_with_its_coefficient(tiny_checkpoint, tmp_path):
    plain = make_trainer(tiny_checkpoint(), tmp_path / "plain", loss_type="dapo")
    balanced = make_trainer(
        tiny_checkpoint(),
        tmp_path / "lb",
        moe=MoEConfig(load_balancing_coef=0.5, load_balancing_scope="forking"),
        loss_type="dapo",
    )
    batch = make_batch(plain)
    loss_plain, _ = loss_and_grads(plain, batch)
    loss_balanced, _ = loss_and_grads(balanced, batch)
    balance = balanced.step_metrics["train"].drain()["moe/load_balancing_loss"][-1]
    assert balance > 0
    torch.testing.assert_close(loss_balanced - loss_plain, torch.tensor(0.5 * balance), rtol=1e-5, atol=1e-6)


def test_freeze_router_and_router_learning_rate(tiny_checkpoint, tmp_path):
    frozen = make_trainer(tiny_checkpoint(), tmp_path / "f", moe=MoEConfig(freeze_router=True), learning_rate=1e-2)
    routers = {n: p.detach().clone() for n, p in frozen.model.named_parameters() if ".gate.weight" in n}
    assert routers
    frozen.train()
    assert all(torch.equal(p, routers[n]) for n, p in frozen.model.named_parameters() if n in routers)

    scaled = make_trainer(
        tiny_checkpoint(), tmp_path / "s", moe=MoEConfig(router_lr_multiplier=0.1), learning_rate=1e-2
    )
    optimizer = scaled.create_optimizer()
    router_ids = {id(p) for p in scaled.router_updates.router_parameters()}
    rates = {
        ("router" if id(p) in router_ids else "other"): group["lr"]
        for group in optimizer.param_groups
        for p in group["params"]
    }
    assert rates == {"router": pytest.approx(1e-3), "other": pytest.approx(1e-2)}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(scaled.model.parameters()))


def test_dense_model_needs_default_moe_settings(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rlvr.models import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    trainer = make_trainer(str(tmp_path / "dense"), tmp_path / "a")
    assert trainer.router_updates is None
    with pytest.raises(UnknownMoEArchitecture, match="no sparse MoE block"):
        make_trainer(str(tmp_path / "dense"), tmp_path / "b", moe=MoEConfig(router_gate_scope="forking"))


@pytest.mark.parametrize("replay", ["old_policy", "rollout"])
def test_routing_replay_records_with_the_batch_and_logs_drift(tiny_checkpoint, tmp_path, replay):
    from rlvr.trainer import ROUTING_KEY

    # old_policy needs a generation batch reused over optimiser steps: two steps per generation.
    reuse = {"steps_per_generation": 2} if replay == "old_policy" else {}
    trainer = make_trainer(
        tiny_checkpoint(), tmp_path, moe=MoEConfig(routing_replay=replay), learning_rate=3e-2, max_steps=4, **reuse
    )
    batch = make_batch(trainer)
    length = batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
    assert batch[ROUTING_KEY].shape == (ROWS, length, 2, 2) and batch[ROUTING_KEY].dtype == torch.int16

    trainer.train()
    drift = [entry["moe/routing_drift"] for entry in trainer.state.log_history if "moe/routing_drift" in entry]
    assert len(drift) == 4
    assert drift[0] < 0.05  # the first step trains on its own routing: (almost) no drift
    assert all(0.0 <= value <= 1.0 for value in drift)


def test_no_replay_without_reuse_records_nothing(tiny_checkpoint, tmp_path):
    from rlvr.trainer import ROUTING_KEY

    trainer = make_trainer(tiny_checkpoint(), tmp_path, moe=MoEConfig(routing_replay="old_policy"))
    assert ROUTING_KEY not in make_batch(trainer)  # one optimiser step per batch: old policy == current policy


@pytest.mark.parametrize("checkpointing", [True, False])
def test_hybrid_gates_stop_router_and_expert_gradient_outside_forking_decisions(
    tiny_checkpoint, tmp_path, checkpointing
):
    # hybrid arm with rho=0: the policy loss covers every token, but no decision is forking, so the
    # routers and experts get no gradient at all while attention and embeddings do.
    moe = MoEConfig(router_gate_scope="forking", expert_gate_scope="forking")
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        forking=ForkingConfig(rho=0.0, policy_tokens="all"),
        moe=moe,
        loss_type="dapo",
        gradient_checkpointing=checkpointing,
    )
    _, grads = loss_and_grads(trainer, make_batch(trainer))
    trainer.router_updates.release()
    moe_grads = {n: g for n, g in grads.items() if ".mlp." in n}
    other_grads = {n: g for n, g in grads.items() if "self_attn" in n}
    assert moe_grads and all(g.abs().sum() == 0 for g in moe_grads.values()), [
        n for n, g in moe_grads.items() if g.abs().sum()
    ]
    assert other_grads and all(g.abs().sum() > 0 for g in other_grads.values())


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize("arm", ["full", "forking", "forking_router", "hybrid", "random", "bottom"])
def test_every_arm_trains_two_steps_on_every_family(tiny_checkpoint, tmp_path, architecture, arm):
    from rlvr.run.config import load_config
    from rlvr.utils.packaged import arm_path

    config = load_config(arm_path(arm))
    trainer = make_trainer(
        tiny_checkpoint(architecture), tmp_path, forking=config.forking, moe=config.moe, logging_steps=2
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters())


@pytest.mark.parametrize("update", [False, True])
def test_correction_bias_is_updated_only_when_asked(tiny_checkpoint, tmp_path, update):
    """DeepSeek-V3's aux-loss-free balancing: each optimizer step moves every expert's bias by +-rate,
    up for under-loaded experts; off by default during RL."""
    from rlvr.moe import find_moe_layers

    trainer = make_trainer(
        tiny_checkpoint("deepseek_v3"),
        tmp_path,
        moe=MoEConfig(update_correction_bias=update, correction_bias_rate=0.01),
        max_steps=1,
    )
    updates = trainer.router_updates
    seen = []  # the expert loads each update saw: (biased layers, E)
    apply = updates.update_correction_bias
    updates.update_correction_bias = lambda: (seen.append(updates._bias_loads.clone()), apply())
    biases = [layer.router.e_score_correction_bias for layer in find_moe_layers(trainer.model)]
    trainer.train()
    assert len(seen) == (1 if update else 0)  # one optimizer step; no callback when off
    for row, bias in enumerate(biases):
        if update:  # +rate below the mean load, -rate above it
            load = seen[0][row]
            assert load.sum() > 0
            torch.testing.assert_close(bias, (0.01 * torch.sign(load.mean() - load)).to(bias.dtype))
        else:
            assert torch.equal(bias, torch.zeros_like(bias))


# --------------------------------------------------------------------------------------------------
# No host reads in the training micro-step


@pytest.mark.parametrize("selection", ["top", "random"])
def test_a_training_micro_step_makes_no_host_reads_in_rlvr(tiny_checkpoint, tmp_path, selection):
    """What rlvr adds to a micro-step (selection and its statistics, gradient-token count, forking-token log,
    gates, router losses, routing analytics, replay, correction-bias loads) stays on the device until the
    logging step reads it. Allowed: the sparse head's two row gathers (a boolean mask's size is the data).
    Generation is not a micro-step (once per generation batch; TRL reads there too) and is not counted."""
    from host_reads import count_host_reads

    moe = MoEConfig(
        router_gate_scope="forking",
        expert_gate_scope="forking",
        load_balancing_coef=0.1,
        load_balancing_scope="forking",
        z_loss_coef=0.01,
        z_loss_scope="completion",
        update_correction_bias=True,
        routing_replay="old_policy",
    )
    trainer = make_trainer(
        tiny_checkpoint("deepseek_v3"),
        tmp_path,
        forking=ForkingConfig(rho=0.2, selection=selection, scope="group"),
        moe=moe,
        per_device_train_batch_size=4,
        steps_per_generation=2,  # each generation batch serves two optimizer steps: routing is replayed
        logging_steps=2,
        max_steps=4,
    )
    assert trainer.sparse_head
    steps = []
    step, generate = trainer.training_step, trainer._generate_and_score_completions
    with count_host_reads() as reads:

        def counted_step(*args, **kwargs):  # the only place reads are watched
            steps.append(1)
            reads.watching = True
            try:
                return step(*args, **kwargs)
            finally:
                reads.watching = False

        def unwatched_generation(*args, **kwargs):
            with reads.paused():
                return generate(*args, **kwargs)

        trainer.training_step, trainer._generate_and_score_completions = counted_step, unwatched_generation
        reads.watching = False
        trainer.train()
    assert len(steps) == 4
    in_rlvr = {(read.kind, read.file.rsplit("/", 1)[-1]) for read in reads if read.in_rlvr}
    assert in_rlvr <= {("bool-index", "sparse_head.py")}, sorted(in_rlvr)
    assert any(read.kind == "item" and not read.in_rlvr for read in reads)  # the counter sees TRL's reads
    # what stayed on the device reached the logs
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("forking/kept_tokens", "moe/specialization_js", "moe/load_balancing_loss", "moe/z_loss"):
            assert isinstance(entry[key], float), key
        assert (entry["forking/threshold"] is None) == (selection == "random")
    assert "moe/routing_drift" in logs[1]  # the second step of each generation batch replays the first's routing
    assert trainer.gradient_tokens == round(sum(entry["forking/kept_tokens"] * 2 for entry in logs))
    records = [json.loads(line) for line in (tmp_path / "forking_tokens.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(record["top_forking_tokens"] and record["examples"] for record in records)
    histogram = records[0]["entropy_histogram"]["counts"]
    assert sum(histogram) == round(logs[0]["completions/mean_length"] * 8)  # every token of the generation batch
    assert json.loads((tmp_path / "routing.jsonl").read_text().splitlines()[0])["expert_load"]["forking"]
