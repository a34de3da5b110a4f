"""Adapters (``peft`` section): LoRA on experts through PEFT, SVF (Transformer²), against plain references."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerCallback

from rlvr.models import ARCHITECTURES, TinyMoESpec, build_tiny_moe, load_pretrained
from rlvr.moe import find_moe_layers
from rlvr.run.config import ForkingConfig, MoEConfig
from rlvr.tuning import AdapterConfig, SVFConfig, apply_svf, load_svf, merged, save_svf
from rlvr.tuning.lora import lora_config, lora_parameter_count
from rlvr.tuning.svf import decompose, svf_parameter_count, svf_parameters
from rlvr.tuning.targets import resolve_targets
from rlvr.utils.options import ConfigError
from tests.test_sparse_head import close
from tests.test_trainer import loss_and_grads, make_batch, make_trainer

SPEC = TinyMoESpec(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, expert_size=16, num_experts=4)
FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3"]


def tiny(architecture: str, dtype=torch.float64):
    model = build_tiny_moe(architecture, SPEC, vocab_size=50, pad_token_id=0, eos_token_id=1)
    model.set_experts_implementation("eager")  # grouped_mm rejects float64
    return model.to(dtype)


def input_ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(2, 50, (batch, length), generator=torch.Generator().manual_seed(3))


def perturb(parameters, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


# --------------------------------------------------------------------------------------------------
# SVF on plain tensors and modules


def test_decompose_reconstructs_2d_and_3d_weights_in_float64():
    for shape in [(6, 4), (4, 6), (3, 5, 2)]:
        weight = torch.randn(shape, dtype=torch.float64)
        u, s, vh = decompose(weight, "w")
        torch.testing.assert_close((u * s.unsqueeze(-2)) @ vh, weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("architecture", FAMILIES + ["llama4", "qwen2_moe"])
def test_svf_forward_equals_the_policy_at_init_and_transformer2s_weights_after(architecture, tmp_path):
    """At init the adapted policy is the policy, bit for bit; with moved vectors it is the policy whose every
    targeted matrix is U diag(s (1 + dz)) V^T (Transformer²'s W', written here from torch.linalg.svd)."""
    model = tiny(architecture)
    reference = tiny(architecture)
    ids = input_ids()
    expected = model(ids).logits
    targets = apply_svf(model, SVFConfig(cache_dir=str(tmp_path)))
    assert targets.linear and len(targets.experts) == 2 * SPEC.num_layers
    assert torch.equal(model(ids).logits, expected)

    perturb(svf_parameters(model).values())
    state = reference.state_dict()
    for name, dz in svf_parameters(model).items():
        key = name.removesuffix("_svf_dz")
        u, s, vh = torch.linalg.svd(state[key], full_matrices=False)
        state[key] = (u * (s * (1 + dz.detach().double())).unsqueeze(-2)) @ vh
    reference.load_state_dict(state)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-10)


def test_svf_gradients_reach_the_vectors_and_routers_only_and_match_autograd_on_the_formula(tmp_path):
    model, reference = tiny("qwen3_moe"), tiny("qwen3_moe")
    apply_svf(model, SVFConfig(cache_dir=str(tmp_path)))
    perturb(svf_parameters(model).values(), 0.1)
    ids = input_ids()
    model(ids).logits.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    routers = {f"{path}.weight" for path in model.svf_targets.routers}
    assert set(grads) == set(svf_parameters(model)) | routers
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in grads)

    # the reference: the same loss through W + U diag(s dz) V^T built by hand, dz leaves of autograd
    dzs = {n.removesuffix("_svf_dz"): p.detach().clone().requires_grad_(True) for n, p in svf_parameters(model).items()}
    weights = dict(reference.named_parameters())
    replaced = {}
    for key, dz in dzs.items():
        u, s, vh = decompose(weights[key], key)
        replaced[key] = weights[key].detach() + (u * (s * dz).unsqueeze(-2)) @ vh
    logits = torch.func.functional_call(reference, replaced, (ids,)).logits
    logits.square().mean().backward()
    for key, dz in dzs.items():
        torch.testing.assert_close(grads[f"{key}_svf_dz"], dz.grad, rtol=1e-9, atol=1e-12)


def test_frozen_routers_get_no_gradient(tmp_path):
    model = tiny("mixtral")
    apply_svf(model, SVFConfig(routers="freeze", cache_dir=str(tmp_path)))
    model(input_ids()).logits.sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(svf_parameters(model))


def test_merged_gives_plain_weights_under_the_base_names_and_restores_exactly(tmp_path):
    model, plain = tiny("gpt_oss"), tiny("gpt_oss")
    apply_svf(model, SVFConfig(cache_dir=str(tmp_path)))
    perturb(svf_parameters(model).values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = input_ids()
    adapted = model(ids).logits
    with merged(model):
        assert model.state_dict().keys() == plain.state_dict().keys()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(ids).logits, adapted, rtol=0, atol=1e-10)
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=0, atol=1e-10)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert torch.equal(model(ids).logits, adapted)


def test_decompositions_are_cached_and_reused(tmp_path):
    apply_svf(tiny("qwen3_moe"), SVFConfig(cache_dir=str(tmp_path)))
    cached = list(tmp_path.glob("factors-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    model = tiny("qwen3_moe")
    apply_svf(model, SVFConfig(cache_dir=str(tmp_path)))
    assert cached[0].stat().st_mtime_ns == stamp and len(list(tmp_path.glob("factors-*"))) == 1
    ids = input_ids()
    assert torch.equal(model(ids).logits, tiny("qwen3_moe")(ids).logits)


def test_svf_vectors_save_and_load_onto_a_fresh_policy(tmp_path):
    model = tiny("deepseek_v3")
    apply_svf(model, SVFConfig(cache_dir=str(tmp_path / "cache")))
    perturb([*svf_parameters(model).values(), *(p for p in model.parameters() if p.requires_grad)])
    save_svf(model, tmp_path / "vectors")
    fresh = load_svf(tiny("deepseek_v3"), tmp_path / "vectors")
    ids = input_ids()
    assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_parameter_counts_per_family_match_the_policy(architecture, tmp_path):
    """A vector of min(rows, columns) per matrix (per expert matrix); LoRA r (in + out) per matrix."""
    model = tiny(architecture, torch.float32)
    targets = resolve_targets(model, ["self_attn"], experts=True)
    trainable, frozen = svf_parameter_count(model, targets)
    lora = lora_parameter_count(targets, model, rank=4)
    apply_svf(model, SVFConfig(routers="freeze", cache_dir=str(tmp_path)))
    vectors = svf_parameters(model)
    assert trainable == sum(p.numel() for p in vectors.values())
    factors = sum(p.numel() for n, p in model.named_parameters() if "_svf_" in n and not n.endswith("_dz"))
    assert frozen == factors
    peft_model = get_peft_model(
        tiny(architecture, torch.float32), lora_config(AdapterConfig("lora", 4, routers="freeze"), model)
    )
    assert lora == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# LoRA through PEFT on every family, the routed experts included


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_lora_reaches_the_routed_experts_of_every_family(architecture):
    model = tiny(architecture, torch.float32)
    ids = input_ids()
    expected = model(ids).logits
    config = lora_config(AdapterConfig(method="lora", rank=2), model)
    assert len(config.target_parameters) == 2 * SPEC.num_layers
    peft_model = get_peft_model(model, config)
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=0)  # B = 0 at init
    peft_model(input_ids=ids).logits.square().mean().backward()
    trained = {n for n, p in peft_model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("experts" in n and "lora_A" in n for n in trained) or any(
        "experts" in n and "lora_B" in n for n in trained
    )
    assert any("modules_to_save" in n for n in trained)  # the routers' trainable copies
    layers = find_moe_layers(peft_model)
    assert len(layers) == SPEC.num_layers and layers[0].num_experts == SPEC.num_experts


# --------------------------------------------------------------------------------------------------
# In the trainer


def lora(checkpoint, **settings):
    model, _ = load_pretrained(checkpoint)
    return lora_config(AdapterConfig(method="lora", rank=4, **settings), model)


@pytest.mark.parametrize("architecture", FAMILIES)
def test_router_aware_updates_act_inside_a_peft_wrapper(tiny_checkpoint, tmp_path, architecture):
    """LoRA is the identity at init, so the routers' gradient in the PEFT-wrapped policy (their trainable
    copies) equals the full policy's with the same gates and routing replay; and the gates change it."""
    checkpoint = tiny_checkpoint(architecture)
    gated = MoEConfig(router_gate_scope="forking", expert_gate_scope="forking", routing_replay="old_policy")
    grads = {}
    for name, moe, peft_config in [
        ("plain", gated, None),
        ("lora", gated, lora(checkpoint)),
        ("lora_ungated", MoEConfig(routing_replay="old_policy"), lora(checkpoint)),
    ]:
        trainer = make_trainer(checkpoint, tmp_path / name, moe=moe, peft_config=peft_config, num_iterations=2)
        assert trainer.router_updates is not None and len(trainer.router_updates.layers) == len(
            find_moe_layers(trainer.model)
        )
        loss_and_grads(trainer, make_batch(trainer))
        grads[name] = {layer.index: layer.router.weight.grad.clone() for layer in trainer.router_updates.layers}
    for index, expected in grads["plain"].items():
        torch.testing.assert_close(grads["lora"][index], expected, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(grads["lora_ungated"][i], grads["lora"][i]) for i in grads["lora"])


