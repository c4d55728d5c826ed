"""Reports from real stores (Optuna and MLflow on SQLite), without Ray: trials are written by the
controller's own ask/finish code with records shaped like the runner's, so the page is checked
against what `paretoray results` prints. The browser tests (test_dashboards_browser.py) run a real
sweep on Ray and look at the page in Chromium."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from plotly.offline import get_plotlyjs

from paretoray.dashboards import REPORT_FILE, live_report_html
from paretoray.dashboards.data import (
    ReportError,
    collect_sweep,
    combine,
    dense_accuracy,
    front_of,
    indistinguishable_from_dense,
    interval,
    uninformative_task,
)
from paretoray.dashboards.render import render_report
from paretoray.orchestrator import cli
from paretoray.names import SPEC_ATTR
from paretoray.orchestrator.book import SweepBook
from paretoray.orchestrator.spec import parse
from paretoray.orchestrator.stores import resolve_stores

LENGTHS = [256, 512]
DEPTHS = [0.1, 0.5, 0.9]


def passkey_spec(name: str, techniques: dict, objectives: dict | None = None, lengths: list[int] = LENGTHS) -> dict:
    return {
        "name": name,
        "model": {"id": "smollm2-135m", "dtype": "float32"},
        "workload": {"task": "passkey", "context_lengths": lengths, "depths": DEPTHS, "samples_per_length": 1, "max_new_tokens": 4},
        "techniques": techniques,
        "objectives": objectives or {"latency_ms_per_token": "minimize", "accuracy": "maximize"},
        "sampler": {"name": "grid", "seed": 0},
        "trials": 6,
        "actors": {"count": 1},
    }


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """A 95 % interval of a proportion (Wilson's score interval)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def passkey_record(number: int, technique: str, params: dict, lengths: list[int]) -> dict[str, Any]:
    """A runner-shaped record: a window keeps the needle when it lies within the last `window` tokens.

    With the runner's intervals: Wilson's for accuracy (6 samples: wide), and for the paired speedup
    an interval that widens with the window (a large window is timed closest to dense), so the widest
    window, which keeps every needle, cannot be told apart from dense on any objective."""
    window = params.get("window") or params.get("max_capacity_prompt")
    samples = []
    for n in lengths:
        for depth in DEPTHS:
            kept = window is None or (1 - depth) * n <= window or technique == "snapkv"
            samples.append({"sample_id": f"{n}/{depth}", "context_length": n, "depth": depth, "correct": float(kept),
                            "output": "12345" if kept else "9", "ttft_ms": 5.0, "latency_ms_per_token": 10.0})
    latency = 10.0 + (window or 2048) / 100
    correct = sum(s["correct"] for s in samples)
    speedup = 30.48 / latency
    spread = 0.05 if window is None else window / 600  # relative half-width of the speedup's interval
    low, high = wilson(correct, len(samples))
    dense = 1.0  # dense keeps every needle
    metrics = {"accuracy": correct / len(samples), "accuracy_ci_low": low, "accuracy_ci_high": high,
               "dense_accuracy": dense, "relative_accuracy": correct / len(samples) / dense,
               "relative_accuracy_ci_low": low / dense, "relative_accuracy_ci_high": high / dense,
               "latency_ms_per_token": latency, "kv_cache_mb": (window or 1024) / 100,
               "speedup": speedup, "speedup_ci_low": speedup * (1 - spread), "speedup_ci_high": speedup * (1 + spread),
               "ttft_ms": 5.0, "ttft_speedup": 1.0, "ttft_speedup_ci_low": 0.9, "ttft_speedup_ci_high": 1.1,
               "target_calls_per_token": 1.0}
    for n in lengths:
        mine = [s["correct"] for s in samples if s["context_length"] == n]
        metrics[f"accuracy/ctx{n}"] = sum(mine) / len(mine)
        metrics[f"accuracy/ctx{n}_ci_low"], metrics[f"accuracy/ctx{n}_ci_high"] = wilson(sum(mine), len(mine))
    return {"trial": number, "technique": technique, "params": params, "status": "ok", "label": technique + ("(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")" if params else ""),
            "metrics": metrics, "samples": samples, "baseline": {"latency_ms_per_token": 30.48, "ttft_ms": 5.0},
            "env": {"device_name": "test-cpu", "dtype": "float32", "torch_threads": 1}, "actor": {"node_ip": "127.0.0.1"}, "wall_s": 1.0}


def hard_record(number: int, technique: str, params: dict, lengths: list[int]) -> dict[str, Any]:
    """A task too hard for the model: dense itself answers one sample in three."""
    record = passkey_record(number, technique, params, lengths)
    metrics = dict(record["metrics"])
    for name in ("accuracy", "accuracy_ci_low", "accuracy_ci_high"):
        metrics[name] = metrics[name] / 3
    metrics["dense_accuracy"] = 1 / 3
    return record | {"metrics": metrics}


def decoding_record(number: int, technique: str, params: dict, lengths: list[int]) -> dict[str, Any]:
    gamma = params.get("gamma", 0)
    acceptance = 0.9 - 0.08 * gamma if technique == "specdec" else 0.0
    calls = 1.0 / (1 + acceptance * gamma) if gamma else 1.0
    metrics = {"latency_ms_per_token": 30.0 * calls + 2 * gamma, "target_calls_per_token": calls, "accuracy": 1.0,
               "output_match": 1.0, "speedup": 30.0 / (30.0 * calls + 2 * gamma)}
    if technique == "specdec":
        metrics["acceptance_rate"] = acceptance
    return {"trial": number, "technique": technique, "params": params, "status": "ok", "label": f"{technique}(gamma={gamma})" if gamma else technique,
            "metrics": metrics, "samples": [], "baseline": {"latency_ms_per_token": 30.0, "ttft_ms": 5.0},
            "env": {"device_name": "test-cpu", "dtype": "float32"}, "actor": {}, "wall_s": 1.0}


def run_fake_sweep(stores, data: dict, make_record=passkey_record, snapshot_after: int | None = None, failing: tuple[str, Any] | None = None):
    """The controller's loop without Ray: ask, build the runner's record here, finish, refresh the
    front (here only where a test looks at it, and at the end, as the controller always does)."""
    spec = parse(data, f"<{data['name']}>")
    book = SweepBook(spec, stores, "# test\n", report=live_report_html)
    book.open(resume=False)
    snapshot = None
    for i in range(spec.trials):
        ticket = book.ask()
        record = make_record(ticket.number, ticket.technique, ticket.params, data["workload"].get("context_lengths", []))
        if failing and (ticket.technique, ticket.params.get("window")) == failing:
            record = record | {"status": "failed", "error": "RuntimeError: boom", "traceback": "Traceback: boom"}
        book.finish(ticket, record)
        if snapshot_after is not None and i + 1 == snapshot_after:
            book.recorder.update_front(book.parent, book.study, book.objectives)
            snapshot = logged_report(stores, book.parent)
    book.refresh_front(final=True)
    book.close()
    return book.study, book.parent, snapshot


def logged_report(stores, parent: str) -> str:
    client = MlflowClient(stores.tracking_uri)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(parent, REPORT_FILE, tmp)).read_text()


