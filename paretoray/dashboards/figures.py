"""The report's plotly figures, built from `ReportData` alone (no store access but records).

Conventions every figure keeps, so a reader learns them once:
- one colour per technique, the same in every figure; dense (the reference) is always dark grey
  and drawn as a star;
- with several sweeps, one marker symbol per sweep;
- trials on the page's Pareto front are large and outlined, dominated ones faded;
- a metric with a 95 % interval (`m_ci_low`, `m_ci_high` beside `m`) is drawn with whiskers on its
  axis, and hover texts and the front table print the interval beside the value;
- every trial trace carries `meta = {"role": "trials", "sweep", "technique"}` and the MLflow run's
  route in `customdata`, which the page uses to open a run on click (and tests use to count points).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from itertools import combinations
from typing import Any

import plotly.graph_objects as go
from optuna.distributions import BaseDistribution, CategoricalDistribution
from plotly.subplots import make_subplots

from paretoray.actors.metrics import METRICS
from paretoray.dashboards.data import (
    CI_HIGH,
    CI_LEVEL,
    CI_LOW,
    ReportData,
    SweepData,
    indistinguishable_from_dense,
    interval,
    is_reference,
    reference_name,
)
from paretoray.orchestrator import pareto

REFERENCE_COLOUR = "#3b3b3b"
# Okabe-Ito (safe for colour-blind readers) without its yellow, then a few more distinct hues.
TECHNIQUE_COLOURS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#8C564B", "#7F3C8D", "#B8860B", "#17BECF"]
SWEEP_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "pentagon", "hexagon", "triangle-down", "cross"]
SWEEP_DASHES = ["dot", "dash", "dashdot", "longdash", "longdashdot", "solid"]
MEMBER_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
MAX_HEATMAPS = 12
FONT = "system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif"


class Style:
    """Colours and symbols fixed once per page."""

    def __init__(self, report: ReportData):
        techniques = sorted({p["technique"] for s in report.sweeps for p in s.rows
                             if p["technique"] is not None and not is_reference(p["technique"])})
        self.colours = {t: TECHNIQUE_COLOURS[i % len(TECHNIQUE_COLOURS)] for i, t in enumerate(techniques)}
        self.symbols = {s.name: SWEEP_SYMBOLS[i % len(SWEEP_SYMBOLS)] for i, s in enumerate(report.sweeps)}
        self.overlay = report.overlay

    def colour(self, technique: str) -> str:
        return REFERENCE_COLOUR if is_reference(technique) else self.colours.get(technique, "#999999")

    def symbol(self, sweep: str, technique: str) -> str:
        return "star" if is_reference(technique) and not self.overlay else self.symbols[sweep]

    def group_name(self, sweep: str, technique: str) -> str:
        return f"{technique} · {sweep}" if self.overlay else technique


# ---- text ------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if isinstance(value, int) or float(value).is_integer():
        return f"{value:g}"
    return f"{value:.4g}"


def fmt_param(value: Any) -> str:
    """A parameter's value as it was written in the spec (no thousands separators)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _registered(metric: str) -> Any:
    """The registry's entry for a metric, its per-length breakdown (`accuracy/ctx1024`) or an interval bound (`accuracy_ci_low`)."""
    base = metric.split("/")[0]
    for suffix in (CI_LOW, CI_HIGH):
        if base not in METRICS and base.endswith(suffix):
            base = base.removesuffix(suffix)
    return METRICS.get(base)


def unit(metric: str) -> str:
    known = _registered(metric)
    return known.unit if known else ""


def axis_title(metric: str, directions: dict[str, str] | None = None) -> str:
    """`name [unit] · lower is better`: the direction is what a reader of a front needs most."""
    known = _registered(metric)
    text = f"{metric} [{known.unit}]" if known else metric
    if directions and metric in directions:
        better = "higher" if directions[metric] == "maximize" else "lower"
    elif known:
        better = "higher" if known.higher_is_better else "lower"
    else:
        return text
    return f"{text} · {better} is better"


def fmt_interval(metrics: dict[str, Any], metric: str) -> str:
    """` [low, high]` when the metric has a 95 % interval in these metrics, else ``."""
    bounds = interval(metrics, metric)
    return f" [{fmt(bounds[0])}, {fmt(bounds[1])}]" if bounds else ""


def fmt_metric(metrics: dict[str, Any], metric: str) -> str:
    """A metric's value and its interval when it has one: `0.83 [0.61, 0.94]`."""
    value = metrics.get(metric)
    return "" if value is None else fmt(value) + fmt_interval(metrics, metric)


