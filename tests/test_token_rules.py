"""Entropy interventions as token rules (Clip-Cov, KL-Cov, entropy advantage) against float64 loops written
from the papers' formulas, on random inputs and edge cases (ties, padding, an empty unit, one token)."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr.forking.token_rules import (
    RULES,
    TOKEN_RULES,
    TokenRuleInputs,
    TokenRulesConfig,
    apply_rule,
    kl_cov_penalty,
    token_covariance,
)
from rlvr.utils.options import ConfigError


def random_unit(rows=4, width=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    advantages = torch.randn(rows, 1, generator=generator).expand(rows, width).double() * 3  # per sequence
    log_probs = -torch.rand(rows, width, generator=generator).double() * 4
    entropies = torch.rand(rows, width, generator=generator).double() * 2
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # right padding
    return advantages.contiguous(), log_probs, entropies, mask


def loop_covariance(advantages, log_probs, mask):
    """The paper's cov per real token, as a dict {(row, position): cov}, with plain float loops."""
    tokens = [(b, t) for b in range(mask.size(0)) for t in range(mask.size(1)) if mask[b, t]]
    mean_a = sum(float(advantages[b, t]) for b, t in tokens) / len(tokens)
    mean_l = sum(float(log_probs[b, t]) for b, t in tokens) / len(tokens)
    return {(b, t): (float(advantages[b, t]) - mean_a) * (float(log_probs[b, t]) - mean_l) for b, t in tokens}


def test_every_rule_is_registered():
    assert set(TOKEN_RULES) == set(RULES) - {"none"}


@pytest.mark.parametrize("seed", range(5))
def test_covariance_matches_a_loop_and_is_zero_on_padding(seed):
    advantages, log_probs, _, mask = random_unit(seed=seed)
    cov = token_covariance(advantages, log_probs, mask)
    expected = loop_covariance(advantages, log_probs, mask)
    for (b, t), value in expected.items():
        assert math.isclose(float(cov[b, t]), value, rel_tol=1e-12, abs_tol=1e-12)
    assert (cov[~mask] == 0).all()
    assert (token_covariance(advantages, log_probs, torch.zeros_like(mask)) == 0).all()  # empty unit


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_kl_cov_penalises_the_top_share_by_covariance(seed, ratio):
    advantages, log_probs, entropies, mask = random_unit(seed=seed)
    settings = TokenRulesConfig(rule="kl_cov", kl_cov_ratio=ratio)
    effect = apply_rule("kl_cov", TokenRuleInputs(advantages, log_probs, entropies, mask), settings)
    expected = loop_covariance(advantages, log_probs, mask)
    count = max(int(ratio * len(expected)), 1)
    ranked = sorted(expected, key=lambda key: (-expected[key], key))  # ties: the earlier token first
    assert {tuple(index) for index in effect.penalty.nonzero().tolist()} == set(ranked[:count])
    assert torch.equal(effect.touched, effect.penalty) and effect.keep is None and effect.advantages is None


def test_kl_cov_ties_go_to_the_earlier_token_and_one_token_is_penalised():
    advantages = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0]], dtype=torch.float64)
    log_probs = torch.tensor([[-1.0, -1.0, -2.0], [-1.0, -1.0, -2.0]], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)  # the top cov, 8/9, is shared by (0, 2) and (1, 2)
    settings = TokenRulesConfig(kl_cov_ratio=1 / 6)
    effect = apply_rule("kl_cov", TokenRuleInputs(advantages, log_probs, log_probs, mask), settings)
    assert effect.penalty.nonzero().tolist() == [[0, 2]]
    one = torch.tensor([[True, False, False], [False, False, False]])
    effect = apply_rule("kl_cov", TokenRuleInputs(advantages, log_probs, log_probs, one), settings)
    assert effect.penalty.nonzero().tolist() == [[0, 0]]  # max(int(k * 1), 1) = 1
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    assert not apply_rule("kl_cov", TokenRuleInputs(advantages, log_probs, log_probs, nothing), settings).penalty.any()


