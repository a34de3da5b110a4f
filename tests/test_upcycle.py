"""rlvr upcycle: BTX and sparse upcycling of tiny dense Qwen3 / Mistral models (float64, eager experts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlvr.cli.main import main
from rlvr.models import TinyMoESpec, build_char_tokenizer, build_tiny_moe, load_pretrained
from rlvr.models.upcycle import MANIFEST, UpcycleError, upcycle
from rlvr.moe.hooks import RoutingHooks
from rlvr.utils.packaged import CONFIG_ROOT

SPEC = TinyMoESpec(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, expert_size=24)
FFN = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")


def save_dense(directory, architecture: str, seed: int, shared_from=None, spec: TinyMoESpec = SPEC):
    """A tiny dense model; with ``shared_from``, every non-feed-forward weight is copied from that model."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_moe(architecture, spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed)
    if shared_from is not None:
        shared = {name: tensor for name, tensor in shared_from.state_dict().items() if not name.endswith(FFN)}
        model.load_state_dict(shared, strict=False)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def float64(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    return model.eval()


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, 90, (3, 11), generator=generator)  # (B, T)


@pytest.mark.parametrize(
    "architecture, moe_class", [("qwen3", "Qwen3MoeForCausalLM"), ("mistral", "MixtralForCausalLM")]
)
def test_btx_with_routing_forced_to_expert_i_reproduces_dense_model_i(tmp_path, architecture, moe_class):
    first = save_dense(tmp_path / "a", architecture, seed=0)
    save_dense(tmp_path / "b", architecture, seed=1, shared_from=first)  # only the feed-forward layers differ
    out = upcycle([tmp_path / "a", tmp_path / "b"], tmp_path / "moe", method="btx", top_k=1)
    moe = float64(out)
    assert type(moe).__name__ == moe_class
    ids = batch()
    hooks = RoutingHooks(moe, gate_routers=False, gate_experts=False)
    for expert, name in enumerate(("a", "b")):
        dense = float64(tmp_path / name)
        expected = dense(input_ids=ids).logits
        hooks.begin(*ids.shape, forced=torch.full((*ids.shape, SPEC.num_layers, 1), expert, dtype=torch.long))
        with torch.no_grad():
            forced = moe(input_ids=ids).logits
        hooks.release()
        torch.testing.assert_close(forced, expected, rtol=1e-12, atol=1e-12)
    # and the two experts really are different models
    assert not torch.allclose(
        float64(tmp_path / "a")(input_ids=ids).logits, float64(tmp_path / "b")(input_ids=ids).logits
    )
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["method"] == "btx" and manifest["num_experts"] == 2


def test_btx_averages_every_parameter_but_the_experts(tmp_path):
    a = save_dense(tmp_path / "a", "qwen3", seed=0)
    b = save_dense(tmp_path / "b", "qwen3", seed=1)
    moe = float64(upcycle([tmp_path / "a", tmp_path / "b"], tmp_path / "moe", router_init="zero"))
    state, a_state, b_state = moe.state_dict(), a.state_dict(), b.state_dict()
    for name in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        torch.testing.assert_close(state[name], (a_state[name].double() + b_state[name].double()) / 2)
    for expert, source in enumerate((a_state, b_state)):
        torch.testing.assert_close(
            state["model.layers.0.mlp.experts.down_proj"][expert],
            source["model.layers.0.mlp.down_proj.weight"].double(),
        )
    assert not state["model.layers.0.mlp.gate.weight"].any()  # router_init zero


@pytest.mark.parametrize("architecture", ["qwen3", "mistral"])
def test_sparse_upcycling_equals_the_dense_model_whatever_the_routing(tmp_path, architecture):
    """Identical experts whose top-k weights sum to 1 compute the dense feed-forward layer. Not bit-exact:
    transformers' routers take the softmax in float32 whatever the model dtype, so the two weights sum to
    1 within ~1e-7, and logits (~1e-2 here) agree to ~5e-8."""
    save_dense(tmp_path / "dense", architecture, seed=3)
    out = upcycle([tmp_path / "dense"], tmp_path / "moe", method="sparse", num_experts=4, top_k=2)
    ids = batch(1)
    torch.testing.assert_close(
        float64(out)(input_ids=ids).logits, float64(tmp_path / "dense")(input_ids=ids).logits, rtol=0, atol=5e-7
    )


