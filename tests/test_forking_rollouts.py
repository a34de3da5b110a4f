"""Forking-tree rollouts inside ForkingGRPOTrainer: i.i.d. mode is TRL's sampling unchanged; tree batches
hold G leaves per prompt with TreeRL's advantages, train with routing replay and report their cost."""

from __future__ import annotations

import pytest
import torch
from trl import GRPOTrainer

from rlvr.rollouts import RolloutConfig
from rlvr.rollouts.branching import treerl_advantages
from rlvr.run.config import load_config
from rlvr.utils.options import ConfigError
from tests.test_trainer import GENERATIONS, ROWS, _dataset, make_trainer, odd_length_reward

TREE = RolloutConfig(mode="forking_tree", branches=1, min_prefix=1, min_suffix=1, advantage="treerl")


def _rows():
    dataset = _dataset()
    return [dataset[i] for i in range(ROWS // GENERATIONS) for _ in range(GENERATIONS)]


def _batch(trainer, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(_rows())


def _completions(batch) -> list[list[int]]:
    return [
        ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"], batch["completion_mask"], strict=True)
    ]


def test_iid_mode_samples_and_scores_exactly_as_trl(tiny_checkpoint, tmp_path):
    ours = make_trainer(tiny_checkpoint(), tmp_path / "ours")
    stock = make_trainer(tiny_checkpoint(), tmp_path / "stock", trainer_cls=GRPOTrainer)
    ours_batch, stock_batch = _batch(ours), _batch(stock)
    assert torch.equal(ours_batch["completion_ids"], stock_batch["completion_ids"])
    assert torch.equal(ours_batch["advantages"], stock_batch["advantages"])
    assert ours_batch["advantages"].dim() == 1
    logged = ours._metrics["train"]
    tokens = float(ours_batch["completion_mask"].sum())
    assert logged["rollout/decoded_tokens"] == [tokens] and logged["rollout/decoded_share"] == [1.0]
    assert "rollout/branches" not in logged


def test_tree_batch_has_g_leaves_per_prompt_and_treerl_advantages(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint(), tmp_path)
    trainer.rollouts = type(trainer.rollouts)(
        trainer.rollouts.replay, TREE, trainer.eos_token_ids, trainer._tokenizer.pad_token_id
    )
    batch = _batch(trainer)
    completions, layout = _completions(batch), trainer.rollouts.last_layout
    assert len(completions) == ROWS and layout.group_size == GENERATIONS
    for row, completion in enumerate(completions):
        root = completions[(row // GENERATIONS) * GENERATIONS + int(layout.origin[row])]
        p = int(layout.position[row])
        assert completion[:p] == root[:p]
    assert not layout.is_root().all()  # some leaves branched
    # TreeRL's advantages, from the rewards of the decoded leaves
    texts = trainer.processing_class.batch_decode(completions, skip_special_tokens=True)
    rewards = torch.tensor(odd_length_reward(texts))
    expected = treerl_advantages(rewards, layout, batch["completion_mask"].sum(1), batch["completion_ids"].size(1))
    assert batch["advantages"].shape == batch["completion_ids"].shape
    torch.testing.assert_close(batch["advantages"], expected.to(batch["advantages"].dtype))
    # TRL's completions table shows the advantages the loss used: each row's mean over its tokens
    row_means = expected.sum(1) / batch["completion_mask"].sum(1).clamp(min=1)
    assert list(trainer._logs["advantages"])[-ROWS:] == pytest.approx(row_means.tolist())
    logged = trainer._metrics["train"]
    decoded = logged["rollout/decoded_tokens"][0]
    assert decoded == sum(len(c) for c in completions) - int(layout.position.sum())  # shared prefixes once
    assert logged["rollout/decoded_share"][0] < 1.0 and logged["rollout/decoded_tokens_total"] == [decoded]
    assert 0.0 < logged["rollout/branch_relative_position"][0] < 1.0


def test_tree_training_with_routing_replay_and_accumulation_logs_its_cost(tiny_checkpoint, tmp_path):
    from rlvr.moe.config import MoEConfig

    trainer = make_trainer(
        tiny_checkpoint(),
        tmp_path,
        moe=MoEConfig(routing_replay="rollout"),
        per_device_train_batch_size=4,
        steps_per_generation=2,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    trainer.rollouts = type(trainer.rollouts)(
        trainer.rollouts.replay, TREE, trainer.eos_token_ids, trainer._tokenizer.pad_token_id
    )
    recorded = []
    produce = trainer.rollouts.produce_batch

    def spy(*args, **kwargs):
        batch, metrics = produce(*args, **kwargs)
        recorded.append(batch)
        return batch, metrics

    trainer.rollouts.produce_batch = spy
    trainer.train()
    assert recorded and all("rlvr_routing" in batch for batch in recorded)
    assert all(batch["advantages"].dim() == 2 for batch in recorded)
    logs = [record for record in trainer.state.log_history if "loss" in record]
    assert len(logs) == 2
    totals = [record["rollout/decoded_tokens_total"] for record in logs]
    assert 0 < totals[0] < totals[1]
    assert all(record["rollout/decoded_share"] < 1.0 for record in logs)


def test_tree_settings_the_trainer_cannot_run_fail_naming_the_setting(tiny_checkpoint, tmp_path):
    from rlvr.trainer import ForkingGRPOTrainer

    def build(rollout, **grpo):
        from trl import GRPOConfig

        from rlvr.models import load_pretrained

        model, tokenizer = load_pretrained(tiny_checkpoint(), "float32")
        settings = (
            dict(
                output_dir=str(tmp_path),
                per_device_train_batch_size=8,
                num_generations=4,
                use_cpu=True,
                report_to=[],
                max_completion_length=8,
            )
            | grpo
        )
        return ForkingGRPOTrainer(
            model=model,
            reward_funcs=odd_length_reward,
            args=GRPOConfig(**settings),
            train_dataset=_dataset(),
            processing_class=tokenizer,
            rollout=rollout,
        )

    with pytest.raises(ValueError, match="rollout.branches"):
        build(RolloutConfig(mode="forking_tree", branches=2))
    with pytest.raises(ValueError, match="rollout.advantage: treerl .* loss_type=vespo"):
        build(TREE, loss_type="vespo")
    with pytest.raises(ValueError, match="rollout.engine: copy .* VESPO"):
        build(RolloutConfig(engine="copy"), loss_type="vespo")
    build(RolloutConfig(engine="copy"), loss_type="vespo", vllm_importance_sampling_mode="token_mask")
    trainer = build(TREE)
    # one process: TRL's own generation-batch check already asks for whole groups; with several processes
    # each rank's share must hold whole groups too (2 ranks x 2 rows of a group of 4 would split a tree)
    trainer.args.per_device_train_batch_size, trainer.args.steps_per_generation = 2, 1
    with pytest.raises(ValueError, match="multiple of num_generations"):
        trainer._check_rollout()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rollout.mode=forking_tree", "rollout.branches=2", "grpo.num_generations=4"], "rollout.branches"),
        (["rollout.advantage=treerl"], "rollout.advantage"),
        (["rollout.mode=forking_tree", "grpo.use_vllm=true"], "rollout.mode"),
        (["rollout.branches=0"], "rollout.branches"),
        # TreeRL's per-token advantages, where TRL reads one per sequence
        (["rollout.mode=forking_tree", "rollout.advantage=treerl", "grpo.loss_type=vespo"], "rollout.advantage"),
        (
            ["rollout.mode=forking_tree", "rollout.advantage=treerl", "grpo.off_policy_mask_threshold=0.5"],
            "rollout.advantage",
        ),
        # TRL's own VESPO rule for vLLM, which it checks before the copy engine switches use_vllm on
        (["rollout.engine=copy", "grpo.loss_type=vespo"], "rollout.engine"),
    ],
)
def test_rollout_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("arm", ["forking", "random", "bottom", "forking_router", "hybrid"])
def test_every_arm_trains_on_forking_trees(tiny_checkpoint, tmp_path, arm):
    """The packaged arm overlays (selection, controls, router-aware gates) with forking-tree rollouts and
    TreeRL's (B, T) advantages: a training step runs and the arm's share of gradient tokens holds."""
    from rlvr.run.config import load_config
    from rlvr.utils.packaged import arm_path

    config = load_config([arm_path(arm)])
    trainer = make_trainer(tiny_checkpoint(), tmp_path, forking=config.forking, moe=config.moe, max_steps=1)
    trainer.rollouts = type(trainer.rollouts)(
        trainer.rollouts.replay, TREE, trainer.eos_token_ids, trainer._tokenizer.pad_token_id
    )
    trainer.train()
    (logged,) = [record for record in trainer.state.log_history if "loss" in record]
    assert logged["rollout/decoded_share"] < 1.0 and logged["grad_norm"] > 0
    share = trainer.gradient_tokens / (logged["completions/mean_length"] * ROWS)  # of this step's completion tokens
    expected = {"forking": 0.2, "random": 0.2, "bottom": 0.8, "forking_router": 0.2, "hybrid": 1.0}[arm]
    assert share == pytest.approx(expected, abs=0.03)
    assert logged["forking/kept_fraction"] == pytest.approx(0.2 if arm != "bottom" else 0.8, abs=0.05)
