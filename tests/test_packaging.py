"""The package as a user installs it: a wheel in a fresh virtual environment, run from any directory."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.tiny.num_layers=1",
    "model.tiny.hidden_size=32",
    "model.tiny.expert_size=32",
    "model.tiny.num_experts=4",
    "data.num_train=64",
    "warm_start.enabled=false",
    "eval.enabled=false",
    "save_model=false",
    "--per_device_train_batch_size",
    "8",
    "--num_generations",
    "4",
    "--max_completion_length",
    "16",
    "grpo.logging_steps=1",
    "grpo.disable_tqdm=true",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this checkout installed into a new venv that sees no source tree.

    The venv reads the dependencies (torch, transformers, ...) from this interpreter's site-packages
    as plain path entries, so their .pth hooks -- this checkout's editable install among them -- do
    not run: ``import rlvr`` can only find the wheel.
    """
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(work.glob("rlvr-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dependencies = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    Path(purelib, "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return wheel, venv


def _run(venv: Path, cwd: Path, *command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    environment["PATH"] = f"{venv / 'bin'}{os.pathsep}{environment.get('PATH', '')}"
    return subprocess.run(list(command), cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def test_wheel_ships_the_configs_and_no_top_level_rewards(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in (
        "rlvr/configs/quickstart.yaml",
        "rlvr/configs/compare/quickstart.yaml",
        "rlvr/configs/arms/full.yaml",
        "rlvr/configs/deepspeed/zero3.json",
        "rlvr/configs/deepspeed/zero3.yaml",
        "rlvr/rewards/math.py",
    ):
        assert packaged in names
    assert not any(name.startswith("rewards/") for name in names)  # no clash with other packages' import names


@pytest.mark.slow
def test_installed_wheel_runs_from_any_directory(installed, tmp_path):
    _, venv = installed
    where = _run(venv, tmp_path, "python", "-c", "import rlvr, rlvr.rewards; print(rlvr.__file__)")
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout, f"rlvr imported from outside the venv: {where.stdout}"

    help_text = _run(venv, tmp_path, "python", "-m", "rlvr", "--help")
    assert help_text.returncode == 0 and "quickstart" in help_text.stdout

    validated = _run(venv, tmp_path, "rlvr", "validate", "--config", "quickstart", "--arm", "full", "--max_steps", "3")
    assert validated.returncode == 0, validated.stderr
    assert "max_steps: 3" in validated.stdout and "policy_tokens: all" in validated.stdout

    listed = _run(venv, tmp_path, "rlvr", "configs")
    assert "compare/quickstart" in listed.stdout and "deepspeed/zero3" in listed.stdout

    launch = _run(venv, tmp_path, "rlvr", "launch", "--zero", "3", "--nproc", "2", "--dry-run", "--", "quickstart")
    assert launch.returncode == 0 and f"{venv}" in launch.stdout  # DeepSpeed configs from the installed package

    output = tmp_path / "run"
    trained = _run(
        venv,
        tmp_path,
        "rlvr",
        "train",
        "--config",
        "quickstart",
        "--max_steps",
        "2",
        *TINY,
        f"output_dir={output}",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((output / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--config", "nope"], "config error: --config: 'nope' is neither a file nor a packaged config"),
        (
            ["--config", "quickstart", "--max_step", "3"],
            "max_step: unknown key; did you mean warm_start.max_steps, grpo.max_steps?",
        ),
        (["--config", "quickstart", "rho=0.3"], "rho: unknown key; did you mean forking.rho?"),
    ],
)
def test_config_mistakes_get_one_line(capsys, arguments, message):
    from rlvr.cli.main import main

    assert main(["validate", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


def test_trl_flags_are_grpo_keys():
    from rlvr.run.config import load_config
    from rlvr.utils.packaged import resolve_config

    config = load_config(
        [resolve_config("quickstart")], ["--max_steps", "3", "--learning_rate", "1e-6", "num_generations=4"]
    )
    assert (
        config.grpo["max_steps"] == 3 and config.grpo["learning_rate"] == 1e-6 and config.grpo["num_generations"] == 4
    )
    assert config.warm_start.max_steps != 3  # rlvr's own keys keep their section
    explicit = load_config(None, ["--seed", "7"])
    assert explicit.seed == 7 and "seed" not in explicit.grpo  # an rlvr key of the same name wins


def test_packaged_names_resolve_per_command():
    from rlvr.utils.packaged import CONFIG_ROOT, resolve_config

    assert resolve_config("quickstart") == CONFIG_ROOT / "quickstart.yaml"
    assert resolve_config("quickstart", "compare") == CONFIG_ROOT / "compare" / "quickstart.yaml"
    assert resolve_config("upcycle", "compare") == CONFIG_ROOT / "compare" / "upcycle.yaml"
    assert resolve_config("models/qwen3_30b_a3b.yaml") == CONFIG_ROOT / "models" / "qwen3_30b_a3b.yaml"


def test_configs_copy_out_never_overwrites(tmp_path, capsys):
    from rlvr.cli.main import main

    assert main(["configs", "--copy", "compare/quickstart", "--to", str(tmp_path)]) == 0
    assert (tmp_path / "quickstart.yaml").read_text().startswith("# The central experiment")
    assert main(["configs", "--copy", "compare/quickstart", "--to", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "bad.jsonl",
            '{"question": "a", "answer": "1"}\n{"question": "b", answer: 2}\n',
            "bad.jsonl: line 2: not valid JSON",
        ),
        ("list.jsonl", '{"question": "a", "answer": "1"}\n[1, 2]\n', "list.jsonl: line 2: expected a JSON object"),
        ("bad.json", '[{"question": "a", "answer": "1"},]', "bad.json: not valid JSON: Expecting value at line 1"),
        ("bad.csv", 'question,answer\n"a,1\nb,2\n', "bad.csv: cannot read: ParserError"),
        ("bad.parquet", "not parquet", "bad.parquet: cannot read: ArrowInvalid"),
        ("empty.jsonl", "", "empty.jsonl: the file is empty"),
    ],
)
def test_unreadable_data_files_get_one_line_naming_file_and_line(tmp_path, capsys, name, content, message):
    from rlvr.cli.main import main

    path = tmp_path / name
    path.write_text(content)
    code = main(
        [
            "train",
            "--config",
            "quickstart",
            f"data.source={path}",
            "warm_start.enabled=false",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert not (tmp_path / "run" / "model").exists()


def test_missing_file_and_wrong_split_are_named(tmp_path):
    from rlvr.data import DataError, read_source

    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        read_source(str(tmp_path / "missing.jsonl"), "train")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"question": "a", "answer": "1"}\n')
    assert len(read_source(str(folder), "train")) == 1
    with pytest.raises(DataError, match="no split 'validation'"):
        read_source(str(folder), "validation")


def test_every_module_is_at_most_400_lines():
    """The house rule: a module a newcomer can hold in their head. Over it, split the module by job."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "rlvr"
    lengths = {str(path.relative_to(root.parent)): len(path.read_text().splitlines()) for path in root.rglob("*.py")}
    too_long = {path: lines for path, lines in sorted(lengths.items()) if lines > 400}
    assert not too_long, f"modules over 400 lines (split them by job): {too_long}"


def test_the_top_level_is_a_few_packages_each_saying_what_it_holds_and_may_import():
    """The house rule: at most 8 top-level modules beside __init__/__main__ (the rest lives in packages, one per
    capability), and every package's __init__ opens with a docstring saying what lives there and what it may
    import (the layers of pyproject.toml's import-linter contracts)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "rlvr"
    modules = sorted(path.name for path in root.glob("*.py") if path.name not in ("__init__.py", "__main__.py"))
    assert len(modules) <= 8, f"top-level modules (move them into a package): {modules}"
    for package in sorted(path for path in root.iterdir() if (path / "__init__.py").exists()):
        docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        assert len(docstring) > 80 and "import" in docstring, f"rlvr/{package.name}/__init__.py: say what lives here"


def test_modules_imported_by_their_earlier_names_say_where_they_went():
    import importlib

    import rlvr
    import rlvr.config
    import rlvr.run.config

    assert rlvr.config is rlvr.run.config and rlvr.config.load_config is rlvr.run.config.load_config
    from rlvr.report import write_report  # the report package keeps the report's entry point
    from rlvr.trainer import ForkingGRPOTrainer

    assert callable(write_report) and ForkingGRPOTrainer.__module__ == "rlvr.trainer"
    for old, new in rlvr.MOVED.items():
        with pytest.raises(ModuleNotFoundError, match=f"^{old} moved: import {new}$"):
            importlib.import_module(old)
        importlib.import_module(new)
