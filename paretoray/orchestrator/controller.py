"""The controller: Optuna ask/tell over a pool of Ray actors, MLflow as the record.

Data flows one way: the spec gives the search space; the controller asks Optuna for a trial,
sends it to a free actor, and when the actor returns a plain record it first logs the record to
MLflow, then tells Optuna. The controller is the only writer of both stores (no SQLite lock
contention), and because Optuna's storage holds the spec and the parent run id, a sweep resumes
by name: finished trials are neither re-run nor re-logged, trials that were running are reconciled
with what MLflow holds or asked again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna
import ray
from optuna.trial import Trial, TrialState
from tqdm import tqdm

from paretoray.actors.actor import create_actor
from paretoray.orchestrator.recorder import Recorder
from paretoray.orchestrator.spec import Constraint, Dimension, SweepSpec, constraints, grid_size, parse, search_space
from paretoray.orchestrator.stores import Stores

SPEC_ATTR = "paretoray.spec"
SPEC_TEXT_ATTR = "paretoray.spec_text"
PARENT_ATTR = "paretoray.mlflow_parent_run_id"


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why and what to do."""


@dataclass
class SweepResult:
    name: str
    trials_finished: int
    trials_failed: int
    rows: list[dict[str, Any]]
    parent_run_id: str
    wall_s: float


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
        ray.init(address=address, **quiet)
        return
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
    from paretoray.actors.models import ModelLoadError, resolve

    for ref in (spec.model.id, spec.model.draft):
        if ref:
            try:
                resolve(ref)
            except ModelLoadError as error:
                raise SweepError(str(error)) from None


def start_actors(spec: SweepSpec, count: int, timeout_s: float = 900) -> list[Any]:
    """Create actors and wait until each has loaded the model, with a clear error if one cannot."""
    actors = [
        create_actor(
            spec.model.id,
            num_cpus=spec.actors.num_cpus,
            num_gpus=spec.actors.num_gpus,
            dtype=spec.model.dtype,
            attn_implementation=spec.model.attn_implementation,
            draft=spec.model.draft,
        )
        for _ in range(count)
    ]
    try:
        ray.get([actor.describe.remote() for actor in actors], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise SweepError(
            f"actors did not start within {timeout_s:.0f} s: the cluster may lack {spec.actors.num_cpus} CPU / "
            f"{spec.actors.num_gpus} GPU per actor (see `ray status`)"
        ) from None
    except ray.exceptions.RayActorError as error:
        cause = (getattr(error, "error_msg", None) or str(error)).strip()
        # The actor's traceback ends with the loader's own one-line explanation: show that.
        reason = next((line for line in reversed(cause.splitlines()) if "ModelLoadError:" in line), cause[-2000:])
        raise SweepError(f"an actor could not start: {reason.split('ModelLoadError: ')[-1]}") from None
    return actors


# ---- the sweep -------------------------------------------------------------------------------


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

    @classmethod
    def for_resume(cls, name: str, stores: Stores) -> Controller:
        storage = stores.optuna_storage()
        if not study_exists(storage, name):
            known = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
            raise SweepError(f"no sweep named {name!r} in {stores.storage}; known: {', '.join(known) or 'none'}")
        study = optuna.load_study(study_name=name, storage=storage)
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
        connect_ray(ray_address, self.spec)
        actors = start_actors(self.spec, self.spec.actors.count)

        recorder = Recorder(self.stores, self.name)
        directions = [self.spec.objectives[o] for o in self.objectives]
        study = optuna.create_study(
            study_name=self.name, storage=self.storage, directions=directions, sampler=make_sampler(self.spec), load_if_exists=resume
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

        pending: dict[Any, tuple[Trial, Any]] = {}
        free = list(actors)
        done = len(finished_trials(study))
        failed = 0
        bar = tqdm(total=target, initial=min(done, target), desc=f"sweep {self.name}", unit="trial", disable=not progress, dynamic_ncols=True)
        status = "FINISHED"
        try:
            while True:
                while free and done + len(pending) < target:
                    trial, technique, params = self._ask_new(study)
                    actor = free.pop()
                    request = {"trial": trial.number, "technique": technique, "params": params, "workload": self.spec_json["workload"]}
                    pending[actor.run_trial.remote(request)] = (trial, actor)
                if not pending:
                    break
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                trial, actor = pending.pop(ref)
                try:
                    record = ray.get(ref)
                    free.append(actor)
                except ray.exceptions.RayActorError as error:
                    record = self._dead_actor_record(trial, error)
                    free.extend(self._replace_actor())
                ok = self._finish(study, recorder, parent, trial, record)
                failed += not ok
                done += 1
                rows = recorder.update_front(parent, study, self.objectives)
                bar.update(1)
                bar.set_postfix_str(self._progress_note(rows), refresh=True)
                if not free and not pending:
                    raise SweepError("every actor died; finished trials are recorded, resume with `paretoray sweep resume`")
        except BaseException:
            status = "KILLED"
            raise
        finally:
            bar.close()
            if status == "KILLED":
                recorder.finish_sweep(parent, "KILLED")
            for actor in free + [actor for _, actor in pending.values()]:
                ray.kill(actor)
        rows = recorder.update_front(parent, study, self.objectives)
        recorder.finish_sweep(parent, "FINISHED")
        return SweepResult(self.name, done, failed, rows, parent, time.perf_counter() - started)

    # ---- per trial ------------------------------------------------------------------------

    def _ask_new(self, study: optuna.Study, max_repeats: int = 25) -> tuple[Trial, str, dict[str, Any]]:
        """Ask until Optuna proposes a configuration not measured or in flight already.

        A technique without parameters (dense) or a narrow integer range is proposed again and
        again; re-measuring it spends a trial on noise. Repeats are told PRUNED (not counted,
        not logged), as Optuna's FAQ suggests; after `max_repeats` in a row the space is
        exhausted in practice and the repeat is run.
        """
        seen = {
            json.dumps(t.params, sort_keys=True)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        }
        for attempt in range(max_repeats + 1):
            trial = study.ask()
            technique, params = suggest(trial, self.space)
            if json.dumps(trial.params, sort_keys=True) not in seen or attempt == max_repeats:
                break
            trial.set_user_attr("repeat_of_measured_config", True)
            study.tell(trial, state=TrialState.PRUNED)
        trial.set_user_attr("technique", technique)
        trial.set_user_attr("params", params)
        return trial, technique, params

    def _finish(self, study: optuna.Study, recorder: Recorder, parent: str, trial: Trial, record: dict[str, Any]) -> bool:
        """Log to MLflow first, then tell Optuna (resume relies on this order)."""
        values = None
        if record.get("status") == "ok":
            metrics = record["metrics"]
            values = [metrics.get(name) for name in self.objectives]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                record = {**record, "status": "failed", "error": f"objective values not finite: {dict(zip(self.objectives, values))}"}
                values = None
        run_id = recorder.log_trial(parent, trial.number, record, self.spec_json)
        trial.set_user_attr("mlflow_run_id", run_id)
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

    def _dead_actor_record(self, trial: Trial, error: Exception) -> dict[str, Any]:
        return {
            "trial": trial.number,
            "technique": trial.user_attrs.get("technique"),
            "params": trial.user_attrs.get("params", {}),
            "status": "failed",
            "error": f"actor died during the trial: {type(error).__name__}: {str(error)[:1000]}",
            "traceback": None,
        }

    def _replace_actor(self) -> list[Any]:
        try:
            return start_actors(self.spec, 1)
        except SweepError as error:
            print(f"warning: could not replace a dead actor: {error}", file=sys.stderr)
            return []

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
