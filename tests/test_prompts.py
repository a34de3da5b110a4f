"""Selective rollouts: groups without reward variance (against a float64 loop), the refill draws, batches built
from the kept rows of several generation calls, and DAPO's dynamic sampling inside ForkingGRPOTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from trl import GRPOTrainer

from rlvr.moe.replay import NOT_RECORDED
from rlvr.prompts import PromptsConfig
from rlvr.prompts.assembly import assemble_rows
from rlvr.prompts.groups import PromptDraws, informative_groups
from rlvr.rewards.text import completion_text
from rlvr.rollouts import GROUP_IDS_KEY
from rlvr.run.config import load_config
from rlvr.utils.options import ConfigError
from tests.test_trainer import GENERATIONS, ROWS, _dataset, make_trainer


def _reference_informative(rewards: list[float], group_size: int, tolerance: float) -> list[bool]:
    out = []
    for start in range(0, len(rewards), group_size):
        scored = [r for r in rewards[start : start + group_size] if not math.isnan(r)]
        if len(scored) < 2:
            out.append(False)
            continue
        mean = sum(scored) / len(scored)
        out.append(math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored)) > tolerance)
    return out


def test_informative_groups_match_a_float64_loop_on_random_ties_and_unscorable_rows():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        rewards = torch.randint(0, 3, (24,), generator=generator).float() / 2  # many ties: all-equal groups occur
        rewards[torch.rand(24, generator=generator) < 0.15] = float("nan")
        if trial == 0:
            rewards[:4] = float("nan")  # a group with nothing scorable
            rewards[4:8] = torch.tensor([1.0, float("nan"), float("nan"), float("nan")])  # one scorable row
        expected = _reference_informative(rewards.tolist(), 4, 1e-6)
        assert informative_groups(rewards, 4, 1e-6).tolist() == expected
    near = torch.tensor([0.5, 0.5 + 1e-9, 0.5, 0.5], dtype=torch.float64)  # below the tolerance: no variance
    assert informative_groups(near, 4, 1e-6).tolist() == [False]
    assert informative_groups(near, 4, 0.0).tolist() == [True]
    with pytest.raises(ValueError, match="whole groups of 4"):
        informative_groups(torch.zeros(6), 4)


def test_draws_never_repeat_a_prompt_within_a_generation_batch_or_across_ranks():
    """Refill and candidate draws: a function of seed and generation batch; nothing excluded (sampled this step),
    nothing twice (rows with the same prompt are one prompt), disjoint across ranks taking unequal numbers."""
    keys = [f"p{index % 40}" for index in range(50)]  # rows 40..49 repeat the prompts of rows 0..9
    excluded = {"p0", "p1", "p2"}

    def draws(rank, generation=5, world=3):
        return PromptDraws(50, keys.__getitem__, excluded, 1, generation, rank, world)

    taken = [draws(rank).take(count) for rank, count in zip(range(3), (4, 9, 6), strict=True)]
    prompts = [keys[index] for rank_taken in taken for index in rank_taken]
    assert len(prompts) == len(set(prompts)) == 19 and not set(prompts) & excluded
    again = draws(1)
    assert again.take(5) + again.take(4) == taken[1]  # in pieces or at once, after a resume: the same
    assert draws(1, generation=6).take(9) != taken[1]
    small = PromptDraws(6, lambda index: f"p{index}", set(), 0, 0, 0, 1)
    first_pass = small.take(6)
    assert sorted(first_pass) == list(range(6)) and small.repeated == 0
    assert len(small.take(3)) == 3 and small.repeated == 3  # used up: dealt again, and counted


def _batch(prompts: list[list[int]], completions: list[list[int]], layers: int = 1) -> dict:
    """A generation batch laid out as TRL lays it out: prompts left-padded, completions right-padded."""
    P, C = max(map(len, prompts)), max(map(len, completions))
    rows = len(prompts)
    prompt_ids = torch.zeros(rows, P, dtype=torch.long)
    prompt_mask = torch.zeros(rows, P, dtype=torch.long)
    completion_ids = torch.zeros(rows, C, dtype=torch.long)
    completion_mask = torch.zeros(rows, C, dtype=torch.long)
    routing = torch.full((rows, P + C, layers, 2), NOT_RECORDED, dtype=torch.int32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[row, P - len(prompt) :] = torch.tensor(prompt)
        prompt_mask[row, P - len(prompt) :] = 1
        completion_ids[row, : len(completion)] = torch.tensor(completion)
        completion_mask[row, : len(completion)] = 1
        routing[row, P - len(prompt) : P + len(completion)] = torch.tensor(prompt + completion).view(-1, 1, 1)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "old_per_token_logps": completion_ids.float() / 10,
        "advantages": torch.arange(rows, dtype=torch.float32),
        "routing": routing,
        "num_items_in_batch": completion_mask.sum(),
    }


def test_assembled_rows_keep_their_layout_across_generation_calls_of_different_widths():
    first = _batch([[5, 6], [7]], [[8, 9, 10], [11]])  # P = 2, C = 3
    second = _batch([[12, 13, 14], [15]], [[16], [17, 18, 19, 20, 21]])  # P = 3, C = 5
    out = assemble_rows(
        [first, second],
        [(1, 0), (0, 0), (1, 1)],
        pad_token_id=0,
        routing_key="routing",
        recomputed=("num_items_in_batch",),
    )
    assert "num_items_in_batch" not in out
    assert out["prompt_ids"].tolist() == [[12, 13, 14], [0, 5, 6], [0, 0, 15]]  # left-padded to P = 3
    assert out["prompt_mask"].tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert out["completion_ids"].tolist() == [[16, 0, 0, 0, 0], [8, 9, 10, 0, 0], [17, 18, 19, 20, 21]]
    assert out["completion_mask"].sum(1).tolist() == [1, 3, 5]
    torch.testing.assert_close(out["old_per_token_logps"], out["completion_ids"].float() / 10)
    assert out["advantages"].tolist() == [0.0, 0.0, 1.0]
    for row in range(3):  # the routing record follows its tokens: prompt on the left, completion on the right
        tokens = torch.cat([out["prompt_ids"][row], out["completion_ids"][row]])
        mask = torch.cat([out["prompt_mask"][row], out["completion_mask"][row]]).bool()
        record = out["routing"][row, :, 0, 0]
        assert record[mask].tolist() == tokens[mask].tolist()
        assert (record[~mask] == NOT_RECORDED).all()


def test_assembly_refuses_what_it_cannot_lay_out_naming_the_key():
    batch = _batch([[5]], [[6]])
    recomputed = ("num_items_in_batch",)
    with pytest.raises(ValueError, match="'pixel_values'"):
        assemble_rows([{**batch, "pixel_values": torch.zeros(1, 3)}], [(0, 0)], 0, "routing", recomputed)
    with pytest.raises(ValueError, match="keys"):
        assemble_rows([batch, {**batch, "tool_mask": batch["completion_mask"]}], [(0, 0)], 0, "routing", recomputed)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["prompts.max_draws=0"], "prompts.max_draws"),
        (["prompts.filter=sometimes"], "prompts.filter"),
        (["prompts.filter=skip", "prompts.predictor=oracle"], "prompts.predictor"),
        (["prompts.predictor=probe"], "prompts.predictor"),  # a predictor without skip
        (["prompts.filter=dynamic", "prompts.refill=false"], "prompts.refill"),
    ],
)
def test_prompts_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


# ---------------------------------------------------------------------------------------------------------
# Dynamic sampling in the trainer


def even_answers_always_right(completions, answer, **_):
    """Every completion of a prompt with an even answer scores 1 (a group without variance); the others score
    by the parity of their length (a group with variance, nearly always)."""
    return [
        1.0 if int(gold) % 2 == 0 else float(len(completion_text(c)) % 2)
        for c, gold in zip(completions, answer, strict=True)
    ]


def _rows(kinds: str) -> list[dict]:
    """Rows of TRL's generation batch: one group per letter, 'e' a prompt with an even answer, 'o' odd."""
    dataset = _dataset()
    even = [row for row in dataset if int(row["answer"]) % 2 == 0]
    odd = [row for row in dataset if int(row["answer"]) % 2 == 1]
    chosen = [(even if kind == "e" else odd)[index] for index, kind in enumerate(kinds)]
    return [row for row in chosen for _ in range(GENERATIONS)]


