"""The prompt filter over whole training runs: no prompt drawn twice in an optimizer step, GRESO's adaptation
once per optimizer step, the per-prompt record (prompts.jsonl), and its state resumed from any checkpoint path."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rlvr.data import ArithmeticTask, generate_problems, problems_to_dataset
from rlvr.models import load_pretrained
from rlvr.prompts import PromptsConfig
from rlvr.prompts.history import prompt_key
from rlvr.prompts.record import PromptRecord
from rlvr.trainer import ForkingGRPOTrainer
from tests.test_prompts import even_answers_always_right

GENERATIONS = 4


def _filtered_trainer(checkpoint, output_dir, prompts: PromptsConfig, **grpo) -> ForkingGRPOTrainer:
    model, tokenizer = load_pretrained(checkpoint, "float32")
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2 * GENERATIONS,  # 2 prompts per generation batch
        num_generations=GENERATIONS,
        max_completion_length=8,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        max_steps=2,
        beta=0.0,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
        router_aux_loss_coef=0.0,
    )
    return ForkingGRPOTrainer(
        model=model,
        reward_funcs=even_answers_always_right,
        args=GRPOConfig(**(settings | grpo)),
        train_dataset=problems_to_dataset(generate_problems(ArithmeticTask(), "train", 40, seed=0)),
        processing_class=tokenizer,
        prompts=prompts,
    )


def _record_sampled_prompts(monkeypatch) -> list[tuple[int, list[str]]]:
    """Every generation call TRL makes, as (optimizer step, the prompt keys of its groups)."""
    calls = []
    trl_produce = GRPOTrainer._generate_and_score_completions

    def recorded(self, inputs):
        keys = [prompt_key(row) for row in inputs[:: self.num_generations]]
        calls.append((self.state.global_step, keys))
        return trl_produce(self, inputs)

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", recorded)
    return calls


def test_several_generation_batches_per_step_never_sample_a_prompt_twice_and_adapt_once(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """steps_per_generation=1 with 3 accumulation steps: three generation batches per optimizer step. Their
    refill and candidate draws were keyed by the step alone (the same draws three times), and GRESO's
    exploration moved once per generation batch."""
    calls = _record_sampled_prompts(monkeypatch)
    settings = PromptsConfig(filter="skip", max_draws=2, candidate_rounds=1)
    trainer = _filtered_trainer(
        tiny_checkpoint(), tmp_path, settings, gradient_accumulation_steps=3, steps_per_generation=1
    )
    trainer.train()
    by_step: dict[int, list[str]] = {}
    for step, keys in calls:
        by_step.setdefault(step, []).extend(keys)
    assert sorted(by_step) == [0, 1] and len(calls) >= 6
    for step, keys in by_step.items():
        assert len(keys) == len(set(keys)), f"step {step} sampled a prompt twice: {keys}"
    explore = trainer.prompt_filter.history.explore
    assert all(abs(value - 0.5) <= 0.02 + 1e-9 for value in explore.values()), explore  # two steps, two moves
    logged = [record for record in trainer.state.log_history if "prompts/repeated_draws" in record]
    assert logged and all(record["prompts/repeated_draws"] == 0 for record in logged)


def test_the_per_prompt_record_counts_what_the_metrics_count(tiny_checkpoint, tmp_path):
    settings = PromptsConfig(filter="skip", max_draws=3, candidate_rounds=2)
    trainer = _filtered_trainer(tiny_checkpoint(), tmp_path, settings, max_steps=3)
    metrics = []

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "prompts/drawn" in (logs or {}):
                metrics.append(logs)

    trainer.add_callback(Metrics())
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == len({row["prompt_id"] for row in rows})
    assert sum(row["sampled"] for row in rows) == sum(logs["prompts/drawn"] for logs in metrics)
    assert sum(row["skipped"] for row in rows) == sum(logs["prompts/skipped"] for logs in metrics)
    assert sum(row["dropped"] for row in rows) == sum(logs["prompts/dropped"] for logs in metrics)
    for row in (row for row in rows if row["sampled"]):
        assert 0.0 <= row["pass_rate"] <= 1.0 and row["zero_variance"] <= row["sampled"]
        assert row["dropped"] <= row["zero_variance"] and row["preview"]
    always_right = [row for row in rows if row["sampled"] and row["pass_rate"] == 1.0]
    assert always_right and all(row["zero_variance"] == row["sampled"] for row in always_right)
    history = trainer.prompt_filter.history.streaks
    for row in rows:
        assert row["zero_variance_streak"] == history.get(row["prompt_id"], [None, 0])


def test_prompt_state_resumes_from_a_checkpoint_outside_the_output_directory(tiny_checkpoint, tmp_path):
    settings = PromptsConfig(filter="skip", max_draws=2)
    first = _filtered_trainer(
        tiny_checkpoint(), tmp_path / "first", settings, max_steps=2, save_strategy="steps", save_steps=2
    )
    first.train()
    moved = tmp_path / "elsewhere" / "kept"
    shutil.copytree(tmp_path / "first" / "checkpoint-2", moved)
    assert (moved / "prompts.jsonl").exists()
    saved = first.prompt_filter
    second = _filtered_trainer(tiny_checkpoint(), tmp_path / "second", settings, max_steps=3)
    seen = {}

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            chooser = second.prompt_filter
            seen.update(generations=chooser.generations, streaks=dict(chooser.history.streaks))
            seen.update(explore=dict(chooser.history.explore), record=chooser.record.state_dict())

    second.add_callback(AtTrainBegin())
    second.train(resume_from_checkpoint=str(moved))
    assert seen["generations"] == saved.generations > 0
    assert seen["streaks"] == saved.history.streaks and seen["explore"] == saved.history.explore
    assert seen["record"] == saved.record.state_dict()


def test_record_rows_and_state_round_trip(tmp_path):
    record = PromptRecord()
    record.observe_call([("a", "What is 1+1?"), ("b", "2+2")], [1.0, 0.5], [False, True], [("c", "3+3", 0.9, True)])
    record.observe_call([("a", "What is 1+1?")], [1.0], [False], [("a", "", 0.7, False), ("c", "", 0.95, True)])
    record.observe_dropped(["a"])
    rows = {row["prompt_id"]: row for row in record.rows({"a": ["right", 2]})}
    assert rows["a"] == {
        "prompt_id": "a",
        "preview": "What is 1+1?",
        "sampled": 2,
        "skipped": 0,
        "zero_variance": 2,
        "dropped": 1,
        "skip_probability": 0.7,
        "pass_rate": 1.0,
        "zero_variance_streak": ["right", 2],
    }
    assert rows["c"]["sampled"] == 0 and rows["c"]["skipped"] == 2 and rows["c"]["pass_rate"] is None
    assert rows["b"]["zero_variance_streak"] == [None, 0]
    copy = PromptRecord()
    copy.load_state_dict(json.loads(json.dumps(record.state_dict())))
    assert copy.rows() == record.rows()
    record.write(str(tmp_path))
    assert [json.loads(line)["prompt_id"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()] == [
        "a",
        "b",
        "c",
    ]


@pytest.mark.parametrize("missing", ["rlvr_prompt_filter.json"])
def test_a_checkpoint_without_the_prompt_state_says_so(tiny_checkpoint, tmp_path, caplog, missing):
    trainer = _filtered_trainer(tiny_checkpoint(), tmp_path, PromptsConfig(filter="skip"))
    from rlvr.training.callbacks import load_checkpointed_state

    checkpoint = tmp_path / "bare"
    checkpoint.mkdir()
    with caplog.at_level("WARNING"):
        load_checkpointed_state(trainer, str(checkpoint))
    assert f"no {missing}" in caplog.text and "starts afresh" in caplog.text