def _shown_metrics(point: dict[str, Any], skip: list[str]) -> list[str]:
    shown = [name for name in METRICS if name in point["metrics"] and name not in skip]
    if "dense_accuracy" in point["metrics"] and "dense_accuracy" not in shown + skip:
        shown.append("dense_accuracy")  # what accuracy is read against, whether or not the registry lists it
    return shown


def hover_text(point: dict[str, Any], objectives: list[str], overlay: bool) -> str:
    label = point["label"] or point["technique"]
    status = [f"trial {point['trial']}" + (f" of {point['sweep']}" if overlay else "")]
    if point["front"]:
        status.append("on the Pareto front")
    if not point["feasible"]:
        status.append("infeasible (violates a constraint)")
    lines = [f"<b>{label}</b>", " · ".join(status)]
    if not is_reference(point["technique"]) and indistinguishable_from_dense(point["metrics"], objectives):
        lines.append(f"<i>indistinguishable from {reference_name()} within its {CI_LEVEL} intervals</i>")
    lines += [f"<b>{o}</b>: {fmt_metric(point['metrics'], o) or 'None'} {unit(o)}" for o in objectives]
    others = _shown_metrics(point, objectives)
    lines += [f"{name}: {fmt_metric(point['metrics'], name)} {unit(name)}" for name in others[:9]]
    if point["params"]:
        lines.append("params: " + ", ".join(f"{k}={fmt_param(v)}" for k, v in point["params"].items()))
    if point.get("mlflow_run_id"):
        lines.append("<i>click to open its MLflow run</i>")
    return "<br>".join(lines)


def run_route(point: dict[str, Any]) -> str:
    """The MLflow UI's hash route of a trial's run (the page prefixes the server's address).
    MLflow 3 opens in its GenAI view unless told otherwise; sweeps belong to "model training"."""
    if not point.get("mlflow_run_id") or not point.get("experiment_id"):
        return ""
    return f"#/experiments/{point['experiment_id']}/runs/{point['mlflow_run_id']}?workflowType=machine_learning"


def _layout(fig: go.Figure, height: int, **extra: Any) -> go.Figure:
    # The legend sits at the top of the figure, above any subplot titles.
    fig.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 70, "r": 20, "t": 80, "b": 60},
        font={"family": FONT, "size": 12},
        hoverlabel={"align": "left", "font": {"family": FONT, "size": 12}},
        legend={"orientation": "h", "yref": "container", "yanchor": "top", "y": 1.0, "x": 0, "title": None},
        **extra,
    )
    return fig


def _groups(points: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(p["sweep"], p["technique"])].append(p)
    # Techniques alphabetically, the reference last so it is drawn on top.
    return dict(sorted(groups.items(), key=lambda item: (is_reference(item[0][1]), item[0][1], item[0][0])))


def _log_scale(values: list[float]) -> bool:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= 30


def _whiskers(points: list[dict[str, Any]], values: list[Any], metric: str | None, colour: str) -> dict[str, Any] | None:
    """Plotly error bars from each point's 95 % interval of `metric` (asymmetric), or None when no
    point has one. A point without an interval gets a zero-length bar: callers split such groups."""
    if metric is None:
        return None
    bounds = [interval(p["metrics"], metric) for p in points]
    if not any(bounds):
        return None
    plus = [max(0.0, b[1] - v) if b and isinstance(v, (int, float)) else 0.0 for b, v in zip(bounds, values)]
    minus = [max(0.0, v - b[0]) if b and isinstance(v, (int, float)) else 0.0 for b, v in zip(bounds, values)]
    return {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "visible": True,
            "color": colour, "thickness": 1.2, "width": 3}


def _trials_traces(style: Style, sweep: str, technique: str, mine: list[dict[str, Any]], xs: list[Any], ys: list[Any],
                   report: ReportData, x_metric: str | None = None, y_metric: str | None = None,
                   showlegend: bool = True, **extra: Any) -> list[go.Scatter]:
    """A group's trials as one trace, with whiskers on each axis whose metric has intervals. Points with
    and without an interval on an axis (a sweep resumed across versions) go to separate traces of the
    same legend group, so no point gets a zero-length bar; a line joining the points stays one trace."""
    def has(p: dict[str, Any]) -> tuple[bool, bool]:
        return (x_metric is not None and interval(p["metrics"], x_metric) is not None,
                y_metric is not None and interval(p["metrics"], y_metric) is not None)

    kinds = sorted({has(p) for p in mine}, reverse=True)
    if len(kinds) <= 1 or "lines" in extra.get("mode", "markers"):
        return [_trials_trace(style, sweep, technique, mine, xs, ys, report, x_metric, y_metric, showlegend, **extra)]
    traces = []
    for kind in kinds:
        picked = [i for i, p in enumerate(mine) if has(p) == kind]
        traces.append(_trials_trace(style, sweep, technique, [mine[i] for i in picked], [xs[i] for i in picked],
                                     [ys[i] for i in picked], report, x_metric, y_metric, showlegend and not traces, **extra))
    return traces


