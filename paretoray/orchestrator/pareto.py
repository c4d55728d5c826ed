"""A sweep's trials as a table and its Pareto front as plots.

The front is Optuna's (`study.best_trials`: non-dominated among feasible trials); nothing here
sorts by domination itself. Tables are polars frames; the PNG plot is matplotlib (the interactive page is
`paretoray.dashboards`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import polars as pl
from optuna.trial import TrialState

from paretoray.actors.metrics import METRICS


def pareto_numbers(study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None) -> set[int]:
    """Numbers of the trials on Optuna's front (`study.best_trials`), from `trials` when given."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return set()
    try:
        # What `best_trials` computes, minus its deep copy of every trial (the controller asks
        # after each trial, and the copy grows with the study).
        from optuna.study._constrained_optimization import _is_constrained_optimization
        from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
    except ImportError:  # a later Optuna moved them: the public property gives the same front
        return {t.number for t in study.best_trials}
    constrained = _is_constrained_optimization(trials)
    return {t.number for t in _get_pareto_front_trials_by_trials(trials, study.directions, consider_constraint=constrained)}


def trial_rows(study: optuna.Study, objectives: list[str]) -> list[dict[str, Any]]:
    """One plain record per finished trial (complete or failed), in trial order."""
    trials = study.get_trials(deepcopy=False)
    front = pareto_numbers(study, trials)
    rows = []
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL) or t.user_attrs.get("interrupted"):
            continue  # re-asked as a new trial on resume
        metrics = t.user_attrs.get("metrics", {})
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "technique": t.user_attrs.get("technique", t.params.get("technique")),
                "label": t.user_attrs.get("label", ""),
                "params": t.user_attrs.get("params", {}),
                "metrics": metrics,
                "objectives": {name: metrics.get(name) for name in objectives},
                "feasible": _feasible(t),
                "pareto": t.number in front,
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                "error": t.user_attrs.get("error"),
            }
        )
    return rows


def _feasible(trial: optuna.trial.FrozenTrial) -> bool:
    constraints = trial.system_attrs.get("constraints")
    if constraints is None:
        constraints = [v for k, v in trial.system_attrs.items() if k.startswith("constraints:")]
    return all(v <= 0 for v in constraints)


def front_frame(rows: list[dict[str, Any]], objectives: list[str], pareto_only: bool = False) -> pl.DataFrame:
    """A flat table: trial, technique, label, each objective, pareto, feasible, params (JSON), run id."""
    records = []
    for row in rows:
        if pareto_only and not row["pareto"]:
            continue
        record = {"trial": row["trial"], "state": row["state"], "technique": row["technique"], "label": row["label"]}
        for name in objectives:
            value = row["metrics"].get(name)
            record[name] = float(value) if value is not None else None
        record.update(
            pareto=row["pareto"],
            feasible=row["feasible"],
            params=json.dumps(row["params"], sort_keys=True),
            mlflow_run_id=row["mlflow_run_id"],
        )
        records.append(record)
    schema = {"trial": pl.Int64, "state": pl.String, "technique": pl.String, "label": pl.String}
    schema |= {name: pl.Float64 for name in objectives}
    schema |= {"pareto": pl.Boolean, "feasible": pl.Boolean, "params": pl.String, "mlflow_run_id": pl.String}
    return pl.DataFrame(records, schema=schema, orient="row")


def _axis_title(name: str) -> str:
    metric = METRICS.get(name)
    if metric is None:
        return name
    return f"{name} ({metric.unit}, {'higher' if metric.higher_is_better else 'lower'} is better)"


def _complete(rows: list[dict[str, Any]], x: str, y: str) -> list[dict[str, Any]]:
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    return [r for r in rows if r["state"] == "complete" and finite(r["metrics"].get(x)) and finite(r["metrics"].get(y))]


def staircase(front: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """A two-objective front's members in the order its staircase line visits them."""
    ordered = sorted(front, key=lambda r: (r["metrics"][x], r["metrics"][y]))
    return [r["metrics"][x] for r in ordered], [r["metrics"][y] for r in ordered]


def _front_line(points: list[dict[str, Any]], objectives: list[str], directions: list[str]) -> tuple[list[float], list[float], str] | None:
    """The front's staircase in the plotted plane, or None when the front lives in more dimensions.

    Returns xs, ys and where the step turns: horizontally first when x is minimized ("post"),
    vertically first when x is maximized ("pre"), so the line bounds what the front dominates.
    `directions` are the study's, per objective ("minimize" / "maximize").
    """
    if len(objectives) != 2:
        return None  # members of a 3+-objective front can look dominated in a 2-D projection
    xs, ys = staircase([r for r in points if r["pareto"]], *objectives)
    return xs, ys, "pre" if directions[0] == "maximize" else "post"


def _front_label(objectives: list[str]) -> str:
    return "Pareto front" if len(objectives) <= 2 else f"Pareto front (over all {len(objectives)} objectives)"


def plot_png(rows: list[dict[str, Any]], objectives: list[str], directions: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = objectives[0], objectives[1] if len(objectives) > 1 else objectives[0]
    points = _complete(rows, x, y)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, technique in enumerate(sorted({r["technique"] for r in points})):
        colour = f"C{i}"
        mine = [r for r in points if r["technique"] == technique]
        dominated = [r for r in mine if not r["pareto"]]
        front = [r for r in mine if r["pareto"]]
        ax.scatter([r["metrics"][x] for r in dominated], [r["metrics"][y] for r in dominated], color=colour, alpha=0.3, s=25)
        ax.scatter([r["metrics"][x] for r in front], [r["metrics"][y] for r in front], color=colour, edgecolor="black", s=60, label=technique)
    line = _front_line(points, objectives, directions)
    if line is not None:
        fx, fy, where = line
        ax.step(fx, fy, where=where, color="gray", linestyle=":", label="Pareto front")
    else:
        ax.scatter([], [], facecolor="none", edgecolor="black", s=60, label=_front_label(objectives))
    ax.set_xlabel(_axis_title(x))
    ax.set_ylabel(_axis_title(y))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