def test_routing_analytics_and_the_forking_log_on_a_peft_policy(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint("mixtral"), tmp_path, peft_config=lora(tiny_checkpoint("mixtral")))
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    for key in (
        "forking/kept_fraction",
        "moe/router_entropy_forking",
        "moe/router_entropy_other",
        "moe/layer1/specialization_js",
    ):
        assert key in logged, key
    examples = [json.loads(line) for line in (tmp_path / "forking_tokens.jsonl").read_text().splitlines()]
    assert [record["step"] for record in examples] == [1, 2] and examples[-1]["top_forking_tokens"]
    loads = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert loads and loads[-1]["step"] == 2


@pytest.mark.parametrize("method", ["lora", "svf"])
def test_the_sparse_lm_head_gives_trls_gradients_under_adapters(tiny_checkpoint, tmp_path, method):
    """The LM head is frozen under adapters: projecting the forking rows alone back through it gives TRL's
    gradients for every adapter (float64 policy; TRL's fused head accumulates in float32, which bounds the
    agreement, as in tests/test_sparse_head.py)."""
    checkpoint = tiny_checkpoint()
    made = {}
    for setting in ("true", "false"):
        adapter = lora(checkpoint) if method == "lora" else SVFConfig(cache_dir=str(tmp_path / "cache"))
        made[setting] = make_trainer(
            checkpoint,
            tmp_path / setting,
            forking=ForkingConfig(rho=0.2, sparse_lm_head=setting),
            peft_config=adapter,
            dtype="float64",
        )
    assert made["true"].sparse_head and not made["false"].sparse_head
    for trainer in made.values():  # move the adapters off the identity, the same way in both
        perturb([p for n, p in trainer.model.named_parameters() if "lora_B" in n or n.endswith("_svf_dz")], 0.05)
    batch = make_batch(made["false"])
    expected_loss, expected = loss_and_grads(made["false"], batch)
    loss, grads = loss_and_grads(made["true"], batch)
    assert grads.keys() == expected.keys() and any("lora" in n or "_svf_dz" in n for n in grads)
    close(loss.double(), expected_loss.double(), rtol=1e-5)  # TRL's fused kernel accumulates in float32
    for name in expected:
        close(grads[name], expected[name], rtol=1e-5)


