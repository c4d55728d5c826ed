"""Haystacks and the fitting of a prompt to a token length, shared by the synthetic tasks.

A prompt is laid out before its size is known (`Layout`: an intro, needles at fractions of the
haystack, a question), then the haystack is grown unit by unit until the prompt is as long as
the token budget allows (`fit_units`). A haystack is a sequence of text units:

* `noise`: RULER's repeated noise sentence block (the passkey filler), the easiest haystack;
* `essay`: natural English prose that ships with Python (the reference documentation's prose in
  `pydoc_data.topics`, code examples and tables dropped, cut into sentences): RULER uses Paul
  Graham's essays, which are not redistributable here;
* `{path: FILE_OR_FOLDER}`: the user's own UTF-8 text files, cut into sentences.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from paretoray.actors.tasks.base import LengthsConfig, Sample, Task, TaskConfig, TaskInputError
from paretoray.actors.tasks.cache import files_digest

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


class HaystackFiles(TaskConfig):
    path: str = Field(description="a UTF-8 text file, or a folder whose *.txt and *.md files are read in name order")


def sentences(text: str) -> list[str]:
    """`text` cut into sentences, whitespace collapsed, each ending in one space."""
    flat = " ".join(text.split())
    return [s.strip() + " " for s in _SENTENCE_END.split(flat) if len(s.strip()) > 1]


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """Prose sentences from Python's own reference documentation (no code, no tables)."""
    from pydoc_data.topics import topics

    kept: list[str] = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = paragraph.splitlines()
            # Prose paragraphs are indented by at most two spaces; code and tables by more.
            if not lines or any(len(line) - len(line.lstrip()) > 2 for line in lines):
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) < 80 or any(mark in text for mark in ("***", "===", "---", ">>>", "::", "|")):
                continue
            kept.extend(s for s in sentences(text) if len(s.split()) >= 5)
    return tuple(kept)


def text_files(root: Path) -> list[Path]:
    """The haystack's files: `root` itself, or a folder's .txt and .md files in name order."""
    if root.is_dir():
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
    return [root] if root.is_file() else []


def file_sentences(path: str) -> tuple[str, ...]:
    """Sentences of the user's text file(s); errors name the file (TaskInputError on `haystack.path`)."""
    root = Path(path).expanduser()
    if root.is_dir():
        files = text_files(root)
        if not files:
            raise TaskInputError("haystack.path", f"{root}: no .txt or .md file in this folder")
    elif root.is_file():
        files = [root]
    else:
        raise TaskInputError("haystack.path", f"{root}: no such file or folder")
    found: list[str] = []
    for file in files:
        try:
            found.extend(sentences(file.read_text(encoding="utf-8")))
        except UnicodeDecodeError as error:
            raise TaskInputError("haystack.path", f"{file}: not UTF-8 text (byte {error.start})") from None
        except OSError as error:
            raise TaskInputError("haystack.path", f"{file}: cannot read: {error.strerror or error}") from None
    if not found:
        raise TaskInputError("haystack.path", f"{root}: no text to make a haystack of")
    return tuple(found)


def haystack_units(haystack: str | HaystackFiles) -> Callable[[int], str]:
    """Unit i of a haystack (units repeat when the text runs out)."""
    if haystack == "noise":
        return lambda i: FILLER
    units = essay_sentences() if haystack == "essay" else file_sentences(haystack.path)  # type: ignore[union-attr]
    return lambda i: units[i % len(units)]


