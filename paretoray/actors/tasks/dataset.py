"""The user's own data: rows in kvpress's schema, read from JSONL, Parquet, CSV or a `save_to_disk` folder.

A row has a `context` (required string), a `question` (optional string, empty when absent), an
`answer_prefix` (optional string), an `answer` (required: one string, or a list of accepted
strings) and an optional `max_new_tokens` (a positive integer: the row's generation budget).
`columns:` maps those names to the file's own (`columns: {context: doc, answer: gold}`).

The prompt is context + question + answer_prefix, tokenized in two parts (the context with the
tokenizer's special tokens, the question and answer prefix without), so a context-only placement
compresses exactly the context. It is scored against every accepted answer, keeping the best, by
one `metric`:

* `exact_match`: the normalized output equals a normalized answer (SQuAD's normalization:
  lowercase, no punctuation, no articles a/an/the, whitespace collapsed);
* `contains`: a normalized answer is a substring of the normalized output (RULER's string match,
  normalized; a plain substring, so "12" is found in "123");
* `f1`: SQuAD's token-level F1 between the normalized output and answer;
* `rouge_l`: ROUGE-L F-measure (the longest common subsequence of tokens, `rouge-score`'s
  implementation) on the same normalized tokens, so non-ASCII text counts too.

Rows are numbered from 0 in file order (sample ids `dataset/r{row}`); JSONL and CSV messages also
name the line (from 1, as editors do). Blank lines (in CSV, rows of empty cells too) take no row number.
`samples: N` draws N rows at random (seeded by the workload's seed), kept in file order; a file
with N rows or fewer is taken whole. A prompt that does not fit the model's window with its
generation budget is an error unless `truncate` is `middle` (drop the middle of the context, as
LongBench does) or `left` (drop the context's beginning); the question is never cut.

In CSV every cell is text: an `answer` cell that is a JSON list of strings (`["Paris", "paris, france"]`)
is a list of accepted answers, any other cell is one answer; `max_new_tokens` cells are decimal
integers; an empty cell is absent.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from paretoray.actors.tasks.cache import files_digest
from paretoray.actors.tasks.base import Sample, Task, TaskConfig, TaskInputError, register_task

MAX_BYTES = 2 * 1024**3  # refuse larger data files (a folder: all its files together)
MAX_PROBLEMS = 10  # row problems listed before the rest are counted
SCHEMA = ("context", "question", "answer_prefix", "answer", "max_new_tokens")
REQUIRED = ("context", "answer")
FORMATS = ".jsonl, .parquet, .csv, or a folder written by datasets' save_to_disk"


class DatasetConfig(TaskConfig):
    path: str = Field(min_length=1, description=f"the data: {FORMATS} (relative to the current directory)")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="the file's name for each schema column that differs: {context: doc, question: q, answer: gold}",
    )
    metric: Literal["exact_match", "contains", "f1", "rouge_l"] = Field(
        "contains", description="the accuracy: exact_match | contains | f1 | rouge_l (best over accepted answers)"
    )
    samples: int | None = Field(None, ge=1, description="a seeded random subset of this many rows (None: every row)")
    truncate: Literal["none", "middle", "left"] = Field(
        "none", description="a prompt too long for the model: none (an error) | middle | left (drop context tokens)"
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(SCHEMA))
        if unknown:
            raise ValueError(f"unknown schema column(s) {', '.join(unknown)}; the schema is {', '.join(SCHEMA)}")
        empty = sorted(key for key, value in columns.items() if not value)
        if empty:
            raise ValueError(f"empty file column name for {', '.join(empty)}")
        return columns


# -- scoring ---------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lowercase, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(output: str, answer: str) -> float:
    return float(normalize(output) == normalize(answer))


def contains(output: str, answer: str) -> float:
    found, wanted = normalize(output), normalize(answer)
    # An answer that normalizes away ("the", ".") would be in every output: compare it exactly.
    return float(wanted in found if wanted else found == wanted)


def f1(output: str, answer: str) -> float:
    """SQuAD's token-level F1 after normalization."""
    found, wanted = normalize(output).split(), normalize(answer).split()
    if not found or not wanted:
        return float(found == wanted)
    same = sum((Counter(found) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(found), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


class _NormalizedTokens:
    """rouge-score's tokenizer interface over SQuAD-normalized whitespace tokens (keeps non-ASCII words)."""

    def tokenize(self, text: str) -> list[str]:
        return normalize(text).split()


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_NormalizedTokens())


def rouge_l(output: str, answer: str) -> float:
    """ROUGE-L F-measure of the output against the answer, on normalized tokens."""
    if not normalize(output) or not normalize(answer):
        return float(normalize(output) == normalize(answer))
    return float(_rouge_scorer().score(answer, output)["rougeL"].fmeasure)


METRICS = {"exact_match": exact_match, "contains": contains, "f1": f1, "rouge_l": rouge_l}


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One valid row, in schema names."""

    index: int
    line: int | None
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    max_new_tokens: int | None


class _Problems:
    """Problems as (field, message); row problems past MAX_PROBLEMS are only counted."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.rows_left_out = 0

    def add(self, field: str, message: str) -> None:
        self.items.append((field, message))

    def add_row(self, field: str, message: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append((field, message))
        else:
            self.rows_left_out += 1

    def result(self, file: str) -> list[tuple[str, str]]:
        if self.rows_left_out:
            return [*self.items, ("path", f"{file}: {self.rows_left_out} more problem(s) in other rows not listed")]
        return list(self.items)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null, or an empty cell)"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    return path.suffix.lower()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class _Reader:
    """Rows of one data file in schema names, with every problem found (read once per file state)."""

    def __init__(self, config: DatasetConfig):
        self.config = config
        self.file = config.path
        self.path = Path(config.path).expanduser()
        self.names = {key: config.columns.get(key, key) for key in SCHEMA}  # schema name -> file column
        self.rows: list[Row] = []
        self.problems = _Problems()
        self._csv_rows = 0  # CSV: records read by polars, to map rows to lines when a message needs one
        self._csv_starts: list[int] | None = None

    def where(self, index: int, line: int | None = None) -> str:
        """Where a row is, in messages: `FILE row N`, with its line in JSONL and CSV."""
        if line is None and self._csv_rows:
            if self._csv_starts is None:  # parsed again only once a message needs a line
                self._csv_starts = _csv_lines(self.path, self._csv_rows) or []
            if index < len(self._csv_starts):
                line = self._csv_starts[index]
        return f"{self.file} row {index}" + (f" (line {line})" if line is not None else "")

    def column(self, key: str) -> str:
        name = self.names[key]
        return f"column {name!r}" + (f" ({key})" if name != key else "")

    def read(self) -> None:
        path = self.path
        if not path.exists():
            self.problems.add("path", f"{self.file}: no such file or folder (relative paths start at {Path.cwd()})")
            return
        kind = _format(path)
        if kind not in ("folder", ".jsonl", ".parquet", ".csv"):
            self.problems.add("path", f"{self.file}: unknown format {path.suffix or '(no extension)'!r}; expected {FORMATS}")
            return
        try:
            size = _size(path)
        except OSError as error:
            self.problems.add("path", f"{self.file}: cannot read: {error.strerror or error}")
            return
        if size > MAX_BYTES:
            self.problems.add(
                "path",
                f"{self.file}: {size / 1024**3:.2f} GiB, over the {MAX_BYTES // 1024**3} GiB limit on a dataset; "
                "write the rows you need to a smaller file",
            )
            return
        try:
            if kind == ".jsonl":
                self._read_jsonl()
            elif kind == ".csv":
                self._read_csv()
            elif kind == ".parquet":
                self._read_parquet()
            else:
                self._read_folder()
        except OSError as error:
            self.problems.add("path", f"{self.file}: cannot read: {error.strerror or error}")

    # -- JSONL: plain json, line by line, so every message names its line ---------------------

    def _read_jsonl(self) -> None:
        records: list[tuple[int, dict[str, Any]]] = []  # (line, object)
        offset = 0
        with open(self.path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                start, offset = offset, offset + len(raw)
                if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw, start = raw[3:], start + 3
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    self.problems.add_row(
                        "path",
                        f"{self.file} line {line_no}: not UTF-8 (byte 0x{raw[error.start]:02x} at byte offset "
                        f"{start + error.start} of the file)",
                    )
                    continue
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as error:
                    self.problems.add_row("path", f"{self.file} line {line_no}: not valid JSON ({error.msg} at column {error.colno})")
                    continue
                if not isinstance(value, dict):
                    self.problems.add_row(
                        "path",
                        f"{self.file} line {line_no}: {_kind(value)}, expected a JSON object of columns "
                        '(like {"context": ..., "question": ..., "answer": ...})',
                    )
                    continue
                records.append((line_no, value))
        if not records:
            if not self.problems.items:
                self.problems.add("path", f"{self.file}: no rows (the file has no JSON lines)")
            return
        present: dict[str, None] = {}
        for _, record in records:
            present.update(dict.fromkeys(record))
        if not self._check_columns(list(present)):
            return
        for index, (line_no, record) in enumerate(records):
            self._add_row(index, line_no, record)

    # -- tables: CSV, Parquet, save_to_disk, through polars -----------------------------------

    def _read_csv(self) -> None:
        import polars as pl

        try:
            frame = pl.read_csv(self.path, infer_schema=False, encoding="utf8")
        except pl.exceptions.NoDataError:
            self.problems.add("path", f"{self.file}: no rows (the file is empty)")
            return
        except Exception as error:  # polars' parse errors: find a bad byte first, it names the line
            bad = _first_non_utf8(self.path)
            if bad is not None:
                line_no, offset, byte = bad
                self.problems.add("path", f"{self.file} line {line_no}: not UTF-8 (byte 0x{byte:02x} at byte offset {offset} of the file)")
            else:
                self.problems.add("path", f"{self.file}: cannot be read as CSV: {_first_line(error)}")
            return
        self._read_frame(frame, csv_text=True)

    def _read_parquet(self) -> None:
        import polars as pl

        try:
            frame = pl.read_parquet(self.path)
        except Exception as error:
            self.problems.add("path", f"{self.file}: cannot be read as Parquet: {_first_line(error)}")
            return
        self._read_frame(frame)

    def _read_folder(self) -> None:
        import polars as pl

        if (self.path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in self.path.iterdir() if p.is_dir())
            self.problems.add(
                "path",
                f"{self.file}: a DatasetDict folder (splits: {', '.join(splits) or 'none'}); "
                f"point path at one split, e.g. {self.file.rstrip('/')}/{splits[0] if splits else 'train'}",
            )
            return
        if not (self.path / "state.json").is_file():
            self.problems.add(
                "path",
                f"{self.file}: a folder, but not one written by datasets' save_to_disk (no state.json); expected {FORMATS}",
            )
            return
        try:
            table = _load_saved(self.path)
        except Exception as error:
            self.problems.add("path", f"{self.file}: cannot be read as a save_to_disk folder: {_first_line(error)}")
            return
        self._read_frame(pl.from_arrow(table))

    def _read_frame(self, frame: Any, csv_text: bool = False) -> None:
        if csv_text:  # blank lines (and rows of empty cells) are no rows, as in JSONL
            import polars as pl

            frame = frame.filter(~pl.all_horizontal(pl.all().is_null()))
        if frame.height == 0:
            self.problems.add("path", f"{self.file}: no rows (columns: {', '.join(frame.columns) or 'none'})")
            return
        if not self._check_columns(frame.columns):
            return
        wanted = [self.names[key] for key in SCHEMA if self.names[key] in frame.columns]
        if csv_text:
            self._csv_rows = frame.height
        for index, record in enumerate(frame.select(list(dict.fromkeys(wanted))).iter_rows(named=True)):
            if csv_text:
                record = self._from_csv(record)
            self._add_row(index, None, record)

    def _from_csv(self, record: dict[str, Any]) -> dict[str, Any]:
        """CSV cells are text: an answer cell may be a JSON list; max_new_tokens is a decimal integer."""
        record = dict(record)
        answer = self.names["answer"]
        cell = record.get(answer)
        if isinstance(cell, str) and cell.lstrip().startswith("["):
            try:
                value = json.loads(cell)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                record[answer] = value
        budget = self.names["max_new_tokens"]
        cell = record.get(budget)
        if isinstance(cell, str) and re.fullmatch(r"\s*[+-]?\d+\s*", cell):
            record[budget] = int(cell)
        return record

    # -- shared -------------------------------------------------------------------------------

    def _check_columns(self, present: list[str]) -> bool:
        """Remapped and required columns exist; False (with problems) when rows cannot be read."""
        ok = True
        listed = ", ".join(present) or "none"
        for key, name in self.config.columns.items():
            if name not in present:
                self.problems.add("columns." + key, f"{self.file}: no column {name!r} (mapped to {key}); its columns are: {listed}")
                ok = False
        for key in REQUIRED:
            name = self.names[key]
            if key not in self.config.columns and name not in present:
                self.problems.add(
                    "path",
                    f"{self.file}: no column {name!r} (required); its columns are: {listed}. "
                    f"If yours has another name, map it with `columns:`, e.g. columns: {{{key}: YOUR_COLUMN}}",
                )
                ok = False
        return ok

    def _add_row(self, index: int, line: int | None, record: dict[str, Any]) -> None:
        """Validate one record (file column names) and keep it as a Row, or record its problems."""
        bad = False

        def problem(key: str, message: str) -> None:
            nonlocal bad
            bad = True
            self.problems.add_row("path", f"{self.where(index, line)}, {self.column(key)}: {message}")

        values: dict[str, Any] = {}
        for key in ("context", "question", "answer_prefix"):
            name = self.names[key]
            if name not in record:
                if key in REQUIRED:
                    problem(key, "missing (required)")
                values[key] = ""
                continue
            value = record[name]
            if value is None and key not in REQUIRED:
                value = ""
            if not isinstance(value, str):
                problem(key, f"must be a string, got {_kind(value)}")
            values[key] = value

        name = self.names["answer"]
        answer = record.get(name)
        answers: tuple[str, ...] = ()
        if name not in record:
            problem("answer", "missing (required)")
        elif isinstance(answer, str):
            answers = (answer,)
        elif isinstance(answer, (list, tuple)) and all(isinstance(item, str) for item in answer):
            answers = tuple(answer)
            if not answers:
                problem("answer", "an empty list; give at least one accepted answer")
        elif isinstance(answer, (list, tuple)):
            wrong = next(item for item in answer if not isinstance(item, str))
            problem("answer", f"must be a string or a list of strings, the list holds {_kind(wrong)}")
        else:
            problem("answer", f"must be a string or a list of strings, got {_kind(answer)}")
        if any(not item.strip() for item in answers):
            problem("answer", "an empty answer string (it would match every output)")

        name = self.names["max_new_tokens"]
        budget = record.get(name)
        if isinstance(budget, float) and math.isfinite(budget) and budget.is_integer():
            budget = int(budget)  # an integer column with gaps, written by pandas, is float
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            problem("max_new_tokens", f"must be a positive integer, got {_kind(budget)}")
            budget = None

        if not bad:
            self.rows.append(
                Row(
                    index=index,
                    line=line,
                    context=values["context"],
                    question=values["question"],
                    answer_prefix=values["answer_prefix"],
                    answers=answers,
                    max_new_tokens=budget,
                )
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_non_utf8(path: Path) -> tuple[int, int, int] | None:
    """(line, byte offset, byte) of the first byte that is not UTF-8, or None."""
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return line_no, offset + error.start, raw[error.start]
            offset += len(raw)
    return None


def _csv_lines(path: Path, rows: int) -> list[int] | None:
    """The line each CSV record starts on (row 0 is the record after the header), or None when
    Python's csv module cannot parse the file as polars did (then messages name rows only)."""
    starts: list[int] = []
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a long context is one cell, far over the default 128 KiB
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            next_line = 1
            for record in reader:
                if any(record):  # blank lines and rows of empty cells are skipped (see _read_frame)
                    starts.append(next_line)
                next_line = reader.line_num + 1
    except (csv.Error, OSError, UnicodeDecodeError):
        return None
    finally:
        csv.field_size_limit(limit)
    starts = starts[1:]  # the header
    return starts if len(starts) == rows else None


def _load_saved(path: Path) -> Any:
    """A pyarrow Table of a `save_to_disk` folder: through `datasets` when installed, else its arrow files."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        dataset = datasets.load_from_disk(str(path))
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"{type(dataset).__name__}, not one Dataset")
        return dataset.with_format("arrow")[:]
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if state.get("_indices_data_files"):
        raise ValueError("the folder holds an indices mapping; install `datasets` to read it")
    tables = []
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(path / entry["filename"])) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    if not tables:
        raise ValueError("state.json lists no data files")
    return pa.concat_tables(tables)


def _state(path: Path) -> tuple[Any, ...]:
    """What changes when the data does (without reading it): sizes and modification times."""
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        return ()


# -- the task --------------------------------------------------------------------------------------


@register_task
class Dataset(Task):
    name = "dataset"
    summary = "your own rows in kvpress's schema (JSONL, Parquet, CSV, save_to_disk); exact_match, contains, f1 or rouge_l"
    Config = DatasetConfig
    default_max_new_tokens = 32

    def __init__(self, config: DatasetConfig):
        super().__init__(config)
        self._read: tuple[tuple[Any, ...], _Reader] | None = None

    def _reader(self) -> _Reader:
        state = _state(Path(self.config.path).expanduser())
        if self._read is None or self._read[0] != state or not state:
            reader = _Reader(self.config)
            reader.read()
            self._read = (state, reader)
        return self._read[1]

    def check(self) -> list[tuple[str, str]]:
        reader = self._reader()
        return reader.problems.result(reader.file)

    def cache_identity(self) -> str:
        path = Path(self.config.path).expanduser()
        try:
            return files_digest(path, sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
        except OSError:
            return f"unreadable:{self.config.path}"

    def rows(self) -> list[Row]:
        """Every valid row; raises TaskInputError with the first problem (all of them in `check`)."""
        reader = self._reader()
        problems = reader.problems.result(reader.file)
        if problems:
            field, message = problems[0]
            more = f" (and {len(problems) - 1} more problem(s); `paretoray sweep validate` lists them)" if len(problems) > 1 else ""
            raise TaskInputError(field, message + more)
        return reader.rows

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        rows = self.rows()
        if self.config.samples is not None and self.config.samples < len(rows):
            chosen = sorted(random.Random(seed).sample(range(len(rows)), self.config.samples))
            rows = [rows[i] for i in chosen]
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        samples = []
        for row in rows:
            context_ids = list(tokenizer(row.context, add_special_tokens=True).input_ids)
            tail = row.question + row.answer_prefix
            question_ids = list(tokenizer(tail, add_special_tokens=False).input_ids) if tail else []
            budget = row.max_new_tokens or self.default_max_new_tokens
            total = len(context_ids) + len(question_ids)
            prompt = row.context + tail
            if window is not None and total + budget > window:
                context_ids = self._truncate(row, context_ids, question_ids, budget, window, special)
                prompt = tokenizer.decode(context_ids, skip_special_tokens=True) + tail
            prompt_ids = context_ids + question_ids
            samples.append(
                Sample(
                    sample_id=f"{self.name}/r{row.index}",
                    task=self.name,
                    prompt=prompt,
                    prompt_ids=prompt_ids,
                    answer=row.answers[0],
                    context_length=len(prompt_ids),
                    depth=0.0,
                    question_ids=tuple(question_ids),
                    answers=row.answers,
                    max_new_tokens=row.max_new_tokens,
                )
            )
        return samples

    def _truncate(
        self, row: Row, context_ids: list[int], question_ids: list[int], budget: int, window: int, special: set[int]
    ) -> list[int]:
        """The context cut to fit the window (its leading and trailing special tokens kept)."""
        where = self._reader().where(row.index, row.line)
        total = len(context_ids) + len(question_ids)
        if self.config.truncate == "none":
            raise TaskInputError(
                "path",
                f"{where}: the prompt is {total} tokens, the model's window is {window} tokens and {budget} are "
                "kept for the answer; set truncate: middle or left (or drop the row)",
            )
        head = 0
        while head < len(context_ids) and context_ids[head] in special:
            head += 1
        tail = 0
        while tail < len(context_ids) - head and context_ids[len(context_ids) - 1 - tail] in special:
            tail += 1
        body = context_ids[head : len(context_ids) - tail]
        keep = window - budget - len(question_ids) - head - tail
        if keep < 1:
            raise TaskInputError(
                "path",
                f"{where}: the question and answer prefix alone are {len(question_ids)} tokens; with {budget} tokens "
                f"for the answer they leave no room for the context in the model's window of {window} tokens",
            )
        if self.config.truncate == "middle":
            first = (keep + 1) // 2
            kept = body[:first] + body[len(body) - (keep - first) :]
        else:
            kept = body[len(body) - keep :]
        return context_ids[:head] + kept + context_ids[len(context_ids) - tail :]

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        metric = METRICS[self.config.metric]
        return {"accuracy": max((metric(output, answer) for answer in sample.expected), default=0.0)}