def _trainer(tiny_checkpoint, tmp_path, prompts: PromptsConfig):
    trainer = make_trainer(tiny_checkpoint(), tmp_path)
    trainer.reward_funcs = [even_answers_always_right]
    trainer.reward_func_names = ["even_answers_always_right"]
    trainer.prompts = prompts
    from rlvr.training import setup

    trainer.prompt_filter = setup.prompt_filter(trainer)
    return trainer


def test_dynamic_sampling_trains_only_groups_with_reward_variance(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path, PromptsConfig(filter="dynamic", max_draws=8))
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(_rows("eo"))  # the first group has no variance
    assert batch["completion_ids"].size(0) == ROWS and batch["prompt_ids"].size(0) == ROWS
    advantages = batch["advantages"].view(-1, GENERATIONS)
    assert (advantages.abs().sum(dim=1) > 0).all()  # every trained group carries a gradient
    assert batch[GROUP_IDS_KEY].tolist() == (torch.arange(ROWS) // GENERATIONS).tolist()
    assert int(batch["num_items_in_batch"]) == int(batch["completion_mask"].sum())
    mask = batch["prompt_mask"]
    assert torch.equal(mask, mask.cummax(dim=1).values)  # still left-padded: [0 .. 0 1 .. 1]
    logged = trainer._metrics["train"]
    calls = logged["prompts/generation_calls"][-1]
    assert calls >= 2 and logged["prompts/trained_zero_variance_share"][-1] == 0.0
    assert logged["prompts/drawn"][-1] == calls * ROWS / GENERATIONS
    assert logged["prompts/dropped"][-1] == logged["prompts/drawn"][-1] - ROWS / GENERATIONS
    # the step's decoded tokens are every call's, dropped groups included: more than the batch trains on
    decoded = logged["rollout/decoded_tokens"]
    assert len(decoded) == 1 and decoded[0] == logged["rollout/decoded_tokens_total"][-1]
    assert decoded[0] > int(batch["completion_mask"].sum())


def test_dynamic_sampling_out_of_draws_trains_what_there_is_and_says_so(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path, PromptsConfig(filter="dynamic", max_draws=1))
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(_rows("eo"))
    assert batch["completion_ids"].size(0) == ROWS
    logged = trainer._metrics["train"]
    assert logged["prompts/generation_calls"][-1] == 1 and logged["prompts/short_groups"][-1] == 1
    assert logged["prompts/trained_zero_variance_share"][-1] == 0.5
    assert logged["rollout/all_right_groups"][-1] == 0.5 and logged["rollout/all_wrong_groups"][-1] == 0.0
    # the group with variance comes first, then the zero-variance one that fills the batch
    advantages = batch["advantages"].view(-1, GENERATIONS)
    assert advantages[0].abs().sum() > 0 and advantages[1].abs().sum() == 0


def test_filter_none_is_trls_batch_unchanged(tiny_checkpoint, tmp_path):
    ours = _trainer(tiny_checkpoint, tmp_path / "ours", PromptsConfig(filter="none"))
    stock = make_trainer(tiny_checkpoint(), tmp_path / "stock", trainer_cls=GRPOTrainer)
    stock.reward_funcs, stock.reward_func_names = [even_answers_always_right], ["even_answers_always_right"]
    batches = []
    for trainer in (ours, stock):
        torch.manual_seed(0)
        batches.append(trainer._generate_and_score_completions(_rows("eo")))
    for key in ("prompt_ids", "completion_ids", "completion_mask", "advantages", "num_items_in_batch"):
        assert torch.equal(batches[0][key], batches[1][key]), key
    assert "prompts/generation_calls" not in ours._metrics["train"]


def test_prompt_filters_need_whole_groups_on_each_process(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint(), tmp_path)
    trainer.prompts = PromptsConfig(filter="dynamic")
    trainer.args.per_device_train_batch_size, trainer.args.steps_per_generation = 2, 1
    from rlvr.training import setup

    with pytest.raises(ValueError, match="multiple of num_generations"):
        setup.prompt_filter(trainer)


def test_a_training_set_smaller_than_one_batch_of_groups_is_refused_before_training(tiny_checkpoint, tmp_path):
    from rlvr.training import setup

    trainer = make_trainer(tiny_checkpoint(), tmp_path)
    trainer.prompts = PromptsConfig(filter="dynamic")
    trainer.train_dataset = trainer.train_dataset.select(range(1))  # one prompt; a batch holds two groups
    with pytest.raises(ValueError, match="training set has 1 prompts, fewer than the 2 groups"):
        setup.prompt_filter(trainer)


def test_a_group_no_reward_function_scored_stops_the_filter_naming_it(tiny_checkpoint, tmp_path):
    """Every reward function returned None for a whole group: neither informative nor not; the filter says so
    instead of dropping it silently."""
    trainer = _trainer(tiny_checkpoint, tmp_path, PromptsConfig(filter="dynamic"))

    def none_for_even_answers(completions, answer, **_):
        return [None if int(gold) % 2 == 0 else 1.0 for gold in answer]

    trainer.reward_funcs, trainer.reward_func_names = [none_for_even_answers], ["none_for_even_answers"]
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="returned None for all 4 completions of a group .group 1 of process 0"):
        trainer._generate_and_score_completions(_rows("oe"))


