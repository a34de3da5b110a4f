"""Sampling with numerics of the engine's own inside ForkingGRPOTrainer: the copy engine runs TRL's vLLM path
(sync after optimizer steps, sampling log-probs, importance-sampling correction), its routing is replayed,
each batch's mismatch is measured; vLLM's routed experts are kept from TRL's generator (stand-ins here)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from rlvr.models import ARCHITECTURES, build_char_tokenizer, build_tiny_moe
from rlvr.moe.config import MoEConfig
from rlvr.moe.hooks import RoutingHooks
from rlvr.moe.replay import NOT_RECORDED
from rlvr.rollouts import ROUTING_KEY, RolloutConfig
from rlvr.rollouts.copy_engine import CopyEngine
from rlvr.rollouts.engine_routing import engine_routing_record
from rlvr.rollouts.mismatch import logprob_mismatch, routing_flips
from rlvr.rollouts.tree import left_pad, right_pad
from rlvr.run.config import load_config
from rlvr.training.vllm_routing import VLLMRoutedExperts, routed_experts_returned
from rlvr.utils.options import ConfigError
from tests.test_forking_rollouts import _batch
from tests.test_moe import SPEC
from tests.test_trainer import ROWS, make_trainer

NOISY = RolloutConfig(engine="copy", router_noise=1.0)


def _last(trainer, key: str) -> float:
    return trainer._metrics["train"][key][-1]


def test_a_copy_in_the_training_dtype_without_noise_samples_exactly_as_the_policy(tiny_checkpoint, tmp_path):
    policy = make_trainer(tiny_checkpoint(), tmp_path / "policy")
    copy = make_trainer(tiny_checkpoint(), tmp_path / "copy", rollout=RolloutConfig(engine="copy"))
    policy_batch, copy_batch = _batch(policy), _batch(copy)
    assert torch.equal(policy_batch["completion_ids"], copy_batch["completion_ids"])
    assert torch.equal(policy_batch["advantages"], copy_batch["advantages"])
    mask = copy_batch["completion_mask"].bool()
    torch.testing.assert_close(  # the engine's sampling log-probs are the policy's (float32 logits in generate)
        copy_batch["sampling_per_token_logps"][mask], copy_batch["old_per_token_logps"][mask], rtol=0, atol=2e-6
    )
    assert _last(copy, "mismatch/router_flips") == 0.0 and _last(copy, "mismatch/tokens_with_flip") == 0.0
    assert _last(copy, "mismatch/kl_k3") < 1e-10 and _last(copy, "mismatch/is_dropped_sequences") == 0.0
    assert not any(key.startswith("mismatch/") for key in policy._metrics["train"])  # no engine, nothing to measure


@pytest.mark.parametrize("steps_per_generation", [1, 2])
def test_the_engine_syncs_after_every_optimizer_step_before_it_samples(tiny_checkpoint, tmp_path, steps_per_generation):
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        rollout=RolloutConfig(engine="copy", dtype="bfloat16"),
        per_device_train_batch_size=ROWS // steps_per_generation,
        steps_per_generation=steps_per_generation,
        max_steps=4,
        learning_rate=1e-2,
    )
    generation = trainer.vllm_generation
    trainer.train()
    assert generation.syncs == 4 // steps_per_generation  # once per generation batch, each after a new step
    engine, policy = generation.engine.model, trainer.model
    stale = [not torch.equal(a, b.to(a.dtype)) for a, b in zip(engine.parameters(), policy.parameters(), strict=True)]
    assert any(stale)  # trained since the last sync
    _batch(trainer)
    for a, b in zip(engine.parameters(), policy.parameters(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))
    assert generation.syncs == 4 // steps_per_generation + 1


def test_without_a_correction_the_mismatch_is_measured_by_a_forward_of_its_own(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint(), tmp_path, rollout=NOISY, vllm_importance_sampling_correction=False)
    batch = _batch(trainer)
    assert "old_per_token_logps" not in batch and "importance_sampling_ratio" not in batch  # TRL computed neither
    assert _last(trainer, "mismatch/router_flips") > 0.1 and _last(trainer, "mismatch/logp_diff_max") > 0.0
    assert "mismatch/is_dropped_sequences" not in trainer._metrics["train"]  # no masking correction: nothing dropped


def test_replay_forces_the_engines_experts_in_the_old_policy_and_loss_forwards(tiny_checkpoint, tmp_path):
    live = make_trainer(tiny_checkpoint(), tmp_path / "live", rollout=NOISY)
    replayed = make_trainer(
        tiny_checkpoint(), tmp_path / "replay", rollout=NOISY, moe=MoEConfig(routing_replay="rollout")
    )
    live_batch, batch = _batch(live), _batch(replayed)
    assert torch.equal(live_batch["completion_ids"], batch["completion_ids"])  # same engine stream
    # the record is the engine's routing, laid out by the one function vLLM's goes through
    P, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    expected = replayed.rollouts.replay.engine_record(P, C)
    assert torch.equal(batch[ROUTING_KEY], expected)
    recorded = expected[..., 0] != NOT_RECORDED  # (B, P + C, layers)
    assert recorded[:, P:].any()
    # the trainer's own routers disagree with the engine (that is what is measured) ...
    assert _last(replayed, "mismatch/router_flips") == pytest.approx(_last(live, "mismatch/router_flips"))
    assert _last(replayed, "mismatch/router_flips") > 0.1
    # ... yet the old-policy forward ran on the engine's experts: closer to the engine's log-probs
    assert _last(replayed, "mismatch/logp_diff_mean") < 0.5 * _last(live, "mismatch/logp_diff_mean")
    assert not torch.equal(batch["old_per_token_logps"], live_batch["old_per_token_logps"])
    # the loss forward uses the engine's experts wherever the engine recorded them
    replayed._compute_loss(replayed.model, batch)
    routing = replayed.router_updates.hooks.current
    used = torch.stack(routing.indices, dim=1).reshape(*batch[ROUTING_KEY].shape)  # (B, P + C, layers, k)
    same = torch.sort(used.long(), -1).values == torch.sort(expected.long(), -1).values
    assert same.all(-1)[recorded].all()
    replayed.router_updates.release()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_replay_makes_every_familys_forward_route_as_the_copy_engine_did(architecture):
    tokenizer = build_char_tokenizer()
    model = build_tiny_moe(architecture, SPEC, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
    model.set_experts_implementation("eager")
    model = model.double().eval()
    engine = CopyEngine(model, torch.float64, router_noise=1.0, seed=3)
    prompts = [tokenizer(text)["input_ids"] for text in ("1+2=", "7-3+1=", "9=")]
    config = GenerationConfig(do_sample=True, top_k=0, max_new_tokens=6, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    out = engine.generate(prompts, config, tokenizer.pad_token_id, [tokenizer.eos_token_id])
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    completion_ids, completion_mask = right_pad(out.completion_ids, tokenizer.pad_token_id)
    P, C = prompt_ids.shape[1], completion_ids.shape[1]
    record = engine.replay_record(out, prompts, P, C)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    hooks = RoutingHooks(model, gate_routers=False, gate_experts=False)
    for forced in (None, record):  # live routing, then the engine's replayed
        routing = hooks.begin(*input_ids.shape, forced=forced)
        with torch.enable_grad():
            model(input_ids=input_ids, attention_mask=attention)
        used = torch.stack(routing.indices, dim=1).reshape(*record.shape)
        hooks.release()
        recorded = (record[..., 0] != NOT_RECORDED).all(-1) & attention.bool()  # (B, P + C)
        positions = recorded.clone()
        positions[:, :P] = False
        flips = routing_flips(record, used, positions)["mismatch/router_flips"]
        if forced is None:
            assert flips > 0.0  # the noisy engine chose other experts than the policy
        else:
            assert flips == 0.0
    hooks.remove()
    engine.remove()


# ---------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["rollout.dtype=bfloat16"], "rollout.dtype"),
        (["rollout.router_noise=0.5"], "rollout.router_noise"),
        (["rollout.engine=copy", "rollout.router_noise=-1"], "rollout.router_noise"),
        (["rollout.engine=copy", "rollout.mode=forking_tree", "grpo.num_generations=4"], "rollout.engine"),
        (["rollout.engine=copy", "grpo.use_vllm=true"], "rollout.engine"),
        (["rollout.engine=vllm"], "rollout.engine"),
        (["moe.routing_replay=rollout", "grpo.use_transformers_paged=true"], "moe.routing_replay"),
    ],
)
def test_engine_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_rollout_replay_is_accepted_with_vllm():
    config = load_config(None, ["moe.routing_replay=rollout", "grpo.use_vllm=true"])
    assert config.moe.routing_replay == "rollout"


def test_the_trainer_refuses_the_copy_engine_with_tools(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint(), tmp_path, rollout=RolloutConfig(engine="copy"))
    trainer.tools = [len]  # as TRL holds the tools it was given
    with pytest.raises(ValueError, match="rollout.engine: copy .* tools"):
        trainer._check_rollout()


# ---------------------------------------------------------------------------------------------------------
# vLLM's routed experts, kept from TRL's generator: stand-ins for vLLM's outputs and the server's JSON


class _Completion:
    def __init__(self, token_ids, routed_experts):
        self.token_ids, self.routed_experts = token_ids, routed_experts


class _Request:
    def __init__(self, outputs, prompt_routed_experts=None):
        self.outputs = outputs
        if prompt_routed_experts is not None:
            self.prompt_routed_experts = prompt_routed_experts


class _ColocateGeneration:
    """TRL's VLLMGeneration in colocate mode, reduced to what the wrapper touches."""

    mode, tensor_parallel_size = "colocate", 1

    def __init__(self, requests):
        self.llm = type("LLM", (), {})()
        self.llm.generate = lambda prompts, **kwargs: requests

    def generate(self, prompts, images, num_generations, profiler=None):
        outputs = self.llm.generate(prompts)
        return prompts, [c.token_ids for r in outputs for c in r.outputs], None, None


