"""rlvr as a library: the public API, the README's Python example, TRL's ways of passing a model."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import fresh_cache_env

ROOT = Path(__file__).resolve().parent.parent


def test_public_api_is_listed_and_importable():
    import rlvr

    assert set(rlvr.__all__) == {"__version__", *rlvr._EXPORTS}
    for name in rlvr.__all__:
        assert getattr(rlvr, name) is not None, name
    assert {
        "ForkingGRPOTrainer",
        "ForkingConfig",
        "MoEConfig",
        "select_forking_tokens",
        "math_accuracy",
        "TinyMoESpec",
        "build_tiny_moe",
        "upcycle_moe",
    } <= set(rlvr.__all__)
    with pytest.raises(AttributeError):
        rlvr.not_a_name  # noqa: B018
    # the rewards live under the same package as the trainer
    from rlvr.rewards import math_accuracy

    assert rlvr.math_accuracy is math_accuracy


def test_importing_rlvr_loads_no_training_stack():
    code = "import sys, rlvr; print(any(m in sys.modules for m in ('trl', 'torch', 'transformers')))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert output.stdout.strip() == "False", output.stderr


def _readme_example() -> str:
    section = (ROOT / "README.md").read_text().split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_readme_python_example_runs_on_the_tiny_model(tiny_checkpoint, tmp_path, monkeypatch):
    """The README's script, unchanged except for the model id, a two-row GSM8K stand-in and a small budget."""
    import datasets
    import trl

    code = _readme_example()
    assert '"Qwen/Qwen3-30B-A3B"' in code and "trainer.save_model()" in code
    code = code.replace('"Qwen/Qwen3-30B-A3B"', repr(tiny_checkpoint("qwen3_moe")))
    gsm8k_like = datasets.Dataset.from_list(
        [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}, {"question": "What is 4-1?", "answer": "#### 3"}] * 4
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: gsm8k_like)
    real_config = trl.GRPOConfig
    small = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        max_completion_length=8,
        per_device_train_batch_size=4,
        num_generations=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
    )
    monkeypatch.setattr(trl, "GRPOConfig", lambda **kwargs: real_config(**{**kwargs, **small}))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 -- the documented example itself
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "config.json").exists()  # save_model() wrote the policy
    assert (tmp_path / "out" / "forking_tokens.jsonl").exists()  # rlvr's logs land in args.output_dir
    assert any("rewards/math_accuracy/mean" in record for record in trainer.state.log_history)
    namespace["math_accuracy"].close()


def test_top_entropy_quantile_is_refused_with_the_replacement(tiny_checkpoint, tmp_path):
    from trl import GRPOConfig

    from rlvr import ForkingGRPOTrainer, arithmetic_exact
    from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset

    args = GRPOConfig(
        output_dir=str(tmp_path),
        top_entropy_quantile=0.2,
        per_device_train_batch_size=4,
        num_generations=4,
        use_cpu=True,
        bf16=False,
        report_to=[],
    )
    with pytest.raises(ValueError, match=r"forking=ForkingConfig\(rho=\.\.\.\)"):
        ForkingGRPOTrainer(
            model=tiny_checkpoint("qwen3_moe"),
            reward_funcs=arithmetic_exact,
            args=args,
            train_dataset=problems_to_dataset(generate_problems(ArithmeticTask(), "train", 8, 0)),
        )


def test_a_users_grpo_config_gets_rlvrs_router_aux_loss_default(tiny_checkpoint, tmp_path):
    """The README's promise on the library path: left unset, TRL's router_aux_loss_coef took the model's own
    (0.001 for Qwen3-MoE) and added a load-balancing loss over every token; rlvr makes it 0. A number the
    user sets is kept, and refused beside rlvr's own load-balancing loss."""
    from trl import GRPOConfig

    from rlvr import ForkingGRPOTrainer, MoEConfig, arithmetic_exact
    from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset

    def build(moe=None, **settings):
        args = GRPOConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            num_generations=4,
            use_cpu=True,
            bf16=False,
            report_to=[],
            **settings,
        )
        return ForkingGRPOTrainer(
            model=tiny_checkpoint("qwen3_moe"),
            reward_funcs=arithmetic_exact,
            args=args,
            train_dataset=problems_to_dataset(generate_problems(ArithmeticTask(), "train", 8, 0)),
            moe=moe,
        )

    unset = build()
    assert unset.router_aux_loss_coef == 0.0 and not unset.aux_loss_enabled
    kept = build(router_aux_loss_coef=0.001)
    assert kept.router_aux_loss_coef == 0.001 and kept.aux_loss_enabled
    with pytest.raises(ValueError, match="added twice"):
        build(moe=MoEConfig(load_balancing_coef=0.01), router_aux_loss_coef=0.001)


@pytest.mark.slow
def test_model_given_as_a_path_under_zero3_registers_leaves_on_policy_and_reference(tiny_checkpoint, tmp_path):
    """TRL loads both models inside __init__ and wraps the reference model in DeepSpeed there: every MoE
    block must be a ZeRO-3 leaf by then, or ranks routing differently can hang on per-expert gathers."""
    from test_distributed import trl_zero_launch

    command = [
        *trl_zero_launch("zero3", 29571),
        str(ROOT / "tests" / "library_steps.py"),
        tiny_checkpoint("qwen3_moe"),
        str(tmp_path),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=fresh_cache_env(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = json.loads((tmp_path / "library.json").read_text())
    assert result["deepspeed"] and result["steps"] == 2
    assert result["leaves"]["policy"] and all(result["leaves"]["policy"])
    assert result["leaves"]["reference"] and all(result["leaves"]["reference"])


@pytest.mark.slow
def test_trl_style_script_trains_with_rlvr_flags(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}, {"question": "What is 4-1?", "answer": "#### 3"}]
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows * 8))
    script = str(ROOT / "scripts" / "train_grpo_forking.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--rho" in help_text and "--router_gate_scope" in help_text and "--learning_rate" in help_text
    command = [
        sys.executable,
        script,
        "--model_name_or_path",
        tiny_checkpoint("qwen3_moe"),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_generations",
        "4",
        "--max_completion_length",
        "8",
        "--use_cpu",
        "--bf16",
        "false",
        "--report_to",
        "none",
        "--rho",
        "0.3",
        "--router_gate_scope",
        "forking",
        "--logging_steps",
        "1",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "forking_tokens.jsonl").exists()
    records = [json.loads(line) for line in (tmp_path / "out" / "forking_tokens.jsonl").read_text().splitlines()]
    assert records  # rho=0.3 reached the trainer: kept share of the logged selection
