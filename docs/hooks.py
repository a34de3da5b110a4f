"""MkDocs hook: the reference pages, generated from the code at every build (none is stored, so none goes stale).

* ``reference/configuration.md``: every section and key of the config ``rlvr train`` and ``rlvr compare`` read,
  with its type, default and one-line help (the ``option(default, help)`` of its dataclass field), and which
  packaged arms (``rlvr/configs/arms/*.yaml``) set it, to what;
* ``reference/cli.md``: the ``--help`` of every ``rlvr`` command, from the parsers themselves;
* ``reference/api.md``: the public API (``rlvr.__init__``'s exports), rendered by mkdocstrings from the docstrings;
* ``architecture.md``: the repository's ARCHITECTURE.md (the house, the layers and their rules).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import typing
from pathlib import Path

import yaml
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


def on_files(files, config):
    pages = {
        "reference/configuration.md": configuration_reference(),
        "reference/cli.md": cli_reference(),
        "reference/api.md": api_reference(),
        "architecture.md": architecture(),
    }
    for path, content in pages.items():
        files.append(File.generated(config, path, content=content))
    return files


# --------------------------------------------------------------------------------------------------
# configuration


def type_name(tp) -> str:
    """``int``, ``list[str]``, ``str | None``: a field's annotation as written."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


def arm_settings() -> dict[str, list[str]]:
    """``section.key`` -> ``["arm: value", ...]`` over the packaged arms."""
    settings: dict[str, list[str]] = {}
    for path in sorted((ROOT / "rlvr" / "configs" / "arms").glob("*.yaml")):
        for section, values in (yaml.safe_load(path.read_text()) or {}).items():
            for key, value in (values or {}).items() if isinstance(values, dict) else [(None, values)]:
                name = f"{section}.{key}" if key is not None else section
                shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
                settings.setdefault(name, []).append(f"`{path.stem}`: `{shown}`")
    return settings


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def section_rows(cls, prefix: str, arms: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """``(section heading, table rows)`` for ``cls`` and, depth first, each of its sections."""
    from rlvr.utils.options import _is_section

    hints = typing.get_type_hints(cls)
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if _is_section(tp):
            nested += section_rows(tp, f"{prefix}{field.name}.", arms)
            continue
        key = f"{prefix}{field.name}"
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        default = field.metadata.get("shown_default", default)
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        help_text = field.metadata.get("help", "")
        if "choices" in field.metadata:
            help_text += " (one of: " + ", ".join(f"`{choice}`" for choice in field.metadata["choices"]) + ")"
        by_arms = "; ".join(arms.pop(key, []))
        if "passthrough" in field.metadata:  # TRL's GRPOConfig: the arms' keys of it listed with it
            inner = sorted(name for name in arms if name.startswith(f"{key}."))
            by_arms = "; ".join(f"`{name.split('.', 1)[1]}` by {', '.join(arms.pop(name))}" for name in inner)
        rows.append(f"| `{key}` | `{cell(type_name(tp))}` | `{cell(shown)}` | {cell(help_text)} | {cell(by_arms)} |")
    heading = prefix.rstrip(".") or "run"
    title = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    if not prefix:
        title = "The run's own keys; `grpo` passes TRL's `GRPOConfig` fields through (the arms' settings of it listed)."
    return [(f"{heading}", [title, *rows])] + nested


def configuration_reference() -> str:
    from rlvr.experiment.compare import ExperimentConfig

    arms = arm_settings()
    lines = [
        "# Configuration reference",
        "",
        "Every key of the config `rlvr train` and `rlvr compare` read, generated from the dataclasses that define",
        "them: type, default, the one-line help `rlvr train --help` prints, and the packaged arms",
        "(`rlvr/configs/arms/`, `--arm NAME`) that set the key. Set a key in YAML (`section: {key: value}`) or on",
        "the command line (`section.key=value`); a bad value fails before any model is built, naming the key.",
        "",
    ]
    for heading, (title, *rows) in section_rows(ExperimentConfig, "", arms):
        lines += [
            f"## `{heading}`",
            "",
            title,
            "",
            "| key | type | default | help | set by arms |",
            "|---|---|---|---|---|",
        ]
        lines += [*rows, ""]
    if arms:
        raise ValueError(f"arms set keys the config does not have: {sorted(arms)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line


def cli_reference() -> str:
    from rlvr.cli.main import build_parser

    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal: a fixed width for a stable page
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps its subparsers here
    lines = ["# Command-line reference", "", "The `--help` of `rlvr` and of each of its commands.", ""]
    lines += ["## `rlvr`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, command in commands.items():
        lines += [f"## `rlvr {name}`", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Python API


def api_reference() -> str:
    import rlvr

    lines = [
        "# Python API reference",
        "",
        "What `from rlvr import ...` gives (`rlvr.__init__`), rendered from the docstrings. `ForkingGRPOTrainer`",
        "takes TRL's `GRPOTrainer` arguments plus `forking=`, `moe=`, `rollout=`, `prompts=` and `token_rules=`.",
        "",
    ]
    for name, module in rlvr._EXPORTS.items():
        target = getattr(importlib.import_module(module), rlvr._RENAMED.get(name, name))
        if hasattr(target, "__qualname__"):  # a class or function: where it is defined
            where = f"{target.__module__}.{target.__qualname__}"
        else:  # an instance (math_accuracy): beside its class
            where = f"{type(target).__module__}.{name}"
        lines += [f"## `{name}`", "", f"::: {where}", "    options:", "      heading_level: 3", ""]
    return "\n".join(lines)


def architecture() -> str:
    return (ROOT / "ARCHITECTURE.md").read_text().replace("](README.md", "](index.md")