def _trials_trace(style: Style, sweep: str, technique: str, mine: list[dict[str, Any]], xs: list[Any], ys: list[Any],
                  report: ReportData, x_metric: str | None = None, y_metric: str | None = None,
                  showlegend: bool = True, **extra: Any) -> go.Scatter:
    front = [p["front"] for p in mine]
    symbol = style.symbol(sweep, technique)
    extra.setdefault("mode", "markers")
    whisker_colour = _translucent(style.colour(technique), 0.55)
    for axis, metric, values in (("error_x", x_metric, xs), ("error_y", y_metric, ys)):
        bars = _whiskers(mine, values, metric, whisker_colour)
        if bars is not None:
            extra.setdefault(axis, bars)
    return go.Scatter(
        x=xs,
        y=ys,
        name=style.group_name(sweep, technique),
        legendgroup=f"{sweep}/{technique}",
        showlegend=showlegend,
        meta={"role": "trials", "sweep": sweep, "technique": technique},
        customdata=[[run_route(p), p["trial"], sweep] for p in mine],
        text=[hover_text(p, report.objectives, report.overlay) for p in mine],
        hoverinfo="text",
        marker={
            "color": style.colour(technique),
            "symbol": [symbol if p["feasible"] else f"{symbol}-open" for p in mine],
            # The reference stays plain to see even when dominated: it is what every trial is read against.
            "size": [17 if is_reference(technique) else 14 if f else 9 for f in front],
            "opacity": [1.0 if f else 0.85 if is_reference(technique) else 0.38 for f in front],
            "line": {"width": [1.6 if f else 0 for f in front], "color": "#111111"},
        },
        **extra,
    )


def _translucent(colour: str, alpha: float) -> str:
    """`#rrggbb` as `rgba(r, g, b, alpha)` (whiskers lighter than their markers)."""
    if len(colour) == 7 and colour.startswith("#"):
        r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r}, {g}, {b}, {alpha})"
    return colour


# ---- Pareto fronts ---------------------------------------------------------------------------


def objective_pairs(objectives: list[str], directions: dict[str, str]) -> list[tuple[str, str]]:
    """Every pair of objectives, the cost on x and the benefit on y where they differ, so each
    panel reads the same way: towards the upper left is better."""
    if len(objectives) == 1:
        return [("trial", objectives[0])]
    pairs = []
    for a, b in combinations(objectives, 2):
        if directions[a] == "maximize" and directions[b] == "minimize":
            a, b = b, a
        pairs.append((a, b))
    return pairs


def _staircase(points: list[dict[str, Any]], x: str, y: str, directions: dict[str, str]) -> tuple[list[float], list[float], str]:
    shape = "vh" if directions.get(x) == "maximize" else "hv"  # the step bounds what the front dominates
    return *pareto.staircase(points, x, y), shape


def _value(point: dict[str, Any], metric: str) -> Any:
    return point["trial"] if metric == "trial" else point["metrics"][metric]


def pareto_figure(report: ReportData, style: Style, x: str, y: str) -> go.Figure:
    fig = go.Figure()
    for (sweep, technique), mine in _groups(report.points).items():
        fig.add_traces(_trials_traces(style, sweep, technique, mine, [_value(p, x) for p in mine], [_value(p, y) for p in mine], report,
                                      x_metric=None if x == "trial" else x, y_metric=y))
    if len(report.objectives) == 2:  # with more objectives a 2-D projection of the front is no staircase
        if report.overlay:
            for i, sweep in enumerate(report.sweeps):
                members = [p for p in report.points if p["sweep"] == sweep.name and p["sweep_front"]]
                if members:
                    xs, ys, shape = _staircase(members, x, y, report.directions)
                    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=f"front of {sweep.name}", hoverinfo="skip",
                                             meta={"role": "front-line", "sweep": sweep.name},
                                             line={"shape": shape, "dash": SWEEP_DASHES[i % len(SWEEP_DASHES)], "color": "#777777", "width": 1.5}))
        elif report.front:
            xs, ys, shape = _staircase(report.front, x, y, report.directions)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="Pareto front", hoverinfo="skip", meta={"role": "front-line"},
                                     line={"shape": shape, "dash": "dot", "color": "#777777", "width": 1.5}))
    x_log = x != "trial" and _log_scale([_value(p, x) for p in report.points])
    y_log = _log_scale([_value(p, y) for p in report.points])
    _reference_lines(fig, report, x, y, x_log, y_log)
    fig.update_xaxes(title_text=axis_title(x, report.directions), type="log" if x_log else None)
    fig.update_yaxes(title_text=axis_title(y, report.directions), type="log" if y_log else None)
    return _layout(fig, 470, clickmode="event")


