"""Per-domain routing (rlvr.moe.domains) and the embedded task's domains."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import TinyMoESpec, build_char_tokenizer, build_tiny_moe
from rlvr.moe.domains import routing_by_domain
from rlvr.run.evaluation import evaluate_accuracy

PROMPTS = ["Compute: 2+3", "Compute: 7*8+1", "Compute: 1-1+4", "Compute: 9*9"]
SOLUTIONS = ["2+3=5\n\\boxed{5}", "7*8=56\n56+1=57\n\\boxed{57}", "1-1=0\n0+4=4\n\\boxed{4}", "9*9=81\n\\boxed{81}"]
DOMAINS = ["addition", "multiplication", "addition", "multiplication"]


def test_domain_loads_match_one_unpadded_forward_per_pair():
    """Batched with left/right padding vs one pair at a time through the router's own top-k."""
    tokenizer = build_char_tokenizer()
    spec = TinyMoESpec(num_layers=2, hidden_size=32, expert_size=16, num_experts=4, top_k=2)
    model = build_tiny_moe("qwen3_moe", spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=5)
    model.set_experts_implementation("eager")
    model = model.double()
    result = routing_by_domain(model, tokenizer, PROMPTS, SOLUTIONS, DOMAINS, batch_size=3)

    counts = {domain: torch.zeros(2, 4, dtype=torch.float64) for domain in set(DOMAINS)}
    for prompt, solution, domain in zip(PROMPTS, SOLUTIONS, DOMAINS, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + solution_ids])
        logits = model(input_ids=ids, output_router_logits=True).router_logits  # per layer (T, E)
        decisions = slice(len(prompt_ids) - 1, len(prompt_ids) + len(solution_ids) - 1)  # predict the solution
        for layer, layer_logits in enumerate(logits):
            chosen = torch.topk(torch.softmax(layer_logits.double(), -1), 2, dim=-1).indices[decisions].reshape(-1)
            counts[domain][layer] += torch.bincount(chosen, minlength=4).double()
    for layer in range(2):
        for domain in set(DOMAINS):
            expected = counts[domain][layer] / counts[domain][layer].sum()
            assert result["layers"][layer]["loads"][domain] == pytest.approx(expected.tolist(), abs=1e-12)
    assert result["tokens"]["addition"] == sum(
        len(s) for s, d in zip(SOLUTIONS, DOMAINS, strict=True) if d == "addition"
    )


