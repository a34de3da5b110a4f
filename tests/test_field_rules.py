"""The field's answers to the forking-token mask as token rules: Archer (arXiv 2507.15778) against a float64 port
of its authors' loss (ArcherCodeR: ``verl/workers/actor/dp_actor.py`` and ``verl/trainer/ppo/core_algos.py``),
and STAPO's S2T (arXiv 2602.15620, no code published) against a loop written from the paper's definition; random
inputs, ties, padding, one token, an empty unit."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr.forking.token_rules import TokenRuleInputs, TokenRulesConfig, apply_rule
from rlvr.utils.options import ConfigError
from tests.test_token_rules import compare_with_reference, policy_forward, random_unit, rule_trainer


def interpolated_quantile(values: list[float], q: float) -> float:
    """numpy's default (linear) quantile of a list, by hand."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --------------------------------------------------------------------------------------------------
# Archer: classification per response, against a loop


@pytest.mark.parametrize("seed", range(5))
def test_archer_marks_the_tokens_above_each_responses_entropy_quantile(seed):
    advantages, log_probs, entropies, mask = random_unit(rows=5, width=9, seed=seed)
    mask[2] = False  # a response without real tokens: no reasoning tokens
    mask[3, 1:] = False  # one token: the quantile is its own entropy, which it does not exceed
    entropies[0, 1] = entropies[0, 4] = entropies[0, 0]  # ties
    settings = TokenRulesConfig(rule="archer", archer_quantile=0.8, archer_clip_knowledge=0.2)
    effect = apply_rule("archer", TokenRuleInputs(advantages, log_probs, entropies, mask), settings)
    for row in range(mask.size(0)):
        real = [float(entropies[row, t]) for t in range(mask.size(1)) if mask[row, t]]
        threshold = interpolated_quantile(real, 0.8) if real else math.inf
        for t in range(mask.size(1)):
            reasoning = bool(mask[row, t]) and float(entropies[row, t]) > threshold
            assert bool(effect.touched[row, t]) == reasoning == bool(effect.no_kl[row, t]), (row, t)
            assert float(effect.clip_range[row, t]) == (0.5 if reasoning else 0.2), (row, t)
    assert not effect.touched[2].any() and not effect.touched[3].any()
    assert effect.keep is None and effect.advantages is None and effect.penalty is None


# --------------------------------------------------------------------------------------------------
# STAPO: spurious tokens, against a loop


def loop_spurious(advantages, log_probs, entropies, mask, tau_p: float, q: float) -> set:
    tokens = [(b, t) for b in range(mask.size(0)) for t in range(mask.size(1)) if mask[b, t]]
    if not tokens:
        return set()
    tau_h = interpolated_quantile([float(entropies[b, t]) for b, t in tokens], q)
    return {
        (b, t)
        for b, t in tokens
        if float(advantages[b, t]) > 0 and math.exp(float(log_probs[b, t])) < tau_p and float(entropies[b, t]) < tau_h
    }


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("tau_p", "q"), [(0.01, 0.05), (0.3, 0.5), (1.0, 1.0)])
def test_stapo_silences_positive_rare_confident_tokens(seed, tau_p, q):
    advantages, log_probs, entropies, mask = random_unit(rows=6, width=8, seed=seed)
    entropies[1, :3] = entropies[0, 0]  # ties at the threshold stay (strictly below it is spurious)
    settings = TokenRulesConfig(rule="stapo", stapo_probability=tau_p, stapo_entropy_quantile=q)
    effect = apply_rule("stapo", TokenRuleInputs(advantages, log_probs, entropies, mask), settings)
    expected = loop_spurious(advantages, log_probs, entropies, mask, tau_p, q)
    silenced = {(b, t) for b, t in effect.touched.nonzero().tolist()}
    assert silenced == expected
    assert torch.equal(effect.keep, ~effect.touched)
    if (tau_p, q) == (0.3, 0.5):
        assert expected  # the case tests something