def figures_of(html: str) -> list[dict]:
    blob = re.search(r'<script type="application/json" id="report-figures">(.*?)</script>', html, re.S).group(1)
    return json.loads(blob)


def trial_counts(figure: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trace in figure["data"]:
        meta = trace.get("meta") or {}
        if meta.get("role") == "trials":
            key = f"{meta['sweep']}/{meta['technique']}"
            counts[key] = counts.get(key, 0) + len(trace["x"])
    return counts


def table_rows(html: str) -> list[dict[str, Any]]:
    rows = []
    for match in re.finditer(r'<tr data-trial="(\d+)" data-sweep="([^"]*)">(.*?)</tr>', html, re.S):
        values = {m.group(1): json.loads(m.group(2)) for m in re.finditer(r'data-metric="([^"]+)" data-value="([^"]*)"', match.group(3))}
        run = re.search(r'data-run-id="([^"]+)"', match.group(3))
        placement = re.search(r'data-placement="([^"]+)"', match.group(3))
        rows.append({"trial": int(match.group(1)), "sweep": match.group(2), "metrics": values, "run": run.group(1) if run else None,
                     "question": placement.group(1) if placement else None})
    return rows


def results_json(capsys, stores, name: str, pareto: bool = True) -> list[dict]:
    capsys.readouterr()
    flags = ["--pareto"] if pareto else []
    assert cli.main(["results", name, *flags, "--format", "json", "--tracking-uri", stores.tracking_uri, "--storage", stores.storage]) == 0
    return json.loads(capsys.readouterr().out)


def report(capsys, stores, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    out = tmp_path / "report.html"
    out.unlink(missing_ok=True)
    capsys.readouterr()
    code = cli.main(["report", *args, "-o", str(out), "--tracking-uri", stores.tracking_uri, "--storage", stores.storage])
    captured = capsys.readouterr()
    return code, out.read_text() if out.exists() else "", captured.err


QUICK = {"dense": {}, "streaming_llm": {"n_sink": 4, "window": [32, 64, 128, 256, 512]}}
THREE = {"latency_ms_per_token": "minimize", "accuracy": "maximize", "kv_cache_mb": "minimize"}
SNAP = {"snapkv": {"max_capacity_prompt": [64, 128, 256]}, "streaming_llm": {"n_sink": 4, "window": [48, 96]}}
DECODING = {
    "name": "spec",
    "model": {"id": "smollm2-135m", "draft": "smollm2-135m-draft"},
    "workload": {"task": "instructions", "samples_per_length": 2, "max_new_tokens": 16},
    "techniques": {"dense": {}, "specdec": {"gamma": [1, 2, 3, 4, 6]}},
    "objectives": {"latency_ms_per_token": "minimize", "target_calls_per_token": "minimize"},
    "sampler": {"name": "grid"},
    "trials": 6,
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One pair of stores holding every sweep these tests read (an MLflow store takes seconds to create)."""
    return resolve_stores(home=str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def sweeps(stores):
    return {
        "quick": run_fake_sweep(stores, passkey_spec("quick", QUICK), snapshot_after=3, failing=("streaming_llm", 64)),
        "short": run_fake_sweep(stores, passkey_spec("short", QUICK)),
        "long": run_fake_sweep(stores, passkey_spec("long", QUICK, lengths=[256, 1024])),
        "snap": run_fake_sweep(stores, passkey_spec("snap", SNAP, objectives=THREE) | {"trials": 5}),
        "other": run_fake_sweep(stores, passkey_spec("other", QUICK, objectives={"kv_cache_mb": "minimize", "speedup": "maximize"})),
        "spec": run_fake_sweep(stores, DECODING, make_record=decoding_record),
        "hard": run_fake_sweep(stores, passkey_spec("hard", {"dense": {}, "streaming_llm": {"n_sink": 4, "window": [64, 512]}})
                               | {"trials": 3}, make_record=hard_record),
    }


def test_single_sweep_report_matches_results(sweeps, stores, tmp_path, capsys):
    study, parent, _ = sweeps["quick"]
    code, html, _ = report(capsys, stores, tmp_path, "quick", "--mlflow-url", "http://mlflow.example:5000")
    assert code == 0

    # Offline: plotly.js inlined exactly once, nothing fetched from elsewhere.
    assert html.count(get_plotlyjs()) == 1
    shell = html.replace(get_plotlyjs(), "")
    assert not re.search(r"<script[^>]+src=", shell) and "cdn" not in shell.lower() and "https://" not in shell

    figures = figures_of(html)
    pareto_panels = [f for f in figures if f["kind"] == "pareto"]
    assert len(pareto_panels) == 1  # two objectives: one pair
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    expected = {}
    for t in complete:
        key = f"quick/{t.user_attrs['technique']}"
        expected[key] = expected.get(key, 0) + 1
    assert trial_counts(pareto_panels[0]["figure"]) == expected
    assert sum(expected.values()) == 5  # the failed trial is not plotted, and the header says so
    assert "1 failed trial(s) are not plotted" in html

    # The table is the front `results --pareto` prints: same trials, same objective values, same runs.
    listed = {row["trial"]: row for row in results_json(capsys, stores, "quick")}
    rows = table_rows(html)
    assert {r["trial"] for r in rows} == set(listed)
    for row in rows:
        assert row["run"] == listed[row["trial"]]["mlflow_run_id"]
        for metric in ("latency_ms_per_token", "accuracy"):
            assert row["metrics"][metric] == listed[row["trial"]]["metrics"][metric]
    experiment = MlflowClient(stores.tracking_uri).get_run(parent).info.experiment_id
    assert f'data-route="#/experiments/{experiment}/runs/{rows[0]["run"]}?workflowType=machine_learning"' in html
    assert 'data-mlflow-url="http://mlflow.example:5000/"' in html

    kinds = [f["kind"] for f in figures]
    assert "effects" in kinds and "importance" in kinds and "context" in kinds and "niah" in kinds
    assert "decoding" not in kinds  # no speculative technique in this sweep
    niah = next(f for f in figures if f["kind"] == "niah")["figure"]
    assert {t["meta"]["trial"] for t in niah["data"]} == set(listed)  # one map per front member
    for heatmap in niah["data"]:  # depth down, length across, the share of samples answered
        member = listed[heatmap["meta"]["trial"]]
        samples = passkey_record(0, member["technique"], member["params"], LENGTHS)["samples"]
        assert heatmap["z"] == [[s["correct"] for s in samples if s["depth"] == d] for d in DEPTHS]
        assert heatmap["x"] == [str(n) for n in LENGTHS] and heatmap["y"] == ["10%", "50%", "90%"]


def test_report_logged_mid_sweep_grows_with_the_sweep(sweeps, stores):
    _, parent, snapshot = sweeps["quick"]
    early = trial_counts(next(f for f in figures_of(snapshot) if f["kind"] == "pareto")["figure"])
    final_html = logged_report(stores, parent)
    final = trial_counts(next(f for f in figures_of(final_html) if f["kind"] == "pareto")["figure"])
    assert sum(early.values()) == 2 and sum(final.values()) == 5  # the third trial failed
    assert "sweep running" in snapshot and "sweep running" not in final_html
    assert "pareto_front.html" not in {a.path for a in MlflowClient(stores.tracking_uri).list_artifacts(parent)}


def test_last_refresh_says_finished_when_fewer_trials_ran_than_the_spec_asks(sweeps, stores):
    """`sweep run --trials N` below the spec's count (or a grid smaller than it): the report the
    controller logs last, before it marks the parent finished, must not say the sweep is running."""
    from paretoray.dashboards.data import collect_sweep

    study, parent, _ = sweeps["quick"]
    client = MlflowClient(stores.tracking_uri)
    spec = study.user_attrs[SPEC_ATTR] | {"trials": 50}  # 5 ran
    client.update_run(parent, status="RUNNING")  # as during the controller's last refresh
    try:
        assert collect_sweep(study, client, parent, spec=spec).running  # a refresh mid-sweep
        assert not collect_sweep(study, client, parent, spec=spec, finished=True).running
    finally:
        client.update_run(parent, status="FINISHED")


def test_overlay_refuses_different_workloads_unless_forced(sweeps, stores, tmp_path, capsys):
    code, html, err = report(capsys, stores, tmp_path, "short", "long")
    assert code == 2 and not html
    assert "cannot overlay sweeps 'short' and 'long'" in err
    assert "workload.context_lengths: [256, 512] in 'short' vs [256, 1024] in 'long'" in err and "--force" in err

    code, html, _ = report(capsys, stores, tmp_path, "short", "long", "--force")
    assert code == 0
    assert "Overlaid with --force" in html and "workload.context_lengths" in html
    panel = next(f for f in figures_of(html) if f["kind"] == "pareto")["figure"]
    assert trial_counts(panel) == {"short/dense": 1, "short/streaming_llm": 5, "long/dense": 1, "long/streaming_llm": 5}


def test_overlay_of_comparable_sweeps_on_shared_objectives(sweeps, stores, tmp_path, capsys):
    code, html, _ = report(capsys, stores, tmp_path, "short", "snap")
    assert code == 0, html
    figures = figures_of(html)
    panels = [f for f in figures if f["kind"] == "pareto"]
    assert len(panels) == 1  # shared objectives: latency and accuracy
    assert trial_counts(panels[0]["figure"]) == {"short/dense": 1, "short/streaming_llm": 5, "snap/snapkv": 3, "snap/streaming_llm": 2}
    # The page's front is the front of both sweeps together (checked here by brute force).
    points = [(name, p["trial"], p["metrics"]["latency_ms_per_token"], p["metrics"]["accuracy"])
              for name in ("short", "snap") for p in results_json(capsys, stores, name, pareto=False)]
    expected = {(n, t) for n, t, lat, acc in points
                if not any(l2 <= lat and a2 >= acc and (l2, a2) != (lat, acc) for _, _, l2, a2 in points)}
    rows = table_rows(html)
    assert {(r["sweep"], r["trial"]) for r in rows} == expected
    assert {"short", "snap"} == {n for n, _ in expected}  # SnapKV keeps the needle cheaper; the smallest window is fastest
    lines = [t["meta"]["sweep"] for t in panels[0]["figure"]["data"] if (t.get("meta") or {}).get("role") == "front-line"]
    assert sorted(lines) == ["short", "snap"]  # each sweep's own front still drawn

    code, _, err = report(capsys, stores, tmp_path, "short", "nope")
    assert code == 2 and "no sweep named 'nope'" in err


def test_no_shared_objective_is_refused(sweeps, stores, tmp_path, capsys):
    code, _, err = report(capsys, stores, tmp_path, "short", "other")
    assert code == 2 and "share no objective" in err and "short: latency_ms_per_token, accuracy" in err


def test_decoding_sweep_shows_acceptance_and_speedup(sweeps, stores, tmp_path, capsys):
    code, html, _ = report(capsys, stores, tmp_path, "spec")
    assert code == 0
    kinds = {f["kind"]: f["figure"] for f in figures_of(html)}
    assert "context" not in kinds and "niah" not in kinds
    decoding = kinds["decoding"]
    titles = [a["text"] for a in decoding["layout"]["annotations"]]
    assert "acceptance_rate vs gamma (specdec)" in titles and "speedup vs gamma (specdec)" in titles
    assert sum(len(t["x"]) for t in decoding["data"] if (t.get("meta") or {}).get("technique") == "specdec") == 2 * 5


def test_front_of_is_optunas_front():
    def point(latency, accuracy, feasible=True):
        return {"metrics": {"latency_ms_per_token": latency, "accuracy": accuracy}, "feasible": feasible}

    points = [point(10, 0.5), point(20, 1.0), point(15, 0.4), point(5, 1.0, feasible=False)]
    assert front_of(points, ["latency_ms_per_token", "accuracy"], {"latency_ms_per_token": "minimize", "accuracy": "maximize"}) == {0, 1}


# ---- intervals, "indistinguishable from dense", uninformative tasks ------------------------------


def members_by_window(study) -> dict[Any, int]:
    return {t.user_attrs["params"].get("window"): t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


def test_whiskers_on_every_axis_that_has_intervals(sweeps, stores, tmp_path, capsys):
    study, _, _ = sweeps["other"]  # kv_cache_mb (no interval) across, speedup (interval) upwards
    code, html, _ = report(capsys, stores, tmp_path, "other")
    assert code == 0
    figures = figures_of(html)
    panel = next(f for f in figures if f["kind"] == "pareto")["figure"]
    metrics = {t.number: t.user_attrs["metrics"] for t in study.trials}
    checked = 0
    for trace in panel["data"]:
        if (trace.get("meta") or {}).get("role") != "trials":
            continue
        assert "error_x" not in trace or not trace["error_x"].get("visible")  # kv_cache_mb has no interval
        bars = trace["error_y"]
        assert bars["visible"] and bars["type"] == "data" and bars["symmetric"] is False
        for (_, trial, _), y, up, down in zip(trace["customdata"], trace["y"], bars["array"], bars["arrayminus"]):
            m = metrics[trial]
            assert y == m["speedup"]
            assert math.isclose(y + up, m["speedup_ci_high"]) and math.isclose(y - down, m["speedup_ci_low"])
            checked += 1
    assert checked == 6

    # Accuracy against latency: whiskers upwards only (latency has no interval); per length too.
    code, html, _ = report(capsys, stores, tmp_path, "short")
    figures = figures_of(html)
    panel = next(f for f in figures if f["kind"] == "pareto")["figure"]
    trials = [t for t in panel["data"] if (t.get("meta") or {}).get("role") == "trials"]
    assert trials and all(t["error_y"]["visible"] and "error_x" not in t for t in trials)
    context = next(f for f in figures if f["kind"] == "context")["figure"]
    assert all(len(t["error_y"]["array"]) == len(t["x"]) for t in context["data"])
    assert any("[" in text for t in context["data"] for text in t["text"])
    # The hover text prints the interval beside the value.
    hover = next(text for t in trials for text in t["text"] if "accuracy</b>: 1 [" in text)
    assert re.search(r"<b>accuracy</b>: 1 \[0\.6\d+, 1\]", hover)


def test_front_table_prints_intervals_and_marks_trials_indistinguishable_from_dense(sweeps, stores, tmp_path, capsys):
    study, _, _ = sweeps["quick"]
    code, html, _ = report(capsys, stores, tmp_path, "quick")
    assert code == 0
    by_window = members_by_window(study)
    metrics = {t.number: t.user_attrs["metrics"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    rows = {r["trial"]: r for r in table_rows(html)}
    assert set(rows) == {by_window[w] for w in (32, 128, 256, 512)}  # dense is dominated by the widest window

    # Each objective with an interval shows it beside the value: `0.8333 [0.4365, 0.9699]`; the sort keeps to the value.
    row_html = {int(m.group(1)): m.group(2) for m in re.finditer(r'<tr data-trial="(\d+)"[^>]*>(.*?)</tr>', html, re.S)}
    for trial in rows:
        m = metrics[trial]
        cell = re.search(r'data-metric="accuracy" data-value="([^"]*)">(.*?)</td>', row_html[trial], re.S)
        assert json.loads(cell.group(1)) == m["accuracy"]
        text = re.sub(r"<[^>]+>", "", cell.group(2))
        low, high = (float(f"{v:.4g}") for v in (m["accuracy_ci_low"], m["accuracy_ci_high"]))
        assert text == f"{m['accuracy']:.4g} [{low:g}, {high:g}]", text
        latency = re.search(r'data-metric="latency_ms_per_token"[^>]*>(.*?)</td>', row_html[trial], re.S).group(1)
        assert "[" not in latency  # no interval for latency
    assert "0.8333 [0.4365, 0.9699]" in re.sub(r"<[^>]+>", "", row_html[by_window[256]])

    # The widest window keeps every needle: its accuracy interval holds dense's 1.0. Latency has no
    # interval and is not judged; every narrower window loses needles beyond its interval.
    marked = {trial for trial, text in row_html.items() if 'class="badge same-as-dense"' in text}
    assert marked == {by_window[512]}
    verdict = re.search(r'<p class="dense-verdict" id="dense-verdict">(.*?)</p>', html, re.S).group(1)
    assert verdict.startswith("1 of 4 front members is indistinguishable from dense within its 95% intervals: "
                              f"trial {by_window[512]} (streaming_llm(n_sink=4,window=512))")
    assert "(here accuracy)" in verdict  # latency has no interval

    # With speedup as an objective (kv_cache_mb vs speedup): only dense's own interval holds 1 ...
    code, html, _ = report(capsys, stores, tmp_path, "other")
    assert 'class="badge same-as-dense"' not in html
    assert "No front member is indistinguishable from dense within its 95% intervals" in html  # the smallest window alone
    # ... and a front without intervals says nothing (the decoding sweep's records have none).
    code, html, _ = report(capsys, stores, tmp_path, "spec")
    assert 'id="dense-verdict"' not in html and 'class="badge same-as-dense"' not in html and 'class="ci"' not in html


def test_indistinguishable_from_dense_rule():
    both = ["speedup", "accuracy"]

    def m(**values):
        return values

    # Every objective with an interval must contain dense's value: 1 for speedups, the trial's own dense_accuracy for accuracy.
    same = m(speedup=1.1, speedup_ci_low=0.9, speedup_ci_high=1.3, accuracy=0.8, accuracy_ci_low=0.6, accuracy_ci_high=0.95,
             dense_accuracy=0.9)
    assert indistinguishable_from_dense(same, both)
    assert not indistinguishable_from_dense(same | {"dense_accuracy": 0.97}, both)  # accuracy below dense's, beyond its interval
    assert not indistinguishable_from_dense(same | {"speedup_ci_low": 1.05}, both)  # faster than dense, surely
    assert indistinguishable_from_dense(same | {"speedup_ci_low": 1.0}, both)  # bounds included
    assert indistinguishable_from_dense(same | {"accuracy_ci_high": 0.8999999999999999}, both)  # up to float rounding
    # Objectives without an interval are ignored ...
    no_speedup_ci = {k: v for k, v in same.items() if not k.startswith("speedup_ci")} | {"speedup": 5.0}
    assert indistinguishable_from_dense(no_speedup_ci, both)
    assert indistinguishable_from_dense(same | {"speedup_ci_high": float("nan")}, both + ["latency_ms_per_token"])
    # ... and without any, the trial is not marked.
    assert not indistinguishable_from_dense(m(speedup=1.0, accuracy=0.9, dense_accuracy=0.9), both)
    assert not indistinguishable_from_dense(same, ["latency_ms_per_token"])
    # Accuracy with an interval but no dense accuracy to compare with is not judged either.
    no_dense = {k: v for k, v in same.items() if k != "dense_accuracy"}
    assert not indistinguishable_from_dense(no_dense, ["accuracy"])
    assert indistinguishable_from_dense(no_dense, both)  # judged on speedup alone
    # Ratios to dense: ttft_speedup and relative_accuracy are compared with 1.
    assert indistinguishable_from_dense(m(ttft_speedup=0.97, ttft_speedup_ci_low=0.9, ttft_speedup_ci_high=1.02), ["ttft_speedup"])
    assert not indistinguishable_from_dense(m(relative_accuracy=0.7, relative_accuracy_ci_low=0.6, relative_accuracy_ci_high=0.8),
                                            ["relative_accuracy"])
    assert interval(m(x=1, x_ci_low=0.5, x_ci_high=2), "x") == (0.5, 2.0)
    assert interval(m(x=1, x_ci_low=0.5), "x") is None


def test_uninformative_task_banner(sweeps, stores, tmp_path, capsys):
    study, parent, _ = sweeps["hard"]
    code, html, _ = report(capsys, stores, tmp_path, "hard")
    assert code == 0
    banner = re.search(r'<div class="warning alert uninformative"[^>]*>(.*?)</div>', html, re.S).group(1)
    assert "dense scores 0.3333 on this task: below min_dense_accuracy 0.5, the accuracy axis of this front says little " \
           "about the techniques" in banner
    assert "median dense_accuracy over 3 complete trials" in banner
    for easy in ("quick", "spec"):  # dense keeps every needle / matches itself
        code, html, _ = report(capsys, stores, tmp_path, easy)
        assert code == 0 and 'class="warning alert uninformative"' not in html

    # The spec sets the threshold (workload.min_dense_accuracy); without it, 0.5.
    client = MlflowClient(stores.tracking_uri)
    spec = study.user_attrs[SPEC_ATTR]
    lenient = spec | {"workload": spec["workload"] | {"min_dense_accuracy": 0.25}}
    assert 'class="warning alert uninformative"' not in render_report(combine([collect_sweep(study, client, parent, spec=lenient, finished=True)]))
    strict = spec | {"workload": spec["workload"] | {"min_dense_accuracy": 0.4}}
    assert "below min_dense_accuracy 0.4," in render_report(combine([collect_sweep(study, client, parent, spec=strict, finished=True)]))

    # Pure: dense_accuracy measured in each trial first, else the dense technique's own accuracy.
    def row(technique, **metrics):
        return {"state": "complete", "technique": technique, "metrics": metrics}

    assert dense_accuracy([row("dense", accuracy=0.9), row("snapkv", accuracy=0.2)]) == (0.9, "accuracy of the dense trial")
    assert dense_accuracy([row("dense", accuracy=0.9, dense_accuracy=0.2), row("snapkv", accuracy=0.1, dense_accuracy=0.3),
                           row("h2o", accuracy=0.1, dense_accuracy=0.35)])[0] == 0.3
    assert dense_accuracy([row("snapkv", accuracy=0.2)]) is None
    assert uninformative_task({"workload": {"task": "dataset"}}, [row("dense", accuracy=0.4)])[:2] == (0.4, 0.5)
    assert uninformative_task({}, [row("dense", accuracy=0.5)]) is None  # at the threshold: informative


def test_workload_without_lengths_is_described_by_its_own_settings(sweeps, stores):
    """Workload fields are task-specific (a dataset task has no context_lengths): the page lists
    whatever the task has, and overlays compare whatever fields there are."""
    study, parent, _ = sweeps["hard"]
    client = MlflowClient(stores.tracking_uri)
    spec = study.user_attrs[SPEC_ATTR]
    dataset = spec | {"workload": {"task": "dataset", "path": "data/qa.jsonl", "metric": "exact_match", "samples": 20}}
    html = render_report(combine([collect_sweep(study, client, parent, spec=dataset, finished=True)]))
    header = html.split("<header>", 1)[1].split("</header>", 1)[0]
    assert "task <b>dataset</b>" in header and "path data/qa.jsonl; metric exact_match; samples 20" in header
    assert "context_lengths" not in header
    passkey = dataclasses.replace(collect_sweep(study, client, parent, finished=True), name="passkey-twin")
    with pytest.raises(ReportError, match=r"workload.context_lengths: None in 'hard' vs \[256, 512\] in 'passkey-twin'"):
        combine([collect_sweep(study, client, parent, spec=dataset, finished=True), passkey])


def test_reference_is_the_technique_that_declares_it():
    from paretoray.actors.techniques.base import available_techniques
    from paretoray.dashboards.data import is_reference, reference_name

    registry = available_techniques()
    flagged = {name for name, cls in registry.items() if cls.is_reference}
    assert {name for name in registry if is_reference(name)} == flagged == {reference_name()}
    assert not is_reference("a-technique-this-install-does-not-have") and not is_reference(None)


def test_suite_entries_where_dense_is_weak_are_named():
    from paretoray.dashboards.data import uninformative_parts

    rows = [
        {"state": "complete", "metrics": {"dense_accuracy/niah": 0.9, "dense_accuracy/vt": 0.1, "dense_accuracy/ctx1024": 0.2}},
        {"state": "complete", "metrics": {"dense_accuracy/niah": 0.8, "dense_accuracy/vt": 0.0}},
        {"state": "failed", "metrics": {}},
    ]
    assert uninformative_parts({"workload": {}}, rows) == [("vt", 0.05)]
    assert [(p, round(v, 6)) for p, v in uninformative_parts({"workload": {"min_dense_accuracy": 0.95}}, rows)] == [("niah", 0.85), ("vt", 0.05)]


def test_without_a_dense_trial_the_reference_is_dense_as_each_trial_paired_it():
    from paretoray.dashboards.data import Importances, SweepData

    rows = [{"state": "complete", "technique": "streaming_llm", "trial": i,
             "metrics": {"dense_latency_ms_per_token": lat, "dense_ttft_ms": 100.0 + i, "dense_accuracy": 1.0}}
            for i, lat in enumerate([10.0, 12.0, 11.0])]
    sweep = SweepData("s", {"workload": {}}, ["speedup"], {"speedup": "maximize"}, rows, {}, None, None, "FINISHED", 0,
                      Importances({}, 0))
    source, values = sweep.reference()
    assert "baseline" in source
    assert values["latency_ms_per_token"] == 11.0 and values["ttft_ms"] == 101.0 and values["accuracy"] == 1.0
    assert values["speedup"] == 1.0 and values["tokens_per_s"] == 1000.0 / 11.0


def test_front_table_says_where_each_trial_asked_the_question(sweeps, stores):
    """Query-agnostic evaluation: each row of the front names its trial's placement (in the
    compressed prompt, or after compression), from its sweep's workload, so an overlay of a
    query-aware and a context-only sweep (forced) says which point is which."""
    study, parent, _ = sweeps["hard"]
    client = MlflowClient(stores.tracking_uri)
    spec = study.user_attrs[SPEC_ATTR]
    aware = collect_sweep(study, client, parent, finished=True)
    agnostic = dataclasses.replace(collect_sweep(study, client, parent, finished=True, spec=spec | {
        "workload": spec["workload"] | {"query_placement": "context_only"}}), name="hard-context-only")
    rows = table_rows(render_report(combine([aware, agnostic], force=True)))
    assert {(r["sweep"], r["question"]) for r in rows} == {("hard", "query_aware"), ("hard-context-only", "context_only")}
