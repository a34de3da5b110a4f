"""Config: defaults, YAML, overrides and validation errors that name the key."""

import pytest

from rlvr.experiment.compare import (
    load_experiment_config as load_config,  # what the CLI reads: run sections + compare's
)
from rlvr.run.config import ConfigError, format_help, parse_overrides
from rlvr.utils.packaged import CONFIG_ROOT

CONFIGS = CONFIG_ROOT


def test_defaults_are_valid():
    config = load_config()
    assert config.forking.rho == 0.2 and config.forking.selection == "top"
    assert config.grpo_kwargs()["router_aux_loss_coef"] == 0.0


@pytest.mark.parametrize(
    "path",
    sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("compare/*.yaml"), *CONFIGS.glob("models/*.yaml")]),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_shipped_configs_validate(path):
    load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("models/*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("arm", ["full", "forking", "forking_router", "hybrid"])
def test_real_model_configs_validate_with_every_arm(path, arm):
    config = load_config([path, CONFIGS / "arms" / f"{arm}.yaml"])
    assert config.grpo["use_vllm"] and config.grpo["loss_type"] == "dapo" and config.grpo["beta"] == 0.0
    assert not config.model.name_or_path.startswith("tiny:")


@pytest.mark.parametrize("arm", sorted((CONFIGS / "arms").glob("*.yaml")), ids=lambda p: p.stem)
def test_arm_overlays_validate_on_the_quickstart(arm):
    config = load_config([CONFIGS / "quickstart.yaml", arm])
    assert config.model.name_or_path.startswith("tiny:")


def test_arm_overlays_change_only_the_forking_section():
    """Arms change which tokens and routers learn (forking, moe) or how completions are sampled (rollout);
    full_g6, the equal-decoded-tokens i.i.d. control, also samples fewer completions per prompt; the
    importance-sampling arms of the mismatch compare set TRL's correction and nothing else of grpo; the entropy
    arms that are TRL features set those features (and kl_cov the second pass over a batch it needs); the adapter
    arms set their method's learning rate (swept per method)."""
    sample_size = {"num_generations", "per_device_train_batch_size"}
    correction = {"vllm_importance_sampling_correction", "vllm_importance_sampling_mode"}
    grpo_changes = {"full_g6": sample_size, "tis": correction, "mis": correction, "replay_mis": correction}
    grpo_changes |= {
        "clip_higher": {"epsilon", "epsilon_high"},
        "adaptive_entropy": {"use_adaptive_entropy", "entropy_coef", "entropy_coef_delta", "entropy_target"},
        "kl_cov": {"num_iterations"},
        "archer": {"num_iterations", "beta", "use_bias_correction_kl", "delta"},  # its KL and dual clip
        "stapo": {"num_iterations"},
        "lora": {"learning_rate"},
        "lora_attention": {"learning_rate"},
        "svf": {"learning_rate"},
    }
    for arm in (CONFIGS / "arms").glob("*.yaml"):
        base_path = CONFIGS / ("countdown.yaml" if arm.stem == "full_g6" else "quickstart.yaml")  # 8 prompts x 8
        base = load_config(base_path)
        overlaid = load_config([base_path, arm])
        assert overlaid.model == base.model and overlaid.data == base.data, arm
        changed = {
            key for key in overlaid.grpo.keys() | base.grpo.keys() if overlaid.grpo.get(key) != base.grpo.get(key)
        }
        assert changed == grpo_changes.get(arm.stem, set()), arm
        if arm.stem == "full_g6":  # the same prompts per step, 6 completions each
            prompts = base.grpo["per_device_train_batch_size"] // base.grpo["num_generations"]
            assert overlaid.grpo["per_device_train_batch_size"] == prompts * 6


def test_overrides_both_forms_and_yaml_types():
    assert parse_overrides(["--forking.rho", "0.3", "grpo.learning_rate=1e-5", "--eval.enabled", "false"]) == {
        "forking": {"rho": 0.3},
        "grpo": {"learning_rate": 1e-5},
        "eval": {"enabled": False},
    }
    config = load_config(None, ["--forking.rho", "0.5", "model.tiny.num_layers=3", "grpo.learning_rate=1e-5"])
    assert config.forking.rho == 0.5 and config.model.tiny.num_layers == 3
    assert config.grpo["learning_rate"] == pytest.approx(1e-5)


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("warm_start:\n  learning_rate: 3e-3\ngrpo:\n  learning_rate: 1e-5\n")
    config = load_config(path)
    assert config.warm_start.learning_rate == pytest.approx(3e-3)
    assert config.grpo["learning_rate"] == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["forking.rho=1.5"], r"forking.rho: must be in \[0, 1\]"),
        (["forking.selection=highest"], r"forking.selection: must be one of top, bottom, random; got 'highest'"),
        (["forking.scope=batchh"], r"forking.scope: must be one of"),
        (["forking.rh=0.2"], r"forking.rh: unknown key; did you mean rho"),
        (["modle.dtype=float32"], r"modle: unknown key; did you mean model"),
        (["model.name_or_path=tiny:gpt2"], r"model.name_or_path: unknown tiny architecture 'gpt2'"),
        (["model.tiny.top_k=9"], r"model.tiny.top_k: must be <= num_experts"),
        (["model.tiny.num_layers=two"], r"model.tiny.num_layers: expected an integer"),
        (["reward.functions=[nope]"], r"reward.functions\[0\]: unknown reward 'nope'; known:"),
        (["reward.weights=[1.0, 2.0]"], r"reward.weights: needs 1 weights"),
        (["grpo.learning_rat=1e-5"], r"grpo.learning_rat: unknown key; did you mean learning_rate"),
        (["grpo.num_generations=abc"], r"grpo.num_generations: expected an integer"),
        (["grpo.top_entropy_quantile=0.2"], r"grpo.top_entropy_quantile: use forking.rho"),
        (["data.task.max_terms=1"], r"data.task: need 2 <= min_terms <= max_terms"),
        (["warm_start.enabled=maybe"], r"warm_start.enabled: must be one of auto, true, false"),
        (["eval.enabled=yes please"], r"eval.enabled: expected true or false"),
        (["reward.fallbacks=[last_word]"], r"reward.fallbacks\[0\]: must be one of answer_tag, latex, last_number"),
        (["reward.budget_seconds=0"], r"reward.budget_seconds: must be > 0"),
        (["moe.router_gate_scope=prompt"], r"moe.router_gate_scope: must be one of all, completion, forking"),
        (["data.source=own.jsonl", "data.num_train=0"], r"warm_start.num_train: the warm start trains on data.num_tr"),
        (["data.eval_fraction=1"], r"data.eval_fraction: must be in \[0, 1\)"),
        (["data.eval_source=held.jsonl"], r"data.eval_source: applies to data sources other than the embedded"),
        (
            ["moe.load_balancing_coef=0.01", "grpo.router_aux_loss_coef=0.001"],
            r"moe.load_balancing_coef: TRL's grpo.router_aux_loss_coef",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_grpo_batch_constraints_are_checked_up_front():
    # TRL requires the generation batch to divide by num_generations; the error surfaces at config time.
    with pytest.raises(ConfigError, match="grpo:"):
        load_config(None, ["grpo.per_device_train_batch_size=6", "grpo.num_generations=4"])


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_help_lists_every_key_with_its_help():
    text = format_help()
    for key in (
        "--forking.rho",
        "--forking.loss_normalization",
        "--model.tiny.num_experts",
        "--warm_start.target_accuracy",
    ):
        assert key in text
    assert "[top|bottom|random]" in text


def test_the_warm_start_trains_on_its_own_number_of_problems_and_keys_its_cache_by_it():
    """A small RL set (data.num_train) can keep a warm start trained on many worked problems; a warm start
    trained on a different number of problems is a different warm start, cached under another key."""
    from rlvr.run.warm_start import cache_key

    small = load_config(None, ["data.num_train=96"])
    kept = load_config(None, ["data.num_train=96", "warm_start.num_train=1000"])
    assert small.warm_start_job().num_train == 96 and kept.warm_start_job().num_train == 1000
    assert cache_key(small.warm_start_job()) != cache_key(kept.warm_start_job())
    same = load_config(None, ["data.num_train=1000"])
    assert cache_key(same.warm_start_job()) == cache_key(kept.warm_start_job())
    with pytest.raises(ConfigError, match=r"warm_start\.num_train"):
        load_config(None, ["warm_start.num_train=0"])


def test_a_warm_start_made_by_a_multi_process_launch_is_cached_apart(monkeypatch):
    """Under DDP each supervised step sees every rank's batch: another warm start than one process makes."""
    from rlvr.run.warm_start import cache_key

    config = load_config(None, [])
    single = config.warm_start_job()
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun and accelerate launch set it on every rank
    launched = config.warm_start_job()
    assert single.world_size == 1 and launched.world_size == 2
    assert cache_key(launched) != cache_key(single)


def test_a_warm_start_under_a_bf16_launcher_trains_in_bf16_and_is_cached_apart(monkeypatch):
    """TRL's zero3.yaml asks accelerate for bf16 and DeepSpeed refuses a trainer in another precision, so the warm
    start follows the launcher (a plain run stays float32, its cache key unchanged)."""
    from rlvr.run.warm_start import cache_key, launcher_bf16

    job = load_config(None, []).warm_start_job()
    plain = cache_key(job)
    assert not launcher_bf16()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # as accelerate launch sets it for a bf16 config
    assert launcher_bf16() and cache_key(job) != plain
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert cache_key(job) == plain
