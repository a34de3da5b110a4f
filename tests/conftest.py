"""Shared fixtures: tiny MoE checkpoints on disk and a factory for trainers on a fixed batch."""

from __future__ import annotations

import pytest
import torch

from rlvr.models import TinyMoESpec, save_tiny_policy

# Small enough that a forward+backward takes milliseconds on a CPU.
TEST_SPEC = TinyMoESpec(
    num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, expert_size=32, num_experts=4, top_k=2
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch)`` -> directory of a saved random tiny MoE (built once per session)."""
    built: dict[str, str] = {}

    def get(architecture: str = "qwen3_moe") -> str:
        if architecture not in built:
            directory = tmp_path_factory.mktemp(f"tiny_{architecture}")
            built[architecture] = str(save_tiny_policy(architecture, TEST_SPEC, directory, seed=0))
        return built[architecture]

    return get


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)
    yield
