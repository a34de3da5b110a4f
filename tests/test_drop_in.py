"""Drop-in: outside rlvr's loss forward, the TRL methods ForkingGRPOTrainer overrides keep TRL's meaning."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from trl import GRPOTrainer

from rlvr.run.config import ForkingConfig, MoEConfig
from rlvr.trainer import ForkingGRPOTrainer
from tests.test_trainer import ROWS, make_batch, make_trainer


def _entropy_cases():
    generator = torch.Generator().manual_seed(0)
    random = torch.rand(6, 9, generator=generator, dtype=torch.float64)  # (B, T)
    padded = torch.ones(6, 9, dtype=torch.long)
    padded[2, 4:] = 0
    padded[5, :] = 0  # a row of padding only
    ties = torch.full((3, 5), 0.25)
    ties[0, 0] = 1.0
    return [
        (random, torch.ones(6, 9, dtype=torch.long)),
        (random, padded),
        (ties, torch.ones(3, 5, dtype=torch.long)),
        (torch.rand(1, 1, generator=generator), torch.ones(1, 1, dtype=torch.long)),  # one token
        (random, torch.zeros(6, 9, dtype=torch.long)),  # nothing to select
    ]


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_get_high_entropy_mask_on_a_trainer_built_without_init_is_trls(threshold):
    """A trainer that skipped ``__init__`` (a test double, a partly built object) reads TRL's behaviour."""
    accelerator = Accelerator(cpu=True)
    ours, theirs = ForkingGRPOTrainer.__new__(ForkingGRPOTrainer), GRPOTrainer.__new__(GRPOTrainer)
    ours.accelerator = theirs.accelerator = accelerator
    for entropies, mask in _entropy_cases():
        expected = theirs.get_high_entropy_mask(entropies, mask, threshold)
        actual = ours.get_high_entropy_mask(entropies, mask, threshold)
        assert actual.dtype == torch.bool and torch.equal(actual, expected)


def test_instance_state_has_class_level_defaults():
    bare = ForkingGRPOTrainer.__new__(ForkingGRPOTrainer)
    assert bare.loss_forward is None and bare.router_updates is None and bare.forking_log is None
    assert bare.forking.rho == 0.2 and bare.moe.is_default() and bare.sparse_head is False
    assert bare.gradient_tokens == 0 and bare.rollouts.replay.source == "none"
    assert bare.rollout.mode == "iid" and bare.rollout_totals is None and not bare.rollouts.branches(training=True)


def test_overridden_public_methods_outside_the_loss_forward_match_trls(tiny_checkpoint, tmp_path):
    """Same inputs, same outputs as ``GRPOTrainer``: ``get_high_entropy_mask`` (with its threshold, as a
    boolean mask), ``create_optimizer`` (one TRL param-group layout with the default MoE settings),
    ``log`` (the record TRL writes), ``_get_per_token_logps_and_entropies`` (values, no selection)."""
    checkpoint = tiny_checkpoint()
    ours = make_trainer(checkpoint, tmp_path / "ours", forking=ForkingConfig(rho=0.2), moe=MoEConfig())
    theirs = make_trainer(checkpoint, tmp_path / "theirs", trainer_cls=GRPOTrainer)
    for entropies, mask in _entropy_cases():
        for threshold in (0.0, 0.3, 0.9):
            expected = GRPOTrainer.get_high_entropy_mask(theirs, entropies, mask, threshold)
            assert torch.equal(ours.get_high_entropy_mask(entropies, mask, threshold), expected)

    ours_groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in ours.create_optimizer().param_groups]
    theirs_groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in theirs.create_optimizer().param_groups]
    assert ours_groups == theirs_groups

    for trainer in (ours, theirs):
        trainer.state.global_step = 3
        trainer.log({"loss": 0.5, "learning_rate": 1e-4})
    assert ours.state.log_history[-1] == theirs.state.log_history[-1]

    batch = make_batch(theirs)  # TRL's batch (no rlvr keys)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P + C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits_to_keep = batch["completion_ids"].size(1)
    with torch.no_grad():
        expected = theirs._get_per_token_logps_and_entropies(
            theirs.model, input_ids, attention_mask, logits_to_keep, compute_entropy=True
        )
        actual = ours._get_per_token_logps_and_entropies(
            ours.model, input_ids, attention_mask, logits_to_keep, compute_entropy=True
        )
    assert input_ids.size(0) == ROWS
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(actual[1], expected[1], rtol=0, atol=0)
    assert ours.loss_forward is None  # no loss forward was started


# ---------------------------------------------------------------------------------------------------------
# TRL's own test idiom: the method called on Mock(spec=<trainer class>)


def _trl_style_mock(trainer_cls):
    """The trainer double of TRL's tests of ``get_high_entropy_mask`` (tests/test_grpo_trainer.py)."""
    from unittest.mock import Mock

    accelerator = Mock()
    accelerator.num_processes = 1
    trainer = Mock(spec=trainer_cls)
    trainer.accelerator = accelerator
    trainer.accelerator.gather = lambda x: x
    trainer.accelerator.pad_across_processes = lambda x, dim, pad_index: x
    return trainer


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 1.0])
def test_get_high_entropy_mask_on_a_mock_of_the_class_is_trls(threshold):
    for entropies, mask in _entropy_cases():  # padded, ties, one token and all-masked inputs among them
        expected = GRPOTrainer.get_high_entropy_mask(_trl_style_mock(GRPOTrainer), entropies, mask, threshold)
        actual = ForkingGRPOTrainer.get_high_entropy_mask(
            _trl_style_mock(ForkingGRPOTrainer), entropies, mask, threshold
        )
        assert isinstance(actual, torch.Tensor) and actual.dtype == torch.bool
        assert torch.equal(actual, expected)


def _outcome(trainer_cls, method: str, args: tuple):
    """What ``trainer_cls.method`` does to a TRL-style mock: how it ended and the calls it made on the mock."""
    from unittest.mock import Mock

    trainer = _trl_style_mock(trainer_cls)
    try:
        result = getattr(trainer_cls, method)(trainer, *args)
        ended = ("returned", "Mock" if isinstance(result, Mock) else type(result).__name__)
    except Exception as error:  # TRL's code on a mock may fail: ours must fail the same way
        ended = ("raised", type(error).__name__)
    return ended, [name for name, _, _ in trainer.mock_calls]


@pytest.mark.parametrize(
    "method, args",
    [
        ("log", ({"loss": 0.5},)),
        ("training_step", ("model", {"prompt_ids": torch.zeros(1, 1)})),
        ("create_optimizer", ()),
        ("_compute_loss", ("model", {"completion_mask": torch.ones(1, 2)})),
        ("_get_per_token_logps_and_entropies", ("model", torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), 2)),
        ("_generate_and_score_completions", ([{"prompt": "1+1="}],)),
        ("_generate_single_turn", ([[1, 2]], None, None, 2)),
        ("_calculate_rewards", ([{}], ["p"], ["c"], [[1]])),
        ("_save_checkpoint", ("model", None)),
    ],
)
def test_every_override_on_a_mock_of_the_class_does_what_trls_does(method, args):
    """Each override, called as TRL's tests call methods (on ``Mock(spec=cls)``), ends as TRL's method does on
    ``Mock(spec=GRPOTrainer)`` and makes the same calls on the mock: rlvr's state, which a Mock only fakes,
    is never taken for real."""
    assert getattr(ForkingGRPOTrainer, method) is not getattr(GRPOTrainer, method), f"{method} is not overridden"
    assert _outcome(ForkingGRPOTrainer, method, args) == _outcome(GRPOTrainer, method, args)