def test_kl_cov_penalty_is_the_absolute_log_ratio_on_penalised_tokens_and_vanishes_on_policy():
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]], dtype=torch.float64)
    penalty = torch.tensor([[True, False], [True, True]])
    term = kl_cov_penalty(log_probs, old, penalty, coef=0.5)
    assert term.tolist() == [[0.25, 0.0], [0.0, 0.5]]
    term.sum().backward()
    assert log_probs.grad.tolist() == [[0.5, 0.0], [0.0, -0.5]]  # sign(log p - log p_old); 0 where equal
    on_policy = log_probs.detach().clone().requires_grad_(True)
    kl_cov_penalty(on_policy, on_policy.detach(), penalty, coef=1.0).sum().backward()
    assert (on_policy.grad == 0).all()  # the caveat: fully on-policy, KL-Cov has no gradient


@pytest.mark.parametrize("seed", range(5))
def test_clip_cov_stops_a_random_share_of_the_tokens_inside_the_bounds(seed):
    advantages, log_probs, entropies, mask = random_unit(rows=8, width=12, seed=seed)
    expected = loop_covariance(advantages, log_probs, mask)
    settings = TokenRulesConfig(clip_cov_ratio=0.1, clip_cov_lb=0.2, clip_cov_ub=3.0)
    inside = {key for key, value in expected.items() if 0.2 < value < 3.0}
    count = min(max(int(0.1 * len(expected)), 1), len(inside))
    generator = torch.Generator().manual_seed(seed)
    effect = apply_rule("clip_cov", TokenRuleInputs(advantages, log_probs, entropies, mask, generator), settings)
    stopped = {tuple(index) for index in (~effect.keep).nonzero().tolist()}
    assert len(stopped) == count and stopped <= inside
    assert torch.equal(effect.touched, ~effect.keep)
    again = apply_rule(
        "clip_cov",
        TokenRuleInputs(advantages, log_probs, entropies, mask, torch.Generator().manual_seed(seed)),
        settings,
    )
    assert torch.equal(again.keep, effect.keep)  # the same stream draws the same tokens


def test_clip_cov_leaves_out_tokens_ppo_already_clips_and_stops_nothing_without_candidates():
    advantages, log_probs, entropies, mask = random_unit(rows=8, width=12, seed=1)
    settings = TokenRulesConfig(clip_cov_ratio=1.0, clip_cov_lb=-1e9, clip_cov_ub=1e9)  # every token a candidate
    clipped = torch.zeros_like(mask)
    clipped[0] = True
    inputs = TokenRuleInputs(advantages, log_probs, entropies, mask, torch.Generator().manual_seed(0), clipped)
    effect = apply_rule("clip_cov", inputs, settings)
    assert torch.equal(~effect.keep, mask & ~clipped)
    narrow = TokenRulesConfig(clip_cov_lb=1e8, clip_cov_ub=1e9)
    assert effect.keep is not None
    assert apply_rule("clip_cov", TokenRuleInputs(advantages, log_probs, entropies, mask), narrow).keep.all()


@pytest.mark.parametrize("seed", range(5))
def test_entropy_advantage_matches_the_papers_formula_per_token(seed):
    advantages, log_probs, entropies, mask = random_unit(seed=seed)
    advantages = advantages.clone()
    advantages[0] = 0.0  # a group without variance: stays zero
    settings = TokenRulesConfig(alpha=0.4, kappa=2.0)
    entropies = entropies.clone().requires_grad_(True)
    effect = apply_rule("entropy_advantage", TokenRuleInputs(advantages, log_probs, entropies, mask), settings)
    for b in range(mask.size(0)):
        for t in range(mask.size(1)):
            a = float(advantages[b, t])
            shaped = a + min(0.4 * float(entropies[b, t].detach()), abs(a) / 2.0) if mask[b, t] else a
            assert math.isclose(float(effect.advantages[b, t]), shaped, rel_tol=1e-12, abs_tol=1e-15)
    assert (effect.advantages[0] == 0).all()
    assert not effect.advantages.requires_grad  # H is detached: no gradient into the entropy