def test_a_batch_of_several_generation_calls_sums_its_counts_and_averages_its_shares():
    from rlvr.training.generation import merge_calls

    calls = [
        {"rollout/decoded_tokens": 100.0, "rollout/decoded_share": 1.0, "rollout/decoded_tokens_total": 100.0},
        {"rollout/decoded_tokens": 60.0, "rollout/decoded_share": 0.5, "rollout/decoded_tokens_total": 160.0},
    ]
    assert merge_calls(calls) == {
        "rollout/decoded_tokens": 160.0,
        "rollout/decoded_share": 0.75,
        "rollout/decoded_tokens_total": 160.0,
    }
    assert merge_calls(calls[:1]) == calls[0]


# ---------------------------------------------------------------------------------------------------------
# Skipping before sampling: GRESO's history rule


def test_skip_probability_follows_gresos_rule_and_resets_on_variance():
    from rlvr.prompts.history import FLOOR, PromptHistory

    history = PromptHistory(target_zero_variance=0.3, solved_reward=0.5)
    assert history.skip_probability("new") == 0.0  # nothing known: always sampled
    for times, expected in ((1, 0.5), (2, 0.75), (3, 0.875)):
        assert history.observe("easy", informative=False, reward=1.0) == "right"
        assert history.skip_probability("easy") == pytest.approx(expected)  # 1 - 0.5 ** z
    for _ in range(20):
        history.observe("easy", informative=False, reward=1.0)
    assert history.skip_probability("easy") == pytest.approx(1 - FLOOR)  # never certain: exploration floor
    assert history.observe("easy", informative=False, reward=0.0) == "wrong"  # the other way: a new run of 1
    assert history.skip_probability("easy") == pytest.approx(0.5)
    assert history.observe("easy", informative=True, reward=0.5) is None
    assert history.skip_probability("easy") == 0.0
    assert history.observe("nan", informative=False, reward=float("nan")) is None  # unscorable: no evidence


