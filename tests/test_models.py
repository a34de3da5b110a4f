"""Tiny MoE policies: every architecture builds, saves and re-loads through from_pretrained."""

import os

import pytest
import torch

from rlvr.models import (
    ARCHITECTURES,
    TinyMoESpec,
    build_char_tokenizer,
    build_tiny_moe,
    load_pretrained,
    save_tiny_policy,
)

SPEC = TinyMoESpec(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, expert_size=32, num_experts=4, top_k=2)


def test_tokenizer_round_trips_text_and_ends_turns_with_eos():
    tokenizer = build_char_tokenizer()
    text = "Compute: 23+45-17\n23+45=68\n\\boxed{51}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], tokenize=False
    )
    assert rendered.endswith("A" + tokenizer.eos_token)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|assistant|>")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_save_and_reload_gives_the_same_model(architecture, tmp_path):
    directory = save_tiny_policy(architecture, SPEC, tmp_path / architecture, seed=1)
    model, tokenizer = load_pretrained(str(directory))
    reference = build_tiny_moe(
        architecture, SPEC, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=1
    )
    batch = tokenizer(["Compute: 1+2", "9-4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        loaded = model(**batch).logits
        built = reference(**batch).logits
    assert loaded.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    torch.testing.assert_close(loaded, built, rtol=0, atol=0)
    assert model.config.model_type == reference.config.model_type
    assert tokenizer.padding_side == "left"


def test_seed_controls_initialisation():
    tokenizer = build_char_tokenizer()
    args = (SPEC, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    a, b, c = (build_tiny_moe("qwen3_moe", *args, seed=s) for s in (0, 0, 1))
    first = lambda m: next(m.parameters())  # noqa: E731
    assert torch.equal(first(a), first(b)) and not torch.equal(first(a), first(c))


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.dtype"):
        load_pretrained(str(tmp_path), dtype="int8")


def test_stale_staging_folders_of_dead_processes_are_removed(tmp_path):
    """A crashed launch leaves ``<name>.tmp-<host>-<pid>`` folders in the cache; the next run removes those of
    this host whose process is gone, and keeps live processes' and other hosts'."""
    import socket
    import subprocess
    import sys

    from rlvr.models import remove_stale_staging, staging_name

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()
    dead = tmp_path / f"base-0123.tmp-{host}-{ended.pid}"
    mine = staging_name(tmp_path / "base-4567")  # this process: alive
    elsewhere = tmp_path / f"warm-89ab.tmp-another-host-{ended.pid}"
    published = tmp_path / "warm-cdef"
    for folder in (dead, mine, elsewhere, published):
        folder.mkdir()
        (folder / "model.safetensors").write_text("partial")
    assert mine.name == f"base-4567.tmp-{host}-{os.getpid()}"
    assert remove_stale_staging(tmp_path) == [dead]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(p.name for p in (mine, elsewhere, published))
    assert remove_stale_staging(tmp_path / "missing") == []


def test_built_whole_switches_transformers_zero3_off_and_back(monkeypatch):
    """Inside ``built_whole`` transformers sees no ZeRO-3 config (a model built there is not partitioned); the
    config it held is back afterwards, also when the block raises."""
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations import is_deepspeed_zero3_enabled

    from rlvr.models import built_whole

    class Zero3:
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    held = Zero3()
    hf_deepspeed.set_hf_deepspeed_config(held)
    try:
        assert is_deepspeed_zero3_enabled()
        with built_whole():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(RuntimeError), built_whole():
            raise RuntimeError("while building")
        assert is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