def test_mean_hidden_router_prefers_each_domains_expert(tmp_path):
    a = save_dense(tmp_path / "a", "qwen3", seed=0)
    save_dense(tmp_path / "b", "qwen3", seed=1, shared_from=a)
    samples = [["1+2+3=6", "4+5=9", "7-2=5"], ["3*4=12", "6*7=42", "2*9=18"]]
    out = upcycle([tmp_path / "a", tmp_path / "b"], tmp_path / "moe", router_init="mean_hidden", router_samples=samples)
    moe = float64(out)
    router = moe.state_dict()["model.layers.0.mlp.gate.weight"]  # (E, H)
    torch.testing.assert_close(router.sum(0), torch.zeros_like(router[0]), atol=1e-6, rtol=0)  # centred
    assert router.abs().sum() > 0
    # the router scores each domain's own mean hidden state highest on that domain's expert
    from rlvr.models.upcycle import domain_mean_hidden

    means = [
        domain_mean_hidden(*load_pretrained(str(tmp_path / name)), texts)[0].double()
        for name, texts in zip("ab", samples, strict=True)
    ]
    assert (router @ means[0]).argmax() == 0 and (router @ means[1]).argmax() == 1
    assert json.loads((out / MANIFEST).read_text())["router_samples"] == [3, 3]


def test_round_trip_and_rlvr_loading(tmp_path):
    a = save_dense(tmp_path / "a", "mistral", seed=0)
    save_dense(tmp_path / "b", "mistral", seed=1, shared_from=a)
    out = upcycle([tmp_path / "a", tmp_path / "b"], tmp_path / "moe", top_k=1)
    model, tokenizer = load_pretrained(str(out))
    again = tmp_path / "again"
    model.save_pretrained(again)
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    from rlvr.moe import find_moe_layers

    assert len(find_moe_layers(model)) == SPEC.num_layers  # rlvr's router hooks find the blocks