def _experts(rows: int, seed: int) -> np.ndarray:  # [rows, layers=2, k=2], distinct experts per top-k
    generator = np.random.default_rng(seed)
    return np.stack([generator.permutation(4)[:2] for _ in range(rows * 2)]).reshape(rows, 2, 2).astype(np.int32)


def test_colocated_vllm_routed_experts_are_kept_per_row_in_every_layout():
    prompts = [[5, 6, 7], [5, 6]]
    whole = _experts(3 + 4 - 1, 0)  # 0.14-0.20: [P + C - 1, layers, k], one array
    prompt, completion = _experts(2, 1).astype(np.int16), _experts(2, 2).astype(np.int16)  # 0.21: split
    requests = [_Request([_Completion([1, 2, 3, 4], whole)]), _Request([_Completion([1, 2, 3], completion)], prompt)]
    generation = _ColocateGeneration(requests)
    kept = VLLMRoutedExperts(generation, process_index=0, num_processes=1, broadcast=None)
    _, completion_ids, _, _ = generation.generate(prompts, None, 1)
    routings = kept.take_routing()
    assert kept.take_routing() is None  # handed over once
    record = engine_routing_record(routings, [3, 2], [4, 3], 3, 4, num_experts=4, top_k=2, moe_layers=[0, 1])
    assert torch.equal(record[0, :6], torch.from_numpy(whole).to(record.dtype))
    assert torch.equal(record[1, 1:3], torch.from_numpy(prompt).to(record.dtype))
    assert torch.equal(record[1, 3:5], torch.from_numpy(completion).to(record.dtype))
    assert (record[1, 0] == NOT_RECORDED).all() and (record[:, -1] == NOT_RECORDED).all()


