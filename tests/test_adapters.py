"""Policies with PEFT adapters: what rlvr reads of them (TRL wraps the policy when given ``peft_config``)."""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

from rlvr.models import load_pretrained
from rlvr.models.loading import runs_as_reference
from rlvr.run.config import MoEConfig
from tests.test_trainer import GENERATIONS, ROWS, _dataset, make_trainer

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def test_runs_as_reference_while_adapters_are_off_or_the_ref_adapter_is_active(tiny_checkpoint):
    model, _ = load_pretrained(tiny_checkpoint())
    assert not runs_as_reference(model)  # no adapters at all
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    assert not runs_as_reference(peft_model)
    with peft_model.disable_adapter():  # how TRL reaches the reference of a new adapter
        assert runs_as_reference(peft_model)
    assert not runs_as_reference(peft_model)
    peft_model.add_adapter("ref", LoraConfig(**LORA))
    peft_model.set_adapter("ref")  # TRL's use_adapter(model, "ref") when re-training an existing adapter
    assert runs_as_reference(peft_model)


def test_the_reference_forward_of_an_adapter_policy_is_not_the_old_policy_forward(tiny_checkpoint, tmp_path):
    """With beta != 0 and an adapter policy, TRL computes reference log-probs with the policy itself, adapters
    disabled. With one optimizer step per batch it runs no old-policy forward, so that reference forward is the
    batch's first forward of ``self.model``: it must not be recorded as the policy's routing."""
    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        moe=MoEConfig(routing_replay="old_policy"),
        peft_config=LoraConfig(**LORA),
        beta=0.04,
        max_completion_length=8,
        max_steps=1,
    )
    replay = trainer.rollouts.replay
    forwards = []  # (told it is the policy's forward, adapters off)
    original = replay.old_policy_forward

    def spy(is_policy, *args, **kwargs):
        forwards.append((is_policy, runs_as_reference(trainer.accelerator.unwrap_model(trainer.model))))
        return original(is_policy, *args, **kwargs)

    replay.old_policy_forward = spy
    dataset = _dataset()
    trainer._generate_and_score_completions(
        [dataset[i] for i in range(ROWS // GENERATIONS) for _ in range(GENERATIONS)]
    )
    assert any(reference for _, reference in forwards), "TRL ran no reference forward"
    assert not any(is_policy for is_policy, reference in forwards if reference)
