"""Several tasks measured in one trial, scored each by its own scorer: a RULER-style suite.

    workload:
      task: suite
      tasks:
        niah: {context_lengths: [1024, 2048], samples_per_length: 2, max_new_tokens: 32}
        variable_tracking: {context_lengths: [1024, 2048]}
        cwe: {task: common_words, context_lengths: [1024]}   # an entry may name its task

Each entry is a task name (or any name with `task:` inside) and that task's settings, plus an
optional `max_new_tokens` (default: the task's own budget, RULER's per-family budgets). Every
trial runs all the entries' samples; its metrics are the mean over all samples (`accuracy`) and
the breakdown by entry (`accuracy/niah`, `dense_accuracy/niah`, ...), so a front can be read per
family and dense's own score sits beside each technique's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field, ValidationError, field_validator

from paretoray.actors.tasks.base import Sample, Task, TaskConfig, TaskInputError, build_task, register_task, task_class


def _entry(name: str, settings: dict[str, Any]) -> tuple[str, dict[str, Any], int | None]:
    settings = dict(settings)
    return str(settings.pop("task", name)), settings, settings.pop("max_new_tokens", None)


class SuiteConfig(TaskConfig):
    tasks: dict[str, dict[str, Any]] = Field(
        min_length=1, description="entry name -> that task's settings (+ task: NAME, max_new_tokens: N)"
    )

    @field_validator("tasks")
    @classmethod
    def _entries(cls, tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = []
        for name, settings in tasks.items():
            task, rest, budget = _entry(name, settings)
            if task == "suite":
                problems.append(f"tasks.{name}: a suite cannot contain a suite")
                continue
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= 4096):
                problems.append(f"tasks.{name}.max_new_tokens: expected an integer in [1, 4096], got {budget!r}")
            try:
                task_class(task).Config.model_validate(rest)
            except KeyError as error:
                problems.append(f"tasks.{name}: {error}")
            except ValidationError as error:
                for item in error.errors():
                    where = ".".join(str(p) for p in item["loc"])
                    problems.append(f"tasks.{name}.{where}: {item['msg'].removeprefix('Value error, ')}")
        if problems:
            raise ValueError("; ".join(problems))
        return tasks


@register_task
class Suite(Task):
    name = "suite"
    summary = "several tasks in one trial (a RULER-style suite), metrics also broken down per entry"
    Config = SuiteConfig
    budgets_per_sample = True  # each entry's max_new_tokens, or its task's own budget

    def __init__(self, config: SuiteConfig):
        super().__init__(config)
        self.parts: dict[str, tuple[Task, int | None]] = {}
        for entry, settings in config.tasks.items():
            task, rest, budget = _entry(entry, settings)
            self.parts[entry] = (build_task(task, rest), budget)
        self.has_lengths = any(part.has_lengths for part, _ in self.parts.values())
        self.default_max_new_tokens = max(budget or part.default_max_new_tokens for part, budget in self.parts.values())

    @property
    def context_lengths(self) -> list[int]:
        return sorted({n for part, _ in self.parts.values() for n in part.context_lengths})

    @property
    def groups(self) -> list[str]:
        return list(self.parts)

    def length_requests(self) -> list[tuple[str, int, int]]:
        return [(f"tasks.{entry}.{field}", n, budget or own) for entry, (part, budget) in self.parts.items()
                for field, n, own in part.length_requests()]

    def build(self, tokenizer: Any, seed: int, window: int | None = None) -> list[Sample]:
        samples = []
        for entry, (part, budget) in self.parts.items():
            # A part reserves its default budget inside the window it is given: shift it to reserve the entry's.
            shifted = None if window is None else window - (budget or part.default_max_new_tokens) + part.default_max_new_tokens
            try:
                built = part.build(tokenizer, seed, shifted)
            except TaskInputError as error:
                raise TaskInputError(f"tasks.{entry}.{error.field}", str(error)) from None
            for sample in built:
                sample_id = sample.sample_id if entry == part.name else f"{entry}:{sample.sample_id}"
                samples.append(dataclasses.replace(
                    sample, sample_id=sample_id, group=entry,
                    max_new_tokens=sample.max_new_tokens or budget or part.default_max_new_tokens))
        return samples

    def score(self, sample: Sample, output: str, reference: str | None = None) -> dict[str, float]:
        part, _ = self.parts[sample.group]
        return part.score(sample, output, reference)

    def check(self) -> list[tuple[str, str]]:
        return [(f"tasks.{entry}.{field}", message) for entry, (part, _) in self.parts.items() for field, message in part.check()]

    def cache_identity(self) -> str:
        return "|".join(f"{entry}:{part.version}:{part.cache_identity()}" for entry, (part, _) in self.parts.items())