def test_exploration_moves_toward_gresos_targets_within_bounds():
    from rlvr.prompts.history import MAX_P, MIN_P, PromptHistory

    history = PromptHistory(target_zero_variance=0.3)  # targets: 0.1 all-right, 0.2 all-wrong
    history.adapt(right_share=0.1, wrong_share=0.1)
    assert history.explore == {"right": pytest.approx(0.49), "wrong": pytest.approx(0.51)}
    for _ in range(100):
        history.adapt(right_share=0.5, wrong_share=0.0)
    assert history.explore == {"right": pytest.approx(MIN_P), "wrong": pytest.approx(MAX_P)}


def test_history_state_round_trips_and_prompt_keys_are_stable():
    from rlvr.prompts.history import PromptHistory, prompt_key

    history = PromptHistory()
    history.observe("a", informative=False, reward=1.0)
    history.adapt(0.0, 1.0)
    restored = PromptHistory()
    restored.load_state_dict(history.state_dict())
    assert restored.state_dict() == history.state_dict()
    assert restored.skip_probability("a") == pytest.approx(1 - 0.51)  # p for all-right moved up: 0.5 -> 0.51
    chat = {"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}
    assert prompt_key(chat) == prompt_key({"prompt": [{"content": "1+1=", "role": "user"}], "answer": "3"})
    assert prompt_key({"prompt": "1+1="}) != prompt_key({"prompt": "1+2="})


def test_skip_replaces_a_prompt_predicted_to_give_no_variance_before_sampling(tiny_checkpoint, tmp_path):
    from rlvr.prompts.history import prompt_key

    trainer = _trainer(tiny_checkpoint, tmp_path, PromptsConfig(filter="skip", max_draws=8))
    history = trainer.prompt_filter.history
    rows = _rows("eo")
    for _ in range(30):  # the even-answer prompt was always right 30 times in a row: skipped with p = 0.99
        history.observe(prompt_key(rows[0]), informative=False, reward=1.0)
    sampled = []
    produce = trainer.prompt_filter.produce

    def spy(produce_call, rewards, inputs, step):
        def recording(call_rows):
            sampled.append({prompt_key(row) for row in call_rows})
            return produce_call(call_rows)

        return produce(recording, rewards, inputs, step)

    trainer.prompt_filter.produce = spy
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    assert prompt_key(rows[0]) not in sampled[0]  # skipped before any completion was decoded
    assert batch["completion_ids"].size(0) == ROWS
    logged = trainer._metrics["train"]
    assert logged["prompts/skipped"][-1] >= 1
    assert "prompts/explore_right" in logged and "prompts/explore_wrong" in logged
    assert logged["prompts/trained_zero_variance_share"][-1] == 0.0


def test_skip_without_refill_decodes_nothing_for_a_skipped_prompt(tiny_checkpoint, tmp_path):
    """refill=false: the skipped prompt is not replaced; its place holds rows without loss tokens, the sampled
    group is trained on as TRL would, and the decoded tokens are the sampled group's alone."""
    from rlvr.prompts.history import prompt_key

    settings = PromptsConfig(filter="skip", refill=False, max_draws=8)
    trainer = _trainer(tiny_checkpoint, tmp_path, settings)
    rows = _rows("oe")
    for _ in range(30):  # the even-answer prompt was always right 30 times in a row: skipped with p = 0.99
        trainer.prompt_filter.history.observe(prompt_key(rows[GENERATIONS]), informative=False, reward=1.0)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(rows)
    assert batch["completion_ids"].size(0) == ROWS  # the size TRL asked for
    empty = slice(GENERATIONS, ROWS)
    assert batch["completion_mask"][empty].sum() == 0 and (batch["advantages"][empty] == 0).all()
    assert batch["completion_mask"][:GENERATIONS].sum() > 0
    assert int(batch["num_items_in_batch"]) == int(batch["completion_mask"].sum())
    logged = trainer._metrics["train"]
    assert logged["prompts/generation_calls"][-1] == 1 and logged["prompts/drawn"][-1] == 1
    assert logged["prompts/skipped"][-1] == 1 and logged["prompts/empty_groups"][-1] == 1
    assert logged["prompts/dropped"][-1] == 0
    assert logged["rollout/decoded_tokens"][-1] == int(batch["completion_mask"][:GENERATIONS].sum())
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize(
    "rollout, moe",
    [
        ({"mode": "forking_tree", "branches": 1, "min_prefix": 1, "min_suffix": 1, "advantage": "treerl"}, {}),
        ({"engine": "copy", "dtype": "bfloat16"}, {"routing_replay": "rollout"}),
    ],
    ids=["forking_tree_treerl", "copy_engine_replay"],
)
def test_dynamic_sampling_with_trees_and_an_engine_keeps_every_key_aligned(tiny_checkpoint, tmp_path, rollout, moe):
    """TreeRL's (B, C) advantages, the engine's sampling log-probs and its routing record, assembled from several
    generation calls, still describe their own rows: the trained batch's loss runs and routing records cover
    exactly the real tokens."""
    from rlvr.rollouts import ROUTING_KEY, RolloutConfig
    from rlvr.run.config import MoEConfig
    from rlvr.training import setup

    trainer = make_trainer(tiny_checkpoint(), tmp_path, rollout=RolloutConfig(**rollout), moe=MoEConfig(**moe))
    trainer.reward_funcs, trainer.reward_func_names = [even_answers_always_right], ["even_answers_always_right"]
    trainer.prompts = PromptsConfig(filter="dynamic", max_draws=8)
    trainer.prompt_filter = setup.prompt_filter(trainer)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(_rows("eo"))
    assert trainer._metrics["train"]["prompts/generation_calls"][-1] >= 2
    completion_mask = batch["completion_mask"]
    if batch["advantages"].dim() == 2:  # TreeRL: nothing beyond a completion's end
        assert (batch["advantages"][completion_mask == 0] == 0).all()
    if ROUTING_KEY in batch:  # recorded exactly where prompt and completion tokens are (the last step excepted)
        mask = torch.cat([batch["prompt_mask"], completion_mask], dim=1).bool()
        recorded = batch[ROUTING_KEY][..., 0, 0] != NOT_RECORDED
        assert not (recorded & ~mask).any()
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss)
    loss.backward()


