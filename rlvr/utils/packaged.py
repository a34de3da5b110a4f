"""The configs shipped inside the package (``rlvr/configs/``), found by name from any directory.

A ``--config`` value is a path when such a file exists, else a packaged name: ``quickstart``,
``models/qwen3_30b_a3b``, and for ``rlvr compare`` first ``compare/<name>`` (``rlvr compare --config
quickstart``). Arm overlays (``arms/<arm>.yaml``) and the DeepSpeed/accelerate configs
(``deepspeed/``) are read from the same place, so a wheel install works like a source checkout.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from rlvr.utils.options import ConfigError

CONFIG_ROOT = Path(str(files("rlvr") / "configs"))
ARMS_DIR = CONFIG_ROOT / "arms"
DEEPSPEED_DIR = CONFIG_ROOT / "deepspeed"
QUICKSTART = CONFIG_ROOT / "quickstart.yaml"


def arm_names() -> list[str]:
    """Every arm overlay shipped in ``configs/arms/``."""
    return sorted(path.stem for path in ARMS_DIR.glob("*.yaml"))


def arm_path(arm: str) -> Path:
    if arm not in arm_names():
        raise ConfigError(f"arm: unknown arm {arm!r}; one of {', '.join(arm_names())}")
    return ARMS_DIR / f"{arm}.yaml"


def config_names() -> list[str]:
    """Packaged run configs by name (``quickstart``, ``compare/quickstart``, ``models/...``); arm overlays
    and DeepSpeed files are listed by :func:`list_configs` too but are not run configs."""
    return sorted(
        str(path.relative_to(CONFIG_ROOT).with_suffix(""))
        for path in CONFIG_ROOT.rglob("*.yaml")
        if path.parent.name not in ("arms", "deepspeed")
    )


def resolve_config(value: str, command: str | None = None) -> Path:
    """A ``--config`` value as a file: an existing path, else a packaged config of that name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = value.removesuffix(".yaml")
    candidates = ([f"compare/{name}"] if command == "compare" else []) + [name]
    for candidate in candidates:
        packaged = CONFIG_ROOT / f"{candidate}.yaml"
        if packaged.is_file() and packaged.resolve().is_relative_to(CONFIG_ROOT.resolve()):
            return packaged
    raise ConfigError(
        f"--config: {value!r} is neither a file nor a packaged config; packaged: {', '.join(config_names())} "
        "('rlvr configs' lists them)"
    )


def list_configs() -> list[tuple[str, str]]:
    """(name, first comment line) of every packaged file, arm overlays and DeepSpeed configs included."""
    listing = []
    for path in sorted(CONFIG_ROOT.rglob("*")):
        if path.suffix not in (".yaml", ".json"):
            continue
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        summary = first.lstrip("# ").strip() if first.startswith("#") else ""
        name = str(path.relative_to(CONFIG_ROOT))
        listing.append((name.removesuffix(".yaml") if path.suffix == ".yaml" else name, summary))
    return listing


def copy_config(name: str, destination: str | Path, command: str | None = None) -> Path:
    """Copy a packaged config out to edit (``rlvr configs --copy quickstart my.yaml``); never overwrites."""
    source = resolve_config(name, command) if not name.endswith(".json") else CONFIG_ROOT / name
    if not source.is_file() or CONFIG_ROOT.resolve() not in source.resolve().parents:
        raise ConfigError(f"--copy: {name!r} is not a packaged config ('rlvr configs' lists them)")
    target = Path(destination)
    if target.is_dir():
        target = target / source.name
    if target.exists():
        raise ConfigError(f"--copy: {target} exists; choose another destination")
    shutil.copyfile(source, target)
    return target
