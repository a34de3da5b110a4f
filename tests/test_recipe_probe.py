"""benchmarks/recipe_memory.py: the exact counts behind the recipes' GPU counts, and a CPU-sized run of it."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import recipe_memory  # noqa: E402


@pytest.mark.parametrize(("name", "billions"), [("qwen3_30b_a3b", 30.5), ("gpt_oss_20b", 20.9)])
def test_the_full_configs_have_the_published_parameter_counts(name, billions):
    recipe = recipe_memory.RECIPES[name]
    assert recipe_memory.parameter_count(recipe.config(recipe.layers)) / 1e9 == pytest.approx(billions, abs=0.05)


def example_plan(**expert_parallel) -> recipe_memory.Plan:
    """10 Gi parameters in 16 B states, a quarter-Gi-parameter layer, 3 GiB of activations, 20 GiB of vLLM."""
    gib = recipe_memory.GIB
    return recipe_memory.Plan(
        parameters=10 * gib,
        state_bytes=16 * 10 * gib,
        trainable=10 * gib,
        layer_parameters=gib // 4,
        activations=3 * gib,
        vllm=20 * gib,
        gpu=80 * gib,
        **expert_parallel,
    )


def test_the_plan_adds_sharded_states_gathered_layers_activations_and_vllm():
    gib = recipe_memory.GIB
    budget = example_plan()
    assert budget.per_gpu(8) == pytest.approx((16 * 10 / 8 + 2 * 2 / 4 + 3 + 20) * gib)
    assert budget.per_gpu(8, offload=True) == pytest.approx((1 + 3 + 20) * gib)
    assert budget.fewest_gpus() == 3  # 160 GiB of states into 80 - 24 = 56 GiB of room each
    assert budget.per_gpu(2) > budget.gpu >= budget.per_gpu(3)
    assert recipe_memory.Plan(10, 160, 10, 1, 70 * gib, 20 * gib, 80 * gib).fewest_gpus() is None


def test_under_expert_parallelism_a_rank_gathers_the_dense_weights_and_its_share_of_the_experts():
    gib = recipe_memory.GIB
    budget = example_plan(layer_expert_parameters=gib // 8, exchange_bytes=gib)  # half of each layer is experts
    zero3 = (16 * 10 / 8 + 2 * 2 / 4 + 3 + 20) * gib
    assert budget.per_gpu(8) == pytest.approx(zero3)  # no all-to-all without expert parallelism
    dense, experts = 2 * 2 * (gib / 8), 2 * 2 * (gib / 8) / 4
    assert budget.per_gpu(8, ep=4) == pytest.approx((16 * 10 / 8 + 3 + 20 + 1) * gib + dense + experts)
    assert budget.fewest_gpus() == 3 and budget.fewest_gpus(ep=2) == 4 and budget.fewest_gpus(ep=8) == 8


def test_the_expert_parallel_recipe_plans_its_layout_beside_zero3():
    """models/qwen3_30b_a3b_ep loads without a launch (to plan it), and its states fit 16 x 80 GiB as EP 8."""
    settings = recipe_memory.recipe_settings("qwen3_30b_a3b_ep")
    assert settings.parallel.ep_size == 8 and settings.grpo["save_strategy"] == "no"
    recipe = recipe_memory.RECIPES["qwen3_30b_a3b_ep"]
    shape = Namespace(gpu_gib=80.0, shrink=1, rows=8, prompt=256, completion=2048)
    budget = recipe_memory.plan(recipe, settings.grpo, settings.peft, 0.0, shape)
    experts = 128 * 3 * 2048 * 768  # gate, up and down projections of 128 experts
    assert budget.layer_expert_parameters == experts and experts / budget.layer_parameters == pytest.approx(
        0.97, abs=0.005
    )
    assert budget.fewest_gpus(ep=8) == 16 and budget.per_gpu(16, ep=8) < 80 * recipe_memory.GIB
    assert recipe_memory.expert_parallel_sizes(recipe.config(1)) == [2, 4, 8, 16, 32, 64]


def test_the_recipes_as_shipped_fit_their_vllm_share():
    """The exact part of the plan: vLLM's bf16 weights per GPU fit in its colocated share."""
    for name, recipe in recipe_memory.RECIPES.items():
        settings = recipe_memory.recipe_settings(name)
        budget = recipe_memory.plan(recipe, settings.grpo, settings.peft, 0.0, Namespace(gpu_gib=80.0, shrink=1))
        grpo = settings.grpo
        engine = 2 * budget.parameters / int(grpo.get("vllm_tensor_parallel_size", 1))
        assert engine < 0.75 * budget.vllm, name  # a quarter of the share left for the KV cache at least