def _reference_lines(fig: go.Figure, report: ReportData, x: str, y: str, x_log: bool = False, y_log: bool = False) -> None:
    """Thin dotted lines through the dense reference, so 'faster than dense' is read at a glance."""
    for sweep in report.sweeps:
        source, values = sweep.reference()
        if not values:
            continue
        label = "autoregressive" if speculative_techniques(report) else reference_name()
        if source != f"{reference_name()} trial":
            label += " baseline"
        if report.overlay:
            label += f" ({sweep.name})"
        # The label is an annotation of its own: on a log axis an annotation's coordinate is log10 of
        # the value, which add_vline/add_hline's own annotation does not know (it stretched the axis to 1e10).
        font = {"size": 10, "color": REFERENCE_COLOUR}
        line = {"dash": "dot", "color": REFERENCE_COLOUR, "width": 1}
        if x in values and (not x_log or values[x] > 0):
            fig.add_vline(x=values[x], line=line, opacity=0.55)
            fig.add_annotation(x=math.log10(values[x]) if x_log else values[x], xref="x", y=1, yref="y domain", text=label,
                               showarrow=False, yanchor="bottom", font=font)
        if y in values and (not y_log or values[y] > 0):
            fig.add_hline(y=values[y], line=line, opacity=0.55)
            fig.add_annotation(y=math.log10(values[y]) if y_log else values[y], yref="y", x=0, xref="x domain", text=label,
                               showarrow=False, xanchor="left", yanchor="bottom", font=font)
        return  # one reference per page: several would crowd every panel


# ---- parameters ------------------------------------------------------------------------------


def swept_parameters(report: ReportData) -> dict[str, BaseDistribution]:
    found: dict[str, BaseDistribution] = {}
    for sweep in report.sweeps:
        for name, distribution in sweep.swept.items():
            found.setdefault(name, distribution)
    return dict(sorted(found.items()))


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _param_axis(distribution: BaseDistribution, values: list[Any]) -> dict[str, Any]:
    if isinstance(distribution, CategoricalDistribution) and not _numeric(list(distribution.choices)):
        return {"type": "category"}
    numbers = sorted({v for v in values if _numeric([v])})
    log = getattr(distribution, "log", False) or _log_scale(numbers)
    axis: dict[str, Any] = {"type": "log" if log else "linear"}
    if 0 < len(numbers) <= 12 and log:  # a log axis's own ticks (2, 3, ..., 9 per decade) would hide the values tried
        axis |= {"tickvals": numbers, "ticktext": [fmt_param(v) for v in numbers]}
    return axis


def _varied_per_technique(report: ReportData) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for sweep in report.sweeps:
        for name in sweep.swept:
            counts[(sweep.name, name.split(".", 1)[0])] += 1
    return counts