# ---------------------------------------------------------------------------------------------------------
# Skipping before sampling: the pass-rate probe


def test_zero_variance_probability_matches_the_binomial_ends():
    from rlvr.prompts.probe import zero_variance_probability

    pass_rates = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    for group_size in (1, 2, 8):
        expected = [math.comb(group_size, 0) * (1 - p) ** group_size + p**group_size for p in pass_rates.tolist()]
        torch.testing.assert_close(
            zero_variance_probability(pass_rates, group_size), torch.tensor(expected, dtype=torch.float64)
        )


def test_the_probe_learns_a_pass_rate_from_features_and_round_trips():
    from rlvr.prompts.probe import PassRateProbe

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(300, 8, generator=generator) * 5 + 3  # unstandardised, as hidden states are
    true_weight = torch.randn(8, generator=generator)
    pass_rates = torch.sigmoid(((features - 3) / 5) @ true_weight)
    probe = PassRateProbe(8, min_groups=16)
    probe.observe(features[:10], pass_rates[:10])
    assert probe.predict(features) is None  # too few groups seen
    probe.observe(features[10:200], pass_rates[10:200])
    predicted = probe.predict(features[200:])  # prompts it never saw
    assert (predicted - pass_rates[200:]).abs().mean() < 0.01  # measured: 0.001
    restored = PassRateProbe(8, min_groups=16)
    restored.load_state_dict(probe.state_dict())
    torch.testing.assert_close(restored.predict(features[200:]), predicted, rtol=0, atol=0)


