"""What a report shows, gathered from a sweep's stores.

Trials, objectives and the front come from the Optuna study (the same rows `paretoray results`
prints); run links and the per-sample records behind the detailed plots come from MLflow. Records
are read lazily, only for the trials a figure needs, and cached by run id: a record never changes
once its run is logged, so the recorder can keep one cache for a whole sweep.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import TrialState

from paretoray.orchestrator import pareto
from paretoray.names import OBJECTIVES_ATTR, PARENT_ATTR, RECORD_FILE, SPEC_ATTR
MIN_TRIALS_FOR_IMPORTANCE = 5
# Workload fields that change what a trial measures; `fidelity` only adds a metric, and
# `min_dense_accuracy` only decides when the report warns that the task is too hard for the model.
_WORKLOAD_FIELDS_IGNORED = {"fidelity", "min_dense_accuracy"}
# Below this dense accuracy (the spec's `workload.min_dense_accuracy`) a task says little about the techniques.
DEFAULT_MIN_DENSE_ACCURACY = 0.5
# An interval of metric `m` is `m_ci_low` .. `m_ci_high` (95 %) beside `m` in a trial's metrics.
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
CI_LEVEL = "95%"
# What dense itself scores on a metric that is a ratio to, or an agreement with, dense.
_DENSE_IS_ONE = {"speedup", "ttft_speedup", "throughput_speedup", "relative_accuracy", "fidelity", "output_match"}


class ReportError(ValueError):
    """A report that cannot be made as asked; the message says why and what to do."""


@functools.lru_cache(maxsize=None)
def is_reference(technique: str | None) -> bool:
    """Whether a trial's technique is the reference the others are read against (dense, which is
    also autoregressive decoding): the technique class that declares `is_reference`. A name this
    install does not register (a sweep from an older version) is not the reference."""
    if technique is None:
        return False
    from paretoray.actors.techniques.base import UnknownTechniqueError, technique_class

    try:
        return bool(technique_class(technique).is_reference)
    except (UnknownTechniqueError, ValueError):  # unknown, or a composition whose members no longer fit
        return False


@functools.lru_cache(maxsize=None)
def reference_name() -> str:
    """The reference technique's name, as the page writes it ("dense scores 0.31 on this task")."""
    from paretoray.actors.techniques.base import reference_technique

    try:
        return reference_technique().name
    except TypeError:  # no technique, or several, declare is_reference: the runner refuses to start then
        return "the reference"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def interval(metrics: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """The 95 % interval of `metric` in a trial's metrics (`metric_ci_low`, `metric_ci_high`), or None
    when either bound is missing or not a finite number."""
    low, high = metrics.get(metric + CI_LOW), metrics.get(metric + CI_HIGH)
    if not (_finite(low) and _finite(high)):
        return None
    return (float(low), float(high)) if low <= high else (float(high), float(low))


def dense_value(metrics: dict[str, Any], metric: str) -> float | None:
    """What dense scores on `metric`, as this trial measured it: 1 for ratios to dense and agreements
    with it (speedup, ttft_speedup, relative_accuracy, fidelity, output_match), the trial's own
    `dense_<metric>` where it has one (accuracy: `dense_accuracy`, dense on the same samples in the
    same trial); None when nothing says."""
    if metric in _DENSE_IS_ONE:
        return 1.0
    own = metrics.get(f"dense_{metric}")
    return float(own) if _finite(own) else None


def indistinguishable_from_dense(metrics: dict[str, Any], objectives: list[str]) -> bool:
    """A trial is indistinguishable from dense when, on every objective that has a 95 % interval
    (and a known dense value, see `dense_value`), that interval contains dense's value (bounds
    included, up to float rounding: Wilson's upper bound at 6/6 computes as 0.9999999999999999).
    Objectives without an interval are ignored; when no objective has one, the trial is not marked
    (False)."""
    judged = False
    for objective in objectives:
        bounds = interval(metrics, objective)
        reference = dense_value(metrics, objective)
        if bounds is None or reference is None:
            continue
        judged = True
        slack = 1e-9 * max(1.0, abs(reference))
        if not bounds[0] - slack <= reference <= bounds[1] + slack:
            return False
    return judged


def judged_objectives(metrics: dict[str, Any], objectives: list[str]) -> list[str]:
    """The objectives `indistinguishable_from_dense` compares for this trial."""
    return [o for o in objectives if interval(metrics, o) is not None and dense_value(metrics, o) is not None]


def min_dense_accuracy(spec: dict[str, Any]) -> float:
    value = (spec.get("workload") or {}).get("min_dense_accuracy")
    return float(value) if _finite(value) else DEFAULT_MIN_DENSE_ACCURACY


def dense_accuracy(rows: list[dict[str, Any]]) -> tuple[float, str] | None:
    """Dense's accuracy on a sweep's task, and where it comes from: the median `dense_accuracy`
    (dense on the same samples, measured in each trial) over the complete trials, else the median
    accuracy of the reference technique's own trials; None when neither was measured."""
    complete = [r for r in rows if r["state"] == "complete"]
    measured = [r["metrics"]["dense_accuracy"] for r in complete if _finite(r["metrics"].get("dense_accuracy"))]
    if measured:
        return _median(measured), f"median dense_accuracy over {len(measured)} complete trial{'s' if len(measured) > 1 else ''}"
    own = [r["metrics"]["accuracy"] for r in complete if is_reference(r["technique"]) and _finite(r["metrics"].get("accuracy"))]
    if own:
        return _median(own), f"accuracy of the {reference_name()} trial{'s' if len(own) > 1 else ''}"
    return None


def uninformative_task(spec: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[float, float, str] | None:
    """(dense accuracy, threshold, source) when dense scores below `workload.min_dense_accuracy`
    (default 0.5) on the sweep's task: then accuracy cannot tell the techniques apart. Else None."""
    found = dense_accuracy(rows)
    threshold = min_dense_accuracy(spec)
    if found is None or found[0] >= threshold:
        return None
    return found[0], threshold, found[1]


def uninformative_parts(spec: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The entries of a suite (breakdowns `dense_accuracy/ENTRY`, lengths excluded) on which dense's
    median accuracy is below `workload.min_dense_accuracy`: (entry, dense accuracy), in order."""
    threshold = min_dense_accuracy(spec)
    values: dict[str, list[float]] = {}
    for row in rows:
        if row["state"] != "complete":
            continue
        for key, value in row["metrics"].items():
            part = key.removeprefix("dense_accuracy/")
            if part != key and not re.fullmatch(r"ctx\d+", part) and _finite(value):
                values.setdefault(part, []).append(float(value))
    return [(part, _median(found)) for part, found in values.items() if _median(found) < threshold]


@dataclass
class Importances:
    """Optuna's parameter importances (PED-ANOVA) per target: all objectives together, then each one."""

    by_target: dict[str, dict[str, float]]
    trials: int
    note: str | None = None


@dataclass
class SweepData:
    name: str
    spec: dict[str, Any]
    objectives: list[str]
    directions: dict[str, str]  # objective -> "minimize" | "maximize"
    rows: list[dict[str, Any]]  # pareto.trial_rows: one per finished trial, `pareto` = Optuna's best_trials
    swept: dict[str, BaseDistribution]  # "technique.param" -> how the sampler searched it
    parent_run_id: str | None
    experiment_id: str | None
    status: str  # the parent run's MLflow status: RUNNING while the sweep goes on
    in_flight: int  # trials asked and not yet finished
    importances: Importances
    notes: list[str] = field(default_factory=list)
    _load: Callable[[str], dict[str, Any] | None] | None = None

    @property
    def complete(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["state"] == "complete"]

    @property
    def trials_target(self) -> int | None:
        return self.spec.get("trials")

    @property
    def running(self) -> bool:
        """Still going. The controller's last refresh, made just before it marks the parent run
        finished, passes that status in (`collect_sweep(finished=True)`)."""
        return self.status == "RUNNING"

    def record(self, trial: int) -> dict[str, Any] | None:
        """The runner's full record of one trial (`trial.json` on its MLflow run), or None."""
        row = next((r for r in self.rows if r["trial"] == trial), None)
        if row is None or not row["mlflow_run_id"] or self._load is None:
            return None
        return self._load(row["mlflow_run_id"])

    def _any_record(self) -> dict[str, Any] | None:
        ordered = sorted(self.complete, key=lambda r: not r["pareto"])  # front members are read anyway
        for row in ordered[:3]:
            record = self.record(row["trial"])
            if record is not None:
                return record
        return None

    @property
    def env(self) -> dict[str, Any]:
        record = self._any_record()
        return dict(record.get("env", {})) if record else {}

    def reference(self) -> tuple[str, dict[str, float]]:
        """The dense / autoregressive reference: the sweep's own dense trial if it has one, else
        what the actors measured as their baseline (only the metrics a baseline defines)."""
        dense = [r for r in self.complete if is_reference(r["technique"])]
        if dense:
            return f"{reference_name()} trial", dict(dense[0]["metrics"])
        # Every trial measures dense beside it on the same samples (paired timing); sweeps recorded
        # before that carry the baseline their actors measured once, in the trial record.
        paired = [r["metrics"] for r in self.complete if _finite(r["metrics"].get("dense_latency_ms_per_token"))]
        if paired:
            baselines = [{"latency_ms_per_token": m["dense_latency_ms_per_token"], "ttft_ms": m.get("dense_ttft_ms", math.nan),
                          "accuracy": m.get("dense_accuracy", math.nan)} for m in paired]
        else:
            baselines = []
            for row in self.complete[:6]:
                record = self.record(row["trial"])
                if record and record.get("baseline"):
                    baselines.append(record["baseline"])
        if not baselines:
            return "none", {}
        values = {"speedup": 1.0, "ttft_speedup": 1.0, "relative_accuracy": 1.0, "output_match": 1.0, "target_calls_per_token": 1.0}
        for key in ("latency_ms_per_token", "ttft_ms", "accuracy"):
            found = [b[key] for b in baselines if _finite(b.get(key))]
            if found:
                values[key] = _median(found)
        latency = values.get("latency_ms_per_token", 0.0)
        if latency > 0:
            values["tokens_per_s"] = 1000.0 / latency
        return f"{reference_name()} baseline measured by the actors", values


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """MLflow draws a progress bar per download; a sweep's console would fill with them."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def record_loader(client: Any, cache: dict[str, dict[str, Any]] | None = None) -> Callable[[str], dict[str, Any] | None]:
    """Reads `trial.json` from a run's artifacts, once per run id."""
    cache = {} if cache is None else cache

    def load(run_id: str) -> dict[str, Any] | None:
        if run_id not in cache:
            try:
                with tempfile.TemporaryDirectory() as tmp, _no_progress_bars():
                    cache[run_id] = json.loads(Path(client.download_artifacts(run_id, RECORD_FILE, tmp)).read_text())
            except Exception:  # a run without its record (deleted, foreign): the figure says so
                return None
        return cache[run_id]

    return load


def swept_dimensions(study: optuna.Study) -> dict[str, BaseDistribution]:
    """Every parameter the sampler actually varied, as Optuna recorded it (technique excluded)."""
    found: dict[str, BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        for name, distribution in trial.distributions.items():
            if name != "technique":
                found.setdefault(name, distribution)
    return dict(sorted(found.items()))


def param_importances(study: optuna.Study, objectives: list[str], directions: dict[str, str]) -> Importances:
    """PED-ANOVA importances (Optuna's default evaluator, which handles each technique's conditional
    parameters): of ranking high on all objectives together, and of each objective on its own.

    With no target on a multi-objective study, PED-ANOVA's top region is the best non-domination
    ranks (ties broken by hypervolume contribution), constraints ignored: near the front, not
    exactly its members."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    n = len(complete)
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        return Importances({}, n, f"parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials; "
                                  f"this sweep has {n}")
    varied = {name for t in complete for name in t.params}
    if not varied:
        return Importances({}, n, "no parameter was varied")
    # Optuna's default (top 10 %) would judge a small sweep by one trial; keep at least three.
    quantile = min(0.5, max(0.1, 3 / n))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    targets: dict[str, Callable[[optuna.trial.FrozenTrial], float] | None] = {}
    if len(objectives) > 1:
        targets["all objectives together (non-domination rank)"] = None
    for i, name in enumerate(objectives):
        sign = -1.0 if directions[name] == "maximize" else 1.0  # PED-ANOVA ranks lower as better
        targets[name] = (lambda t, i=i, sign=sign: sign * t.values[i]) if len(objectives) > 1 or sign < 0 else None
    by_target: dict[str, dict[str, float]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "few trials" and "lower target is better" reminders
            for label, target in targets.items():
                values = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
                by_target[label] = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    except Exception as error:  # importances are a summary; never let them cost the report
        return Importances({}, n, f"parameter importances unavailable: {type(error).__name__}: {error}")
    return Importances(by_target, n, f"PED-ANOVA over {n} complete trials (top {quantile:.0%} as the target region)")


def collect_sweep(
    study: optuna.Study,
    client: Any,
    parent_run_id: str | None = None,
    records: dict[str, dict[str, Any]] | None = None,
    spec: dict[str, Any] | None = None,
    finished: bool = False,
) -> SweepData:
    """A sweep as a report sees it. `client` is an MlflowClient on the sweep's tracking store."""

    spec = spec or study.user_attrs.get(SPEC_ATTR) or {}
    objectives = list(study.user_attrs.get(OBJECTIVES_ATTR) or [f"objective_{i}" for i in range(len(study.directions))])
    directions = {name: d.name.lower() for name, d in zip(objectives, study.directions)}
    parent_run_id = parent_run_id or study.user_attrs.get(PARENT_ATTR)
    notes: list[str] = []
    experiment_id, status = None, "UNKNOWN"
    if parent_run_id:
        try:
            run = client.get_run(parent_run_id)
            experiment_id, status = run.info.experiment_id, "FINISHED" if finished else run.info.status
        except Exception:
            notes.append(f"MLflow parent run {parent_run_id} not found in this tracking store: no run links")
    return SweepData(
        name=study.study_name,
        spec=spec,
        objectives=objectives,
        directions=directions,
        rows=pareto.trial_rows(study, objectives),
        swept=swept_dimensions(study),
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        status=status,
        in_flight=len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))),
        importances=param_importances(study, objectives, directions),
        notes=notes,
        _load=record_loader(client, records),
    )


# ---- several sweeps on one page --------------------------------------------------------------


def _comparable_fields(sweep: SweepData) -> dict[str, Any]:
    model = sweep.spec.get("model") or {}
    fields: dict[str, Any] = {f"model.{key}": model.get(key) for key in ("id", "dtype", "attn_implementation", "draft")}
    workload = sweep.spec.get("workload") or {}
    fields |= {f"workload.{key}": value for key, value in sorted(workload.items()) if key not in _WORKLOAD_FIELDS_IGNORED}
    env = sweep.env
    for key in ("device_name", "dtype", "torch_threads"):
        if key in env:
            fields[f"env.{key}"] = env[key]
    return fields


def differences(first: SweepData, other: SweepData) -> list[str]:
    """What makes two sweeps' figures incomparable: model, workload or machine."""
    a, b = _comparable_fields(first), _comparable_fields(other)
    found = []
    for key in sorted(set(a) | set(b)):
        if key.startswith("env.") and (key not in a or key not in b):
            continue  # a sweep without readable records: nothing to compare
        if a.get(key) != b.get(key):
            found.append(f"{key}: {a.get(key)!r} in {first.name!r} vs {b.get(key)!r} in {other.name!r}")
    return found


@dataclass
class ReportData:
    """One page: one sweep, or several overlaid on the objectives they share."""

    sweeps: list[SweepData]
    objectives: list[str]
    directions: dict[str, str]
    points: list[dict[str, Any]]  # complete trials of every sweep, with `sweep`, `front`, `sweep_front`
    failed: int
    forced_differences: list[str] = field(default_factory=list)

    @property
    def overlay(self) -> bool:
        return len(self.sweeps) > 1

    @property
    def title(self) -> str:
        return " vs ".join(s.name for s in self.sweeps)

    def sweep(self, name: str) -> SweepData:
        return next(s for s in self.sweeps if s.name == name)

    @property
    def front(self) -> list[dict[str, Any]]:
        return [p for p in self.points if p["front"]]


def front_of(points: list[dict[str, Any]], objectives: list[str], directions: dict[str, str]) -> set[int]:
    """Indices of the non-dominated feasible points, by Optuna's own front (an in-memory study)."""
    study = optuna.create_study(directions=[directions[o] for o in objectives])
    distribution = {"i": CategoricalDistribution(list(range(max(len(points), 1))))}
    study.add_trials(
        [
            optuna.trial.create_trial(
                values=[p["metrics"][o] for o in objectives], params={"i": i}, distributions=distribution,
                constraints={"feasible": 0.0 if p["feasible"] else 1.0},
            )
            for i, p in enumerate(points)
        ]
    )
    return {t.params["i"] for t in study.best_trials} if points else set()


def _plottable(row: dict[str, Any], objectives: list[str]) -> bool:
    return row["state"] == "complete" and all(
        isinstance(row["metrics"].get(o), (int, float)) and math.isfinite(row["metrics"][o]) for o in objectives
    )


def combine(sweeps: list[SweepData], force: bool = False) -> ReportData:
    """Sweeps on one page. Several sweeps must share model, workload and machine (else `force`)
    and at least one objective; their trials are overlaid on the shared objectives, and the page's
    front is the front of all of them together."""
    if not sweeps:
        raise ReportError("no sweep to report")
    names = [s.name for s in sweeps]
    if len(set(names)) != len(names):
        raise ReportError(f"a sweep is named twice: {', '.join(names)}")
    forced: list[str] = []
    for other in sweeps[1:]:
        found = differences(sweeps[0], other)
        if found and not force:
            raise ReportError(
                f"cannot overlay sweeps {sweeps[0].name!r} and {other.name!r}: they differ in\n  "
                + "\n  ".join(found)
                + "\ntheir numbers are not comparable; pass --force to overlay them anyway"
            )
        forced += found
    objectives = [o for o in sweeps[0].objectives if all(o in s.objectives for s in sweeps[1:])]
    if not objectives:
        listed = "; ".join(f"{s.name}: {', '.join(s.objectives)}" for s in sweeps)
        raise ReportError(f"the sweeps share no objective to overlay them on ({listed})")
    directions = {o: sweeps[0].directions[o] for o in objectives}
    for sweep in sweeps[1:]:
        for o in objectives:
            if sweep.directions[o] != directions[o]:
                raise ReportError(f"objective {o!r} is maximized in one sweep and minimized in another")
    points: list[dict[str, Any]] = []
    failed = 0
    for sweep in sweeps:
        failed += sum(r["state"] != "complete" for r in sweep.rows)
        placement = (sweep.spec.get("workload") or {}).get("query_placement") or "query_aware"
        mine = [dict(r, sweep=sweep.name, experiment_id=sweep.experiment_id, placement=placement)
                for r in sweep.rows if _plottable(r, objectives)]
        own_front = (
            {i for i, r in enumerate(mine) if r["pareto"]}
            if objectives == sweep.objectives
            else front_of(mine, objectives, directions)
        )
        for i, row in enumerate(mine):
            row["sweep_front"] = i in own_front
        points += mine
    if len(sweeps) == 1:
        for row in points:
            row["front"] = row["sweep_front"]  # exactly Optuna's best_trials, as `results --pareto` prints
    else:
        overall = front_of(points, objectives, directions)
        for i, row in enumerate(points):
            row["front"] = i in overall
    return ReportData(sweeps, objectives, directions, points, failed, forced)
