"""The workload a trial is measured on: settings every task shares, plus the task's own.

One definition for both sides: the sweep spec's `workload` section *is* this model (validated at the
spec boundary), and the runner reads the same dict back with it. The task's own settings (lengths,
a data file, a metric...) are the remaining keys, validated by the task's `Config`
(`paretoray.actors.tasks`). Nothing here imports torch.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from paretoray.actors.declarations import Param
from paretoray.actors.tasks import Task, available_tasks, build_task

MAX_BATCH = 256
# One batch size, as a technique parameter is declared: what a spec's `workload.batch_size` (a value,
# choices or a range) is checked against, and the dimension a swept batch size becomes.
BATCH_SIZE = Param("int", 1, low=1, high=MAX_BATCH, doc="sequences decoded together")
BATCH_DIMENSION = "workload.batch_size"  # its name among a trial's params (no technique declares a dotted name)


class Workload(BaseModel):
    # Unknown keys are the task's settings (checked by the task's Config, with field paths).
    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)

    task: str = Field("passkey", description="a registered task (`paretoray tasks` lists them)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds the samples (and subsets) the task builds")
    max_new_tokens: int | None = Field(
        None, ge=1, le=4096, description="tokens to generate; default: the task's own budget (a dataset row's column wins)"
    )
    fidelity: bool = Field(True, description="also teacher-force dense's continuation and report next-token agreement")
    query_placement: Literal["query_aware", "context_only"] = Field(
        "query_aware",
        description="query_aware: the question is part of the compressed prompt (SnapKV's setting); "
        "context_only: the context is compressed first, then the question is asked (a cached document)",
    )
    repeats: int = Field(
        1, ge=1, le=50, description="paired timings per sample: dense and the technique back to back, order alternated"
    )
    batch_size: int | list[int] | dict[str, int] = Field(
        1,
        description=f"sequences decoded together (1 to {MAX_BATCH}): a number, or a list of choices or "
        "{low, high[, step]} that every technique's search space gets as the dimension `workload.batch_size`. "
        "Each sequence is prefilled alone, then the batch decodes together, each exactly as it would alone",
    )
    batch_lengths: Literal["same", "mixed"] = Field(
        "same",
        description="same: a batch holds samples of one context length (a length's last batch may be smaller); "
        "mixed: consecutive samples whatever their lengths, as a server batches requests",
    )
    min_dense_accuracy: float = Field(
        0.5, ge=0.0, le=1.0, description="below this dense accuracy the report marks the task uninformative on this model"
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        registry = available_tasks()
        if task not in registry:
            raise ValueError(f"unknown task {task!r}; available: {', '.join(registry)}")
        return task

    @field_validator("batch_size", mode="plain")  # checked here alone: errors name workload.batch_size, not a union member
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        allowed = f"expected a number of sequences ({BATCH_SIZE.describe()}), a list of them, or {{low, high[, step]}}"
        if isinstance(value, list):
            if not value:
                raise ValueError(f"an empty list of choices; {allowed}")
            for i, choice in enumerate(value):
                if why := BATCH_SIZE.check(choice):
                    raise ValueError(f"[{i}]: {why} ({allowed})")
            return [int(choice) for choice in value]
        if isinstance(value, dict):
            if not {"low", "high"} <= set(value) <= {"low", "high", "step"}:
                raise ValueError(f"{allowed}, got keys {sorted(map(str, value))}")
            for key in ("low", "high"):
                if why := BATCH_SIZE.check(value[key]):
                    raise ValueError(f"{key}: {why} ({allowed})")
            step = value.get("step", 1)
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise ValueError(f"step: expected a positive integer, got {step!r}")
            if value["low"] > value["high"]:
                raise ValueError(f"low ({value['low']}) must not exceed high ({value['high']})")
            return {key: int(number) for key, number in value.items()}
        if why := BATCH_SIZE.check(value):
            raise ValueError(f"{why} ({allowed})")
        return int(value)

    @property
    def swept_batch(self) -> bool:
        """batch_size is a list or a range: a dimension of every technique's search space."""
        return isinstance(self.batch_size, (list, dict))

    @property
    def max_batch(self) -> int:
        if isinstance(self.batch_size, list):
            return max(self.batch_size)
        return self.batch_size["high"] if isinstance(self.batch_size, dict) else self.batch_size

    @property
    def batch(self) -> int:
        """The batch size a trial runs (the trial's own choice where the spec sweeps it)."""
        if self.swept_batch:
            raise ValueError(f"workload.batch_size {self.batch_size!r} is swept: a trial runs one value "
                             f"(its `{BATCH_DIMENSION}` parameter)")
        return self.batch_size

    def task_settings(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @cached_property
    def task_object(self) -> Task:
        """The configured task (raises pydantic's ValidationError on bad settings: the spec checks first)."""
        return build_task(self.task, self.task_settings())

    def generation_budget(self, sample_max_new_tokens: int | None = None) -> int:
        return sample_max_new_tokens or self.max_new_tokens or self.task_object.default_max_new_tokens

    @property
    def key(self) -> str:
        """What the samples depend on (the runner keeps them by it): every setting but the batch size."""
        return json.dumps(self.model_dump(exclude={"batch_size", "batch_lengths"}), sort_keys=True)


def common_fields() -> set[str]:
    return set(Workload.model_fields)