def parameter_figure(report: ReportData, style: Style, metrics: list[str], only: set[str] | None = None,
                     reference_at_one: set[str] = frozenset()) -> go.Figure | None:
    """One panel per (swept parameter, metric): the metric against the parameter's value, per
    technique; a line joins the points when that parameter is the technique's only one swept."""
    params = {k: d for k, d in swept_parameters(report).items() if only is None or k.split(".", 1)[0] in only}
    if not params or not metrics:
        return None
    varied = _varied_per_technique(report)
    titles = [f"{metric} vs {key.split('.', 1)[1]} ({key.split('.', 1)[0]})" for key in params for metric in metrics]
    fig = make_subplots(rows=len(params), cols=len(metrics), subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=min(0.12, 0.5 / len(params)))
    shown: set[str] = set()
    for row, (key, distribution) in enumerate(params.items(), start=1):
        technique, name = key.split(".", 1)
        all_values = []
        for col, metric in enumerate(metrics, start=1):
            for (sweep, owner), mine in _groups(report.points).items():
                if owner != technique:
                    continue
                mine = [p for p in mine if name in p["params"] and metric in p["metrics"]]
                if not mine:
                    continue
                mine.sort(key=lambda p: (str(type(p["params"][name])), p["params"][name]))
                xs = [p["params"][name] for p in mine]
                all_values += xs
                group = f"{sweep}/{technique}"
                joined = varied[(sweep, technique)] == 1 and _numeric(xs)
                fig.add_traces(
                    _trials_traces(style, sweep, technique, mine, xs, [p["metrics"][metric] for p in mine], report, y_metric=metric,
                                   showlegend=group not in shown, mode="lines+markers" if joined else "markers",
                                   line={"color": style.colour(technique), "width": 1.2}),
                    rows=row, cols=col,
                )
                shown.add(group)
            if metric in reference_at_one:
                fig.add_hline(y=1.0, line={"dash": "dot", "color": REFERENCE_COLOUR, "width": 1}, row=row, col=col,
                              annotation={"text": "autoregressive", "font": {"size": 10}}, annotation_position="bottom right")
            fig.update_yaxes(title_text=f"{metric} [{unit(metric)}]" if unit(metric) else metric, row=row, col=col)
        for col in range(1, len(metrics) + 1):
            fig.update_xaxes(title_text=f"{name} ({technique})", row=row, col=col, **_param_axis(distribution, all_values))
    return _layout(fig, 120 + 290 * len(params))


def importance_figure(sweep: SweepData) -> go.Figure | None:
    """Optuna's PED-ANOVA importances as grouped horizontal bars, one bar colour per target."""
    by_target = sweep.importances.by_target
    if not by_target:
        return None
    params = sorted({p for values in by_target.values() for p in values},
                    key=lambda p: next(iter(by_target.values())).get(p, 0.0))
    fig = go.Figure()
    shades = ["#4C4C4C", "#1F77B4", "#FF7F0E", "#2CA02C", "#9467BD", "#8C564B"]
    for i, (target, values) in enumerate(by_target.items()):
        fig.add_trace(go.Bar(y=params, x=[values.get(p, 0.0) for p in params], orientation="h", name=target,
                             marker={"color": shades[i % len(shades)]}, meta={"role": "importance", "sweep": sweep.name},
                             hovertemplate="%{y}: %{x:.2f}<extra>" + target + "</extra>"))
    fig.update_xaxes(title_text="importance (normalized per target; sums to 1)", range=[0, 1])
    return _layout(fig, 140 + 34 * len(params) * max(1, len(by_target) // 2 + 1), barmode="group")


# ---- speculative decoding --------------------------------------------------------------------


def speculative_techniques(report: ReportData) -> set[str]:
    return {p["technique"] for p in report.points if "acceptance_rate" in p["metrics"]}


def decoding_figure(report: ReportData, style: Style) -> go.Figure | None:
    techniques = speculative_techniques(report)
    if not techniques:
        return None
    return parameter_figure(report, style, ["acceptance_rate", "speedup"], only=techniques, reference_at_one={"speedup"})


# ---- long-context retrieval ------------------------------------------------------------------


_PER_LENGTH = re.compile(r"^accuracy/ctx(\d+)$")  # not its interval bounds (accuracy/ctxN_ci_low)


def context_lengths(report: ReportData) -> list[int]:
    lengths = {int(m.group(1)) for p in report.points for k in p["metrics"] if (m := _PER_LENGTH.match(k))}
    return sorted(lengths)


def _members(report: ReportData) -> list[dict[str, Any]]:
    """The front, ordered as a reader scans it: by technique, then along the first objective."""
    first = report.objectives[0]
    return sorted(report.front, key=lambda p: (is_reference(p["technique"]), p["technique"], p["metrics"][first]))


def _member_name(point: dict[str, Any], overlay: bool) -> str:
    name = point["label"] or point["technique"]
    return f"{name} · {point['sweep']}" if overlay else name


def context_figure(report: ReportData, style: Style) -> go.Figure | None:
    """Accuracy against context length for each front member (and dense, as the reference)."""
    lengths = context_lengths(report)
    if not lengths:
        return None
    shown = list(_members(report))
    shown += [p for p in report.points if is_reference(p["technique"]) and p not in shown]
    fig = go.Figure()
    dash_index: dict[str, int] = defaultdict(int)
    for point in shown:
        xs = [n for n in lengths if f"accuracy/ctx{n}" in point["metrics"]]
        ys = [point["metrics"][f"accuracy/ctx{n}"] for n in xs]
        dash = MEMBER_DASHES[dash_index[point["technique"]] % len(MEMBER_DASHES)]
        dash_index[point["technique"]] += 1
        bounds = [interval(point["metrics"], f"accuracy/ctx{n}") for n in xs]
        whiskers = {}
        if xs and all(bounds):  # per-length intervals, where the runner gives them for every length
            whiskers["error_y"] = {"type": "data", "symmetric": False, "visible": True, "thickness": 1.2, "width": 3,
                                   "color": _translucent(style.colour(point["technique"]), 0.55),
                                   "array": [max(0.0, b[1] - v) for b, v in zip(bounds, ys)],
                                   "arrayminus": [max(0.0, v - b[0]) for b, v in zip(bounds, ys)]}
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=_member_name(point, report.overlay), **whiskers,
            meta={"role": "context", "sweep": point["sweep"], "technique": point["technique"]},
            customdata=[[run_route(point), point["trial"], point["sweep"]]] * len(xs),
            line={"color": style.colour(point["technique"]), "dash": "dash" if is_reference(point["technique"]) else dash, "width": 2},
            marker={"symbol": style.symbol(point["sweep"], point["technique"]), "size": 9},
            text=[fmt_interval(point["metrics"], f"accuracy/ctx{n}") for n in xs],
            hovertemplate="%{x} tokens: accuracy %{y:.2f}%{text}<extra>" + _member_name(point, report.overlay) + "</extra>",
        ))
    fig.update_xaxes(title_text="context length [tokens]", tickvals=lengths, type="linear")
    fig.update_yaxes(title_text="accuracy [fraction] · higher is better", range=[-0.05, 1.05])
    return _layout(fig, 420)


