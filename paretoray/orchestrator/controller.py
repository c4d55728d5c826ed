"""The controller: Optuna ask/tell over a pool of Ray actors, MLflow as the record.

Data flows one way: the spec gives the search space; the controller asks Optuna for a trial,
sends it to a free actor, and when the actor returns a plain record it first logs the record to
MLflow, then tells Optuna. The controller is the only writer of both stores (no SQLite lock
contention), and because Optuna's storage holds the spec and the parent run id, a sweep resumes
by name: finished trials are neither re-run nor re-logged, trials that were running are reconciled
with what MLflow holds or asked again.

Actors come from an `ActorPool` (pool.py). A trial whose actor dies (killed, out of memory, its
node gone) is sent to another actor up to `actors.max_trial_retries` times, and a replacement
actor starts in the background; the loop never blocks on it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import Trial, TrialState
from tqdm import tqdm

from paretoray.orchestrator.pool import ActorPool, ActorStartError, PoolActor, actor_failure
from paretoray.orchestrator.recorder import Recorder
from paretoray.orchestrator.spec import Constraint, Dimension, SpecError, SweepSpec, constraints, grid_size, parse, search_space
from paretoray.orchestrator.stores import StoreError, Stores

SPEC_ATTR = "paretoray.spec"
SPEC_TEXT_ATTR = "paretoray.spec_text"
PARENT_ATTR = "paretoray.mlflow_parent_run_id"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why and what to do."""


# The front's artifacts (tables, a self-contained plotly page, a PNG) take about a second to write
# where a trial's record takes tens of milliseconds: refresh them at most every this many seconds
# (so they cost the controller a few percent of its time whatever the trial rate) and always at
# the end. The front's tags and the parent's counts read every trial from storage and cost about
# 15 ms on SQLite: they follow each trial, but at most once a second (a sweep of real trials
# updates them after every trial; a burst of fast ones does not pay for each).
FRONT_ARTIFACTS_EVERY_S = 30.0
FRONT_TAGS_EVERY_S = 1.0


@dataclass
class SweepResult:
    name: str
    trials_finished: int
    trials_failed: int
    rows: list[dict[str, Any]]
    parent_run_id: str
    wall_s: float
    trials_run: int = 0  # finished by this run (a resumed sweep's earlier trials excluded)
    trials_retried: int = 0  # times a trial was sent again because its actor died
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


@dataclass
class _Dispatch:
    """One trial on its way through actors: retried on another actor when the one it ran on died."""

    trial: Trial
    technique: str
    params: dict[str, Any]
    actor: PoolActor | None = None
    sent_at: float = 0.0
    actor_failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InFlightTrial:
    """What a trial in flight is running on (for operators and tests)."""

    trial: int
    attempt: int
    pid: int | None
    node_id: str | None
    gpu_ids: tuple[str, ...]
    running_s: float


# ---- Optuna ----------------------------------------------------------------------------------


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    # TPE's `group` and the brute-force sampler are marked experimental; the warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _make_sampler(spec)


def _make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.name == "nsga2":
        # A population of 50 (Optuna's default) would leave a 10-trial sweep purely random.
        population = s.population_size or max(4, min(50, spec.trials // 3))
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=population)
    if s.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=s.seed, n_startup_trials=s.n_startup_trials or 10, multivariate=True, group=True, constant_liar=True
        )
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials or 10)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return _ConditionalGridSampler(seed=s.seed)