LOGPROBS_SCRIPT = """
import sys, torch
from rlvr.tuning import load_adapted
torch.set_num_threads(int(sys.argv[5]))
model, _ = load_adapted(sys.argv[1], base=sys.argv[2])
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(torch.log_softmax(model(input_ids=ids).logits.double(), -1), sys.argv[4])
"""

# Log-probs of the same adapter in two processes agree to float32 rounding, not bit for bit: the order of a
# reduction depends on the thread count and the CPU's kernels. One training step moves them by far more (shown
# in the test below), so this tolerance still tells a wrong adapter from the right one.
SAME_ADAPTER_ATOL = 1e-5


def logprobs_in_a_fresh_process(directory, base, ids, tmp_path) -> torch.Tensor:
    """(B, T, V) float64 log-probs of the adapter in ``directory`` loaded onto ``base`` by a new Python process
    that runs with this process's thread count."""
    torch.save(ids, tmp_path / "ids.pt")
    arguments = [str(directory), base, str(tmp_path / "ids.pt"), str(tmp_path / "lp.pt"), str(torch.get_num_threads())]
    subprocess.run([sys.executable, "-c", LOGPROBS_SCRIPT, *arguments], check=True)
    return torch.load(tmp_path / "lp.pt")


def assert_same_adapter(loaded: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(loaded, expected, rtol=0, atol=SAME_ADAPTER_ATOL)


class LogProbsAfterEachStep(TrainerCallback):
    """Records the policy's (B, T, V) float64 log-probs on ``ids`` after every optimizer step."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.by_step = ids, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.by_step[state.global_step] = torch.log_softmax(model(input_ids=self.ids).logits.double(), -1)
        model.train(was_training)


@pytest.mark.parametrize("method", ["lora", "svf"])
def test_a_trained_adapter_loads_into_a_fresh_process_with_the_same_log_probs(tiny_checkpoint, tmp_path, method):
    checkpoint = tiny_checkpoint()
    peft_config = lora(checkpoint) if method == "lora" else SVFConfig(cache_dir=str(tmp_path / "cache"))
    trainer = make_trainer(checkpoint, tmp_path / "run", peft_config=peft_config, learning_rate=0.05)
    ids = input_ids()
    recorder = LogProbsAfterEachStep(ids)
    trainer.add_callback(recorder)
    trainer.train()
    policy = trainer.model
    moved = [p for n, p in policy.named_parameters() if p.requires_grad and ("lora_B" in n or n.endswith("_svf_dz"))]
    assert moved and any(p.abs().max() > 0 for p in moved)  # training moved the adapter off the identity
    trainer.save_model(str(tmp_path / "adapter"))
    policy.eval()
    with torch.no_grad():
        expected = torch.log_softmax(policy(input_ids=ids).logits.double(), -1)
    assert torch.equal(recorder.by_step[2], expected)  # the callback sees the policy that was saved
    loaded = logprobs_in_a_fresh_process(tmp_path / "adapter", checkpoint, ids, tmp_path)
    assert_same_adapter(loaded, expected)
    # The tolerance can fail: the adapter one training step earlier is outside it by orders of magnitude.
    assert (recorder.by_step[1] - expected).abs().max() > 100 * SAME_ADAPTER_ATOL
    with pytest.raises(AssertionError):
        assert_same_adapter(recorder.by_step[1], expected)


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the key


def test_bad_settings_fail_naming_the_key(tiny_checkpoint, monkeypatch):
    from rlvr.run.config import load_config

    with pytest.raises(ConfigError, match=r"^peft.method: must be one of none, lora, svf; got 'qlora'"):
        load_config(overrides=["peft.method=qlora"])
    with pytest.raises(ConfigError, match=r"^peft.rank: must be >= 1; got 0"):
        load_config(overrides=["peft.method=lora", "peft.rank=0"])
    with pytest.raises(ConfigError, match=r"^peft.dropout: must be 0 with peft.experts=true"):
        load_config(overrides=["peft.method=lora", "peft.dropout=0.1"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^peft.method: lora needs the PEFT library; install it with pip install"):
        load_config(overrides=["peft.method=lora"])
    load_config(overrides=["peft.method=svf"])  # SVF is rlvr's own: no PEFT needed
    from rlvr.tuning import adapter_config

    assert adapter_config(load_config().peft, tiny("qwen3_moe", torch.float32)) is None  # none: TRL's path as before


def test_targets_that_match_nothing_name_the_policys_layers():
    model = tiny("deepseek_v3", torch.float32)
    with pytest.raises(
        ConfigError,
        match=r"^peft.target_modules: 'k_proj' matches no linear layer .*kv_a_proj_with_mqa.*DeepseekV3Attention",
    ):
        resolve_targets(model, ["q_proj", "k_proj"], experts=True)
    resolved = resolve_targets(model, ["self_attn"], experts=False)
    assert {p.rsplit(".", 1)[-1] for p in resolved.linear} == {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert not any(".mlp." in p for p in resolved.linear)


def test_svf_refuses_a_matrix_it_cannot_decompose():
    with pytest.raises(ConfigError, match=r"^peft.method: svf cannot decompose w: its dtype is torch.int8"):
        decompose(torch.zeros(3, 3, dtype=torch.int8), "w")
    with pytest.raises(ConfigError, match=r"^peft.method: svf cannot decompose w: it holds inf or nan"):
        decompose(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "w")
    with pytest.raises(ConfigError, match=r"^peft.method: svf cannot decompose w: it has 1 dimensions"):
        decompose(torch.ones(3), "w")


# --------------------------------------------------------------------------------------------------
# Weight sync to an inference engine: TRL's own code (LoRA: merge, sync, unmerge) and rlvr's (SVF)


def _weights_trl_syncs(model):
    """What TRL's vLLM weight sync would send, by name (``VLLMGeneration._iter_named_params``, vLLM not needed)."""
    from accelerate import Accelerator
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    generation = object.__new__(VLLMGeneration)
    generation.model, generation._dist = model, DistributedBackend(Accelerator(cpu=True))
    return {name: tensor.detach().clone() for name, tensor in generation._iter_named_params()}


@pytest.mark.parametrize("method", ["lora", "svf"])
def test_the_engine_receives_merged_weights_under_the_base_models_names(method, tmp_path):
    """TRL's vLLM sync of a LoRA policy (experts included) and rlvr's of an SVF policy send the base model's
    parameter names with the adapter folded in: a plain policy loading them computes the adapted logits. The
    trained policy is left as it was: exactly under SVF (rlvr restores a copy of the weights), to rounding under
    LoRA (PEFT's unmerge subtracts the update again: W + d - d is W only up to float error)."""
    from types import SimpleNamespace

    from rlvr.training.setup import sync_merged_weights

    model, plain = tiny("qwen3_moe", torch.float32), tiny("qwen3_moe", torch.float32)
    ids = input_ids()
    if method == "lora":
        model = get_peft_model(model, lora_config(AdapterConfig(method="lora", rank=2), model))
        perturb([p for n, p in model.named_parameters() if "lora_B" in n or "modules_to_save" in n], 0.1)
        adapted = model(input_ids=ids).logits.detach()
        sent = _weights_trl_syncs(model)
    else:
        apply_svf(model, SVFConfig(cache_dir=str(tmp_path)))
        perturb([p for p in model.parameters() if p.requires_grad], 0.1)
        adapted = model(input_ids=ids).logits.detach()
        received = {}
        engine = SimpleNamespace(sync_weights=lambda: received.update(_weights_trl_syncs(model)))
        trainer = SimpleNamespace(
            model=model,
            vllm_generation=engine,
            is_deepspeed_enabled=False,
            accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        )
        sync_merged_weights(trainer)
        engine.sync_weights()
        sent = received
    assert sent.keys() == dict(plain.named_parameters()).keys()
    plain.load_state_dict(sent, strict=False)
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    after = model(input_ids=ids).logits.detach()
    if method == "svf":
        assert torch.equal(after, adapted)
    else:
        torch.testing.assert_close(after, adapted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "svf"])