def test_prompt_features_are_the_policys_view_of_each_prompt(tiny_checkpoint, tmp_path):
    from rlvr.training.setup import prompt_features

    trainer = make_trainer(tiny_checkpoint(), tmp_path)
    rows = _rows("eoe")[::GENERATIONS]  # three prompts
    features = prompt_features(trainer, rows + rows[:1])
    hidden = trainer.model.config.get_text_config().hidden_size
    assert features.shape == (4, hidden) and torch.isfinite(features).all()
    torch.testing.assert_close(features[3], features[0])  # the same prompt, padded differently in its batch
    assert not torch.allclose(features[0], features[1])


def test_skip_with_both_predictors_fits_the_probe_on_every_sampled_group(tiny_checkpoint, tmp_path):
    trainer = _trainer(tiny_checkpoint, tmp_path, PromptsConfig(filter="skip", predictor="both", max_draws=4))
    chooser = trainer.prompt_filter
    assert chooser.history is not None and chooser.probe is not None
    torch.manual_seed(0)
    for step in range(3):
        trainer.state.global_step = step
        trainer._generate_and_score_completions(_rows("eo"))
    drawn = sum(trainer._metrics["train"]["prompts/drawn"])
    assert len(chooser.probe.pass_rates) == drawn  # one observation per sampled group
    assert chooser.probe.features.shape == (drawn, trainer.model.config.get_text_config().hidden_size)
    assert ((chooser.probe.pass_rates >= 0) & (chooser.probe.pass_rates <= 1)).all()


@pytest.mark.parametrize("arm", ["dynamic", "skip_history", "skip_probe", "skip_both", "prune_both"])
def test_the_selective_arms_train_from_their_packaged_overlays(tmp_path, arm):
    from tests.test_cli import train_arm

    logged, output = train_arm(tmp_path, arm)
    assert "prompts/generation_calls" in logged and ("prompts/skipped" in logged) == (arm != "dynamic")
    assert f"filter: {'dynamic' if arm == 'dynamic' else 'skip'}" in (output / "config.yaml").read_text()