def test_stapo_on_an_empty_unit_and_one_token_silences_nothing():
    settings = TokenRulesConfig(rule="stapo", stapo_probability=1.0, stapo_entropy_quantile=1.0)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    values = torch.zeros(2, 3, dtype=torch.float64)
    effect = apply_rule("stapo", TokenRuleInputs(values + 1, values - 5, values, empty), settings)
    assert not effect.touched.any() and effect.keep.all()
    one = empty.clone()
    one[0, 0] = True  # tau_h is its own entropy, which it is not below
    effect = apply_rule("stapo", TokenRuleInputs(values + 1, values - 5, values, one), settings)
    assert not effect.touched.any()


# --------------------------------------------------------------------------------------------------
# In the trainer: Archer against a float64 port of the authors' loss; STAPO against TRL's loss minus the
# silenced tokens


def archer_authors_loss(log_prob, old_log_prob, ref_log_prob, advantages, response_mask, entropy, settings, beta):
    """Archer's actor loss in float64, as its authors compute it (``use_token_entropy_separate``, dual clip
    ``clip_ratio_c``, ``kl_loss_type=low_var_kl``, ``loss_agg_mode=token-mean``), except the KL normaliser: the
    authors mean the KL over the knowledge tokens, TRL (and rlvr) over every token; ``beta`` is TRL's."""
    mask = response_mask.double()
    masked_entropy = torch.where(response_mask.bool(), entropy.detach(), torch.nan)
    quantile = torch.nanquantile(masked_entropy, q=settings.archer_quantile, dim=-1, keepdim=True)
    knowledge = (masked_entropy <= quantile) & response_mask.bool()  # the authors' "high_entropy_mask"
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    low, high = settings.archer_clip_knowledge, settings.archer_clip_reasoning
    clipped = torch.where(knowledge, torch.clamp(ratio, 1 - low, 1 + low), torch.clamp(ratio, 1 - high, 1 + high))
    pg_losses2 = -advantages * clipped
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * 10.0  # clip_ratio_c of the authors' scripts
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = (pg_losses * mask).sum() / mask.sum()
    kl = ref_log_prob - log_prob
    low_var_kl = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    return pg_loss + beta * (low_var_kl * knowledge).sum() / mask.sum()


def test_archer_in_the_trainer_is_the_authors_loss(tiny_checkpoint, tmp_path):
    """Off-policy (old and reference log-probs moved away from the policy's): rlvr's Archer through TRL's dapo
    loss, with TRL's two-sided clip ``delta`` at the authors' dual-clip bound 10 and TRL's ratio weighting of the
    KL term off, equals the authors' loss (KL normaliser as noted) in value and gradient."""
    from tests.test_trainer import make_batch

    rules = TokenRulesConfig(rule="archer", archer_clip_knowledge=0.05, archer_clip_reasoning=0.15)
    beta = 0.3  # large, so that the KL term's share of the gradient is checked
    trainer = rule_trainer(
        tiny_checkpoint,
        tmp_path,
        rules,
        num_iterations=2,
        beta=beta,
        delta=10.0,
        use_bias_correction_kl=False,  # the authors' KL term is not weighted by the ratio (TRL's default is)
    )
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        current, _ = policy_forward(trainer, batch)
    offsets = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.6
    batch["old_per_token_logps"] = (current + offsets.double()).float()  # ratios from 0.74 to 1.35
    batch["ref_per_token_logps"] = (current - offsets.double().flip(0)).float()
    reference_logps = batch["ref_per_token_logps"].clone()

    def reference():
        logps, entropies = policy_forward(trainer, batch)
        advantages = batch["advantages"].double().unsqueeze(1).expand_as(logps)
        old, ref = batch["old_per_token_logps"].double(), batch["ref_per_token_logps"].double()
        return archer_authors_loss(logps, old, ref, advantages, mask, entropies, rules, beta)

    inputs = dict(batch)
    compare_with_reference(trainer, inputs, reference)
    assert torch.equal(inputs["ref_per_token_logps"], reference_logps)  # put back after the loss
    assert trainer.epsilon_low == trainer.epsilon_high == 0.2  # TRL's clip range put back
    share = trainer.selection.step_metrics["train"].drain()["token_rules/touched_share"][-1]
    assert 0.1 < share < 0.3  # each response's top ~20% by entropy


