"""The sweep book: a sweep's two stores, kept consistent, without Ray.

The Optuna study holds the search (asked, told, constrained trials) and the spec; MLflow holds
every trial's record under one parent run. The book asks for trials, records finished ones
(MLflow first, then Optuna, which is what lets a resumed sweep reconcile), reconciles trials a
dead controller left running, and refreshes the front. The dispatcher (dispatcher.py) decides
where and when trials run; tests drive the book directly.

Creation happens in a fixed order and is recoverable at every step: study -> spec attributes ->
parent run -> the parent's id on the study (`PARENT_ATTR`, written last). A study without the
parent's id is half-created: `open()` finishes it (adopting a parent run already made) instead of
refusing it. Every store call goes through `StoreCalls`: bounded retries of transient errors, then
`StoreOutage` naming the store.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from paretoray.names import OBJECTIVES_ATTR, PARENT_ATTR, SPEC_ATTR, SPEC_TEXT_ATTR
from paretoray.orchestrator.recorder import Recorder, ReportRenderer
from paretoray.orchestrator.spec import Constraint, Dimension, SpecError, SweepSpec, constraints, parse, search_space
from paretoray.orchestrator.stores import Stores, initialize_sqlite, redact

T = TypeVar("T")

# The front's artifacts (tables, a plotly page, a PNG) take about a second to write where a trial's
# record takes tens of milliseconds: refreshed at most every this many seconds and at the end. The
# front's tags and the parent's counts (about 15 ms on SQLite) at most once a second.
FRONT_ARTIFACTS_EVERY_S = 30.0
FRONT_TAGS_EVERY_S = 1.0


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why and what to do."""


class StoreOutage(SweepError):
    """A store stopped answering (after bounded retries)."""


# ---- store calls ----------------------------------------------------------------------------

_PERMANENT_MLFLOW_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
                           "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_STATE"}


def transient(error: BaseException) -> bool:
    """An error a store may not give again: a connection refused or reset, a timeout, a lock wait."""
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    if isinstance(error, (ConnectionError, TimeoutError, OSError)):
        return True
    if isinstance(error, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError):
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, MlflowException):
        return error.error_code not in _PERMANENT_MLFLOW_CODES
    try:
        import requests

        return isinstance(error, requests.exceptions.RequestException)
    except ImportError:
        return False