def test_own_expert_shares_match_one_unpadded_forward_per_pair():
    """Own-expert shares on all, forking and other tokens against a plain reference: top-1 experts and
    float64 entropies from one unpadded forward per pair, forking = the top rho by entropy, the matching
    tried over every domain -> expert assignment."""
    tokenizer = build_char_tokenizer()
    spec = TinyMoESpec(num_layers=2, hidden_size=32, expert_size=16, num_experts=3, top_k=1)
    model = build_tiny_moe("qwen3_moe", spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=2)
    model.set_experts_implementation("eager")
    model = model.double()
    result = routing_by_domain(model, tokenizer, PROMPTS, SOLUTIONS, DOMAINS, batch_size=3, rho=0.3)

    top1, entropy, labels = [], [], []
    for prompt, solution, domain in zip(PROMPTS, SOLUTIONS, DOMAINS, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
        output = model(input_ids=torch.tensor([prompt_ids + solution_ids]), output_router_logits=True)
        decisions = slice(len(prompt_ids) - 1, len(prompt_ids) + len(solution_ids) - 1)
        top1.append(torch.stack([layer_logits.argmax(-1)[decisions] for layer_logits in output.router_logits], 1))
        probabilities = torch.softmax(output.logits[0, decisions], -1)
        entropy.append(-(probabilities * probabilities.log()).sum(-1))
        labels += [domain] * len(solution_ids)
    top1, entropy = torch.cat(top1), torch.cat(entropy)  # (tokens, layers), (tokens,)
    forking = entropy >= entropy.sort(descending=True).values[math.ceil(0.3 * len(entropy)) - 1]
    domains = ["addition", "multiplication"]
    of = {d: torch.tensor([label == d for label in labels]) for d in domains}

    def share(layer, own, subset):
        return sum(float((top1[of[d] & subset, layer] == own[d]).double().mean()) for d in domains) / 2

    for layer in range(2):
        matchings = [
            dict(zip(domains, pair, strict=True)) for pair in [(a, b) for a in range(3) for b in range(3) if a != b]
        ]
        everything = torch.ones(len(labels), dtype=torch.bool)
        best = max(matchings, key=lambda own: share(layer, own, everything))
        measured = result["layers"][layer]
        assert measured["own_share"] == pytest.approx(share(layer, best, everything), abs=1e-12)
        assert measured["own_share_forking"] == pytest.approx(share(layer, best, forking), abs=1e-12)
        assert measured["own_share_other"] == pytest.approx(share(layer, best, ~forking), abs=1e-12)
        assert measured["own_expert"] == best
    assert result["forking_rho"] == 0.3 and 0.0 < result["mean_own_share"] <= 1.0


def test_own_experts_matching_is_one_to_one_and_reads_routed_alike_as_one_half():
    from rlvr.moe.domains import own_experts

    # both domains mostly on expert 0: the matching still gives each its own expert
    own = own_experts({"a": torch.tensor([0.9, 0.1]), "b": torch.tensor([0.8, 0.2])})
    assert sorted(own.values()) == [0, 1] and own == {"a": 0, "b": 1}
    assert own_experts({"a": torch.tensor([0.1, 0.0, 0.9]), "b": torch.tensor([0.2, 0.7, 0.1])}) == {"a": 2, "b": 1}
    assert own_experts({"a": torch.tensor([1.0]), "b": torch.tensor([1.0])}) == {}  # more domains than experts


def test_js_is_one_bit_for_disjoint_experts_and_zero_for_identical_routing():
    from rlvr.moe.domains import _js_bits

    assert _js_bits([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]) == pytest.approx(1.0)
    assert _js_bits([torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])]) == pytest.approx(0.0, abs=1e-12)


def test_task_domains_mix_and_label_problems():
    task = ArithmeticTask(max_operand=9, domains=["addition", "multiplication"])
    problems = generate_problems(task, "train", 200, seed=0)
    by_domain = {d: [p for p in problems if p.domain == d] for d in ("addition", "multiplication")}
    assert all(40 < len(group) < 160 for group in by_domain.values())
    for problem in by_domain["multiplication"]:
        assert "*" in problem.expression and str(eval(problem.expression)) == problem.answer  # noqa: S307
    for problem in by_domain["addition"]:
        assert "*" not in problem.expression and str(eval(problem.expression)) == problem.answer  # noqa: S307
    assert problems_to_dataset(problems)["domain"] == [p.domain for p in problems]
    only = generate_problems(ArithmeticTask(domains=["multiplication"]), "eval", 20, seed=0)
    assert {p.domain for p in only} == {"multiplication"}
    with pytest.raises(ValueError, match="domains"):
        generate_problems(ArithmeticTask(domains=["division"]), "train", 5, seed=0)


def test_accuracy_per_group():
    def reward(completions, answer, **_):
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]

    from unittest import mock

    # generation replaced by fixed completions: this checks the bookkeeping per group, not a model
    with mock.patch("rlvr.run.evaluation.generate_completions", return_value=(["1", "x", "3", "4"], [1, 1, 1, 1])):
        result = evaluate_accuracy(
            None, None, ["a", "b", "c", "d"], ["1", "2", "3", "5"], reward, 4, groups=["p", "q", "p", "q"]
        )
    assert result.greedy_accuracy == 0.5
    assert result.by_group["p"]["greedy_accuracy"] == 1.0 and result.by_group["q"]["greedy_accuracy"] == 0.0
    assert result.by_group["p"]["num_problems"] == 2 and math.isnan(result.by_group["p"]["sampled_accuracy"])
