"""The docs site: it builds in strict mode (broken links, missing pages or anchors, reference errors fail), its
generated configuration reference carries every key with its help, and the ``rlvr`` commands its pages and the
README show parse and name only config keys that exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import hooks  # noqa: E402  (docs/hooks.py: the generated reference pages)


@pytest.mark.slow
def test_the_site_builds_in_strict_mode_with_every_page_and_search(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "WARNING" not in finished.stderr, finished.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index", "getting-started", "results", "reference/configuration", "reference/cli", "reference/api"):
        assert (site / f"{page}.html").exists(), page
    assert (site / "search" / "search_index.js").exists()  # the offline plugin: search works from disk
    api = (site / "reference" / "api.html").read_text()
    assert "ForkingGRPOTrainer" in api and "drop-in" in api  # rendered from the class docstring


def test_every_config_key_is_in_the_reference_with_its_help():
    from rlvr.experiment.compare import ExperimentConfig
    from rlvr.utils.options import describe_fields

    reference = hooks.configuration_reference()
    for key, _, help_text in describe_fields(ExperimentConfig):
        row = next((line for line in reference.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, key
        assert help_text.split(" [")[0].replace("|", "\\|") in row, key


def test_the_reference_names_the_arms_that_set_a_key():
    reference = hooks.configuration_reference()
    row = next(line for line in reference.splitlines() if line.startswith("| `forking.policy_tokens` |"))
    assert "`full`: `all`" in row and "`forking`: `forking`" in row
    grpo = next(line for line in reference.splitlines() if line.startswith("| `grpo` |"))
    assert "`num_iterations` by `archer`: `2`" in grpo


def documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every ``rlvr ...`` command the docs and the README show: lines of bash blocks
    (continuations joined, comments dropped) and inline code spans, except those with placeholders."""
    commands = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        lines = [
            line
            for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
            for line in block.replace("\\\n", " ").splitlines()
        ]
        prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        lines += re.findall(r"`(rlvr [^`]+)`", prose)
        for line in lines:
            for part in line.split(" #", 1)[0].split("&&"):
                part = part.strip()
                if part.startswith("rlvr ") and not re.search(r"\.\.\.|<|\$|\||my\.yaml|NODE0|runs/|\bN\b|X\b", part):
                    commands.append((page.name, part))
    return commands


def test_the_documented_commands_parse_and_their_configs_load(tmp_path, monkeypatch):
    """Each command line is accepted by rlvr's own parser; a train, quickstart or validate command's config and a
    compare command's planned runs (files, arm, overrides) load and validate, so a renamed key or a removed config
    fails here. Nothing trains."""
    from rlvr.cli import commands
    from rlvr.cli.main import build_parser
    from rlvr.experiment.compare import plan_runs
    from rlvr.utils.packaged import resolve_config

    monkeypatch.setattr("rlvr.run.config.world_size", lambda: 16)  # as in the launches the pages show
    documented = documented_commands()
    assert len(documented) > 30
    parser = build_parser()
    checked = 0
    for page, command in documented:
        words = shlex.split(command)[1:]
        if words[0] == "launch":  # rlvr launch ... -- PROGRAM: the launch's flags, then the program
            split = words.index("--") if "--" in words else len(words)
            launch, words = words[:split], words[split + 1 :]
            try:
                parser.parse_args(launch)
            except SystemExit:
                pytest.fail(f"{page}: `{command}`: the launch flags do not parse")
            if not words:
                continue
        if "--help" in words or "-h" in words or (len(words) == 1 and words[0] != "quickstart"):
            continue  # a help page, or the command named in prose
        try:
            args, overrides = parser.parse_known_args(words)
        except SystemExit:
            pytest.fail(f"{page}: `{command}` does not parse")
        if args.command in ("train", "quickstart", "validate"):
            commands._run_config(args, overrides)
            checked += 1
        elif args.command == "compare":
            paths = [str(resolve_config(value, "compare")) for value in args.config]
            arms = None if args.arms is None else args.arms.split(",")
            plan_runs(paths, [*overrides, f"output_dir={tmp_path / 'compare'}"], arms, None)
            checked += 1
    assert checked > 20