def test_the_copy_engine_samples_with_the_adapters_folded_in(method, tmp_path):
    """rlvr's copy engine (TRL's vLLM interface, rollout.engine=copy) copies an adapted policy as plain weights
    and re-syncs it after the adapters move."""
    from rlvr.rollouts.copy_engine import CopyEngine

    model = tiny("mixtral", torch.float32)
    if method == "lora":
        model = get_peft_model(model, lora_config(AdapterConfig(method="lora", rank=2), model))
    else:
        apply_svf(model, SVFConfig(cache_dir=str(tmp_path)))
    ids = input_ids()
    engine = CopyEngine(model, torch.float32)
    assert not any("lora_" in n or "_svf_" in n for n in engine.model.state_dict())
    torch.testing.assert_close(engine.model(ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-6)
    perturb([p for n, p in model.named_parameters() if p.requires_grad], 0.1)
    engine.sync(model)
    torch.testing.assert_close(engine.model(ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "svf"])
def test_rlvr_train_with_an_adapter_saves_what_loads_back(tmp_path, monkeypatch, method):
    """``rlvr train --config quickstart peft.method=...`` on the tiny MoE: the run's model/ holds the adapter
    alone (PEFT's files, or the SVF vectors), trained off the identity, and a fresh process loading it onto the
    base policy computes the same log-probs as this one; the summary counts what trained."""
    from rlvr.cli.main import main
    from rlvr.tuning import load_adapted
    from tests.test_cli import TINY

    (tmp_path / "length_reward.py").write_text(  # a random policy gets rewards with variance, so a gradient
        "def odd_length(completions, **_):\n    return [float(len(str(c)) % 2) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    output = tmp_path / method
    arguments = [*TINY, f"output_dir={output}", "eval.enabled=false", "warm_start.enabled=false"]
    arguments += ["reward.functions=[length_reward:odd_length]"]
    arguments += [f"warm_start.cache_dir={tmp_path / 'cache'}", f"peft.method={method}", "grpo.learning_rate=0.05"]
    assert main(["train", "--config", "quickstart", *arguments]) == 0
    directory = output / "model"
    files = {path.name for path in directory.iterdir()}
    assert ("adapter_model.safetensors" in files) if method == "lora" else ("svf_vectors.safetensors" in files)
    assert "model.safetensors" not in files
    summary = json.loads((output / "summary.json").read_text())
    assert summary["peft"]["method"] == method and 0 < summary["trainable_parameters"]
    moments = 8 * summary["trainable_parameters"]  # AdamW: two float32 moments, and a step count per tensor
    assert moments <= summary["optimizer_state_bytes"] < moments + 1024
    policy, _ = load_adapted(directory)
    moved = [p for n, p in policy.named_parameters() if "lora_B" in n or n.endswith("_svf_dz")]
    assert moved and any(p.abs().max() > 0 for p in moved)
    ids = input_ids()
    with torch.no_grad():
        expected = torch.log_softmax(policy(input_ids=ids).logits.double(), -1)
    meta = directory / ("adapter_config.json" if method == "lora" else "svf_config.json")
    base = json.loads(meta.read_text())["base_model_name_or_path"]
    assert_same_adapter(logprobs_in_a_fresh_process(directory, base, ids, tmp_path), expected)


def test_syncing_a_bf16_lora_policy_leaves_its_frozen_weights_exact():
    """The copy engine folds LoRA into the weights it sends after every optimizer step (``plain_state``); merging
    and unmerging in bf16 (W + BA - BA) drifted the frozen base weights by rounding at every sync. After 50 syncs
    they are bit-equal to before, and each sync sends the merged weights."""
    import copy

    from rlvr.tuning.plain import plain_state

    model = tiny("qwen3_moe", torch.float32)
    policy = get_peft_model(model, lora_config(AdapterConfig(method="lora", rank=8, experts=True), model))
    perturb([p for n, p in policy.named_parameters() if "lora_B" in n], scale=0.5)
    policy = policy.to(torch.bfloat16)
    before = {n: t.clone() for n, t in policy.state_dict().items()}
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()  # (merged once, from the exact weights)
    for _ in range(50):
        with plain_state(policy) as sent:
            assert sent.keys() == expected.keys()
            assert all(torch.equal(sent[name], expected[name]) for name in expected)
    after = policy.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert not any(module.merged for module in policy.modules() if hasattr(module, "merged"))
