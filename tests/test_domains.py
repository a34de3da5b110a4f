"""Per-domain routing (rlvr.moe.domains) and the embedded task's domains."""

from __future__ import annotations

import math

import pytest
import torch

from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.evaluation import evaluate_accuracy
from rlvr.models import TinyMoESpec, build_char_tokenizer, build_tiny_moe
from rlvr.moe.domains import routing_by_domain

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
    with mock.patch("rlvr.evaluation.generate_completions", return_value=(["1", "x", "3", "4"], [1, 1, 1, 1])):
        result = evaluate_accuracy(
            None, None, ["a", "b", "c", "d"], ["1", "2", "3", "5"], reward, 4, groups=["p", "q", "p", "q"]
        )
    assert result.greedy_accuracy == 0.5
    assert result.by_group["p"]["greedy_accuracy"] == 1.0 and result.by_group["q"]["greedy_accuracy"] == 0.0
    assert result.by_group["p"]["num_problems"] == 2 and math.isnan(result.by_group["p"]["sampled_accuracy"])