def test_stapo_in_the_trainer_drops_the_silenced_tokens_from_the_sum(tiny_checkpoint, tmp_path):
    """Thresholds wide enough for a tiny model to have spurious tokens: TRL's dapo loss with the silenced tokens
    left out of its sum, not of its normaliser."""
    from tests.test_trainer import make_batch

    rules = TokenRulesConfig(rule="stapo", stapo_probability=0.5, stapo_entropy_quantile=0.6)
    trainer = rule_trainer(tiny_checkpoint, tmp_path, rules)
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        logps, entropies = policy_forward(trainer, batch)
    advantages = batch["advantages"].double().unsqueeze(1).expand_as(logps)
    spurious = loop_spurious(advantages, logps, entropies, mask, 0.5, 0.6)
    assert spurious and len(spurious) < int(mask.sum())

    def reference():
        logps, _ = policy_forward(trainer, batch)
        keep = mask.double()
        for b, t in spurious:
            keep[b, t] = 0.0
        per_token = -batch["advantages"].double().unsqueeze(1) * torch.exp(logps - logps.detach())
        return (per_token * keep).sum() / mask.sum()

    compare_with_reference(trainer, batch, reference)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["token_rules.rule=archer"], "token_rules.rule=archer: Archer keeps every token's gradient"),
        (["token_rules.rule=archer", "forking.policy_tokens=all", "grpo.loss_type=sapo"], "grpo.loss_type=sapo"),
        (["token_rules.archer_quantile=1.0"], "token_rules.archer_quantile: must be in (0, 1)"),
        (["token_rules.archer_clip_reasoning=0"], "token_rules.archer_clip_reasoning"),
        (["token_rules.stapo_probability=0"], "token_rules.stapo_probability"),
        (["token_rules.stapo_entropy_quantile=2"], "token_rules.stapo_entropy_quantile"),
        (["token_rules.rule=gtpo", "grpo.gradient_accumulation_steps=2"], "grpo.steps_per_generation=2 splits"),
        (["token_rules.gtpo_entropy_weight=-1"], "token_rules.gtpo_entropy_weight: must be >= 0"),
    ],
)
def test_what_the_field_rules_cannot_run_with_fails_before_any_model_is_built(overrides, message):
    from rlvr.run.config import load_config

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


@pytest.mark.parametrize("arm", ["archer", "stapo", "gtpo", "grpo_s"])
def test_the_field_arms_train_from_their_packaged_overlays(tmp_path, arm):
    """``rlvr train --config quickstart --arm archer|stapo|gtpo|grpo_s`` (a tiny run): the rule's share of tokens
    is logged (Archer's reasoning tokens, about a fifth of each response; STAPO's silenced ones; the tokens GTPO
    and GRPO-S give an advantage)."""
    import json

    from tests.test_cli import train_arm

    logged, output = train_arm(tmp_path, arm)
    assert "token_rules/touched_share" in logged
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    shares = [record["token_rules/touched_share"] for record in records if "token_rules/touched_share" in record]
    assert shares and all(0.0 <= share <= 1.0 for share in shares)
    if arm == "archer":
        assert all(0.1 < share < 0.3 for share in shares) and "kl" in logged  # TRL logs its KL term


# --------------------------------------------------------------------------------------------------
# GTPO and GRPO-S: entropy-weighted rewards, against loops written from the paper's definitions


def grouped_unit(seed: int, zero_entropy: bool = False):
    """Four groups of 4 rows: a mixed group, a group that all scored the same (advantage 0), a mixed group with
    one row at exactly the group mean (advantage 0) and one with a single token, and a group of successes only
    (positive advantages everywhere, as a batch not normalised per group can have: no reward signal either)."""
    advantages, log_probs, entropies, mask = random_unit(rows=16, width=6, seed=seed)
    sequence = [1.2, -0.4, -0.4, 0.7, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0, -1.1, -0.3, 0.2, 0.5, 0.1, 0.3]
    advantages = torch.tensor(sequence, dtype=torch.float64)[:, None].expand(16, 6).contiguous()
    mask[9] = False
    mask[9, 0] = True  # one token
    entropies[1, :2] = entropies[0, :2]  # ties
    if zero_entropy:
        entropies[10, 0] = 0.0  # a failure's weight 1 / H at the floor
    groups = torch.arange(16) // 4
    return advantages, log_probs, entropies, mask, groups


