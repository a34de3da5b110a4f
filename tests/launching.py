"""Helper for the multi-process tests (not a test module): each launch starts from an empty cache.

A node that never ran rlvr has no cached tiny policy, warm start or SVF decomposition; a launch that finds
them built by an earlier test (in one process, or under another ZeRO stage) skips the code a new node runs
first. Each launched process gets a home of its own under the test's ``tmp_path``, so ``~/.cache/rlvr`` is
empty when it starts. DeepSpeed's compiled CPU ops are no part of rlvr's cache and keep their shared folder.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root


def fresh_cache_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """This process's environment with ``HOME`` an empty folder under ``tmp_path`` (plus ``variables``)."""
    home = Path(tmp_path) / "home"
    home.mkdir(parents=True, exist_ok=True)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    )
    return {**os.environ, "HOME": str(home), "TORCH_EXTENSIONS_DIR": extensions, **variables}


def printed_launch_command(capsys, launch_arguments: list[str], program: list[str]) -> list[str]:
    """The command ``rlvr launch LAUNCH_ARGUMENTS --dry-run -- PROGRAM`` prints, as a list."""
    from rlvr.cli.main import main

    assert main(["launch", *launch_arguments, "--dry-run", "--", *program]) == 0
    return shlex.split(capsys.readouterr().out.strip().removeprefix("rlvr launch: "))
