"""Tiny MoE policies: every architecture builds, saves and re-loads through from_pretrained."""

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
