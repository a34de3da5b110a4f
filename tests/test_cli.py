"""The command line: help, validation errors before any model is built, and a tiny end-to-end run."""

import json
from pathlib import Path

import pytest

from rlvr.cli.main import CONFIG_DIR as CONFIGS
from rlvr.cli.main import main
from rlvr.run.progress import format_log_line

TINY = [
    "model.tiny.num_layers=1",
    "model.tiny.hidden_size=32",
    "model.tiny.expert_size=32",
    "model.tiny.num_experts=4",
    "data.num_train=64",
    "data.num_eval=8",
    "data.task.max_operand=9",
    "data.task.eval_fraction=0.2",
    "eval.sampled_completions=1",
    "warm_start.max_steps=4",
    "warm_start.eval_every=2",
    "warm_start.num_dev=8",
    "grpo.max_steps=2",
    "grpo.logging_steps=1",
    "grpo.per_device_train_batch_size=8",
    "grpo.num_generations=4",
    "grpo.max_completion_length=16",
    "grpo.disable_tqdm=true",
]


def test_help_teaches_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in ("--forking.rho", "--forking.selection", "--data.answer_column", "--warm_start.enabled", "--arm"):
        assert key in text


def test_config_error_names_the_key_and_exits_2(capsys, tmp_path):
    code = main(["quickstart", "forking.selection=highest", f"output_dir={tmp_path}"])
    assert code == 2
    error = capsys.readouterr().err
    assert "config error: forking.selection: must be one of top, bottom, random; got 'highest'" in error
    assert "Traceback" not in error
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_a_single_run_reads_experiment_files_but_refuses_upcycled_starting_policies(capsys, tmp_path):
    """The run config knows no experiment; a file with rlvr compare's sections still trains its base run."""
    assert main(["validate", "--config", str(CONFIGS / "compare" / "quickstart.yaml")]) == 0
    assert "arms:" in capsys.readouterr().out
    code = main(["train", "--config", str(CONFIGS / "compare" / "upcycle.yaml"), f"output_dir={tmp_path}"])
    assert code == 2
    error = capsys.readouterr().err
    assert "config error: upcycle.inits: starting policies are built by 'rlvr compare'" in error
    assert "Traceback" not in error and not any(tmp_path.iterdir())