@dataclass
class StoreCalls:
    """Store calls with bounded retries: `attempts` tries, `backoff_s` doubling between them
    (1+2+4+8 s by default: a restart of a database or a tracking server is ridden out, an outage
    ends the sweep in well under a minute, plus MLflow's own HTTP retries, capped in `bounded_http`)."""

    sweep: str
    stores: Stores | None = None
    attempts: int = 5
    backoff_s: float = 1.0

    def _which(self, store: str, error: BaseException) -> str:
        """The store an error came from, by name and (redacted) address: `store` names it, or is
        "stores" for a call that writes both (then the error's type tells)."""
        from mlflow.exceptions import MlflowException

        if store == "stores":
            from_mlflow = isinstance(error, MlflowException) or type(error).__module__.startswith(("requests", "urllib3"))
            store = "MLflow tracking store" if from_mlflow else "Optuna study storage"
        if self.stores is None:
            return store
        return f"{store} {redact(self.stores.tracking_uri if store.startswith('MLflow') else self.stores.storage)}"

    def __call__(self, store: str, what: str, call: Callable[[], T]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except Exception as error:
                if not transient(error):
                    raise
                if attempt == self.attempts:
                    raise StoreOutage(
                        f"the {self._which(store, error)} stopped answering ({what}: {redact(type(error).__name__)}: "
                        f"{redact(str(error).splitlines()[0] if str(error) else '')[:300]}) after {self.attempts} tries; "
                        f"finished trials are recorded. Continue with `paretoray sweep resume {self.sweep}` "
                        "once it is back"
                    ) from None
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")


def bounded_http() -> None:
    """MLflow's HTTP client retries a dead server for minutes by default (7 tries, backoff 2);
    the sweep's own retries sit above it, so each call is capped to a few seconds of retrying."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def check_stores(stores: Stores, timeout_s: float = 12.0) -> None:
    """Both stores answer within `timeout_s`, or StoreOutage naming the one that does not."""
    import threading

    from mlflow.tracking import MlflowClient

    bounded_http()
    try:
        initialize_sqlite(stores)
    except Exception as error:
        raise StoreOutage(f"a SQLite store could not be created: {type(error).__name__}: {redact(error)[:300]}; nothing was started") from None
    probes = {
        f"Optuna study storage {redact(stores.storage)}":
            lambda: optuna.get_all_study_summaries(stores.optuna_storage(), include_best_trial=False),
        f"MLflow tracking store {redact(stores.tracking_uri)}":
            lambda: MlflowClient(stores.tracking_uri).search_experiments(max_results=1),
    }
    outcome: dict[str, BaseException | None] = {}

    def probe(name: str, call: Callable[[], Any]) -> None:
        try:
            call()
            outcome[name] = None
        except BaseException as error:  # reported below
            outcome[name] = error

    threads = [threading.Thread(target=probe, args=item, daemon=True) for item in probes.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    for name in probes:
        if name not in outcome:
            raise StoreOutage(f"the {name} did not answer within {timeout_s:.0f} s; nothing was started")
        error = outcome[name]
        if error is not None:
            first = str(error).splitlines()[0] if str(error) else ""
            raise StoreOutage(f"the {name} cannot be used: {type(error).__name__}: {redact(first)[:300]}; nothing was started")


# ---- Optuna ---------------------------------------------------------------------------------


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    # TPE's `group` and the brute-force sampler are marked experimental; the warning is noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        s = spec.sampler
        if s.name == "nsga2":
            # A population of 50 (Optuna's default) would leave a 10-trial sweep purely random.
            population = s.population_size or max(4, min(50, spec.trials // 3))
            return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=population)
        if s.name == "tpe":
            return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials or 10, multivariate=True,
                                              group=True, constant_liar=True)
        if s.name == "gp":
            return optuna.samplers.GPSampler(seed=s.seed, n_startup_trials=s.n_startup_trials or 10)
        if s.name == "random":
            return optuna.samplers.RandomSampler(seed=s.seed)
        return _ConditionalGridSampler(seed=s.seed)


class _ConditionalGridSampler(optuna.samplers.BruteForceSampler):
    """Optuna's GridSampler cannot express conditional spaces (each technique has its own
    parameters); BruteForceSampler enumerates exactly that finite tree. Its `after_trial` only
    stops `study.optimize` once the tree is exhausted, which raises under ask/tell, so the
    sweep caps the trial count at the grid's size instead."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def suggested_keys(space: dict[str, list[Dimension]], technique: str | None) -> set[str]:
    """The study parameters `suggest` sets for `technique`: its choice and its non-fixed dimensions."""
    return {"technique"} | {f"{technique}.{dim.name}" for dim in space.get(technique, []) if dim.kind != "fixed"}


def suggest(trial: Trial, space: dict[str, list[Dimension]]) -> tuple[str, dict[str, Any]]:
    """Ask the trial for a technique, then for that technique's parameters (a conditional space),
    each non-fixed one under the key `suggested_keys` names."""
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


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
        if not t.user_attrs.get("interrupted")
    ]


def configurations(study: optuna.Study) -> Counter[str]:
    """How many trials measured (complete) or are measuring (running) each configuration, by comparable key.

    Counted, not a set: a configuration run again after too many repeats that then fails must not
    forget the earlier trial that measured it."""
    return Counter(
        json.dumps(t.params, sort_keys=True)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    )


def sweep_state(storage: optuna.storages.BaseStorage, name: str) -> str:
    """"absent", "half" (created, but its controller died before the parent run was recorded) or "created"."""
    summaries = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in summaries:
        return "absent"
    return "created" if PARENT_ATTR in summaries[name].user_attrs else "half"