def loop_normalised(rewards: dict) -> dict:
    values = list(rewards.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1))
    return {key: (value - mean) / (std + 1e-4) for key, value in rewards.items()}


def loop_gtpo(advantages, entropies, mask, groups, a1, a2) -> dict:
    result = {}
    for group in sorted(set(groups.tolist())):
        rows = [r for r in range(len(groups)) if groups[r] == group]
        sign = {r: (float(advantages[r, 0]) > 0) - (float(advantages[r, 0]) < 0) for r in rows}
        real = [(r, t) for r in rows for t in range(mask.size(1)) if mask[r, t]]
        if not (any(s > 0 for s in sign.values()) and any(s < 0 for s in sign.values())):
            result |= dict.fromkeys(real, 0.0)
            continue
        rewards = {}
        for r, t in real:
            if sign[r] > 0:
                alive = [k for k in rows if sign[k] > 0 and mask[k, t]]
                total = sum(float(entropies[k, t]) for k in alive)
                share = len(alive) * float(entropies[r, t]) / total if total > 0 else 0.0
                rewards[(r, t)] = a1 + a2 * share
            elif sign[r] < 0:
                alive = [k for k in rows if sign[k] < 0 and mask[k, t]]
                inverse = {k: 1.0 / max(float(entropies[k, t]), 1e-6) for k in alive}
                rewards[(r, t)] = -a1 - a2 * len(alive) * inverse[r] / sum(inverse.values())
            else:
                rewards[(r, t)] = 0.0
        result |= loop_normalised(rewards)
    return result


def loop_grpo_s(advantages, entropies, mask, groups, a1, a2) -> dict:
    result = {}
    for group in sorted(set(groups.tolist())):
        rows = [r for r in range(len(groups)) if groups[r] == group and mask[r].any()]
        sign = {r: (float(advantages[r, 0]) > 0) - (float(advantages[r, 0]) < 0) for r in rows}
        mean_entropy = {
            r: sum(float(entropies[r, t]) for t in range(mask.size(1)) if mask[r, t]) / int(mask[r].sum()) for r in rows
        }
        if not (any(s > 0 for s in sign.values()) and any(s < 0 for s in sign.values())):
            result |= dict.fromkeys(rows, 0.0)
            continue
        successes = [r for r in rows if sign[r] > 0]
        failures = [r for r in rows if sign[r] < 0]
        rewards = {}
        for r in rows:
            if sign[r] > 0:
                rewards[r] = a1 + a2 * len(successes) * mean_entropy[r] / sum(mean_entropy[k] for k in successes)
            elif sign[r] < 0:
                inverse = {k: 1.0 / max(mean_entropy[k], 1e-6) for k in failures}
                rewards[r] = -a1 - a2 * len(failures) * inverse[r] / sum(inverse.values())
            else:
                rewards[r] = 0.0
        result |= loop_normalised(rewards)
    return result


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("a1", "a2"), [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("zero_entropy", [False, True])
def test_gtpo_token_rewards_match_a_loop(seed, a1, a2, zero_entropy):
    advantages, log_probs, entropies, mask, groups = grouped_unit(seed, zero_entropy)
    settings = TokenRulesConfig(rule="gtpo", gtpo_outcome_weight=a1, gtpo_entropy_weight=a2)
    effect = apply_rule("gtpo", TokenRuleInputs(advantages, log_probs, entropies, mask, groups=groups), settings)
    expected = loop_gtpo(advantages, entropies, mask, groups, a1, a2)
    for (r, t), value in expected.items():
        assert float(effect.advantages[r, t]) == pytest.approx(value, rel=1e-9, abs=1e-9), (r, t)
    assert not effect.advantages[~mask].any()  # padding
    assert not effect.advantages[4:8].any() and not effect.advantages[12:].any()  # groups without reward signal
    if a2 == 0.0:  # no entropy term: within a group every success gets the same advantage, every failure too
        assert len({round(float(v), 9) for v in effect.advantages[0][mask[0]]}) == 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("a1", "a2"), [(1.0, 1.0), (0.5, 2.0)])
