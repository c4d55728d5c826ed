"""The sweep's actors: started with the spec's placement, handed out idle, replaced when they die.

The controller owns the pool and never blocks on it after the first start: a replacement's
`describe()` reference sits in the controller's `ray.wait` set beside the trials in flight, and
the replacement joins the idle actors when that reference resolves. If the cluster has no room
for it, it stays pending (Ray keeps the request) and is removed when the sweep ends.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from paretoray.actors.actor import Placement, PlacedActor, create_actor
from paretoray.recipes import builders
from paretoray.orchestrator.spec import SweepSpec


def compile_horizon(spec) -> dict[str, int]:
    """What `compile: auto` weighs compilation against on a CPU: the trials each actor can expect
    and the graphs it may compile (dense's, and one per swept technique that compiles)."""
    from paretoray.actors.declarations import technique_declarations

    declared = technique_declarations(spec.techniques)
    compiling = [name for name in spec.techniques
                 if name in declared and declared[name].capabilities.get("static_decode")
                 and not declared[name].capabilities.get("is_reference")]
    return {"trials_per_actor": -(-spec.trials // spec.actors.count), "graphs": 1 + len(compiling)}


class ActorStartError(RuntimeError):
    """The sweep's first actors could not start; the message says why."""


@dataclass
class PoolActor:
    """A ready actor and what it reported about itself: pid, node_id, node_ip, gpu_ids, device ..."""

    placed: PlacedActor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def handle(self) -> Any:
        return self.placed.handle


def actor_failure(error: BaseException) -> str:
    """One line for an actor that died or could not start; a model loader's own reason when it has one."""
    text = (getattr(error, "error_msg", None) or str(error)).strip()
    loader = next((line for line in reversed(text.splitlines()) if "ModelLoadError:" in line), None)
    if loader is not None:
        return loader.split("ModelLoadError: ")[-1].strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:500]}"


def dead_nodes() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if not node.get("Alive", True)}


class ActorPool:
    def __init__(self, spec: SweepSpec, start_timeout_s: float = 900.0):
        self.spec = spec
        self.placement = Placement(num_cpus=spec.actors.num_cpus, num_gpus=spec.actors.num_gpus, spread=spec.actors.spread)
        self.start_timeout_s = start_timeout_s
        self.idle: list[PoolActor] = []
        # describe() reference of each actor still starting -> (the actor, when it was asked for)
        self.starting: dict[Any, tuple[PlacedActor, float]] = {}
        self.replaced = 0

    def _launch(self) -> None:
        model = self.spec.model
        placed = create_actor(
            model.id, self.placement, dtype=model.dtype, attn_implementation=model.attn_implementation, draft=model.draft,
            builders=builders(), compile=model.compile, compile_horizon=compile_horizon(self.spec),
        )
        self.starting[placed.handle.describe.remote()] = (placed, time.monotonic())

    def start(self, count: int) -> list[PoolActor]:
        """Start the sweep's first `count` actors and wait until every one has loaded the model."""
        for _ in range(count):
            self._launch()
        refs = list(self.starting)
        try:
            infos = ray.get(refs, timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            actors = self.spec.actors
            raise ActorStartError(
                f"actors did not start within {self.start_timeout_s:.0f} s: the cluster may lack {actors.num_cpus} CPU / "
                f"{actors.num_gpus} GPU per actor for {count} actors (see `ray status`)"
            ) from None
        except ray.exceptions.RayActorError as error:
            self.shutdown()
            raise ActorStartError(f"an actor could not start: {actor_failure(error)}") from None
        except BaseException:  # Ctrl-C during a long model load: no actor or placement group outlives it
            self.shutdown()
            raise
        for ref, info in zip(refs, infos):
            placed, _ = self.starting.pop(ref)
            self.idle.append(PoolActor(placed, info))
        return list(self.idle)

    def started(self, ref: Any) -> PoolActor | None:
        """A replacement's describe() came back: it joins the idle actors, or is dropped if it failed."""
        placed, _ = self.starting.pop(ref)
        try:
            actor = PoolActor(placed, ray.get(ref))
        except ray.exceptions.RayActorError as error:
            placed.kill()
            print(f"warning: a replacement actor could not start: {actor_failure(error)}", file=sys.stderr)
            return None
        self.idle.append(actor)
        return actor

    def lost(self, actor: PoolActor) -> int:
        """`actor` died: stop it, drop idle actors of nodes that left the cluster, start one replacement
        for each. Returns how many replacements were asked for."""
        actor.placed.kill()
        gone = [actor]
        departed = dead_nodes()
        for other in list(self.idle):
            if other.info.get("node_id") in departed:
                self.idle.remove(other)
                other.placed.kill()
                gone.append(other)
        for _ in gone:
            self._launch()
        self.replaced += len(gone)
        return len(gone)

    def seconds_until_start_deadline(self) -> float | None:
        """Time left for the oldest pending replacement to start (None: none pending)."""
        if not self.starting:
            return None
        oldest = min(asked for _, asked in self.starting.values())
        return max(0.0, oldest + self.start_timeout_s - time.monotonic())

    def shutdown(self, busy: list[PoolActor] = ()) -> int:
        """Stop every actor (idle, `busy`, still starting). Returns how many never started."""
        never_started = len(self.starting)
        for actor in [*self.idle, *busy]:
            actor.placed.kill()
        for placed, _ in self.starting.values():
            placed.kill()
        self.idle, self.starting = [], {}
        return never_started