def _fails_cleanly(tmp_path, message, *args, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match=message):
        upcycle(*args, output_dir=out, **kwargs)
    assert not out.exists() and not (tmp_path / "out.tmp").exists()  # nothing written


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    save_dense(tmp_path / "qwen", "qwen3", seed=0)
    save_dense(tmp_path / "mistral", "mistral", seed=0)
    save_dense(
        tmp_path / "wide",
        "qwen3",
        seed=0,
        spec=TinyMoESpec(num_layers=2, hidden_size=48, num_heads=4, num_kv_heads=2, expert_size=24),
    )
    save_dense(tmp_path / "qwen2", "qwen3", seed=1)
    _fails_cleanly(tmp_path, "missing: no such checkpoint directory", [tmp_path / "qwen", tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    _fails_cleanly(tmp_path, "empty: not a loadable checkpoint", [tmp_path / "qwen", tmp_path / "empty"])
    _fails_cleanly(tmp_path, "different families", [tmp_path / "qwen", tmp_path / "mistral"])
    _fails_cleanly(tmp_path, "has shape", [tmp_path / "qwen", tmp_path / "wide"])
    _fails_cleanly(tmp_path, "at least 2", [tmp_path / "qwen"])
    _fails_cleanly(tmp_path, "num_experts", [tmp_path / "qwen"], method="sparse")
    _fails_cleanly(tmp_path, "top_k", [tmp_path / "qwen", tmp_path / "qwen2"], top_k=3)
    _fails_cleanly(
        tmp_path, "one list of sample texts", [tmp_path / "qwen", tmp_path / "qwen2"], router_init="mean_hidden"
    )
    # a different tokenizer
    other = build_char_tokenizer()
    other.add_tokens(["<extra>"])
    other.save_pretrained(tmp_path / "qwen2")
    _fails_cleanly(tmp_path, "different tokenizers", [tmp_path / "qwen", tmp_path / "qwen2"])
    # an MoE is not a dense input
    tokenizer = build_char_tokenizer()
    build_tiny_moe("qwen3_moe", SPEC, len(tokenizer), 0, 1).save_pretrained(tmp_path / "moe_in")
    tokenizer.save_pretrained(tmp_path / "moe_in")
    _fails_cleanly(tmp_path, "cannot be upcycled", [tmp_path / "moe_in", tmp_path / "qwen"])
    # an existing output directory is kept
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UpcycleError, match="not empty"):
        upcycle([tmp_path / "qwen", tmp_path / "qwen2"], tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_cli_upcycle(tmp_path, capsys):
    a = save_dense(tmp_path / "a", "qwen3", seed=0)
    save_dense(tmp_path / "b", "qwen3", seed=1, shared_from=a)
    assert (
        main(
            [
                "upcycle",
                "--dense",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "moe"),
                "--top-k",
                "1",
                "--router-init",
                "zero",
            ]
        )
        == 0
    )
    assert (tmp_path / "moe" / MANIFEST).exists()
    assert main(["upcycle", "--dense", str(tmp_path / "a"), "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "rlvr upcycle: btx needs at least 2 dense models" in error and "Traceback" not in error
    # router samples from files: plain text lines and .jsonl records
    (tmp_path / "a.txt").write_text("1+2=3\n4+4=8\n")
    (tmp_path / "b.jsonl").write_text('{"text": "3*3=9"}\n{"text": "2*5=10"}\n')
    assert (
        main(
            [
                "upcycle",
                "--dense",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "mean"),
                "--router-init",
                "mean_hidden",
                "--router-samples",
                str(tmp_path / "a.txt"),
                str(tmp_path / "b.jsonl"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "mean" / MANIFEST).read_text())["router_samples"] == [2, 2]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    assert (
        main(
            [
                "upcycle",
                "--dense",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "bad"),
                "--router-init",
                "mean_hidden",
                "--router-samples",
                str(tmp_path / "a.txt"),
                str(tmp_path / "bad.jsonl"),
            ]
        )
        == 2
    )
    assert "bad.jsonl: line 2 is not a JSON object with a 'text' field" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------------
# The experiment: rlvr/configs/compare/upcycle.yaml

UPCYCLE_CONFIG = str(CONFIG_ROOT / "compare" / "upcycle.yaml")


def test_plan_runs_with_starting_policies(tmp_path):
    from rlvr.experiment.compare import plan_runs

    overrides = [f"output_dir={tmp_path}", "upcycle.construction_seeds=[4,7]", "compare.seeds=[0]"]
    output_dir, runs = plan_runs([UPCYCLE_CONFIG], overrides, None, None)
    arms = ["btx+forking", "btx+forking_router", "sparse+forking", "sparse+forking_router", "scratch+forking"]
    assert [run.arm for run in runs] == [*arms, "scratch+forking_router"] * 2
    assert [run.construction for run in runs] == [4] * 6 + [7] * 6  # construction-major: seed 4 completes first
    btx, scratch = runs[0].config, runs[5].config
    assert btx.model.name_or_path == str(tmp_path / "policies" / "seed4" / "btx") and btx.warm_start.enabled == "true"
    assert btx.moe.router_gate_scope == "all" and runs[1].config.moe.router_gate_scope == "forking"  # the arms apply
    assert (
        scratch.model.name_or_path == "tiny:qwen3_moe"
        and scratch.model.tiny.num_experts == 2
        and scratch.warm_start.enabled == "true"
    )
    # the construction seed seeds the tiny inits and every warm start, and is recorded for the report
    assert [run.config.warm_start.seed for run in runs] == [4] * 6 + [7] * 6
    assert all(run.config.upcycle.construction_seed == run.construction for run in runs)
    assert all(run.config.seed == 0 for run in runs)
    assert runs[2].directory == tmp_path / "sparse-forking-c4-seed0"
    assert runs[8].config.model.name_or_path == str(tmp_path / "policies" / "seed7" / "sparse")


def test_the_packaged_upcycling_compares_run_three_construction_seeds_by_two_rl_seeds():
    from rlvr.experiment.compare import load_experiment_config as load_config

    for name in ("upcycle.yaml", "upcycle_reverse.yaml"):
        config = load_config([str(CONFIG_ROOT / "compare" / name)])
        assert config.upcycle.construction_seeds == [0, 1, 2] and config.compare.seeds == [0, 1], name
    reverse = load_config([str(CONFIG_ROOT / "compare" / "upcycle_reverse.yaml")])
    assert reverse.data.task.domains == ["addition", "reverse"] and reverse.reward.functions == ["embedded_exact"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["upcycle.inits=[btx,merge]"], r"upcycle.inits\[1\]: must be one of btx, sparse, scratch"),
        (["data.task.domains=[addition]"], "data.task.domains: btx needs at least two domains"),
        (["upcycle.num_experts=3"], "upcycle.num_experts: btx makes one expert per domain: must be 2"),
        (
            ["upcycle.dense_model=tiny:qwen3_moe"],
            "upcycle.dense_model: must be one of tiny:llama, tiny:mistral, tiny:qwen3",
        ),
        (["upcycle.top_k=3"], r"upcycle.top_k: must be in 1..upcycle.num_experts \(2\)"),
        (["upcycle.construction_seeds=[]"], "upcycle.construction_seeds: needs at least one seed"),
        (["upcycle.construction_seeds=[1,1]"], "upcycle.construction_seeds: lists a seed twice"),
        (["upcycle.construction_seeds=[a]"], r"upcycle.construction_seeds\[0\]: must be an integer"),
    ],
)
def test_upcycle_config_errors_name_the_key(overrides, message):
    from rlvr.experiment.compare import load_experiment_config as load_config
    from rlvr.run.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config([UPCYCLE_CONFIG], overrides)


@pytest.mark.slow
def test_upcycle_experiment_end_to_end_on_a_small_model(tmp_path):
    """The whole experiment, shrunk: branches warm-started apart, merged, RL per init x arm, report."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "upcycle"
    command = [
        sys.executable,
        "-m",
        "rlvr.cli",
        "compare",
        "--config",
        UPCYCLE_CONFIG,
        f"output_dir={out}",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "warm_start.max_steps=20",
        "warm_start.eval_every=10",
        "warm_start.num_dev=10",
        "grpo.max_steps=2",
        "data.num_eval=20",
        "model.tiny.num_layers=1",
        "model.tiny.hidden_size=32",
        "model.tiny.expert_size=32",
        "upcycle.router_samples=8",
        "eval.sampled_completions=2",
        "eval.pass_k=2",
        "upcycle.branch_steps=20",
        "upcycle.construction_seeds=[0]",
        "compare.seeds=[0]",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stderr[-3000:]
    record = json.loads((out / "policies" / "seed0" / "policies.json").read_text())
    assert set(record) == {
        "dense_seed (mix)",
        "branch_addition",
        "branch_multiplication",
        "seed_continued (mix)",
        "routing_btx_as_built",
        "routing_sparse_as_built",
    }
    assert record["branch_addition"]["steps"] == 20  # upcycle.branch_steps
    assert record["seed_continued (mix)"]["steps"] == 40  # match_compute: 20 steps x 2 domains
    # BTX expert i is branch i's feed-forward layer; the sparse experts are all the seed's
    btx = AutoModelForCausalLM.from_pretrained(out / "policies" / "seed0" / "btx").state_dict()
    sparse = AutoModelForCausalLM.from_pretrained(out / "policies" / "seed0" / "sparse").state_dict()
    seed = load_file(str(next(Path(record["seed_continued (mix)"]["path"]).glob("*.safetensors"))))
    for expert, domain in enumerate(("addition", "multiplication")):
        branch = load_file(str(next(Path(record[f"branch_{domain}"]["path"]).glob("*.safetensors"))))
        assert torch.equal(
            btx["model.layers.0.mlp.experts.down_proj"][expert], branch["model.layers.0.mlp.down_proj.weight"]
        )
        assert torch.equal(
            sparse["model.layers.0.mlp.experts.down_proj"][expert], seed["model.layers.0.mlp.down_proj.weight"]
        )
    assert not torch.equal(
        btx["model.layers.0.mlp.experts.down_proj"][0], btx["model.layers.0.mlp.experts.down_proj"][1]
    )
    for label in ("btx-forking", "sparse-forking_router", "scratch-forking"):
        routing = json.loads((out / f"{label}-c0-seed0" / "domain_routing.json").read_text())
        assert routing["before"]["domains"] == ["addition", "multiplication"] and routing["after"]["layers"]
        assert 0.0 <= routing["after"]["mean_own_share"] <= 1.0
        summary = json.loads((out / f"{label}-c0-seed0" / "summary.json").read_text())
        assert set(summary["eval_after"]["by_group"]) == {"addition", "multiplication"}
    report = (out / "report.md").read_text()
    for section in (
        "## Starting policies",
        "## Per-domain accuracy",
        "## Per-domain routing",
        "domain_routing.png",
        "- btx+forking vs sparse+forking: ",  # accuracy verdicts against compute-matched sparse upcycling
        "**Routing verdicts**",
    ):
        assert section in report, section
    for figure in ("domain_routing.png", "own_share_btx.png", "own_share_sparse.png", "own_share_scratch.png"):
        assert (out / figure).stat().st_size > 5000, figure


def test_warm_start_cache_key_follows_the_checkpoint_not_just_its_path(tmp_path):
    """An upcycled checkpoint rebuilt at the same path must not reuse the warm start of its old weights."""
    import os

    from rlvr.experiment.compare import load_experiment_config as load_config
    from rlvr.run.warm_start import cache_key as key_of_job

    def cache_key(config):  # the warm start's key, from the job the run config builds
        return key_of_job(config.warm_start_job())

    save_dense(tmp_path / "policy", "qwen3", seed=0)
    config = load_config([UPCYCLE_CONFIG], [f"model.name_or_path={tmp_path / 'policy'}", "upcycle.inits=[]"])
    before = cache_key(config)
    assert cache_key(config) == before  # stable while nothing changes
    weights = next((tmp_path / "policy").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten
    assert cache_key(config) != before
    hub = load_config([UPCYCLE_CONFIG], ["model.name_or_path=Qwen/Qwen3-0.6B", "upcycle.inits=[]"])
    assert cache_key(hub) == cache_key(hub)
