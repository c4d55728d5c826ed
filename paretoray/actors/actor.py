"""Ray at the edge: the `TrialRunner` class placed as an actor with the resources a sweep asks for."""

from __future__ import annotations

from typing import Any

import ray

from paretoray.actors.runner import TrialRunner


def create_actor(
    model: str,
    *,
    num_cpus: float,
    num_gpus: float,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    name: str | None = None,
    draft: str | None = None,
) -> Any:
    """Start one actor hosting `model`; `num_gpus` may be fractional to pack small models.

    The actor loads its model once (in its constructor) and then serves many `run_trial` calls.
    No automatic restarts: the controller decides what to do with a dead actor's trial.
    """
    threads = max(1, int(num_cpus))
    remote_cls = ray.remote(TrialRunner)
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": 0, "max_task_retries": 0}
    if name:
        options["name"] = name
    return remote_cls.options(**options).remote(
        model,
        dtype=dtype,
        device="cuda" if num_gpus > 0 else "cpu",
        attn_implementation=attn_implementation,
        threads=threads,
        draft=draft,
    )
