"""The narrow base every task builds on: a pydantic config, seeded samples, a scorer, a registry.

A task is one class in one file. It declares `name`, its `Config` (a pydantic model whose fields
are the task's settings: validated at the spec boundary, so errors name the field path), builds
seeded samples for a tokenizer (`build`), and scores one output (`score`), returning one or more
named per-sample scores. Every score name is a metric of `paretoray.actors.metrics.METRICS`; the
runner aggregates them there, with the metric's direction, aggregation and interval. `accuracy`
is always among them: it is the task's primary score.

Registering (`@register_task`) makes the task available to sweeps and to `paretoray tasks`;
importing `paretoray.actors.tasks` imports every task module once. Nothing here imports torch:
declarations are read by `paretoray tasks` and `sweep validate` without loading it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TaskConfig(BaseModel):
    """Base of every task's settings: strict types, no unknown keys, frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class LengthsConfig(TaskConfig):
    """Settings shared by the synthetic long-context tasks: prompts fitted to token lengths."""

    # False for tasks with nothing to place at a depth (word lists, chains spread at random).
    places_needles: ClassVar[bool] = True

    context_lengths: list[int] = Field(min_length=1, description="prompt tokens, one sample set per length")
    samples_per_length: int = Field(2, ge=1, le=10_000, description="samples at each length")
    depths: list[float] | None = Field(
        None, description="needle depths as fractions of the haystack; default: spread evenly over samples_per_length"
    )

    @field_validator("context_lengths")
    @classmethod
    def _long_enough(cls, lengths: list[int]) -> list[int]:
        if any(n < 64 for n in lengths):
            raise ValueError(f"every context length must be >= 64 tokens, got {lengths}")
        if len(set(lengths)) != len(lengths):
            raise ValueError(f"context lengths repeat (each would measure the same samples twice): {lengths}")
        return lengths

    @field_validator("depths")
    @classmethod
    def _unit_depths(cls, depths: list[float] | None) -> list[float] | None:
        if depths is not None and not cls.places_needles:
            raise ValueError("this task places no needle at a depth (its items are spread as RULER spreads them): leave depths unset")
        if depths is not None and (not depths or any(not 0.0 <= d <= 1.0 for d in depths)):
            raise ValueError(f"depths must be a non-empty list of fractions in [0, 1], got {depths}")
        if depths is not None and len(set(depths)) != len(depths):
            raise ValueError(f"depths repeat (use samples_per_length for more samples at a depth): {depths}")
        return depths

    def cells(self) -> list[tuple[float, int]]:
        """(depth, index) of every sample at one length: evenly spread depths, or each given depth repeated."""
        if self.depths is None:
            n = self.samples_per_length
            return [((i + 0.5) / n, i) for i in range(n)]
        return [(d, j) for d in self.depths for j in range(self.samples_per_length)]


@dataclass(frozen=True)
class Sample:
    """One prompt, tokenized, with what a correct answer contains.

    `prompt_ids` is the context followed by `question_ids` (tokenized apart, so a context-only
    placement, which compresses the context and then asks, sees exactly the same tokens).
    """

    sample_id: str
    task: str
    prompt: str
    prompt_ids: list[int]
    answer: str  # the expected answer as shown to people (the first accepted string; "" when scored by reference)
    context_length: int  # the length bucket the sample was fitted to (its token count for datasets)
    depth: float = 0.0
    question_ids: tuple[int, ...] = ()
    answers: tuple[str, ...] = ()  # every string the scorer looks for (defaults to (answer,))
    max_new_tokens: int | None = None  # a per-sample generation budget (datasets); None: the workload's
    group: str = ""  # the part of a suite the sample belongs to (metrics are also broken down by it)

    @property
    def context_ids(self) -> list[int]:
        """The prompt without its question: what a context-only placement compresses."""
        return self.prompt_ids[: len(self.prompt_ids) - len(self.question_ids)]

    @property
    def expected(self) -> tuple[str, ...]:
        return self.answers or ((self.answer,) if self.answer else ())

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        data["question_ids"] = tuple(data.get("question_ids", ()))
        data["answers"] = tuple(data.get("answers", ()))
        return cls(**data)


