"""Typed configs from YAML layers and command-line overrides; knows no section by name.

A config is a tree of dataclasses. Each field is declared with :func:`option` (a default and a
one-line help, optionally the allowed choices); a section that has rules beyond its choices defines
``validate()``, raising :class:`ConfigError` whose message starts with the field's name (the walk
adds the section's dotted prefix). A ``dict`` field declared with :func:`passthrough` holds another
library's options (TRL's ``GRPOConfig`` for ``grpo``): its keys are checked against that library's
names, and a bare key of that set on the command line (``--max_steps 3``) lands in it.

Values are read in three layers: defaults < YAML files (later ones overlay earlier ones) < overrides
(``--forking.rho 0.3`` or ``forking.rho=0.3``). An unknown key fails with the closest known keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


def option(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    """A config field: its default (a section class, list or dict gets a fresh copy per config), a
    one-line help that ``--help`` prints, and optionally the values it may take."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = choices
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata, **kwargs)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda value=default: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def passthrough(known_keys: Callable[[], Iterable[str]], help: str, shown_default: dict | None = None) -> Any:
    """A ``dict`` field holding another library's options, checked against ``known_keys()``."""
    metadata = {"help": help, "passthrough": known_keys, "shown_default": shown_default or {}}
    return field(default_factory=dict, metadata=metadata)


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_integers(values: list, key: str) -> None:
    """Every item of the list ``key`` is an int (not a bool); the error names the first bad index."""
    for index, value in enumerate(values):
        require(
            isinstance(value, int) and not isinstance(value, bool),
            f"{key}[{index}]",
            f"must be an integer; got {value!r}",
        )


# --------------------------------------------------------------------------------------------------
# Reading: defaults < YAML < overrides


def read_layers(config: Any, paths: str | Path | list[str | Path] | None, overrides: list[str] | None) -> Any:
    """Apply each YAML file in order, then the overrides, onto ``config`` (a fresh root instance)."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _apply(config, values, "", type(config))
    if overrides:
        _apply(config, parse_overrides(overrides), "", type(config))
    return config


def parse_overrides(arguments: list[str]) -> dict:
    """``["--forking.rho", "0.3", "grpo.learning_rate=1e-5"]`` -> nested dict with YAML-typed values."""
    nested: dict = {}
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if "=" in argument:
            key, _, raw = argument.lstrip("-").partition("=")
            index += 1
        elif argument.startswith("--"):
            if index + 1 >= len(arguments):
                raise ConfigError(f"{argument[2:]}: missing value")
            key, raw = argument[2:], arguments[index + 1]
            index += 2
        else:
            raise ConfigError(f"cannot read override {argument!r}; write --key value or key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 leaves 1e-5 (no dot) as a string
            value = _number(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


def _apply(instance: Any, values: dict, prefix: str, root: type) -> None:
    """Set nested ``values`` on a dataclass instance, coercing types and rejecting unknown keys."""
    hints = typing.get_type_hints(type(instance))
    fields = {f.name: f for f in dataclasses.fields(instance)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            host = _passthrough_holding(instance, name)
            if host is None:
                raise _unknown_key(key, list(fields), root)
            getattr(instance, host)[name] = (
                value  # a bare library option: --max_steps 3 when a passthrough knows max_steps
            )
            continue
        current = getattr(instance, name)
        known = fields[name].metadata.get("passthrough")
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {', '.join(typing.get_type_hints(type(current)))}")
            _apply(current, value, f"{key}.", root)
        elif known is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of its library's options")
            allowed = known()
            for option_name in value:
                if option_name not in allowed:
                    raise _unknown_key(f"{key}.{option_name}", sorted(allowed), root)
            current.update(value)
        else:
            setattr(instance, name, coerce(key, value, hints[name]))


def _passthrough_holding(instance: Any, name: str) -> str | None:
    for f in dataclasses.fields(instance):
        known = f.metadata.get("passthrough")
        if known is not None and name in set(known()):
            return f.name
    return None


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option_type in options:
            if option_type is type(None):
                continue
            try:
                return coerce(key, value, option_type)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str):  # "1e3" and friends, which YAML leaves as strings
            value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            value = _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads true/false for enum-like strings (auto, true, false)
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if _is_section(tp):
            keys += _dotted_keys(tp, f"{prefix}{f.name}.")
        elif "passthrough" in f.metadata:
            keys += [f"{prefix}{f.name}.{name}" for name in sorted(f.metadata["passthrough"]())]
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _unknown_key(key: str, known: list[str], root: type) -> ConfigError:
    """An unknown key, with the closest keys of its own section, else of every section."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=3)
    if not close:
        everywhere = _dotted_keys(root)
        by_leaf: dict[str, list[str]] = {}
        for dotted in everywhere:
            by_leaf.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
        close = [
            d for match in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75) for d in by_leaf[match]
        ]
        close = close[:3] or difflib.get_close_matches(key, everywhere, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return ConfigError(f"{key}: unknown key{hint}")


# --------------------------------------------------------------------------------------------------
# Validation: choices everywhere, then each section's own validate(), innermost sections first


def validate_tree(instance: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, f"{prefix}{f.name}.")
            continue
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{prefix}{f.name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    check = getattr(instance, "validate", None)
    if check is None:
        return
    try:
        check()
    except ConfigError as error:
        raise ConfigError(f"{prefix}{error}") from None
    except ValueError as error:  # a section that reports plain ValueErrors (it is also used outside configs)
        raise ConfigError(f"{prefix.rstrip('.')}: {error}") from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------
# Help


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(key, default, help)`` for every leaf field, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = f.metadata.get("shown_default", default)
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += f" [{'|'.join(map(str, f.metadata['choices']))}]"
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((f"{prefix}{f.name}", shown, help_text))
    return rows


def format_help(cls: type) -> str:
    rows = describe_fields(cls)
    width = max(len(key) for key, _, _ in rows) + 2
    lines = []
    section = None
    for key, default, help_text in rows:
        head = key.split(".")[0] if "." in key else "run"
        if head != section:
            lines.append(f"\n  [{head}]")
            section = head
        lines.append(f"  --{key.ljust(width)}{help_text} (default: {default})")
    return "\n".join(lines)