def test_settled_group_shares_match_a_loop_by_kind():
    """All-right / all-wrong shares of the groups without reward variance, against a plain loop; NaN rows (not
    scorable) are left out, a group with none scorable is neither."""
    from rlvr.rollouts.batch import settled_groups

    generator = torch.Generator().manual_seed(0)
    G = 4
    rewards = torch.randint(0, 2, (40 * G,), generator=generator).double()
    rewards[: 6 * G] = 1.0  # settled right
    rewards[6 * G : 9 * G] = 0.0  # settled wrong
    rewards[9 * G] = float("nan")  # a settled-right group with one unscorable row
    rewards[9 * G + 1 : 10 * G] = 1.0
    rewards[10 * G : 11 * G] = float("nan")  # nothing scorable
    rewards[11 * G : 12 * G] = 0.5  # settled at exactly the threshold: wrong (not above it)
    right = wrong = 0
    for group in rewards.view(-1, G).tolist():
        scored = [value for value in group if not math.isnan(value)]
        if scored and max(scored) == min(scored):
            right += scored[0] > 0.5
            wrong += scored[0] <= 0.5
    shares = settled_groups(rewards, G, solved_reward=0.5)
    assert shares == pytest.approx((right / 40, wrong / 40), abs=0)
    assert right >= 7 and wrong >= 4
    assert settled_groups(torch.tensor([1.0]), 1, 0.5) == (1.0, 0.0)  # one row: settled by itself


# --------------------------------------------------------------------------------------------------
# Under ZeRO-3 the probe's features are a forward, a collective: every rank must featurize as often.


