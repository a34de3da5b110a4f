"""The embedded task and the dataset loader."""

import json

import pytest
from datasets import Dataset, DatasetDict

from rlvr.data import (
    ArithmeticTask,
    DataConfig,
    DataError,
    generate_problems,
    make_prompt,
    problems_to_dataset,
    read_source,
    to_prompt_answer,
)
from rlvr.data.arithmetic import split_of
from rlvr.data.splits import load_train_eval
from rlvr.run.directory import RunResult, summary_table
from rlvr.run.evaluation import EvalResult


def _evaluate(expression: str) -> int:
    # Expressions hold only digits, '+' and '-': Python evaluates them left to right like the task.
    assert set(expression) <= set("0123456789+-")
    return eval(expression)  # noqa: S307


def test_generation_is_deterministic_and_seeded():
    task = ArithmeticTask()
    first = generate_problems(task, "train", 50, seed=3)
    again = generate_problems(task, "train", 50, seed=3)
    other = generate_problems(task, "train", 50, seed=4)
    assert first == again
    assert [p.expression for p in first] != [p.expression for p in other]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_eval_never_overlap(seed):
    task = ArithmeticTask(max_operand=30, eval_fraction=0.2)
    train = {p.expression for p in generate_problems(task, "train", 2000, seed)}
    evals = {p.expression for p in generate_problems(task, "eval", 300, seed + 1)}
    assert len(train) == 2000 and len(evals) == 300
    assert not train & evals
    assert all(split_of(e, 0.2) == "eval" for e in evals)


def test_solutions_are_correct_step_by_step():
    task = ArithmeticTask(min_terms=2, max_terms=4, max_operand=99)
    for problem in generate_problems(task, "train", 200, seed=0):
        assert problem.question == f"Compute: {problem.expression}"
        assert int(problem.answer) == _evaluate(problem.expression)
        *steps, boxed = problem.solution.split("\n")
        assert boxed == f"\\boxed{{{problem.answer}}}"
        assert len(steps) == problem.expression.count("+") + problem.expression.count("-")
        for step in steps:
            left, right = step.split("=")
            assert _evaluate(left) == int(right)


def test_too_many_problems_for_the_space_fails_clearly():
    with pytest.raises(ValueError, match="distinct eval problems"):
        generate_problems(ArithmeticTask(max_operand=3, max_terms=2, operators="+"), "eval", 50, seed=0)


def test_dataset_rows_have_prompt_answer_and_optional_solution():
    problems = generate_problems(ArithmeticTask(), "train", 4, seed=0)
    rows = problems_to_dataset(problems, system_prompt="Be brief.", with_solutions=True)
    assert rows.column_names == ["prompt", "answer", "domain", "completion"]
    assert rows[0]["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": problems[0].question},
    ]
    assert rows[0]["completion"] == [{"role": "assistant", "content": problems[0].solution}]
    assert make_prompt("Q", chat=False) == "Q"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GSM8K_ROWS = [
    {
        "question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
        "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72",
    },
    {"question": "A farm has 1,200 hens and buys 300 more. How many hens?", "answer": "1200+300=1500\n#### 1,500"},
]


def test_gsm8k_layout_jsonl_is_mapped_to_prompt_answer(tmp_path):
    source = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    mapped = to_prompt_answer(read_source(source, "train"), answer_format="gsm8k")
    assert mapped["answer"] == ["72", "1500"]
    assert mapped[0]["prompt"] == [{"role": "user", "content": GSM8K_ROWS[0]["question"]}]


def test_custom_columns_and_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    Dataset.from_dict({"problem": ["1+1?", "2+2?"], "solution": ["2", "4"]}).to_parquet(str(path))
    mapped = to_prompt_answer(read_source(str(path), "train"), "problem", "solution", chat=False)
    assert mapped["prompt"] == ["1+1?", "2+2?"] and mapped["answer"] == ["2", "4"]


