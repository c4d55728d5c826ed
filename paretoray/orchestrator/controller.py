"""The controller: a sweep from start to end, composed of its parts.

Data flows one way: the spec gives the search space; the sweep book (book.py) asks Optuna for a
trial; the dispatcher (dispatcher.py) sends it to a free actor of the pool (pool.py) and waits;
the actor returns a plain record; the book logs it to MLflow, then tells Optuna. The controller is
the only writer of both stores, and because Optuna's storage holds the spec and the parent run id,
a sweep resumes by name.

Before anything starts, both stores must answer (`check_stores`) and this controller must hold the
sweep's lease (lease.py): a second controller of the same sweep stops there, naming the holder.
Every exit shuts the actors down and releases the lease.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
from tqdm import tqdm

from paretoray.names import PARENT_ATTR, SPEC_ATTR, SPEC_TEXT_ATTR  # noqa: F401  (re-exported for callers)
from paretoray.orchestrator.book import (  # noqa: F401  (re-exported)
    StoreOutage, SweepBook, SweepError, already_exists, bounded_http, check_stores, configurations, finished_trials, make_sampler,
    stored_spec, study_exists, suggest, sweep_state,
)
from paretoray.orchestrator.lease import LeaseHeld
from paretoray.orchestrator.recorder import ReportRenderer
from paretoray.orchestrator.spec import SpecError, SweepSpec, grid_size
from paretoray.orchestrator.stores import Stores, redact

if TYPE_CHECKING:  # the actors' code (torch, transformers: seconds) is imported when actors start, not before
    from paretoray.orchestrator.dispatcher import Dispatcher, InFlightTrial
    from paretoray.orchestrator.pool import PoolActor


@dataclass
class SweepResult:
    name: str
    trials_finished: int
    trials_failed: int
    rows: list[dict[str, Any]]
    parent_run_id: str
    wall_s: float
    trials_run: int = 0  # finished by this run (a resumed sweep's earlier trials excluded)
    trials_retried: int = 0  # times a trial was sent again because its actor died, failed it or timed out
    trials_timed_out: int = 0  # attempts that ran past their timeout
    actors_replaced: int = 0
    controller_busy_s: float = 0.0  # the trial loop's time outside `ray.wait` (see `overhead_ms_per_trial`)
    loop_s: float = 0.0  # the trial loop's wall time: from the first trial asked to the last one recorded

    @property
    def overhead_ms_per_trial(self) -> float:
        """The controller's own time per trial: asking Optuna, dispatching, logging to MLflow,
        telling Optuna, tagging the front. It is the trial loop's wall time minus the time it
        spent blocked in `ray.wait`, divided by the trials this run finished; actor start-up and
        the final front artifacts are outside the loop and not counted."""
        return 1000.0 * self.controller_busy_s / self.trials_run if self.trials_run else float("nan")


# ---- Ray -------------------------------------------------------------------------------------


def connect_ray(address: str | None, spec: SweepSpec) -> None:
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if address:
        # A Ray Client proxy starts one server process per connecting driver; on a loaded head that
        # start fails now and then ("Starting Ray client server failed"), and a second try succeeds.
        attempts = 3 if address.startswith("ray://") else 1
        for attempt in range(1, attempts + 1):
            try:
                ray.init(address=address, **quiet)
                return
            except ConnectionAbortedError as error:
                if attempt == attempts:
                    raise
                print(f"note: Ray Client at {redact(address)} refused the connection ({redact(str(error).splitlines()[0])}); "
                      f"retrying ({attempt}/{attempts - 1})", file=sys.stderr)
                time.sleep(2.0 * attempt)
    needed = spec.actors.count * spec.actors.num_cpus
    cpus = os.cpu_count() or 1
    if needed > cpus:
        print(f"note: {spec.actors.count} actors x {spec.actors.num_cpus} CPUs oversubscribe this machine's {cpus} cores; "
              "latency figures will include contention", file=sys.stderr)
    ray.init(num_cpus=max(cpus, math.ceil(needed)), **quiet)


def prepare_models(spec: SweepSpec) -> None:
    """Build registry models once here, with progress shown, before actors on this machine race for them.

    Only for a local cluster: on a remote one each node builds its own cache on first use.
    """
    from paretoray.actors.declarations import technique_declarations

    declared = technique_declarations(spec.techniques)
    if not any(declared[name].uses_model for name in spec.techniques if name in declared):
        return  # no trial loads the model (noop)
    from paretoray.actors import artifacts
    from paretoray.actors.models import ModelLoadError, resolve
    from paretoray.recipes import builders

    artifacts.install(builders())
    for ref in (spec.model.id, spec.model.draft):
        if ref:
            try:
                resolve(ref)
            except ModelLoadError as error:
                raise SweepError(str(error)) from None


def prepare_samples(spec: SweepSpec, remote: bool = False) -> int:
    """Build (or find cached) the workload's samples with the model's tokenizer, before Ray starts:
    a data row too long for the model's window, or a task that cannot be fitted, is a spec error
    naming the row, and the actors on this machine then read the samples from the cache.

    On a remote cluster the driver may not have the model: then the actors build them (a note says so).
    Returns the number of samples (0: not built here)."""
    from paretoray.actors.declarations import technique_declarations

    declared = technique_declarations(spec.techniques)
    if not any(declared[name].uses_model for name in spec.techniques if name in declared):
        return 0
    from paretoray.actors.models import ModelLoadError, load_tokenizer
    from paretoray.actors.tasks import TaskInputError
    from paretoray.actors.tasks.cache import cached_samples

    if remote and not Path(spec.model.id).expanduser().is_dir():
        # A registry model would be de-quantized here, on the driver, only to read its tokenizer.
        print("note: the actors build the samples (the model is not a local directory here)", file=sys.stderr)
        return 0
    try:
        tokenizer, window = load_tokenizer(spec.model.id)
    except ModelLoadError as error:
        if remote:
            print(f"note: samples are built by the actors ({redact(error)})", file=sys.stderr)
            return 0
        raise SweepError(str(error)) from None
    workload = spec.workload
    try:
        samples = cached_samples(workload.task_object, tokenizer, workload.seed, window, workload.max_new_tokens)
    except TaskInputError as error:
        raise SpecError(f"sweep {spec.name!r}", [(f"workload.{error.field}", str(error))]) from None
    return len(samples)


def _note_gpus_unused(actors: list[PoolActor]) -> None:
    """Ray hands out declared GPUs whether or not CUDA is there; say so when the actors run on CPU."""
    idle_gpus = sorted({g for a in actors if a.info.get("device") == "cpu" for g in a.info.get("gpu_ids", [])})
    if idle_gpus:
        print(f"note: Ray gave the actors GPUs {', '.join(idle_gpus)} but they see no CUDA device: they run on CPU "
              "(their records say device cpu and name the GPU ids)", file=sys.stderr)


class Controller:
    def __init__(self, spec: SweepSpec, stores: Stores, spec_text: str | None = None, report: ReportRenderer | None = None):
        self.spec = spec
        self.name = spec.name or "sweep"
        self.stores = stores
        self.spec_text = spec_text
        self.report = report
        self.objectives = list(spec.objectives)
        self.book = SweepBook(spec, stores, spec_text, report=report)
        self.spec_json = self.book.spec_json
        self._dispatcher: Dispatcher | None = None

    @classmethod
    def for_resume(cls, name: str, stores: Stores, report: ReportRenderer | None = None) -> Controller:
        spec, text = stored_spec(stores, name)
        return cls(spec, stores, text, report=report)

    def in_flight(self) -> list[InFlightTrial]:
        """The trials running now and the actors they run on; safe to call from another thread."""
        dispatcher = self._dispatcher
        return dispatcher.snapshot() if dispatcher is not None else []

    def run(self, *, resume: bool = False, trials: int | None = None, ray_address: str | None = None,
            progress: bool = True) -> SweepResult:
        started = time.perf_counter()
        check_stores(self.stores)
        try:
            lease = self.stores.lease(self.name)
        except LeaseHeld as held:
            raise SweepError(str(held)) from None
        try:
            return self._run(lease, started, resume, trials, ray_address, progress)
        finally:
            lease.release()

    def _run(self, lease: Any, started: float, resume: bool, trials: int | None, ray_address: str | None,
             progress: bool) -> SweepResult:
        book = self.book
        storage = self.stores.optuna_storage()
        state = sweep_state(storage, self.name)
        if state == "created" and not resume:
            raise already_exists(self.name, self.stores)  # before models and samples are prepared
        target = trials or self.spec.trials
        points = grid_size(book.space) if self.spec.sampler.name == "grid" else None
        if points is not None and target > points:
            print(f"note: the grid has {points} points; running {points} trials instead of {target}", file=sys.stderr)
            target = points
        nothing_to_run = state == "created" and len(finished_trials(optuna.load_study(study_name=self.name, storage=storage))) >= target
        if not nothing_to_run:  # a resume of a finished sweep only reconciles and redraws its front
            if ray_address is None:
                prepare_models(self.spec)
            prepare_samples(self.spec, remote=ray_address is not None)
        book.open(resume=resume)
        done_before = book.done
        pool: ActorPool | None = None
        bar = None
        finished = False
        stats = None
        try:
            if done_before < target:  # else: nothing to run, no Ray (a resume of a finished sweep)
                from paretoray.orchestrator.dispatcher import Dispatcher, TrialTimeouts
                from paretoray.orchestrator.pool import ActorPool, ActorStartError

                connect_ray(ray_address, self.spec)
                gpus = ray.cluster_resources().get("GPU", 0)
                if ray_address is None and self.spec.actors.num_gpus > gpus:
                    raise SweepError(f"actors.num_gpus is {self.spec.actors.num_gpus} but this machine has {gpus:g} GPU(s): "
                                     "set actors.num_gpus: 0, or run on a cluster with --ray-address")
                pool = ActorPool(self.spec)
                try:
                    _note_gpus_unused(pool.start(self.spec.actors.count))
                except ActorStartError as error:
                    raise SweepError(str(error)) from None
                bar = tqdm(total=target, initial=min(done_before, target), desc=f"sweep {self.name}", unit="trial",
                           disable=not progress, dynamic_ncols=True)
                self._dispatcher = Dispatcher(book, pool, TrialTimeouts(self.spec.actors.trial_timeout_s, declared_timeouts(self.spec.techniques)),
                                              self.spec.actors.max_trial_retries, lease=lease, bar=bar)
                stats = self._dispatcher.run(target)
            finished = True
        finally:
            if bar is not None:
                bar.close()
            if pool is not None:
                # The actors hold GPUs and placement groups: shut down before anything that may fail
                # again (a store that is down) gets a chance to.
                busy = self._dispatcher.busy_actors() if self._dispatcher is not None else []
                never_started = pool.shutdown(busy=busy)
                if never_started:
                    print(f"warning: {never_started} replacement actor(s) never started (the cluster had no room); removed",
                          file=sys.stderr)
            self._dispatcher = None
            if not finished:
                try:
                    book.close("KILLED")
                except Exception as error:  # the store that stopped the sweep; its own error is the one raised
                    print(f"warning: the sweep's parent run could not be marked KILLED: {type(error).__name__}: "
                          f"{redact(error)}"[:500], file=sys.stderr)
        rows = book.refresh_front(final=True)
        book.close("FINISHED")
        return SweepResult(
            self.name, done_before + (stats.finished if stats else 0), stats.failed if stats else 0, rows or [], book.parent,
            time.perf_counter() - started, trials_run=stats.finished if stats else 0,
            trials_retried=stats.retried if stats else 0, trials_timed_out=stats.timed_out if stats else 0,
            actors_replaced=pool.replaced if pool else 0, controller_busy_s=stats.busy_s if stats else 0.0,
            loop_s=stats.wall_s if stats else 0.0,
        )


def declared_timeouts(names=()) -> dict[str, float]:
    """Each technique's family timeout for a trial (`Technique.trial_timeout_s`), from its declarations."""
    from paretoray.actors.declarations import technique_declarations

    return {name: float(d.capabilities.get("trial_timeout_s", 3600.0)) for name, d in technique_declarations(names).items()}
