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

from paretoray.actors.tasks import Task, available_tasks, build_task


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
        return json.dumps(self.model_dump(), sort_keys=True)


def common_fields() -> set[str]:
    return set(Workload.model_fields)