def test_grpo_s_sequence_rewards_match_a_loop(seed, a1, a2):
    advantages, log_probs, entropies, mask, groups = grouped_unit(seed, zero_entropy=True)
    settings = TokenRulesConfig(rule="grpo_s", gtpo_outcome_weight=a1, gtpo_entropy_weight=a2)
    effect = apply_rule("grpo_s", TokenRuleInputs(advantages, log_probs, entropies, mask, groups=groups), settings)
    expected = loop_grpo_s(advantages, entropies, mask, groups, a1, a2)
    for r, value in expected.items():
        row = effect.advantages[r][mask[r]]
        assert torch.allclose(row, torch.full_like(row, value), rtol=1e-9, atol=1e-9), r
    assert not effect.advantages[~mask].any()


def test_gtpo_without_groups_fails_with_a_clear_error():
    advantages, log_probs, entropies, mask, _ = grouped_unit(0)
    with pytest.raises(ValueError, match="prompt group"):
        apply_rule("gtpo", TokenRuleInputs(advantages, log_probs, entropies, mask), TokenRulesConfig(rule="gtpo"))


@pytest.mark.parametrize("rule", ["gtpo", "grpo_s"])
def test_entropy_weighted_advantages_in_the_trainer(tiny_checkpoint, tmp_path, rule):
    """TRL's dapo loss with the rule's (B, T) advantages (from the batch's prompt groups and the policy's
    entropies) in place of the batch's; the batch's own advantages are put back after the loss."""
    from rlvr.rollouts import GROUP_IDS_KEY
    from tests.test_trainer import make_batch

    rules = TokenRulesConfig(rule=rule, gtpo_outcome_weight=1.0, gtpo_entropy_weight=1.0)
    trainer = rule_trainer(tiny_checkpoint, tmp_path, rules)
    batch = make_batch(trainer)
    mask = batch["completion_mask"].bool()
    original = batch["advantages"].clone()
    loop = loop_gtpo if rule == "gtpo" else loop_grpo_s
    with torch.no_grad():
        _, entropies = policy_forward(trainer, batch)
    sequence = batch["advantages"].double()[:, None].expand_as(entropies)
    expected = loop(sequence, entropies, mask, batch[GROUP_IDS_KEY], 1.0, 1.0)
    shaped = torch.zeros_like(entropies)
    for key, value in expected.items():
        if rule == "gtpo":
            shaped[key] = value
        else:
            shaped[key] = torch.where(mask[key], value, 0.0)
    assert shaped.abs().sum() > 0

    def reference():
        logps, _ = policy_forward(trainer, batch)
        per_token = -shaped * torch.exp(logps - logps.detach())
        return (per_token * mask).sum() / mask.sum()

    inputs = dict(batch)
    compare_with_reference(trainer, inputs, reference)
    assert torch.equal(inputs["advantages"], original)


@pytest.mark.parametrize("arm", ["archer", "stapo", "gtpo", "grpo_s"])
def test_the_field_arms_validate_on_countdown_and_in_the_methods_compare(arm, tmp_path):
    """``rlvr train --config countdown --arm ARM`` and each planned run of ``rlvr compare --config methods``
    load and validate (countdown holds whole groups per micro-batch: GTPO's condition)."""
    from rlvr.experiment.compare import load_experiment_config, plan_runs
    from rlvr.utils.packaged import CONFIG_ROOT

    config = load_experiment_config([CONFIG_ROOT / "countdown.yaml", CONFIG_ROOT / "arms" / f"{arm}.yaml"])
    assert config.token_rules.rule == arm and config.forking.policy_tokens == "all"
    _, runs = plan_runs([str(CONFIG_ROOT / "compare" / "methods.yaml")], [f"output_dir={tmp_path}"], [arm], None)
    assert len(runs) == 3 and all(run.config.token_rules.rule == arm for run in runs)
    assert all(run.config.grpo["num_iterations"] == 2 for run in runs)