def study_exists(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return sweep_state(storage, name) != "absent"


def already_exists(name: str, stores: Stores) -> SweepError:
    return SweepError(f"a sweep named {name!r} already exists in {redact(stores.storage)}; "
                      f"continue it with `paretoray sweep resume {name}` or pick another `--name`")


def stored_spec(stores: Stores, name: str) -> tuple[SweepSpec, str | None]:
    """The spec a sweep was created with (for resume); SweepError when there is none."""
    study = stores.load_study(name)
    if SPEC_ATTR not in study.user_attrs:
        raise SweepError(f"sweep {name!r} was interrupted while it was being created, before its spec was stored: "
                         f"start it again with `paretoray sweep run FILE --name {name}`")
    try:
        return parse(study.user_attrs[SPEC_ATTR], f"sweep {name!r} (stored spec)"), study.user_attrs.get(SPEC_TEXT_ATTR)
    except SpecError as error:  # stored by an older paretoray whose spec this one no longer accepts
        raise SweepError(str(error)) from None


# ---- the book ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ticket:
    """A trial asked of Optuna: what to run."""

    trial: Trial
    technique: str
    params: dict[str, Any]

    @property
    def number(self) -> int:
        return self.trial.number


class SweepBook:
    def __init__(self, spec: SweepSpec, stores: Stores, spec_text: str | None = None,
                 report: ReportRenderer | None = None, calls: StoreCalls | None = None):
        self.spec = spec
        self.name = spec.name or "sweep"
        self.stores = stores
        self.spec_text = spec_text
        self.spec_json = json.loads(spec.model_dump_json())
        self.space = search_space(spec)
        self.constraints: list[Constraint] = constraints(spec)
        self.objectives = list(spec.objectives)
        self.report = report
        self.calls = calls or StoreCalls(self.name, stores)
        self.study: optuna.Study | None = None
        self.recorder: Recorder | None = None
        self.parent: str | None = None
        self._seen: Counter[str] = Counter()
        self._tags_at = float("-inf")
        self._artifacts_at = time.perf_counter()

    # ---- opening and closing ------------------------------------------------------------------

    def open(self, resume: bool) -> None:
        """Create the sweep (or finish creating a half-created one), or reopen it for `resume`.

        The caller holds the sweep's lease. A "created" sweep with `resume=False` is refused."""
        storage = self.calls("Optuna study storage", "reading the sweeps", self.stores.optuna_storage)
        state = self.calls("Optuna study storage", "reading the sweeps", lambda: sweep_state(storage, self.name))
        if state == "created" and not resume:
            raise already_exists(self.name, self.stores)
        self.recorder = self.calls("MLflow tracking store", "opening the experiment",
                                   lambda: Recorder(self.stores, self.name, report=self.report))
        if state == "half" and (not resume or SPEC_ATTR not in self.stores.load_study(self.name).user_attrs):
            # Interrupted while it was being created: no trial ran, nothing to keep. `run` makes it
            # again from its own file; a resume with no stored spec cannot know what to make.
            if resume:
                raise SweepError(f"sweep {self.name!r} was interrupted while it was being created, before its spec was "
                                 f"stored: start it again with `paretoray sweep run FILE --name {self.name}`")
            self.calls("Optuna study storage", "removing a half-created sweep",
                       lambda: optuna.delete_study(study_name=self.name, storage=storage))
            for orphan in self.calls("MLflow tracking store", "finding the half-created parent run", self.recorder.sweep_runs):
                self.calls("MLflow tracking store", "removing the half-created parent run",
                           lambda: self.recorder.discard_run(orphan.info.run_id))
            state = "absent"
        directions = [self.spec.objectives[o] for o in self.objectives]
        self.study = self.calls("Optuna study storage", "opening the study", lambda: optuna.create_study(
            study_name=self.name, storage=storage, directions=directions, sampler=make_sampler(self.spec),
            load_if_exists=state != "absent"))
        study = self.study
        if state == "absent":
            self.calls("Optuna study storage", "storing the spec", lambda: self._store_spec(study))
        if PARENT_ATTR not in study.user_attrs:
            parent = self.calls("MLflow tracking store", "creating the parent run", self._adopt_or_start_parent)
            self.calls("Optuna study storage", "recording the parent run", lambda: study.set_user_attr(PARENT_ATTR, parent))
        elif resume:
            self.calls("MLflow tracking store", "reopening the parent run",
                       lambda: self.recorder.reopen_sweep(study.user_attrs[PARENT_ATTR]))
        self.parent = study.user_attrs[PARENT_ATTR]
        if state != "absent":
            self.calls("stores", "reconciling trials left running", self.reconcile)
        self._seen = configurations(study)

    def _store_spec(self, study: optuna.Study) -> None:
        study.set_user_attr(SPEC_ATTR, self.spec_json)
        if self.spec_text is not None:
            study.set_user_attr(SPEC_TEXT_ATTR, self.spec_text)
        study.set_user_attr(OBJECTIVES_ATTR, self.objectives)

    def _adopt_or_start_parent(self) -> str:
        """A parent run made by a controller that died before recording its id is adopted (the
        newest; others discarded), so a half-created sweep never has two parents."""
        orphans = self.recorder.sweep_runs()
        if orphans:
            for extra in orphans[1:]:
                self.recorder.discard_run(extra.info.run_id)
            self.recorder.reopen_sweep(orphans[0].info.run_id)
            return orphans[0].info.run_id
        return self.recorder.start_sweep(self.spec_json, self.spec_text)

    def close(self, status: str = "FINISHED") -> None:
        if self.parent is not None:
            self.calls("MLflow tracking store", "closing the parent run", lambda: self.recorder.finish_sweep(self.parent, status))

    # ---- trials -------------------------------------------------------------------------------

    @property
    def done(self) -> int:
        return len(finished_trials(self.study))

    def ask(self, max_repeats: int = 25) -> Ticket:
        """Ask until Optuna proposes a configuration not measured or in flight already.

        A technique without parameters (dense) or a narrow integer range is proposed again and
        again; re-measuring it spends a trial on noise. Repeats are told PRUNED (not counted,
        not logged), as Optuna's FAQ suggests; after `max_repeats` in a row the space is
        exhausted in practice and the repeat is run.
        """
        return self.calls("Optuna study storage", "asking for a trial", lambda: self._ask(max_repeats))

    def _ask(self, max_repeats: int) -> Ticket:
        for attempt in range(max_repeats + 1):
            trial = self.study.ask()
            technique, params = suggest(trial, self.space)
            key = json.dumps(trial.params, sort_keys=True)
            if not self._seen[key] or attempt == max_repeats:
                break
            trial.set_user_attr("repeat_of_measured_config", True)
            self.study.tell(trial, state=TrialState.PRUNED)
        self._seen[key] += 1
        return Ticket(trial, technique, params)

    def finish(self, ticket: Ticket, record: dict[str, Any], logged_before: bool = False) -> bool:
        """Record a finished trial: MLflow first, then Optuna (resume relies on this order).
        Returns whether it completed (False: recorded failed). `logged_before`: a run of this trial
        may already be in MLflow (resume; a retry after a store error), so look for it first."""
        attempt = {"n": 0}

        def record_it() -> bool:
            attempt["n"] += 1
            return self._finish(ticket.trial, record, logged_before or attempt["n"] > 1)

        ok = self.calls("stores", f"recording trial {ticket.number}", record_it)
        if not ok:  # as before: a failed configuration may be proposed and measured again
            self._seen[json.dumps(ticket.trial.params, sort_keys=True)] -= 1
        return ok

    def _finish(self, trial: Trial, record: dict[str, Any], logged_before: bool) -> bool:
        if logged_before:  # a retry after a store error: the tell may have been committed already
            state = self.study._storage.get_trial(trial._trial_id).state
            if state.is_finished():
                return state == TrialState.COMPLETE
        values = None
        if record.get("status") == "ok":
            metrics = record.get("metrics") or {}
            values = [metrics.get(name) for name in self.objectives]
            if not all(_finite(v) for v in values):
                record = {**record, "status": "failed",
                          "error": f"objective values not finite: {dict(zip(self.objectives, values))}"}
                values = None
        run_id = self.recorder.log_trial(self.parent, trial.number, record, self.spec_json, may_exist=logged_before)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("technique", record.get("technique"))
        trial.set_user_attr("label", record.get("label", ""))
        trial.set_user_attr("params", record.get("params", {}))
        trial.set_user_attr("actor", {k: (record.get("actor") or {}).get(k) for k in ("node_ip", "gpu_ids", "pid")})
        if values is None:
            trial.set_user_attr("error", str(record.get("error"))[:2000])
            self.study.tell(trial, state=TrialState.FAIL)
            return False
        metrics = record["metrics"]
        trial.set_user_attr("metrics", {k: v for k, v in metrics.items() if _finite(v)})
        for constraint in self.constraints:
            # A metric the trial did not produce, or NaN: infeasible, never a crash (see Constraint.violation).
            violation = constraint.violation(metrics)
            trial.set_constraint(str(constraint), violation if not math.isnan(violation) else math.inf)
        self.study.tell(trial, [float(v) for v in values])
        return True

    def reconcile(self) -> None:
        """Trials left RUNNING by a controller that died: keep what MLflow finished, finish setting
        aside a repeat it was pruning, re-ask the rest."""
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = Trial(self.study, frozen._trial_id)
            run = self.recorder.find_trial_run(self.parent, frozen.number)
            if run is not None and run.info.status in ("FINISHED", "FAILED"):
                # MLflow holds its result: it ran, whatever the study lacks
                self._finish(trial, self.recorder.load_record(run.info.run_id), logged_before=True)
                continue
            if run is not None:
                self.recorder.discard_run(run.info.run_id)
            complete = set(frozen.params) == suggested_keys(self.space, frozen.params.get("technique"))
            if frozen.user_attrs.get("repeat_of_measured_config") or not complete:
                # died setting a repeat aside (`_ask`), or before its parameters were all suggested: nothing ran
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            trial.set_user_attr("interrupted", True)
            self.study.tell(trial, state=TrialState.FAIL)
            self.study.enqueue_trial(frozen.params, skip_if_exists=False)

    # ---- the front ----------------------------------------------------------------------------

    def refresh_front(self, final: bool = False) -> list[dict[str, Any]] | None:
        """Tag the front and log the parent's counts (at most once a second), with its artifacts at
        most every 30 s; both always when `final`. Returns the rows when it refreshed."""
        now = time.perf_counter()
        if not final and now - self._tags_at < FRONT_TAGS_EVERY_S:
            return None
        artifacts = final or now - self._artifacts_at >= FRONT_ARTIFACTS_EVERY_S
        rows = self.calls("stores", "refreshing the front", lambda: self.recorder.update_front(
            self.parent, self.study, self.objectives, artifacts=artifacts, final=final))
        self._tags_at = time.perf_counter()
        if artifacts:
            self._artifacts_at = self._tags_at
        return rows

    def progress_note(self, rows: list[dict[str, Any]]) -> str:
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


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def delete_sweep(stores: Stores, name: str) -> str:
    """Remove sweep `name` from both stores (the caller holds its lease). Returns what was removed."""
    from mlflow.tracking import MlflowClient

    removed = []
    storage = stores.optuna_storage()
    if study_exists(storage, name):
        optuna.delete_study(study_name=name, storage=storage)
        removed.append("its Optuna study")
    client = MlflowClient(stores.tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        # MLflow keeps a deleted experiment's name reserved: rename it first, so the name is free again.
        client.rename_experiment(experiment.experiment_id, f"{name} (deleted {time.strftime('%Y%m%d-%H%M%S')})")
        client.delete_experiment(experiment.experiment_id)
        removed.append("its MLflow experiment (runs kept in MLflow's trash until `mlflow gc`)")
    if not removed:
        print(f"note: no sweep named {name!r} in either store", file=sys.stderr)
    return " and ".join(removed)