class TaskInputError(ValueError):
    """Bad task input found while building samples (a data file, a row too long for the model).

    `field` is the workload field it concerns (`path`, `columns.answer`...); the message names the
    file and the row or line.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class Task:
    """Base class. Subclasses declare `name`, `Config`, and implement `build` and `score`."""

    name: ClassVar[str]
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    summary: ClassVar[str] = ""
    # Bumped when the prompts a config yields change: cached samples of older versions are rebuilt.
    version: ClassVar[int] = 1
    # Tokens to generate when the workload does not say (RULER's per-family budgets, say).
    default_max_new_tokens: ClassVar[int] = 8
    # Scored by equality with the dense model's own greedy output (prompt sets with no fixed answer).
    scored_by_reference: ClassVar[bool] = False
    # Per-length breakdowns (accuracy/ctxN) make sense: samples are fitted to requested lengths.
    has_lengths: ClassVar[bool] = False
    # Every sample carries its own generation budget (a suite's entries): workload.max_new_tokens is refused.
    budgets_per_sample: ClassVar[bool] = False

    def __init__(self, config: TaskConfig):
        self.config = config

    # -- what subclasses implement ----------------------------------------------------------

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        """Seeded samples for `tokenizer`. `window` is the model's context window in tokens (None:
        unknown): a prompt plus its generation budget must fit it, or a TaskInputError names the sample."""
        raise NotImplementedError

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        """Per-sample scores of `output` (decoded generation). `reference` is the dense model's output
        on the same sample (used by tasks `scored_by_reference`). Must include `accuracy`."""
        raise NotImplementedError

    def check(self) -> list[tuple[str, str]]:
        """Problems found without a tokenizer (a data file's format, columns, encoding), as
        (field path inside the workload, message) pairs. Run before Ray starts."""
        return []

    def cache_identity(self) -> str:
        """What else, beyond the config and the task version, determines the samples (a data file's digest)."""
        return ""

    # -- shared -------------------------------------------------------------------------------

    @property
    def context_lengths(self) -> list[int]:
        return list(getattr(self.config, "context_lengths", None) or [])

    @property
    def groups(self) -> list[str]:
        """The groups its samples fall in (a suite's entries): metrics are broken down by each."""
        return []

    def length_requests(self) -> list[tuple[str, int, int]]:
        """(field path inside the workload, prompt tokens asked for, tokens generated after them) for each
        requested context length: what must fit the model's window (the spec checks it before anything
        runs). The budget is the task's own; a workload's max_new_tokens replaces it."""
        return [("context_lengths", n, self.default_max_new_tokens) for n in self.context_lengths]


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available to sweeps under `cls.name`."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name`")
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is already registered by {_TASKS[cls.name].__qualname__}")
    _TASKS[cls.name] = cls
    return cls


class UnknownTaskError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def available_tasks() -> dict[str, type[Task]]:
    from paretoray.actors import tasks  # noqa: F401  (imports every task module once)

    return dict(sorted(_TASKS.items()))


def task_class(name: str) -> type[Task]:
    registry = available_tasks()
    try:
        return registry[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; available: {', '.join(registry)}") from None


def build_task(name: str, settings: dict[str, Any]) -> Task:
    """A configured task from its name and settings (raises pydantic's ValidationError on bad settings)."""
    cls = task_class(name)
    return cls(cls.Config.model_validate(settings))


def _type_text(annotation: Any) -> str:
    """A field's type as a sweep file writes it: `list[int]`, `a | b`, a nested config as `{path: str}`."""
    import re
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(arg) for arg in args)
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{" + ", ".join(f"{k}: {_type_text(f.annotation)}" for k, f in annotation.model_fields.items()) + "}"
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(annotation))


def describe_config(config_cls: type[TaskConfig]) -> list[tuple[str, str, str]]:
    """(field, type and range, default or 'required') for `paretoray tasks`."""
    rows = []
    for name, info in config_cls.model_fields.items():
        kind = _type_text(info.annotation)
        bounds = []
        for item in info.metadata:
            for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len>=")):
                if getattr(item, attr, None) is not None:
                    bounds.append(f"{sign}{getattr(item, attr)}")
        if bounds:
            kind += f" ({', '.join(bounds)})"
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        rows.append((name, kind, default, info.description or ""))
    return rows
