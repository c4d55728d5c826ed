"""`task: dataset`: the user's rows from JSONL, Parquet, CSV or a save_to_disk folder, checked and scored."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from paretoray.actors.tasks import TaskInputError, available_tasks, build_task
from paretoray.actors.tasks import dataset as ds
from tests.tiny import make_tiny_tokenizer

ROWS = [
    {
        "context": "There is an important info hidden inside a lot of irrelevant text. The pass key is 12345. ",
        "question": "What is the pass key?",
        "answer_prefix": " The pass key is",
        "answer": ["12345"],
        "max_new_tokens": 6,
    },
    {
        "context": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",
        "question": "What color is the sky?",
        "answer_prefix": "",
        "answer": ["blue", "light blue"],
        "max_new_tokens": None,
    },
    {
        "context": "One of the special magic numbers for apple is: 7654321. ",
        "question": "What is the special magic number for apple?",
        "answer_prefix": " It is",
        "answer": ["7654321"],
        "max_new_tokens": 12,
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            cells = dict(row)
            if isinstance(cells.get("answer"), list):
                cells["answer"] = json.dumps(cells["answer"])
            if "max_new_tokens" in cells and cells["max_new_tokens"] is None:
                cells["max_new_tokens"] = ""
            writer.writerow(cells)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pl.DataFrame(rows).write_parquet(path)
    return path


def write_saved(path: Path, rows: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "saved": write_saved}


def task(path: Path | str, **settings):
    return build_task("dataset", {"path": str(path), **settings})


def problems(path: Path | str, **settings) -> list[tuple[str, str]]:
    return task(path, **settings).check()


def one_problem(path: Path | str, **settings) -> tuple[str, str]:
    found = problems(path, **settings)
    assert found, "expected a problem"
    return found[0]


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


# -- formats and schema ------------------------------------------------------------------------


def test_registered_with_its_declarations():
    cls = available_tasks()["dataset"]
    assert cls.default_max_new_tokens == 32 and cls.summary
    config = task("x.jsonl").config
    assert (config.columns, config.metric, config.samples, config.truncate) == ({}, "contains", None, "none")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved"])
def test_every_format_gives_the_same_samples(tmp_path, tok, fmt):
    reference = task(write_jsonl(tmp_path / "rows.jsonl", ROWS)).build(tok, seed=0)
    path = WRITERS[fmt](tmp_path / f"rows.{fmt}" if fmt != "saved" else tmp_path / "saved", ROWS)
    assert problems(path) == []
    assert task(path).build(tok, seed=0) == reference


def test_saved_folder_without_datasets_reads_the_arrow_files(tmp_path, tok, monkeypatch):
    path = write_saved(tmp_path / "saved", ROWS)
    reference = task(path).build(tok, seed=0)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    assert problems(path) == []
    assert task(path).build(tok, seed=0) == reference


def test_sample_fields(tmp_path, tok):
    samples = task(write_jsonl(tmp_path / "rows.jsonl", ROWS)).build(tok, seed=0)
    assert [s.sample_id for s in samples] == ["dataset/r0", "dataset/r1", "dataset/r2"]
    for row, sample in zip(ROWS, samples):
        context_ids = tok(row["context"], add_special_tokens=True).input_ids
        question_ids = tok(row["question"] + row["answer_prefix"], add_special_tokens=False).input_ids
        assert context_ids[0] == tok.bos_token_id
        assert sample.prompt_ids == context_ids + question_ids
        assert sample.question_ids == tuple(question_ids) and sample.context_ids == context_ids
        assert sample.prompt == row["context"] + row["question"] + row["answer_prefix"]
        assert sample.context_length == len(sample.prompt_ids)
        assert sample.answer == row["answer"][0] and sample.answers == tuple(row["answer"])
        assert sample.max_new_tokens == row["max_new_tokens"]
        assert sample.task == "dataset"


def test_optional_columns_and_answer_as_string_or_list(tmp_path, tok):
    rows = [{"context": "abc ", "answer": "x"}, {"context": "def ", "question": None, "answer": ["y", "z"]}]
    samples = task(write_jsonl(tmp_path / "rows.jsonl", rows)).build(tok, seed=0)
    assert [s.answers for s in samples] == [("x",), ("y", "z")]
    assert [s.answer for s in samples] == ["x", "y"]
    assert all(s.question_ids == () and s.max_new_tokens is None for s in samples)
    assert samples[0].prompt_ids == tok("abc ").input_ids


def test_column_remapping(tmp_path, tok):
    renamed = [{"doc": r["context"], "q": r["question"], "answer_prefix": r["answer_prefix"], "gold": r["answer"],
                "max_new_tokens": r["max_new_tokens"]} for r in ROWS]
    path = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    columns = {"context": "doc", "question": "q", "answer": "gold"}
    assert problems(path, columns=columns) == []
    reference = task(write_jsonl(tmp_path / "rows.jsonl", ROWS)).build(tok, seed=0)
    assert task(path, columns=columns).build(tok, seed=0) == reference
    # The same remap on Parquet, and a problem naming the file's column and the schema's.
    parquet = write_parquet(tmp_path / "renamed.parquet", [dict(r, doc=1) for r in renamed])
    field, message = one_problem(parquet, columns=columns)
    assert "renamed.parquet row 0" in message and "column 'doc' (context)" in message and "must be a string" in message


def test_config_errors_come_from_pydantic():
    for settings in ({"metric": "bleu"}, {"truncate": "right"}, {"columns": {"contxt": "doc"}}, {"samples": 0},
                     {"samples": "3"}, {"unknown": 1}, {"columns": {"context": ""}}):
        with pytest.raises(ValidationError):
            task("x.jsonl", **settings)
    with pytest.raises(ValidationError):
        build_task("dataset", {})


# -- problems, before Ray starts -----------------------------------------------------------------


def test_file_level_problems(tmp_path, monkeypatch):
    field, message = one_problem(tmp_path / "nope.jsonl")
    assert field == "path" and "nope.jsonl" in message and "no such file" in message

    (tmp_path / "data.txt").write_text("hello")
    field, message = one_problem(tmp_path / "data.txt")
    assert "data.txt" in message and "unknown format '.txt'" in message and ".jsonl, .parquet, .csv" in message

    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.csv", b""), ("header.csv", b"context,answer\n")):
        (tmp_path / name).write_bytes(content)
        field, message = one_problem(tmp_path / name)
        assert field == "path" and name in message and "no rows" in message, message
    write_parquet(tmp_path / "empty.parquet", ROWS)
    pl.read_parquet(tmp_path / "empty.parquet").head(0).write_parquet(tmp_path / "empty.parquet")
    assert "no rows" in one_problem(tmp_path / "empty.parquet")[1]

    (tmp_path / "folder").mkdir()
    assert "not one written by datasets' save_to_disk" in one_problem(tmp_path / "folder")[1]

    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    assert "broken.parquet: cannot be read as Parquet" in one_problem(tmp_path / "broken.parquet")[1]

    path = write_jsonl(tmp_path / "big.jsonl", ROWS)
    monkeypatch.setattr(ds, "MAX_BYTES", 100)
    field, message = one_problem(path)
    assert "big.jsonl" in message and "over the" in message and "limit" in message


def test_dataset_dict_folder_names_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    message = one_problem(tmp_path / "dd")[1]
    assert "DatasetDict" in message and "dd/test" in message
    assert problems(tmp_path / "dd" / "test") == []


def test_non_utf8_names_line_and_offset(tmp_path):
    good = json.dumps(ROWS[0]).encode() + b"\n"
    (tmp_path / "bad.jsonl").write_bytes(good + b'{"context": "caf\xe9", "answer": "x"}\n')
    field, message = one_problem(tmp_path / "bad.jsonl")
    assert "bad.jsonl line 2" in message and "not UTF-8" in message and f"byte offset {len(good) + 16}" in message

    (tmp_path / "bad.csv").write_bytes(b"context,answer\nabc,x\ncaf\xe9,y\n")
    field, message = one_problem(tmp_path / "bad.csv")
    assert "bad.csv line 3" in message and "not UTF-8" in message and "byte offset 24" in message


def test_malformed_json_lines(tmp_path):
    lines = [json.dumps(ROWS[0]), '{"context": "a", "answer": ', "[1, 2]", json.dumps(ROWS[1])]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    found = problems(tmp_path / "m.jsonl")
    assert len(found) == 2
    assert "m.jsonl line 2: not valid JSON" in found[0][1]
    assert "m.jsonl line 3: a list, expected a JSON object" in found[1][1]


def test_missing_required_column_lists_columns_and_remapping(tmp_path):
    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"doc": "a", "gold": "x"}])
    found = problems(path)
    assert {f for f, _ in found} == {"path"}
    messages = " ".join(m for _, m in found)
    assert "noanswer.jsonl: no column 'context' (required)" in messages
    assert "no column 'answer' (required)" in messages
    assert "its columns are: doc, gold" in messages and "columns:" in messages
    # The same in CSV and Parquet.
    for path in (write_csv(tmp_path / "noanswer.csv", [{"context": "a", "gold": "x"}]),
                 write_parquet(tmp_path / "noanswer.parquet", [{"context": "a", "gold": "x"}])):
        field, message = one_problem(path)
        assert path.name in message and "no column 'answer'" in message and "context, gold" in message and "columns:" in message
    # A row (not the file) lacking it.
    path = write_jsonl(tmp_path / "onemissing.jsonl", [ROWS[0], {"context": "a"}])
    field, message = one_problem(path)
    assert "onemissing.jsonl row 1 (line 2), column 'answer': missing" in message


def test_remap_to_a_column_that_does_not_exist(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    field, message = one_problem(path, columns={"context": "doc"})
    assert field == "columns.context"
    assert "rows.jsonl: no column 'doc' (mapped to context)" in message and "its columns are: context, question" in message


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"context": 42, "answer": "x"}, "column 'context': must be a string, got a number (42)"),
        ({"context": None, "answer": "x"}, "column 'context': must be a string, got nothing"),
        ({"context": "a", "question": ["q"], "answer": "x"}, "column 'question': must be a string, got a list"),
        ({"context": "a", "answer_prefix": 1, "answer": "x"}, "column 'answer_prefix': must be a string"),
        ({"context": "a", "answer": 5}, "column 'answer': must be a string or a list of strings, got a number (5)"),
        ({"context": "a", "answer": {"text": "x"}}, "column 'answer': must be a string or a list of strings, got an object"),
        ({"context": "a", "answer": ["x", 3]}, "column 'answer': must be a string or a list of strings, the list holds a number"),
        ({"context": "a", "answer": []}, "column 'answer': an empty list"),
        ({"context": "a", "answer": " "}, "column 'answer': an empty answer string"),
        ({"context": "a", "answer": "x", "max_new_tokens": 0}, "column 'max_new_tokens': must be a positive integer, got a number (0)"),
        ({"context": "a", "answer": "x", "max_new_tokens": -3}, "column 'max_new_tokens': must be a positive integer"),
        ({"context": "a", "answer": "x", "max_new_tokens": 2.5}, "column 'max_new_tokens': must be a positive integer"),
        ({"context": "a", "answer": "x", "max_new_tokens": "8"}, "column 'max_new_tokens': must be a positive integer, got a string"),
        ({"context": "a", "answer": "x", "max_new_tokens": True}, "column 'max_new_tokens': must be a positive integer, got a boolean"),
    ],
)
def test_bad_rows_name_file_row_line_and_column(tmp_path, row, expected):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], ROWS[1], row])
    found = problems(path)
    assert len(found) == 1, found
    field, message = found[0]
    assert field == "path"
    assert message.startswith("rows.jsonl row 2 (line 3), ".replace("rows.jsonl", str(path))), message
    assert expected in message
    with pytest.raises(TaskInputError, match="row 2"):
        task(path).build(make_tiny_tokenizer(), seed=0)


def test_bad_rows_in_parquet_and_csv(tmp_path):
    rows = [dict(r, answer=r["answer"][0], max_new_tokens=r["max_new_tokens"] or 1) for r in ROWS]
    rows[1]["max_new_tokens"] = 0
    field, message = one_problem(write_parquet(tmp_path / "rows.parquet", rows))
    assert "rows.parquet row 1, column 'max_new_tokens': must be a positive integer, got a number (0)" in message
    rows = [dict(r, context=7) for r in ROWS]
    found = problems(write_parquet(tmp_path / "ints.parquet", rows))
    assert [m.split(",")[0].rsplit(" ", 2)[1:] for _, m in found] == [["row", "0"], ["row", "1"], ["row", "2"]]
    assert all("column 'context': must be a string" in m for _, m in found)
    # CSV: lines count the header and multi-line cells; blank lines are skipped.
    text = 'context,question,answer,max_new_tokens\n"two\nlines",q,a,4\n\nc,q,,\nd,q,b,x\n'
    (tmp_path / "rows.csv").write_text(text)
    found = problems(tmp_path / "rows.csv")
    assert [m.split(": ")[0] for _, m in found] == [
        f"{tmp_path / 'rows.csv'} row 1 (line 5), column 'answer'",
        f"{tmp_path / 'rows.csv'} row 2 (line 6), column 'max_new_tokens'",
    ]
    # A long context is one cell far over the csv module's default field limit; the build's errors name lines too.
    text = 'context,answer\n"' + "The grass is green.\n" * 10_000 + '",x\nshort,y\n'
    (tmp_path / "long.csv").write_text(text)
    assert problems(tmp_path / "long.csv") == []
    with pytest.raises(TaskInputError, match=r"long.csv row 0 \(line 2\): the prompt is"):
        task(tmp_path / "long.csv").build(make_tiny_tokenizer(), seed=0, window=1000)
    (tmp_path / "long.csv").write_text(text + "z,\n")
    assert "long.csv row 2 (line 10004), column 'answer'" in one_problem(tmp_path / "long.csv")[1]


def test_problems_past_the_limit_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"context": 1, "answer": "x"}] * 25)
    found = problems(path)
    assert len(found) == ds.MAX_PROBLEMS + 1
    assert "15 more problem(s)" in found[-1][1]


def test_cache_identity_follows_the_data(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = task(path).cache_identity()
    assert first == task(path).cache_identity() and first.startswith("sha256:")
    write_jsonl(path, ROWS[:2])
    assert task(path).cache_identity() != first
    saved = write_saved(tmp_path / "saved", ROWS)
    assert task(saved).cache_identity().startswith("sha256:")


def test_a_changed_file_is_read_again(tmp_path, tok):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    t = task(path)
    assert len(t.build(tok, seed=0)) == 3
    path.write_text(json.dumps(ROWS[0]) + "\n")
    assert len(t.build(tok, seed=0)) == 1


# -- subsets and windows ---------------------------------------------------------------------------


def test_seeded_subset_is_deterministic_and_in_file_order(tmp_path, tok):
    rows = [{"context": f"row {i} ", "answer": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    ids = [s.sample_id for s in task(path, samples=5).build(tok, seed=3)]
    assert ids == [s.sample_id for s in task(path, samples=5).build(tok, seed=3)]
    assert len(ids) == 5 and ids == sorted(ids, key=lambda i: int(i.split("/r")[1]))
    others = {tuple(s.sample_id for s in task(path, samples=5).build(tok, seed=seed)) for seed in range(4, 9)}
    assert others - {tuple(ids)}  # other seeds draw other rows
    # More than the file holds: every row.
    assert len(task(path, samples=50).build(tok, seed=3)) == 20


def test_too_long_prompt_names_the_row(tmp_path, tok):
    long = {"context": "The grass is green. " * 60 + "The pass key is 12345. ", "question": " What is the pass key?",
            "answer": "12345", "max_new_tokens": 8}
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[1], long])
    total = len(tok(long["context"]).input_ids) + len(tok(long["question"], add_special_tokens=False).input_ids)
    assert task(path).build(tok, seed=0, window=total + 8)  # fits exactly
    with pytest.raises(TaskInputError) as error:
        task(path).build(tok, seed=0, window=100)
    assert error.value.field == "path"
    message = str(error.value)
    assert f"rows.jsonl row 1 (line 2): the prompt is {total} tokens, the model's window is 100" in message
    assert "truncate: middle or left" in message
    # The row's own budget counts: without one, the task's default (32) does.
    short = dict(ROWS[1], max_new_tokens=None)
    n = len(task(write_jsonl(tmp_path / "short.jsonl", [short])).build(tok, seed=0)[0].prompt_ids)
    with pytest.raises(TaskInputError, match="row 0"):
        task(tmp_path / "short.jsonl").build(tok, seed=0, window=n + 31)
    assert task(tmp_path / "short.jsonl").build(tok, seed=0, window=n + 32)


@pytest.mark.parametrize("mode", ["middle", "left"])
def test_truncation_fits_the_window_and_keeps_the_right_ends(tmp_path, tok, mode):
    context = "BEGIN " + "The grass is green. " * 60 + "END "
    row = {"context": context, "question": "What is the pass key?", "answer": "12345", "max_new_tokens": 8}
    sample = task(write_jsonl(tmp_path / "rows.jsonl", [row]), truncate=mode).build(tok, seed=0, window=100)[0]
    full = tok(context).input_ids
    question = tok(row["question"], add_special_tokens=False).input_ids
    assert len(sample.prompt_ids) + 8 == 100 and sample.context_length == 92
    assert sample.question_ids == tuple(question) and sample.prompt_ids[-len(question):] == question
    kept = sample.context_ids
    assert kept[0] == tok.bos_token_id  # the special prefix survives either way
    assert kept[-5:] == full[-5:]  # the context's end is kept
    if mode == "middle":
        assert kept[:6] == full[:6]  # ... and its beginning
        half = (len(kept) - 1 + 1) // 2
        assert kept[1:1 + half] == full[1:1 + half] and kept[1 + half:] == full[len(full) - (len(kept) - 1 - half):]
        assert "BEGIN" in sample.prompt and sample.prompt.rstrip().endswith("What is the pass key?")
    else:
        assert kept[1:] == full[len(full) - (len(kept) - 1):]
        assert "BEGIN" not in sample.prompt and "END" in sample.prompt
    with pytest.raises(TaskInputError, match="no room for the context"):
        task(tmp_path / "rows.jsonl", truncate=mode).build(tok, seed=0, window=len(question) + 9)


# -- metrics ---------------------------------------------------------------------------------------


def test_normalization():
    assert ds.normalize("  The Cat,  sat on A mat! ") == "cat sat on mat"


@pytest.mark.parametrize(
    ("metric", "output", "answer", "value"),
    [
        ("exact_match", "The cat!", "cat", 1.0),
        ("exact_match", "the cat sat", "cat", 0.0),
        ("contains", "I think the answer is Paris.", "paris", 1.0),
        ("contains", "I think it is London.", "paris", 0.0),
        ("contains", "anything", "the", 0.0),  # an answer that normalizes away is not in every output
        ("f1", "the cat sat", "cat sat down", 0.8),
        ("f1", "sat the cat", "cat sat down", 0.8),  # a bag of tokens
        ("f1", "dog", "cat", 0.0),
        ("rouge_l", "the cat sat", "cat sat down", 0.8),
        ("rouge_l", "sat the cat", "cat sat down", 0.4),  # LCS 1: precision 1/2, recall 1/3
        ("rouge_l", "北京 是 首都", "北京 首都", 0.8),  # non-ASCII words count
        ("rouge_l", "dog", "cat", 0.0),
    ],
)
def test_metrics(metric, output, answer, value):
    assert ds.METRICS[metric](output, answer) == pytest.approx(value)


@pytest.mark.parametrize(("metric", "value"), [("exact_match", 1.0), ("contains", 1.0), ("f1", 1.0), ("rouge_l", 1.0)])
def test_score_takes_the_best_accepted_answer(tmp_path, tok, metric, value):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"context": "c ", "answer": ["London", "Paris"]}])
    t = task(path, metric=metric)
    sample = t.build(tok, seed=0)[0]
    assert t.score(sample, "Paris") == {"accuracy": value}
    assert t.score(sample, "Berlin") == {"accuracy": 0.0}
    assert t.score(sample, "paris france")["accuracy"] == pytest.approx(
        {"exact_match": 0.0, "contains": 1.0, "f1": 2 / 3, "rouge_l": 2 / 3}[metric]
    )


def test_cached_samples_round_trip_and_follow_the_file(tmp_path, tok, monkeypatch):
    from paretoray.actors.tasks.cache import cached_samples

    monkeypatch.setenv("PARETORAY_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    first = cached_samples(task(path), tok, seed=0, window=4096)
    assert first == task(path).build(tok, seed=0, window=4096)
    assert cached_samples(task(path), tok, seed=0, window=4096) == first  # read back: answers, budgets intact
    write_jsonl(path, ROWS[:1])
    assert cached_samples(task(path), tok, seed=0, window=4096) == first[:1]  # the file changed: rebuilt
