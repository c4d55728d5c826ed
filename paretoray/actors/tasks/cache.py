"""Samples built once per (tokenizer, task settings, seed) and kept on disk.

Fitting thousands of prompts to token lengths, or tokenizing a data set, takes seconds to minutes;
every actor and every trial of a sweep needs the same samples. The first builder writes them as
JSON (plain data: nothing is deserialized but lists and strings) under
`$PARETORAY_CACHE/samples/`, keyed by a digest of everything that determines them: the task's name,
version and settings, the seed, the model's window, the task's own inputs (a data file's digest),
and the tokenizer itself (its serialized vocabulary and merges, its chat template).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from paretoray.actors.tasks.base import Sample, Task, TaskInputError
from paretoray.paths import cache_root


def files_digest(root: Path, files: list[Path]) -> str:
    """`sha256:` over files' contents (streamed) and, inside a folder `root`, their relative names:
    what a task whose samples come from the user's files adds to its cache key."""
    digest = hashlib.sha256()
    for file in files:
        if root.is_dir():
            digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(str(getattr(tokenizer, "bos_token", None)).encode())
    return digest.hexdigest()


def samples_key(task: Task, tokenizer: Any, seed: int, window: int | None, budget: int | None) -> str:
    identity = {
        "task": task.name,
        "version": task.version,
        "settings": task.config.model_dump(mode="json"),
        "seed": seed,
        "window": window,
        "budget": budget,
        "inputs": task.cache_identity(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def check_window(task: Task, samples: list[Sample], window: int | None, budget: int | None) -> None:
    """Every prompt plus its generation budget must fit the model's window."""
    if window is None:
        return
    for sample in samples:
        need = len(sample.prompt_ids) + (sample.max_new_tokens or budget or task.default_max_new_tokens)
        if need > window:
            field = "context_lengths" if task.has_lengths else "max_new_tokens"
            raise TaskInputError(
                f"tasks.{sample.group}.{field}" if sample.group else field,
                f"sample {sample.sample_id}: {len(sample.prompt_ids)} prompt tokens + "
                f"{need - len(sample.prompt_ids)} new tokens exceed the model's window of {window} tokens",
            )


def cached_samples(
    task: Task, tokenizer: Any, seed: int, window: int | None = None, budget: int | None = None, use_cache: bool = True
) -> list[Sample]:
    """The task's samples for this tokenizer, from the disk cache or built (and cached) now.

    `budget` is the workload's max_new_tokens (None: the task's default); with `window` every prompt
    plus its budget is checked against the model's context window (TaskInputError naming the sample).
    """
    folder = cache_root() / "samples"
    path = folder / f"{task.name}-{samples_key(task, tokenizer, seed, window, budget)}.json"
    if use_cache and path.is_file():
        try:
            return [Sample.from_json(item) for item in json.loads(path.read_text(encoding="utf-8"))]
        except (OSError, ValueError, TypeError):
            pass  # a torn or foreign file: rebuild it
    # A task reserves its default budget inside the window it is given; a workload that asks for
    # another budget shifts that window, so a row fitted (or truncated) by the task fits exactly.
    shifted = None if window is None else window - (budget or task.default_max_new_tokens) + task.default_max_new_tokens
    samples = task.build(tokenizer, seed, shifted)
    if not samples:
        raise TaskInputError("task", f"task {task.name!r} built no samples")
    check_window(task, samples, window, budget)
    if use_cache:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Several actors may build at once: write aside, then rename atomically.
            handle, staging = tempfile.mkstemp(prefix=".samples-", dir=folder)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump([s.to_json() for s in samples], out)
            Path(staging).replace(path)
        except OSError:
            pass  # a read-only cache only costs the rebuild
    return samples