def test_compare_help_lists_the_experiment_sections(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "--compare.arms" in text and "--upcycle.inits" in text and "--forking.rho" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--compare.arms" not in capsys.readouterr().out


def test_data_error_is_one_line_not_a_traceback(capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1?", "answer": "no marker"}\n')
    code = main(
        [
            "train",
            "--config",
            str(CONFIGS / "quickstart.yaml"),
            f"data.source={data}",
            "data.answer_format=gsm8k",
            "data.eval_split=null",
            f"output_dir={tmp_path / 'run'}",
            "warm_start.enabled=false",
        ]
    )
    assert code == 2
    assert "data error:" in capsys.readouterr().err


def test_validate_prints_the_resolved_config(capsys):
    assert main(["validate", "--config", str(CONFIGS / "quickstart.yaml"), "--arm", "bottom"]) == 0
    out = capsys.readouterr().out
    assert "selection: bottom" in out and "rho: 0.8" in out


def test_tiny_end_to_end_run_writes_its_outputs(capsys, tmp_path):
    output = tmp_path / "run"
    code = main(["quickstart", f"output_dir={output}", f"warm_start.cache_dir={tmp_path / 'cache'}", *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "before RL" in printed and "after RL" in printed
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["warm_start"]["steps"] == 4 and not summary["warm_start"]["cached"]
    assert 0.0 <= summary["eval_after"]["greedy_accuracy"] <= 1.0
    assert summary["data"]["eval_from"].startswith("embedded task problems held out")
    assert summary["data"]["eval_prompts_also_trained"] == 0 and "evaluated on:" in printed
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert any("forking/kept_fraction" in record for record in metrics)
    assert (output / "model" / "config.json").exists() and (output / "config.yaml").exists()

    # Second run: the warm start comes from the cache.
    assert main(["quickstart", f"output_dir={output}2", f"warm_start.cache_dir={tmp_path / 'cache'}", *TINY]) == 0
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["warm_start"]["cached"]


def test_a_bf16_run_after_the_fp32_warm_start_in_one_process(tmp_path):
    """TRL's default on a GPU is bf16; the warm start's fp32 Accelerator must not pin the RL run's precision."""
    output = tmp_path / "run"
    overrides = [f"output_dir={output}", f"warm_start.cache_dir={tmp_path / 'cache'}", "grpo.bf16=true", *TINY]
    assert main(["quickstart", *overrides]) == 0
    assert json.loads((output / "summary.json").read_text())["steps"] == 2


def test_console_line_shows_the_watched_metrics():
    line = format_log_line(10, {"loss": 0.01, "reward": 0.5, "forking/kept_fraction": 0.2, "step_time": 0.6, "x": 1})
    assert line == "step 10 | loss 0.01 | reward 0.500 | kept 0.200 | s/step 0.60"


def train_arm(tmp_path, arm: str) -> tuple[set[str], Path]:
    """``rlvr train --config quickstart --arm ARM`` on the TINY model (no warm start, no eval): the metric keys
    the run logged and its output directory."""
    output = tmp_path / arm
    code = main(
        ["train", "--config", "quickstart", "--arm", arm, *TINY, f"output_dir={output}", "eval.enabled=false"]
        + ["warm_start.enabled=false", "save_model=false", f"warm_start.cache_dir={tmp_path / 'cache'}"]
    )
    assert code == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {key for record in records for key in record}, output


ARMS = ["full", "forking", "forking_router", "hybrid", "random", "bottom"]


@pytest.mark.parametrize("architecture", ["qwen3_moe", "olmoe", "mixtral"])
def test_every_arm_runs_from_config_on_each_architecture(capsys, tmp_path, architecture):
    for arm in ARMS:
        output = tmp_path / arm
        code = main(
            [
                "train",
                "--config",
                str(CONFIGS / "quickstart.yaml"),
                "--arm",
                arm,
                *TINY,
                f"model.name_or_path=tiny:{architecture}",
                f"output_dir={output}",
                "warm_start.enabled=false",
                "eval.enabled=false",
                "save_model=false",
                f"warm_start.cache_dir={tmp_path / 'cache'}",
            ]
        )
        assert code == 0, arm
        metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        logged = {key for record in metrics for key in record}
        assert {"forking/kept_fraction", "moe/specialization_js", "moe/load_imbalance"} <= logged, arm
        config = (output / "config.yaml").read_text()
        if arm in ("forking_router", "hybrid"):
            assert "router_gate_scope: forking" in config


def test_math_reward_failure_counts_reach_the_metrics_file(tmp_path):
    output = tmp_path / "run"
    code = main(
        [
            "quickstart",
            *TINY,
            f"output_dir={output}",
            "warm_start.enabled=false",
            "eval.enabled=false",
            "save_model=false",
            "reward.functions=[math_accuracy]",
            "reward.workers=1",
        ]
    )
    assert code == 0
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in metrics if "rewards/math_accuracy/timeouts" in record]
    assert len(logged) == 2  # every logging step
    assert all(0.0 <= record["rewards/math_accuracy/parse_failure_rate"] <= 1.0 for record in logged)


def test_the_tiny_policy_cache_is_published_whole(tmp_path, monkeypatch):
    """Ranks of one launch share the cache: a policy appears under its final name only once it is complete
    (a config without weights there made the other rank's from_pretrained fail)."""
    import rlvr.run.recipe as recipe
    from rlvr.run.config import load_config

    real_save = recipe.save_tiny_policy
    written = []

    def save_and_check(architecture, spec, directory, seed=0):
        written.append(directory)
        finished = real_save(architecture, spec, directory, seed=seed)
        assert not any(path.name.startswith("base-") and not path.name.count(".tmp-") for path in tmp_path.iterdir())
        return finished

    monkeypatch.setattr(recipe, "save_tiny_policy", save_and_check)
    overrides = [*TINY, f"warm_start.cache_dir={tmp_path}", "warm_start.enabled=false"]
    config = load_config(CONFIGS / "quickstart.yaml", overrides)
    model, _, _ = recipe.prepare_policy(config, data=None, accuracy_fn=None)
    published = [path for path in tmp_path.iterdir() if path.name.startswith("base-")]
    assert len(written) == 1 and [path.name for path in published] == [written[0].name.split(".tmp-")[0]]
    assert (published[0] / "model.safetensors").exists() and model is not None
    # A second process finds it and builds nothing.
    recipe.prepare_policy(config, data=None, accuracy_fn=None)
    assert len(written) == 1


def test_own_jsonl_with_skip_writes_the_prompt_record_and_says_which_rows_evaluation_used(capsys, tmp_path):
    """A user's own file and prompts.filter=skip: evaluation is on held-out rows (not the training rows it
    was on before), the summary says so, and the run directory has the per-prompt record."""
    data = tmp_path / "own.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"{a}+{b}=", "answer": str(a + b)}) + "\n" for a in range(6) for b in range(5))
    )
    output = tmp_path / "run"
    overrides = [*TINY, f"output_dir={output}", f"warm_start.cache_dir={tmp_path / 'cache'}"]
    code = main(["train", "--config", "quickstart", f"data.source={data}", "prompts.filter=skip", *overrides])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((output / "summary.json").read_text())
    rows = summary["data"]
    assert (rows["train_rows"], rows["eval_rows"], rows["eval_prompts_also_trained"]) == (27, 3, 0)
    assert "held out (data.eval_fraction=0.1" in rows["eval_from"] and not rows["eval_on_training_rows"]
    assert f"evaluated on: 3 rows, 3 rows of {data} held out" in printed
    record = [json.loads(line) for line in (output / "prompts.jsonl").read_text().splitlines()]
    assert record and sum(row["sampled"] for row in record) >= 2 * 2  # 2 steps x 2 prompts at least
    assert all(row["pass_rate"] is None or 0 <= row["pass_rate"] <= 1 for row in record)