class HaystackConfig(LengthsConfig):
    """Length-fitted settings plus the haystack the needles hide in."""

    haystack: str | HaystackFiles = Field(
        "noise", description="noise (RULER's repeated sentences) | essay (natural prose shipped with Python) | {path: FILE}"
    )

    @field_validator("haystack", mode="before")
    @classmethod
    def _known_haystack(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("noise", "essay"):
            raise ValueError(f"expected noise, essay or {{path: FILE}}, got {value!r}")
        return value


@dataclass(frozen=True)
class Layout:
    """A prompt before the haystack size is known: needles sit at haystack fractions."""

    intro: str
    needles: list[tuple[float, str]]
    question: str
    answer: str
    answers: tuple[str, ...] = ()

    def render(self, n_units: int, unit: Callable[[int], str] = lambda i: FILLER, with_question: bool = True) -> str:
        slots: list[list[str]] = [[] for _ in range(n_units + 1)]
        for fraction, text in self.needles:
            slots[round(fraction * n_units)].append(text)
        parts = [self.intro]
        for i, slot in enumerate(slots):
            parts.extend(slot)
            if i < n_units:
                parts.append(unit(i))
        if with_question:
            parts.append(self.question)
        return "".join(parts)


def fit_units(n_tokens: Callable[[int], int], budget: int, unit_tokens: int, base_tokens: int) -> int:
    """Largest n with n_tokens(n) <= budget, assuming n_tokens is increasing and n_tokens(0) fits."""
    lo, hi = 0, None  # n_tokens(lo) fits, n_tokens(hi) does not
    guess = (budget - base_tokens) // max(unit_tokens, 1)
    while hi is None or hi - lo > 1:
        if lo < guess and (hi is None or guess < hi):
            n = guess
        else:
            n = lo + 1 if hi is None else (lo + hi) // 2
        used = n_tokens(n)
        if used <= budget:
            lo = n
        else:
            hi = n
        # Each unit costs about unit_tokens (only the joins can merge differently), so
        # extrapolating lands within a step or two of the answer.
        guess = n + (budget - used) // max(unit_tokens, 1)
        if used <= budget and guess == n:
            guess = n + 1
    return lo


def build_fitted(
    task: str,
    tokenizer: Any,
    config: LengthsConfig,
    seed: int,
    make_layout: Callable[[random.Random, float], Layout],
    haystack: str | HaystackFiles = "noise",
    id_parts: Callable[[float, int], str] | None = None,
) -> list[Sample]:
    """One sample per (length, cell), each prompt within one haystack unit below its length.

    `make_layout(rng, depth)` draws a prompt's needles and answer; the rng is seeded by the seed and
    the sample id (string seeds hash with SHA-512: stable across processes and machines).
    """
    unit = haystack_units(haystack)

    def encode(text: str, special: bool = True) -> list[int]:
        return tokenizer(text, add_special_tokens=special).input_ids

    # Marginal cost of one unit in steady state, ignoring the edges of the run.
    probe = "".join(unit(i) for i in range(8))
    unit_tokens = max(1, len(encode(probe + unit(8), False)) - len(encode(probe, False)))
    if haystack != "noise":
        unit_tokens = max(1, len(encode(probe, False)) // 8)

    samples = []
    for length in config.context_lengths:
        for depth, index in config.cells():
            sample_id = f"{task}/ctx{length}/d{depth:g}/s{index}" if id_parts is None else f"{task}/ctx{length}/{id_parts(depth, index)}"
            layout = make_layout(random.Random(f"{seed}/{sample_id}"), depth)
            # Context and question are tokenized apart, so a context-only placement (compress the
            # context, then ask) and a query-aware one see exactly the same tokens.
            question_ids = encode(layout.question, False)
            cache: dict[int, list[int]] = {}

            def n_tokens(n: int) -> int:
                if n not in cache:
                    cache[n] = encode(layout.render(n, unit, with_question=False)) + question_ids
                return len(cache[n])

            base_tokens = n_tokens(0)
            if base_tokens > length:
                raise TaskInputError(
                    "context_lengths",
                    f"context_length {length} is too small for task {task!r}: "
                    f"intro, needles and question alone take {base_tokens} tokens",
                )
            n_units = fit_units(n_tokens, length, unit_tokens, base_tokens)
            samples.append(
                Sample(
                    sample_id=sample_id,
                    task=task,
                    prompt=layout.render(n_units, unit),
                    prompt_ids=cache[n_units],
                    answer=layout.answer,
                    context_length=length,
                    depth=depth,
                    question_ids=tuple(question_ids),
                    answers=layout.answers,
                )
            )
    return samples


def recall(expected: Sequence[str], output: str) -> float:
    """RULER's `string_match_all`: the fraction of expected strings found in the output (case-insensitive)."""
    if not expected:
        return float("nan")
    low = output.lower()
    return sum(e.lower() in low for e in expected) / len(expected)


# -- Helpers for tasks that lay out their own prompts (RULER's niah, variable tracking, word lists) --


_FUNCTION_WORDS = frozenset(
    "about above after again against also although among because been before being below both cannot "
    "could does each either even from have here into just many more most much must other over same "
    "should since some such than that their them then there these they this those though through "
    "under unless until upon very well were what when where which while whom whose will with within "
    "without would".split()
)


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The distinct lowercase words (4 to 12 letters, function words left out) of the `essay` prose, sorted.

    The English vocabulary the RULER tasks draw words from, in place of the `wonderwords` lists RULER
    uses (about 1,900 words on CPython 3.11; like the essay haystack, it follows the Python version).
    """
    found: set[str] = set()
    for sentence in essay_sentences():
        found.update(w for w in re.findall(r"[A-Za-z]+", sentence) if w.islower() and 4 <= len(w) <= 12)
    return tuple(sorted(found - _FUNCTION_WORDS))


def interleave(n_units: int, needles: Sequence[tuple[float, str]], unit: Callable[[int], str]) -> list[str]:
    """`n_units` haystack units with each needle placed before unit round(fraction * n_units).

    Needles that land in the same place keep their given order, so a chain given in order stays in order.
    """
    slots: list[list[str]] = [[] for _ in range(n_units + 1)]
    for fraction, text in needles:
        slots[round(fraction * n_units)].append(text)
    pieces: list[str] = []
    for i, slot in enumerate(slots):
        pieces.extend(slot)
        if i < n_units:
            pieces.append(unit(i))
    return pieces


def fit_text(
    task: str,
    tokenizer: Any,
    length: int,
    render: Callable[[int], str],
    question: str,
    probe: int = 8,
    start: int | None = None,
    field: str = "context_lengths",
    what: str = "context_length",
    hint: str = "",
) -> tuple[int, list[int], tuple[int, ...]]:
    """The largest n whose prompt fits `length` tokens: (n, prompt_ids, question_ids).

    The prompt is the context `render(n)` (encoded with special tokens) followed by `question`
    (encoded apart, without), as `build_fitted` tokenizes. `render` must grow with n; `render(0)`
    holds the fixed parts, and a TaskInputError on `field` says so when they alone do not fit
    (`what` names the budget in the message, `hint` is appended to it).

    Only where the search starts depends on `probe` (an n at which the cost of one unit is first
    measured) and `start` (an n expected to be close, such as the previous sample's at this
    length): the answer does not. A good start costs two or three encodings instead of ten or more.
    """
    question_ids = tuple(tokenizer(question, add_special_tokens=False).input_ids)
    cache: dict[int, list[int]] = {}

    def n_tokens(n: int) -> int:
        if n not in cache:
            cache[n] = tokenizer(render(n), add_special_tokens=True).input_ids + list(question_ids)
        return len(cache[n])

    base_tokens = n_tokens(0)
    if base_tokens > length:
        raise TaskInputError(
            field,
            f"{what} {length} is too small for task {task!r}: "
            f"its fixed parts alone take {base_tokens} tokens{hint}",
        )
    if not start:
        rate = max(1.0, (n_tokens(probe) - base_tokens) / probe)
        start = int((length - base_tokens) / rate)
        if start > probe:  # a second, far measurement: units can cost more as the prompt grows
            rate = max(1.0, (n_tokens(start) - base_tokens) / start)
            start = int((length - base_tokens) / rate)
    else:
        rate = max(1.0, (n_tokens(start) - base_tokens) / start)
    # Rounded up, so fit_units' steps undershoot and close in fast rather than swing around the answer.
    unit_tokens = int(rate) + (rate > int(rate))
    # fit_units starts at (budget - base) // unit_tokens: a base chosen to make that `start`.
    n = fit_units(n_tokens, length, unit_tokens, length - start * unit_tokens)
    return n, cache[n], question_ids


class RecallTask(Task):
    """A task scored as RULER scores its synthetic tasks: the recall of every expected string."""

    has_lengths = True

    def cache_identity(self) -> str:
        """The user's haystack files change the prompts: their digest keys the cached samples."""
        haystack = getattr(self.config, "haystack", None)
        if not isinstance(haystack, HaystackFiles):
            return ""
        root = Path(haystack.path).expanduser()
        return files_digest(root, text_files(root))  # no file: the build reports it

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        return {"accuracy": recall(sample.expected, output)}

    def sample(self, sample_id: str, length: int, prompt: str, prompt_ids: list[int], question_ids: list[int],
               answers: Sequence[str], depth: float = 0.0, joiner: str = ", ") -> Sample:
        return Sample(sample_id=sample_id, task=self.name, prompt=prompt, prompt_ids=prompt_ids,
                      answer=joiner.join(answers), context_length=length, depth=depth,
                      question_ids=tuple(question_ids), answers=tuple(answers))