def test_no_rule_is_no_effect():
    advantages, log_probs, entropies, mask = random_unit()
    assert apply_rule("none", TokenRuleInputs(advantages, log_probs, entropies, mask), TokenRulesConfig()) is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_cov_ratio", 0.0),
        ("clip_cov_ratio", 1.5),
        ("clip_cov_lb", 6.0),
        ("kl_cov_ratio", -0.1),
        ("kl_cov_coef", -1.0),
        ("alpha", -0.1),
        ("kappa", 0.0),
    ],
)
def test_out_of_range_settings_name_the_key(field, value):
    with pytest.raises(ConfigError, match=field):
        TokenRulesConfig(**{field: value}).validate()


# ---------------------------------------------------------------------------------------------------------
# In the trainer: its loss and gradient against a hand-built float64 loss


def policy_forward(trainer, batch, entropy_gradient: bool = False):
    """(B, T) float64 log-probs with gradient and entropies of the batch's completions (detached unless
    ``entropy_gradient``: an entropy bonus's)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    length = batch["completion_ids"].size(1)
    logits = trainer.model(input_ids=ids, attention_mask=attention).logits[:, -length - 1 : -1]
    all_logps = torch.log_softmax(logits.double(), dim=-1)  # (B, T, V)
    logps = all_logps.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    entropies = -(all_logps.exp() * all_logps).sum(-1)
    return logps, entropies if entropy_gradient else entropies.detach()


def clip_cov_policy_loss(trainer, batch, logps, ratio: float):
    """TRL's dapo loss with the int(ratio * N) tokens the trainer's Clip-Cov stream draws (every real token a
    candidate) dropped from its sum, not from its normaliser (verl's corr)."""
    mask = batch["completion_mask"].bool()
    real = mask.flatten().nonzero().squeeze(1)
    generator = torch.Generator().manual_seed(0 * 1_000_003 + trainer._step + 7_919)  # the trainer's stream
    stopped = real[torch.randperm(len(real), generator=generator)[: int(ratio * len(real))]]
    keep = torch.ones(mask.numel(), dtype=torch.float64)
    keep[stopped] = 0.0
    per_token = -batch["advantages"].double().unsqueeze(1) * torch.exp(logps - logps.detach())
    return (per_token * keep.view_as(mask) * mask).sum() / mask.sum()


def rule_trainer(tiny_checkpoint, tmp_path, rules: TokenRulesConfig, **grpo):
    """A trainer with ``rules`` over every completion token (``policy_tokens=all``) and TRL's dapo loss."""
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_trainer

    forking = ForkingConfig(policy_tokens="all")
    return make_trainer(tiny_checkpoint(), tmp_path, forking=forking, token_rules=rules, loss_type="dapo", **grpo)


def grads_of(trainer, loss):
    trainer.model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def compare_with_reference(trainer, batch, reference):
    from tests.test_trainer import assert_same_grads, loss_and_grads

    loss, grads = loss_and_grads(trainer, batch)
    expected = reference()
    expected_grads = grads_of(trainer, expected)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    assert_same_grads(grads, expected_grads, rtol=1e-4, atol=1e-6)


def test_clip_cov_in_the_trainer_stops_the_drawn_tokens_gradient(tiny_checkpoint, tmp_path):
    """Every real token is a candidate (bounds wide open): the trainer draws int(r * N) of them from its stream
    and drops them from the sum of TRL's dapo loss, not from its normaliser (verl's corr)."""
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_batch, make_trainer

    rules = TokenRulesConfig(rule="clip_cov", clip_cov_ratio=0.25, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    trainer = make_trainer(
        tiny_checkpoint(), tmp_path, forking=ForkingConfig(policy_tokens="all"), token_rules=rules, loss_type="dapo"
    )
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()

    def reference():
        logps, _ = policy_forward(trainer, batch)
        return clip_cov_policy_loss(trainer, batch, logps, 0.25)

    compare_with_reference(trainer, batch, reference)
    logged = trainer.selection.step_metrics["train"].drain()
    assert logged["token_rules/touched_share"][-1] == pytest.approx(int(0.25 * int(mask.sum())) / int(mask.sum()))


def test_clip_cov_leaves_the_entropy_bonus_on_every_token(tiny_checkpoint, tmp_path):
    """Clip-Cov stops the policy gradient of its drawn tokens, not their entropy bonus: the bonus is the mean
    entropy over every completion token, as verl averages it (TRL's bonus followed the loss weights, so the
    stopped tokens left its sum and its normaliser)."""
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_batch, make_trainer

    rules = TokenRulesConfig(rule="clip_cov", clip_cov_ratio=0.25, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        forking=ForkingConfig(policy_tokens="all"),
        token_rules=rules,
        loss_type="dapo",
        entropy_coef=0.05,
    )
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()

    def reference():
        logps, entropies = policy_forward(trainer, batch, entropy_gradient=True)
        policy = clip_cov_policy_loss(trainer, batch, logps, 0.25)
        return policy - 0.05 * (entropies * mask).sum() / mask.sum()

    compare_with_reference(trainer, batch, reference)


def test_entropy_advantage_in_the_trainer_shapes_each_tokens_advantage(tiny_checkpoint, tmp_path):
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_batch, make_trainer

    rules = TokenRulesConfig(rule="entropy_advantage", alpha=0.4, kappa=2.0)
    trainer = make_trainer(
        tiny_checkpoint(), tmp_path, forking=ForkingConfig(policy_tokens="all"), token_rules=rules, loss_type="dapo"
    )
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()
    original = batch["advantages"].clone()

    def reference():
        logps, entropies = policy_forward(trainer, batch)
        advantages = original.double().unsqueeze(1)  # (B, 1)
        shaped = advantages + torch.minimum(0.4 * entropies, advantages.abs() / 2.0)  # (B, T)
        per_token = -shaped * torch.exp(logps - logps.detach())
        return (per_token * mask).sum() / mask.sum()

    inputs = dict(batch)
    compare_with_reference(trainer, inputs, reference)
    assert torch.equal(batch["advantages"], original)  # the batch's advantages are put back


def test_kl_cov_in_the_trainer_adds_the_penalty_on_the_top_covariance_tokens(tiny_checkpoint, tmp_path):
    """Off-policy (old log-probs moved away from the policy's): TRL's clipped dapo loss plus coef * |log p -
    log p_old| on the top int(k * N) tokens by covariance, a token mean over the micro-batch."""
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_batch, make_trainer

    rules = TokenRulesConfig(rule="kl_cov", kl_cov_ratio=0.1, kl_cov_coef=0.7)
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        forking=ForkingConfig(policy_tokens="all"),
        token_rules=rules,
        loss_type="dapo",
        num_iterations=2,
    )
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        current, _ = policy_forward(trainer, batch)
    offsets = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.3
    batch["old_per_token_logps"] = (current + offsets.double()).float()

    def reference():
        logps, _ = policy_forward(trainer, batch)
        old = batch["old_per_token_logps"].double()
        advantages = batch["advantages"].double().unsqueeze(1).expand_as(logps)
        ratio = torch.exp(logps - old)
        per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
        covariance = loop_covariance(advantages, logps.detach(), mask)
        ranked = sorted(covariance, key=lambda key: (-covariance[key], key))
        count = max(int(0.1 * len(covariance)), 1)
        assert covariance[ranked[count - 1]] - covariance[ranked[count]] > 1e-6  # an unambiguous top set
        penalty = torch.zeros_like(logps)
        for b, t in ranked[:count]:
            penalty[b, t] = 1.0
        policy = (per_token * mask).sum() / mask.sum()
        return policy + 0.7 * ((logps - old).abs() * penalty).sum() / mask.sum()

    compare_with_reference(trainer, batch, reference)


def test_no_rule_leaves_the_loss_bit_for_bit(tiny_checkpoint, tmp_path):
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import loss_and_grads, make_batch, make_trainer

    plain = make_trainer(tiny_checkpoint(), tmp_path / "plain", forking=ForkingConfig(rho=0.2))
    ruled = make_trainer(
        tiny_checkpoint(), tmp_path / "none", forking=ForkingConfig(rho=0.2), token_rules=TokenRulesConfig()
    )
    batch = make_batch(plain)
    loss, grads = loss_and_grads(plain, batch)
    loss_none, grads_none = loss_and_grads(ruled, batch)
    assert torch.equal(loss, loss_none)
    assert all(torch.equal(grads[name], grads_none[name]) for name in grads)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["token_rules.rule=kl_cov"], "token_rules.rule=kl_cov: every optimizer step is on-policy"),
        (["token_rules.rule=clip_cov", "forking.scope=sequence"], "forking.scope=sequence"),
        (["token_rules.rule=entropy_advantage", "forking.selection=random"], "control arm"),
        (["token_rules.kl_cov_coef=-1"], "token_rules.kl_cov_coef"),
        (["token_rules.rule=sometimes"], "token_rules.rule"),
        (["token_rules.rule=clip_cov", "grpo.use_adaptive_entropy=true"], "adaptive entropy controller"),
    ],
)
def test_bad_rule_settings_fail_before_any_model_is_built(overrides, key):
    from rlvr.run.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_clip_cov_among_forking_tokens_draws_from_the_selected_ones(tiny_checkpoint, tmp_path):
    """With forking updates the candidates are the top-rho tokens: the loss is the forking loss (a mean over the
    k selected tokens) with the drawn int(r * k) of them left out of the sum, through the sparse LM head."""
    from rlvr.forking.selection import ForkingConfig
    from tests.test_trainer import make_batch, make_trainer

    rules = TokenRulesConfig(rule="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    trainer = make_trainer(
        tiny_checkpoint(), tmp_path, forking=ForkingConfig(rho=0.5), token_rules=rules, loss_type="dapo"
    )
    assert trainer.sparse_head
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()

    def reference():
        logps, entropies = policy_forward(trainer, batch)
        k = math.ceil(0.5 * int(mask.sum()))
        order = torch.argsort(entropies.masked_fill(~mask, -1.0).flatten(), descending=True, stable=True)[:k]
        selected = torch.zeros(mask.numel(), dtype=torch.bool)
        selected[order] = True
        candidates = selected.nonzero().squeeze(1)  # row-major, as the rule lists them
        generator = torch.Generator().manual_seed(0 * 1_000_003 + trainer._step + 7_919)
        stopped = candidates[torch.randperm(len(candidates), generator=generator)[: int(0.3 * k)]]
        weight = selected.double()
        weight[stopped] = 0.0
        per_token = -batch["advantages"].double().unsqueeze(1) * torch.exp(logps - logps.detach())
        return (per_token * weight.view_as(mask)).sum() / k

    compare_with_reference(trainer, batch, reference)


@pytest.mark.parametrize("arm", ["clip_higher", "adaptive_entropy", "clip_cov", "kl_cov", "entropy_advantage"])
def test_the_entropy_arms_train_from_their_packaged_overlays(tmp_path, arm):
    from tests.test_cli import train_arm

    logged, _ = train_arm(tmp_path, arm)
    assert ("token_rules/touched_share" in logged) == (arm in ("clip_cov", "kl_cov", "entropy_advantage"))