def test_with_adapters_qwen3_30b_fits_one_node_of_8_x_80_gib_without_offload():
    """The count the adapter recipes rest on: base weights frozen in bf16 and states for the adapters only
    fit 8 x 80 GiB before activations, where full fine-tuning does not (README, "How many GPUs")."""
    budgets = {}
    for name in ("qwen3_30b_a3b", "qwen3_30b_a3b_lora", "qwen3_30b_a3b_svf"):
        settings = recipe_memory.recipe_settings(name)
        recipe = recipe_memory.RECIPES[name]
        budgets[name] = recipe_memory.plan(recipe, settings.grpo, settings.peft, 0.0, Namespace(gpu_gib=80.0, shrink=1))
    gib = recipe_memory.GIB
    assert budgets["qwen3_30b_a3b"].per_gpu(8) > 80 * gib
    assert budgets["qwen3_30b_a3b_lora"].per_gpu(8) < 40 * gib and budgets["qwen3_30b_a3b_svf"].per_gpu(8) < 50 * gib
    lora = budgets["qwen3_30b_a3b_lora"]
    assert 2 * lora.parameters < lora.state_bytes < 2 * lora.parameters + 16 * 1e9  # frozen bf16 + ~0.7 B trained


@pytest.mark.parametrize("method", ["lora", "svf"])
def test_the_adapter_counts_equal_the_parameters_of_a_built_adapter(method, tmp_path):
    """On a CPU-sized Qwen3-30B geometry: the count from shapes equals the trainable (and SVF's frozen
    factor) parameters of the adapter rlvr builds."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlvr.tuning import SVFConfig, apply_svf
    from rlvr.tuning.lora import lora_config

    adapter = recipe_memory.recipe_settings(f"qwen3_30b_a3b_{method}").peft
    config = recipe_memory.shrunk(recipe_memory.qwen3_30b_a3b(2), 32)
    count = recipe_memory.counted(config, adapter)
    model = AutoModelForCausalLM.from_config(config)
    if method == "lora":
        model = get_peft_model(model, lora_config(adapter, model))
    else:
        apply_svf(model, SVFConfig(adapter.target_modules, adapter.experts, adapter.routers, str(tmp_path)))
    assert count.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    extra = sum(p.numel() for n, p in model.named_parameters() if "_svf_" in n and not n.endswith("_dz"))
    assert count.frozen_extra == extra


def test_fit_recovers_a_line():
    measured = [recipe_memory.Measured(layers, 0, 5 + 2 * layers, 1.0 + 0.5 * layers) for layers in (2, 4, 6)]
    assert recipe_memory.fit(measured, "activation_bytes") == pytest.approx((5, 2))
    assert recipe_memory.fit(measured, "seconds") == pytest.approx((1.0, 0.5))


def test_a_cpu_sized_run_measures_and_plans(monkeypatch, capsys):
    argv = ["recipe_memory.py", "--recipes", "gpt_oss_20b", "--shrink", "64", "--rows", "2", "--prompt", "8"]
    monkeypatch.setattr(sys, "argv", [*argv, "--completion", "16", "--repeats", "1"])
    recipe_memory.main()
    out = capsys.readouterr().out
    assert "saved for backward (CPU: a lower bound)" in out and "full depth: activations" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("2 ", "4 "))]
    assert [row[0] for row in rows] == ["2", "4"]
    assert float(rows[1][3]) > float(rows[0][3])  # activations (MiB) grow with depth