def test_bad_rows_are_named_by_row_and_column(tmp_path):
    rows = GSM8K_ROWS + [
        {"question": "", "answer": "#### 3"},
        {"question": "What is 2+2?", "answer": "four, no marker"},
        {"question": "No answer", "answer": None},
    ]
    source = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        to_prompt_answer(read_source(source, "train"), answer_format="gsm8k", source_name="bad.jsonl")
    message = str(error.value)
    assert "3 bad row(s) of 5" in message
    assert "row 2, column 'question': empty question" in message
    assert "row 3, column 'answer': has no '####' marker" in message
    assert "row 4, column 'answer': empty answer" in message


def test_missing_column_lists_the_available_ones(tmp_path):
    source = _write_jsonl(tmp_path / "x.jsonl", [{"problem": "1+1", "solution": "2"}])
    with pytest.raises(DataError, match=r"data.question_column='question' is not a column.*problem"):
        to_prompt_answer(read_source(source, "train"))


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_source(str(tmp_path / "missing.jsonl"), "train")
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        read_source(str(odd), "train")


def _numbered_rows(count):
    return [{"question": f"What is {index} + 1?", "answer": str(index + 1)} for index in range(count)]


def test_a_file_holds_out_seeded_rows_for_evaluation(tmp_path):
    """A file has no 'test' split: the default eval_split holds out data.eval_fraction of its rows (seeded),
    disjoint from the training rows and the same whatever num_train is (issue: it evaluated on the training rows)."""
    source = _write_jsonl(tmp_path / "own.jsonl", _numbered_rows(40))
    rows = load_train_eval(DataConfig(source=source, num_train=0), seed=3)
    record = rows.record()
    assert (record["train_rows"], record["eval_rows"], record["eval_prompts_also_trained"]) == (36, 4, 0)
    assert not record["eval_on_training_rows"] and "held out" in record["eval_from"]
    assert not set(rows.eval["answer"]) & set(rows.train["answer"])
    fewer = load_train_eval(DataConfig(source=source, num_train=5, num_eval=2), seed=3)
    assert list(fewer.eval["answer"]) == list(rows.eval["answer"])[:2]
    assert list(fewer.train["answer"]) == list(rows.train["answer"])[:5]
    other_seed = load_train_eval(DataConfig(source=source, num_train=0), seed=4)
    assert list(other_seed.eval["answer"]) != list(rows.eval["answer"])


def test_evaluation_on_training_rows_only_when_asked_and_then_said(tmp_path, caplog):
    source = _write_jsonl(tmp_path / "own.jsonl", _numbered_rows(6))
    with pytest.raises(DataError, match=r"has no splits.*data.eval_fraction > 0.*data.eval_source.*eval_split=train"):
        load_train_eval(DataConfig(source=source, eval_fraction=0.0), seed=0)
    with caplog.at_level("WARNING"):
        rows = load_train_eval(DataConfig(source=source, eval_split="train"), seed=0)
    assert "rows the policy trains on" in caplog.text
    record = rows.record()
    assert record["eval_on_training_rows"] and record["eval_prompts_also_trained"] == record["eval_rows"] == 6
    result = RunResult(tmp_path, None, None, None, 0.0, 0, data_rows=record)
    result.before = result.after = EvalResult(0.5, 0.5, 6, 4, 10.0)
    assert "WARNING: 6 of the 6 evaluation prompts are also training prompts" in summary_table(result)


def test_a_separate_eval_source_and_a_saved_split(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _numbered_rows(5))
    held = _write_jsonl(tmp_path / "held.jsonl", _numbered_rows(8)[5:])
    rows = load_train_eval(DataConfig(source=train, eval_source=held), seed=0)
    assert list(rows.eval["answer"]) == ["6", "7", "8"] and len(rows.train) == 5
    assert rows.record()["eval_from"] == f"data.eval_source {held}"
    saved = tmp_path / "saved"
    DatasetDict(
        {"train": Dataset.from_list(_numbered_rows(4)), "test": Dataset.from_list(_numbered_rows(7)[4:])}
    ).save_to_disk(str(saved))
    rows = load_train_eval(DataConfig(source=str(saved)), seed=0)
    assert list(rows.eval["answer"]) == ["5", "6", "7"] and rows.record()["eval_from"].endswith("[test]")
    too_few = _write_jsonl(tmp_path / "one.jsonl", _numbered_rows(1))
    with pytest.raises(DataError, match="leaves none to train on"):
        load_train_eval(DataConfig(source=too_few), seed=0)
