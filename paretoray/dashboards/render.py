"""One self-contained HTML page from a report's figures: plotly.js inlined once, no network.

The page is a small hand-written shell (layout, a sortable table, run links) around plotly
figures passed as JSON. It opens from a file, and inside the MLflow UI's artifact viewer, which
shows HTML in an iframe sandboxed with `allow-scripts` only, loaded from a `blob:` URL. There the
page finds the MLflow server's address from the blob URL, but the sandbox forbids opening a new
tab or navigating the MLflow window, so links say how to open them (right click, new tab).
"""

from __future__ import annotations

import datetime as dt
import html
import json
from typing import Any

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from paretoray.dashboards import figures as F
from paretoray.dashboards.data import (
    CI_LEVEL,
    ReportData,
    SweepData,
    indistinguishable_from_dense,
    interval,
    is_reference,
    judged_objectives,
    reference_name,
    min_dense_accuracy,
    uninformative_parts,
    uninformative_task,
)

DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"  # what `paretoray ui` serves by default


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


class _Page:
    """Collects sections and the figures they place."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.figures: list[tuple[str, str, go.Figure]] = []

    def figure(self, fig: go.Figure, kind: str, wide: bool = False) -> str:
        fid = f"fig-{len(self.figures)}"
        self.figures.append((fid, kind, fig))
        return f'<div class="plot{" wide" if wide else ""}" id="{fid}" data-kind="{esc(kind)}"></div>'

    def figures_json(self) -> str:
        items = [f'{{"id": {json.dumps(fid)}, "kind": {json.dumps(kind)}, "figure": {fig.to_json()}}}' for fid, kind, fig in self.figures]
        # `</` inside a <script> element would end it; `<\/` is the same JSON string.
        return ("[" + ",".join(items) + "]").replace("</", "<\\/")


def _setting(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return ", ".join(_setting(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_setting(v)}" for k, v in value.items())
    return F.fmt_param(value)


PLACEMENTS = {
    "query_aware": "the question was part of the prompt the technique compressed (it could select for it)",
    "context_only": "the context was compressed first, the question asked after (the technique never saw it)",
}


def workload_settings(workload: dict[str, Any]) -> str:
    """The task's own settings, whatever they are (each task has its fields): `name value; ...`,
    unset and empty ones left out."""
    shown = [(k, v) for k, v in workload.items() if k != "task" and v is not None and v != [] and v != {} and v != ""]
    return "; ".join(f"{k} {_setting(v)}" for k, v in shown)


def _sweep_summary(sweep: SweepData) -> str:
    model = sweep.spec.get("model") or {}
    workload = sweep.spec.get("workload") or {}
    finished = len(sweep.rows)
    complete = len(sweep.complete)
    target = sweep.trials_target
    parts = [f"model <b>{esc(model.get('id', '?'))}</b> ({esc(model.get('dtype', '?'))})"]
    if model.get("draft"):
        parts.append(f"draft <b>{esc(model['draft'])}</b>")
    task = f"task <b>{esc(workload.get('task', '?'))}</b>"
    settings = workload_settings(workload)
    if settings:
        task += f' <span class="settings">({esc(settings)})</span>'
    parts.append(task)
    env = sweep.env
    if env.get("device_name"):
        parts.append(f"on {esc(env['device_name'])}")
    counts = f"{finished} trials finished" + (f" of {target}" if target else "") + f" ({complete} complete, {finished - complete} failed)"
    parts.append(counts)
    return " · ".join(parts)


def _status_badge(sweep: SweepData, generated: str) -> str:
    if sweep.running:
        flight = f", {sweep.in_flight} running" if sweep.in_flight else ""
        return (f'<span class="badge live">sweep running: refreshed at {esc(generated)} after {len(sweep.rows)} trials{flight}; '
                f'open the artifact again for newer trials</span>')
    if sweep.status in ("KILLED", "FAILED"):
        return f'<span class="badge stopped">sweep {esc(sweep.status.lower())}: resume it with paretoray sweep resume {esc(sweep.name)}</span>'
    return ""


def _cards(report: ReportData, style: F.Style) -> str:
    cards = []
    feasible = [p for p in report.points if p["feasible"]]
    for objective in report.objectives:
        if not feasible:
            break
        pick = max if report.directions[objective] == "maximize" else min
        best = pick(feasible, key=lambda p: p["metrics"][objective])
        others = ", ".join(f"{o} {F.fmt_metric(best['metrics'], o)} {F.unit(o)}" for o in report.objectives if o != objective)
        bounds = F.fmt_interval(best["metrics"], objective)
        cards.append(
            f'<div class="card"><div class="card-title">best {esc(objective)}</div>'
            f'<div class="card-value">{esc(F.fmt(best["metrics"][objective]))} <small>{esc(F.unit(objective))}'
            f'{" " + esc(bounds.strip()) if bounds else ""}</small></div>'
            f'<div class="card-note"><span class="dot" style="background:{style.colour(best["technique"])}"></span>{esc(best["label"] or best["technique"])}'
            f'{" · " + esc(best["sweep"]) if report.overlay else ""}<br><small>{esc(others)}</small></div></div>'
        )
    front = report.front
    techniques = sorted({p["technique"] for p in front})
    cards.append(
        f'<div class="card"><div class="card-title">Pareto front</div><div class="card-value">{len(front)} '
        f'<small>of {len(report.points)} trials</small></div><div class="card-note">{esc(", ".join(techniques)) or "empty"}</div></div>'
    )
    for sweep in report.sweeps[:1]:
        source, values = sweep.reference()
        if values:
            shown = [f"{o} {F.fmt_metric(values, o)} {F.unit(o)}" for o in report.objectives if o in values]
            cards.append(f'<div class="card"><div class="card-title">reference: {esc(source)}</div>'
                         f'<div class="card-note">{esc("; ".join(shown)) or "no objective defined for it"}</div></div>')
    return '<div class="cards">' + "".join(cards) + "</div>"


def _table(report: ReportData, style: F.Style) -> str:
    """The front, sortable by any column (the page's script sorts on `data-value`)."""
    extra = [m for m in ("speedup", "kv_cache_mb", "accuracy", "ttft_ms") if m not in report.objectives
             and any(m in p["metrics"] for p in report.front)][:3]
    head = (["sweep"] if report.overlay else []) + ["trial", "technique", "setting", "question"] + report.objectives + extra + ["MLflow run"]
    numeric = {"trial", *report.objectives, *extra}
    header = "".join(
        f'<th data-type="{"number" if h in numeric else "text"}" title="click to sort">{esc(h)}'
        + (f'<br><small>{esc(F.unit(h))} · {"higher" if report.directions[h] == "maximize" else "lower"} is better</small>'
           if h in report.directions else (f"<br><small>{esc(F.unit(h))}</small>" if F.unit(h) else ""))
        + "</th>"
        for h in head
    )
    body = []
    first = report.objectives[0]
    for p in sorted(report.front, key=lambda p: (p["sweep"], p["metrics"][first])):
        cells = [f'<td data-value="{esc(p["sweep"])}">{esc(p["sweep"])}</td>'] if report.overlay else []
        cells.append(f'<td data-value="{p["trial"]}">{p["trial"]}</td>')
        cells.append(f'<td data-value="{esc(p["technique"])}"><span class="dot" style="background:{style.colour(p["technique"])}">'
                     f'</span>{esc(p["technique"])}{_dense_badge(p, report.objectives)}</td>')
        setting = ", ".join(f"{k}={F.fmt_param(v)}" for k, v in p["params"].items()) or "(no parameters)"
        cells.append(f'<td data-value="{esc(setting)}">{esc(setting)}</td>')
        placement = p.get("placement", "query_aware")
        cells.append(f'<td data-value="{esc(placement)}" data-placement="{esc(placement)}" title="{esc(PLACEMENTS.get(placement, placement))}">{esc(placement)}</td>')
        for metric in report.objectives + extra:
            value = p["metrics"].get(metric)
            bounds = interval(p["metrics"], metric) if value is not None else None
            shown = esc(F.fmt(value) if value is not None else "")
            if bounds:  # the sort keeps to the value (data-value); the interval is read beside it
                shown += (f' <small class="ci" data-ci-low="{json.dumps(bounds[0])}" data-ci-high="{json.dumps(bounds[1])}">'
                          f'{esc(F.fmt_interval(p["metrics"], metric).strip())}</small>')
            cells.append(f'<td class="num" data-metric="{esc(metric)}" data-value="{json.dumps(value)}">{shown}</td>')
        route = F.run_route(p)
        link = (f'<a class="run-link" data-route="{esc(route)}" data-run-id="{esc(p["mlflow_run_id"])}" href="{esc(route)}" '
                f'rel="noopener">{esc(p["mlflow_run_id"][:8])}…</a>') if route else "(no run)"
        cells.append(f'<td data-value="{esc(p.get("mlflow_run_id") or "")}">{link}</td>')
        body.append(f'<tr data-trial="{p["trial"]}" data-sweep="{esc(p["sweep"])}">' + "".join(cells) + "</tr>")
    return (f'<table class="front" id="front-table"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _dense_badge(point: dict[str, Any], objectives: list[str]) -> str:
    if is_reference(point["technique"]):
        return ' <span class="badge reference" title="the reference the other trials are compared with">reference</span>'
    if indistinguishable_from_dense(point["metrics"], objectives):
        judged = ", ".join(judged_objectives(point["metrics"], objectives))
        dense = esc(reference_name())
        return (f' <span class="badge same-as-dense" title="each {CI_LEVEL} interval ({esc(judged)}) contains {dense}\'s value">'
                f"≈ {dense}</span>")
    return ""


def dense_sentence(report: ReportData) -> str | None:
    """Which front members are indistinguishable from dense (`indistinguishable_from_dense`), as a
    sentence for above the front's table; None when no front member has an interval to judge by."""
    dense = reference_name()
    members = [p for p in report.front if not is_reference(p["technique"])]
    judged = [p for p in members if judged_objectives(p["metrics"], report.objectives)]
    if not judged:
        return None
    first = report.objectives[0]
    same = sorted((p for p in judged if indistinguishable_from_dense(p["metrics"], report.objectives)),
                  key=lambda p: (p["sweep"], p["metrics"][first]))
    aside = f" other than {dense}" if len(members) < len(report.front) else ""
    on = sorted({o for p in judged for o in judged_objectives(p["metrics"], report.objectives)}, key=report.objectives.index)
    unjudged = len(members) - len(judged)
    tail = f" ({unjudged} member{'s' if unjudged > 1 else ''} without intervals not judged)" if unjudged else ""
    rule = (f"on each objective with an interval (here {', '.join(on)}), the interval contains {dense}'s value "
            f"(1 for speedups and ratios to {dense}; {dense}'s own accuracy on the same samples, "
            "measured in the same trial, for accuracy)")
    if not same:
        return (f"No front member{aside} is indistinguishable from {dense} within its {CI_LEVEL} intervals{tail}: "
                f"each differs from it beyond its interval on at least one of {', '.join(on)}.")
    names = ", ".join(f"trial {p['trial']} ({p['label'] or p['technique']}{' · ' + p['sweep'] if report.overlay else ''})" for p in same)
    return (f"{len(same)} of {len(judged)} front members{aside} {'is' if len(same) == 1 else 'are'} indistinguishable from "
            f"{dense} within {'its' if len(same) == 1 else 'their'} {CI_LEVEL} intervals{tail}: {names}. "
            f"Marked ≈ {dense} in the table: {rule}.")


def uninformative_banner(report: ReportData) -> str:
    """A warning per sweep whose dense model scores below `workload.min_dense_accuracy` on its task."""
    accuracy_axis = any(o.startswith("accuracy") or o.endswith("_accuracy") for o in report.objectives)
    dense = reference_name()
    parts = []
    for sweep in report.sweeps:
        found = uninformative_task(sweep.spec, sweep.rows)
        if found is None:
            continue
        value, threshold, source = found
        prefix = f"<b>{esc(sweep.name)}</b>: " if report.overlay else ""
        consequence = ("the accuracy axis of this front says little about the techniques" if accuracy_axis
                       else "accuracy says little about the techniques")
        parts.append(
            f'<div class="warning alert uninformative" role="alert" data-sweep="{esc(sweep.name)}">{prefix}'
            f"<b>{esc(dense)} scores {esc(F.fmt(value))} on this task: below min_dense_accuracy {esc(F.fmt(threshold))}, "
            f"{consequence}</b> <small>({esc(source)}; the task is too hard for this model to tell what a technique loses; "
            "choose an easier setting or a stronger model, or set workload.min_dense_accuracy)</small></div>"
        )
    for sweep in report.sweeps:
        weak = uninformative_parts(sweep.spec, sweep.rows)
        if not weak:
            continue
        prefix = f"<b>{esc(sweep.name)}</b>: " if report.overlay else ""
        listed = ", ".join(f"{esc(part)} ({esc(F.fmt(value))})" for part, value in weak)
        parts.append(
            f'<div class="warning alert uninformative-parts" role="alert" data-sweep="{esc(sweep.name)}">{prefix}'
            f"<b>{esc(dense)} scores below min_dense_accuracy {esc(F.fmt(min_dense_accuracy(sweep.spec)))} on {listed}</b>: "
            "on this model those entries' accuracy/ENTRY figures say little about the techniques "
            "(median dense_accuracy/ENTRY over complete trials).</div>"
        )
    return "".join(parts)


def render_report(report: ReportData, mlflow_url: str | None = None, command: str | None = None,
                  generated_at: dt.datetime | None = None) -> str:
    """The whole page as one string."""
    style = F.Style(report)
    page = _Page()
    generated = (generated_at or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Pareto report: {report.title}"

    header = [f"<h1>{esc(title)}</h1>"]
    for sweep in report.sweeps:
        prefix = f"<b>{esc(sweep.name)}</b>: " if report.overlay else ""
        desc = f' <span class="desc">{esc(sweep.spec.get("description", ""))}</span>' if sweep.spec.get("description") else ""
        header.append(f'<p class="meta">{prefix}{_sweep_summary(sweep)}{desc} {_status_badge(sweep, generated)}</p>')
    header.append(uninformative_banner(report))
    objectives = ", ".join(f"{o} ({'max' if report.directions[o] == 'maximize' else 'min'})" for o in report.objectives)
    header.append(f'<p class="meta">objectives: {esc(objectives)}'
                  + (f" (shared by all sweeps)" if report.overlay else "")
                  + (f" · {report.failed} failed trial(s) are not plotted" if report.failed else "") + "</p>")
    timed = [o for o in report.objectives if o in ("latency_ms_per_token", "ttft_ms", "tokens_per_s")]
    if report.overlay and timed:
        header.append(f'<p class="meta">Across sweeps, {esc(", ".join(timed))} compare only if every sweep ran on an equally quiet '
                      f"machine; <code>speedup</code> (against {esc(reference_name())} measured in the same actor) travels better.</p>")
    if report.forced_differences:
        header.append('<div class="warning"><b>Overlaid with --force although these differ</b> (numbers may not be comparable):<ul>'
                      + "".join(f"<li>{esc(d)}</li>" for d in report.forced_differences) + "</ul></div>")
    for sweep in report.sweeps:
        for note in sweep.notes:
            header.append(f'<div class="warning">{esc(sweep.name)}: {esc(note)}</div>')
    header.append('<div class="sandbox-note" id="sandbox-note" hidden>This report is shown inside MLflow\'s artifact viewer, '
                  "whose sandbox forbids a page to open other pages: clicking a run link does nothing here. Open the link from "
                  "the browser's own menu (right click, <i>Open link in new tab</i>), find the trial by its number in the "
                  "sweep's runs, or download the report and open it directly.</div>")
    page.parts.append("<header>" + "".join(header) + _cards(report, style) + "</header>")

    if not report.points:
        page.parts.append('<section><h2>No complete trial yet</h2><p>The report fills in as trials finish.</p></section>')
    else:
        panels = [page.figure(F.pareto_figure(report, style, x, y), "pareto")
                  for x, y in F.objective_pairs(report.objectives, report.directions)]
        outline = ("large outlined markers: the Pareto front" + (" of all sweeps together" if report.overlay else "")
                   + ("; dotted lines: each sweep's own front" if report.overlay and len(report.objectives) == 2 else "")
                   + ("; the dotted staircase bounds what the front dominates" if not report.overlay and len(report.objectives) == 2 else "")
                   + (f" (over all {len(report.objectives)} objectives, so some look dominated in a 2-D panel)"
                      if len(report.objectives) > 2 else ""))
        page.parts.append(
            f'<section><h2>Pareto front{"s" if len(panels) > 1 else ""}</h2><p class="hint">Each point is a trial, coloured by technique'
            f'{", shaped by sweep" if report.overlay else f"; {esc(reference_name())} is the star"}; {esc(outline)}; faded points are dominated, open ones '
            "infeasible. Hover for parameters and metrics, click a point to open its MLflow run, drag to zoom, double-click to reset.</p>"
            f'<div class="grid{" single" if len(panels) == 1 else ""}">{"".join(panels)}</div></section>'
        )
        intervals = any(interval(p["metrics"], o) for p in report.front for o in report.objectives)
        sentence = dense_sentence(report)
        page.parts.append(f'<section><h2>The front</h2><p class="hint">Click a column to sort. The same trials as '
                          f'<code>paretoray results NAME --pareto</code>'
                          + (f"; brackets hold {CI_LEVEL} intervals" if intervals else "") + ".</p>"
                          + (f'<p class="dense-verdict" id="dense-verdict">{esc(sentence)}</p>' if sentence else "")
                          + f"{_table(report, style)}</section>")

        effects = F.parameter_figure(report, style, report.objectives)
        if effects is not None:
            page.parts.append('<section><h2>What each parameter does</h2><p class="hint">Every objective against every swept '
                              "parameter; outlined points are on the front.</p>" + page.figure(effects, "effects", wide=True) + "</section>")
        importance_parts = []
        for sweep in report.sweeps:
            fig = F.importance_figure(sweep)
            caption = f"<h3>{esc(sweep.name)}</h3>" if report.overlay else ""
            note = f'<p class="hint">{esc(sweep.importances.note)}</p>' if sweep.importances.note else ""
            importance_parts.append(caption + note + (page.figure(fig, "importance", wide=True) if fig is not None else ""))
        page.parts.append('<section><h2>Which parameters matter</h2><p class="hint">Optuna\'s parameter importances: how much each '
                          "parameter (the technique itself included) decides whether a trial reaches the front, and each objective's "
                          "best values.</p>" + "".join(importance_parts) + "</section>")

        decoding = F.decoding_figure(report, style)
        if decoding is not None:
            page.parts.append('<section><h2>Speculative decoding</h2><p class="hint">Acceptance rate (draft tokens the target '
                              "accepted) and speedup over autoregressive decoding in the same actor, against each speculative "
                              "parameter.</p>" + page.figure(decoding, "decoding", wide=True) + "</section>")
        context = F.context_figure(report, style)
        if context is not None:
            heatmaps, notes = F.heatmap_figure(report, style)
            note = "".join(f'<p class="hint">{esc(n)}</p>' for n in notes)
            page.parts.append(
                '<section><h2>Long context: where the front loses the needle</h2><p class="hint">Accuracy against context length '
                f"for each member of the front ({esc(reference_name())} dashed), then the familiar needle-in-a-haystack map per member: needle depth "
                "down, context length across, colour = share of samples answered exactly.</p>"
                + page.figure(context, "context", wide=True)
                + (page.figure(heatmaps, "niah", wide=True) if heatmaps is not None else "") + note + "</section>"
            )

    footer = f"generated {esc(generated)} by paretoray"
    if command:
        footer += f" · <code>{esc(command)}</code>"
    page.parts.append(f"<footer>{footer}</footer>")
    return _document(title, "".join(page.parts), page.figures_json(), mlflow_url or DEFAULT_MLFLOW_URL)


def _document(title: str, body: str, figures_json: str, mlflow_url: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(title)}</title>"
        f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head>"
        f'<body data-mlflow-url="{esc(mlflow_url.rstrip("/") + "/")}">{body}'
        f'<script type="application/json" id="report-figures">{figures_json}</script>'
        f"<script>{_JS}</script></body></html>\n"
    )


_CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #e3e6ec; --bg: #f6f7f9; --accent: #0b62d6; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
h1 { font-size: 24px; margin: 0 0 6px; }
h2 { font-size: 18px; margin: 0 0 4px; }
h3 { font-size: 15px; margin: 14px 0 2px; }
header, section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 20px; margin-bottom: 18px; }
.meta { color: var(--muted); margin: 2px 0; }
.meta b { color: var(--ink); }
.desc { font-style: italic; }
.hint { color: var(--muted); margin: 2px 0 10px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; margin-left: 6px; }
.badge.live { background: #e5f4ea; color: #1b6b35; }
.badge.stopped { background: #fdecea; color: #9b1c1c; }
.badge.same-as-dense { background: #e8eefc; color: #1d3f8f; cursor: help; }
.badge.reference { background: #ececec; color: #3b3b3b; }
.warning.alert { background: #fdecea; border-color: #e8a29b; color: #7a1212; font-size: 15px; }
.warning.alert small { color: #7a1212; }
.dense-verdict { margin: 2px 0 10px; }
.settings { color: var(--muted); }
small.ci { color: var(--muted); white-space: nowrap; }
.warning { background: #fff6e0; border: 1px solid #f0d18a; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.warning ul { margin: 4px 0 0 18px; padding: 0; }
.sandbox-note { background: #eef4ff; border: 1px solid #c6d8fb; border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 14px; }
.card { flex: 1 1 190px; max-width: 320px; border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fbfcfd; }
.card-title { font-size: 12px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
.card-value { font-size: 22px; font-weight: 600; }
.card-value small { font-size: 13px; font-weight: 400; color: var(--muted); }
.card-note { font-size: 13px; overflow-wrap: anywhere; }
.card-note small { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(520px, 100%), 1fr)); gap: 12px; }
@media (max-width: 760px) { body { padding: 8px; } header, section { padding: 12px; } }
.grid.single { grid-template-columns: 1fr; }
.plot { min-height: 300px; }
table.front { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.front th, table.front td { border-bottom: 1px solid var(--line); padding: 6px 10px; text-align: left; vertical-align: top; }
table.front th { cursor: pointer; user-select: none; background: #fafbfc; position: sticky; top: 0; }
table.front th small { font-weight: 400; color: var(--muted); }
table.front th.sorted-asc::after { content: " ▲"; }
table.front th.sorted-desc::after { content: " ▼"; }
table.front td.num { text-align: right; }
table.front tbody tr:hover { background: #f3f7ff; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 6px; vertical-align: baseline; }
a { color: var(--accent); }
code { background: #f0f2f5; padding: 1px 4px; border-radius: 4px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
"""

_JS = """
(function () {
  "use strict";
  // Inside MLflow's artifact viewer the page is a blob: URL in an iframe sandboxed with
  // allow-scripts only: the blob URL names the MLflow server, the referrer its path.
  var body = document.body;
  var sandboxed = location.protocol === "blob:";
  function mlflowBase() {
    if (sandboxed) {
      var origin = new URL(location.href.slice(5)).origin;
      var ref = document.referrer || "";
      if (ref.indexOf(origin + "/") === 0) return ref.split("#")[0].split("?")[0].replace(/[^/]*$/, "");
      return origin + "/";
    }
    return body.getAttribute("data-mlflow-url");
  }
  var base = mlflowBase();
  function runUrl(route) { return route ? base + route : null; }
  function openRun(route) {
    var url = runUrl(route);
    if (!url) return;
    if (sandboxed) { document.getElementById("sandbox-note").hidden = false; return; }
    window.open(url, "_blank", "noopener");
  }
  document.querySelectorAll("a.run-link").forEach(function (a) {
    a.href = runUrl(a.getAttribute("data-route"));
    a.target = "_blank";
    a.title = a.href;
  });
  if (sandboxed) document.getElementById("sandbox-note").hidden = false;

  var figures = JSON.parse(document.getElementById("report-figures").textContent);
  var config = { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"],
                 toImageButtonOptions: { format: "png", scale: 2 } };
  var rendered = figures.map(function (item) {
    var div = document.getElementById(item.id);
    return Plotly.newPlot(div, item.figure.data, item.figure.layout, config).then(function () {
      div.on("plotly_click", function (event) {
        var point = event.points && event.points[0];
        if (point && point.customdata && point.customdata[0]) openRun(point.customdata[0]);
      });
    });
  });

  document.querySelectorAll("table.front").forEach(function (table) {
    var heads = table.querySelectorAll("th");
    heads.forEach(function (th, column) {
      th.addEventListener("click", function () {
        var ascending = !th.classList.contains("sorted-asc");
        heads.forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
        th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
        var numeric = th.getAttribute("data-type") === "number";
        var tbody = table.tBodies[0];
        var rows = Array.prototype.slice.call(tbody.rows);
        rows.sort(function (a, b) {
          var x = a.cells[column].getAttribute("data-value"), y = b.cells[column].getAttribute("data-value");
          if (numeric) {  // a trial without this metric sorts last either way
            var u = parseFloat(x), v = parseFloat(y);
            if (isNaN(u) || isNaN(v)) return isNaN(u) - isNaN(v);
            return ascending ? u - v : v - u;
          }
          var order = x.localeCompare(y);
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { tbody.appendChild(row); });
      });
    });
  });
  window.paretorayReport = { base: base, sandboxed: sandboxed, ready: Promise.all(rendered) };
})();
"""
