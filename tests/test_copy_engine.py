"""The copy engine: a sampler with its own numerics whose outputs go through the same path as vLLM's."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from rlvr.models import load_pretrained
from rlvr.moe.replay import NOT_RECORDED
from rlvr.rollouts.copy_engine import CopyEngine, teacher_forced
from rlvr.rollouts.mismatch import logprob_mismatch, routing_flips


@pytest.fixture()
def policy(tiny_checkpoint):
    model, tokenizer = load_pretrained(tiny_checkpoint(), "float64")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.eval(), tokenizer


def _prompts(tokenizer):
    return [tokenizer(text)["input_ids"] for text in ("1+2=", "7-3+1=", "9=")]


def _config(tokenizer, temperature=0.7):
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id
    )


def _teacher_forced(model, tokenizer, prompts, completions, temperature):
    """The policy's own log-probs (at the temperature) and routing of the engine's samples, in one forward."""
    view = teacher_forced(model, prompts, completions, tokenizer.pad_token_id, temperature)
    return view.logprobs, view.completion_mask, view.experts, view.prompt_width, view.logprobs.shape[1]


def _engine_record(engine, out, prompts, prompt_width, completion_width, routing):
    """The engine's routed experts (vLLM's layout) as a replay record over the teacher-forced batch."""
    return engine.replay_record(out, prompts, prompt_width, completion_width)


def test_a_float64_copy_without_noise_reproduces_the_policy_exactly(policy):
    model, tokenizer = policy
    engine = CopyEngine(model, torch.float64)
    prompts = _prompts(tokenizer)
    torch.manual_seed(0)
    out = engine.generate(prompts, _config(tokenizer), tokenizer.pad_token_id, [tokenizer.eos_token_id])
    logps, mask, routing, P, C = _teacher_forced(model, tokenizer, prompts, out.completion_ids, 0.7)
    for row, values in enumerate(out.logprobs):  # generate hands its processors float32 logits
        torch.testing.assert_close(
            torch.tensor(values, dtype=torch.float64), logps[row, : len(values)], rtol=0, atol=1e-6
        )
    record = _engine_record(engine, out, prompts, P, C, routing)
    recorded = record[..., 0] != NOT_RECORDED  # (B, P + C, layers)
    assert recorded.any()
    same = torch.sort(record.long(), -1).values == torch.sort(routing.long(), -1).values
    assert same.all(-1)[recorded].all()
    engine.remove()


def test_sync_copies_the_policys_new_weights(policy):
    model, tokenizer = policy
    engine = CopyEngine(model, torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    differs = any(
        not torch.equal(a.double(), b.float().double())
        for a, b in zip(engine.model.parameters(), model.parameters(), strict=True)
    )
    assert differs
    engine.sync(model, step=3)
    assert engine.synced_step == 3
    for a, b in zip(engine.model.parameters(), model.parameters(), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b.float())


def test_router_noise_and_bfloat16_make_a_measurable_mismatch(policy):
    model, tokenizer = policy
    prompts = _prompts(tokenizer) * 4
    flips = {}
    for noise in (0.0, 0.5):
        engine = CopyEngine(model, torch.float64, router_noise=noise, seed=1)
        torch.manual_seed(0)
        out = engine.generate(prompts, _config(tokenizer, 1.0), tokenizer.pad_token_id, [tokenizer.eos_token_id])
        logps, mask, routing, P, C = _teacher_forced(model, tokenizer, prompts, out.completion_ids, 1.0)
        record = _engine_record(engine, out, prompts, P, C, routing)
        positions = torch.zeros(record.shape[:2], dtype=torch.bool)
        positions[:, P:] = True
        flips[noise] = routing_flips(record, routing, positions)["mismatch/router_flips"]
        engine.remove()
    assert flips[0.0] == 0.0 and flips[0.5] > 0.05
    engine = CopyEngine(model, torch.bfloat16)
    torch.manual_seed(0)
    out = engine.generate(prompts, _config(tokenizer, 1.0), tokenizer.pad_token_id, [tokenizer.eos_token_id])
    logps, mask, *_ = _teacher_forced(model, tokenizer, prompts, out.completion_ids, 1.0)
    sampling = torch.zeros_like(logps)
    for row, values in enumerate(out.logprobs):
        sampling[row, : len(values)] = torch.tensor(values, dtype=torch.float64)
    metrics = logprob_mismatch(sampling, logps, mask)
    assert metrics["mismatch/logp_diff_max"] > 1e-3 and metrics["mismatch/kl_k3"] > 0
