"""The dispatcher: trials from the sweep book to free actors, and what happens when they do not return.

It owns the waiting: one `ray.wait` over the trials in flight and the replacement actors starting,
woken at the earliest trial deadline. A trial is retried on another actor, up to
`actors.max_trial_retries` times, when
- its actor died (killed, out of memory, its node gone),
- an error escaped the trial runner (a sticky CUDA error re-raised outside the trial's own
  try, say): the actor is presumed broken and replaced,
- it ran past its timeout: the actor is killed (the only way to stop a hung CUDA kernel or a
  deadlocked thread) and replaced;
and then recorded failed with every reason. Replacements start in the background; the loop never
blocks on them.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray

from paretoray.orchestrator.book import SweepBook, SweepError, Ticket
from paretoray.orchestrator.pool import ActorPool, PoolActor, actor_failure

LEASE_CHECK_S = 5.0  # the longest the loop sleeps without looking at its lease


class TrialTimeouts:
    """How long a trial may run before its actor is killed.

    `setting` is the spec's `actors.trial_timeout_s`: a number applies to every trial; "auto" gives
    each technique the timeout its family declares (`Technique.trial_timeout_s`: long enough for a
    first trial that also builds an artifact) until it has finished a trial in this sweep, then
    `AUTO_FACTOR` times its slowest finished trial, at least `AUTO_MIN_S`, at most the declared one.
    """

    AUTO_FACTOR = 10.0
    AUTO_MIN_S = 300.0

    def __init__(self, setting: float | str, declared: dict[str, float]):
        self.setting, self.declared = setting, declared
        self.slowest: dict[str, float] = {}

    def __call__(self, technique: str) -> float:
        if self.setting != "auto":
            return float(self.setting)
        declared = self.declared.get(technique, 3600.0)
        if technique not in self.slowest:
            return declared
        return min(declared, max(self.AUTO_MIN_S, self.AUTO_FACTOR * self.slowest[technique]))

    def observe(self, technique: str, wall_s: Any) -> None:
        if isinstance(wall_s, (int, float)) and math.isfinite(wall_s):
            self.slowest[technique] = max(self.slowest.get(technique, 0.0), float(wall_s))


@dataclass
class Dispatch:
    """One trial on its way through actors."""

    ticket: Ticket
    actor: PoolActor | None = None
    sent_at: float = 0.0
    deadline: float = math.inf
    failures: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per failure: "died", "raised" or "timed out"


@dataclass(frozen=True)
class InFlightTrial:
    """What a trial in flight is running on (for operators and tests)."""

    trial: int
    attempt: int
    pid: int | None
    node_id: str | None
    gpu_ids: tuple[str, ...]
    running_s: float


@dataclass
class LoopStats:
    finished: int = 0
    failed: int = 0
    retried: int = 0
    timed_out: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0


class Dispatcher:
    def __init__(self, book: SweepBook, pool: ActorPool, timeouts: TrialTimeouts, max_retries: int,
                 lease: Any = None, bar: Any = None):
        self.book, self.pool, self.timeouts, self.max_retries = book, pool, timeouts, max_retries
        self.lease, self.bar = lease, bar
        self.in_flight: dict[Any, Dispatch] = {}
        self.retries: deque[Dispatch] = deque()

    def busy_actors(self) -> list[PoolActor]:
        return [d.actor for d in self.in_flight.values() if d.actor is not None]

    def snapshot(self) -> list[InFlightTrial]:
        """The trials running now and the actors they run on; safe to call from another thread."""
        now = time.perf_counter()
        return [
            InFlightTrial(trial=d.ticket.number, attempt=len(d.failures) + 1, pid=d.actor.info.get("pid") if d.actor else None,
                          node_id=d.actor.info.get("node_id") if d.actor else None,
                          gpu_ids=tuple(d.actor.info.get("gpu_ids", ())) if d.actor else (), running_s=now - d.sent_at)
            for d in self.in_flight.copy().values()  # a copy: the loop thread adds and removes entries
        ]

    # ---- the loop -----------------------------------------------------------------------------

    def run(self, target: int) -> LoopStats:
        """Ask, dispatch, collect, record, until `target` trials are finished."""
        stats = LoopStats()
        started = busy_from = time.perf_counter()
        done_before = self.book.done
        while True:
            done = done_before + stats.finished
            self._check_lease()
            while self.pool.idle and self.retries:
                self._send(self.retries.popleft(), self.pool.idle.pop())
            while self.pool.idle and done + len(self.in_flight) + len(self.retries) < target:
                self._send(Dispatch(self.book.ask()), self.pool.idle.pop())
            if not self.in_flight and not self.retries and done >= target:
                break
            stats.busy_s += time.perf_counter() - busy_from
            ready, _ = ray.wait([*self.in_flight, *self.pool.starting], num_returns=1, timeout=self._wait_s())
            busy_from = time.perf_counter()
            if not ready:
                self._expire(stats)
                continue
            ref = ready[0]
            if ref in self.pool.starting:
                self.pool.started(ref)
                continue
            dispatch = self.in_flight.pop(ref)
            record = self._collect(ref, dispatch, stats)
            if record is None:  # sent again
                continue
            ok = self.book.finish(dispatch.ticket, record)
            if ok:
                self.timeouts.observe(dispatch.ticket.technique, record.get("wall_s"))
            stats.failed += not ok
            stats.finished += 1
            if self.bar is not None:
                self.bar.update(1)
            rows = self.book.refresh_front()
            if rows is not None and self.bar is not None:
                self.bar.set_postfix_str(self.book.progress_note(rows), refresh=True)
        stats.busy_s += time.perf_counter() - busy_from
        stats.wall_s = time.perf_counter() - started
        return stats

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise SweepError(f"this controller lost sweep {self.book.name!r}'s lease (it could not renew it for "
                             f"{self.lease.ttl_s:.0f} s, or another controller took it over); it stops here. Finished "
                             f"trials are recorded; `paretoray sweep resume {self.book.name}` continues")

    def _wait_s(self) -> float:
        """How long `ray.wait` may block: until the earliest trial deadline, the pool's start deadline
        when nothing is running, and never longer than the lease check interval."""
        now = time.perf_counter()
        wait = LEASE_CHECK_S
        if self.in_flight:
            wait = min(wait, min(d.deadline for d in self.in_flight.values()) - now)
        else:
            start = self.pool.seconds_until_start_deadline()
            if start is None:
                raise SweepError("every actor died and none could be replaced; finished trials are recorded, "
                                 f"continue with `paretoray sweep resume {self.book.name}`")
            if start <= 0:
                raise SweepError(f"no actor is left and no replacement started within {self.pool.start_timeout_s:.0f} s "
                                 f"(see `ray status`); continue with `paretoray sweep resume {self.book.name}` when the "
                                 "cluster has room")
            wait = min(wait, start)
        return max(0.0, wait)

    def _send(self, dispatch: Dispatch, actor: PoolActor) -> None:
        ticket = dispatch.ticket
        request = {"trial": ticket.number, "technique": ticket.technique, "params": ticket.params,
                   "workload": self.book.spec_json["workload"]}
        dispatch.actor, dispatch.sent_at = actor, time.perf_counter()
        dispatch.deadline = dispatch.sent_at + self.timeouts(ticket.technique)
        self.in_flight[actor.handle.run_trial.remote(request)] = dispatch

    def _collect(self, ref: Any, dispatch: Dispatch, stats: LoopStats) -> dict[str, Any] | None:
        """The trial's record, or None when it was sent again because its actor failed it."""
        try:
            record = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:  # a lost result: its node left
            return self._actor_failed(dispatch, "died", f"died: {actor_failure(error)}", stats)
        except ray.exceptions.RayTaskError as error:  # escaped the runner's own handling: the actor may be broken
            return self._actor_failed(dispatch, "raised", f"raised outside the trial runner: {actor_failure(error)}", stats)
        record["attempts"] = len(dispatch.failures) + 1
        if dispatch.failures:
            record["actor_failures"] = list(dispatch.failures)
        self.pool.idle.append(dispatch.actor)
        return record

    def _expire(self, stats: LoopStats) -> None:
        now = time.perf_counter()
        for ref, dispatch in list(self.in_flight.items()):
            if dispatch.deadline <= now:
                del self.in_flight[ref]
                stats.timed_out += 1
                limit = dispatch.deadline - dispatch.sent_at
                record = self._actor_failed(dispatch, "timed out", f"timed out after {limit:.0f} s (actors.trial_timeout_s); "
                                            "killed", stats)
                if record is not None:
                    self.book.finish(dispatch.ticket, record)
                    stats.failed += 1
                    stats.finished += 1
                    if self.bar is not None:
                        self.bar.update(1)

    def _actor_failed(self, dispatch: Dispatch, kind: str, what: str, stats: LoopStats) -> dict[str, Any] | None:
        """The actor is stopped and replaced; the trial goes back to the front of the queue (its
        Optuna trial stays RUNNING: the call is pure compute, it can run again), or, after
        `max_retries` retries, its failed record is returned."""
        where = dispatch.actor.info
        self.pool.lost(dispatch.actor)
        dispatch.failures.append(f"actor pid {where.get('pid')} on node {where.get('node_ip')} {what}")
        dispatch.kinds.append(kind)
        if len(dispatch.failures) <= self.max_retries:
            print(f"warning: trial {dispatch.ticket.number}: {dispatch.failures[-1]}; sending it to another actor", file=sys.stderr)
            stats.retried += 1
            self.retries.appendleft(dispatch)
            return None
        failures = dispatch.failures
        why = {"timed out": "timed out", "died": "actor died", "raised": "actor raised"}[kind] if len(set(dispatch.kinds)) == 1 \
            else "actor failed"
        return {
            "trial": dispatch.ticket.number,
            "technique": dispatch.ticket.technique,
            "params": dispatch.ticket.params,
            "status": "failed",
            "attempts": len(failures),
            "error": f"{why} on {len(failures)} attempt(s) (max_trial_retries {self.max_retries}): " + "; ".join(failures),
            "traceback": None,
            "actor": dict(dispatch.actor.info) if dispatch.actor else {},
            "actor_failures": list(failures),
        }