class _ConditionalGridSampler(optuna.samplers.BruteForceSampler):
    """Optuna's GridSampler cannot express conditional spaces (each technique has its own
    parameters); BruteForceSampler enumerates exactly that finite tree. Its `after_trial` only
    stops `study.optimize` once the tree is exhausted, which raises under ask/tell, so the
    controller caps the trial count at the grid's size instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def suggest(trial: Trial, space: dict[str, list[Dimension]]) -> tuple[str, dict[str, Any]]:
    """Ask the trial for a technique, then for that technique's parameters (a conditional space)."""
    technique = trial.suggest_categorical("technique", list(space))
    params: dict[str, Any] = {}
    for dim in space[technique]:
        key = f"{technique}.{dim.name}"
        if dim.kind == "fixed":
            params[dim.name] = dim.value
        elif dim.kind == "categorical":
            params[dim.name] = trial.suggest_categorical(key, list(dim.choices))
        elif dim.kind == "int":
            params[dim.name] = trial.suggest_int(key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            params[dim.name] = trial.suggest_float(key, float(dim.low), float(dim.high), step=dim.step, log=dim.log)
    return technique, params


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if not t.user_attrs.get("interrupted")
    ]


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


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
                print(f"note: Ray Client at {address} refused the connection ({str(error).splitlines()[0]}); "
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
    from paretoray.actors.models import ModelLoadError, load_tokenizer
    from paretoray.actors.tasks import TaskInputError
    from paretoray.actors.tasks.cache import cached_samples
    from paretoray.actors.techniques import available_techniques

    registry = available_techniques()
    if not any(registry[name].uses_model for name in spec.techniques if name in registry):
        return 0
    if remote and not Path(spec.model.id).expanduser().is_dir():
        # A registry model would be de-quantized here, on the driver, only to read its tokenizer.
        print("note: the actors build the samples (the model is not a local directory here)", file=sys.stderr)
        return 0
    try:
        tokenizer, window = load_tokenizer(spec.model.id)
    except ModelLoadError as error:
        if remote:
            print(f"note: samples are built by the actors ({error})", file=sys.stderr)
            return 0
        raise SweepError(str(error)) from None
    workload = spec.workload
    try:
        samples = cached_samples(workload.task_object, tokenizer, workload.seed, window, workload.max_new_tokens)
    except TaskInputError as error:
        raise SpecError(f"sweep {spec.name!r}", [(f"workload.{error.field}", str(error))]) from None
    return len(samples)


# ---- the sweep -------------------------------------------------------------------------------


@dataclass
class _LoopStats:
    finished: int = 0
    failed: int = 0
    retried: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0


def _configurations(study: optuna.Study) -> Counter[str]:
    """How many trials measured (complete) or are measuring (running) each configuration, by comparable key.

    Counted, not a set: a configuration run again after too many repeats that then fails must not
    forget the earlier trial that measured it."""
    return Counter(
        json.dumps(t.params, sort_keys=True)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    )


def _note_gpus_unused(actors: list[PoolActor]) -> None:
    """Ray hands out declared GPUs whether or not CUDA is there; say so when the actors run on CPU."""
    idle_gpus = sorted({g for a in actors if a.info.get("device") == "cpu" for g in a.info.get("gpu_ids", [])})
    if idle_gpus:
        print(f"note: Ray gave the actors GPUs {', '.join(idle_gpus)} but they see no CUDA device: they run on CPU "
              "(their records say device cpu and name the GPU ids)", file=sys.stderr)


class Controller:
    def __init__(self, spec: SweepSpec, stores: Stores, spec_text: str | None = None):
        self.spec = spec
        self.name = spec.name or "sweep"
        self.stores = stores
        self.spec_text = spec_text
        self.spec_json = json.loads(spec.model_dump_json())
        self.space = search_space(spec)
        self.constraints: list[Constraint] = constraints(spec)
        self.objectives = list(spec.objectives)
        self.storage = stores.optuna_storage()
        self._in_flight: dict[Any, _Dispatch] = {}

    @classmethod
    def for_resume(cls, name: str, stores: Stores) -> Controller:
        try:
            study = stores.load_study(name)
        except StoreError as error:
            raise SweepError(str(error)) from None
        spec = parse(study.user_attrs[SPEC_ATTR], f"sweep {name!r} (stored spec)")
        return cls(spec, stores, study.user_attrs.get(SPEC_TEXT_ATTR))

    def run(self, *, resume: bool = False, trials: int | None = None, ray_address: str | None = None, progress: bool = True) -> SweepResult:
        started = time.perf_counter()
        exists = study_exists(self.storage, self.name)
        if exists and not resume:
            raise SweepError(
                f"a sweep named {self.name!r} already exists in {self.stores.storage}; "
                f"continue it with `paretoray sweep resume {self.name}` or pick another `--name`"
            )
        target = trials or self.spec.trials
        points = grid_size(self.space) if self.spec.sampler.name == "grid" else None
        if points is not None and target > points:
            print(f"note: the grid has {points} points; running {points} trials instead of {target}", file=sys.stderr)
            target = points
        if ray_address is None:
            prepare_models(self.spec)
        prepare_samples(self.spec, remote=ray_address is not None)
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

        # From here on the actors hold GPUs and placement groups: every exit shuts them down first,
        # before anything that may fail again (an MLflow store that is down) gets a chance to.
        parent: str | None = None
        bar = None
        finished = False
        try:
            recorder = Recorder(self.stores, self.name)
            directions = [self.spec.objectives[o] for o in self.objectives]
            study = optuna.create_study(
                study_name=self.name, storage=self.storage, directions=directions, sampler=make_sampler(self.spec),
                load_if_exists=resume,
            )
            if not exists:
                study.set_user_attr(SPEC_ATTR, self.spec_json)
                if self.spec_text is not None:
                    study.set_user_attr(SPEC_TEXT_ATTR, self.spec_text)
                study.set_user_attr("paretoray.objectives", self.objectives)
                study.set_user_attr(PARENT_ATTR, recorder.start_sweep(self.spec_json, self.spec_text))
            parent = study.user_attrs[PARENT_ATTR]
            if resume:
                recorder.reopen_sweep(parent)
                self._reconcile(study, recorder, parent)

            done_before = len(finished_trials(study))
            bar = tqdm(total=target, initial=min(done_before, target), desc=f"sweep {self.name}", unit="trial",
                       disable=not progress, dynamic_ncols=True)
            loop = self._trial_loop(study, recorder, parent, pool, target, done_before, bar)
            finished = True
        finally:
            if bar is not None:
                bar.close()
            never_started = pool.shutdown(busy=[d.actor for d in self._in_flight.values() if d.actor is not None])
            self._in_flight = {}
            if never_started:
                print(f"warning: {never_started} replacement actor(s) never started (the cluster had no room); removed",
                      file=sys.stderr)
            if not finished and parent is not None:
                try:
                    recorder.finish_sweep(parent, "KILLED")
                except Exception as error:  # the store that stopped the sweep; its own error is the one raised
                    print(f"warning: the sweep's parent run could not be marked KILLED: {type(error).__name__}: {error}",
                          file=sys.stderr)
        rows = recorder.update_front(parent, study, self.objectives, artifacts=True, final=True)
        recorder.finish_sweep(parent, "FINISHED")
        return SweepResult(
            self.name, done_before + loop.finished, loop.failed, rows, parent, time.perf_counter() - started,
            trials_run=loop.finished, trials_retried=loop.retried, actors_replaced=pool.replaced, controller_busy_s=loop.busy_s,
            loop_s=loop.wall_s,
        )

    def in_flight(self) -> list[InFlightTrial]:
        """The trials running now and the actors they run on; safe to call from another thread."""
        now = time.perf_counter()
        return [
            InFlightTrial(
                trial=d.trial.number,
                attempt=len(d.actor_failures) + 1,
                pid=d.actor.info.get("pid") if d.actor else None,
                node_id=d.actor.info.get("node_id") if d.actor else None,
                gpu_ids=tuple(d.actor.info.get("gpu_ids", ())) if d.actor else (),
                running_s=now - d.sent_at,
            )
            for d in self._in_flight.copy().values()  # a copy: the loop thread adds and removes entries
        ]

    def _trial_loop(self, study: optuna.Study, recorder: Recorder, parent: str, pool: ActorPool, target: int,
                    done: int, bar: tqdm) -> _LoopStats:
        """Ask, dispatch, collect, record, until `target` trials are finished.

        A trial whose actor dies goes back to the front of the queue (its Optuna trial stays
        RUNNING, the call is pure compute so it can run again) until it has failed
        `max_trial_retries + 1` times; then it is recorded as failed with every reason.
        """
        stats = _LoopStats()
        loop_started = time.perf_counter()
        retries: deque[_Dispatch] = deque()
        in_flight = self._in_flight
        max_retries = self.spec.actors.max_trial_retries
        artifacts_at, tags_at = time.perf_counter(), float("-inf")
        asked = _configurations(study)
        busy_from = time.perf_counter()
        while True:
            while pool.idle and retries:
                self._send(retries.popleft(), pool.idle.pop())
            while pool.idle and done + len(in_flight) + len(retries) < target:
                trial, technique, params = self._ask_new(study, asked)
                self._send(_Dispatch(trial, technique, params), pool.idle.pop())
            if not in_flight and not retries and done >= target:
                break
            timeout = None
            if not in_flight:
                timeout = pool.seconds_until_start_deadline()
                if timeout is None:
                    raise SweepError("every actor died and none could be replaced; finished trials are recorded, "
                                     f"continue with `paretoray sweep resume {self.name}`")
            stats.busy_s += time.perf_counter() - busy_from
            ready, _ = ray.wait([*in_flight, *pool.starting], num_returns=1, timeout=timeout)
            busy_from = time.perf_counter()
            if not ready:
                raise SweepError(f"no actor is left and no replacement started within {pool.start_timeout_s:.0f} s "
                                 f"(see `ray status`); continue with `paretoray sweep resume {self.name}` when the cluster has room")
            ref = ready[0]
            if ref in pool.starting:
                pool.started(ref)
                continue
            dispatch = in_flight.pop(ref)
            try:
                record = ray.get(ref)
                record["attempts"] = len(dispatch.actor_failures) + 1
                pool.idle.append(dispatch.actor)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:  # a lost result: its node left
                pool.lost(dispatch.actor)
                where = dispatch.actor.info
                dispatch.actor_failures.append(f"actor pid {where.get('pid')} on node {where.get('node_ip')} died: {actor_failure(error)}")
                if len(dispatch.actor_failures) <= max_retries:
                    print(f"warning: trial {dispatch.trial.number}: {dispatch.actor_failures[-1]}; sending it to another actor",
                          file=sys.stderr)
                    stats.retried += 1
                    retries.appendleft(dispatch)
                    continue
                record = self._dead_actor_record(dispatch)
            if dispatch.actor_failures:
                record["actor_failures"] = list(dispatch.actor_failures)
            ok = self._finish(study, recorder, parent, dispatch.trial, record, logged_before=False)
            if not ok:  # as before: a failed configuration may be proposed and measured again
                asked[json.dumps(dispatch.trial.params, sort_keys=True)] -= 1
            stats.failed += not ok
            stats.finished += 1
            done += 1
            bar.update(1)
            now = time.perf_counter()
            if now - tags_at < FRONT_TAGS_EVERY_S:
                continue
            refresh = now - artifacts_at >= FRONT_ARTIFACTS_EVERY_S
            rows = recorder.update_front(parent, study, self.objectives, artifacts=refresh)
            tags_at = time.perf_counter()
            if refresh:
                artifacts_at = tags_at
            bar.set_postfix_str(self._progress_note(rows), refresh=True)
        stats.busy_s += time.perf_counter() - busy_from
        stats.wall_s = time.perf_counter() - loop_started
        return stats

    def _send(self, dispatch: _Dispatch, actor: PoolActor) -> None:
        request = {"trial": dispatch.trial.number, "technique": dispatch.technique, "params": dispatch.params,
                   "workload": self.spec_json["workload"]}
        dispatch.actor, dispatch.sent_at = actor, time.perf_counter()
        self._in_flight[actor.handle.run_trial.remote(request)] = dispatch

    # ---- per trial ------------------------------------------------------------------------

    def _ask_new(self, study: optuna.Study, seen: Counter[str] | None = None, max_repeats: int = 25) -> tuple[Trial, str, dict[str, Any]]:
        """Ask until Optuna proposes a configuration not measured or in flight already.

        A technique without parameters (dense) or a narrow integer range is proposed again and
        again; re-measuring it spends a trial on noise. Repeats are told PRUNED (not counted,
        not logged), as Optuna's FAQ suggests; after `max_repeats` in a row the space is
        exhausted in practice and the repeat is run. `seen` (the configurations measured or in
        flight, see `_configurations`) is read from the study when not given, and the asked
        configuration is added to it.
        """
        seen = _configurations(study) if seen is None else seen
        for attempt in range(max_repeats + 1):
            trial = study.ask()
            technique, params = suggest(trial, self.space)
            key = json.dumps(trial.params, sort_keys=True)
            if not seen[key] or attempt == max_repeats:
                break
            trial.set_user_attr("repeat_of_measured_config", True)
            study.tell(trial, state=TrialState.PRUNED)
        seen[key] += 1
        return trial, technique, params

    def _finish(self, study: optuna.Study, recorder: Recorder, parent: str, trial: Trial, record: dict[str, Any],
                logged_before: bool = True) -> bool:
        """Log to MLflow first, then tell Optuna (resume relies on this order).

        `logged_before=False` skips looking for an earlier run of this trial: true of every trial
        the loop finishes (asked by this run, logged once), not of those a resume reconciles.
        """
        values = None
        if record.get("status") == "ok":
            metrics = record["metrics"]
            values = [metrics.get(name) for name in self.objectives]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                record = {**record, "status": "failed", "error": f"objective values not finite: {dict(zip(self.objectives, values))}"}
                values = None
        run_id = recorder.log_trial(parent, trial.number, record, self.spec_json, may_exist=logged_before)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("technique", record.get("technique"))
        trial.set_user_attr("label", record.get("label", ""))
        trial.set_user_attr("params", record.get("params", {}))
        trial.set_user_attr("actor", {k: record.get("actor", {}).get(k) for k in ("node_ip", "gpu_ids", "pid")})
        if values is None:
            trial.set_user_attr("error", str(record.get("error"))[:2000])
            study.tell(trial, state=TrialState.FAIL)
            return False
        trial.set_user_attr("metrics", {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and math.isfinite(v)})
        for constraint in self.constraints:
            trial.set_constraint(str(constraint), constraint.violation(record["metrics"]))
        study.tell(trial, values)
        return True

    def _reconcile(self, study: optuna.Study, recorder: Recorder, parent: str) -> None:
        """Trials left RUNNING by a controller that died: keep what MLflow finished, re-ask the rest."""
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = Trial(study, frozen._trial_id)
            run = recorder.find_trial_run(parent, frozen.number)
            if run is not None and run.info.status in ("FINISHED", "FAILED"):
                self._finish(study, recorder, parent, trial, recorder.load_record(run.info.run_id))
                continue
            if run is not None:
                recorder.discard_run(run.info.run_id)
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(frozen.params, skip_if_exists=False)

    def _dead_actor_record(self, dispatch: _Dispatch) -> dict[str, Any]:
        failures = dispatch.actor_failures
        return {
            "trial": dispatch.trial.number,
            "technique": dispatch.technique,
            "params": dispatch.params,
            "status": "failed",
            "attempts": len(failures),
            "error": f"actor died {len(failures)} time(s) (max_trial_retries {self.spec.actors.max_trial_retries}): "
                     + "; ".join(failures),
            "traceback": None,
            "actor": dict(dispatch.actor.info) if dispatch.actor else {},
        }

    def _progress_note(self, rows: list[dict[str, Any]]) -> str:
        complete = [r for r in rows if r["state"] == "complete"]
        if not complete:
            return "no complete trial yet"
        parts = [f"front {sum(r['pareto'] for r in rows)}"]
        for name in self.objectives:
            direction = self.spec.objectives[name]
            values = [r["metrics"][name] for r in complete if name in r["metrics"]]
            if values:
                best = max(values) if direction == "maximize" else min(values)
                parts.append(f"best {name} {best:.4g}")
        return ", ".join(parts)
