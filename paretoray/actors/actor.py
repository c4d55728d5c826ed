"""Ray at the edge: the `TrialRunner` class placed as an actor with the resources a sweep asks for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from paretoray.actors.runner import TrialRunner


@dataclass(frozen=True)
class Placement:
    """What one actor is given and where it may run: the sweep's `actors` section in Ray's terms.

    - `num_gpus` < 1 shares a GPU: Ray packs 1/num_gpus actors on each.
    - `num_gpus` = 1 gives each actor a GPU of its own.
    - `num_gpus` > 1 (whole) reserves that many GPUs of one node in a placement group per actor,
      one bundle that the actor holds whole: it sees them all (the model loads on the first).
    - `spread` asks Ray's SPREAD strategy to use as many nodes as it can (actors without a
      placement group only: a multi-GPU actor goes where a node has its GPUs free).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    spread: bool = False

    @property
    def uses_placement_group(self) -> bool:
        return self.num_gpus > 1

    @property
    def device(self) -> str | None:
        """The runner's device: CPU when no GPU is asked; otherwise None, which the runner resolves in
        its own process to CUDA when it sees a device (Ray sets CUDA_VISIBLE_DEVICES to exactly the
        GPUs it assigned) and to CPU when it does not, as on a cluster that only declares GPUs."""
        return "cpu" if self.num_gpus == 0 else None


@dataclass
class PlacedActor:
    """A started actor and the reservation it runs in (None: plain resources)."""

    handle: Any
    placement_group: PlacementGroup | None = None

    def kill(self) -> None:
        """Stop the actor (a dead one too) and give its reserved GPUs back."""
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # already gone: nothing to stop
            pass
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass
            self.placement_group = None


def create_actor(
    model: str,
    placement: Placement,
    *,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    name: str | None = None,
    draft: str | None = None,
    builders: dict[str, Any] | None = None,
    compile: bool | str = False,
    compile_horizon: dict[str, int] | None = None,
) -> PlacedActor:
    """Start one actor hosting `model` with `placement`'s resources; returns at once (Ray schedules it).

    The actor loads its model once (in its constructor) and then serves many `run_trial` calls.
    No automatic restarts and no automatic retries: the controller decides what happens to a dead
    actor's trial and starts replacements where the cluster has room.
    """
    threads = max(1, int(placement.num_cpus))
    options: dict[str, Any] = {
        "num_cpus": placement.num_cpus,
        "num_gpus": placement.num_gpus,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    group = None
    if placement.uses_placement_group:
        group = placement_group([{"CPU": placement.num_cpus, "GPU": placement.num_gpus}], strategy="STRICT_PACK")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
        )
    elif placement.spread:
        options["scheduling_strategy"] = "SPREAD"
    if name:
        options["name"] = name
    handle = ray.remote(TrialRunner).options(**options).remote(
        model,
        dtype=dtype,
        device=placement.device,
        attn_implementation=attn_implementation,
        threads=threads,
        draft=draft,
        builders=builders,
        compile=compile,
        compile_horizon=compile_horizon,
    )
    return PlacedActor(handle, group)