def _count_featurize_calls(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank's skip choices over 30 (generation batch, call) pairs with a fitted probe whose skip probabilities
    are near 1/2, so the ranks' own skip draws need different numbers of candidate rounds; records featurize
    calls."""
    import os

    import torch.distributed as dist

    from rlvr.training.prompt_filter import PromptFilter
    from rlvr.utils.collectives import Collectives

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dataset = [{"prompt": f"prompt {index}", "index": index} for index in range(64)]
    calls = []

    def featurize(rows):
        calls[-1] += 1
        return torch.stack([torch.tensor([float(row["index"] % 8), float(row["index"] // 8)]) for row in rows])

    settings = PromptsConfig(filter="skip", predictor="probe", candidate_rounds=3)
    chooser = PromptFilter(settings, Collectives("cpu"), dataset, 4, 0, rank, world, 0, featurize, hidden_size=2)
    calls.append(0)
    fitted = torch.stack([torch.tensor([float(i % 8), float(i // 8)]) for i in range(64)])
    chooser.probe.observe(fitted, torch.full((64,), 0.16))  # p^4 + (1 - p)^4 ~ 1/2 for p = 0.16
    counts = []
    for generation in range(10):
        draws = PromptDraws(len(dataset), lambda index: f"prompt {index}", set(), 0, generation, rank, world)
        for call in range(3):
            calls[-1] = 0
            chooser._choose([dataset[index] for index in draws.take(4)], draws, generation, call)
            counts.append(calls[-1])
    torch.save(counts, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_every_rank_featurizes_candidates_as_often_with_the_probe(tmp_path):
    """Which candidates a rank skips is its own draw, so ranks need different numbers of candidate rounds; the
    probe's forward must still run as often on each (ZeRO-3 gathers parameters in every forward)."""
    import torch.multiprocessing as mp

    mp.spawn(_count_featurize_calls, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    assert max(first) > 1  # skipped candidates were replaced by further rounds
    assert first == second


def test_assembly_keeps_a_sequence_level_ratio_when_a_call_has_one_token_completions():
    """TRL's sequence-level importance-sampling ratio is (B, 1); a call whose completions are all one token wide
    has C = 1 too, and its ratio must not be taken for a per-token tensor and padded (it was: sizes mismatched)."""
    one_token = _batch([[5], [6]], [[7], [8]])  # C = 1
    wider = _batch([[9], [10]], [[11, 12, 13], [14]])  # C = 3
    for batch, ratios in ((one_token, [[0.5], [0.6]]), (wider, [[0.7], [0.8]])):
        batch["importance_sampling_ratio"] = torch.tensor(ratios)  # (B, 1)
    out = assemble_rows([one_token, wider], [(1, 0), (0, 1)], 0, "routing", ("num_items_in_batch",))
    assert out["importance_sampling_ratio"].tolist() == [[pytest.approx(0.7)], [pytest.approx(0.6)]]
    per_token = [_batch([[5]], [[7]]), _batch([[9]], [[11, 12, 13]])]  # (B, C) ratios stay per token
    for batch in per_token:
        batch["importance_sampling_ratio"] = batch["completion_mask"].float() * 0.5
    out = assemble_rows(per_token, [(0, 0), (1, 0)], 0, "routing", ("num_items_in_batch",))
    assert out["importance_sampling_ratio"].tolist() == [[0.5, 0.0, 0.0], [0.5, 0.5, 0.5]]


@pytest.mark.parametrize(
    "per_function, weights, sum_first, normalize_first",
    [
        ([[1, 0], [0, 2]], [1.0, 0.5], False, True),  # the weighted sum is constant, the normalised sum is not
        ([[1, 0], [0, 1]], [1.0, 1.0], False, False),  # the normalised rewards cancel exactly
        ([[1, 1], [0, 2]], [1.0, 1.0], True, True),
        ([[1, 1], [3, 3]], [1.0, 1.0], False, False),
    ],
)
def test_groups_vary_in_what_trls_advantage_compares(per_function, weights, sum_first, normalize_first):
    """Under normalize_then_sum TRL's advantage compares the weighted sum of each function's group-normalised
    rewards: a group whose weighted sum is constant can still carry a gradient there (it was dropped)."""
    from rlvr.rewards.aggregation import compared_rewards

    rewards = torch.tensor(per_function, dtype=torch.float32).T  # (G = 2, F = 2)
    weight = torch.tensor(weights)
    for aggregation, expected in (("sum_then_normalize", sum_first), ("normalize_then_sum", normalize_first)):
        compared = compared_rewards(rewards, weight, 2, aggregation)
        assert informative_groups(compared, 2).tolist() == [expected], aggregation


def _alternating(completions, **_):  # 1, 0, 1, 0, ...: every group of 4 varies
    return [float(index % 2 == 0) for index in range(len(completions))]


def _complement_doubled(completions, **_):  # 0, 2, 0, 2, ...: with weight 0.5 the weighted sum is always 1
    return [2.0 * (index % 2) for index in range(len(completions))]


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_dynamic_sampling_keeps_the_groups_trl_gives_an_advantage(tiny_checkpoint, tmp_path, aggregation):
    trainer = make_trainer(tiny_checkpoint(), tmp_path, multi_objective_aggregation=aggregation)
    trainer.reward_funcs = [_alternating, _complement_doubled]
    trainer.reward_func_names = ["alternating", "complement_doubled"]
    trainer.reward_processing_classes = [None, None]
    trainer.reward_weights = torch.tensor([1.0, 0.5])
    trainer.prompts = PromptsConfig(filter="dynamic", max_draws=1)
    from rlvr.training import setup

    trainer.prompt_filter = setup.prompt_filter(trainer)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions(_rows("eo"))
    has_advantage = (batch["advantages"].view(-1, GENERATIONS).abs().sum(dim=1) > 0).tolist()
    short = trainer._metrics["train"]["prompts/short_groups"][-1]
    assert has_advantage == [aggregation == "normalize_then_sum"] * 2
    assert short == (0 if aggregation == "normalize_then_sum" else 2)  # kept exactly the groups TRL trains


def test_the_docs_say_where_rlvr_parts_from_verl_and_greso():
    """verl raises once max_num_gen_batches calls are spent (it does not top up); GRESO skips and adapts only
    after the first epoch, rlvr from the first step. The module docs said otherwise, or nothing."""
    from rlvr.prompts import history
    from rlvr.training import prompt_filter

    assert "verl raises" in prompt_filter.__doc__ and "trains on what there is" in prompt_filter.__doc__
    assert "after the first epoch" in history.__doc__ and "from the first optimizer step" in history.__doc__