def test_without_routed_experts_from_vllm_there_is_no_routing_and_replay_says_how_to_get_it():
    requests = [_Request([_Completion([1, 2], None)])]
    generation = _ColocateGeneration(requests)
    kept = VLLMRoutedExperts(generation, process_index=0, num_processes=1, broadcast=None)
    generation.generate([[5, 6]], None, 1)
    assert kept.take_routing() is None
    from rlvr.rollouts.routing import EngineSample, ReplayRecorder

    recorder = ReplayRecorder(hooks=object(), source="rollout")
    recorder.start_batch()
    with pytest.raises(RuntimeError, match="enable-return-routed-experts"):
        recorder.keep_engine_sample(EngineSample([2], [2], None))


def _npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


class _ServerGeneration:
    """TRL's VLLMGeneration in server mode: the main process posts to /v1/completions and broadcasts."""

    mode = "server"

    def __init__(self, response, main: bool):
        self.vllm_client = None
        if main:
            self.vllm_client = type("Client", (), {})()
            self.vllm_client._post = lambda url, json: response

    def generate(self, prompts, images, num_generations, profiler=None):
        if self.vllm_client is not None:
            self.vllm_client._post("http://server/v1/completions", json={})
        return prompts, [[1, 2]] * len(prompts), None, None


def test_server_routed_experts_are_broadcast_and_sliced_as_trl_slices_completions():
    arrays = [_experts(1, seed) for seed in range(4)]  # completion-only rows (0.22+ over HTTP), C = 2
    response = {"choices": [{"token_ids": [1, 2], "routed_experts": _npy_base64(array)} for array in arrays]}
    sent = {}

    def broadcast(objects, source):  # process 0's list replaces every process's
        sent.setdefault("value", objects[0])
        objects[0] = sent["value"]

    main = _ServerGeneration(response, main=True)
    other = _ServerGeneration(response, main=False)
    kept_main = VLLMRoutedExperts(main, process_index=0, num_processes=2, broadcast=broadcast)
    kept_other = VLLMRoutedExperts(other, process_index=1, num_processes=2, broadcast=broadcast)
    main.generate([[5, 6], [5, 6]], None, 2)
    other.generate([[7, 8], [7, 8]], None, 2)
    for kept, first in ((kept_main, 0), (kept_other, 2)):
        record = engine_routing_record(kept.take_routing(), [2, 2], [2, 2], 2, 2, 4, 2, [0, 1])
        for row in range(2):
            assert torch.equal(record[row, 2], torch.from_numpy(arrays[first + row][0]).to(record.dtype))
            assert (record[row, :2] == NOT_RECORDED).all()  # the prompt keeps its live routing