def heatmap_figure(report: ReportData, style: Style) -> tuple[go.Figure | None, list[str]]:
    """Needle-in-a-haystack maps (depth x context length, colour = accuracy) of the front's members."""
    notes: list[str] = []
    if not context_lengths(report):
        return None, notes
    members = _members(report)
    if len(members) > MAX_HEATMAPS:
        notes.append(f"showing {MAX_HEATMAPS} of the front's {len(members)} members")
        members = members[:MAX_HEATMAPS]
    maps = []
    for point in members:
        record = report.sweep(point["sweep"]).record(point["trial"])
        samples = (record or {}).get("samples") or []
        cells: dict[tuple[float, int], list[float]] = defaultdict(list)
        for sample in samples:
            if sample.get("depth") is not None and sample.get("context_length") is not None:
                cells[(round(float(sample["depth"]), 3), int(sample["context_length"]))].append(float(sample.get("accuracy", sample.get("correct", 0.0))))
        if not cells:
            notes.append(f"no per-sample record for trial {point['trial']} of {point['sweep']}")
            continue
        maps.append((point, cells))
    if not maps:
        return None, notes
    cols = max(2, min(3, len(maps)))  # one map alone would stretch across the page
    rows = math.ceil(len(maps) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_member_name(p, report.overlay) for p, _ in maps],
                        horizontal_spacing=0.06, vertical_spacing=min(0.14, 0.6 / rows))
    for i, (point, cells) in enumerate(maps):
        depths = sorted({d for d, _ in cells})
        lengths = sorted({n for _, n in cells})
        z = [[_mean(cells.get((d, n))) for n in lengths] for d in depths]
        counts = [[len(cells.get((d, n), [])) for n in lengths] for d in depths]
        fig.add_trace(
            go.Heatmap(
                x=[str(n) for n in lengths], y=[f"{d:.0%}" for d in depths], z=z, customdata=counts,
                coloraxis="coloraxis", texttemplate="%{z:.0%}", xgap=2, ygap=2,
                meta={"role": "niah", "sweep": point["sweep"], "trial": point["trial"]},
                hovertemplate="%{x} tokens, needle at %{y} depth: accuracy %{z:.0%} (%{customdata} samples)<extra></extra>",
            ),
            row=i // cols + 1, col=i % cols + 1,
        )
    fig.update_xaxes(title_text="context length [tokens]", type="category")
    fig.update_yaxes(title_text="needle depth", type="category", autorange="reversed")
    fig.update_layout(coloraxis={"colorscale": "RdYlGn", "cmin": 0, "cmax": 1,
                                 "colorbar": {"title": {"text": "accuracy"}, "tickformat": ".0%", "len": 0.8}})
    return _layout(fig, 90 + 270 * rows), notes


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None