def test_trls_colocated_engine_is_built_with_routed_experts_returned(monkeypatch):
    from trl.generation import vllm_generation

    built = {}

    def fake_llm(**kwargs):
        built.update(kwargs)

    monkeypatch.setattr(vllm_generation, "LLM", fake_llm, raising=False)
    with routed_experts_returned(True):
        vllm_generation.LLM(model="m")
    assert built == {"model": "m", "enable_return_routed_experts": True}
    assert vllm_generation.LLM is fake_llm  # restored
    built.clear()
    with routed_experts_returned(False):
        vllm_generation.LLM(model="m")
    assert built == {"model": "m"}


def test_mismatch_metrics_of_a_batch_match_the_reference_functions(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint(), tmp_path, rollout=NOISY, vllm_importance_sampling_mode="token_mask")
    batch = _batch(trainer)
    expected = logprob_mismatch(
        batch["sampling_per_token_logps"], batch["old_per_token_logps"], batch["completion_mask"]
    )
    for key, value in expected.items():
        assert _last(trainer, key) == pytest.approx(value)
    dropped = (batch["importance_sampling_ratio"] == 0) & batch["completion_mask"].bool()
    assert _last(trainer, "mismatch/is_dropped_tokens") == pytest.approx(
        float(dropped.sum()) / float(batch["completion_mask"].sum())
    )


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_trls_importance_sampling_correction_applies_to_the_copy_engine_in_every_mode(tiny_checkpoint, tmp_path, mode):
    """The ratio TRL puts in the batch is exp(old - sampling) per token or summed per sequence, truncated
    or masked outside [clip_min, clip_max], computed from the copy engine's sampling log-probs."""
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        rollout=RolloutConfig(engine="copy", router_noise=2.0),
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=0.995,
        vllm_importance_sampling_clip_max=1.005,
    )
    batch = _batch(trainer)
    mask = batch["completion_mask"].float()
    log_ratio = (batch["old_per_token_logps"] - batch["sampling_per_token_logps"]) * mask  # (B, C)
    if mode.startswith("sequence"):
        log_ratio = log_ratio.sum(dim=1, keepdim=True)  # (B, 1)
    ratio = log_ratio.exp()
    if mode.endswith("truncate"):
        expected = ratio.clamp(0.995, 1.005)
    else:
        expected = ratio.masked_fill((ratio < 0.995) | (ratio > 1.005), 0.0)
    torch.testing.assert_close(batch["importance_sampling_ratio"], expected)
    outside = (ratio < 0.995) | (ratio > 1.005)
    assert outside.any() and (~outside).any()  # the bounds bite, so the test can tell the modes apart
