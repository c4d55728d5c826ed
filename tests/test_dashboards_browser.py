"""The report as a person sees it: a real small sweep (local Ray, tiny random Llama, Optuna and
MLflow on SQLite), its page opened in headless Chromium, then the MLflow UI (`paretoray ui`)
showing the sweep's parent run, its trial runs and the report in the artifact viewer.

Chromium is Debian's (`make test` installs it with apt-get); Playwright drives it and never
downloads a browser of its own. Screenshots go to test-artifacts/; with
The README's picture is a real sweep's page (docs/screenshot.py), not this test's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from paretoray.orchestrator import cli
from paretoray.orchestrator.controller import PARENT_ATTR, Controller
from paretoray.orchestrator.spec import parse
from paretoray.orchestrator.stores import resolve_stores

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]
NAME = "browser"
WINDOWS = [8, 16, 32, 64, 128]
OBJECTIVES = ["latency_ms_per_token", "fidelity", "kv_cache_mb"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("PARETORAY_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')")
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed: `make test` installs Debian's chromium with apt-get, which needs root")
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS, headless=True)
    except Exception as error:
        playwright.stop()
        pytest.skip(f"Chromium at {executable} did not start under Playwright: {error}")
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_model_dir, tmp_path_factory):
    """Dense and five StreamingLLM windows on passkey prompts, three objectives: three front panels."""
    stores = resolve_stores(home=str(tmp_path_factory.mktemp("runs")))
    spec = parse({
        "name": NAME,
        "model": {"id": str(tiny_model_dir), "dtype": "float32", "compile": False},
        "workload": {"task": "passkey", "context_lengths": [160, 224], "samples_per_length": 2, "max_new_tokens": 4, "fidelity": True},
        "techniques": {"dense": {}, "streaming_llm": {"n_sink": 2, "window": WINDOWS}},
        "objectives": {"latency_ms_per_token": "minimize", "fidelity": "maximize", "kv_cache_mb": "minimize"},
        "sampler": {"name": "grid", "seed": 0},
        "trials": 1 + len(WINDOWS),
        "actors": {"count": 2, "num_cpus": 1},
    }, f"<{NAME}>")
    from paretoray.dashboards import live_report_html

    Controller(spec, stores, spec_text="# browser test\n", report=live_report_html).run(progress=False)
    return stores


@pytest.fixture(scope="module")
def mlflow_ui(sweep):
    """`paretoray ui` on a free loopback port, against the sweep's tracking store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / "mlflow-ui.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "paretoray.orchestrator.cli", "ui", "--port", str(port), "--workers", "1",
         "--tracking-uri", sweep.tracking_uri, "--storage", sweep.storage],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"paretoray ui did not come up on {url}; see {ARTIFACTS / 'mlflow-ui.log'}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def results_json(capsys, stores) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["results", NAME, "--pareto", "--format", "json", "--tracking-uri", stores.tracking_uri, "--storage", stores.storage]) == 0
    return json.loads(capsys.readouterr().out)


def shot(page, name: str, **options) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), **options)
    return path


COUNT_POINTS = """() => Array.from(document.querySelectorAll('.plot[data-kind="pareto"]')).map(div => {
  const byTechnique = {};
  for (const trace of div.data) {
    if (!trace.meta || trace.meta.role !== 'trials') continue;
    byTechnique[trace.meta.technique] = (byTechnique[trace.meta.technique] || 0) + trace.x.length;
  }
  return {byTechnique: byTechnique, drawn: div.querySelectorAll('.scatterlayer .trace .points path.point').length,
          x: div.layout.xaxis.title.text, y: div.layout.yaxis.title.text,
          xerror: div.querySelectorAll('.errorbars path.xerror').length, yerror: div.querySelectorAll('.errorbars path.yerror').length};
})"""


def test_report_page_in_chromium(browser, sweep, mlflow_ui, tmp_path, capsys):
    out = tmp_path / "report.html"
    capsys.readouterr()
    assert cli.main(["report", NAME, "-o", str(out), "--mlflow-url", mlflow_ui, "--tracking-uri", sweep.tracking_uri,
                     "--storage", sweep.storage]) == 0
    study = optuna.load_study(study_name=NAME, storage=sweep.storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    expected = {"dense": 1, "streaming_llm": len(WINDOWS)}
    assert {t: sum(x.user_attrs["technique"] == t for x in complete) for t in expected} == expected

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(out.as_uri())
    page.wait_for_function("window.paretorayReport !== undefined")
    page.evaluate("() => window.paretorayReport.ready")
    try:
        # Every pair of the three objectives has its panel, with every trial drawn, per technique.
        panels = page.evaluate(COUNT_POINTS)
        assert len(panels) == 3
        for panel in panels:
            assert panel["byTechnique"] == expected
            assert panel["drawn"] == sum(expected.values())
        for title in ("Pareto fronts", "The front", "What each parameter does", "Which parameters matter",
                      "Long context: where the front loses the needle"):
            assert page.get_by_role("heading", name=title, exact=True).is_visible()
        assert page.locator('.plot[data-kind="niah"] .main-svg').first.is_visible()

        # As a person first sees it: the whole page, and for the README its top down to the front's table.
        report_png = shot(page, "report.png", full_page=True)
        assert report_png.stat().st_size > 10_000
        table_bottom = page.evaluate("() => document.querySelector('#front-table').closest('section').getBoundingClientRect().bottom")
        top_png = shot(page, "report-top.png", full_page=True, clip={"x": 0, "y": 0, "width": 1400, "height": table_bottom + 16})
        assert top_png.stat().st_size > 10_000

        # The table holds exactly the front `paretoray results --pareto` prints.
        listed = {row["trial"]: row for row in results_json(capsys, sweep)}
        rows = page.eval_on_selector_all("#front-table tbody tr", """rows => rows.map(r => ({
            trial: +r.dataset.trial,
            metrics: Object.fromEntries(Array.from(r.querySelectorAll('td[data-metric]')).map(c => [c.dataset.metric, JSON.parse(c.dataset.value)])),
            href: r.querySelector('a.run-link').href, run: r.querySelector('a.run-link').dataset.runId}))""")
        assert sorted(r["trial"] for r in rows) == sorted(listed)
        for row in rows:
            assert row["run"] == listed[row["trial"]]["mlflow_run_id"]
            assert set(OBJECTIVES) <= set(row["metrics"])
            assert row["metrics"] == {m: listed[row["trial"]]["metrics"][m] for m in row["metrics"]}

        # The uninformative-task banner shows exactly when dense's accuracy is below workload.min_dense_accuracy (0.5).
        dense_accuracies = sorted(t.user_attrs["metrics"]["dense_accuracy"] for t in complete if "dense_accuracy" in t.user_attrs["metrics"])
        banner = page.locator(".warning.alert.uninformative")
        if dense_accuracies and dense_accuracies[len(dense_accuracies) // 2] < 0.5:  # the tiny random model answers nothing
            assert banner.is_visible() and "below min_dense_accuracy 0.5" in banner.inner_text()
        elif not dense_accuracies:
            assert banner.count() == 0

        # An objective the runner gives a 95% interval is drawn with whiskers (one per trial) on its axis.
        # (Records without intervals, from a runner before them, draw none.)
        with_interval = {o: sum(f"{o}_ci_low" in t.user_attrs["metrics"] and f"{o}_ci_high" in t.user_attrs["metrics"] for t in complete)
                         for o in OBJECTIVES}
        for panel in panels:
            for axis in ("x", "y"):
                assert panel[f"{axis}error"] == with_interval[panel[axis].split(" ", 1)[0]], (panel, with_interval)

        # Sorting: click a header, ascending; again, descending.
        header = page.locator("#front-table th", has_text="kv_cache_mb")
        column = "td[data-metric='kv_cache_mb']"
        header.click()
        ascending = page.eval_on_selector_all(f"#front-table tbody {column}", "cells => cells.map(c => +c.dataset.value)")
        assert ascending == sorted(ascending)
        header.click()
        descending = page.eval_on_selector_all(f"#front-table tbody {column}", "cells => cells.map(c => +c.dataset.value)")
        assert descending == sorted(ascending, reverse=True)

        # A run link opens that trial's run in the MLflow UI.
        client = MlflowClient(sweep.tracking_uri)
        link = rows[0]
        run = client.get_run(link["run"])
        assert link["href"] == f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs/{link['run']}?workflowType=machine_learning"
        with page.expect_popup() as popup_info:
            page.locator(f"#front-table a.run-link[data-run-id='{link['run']}']").click()
        popup = popup_info.value
        try:
            popup.get_by_text(run.data.tags["mlflow.runName"]).filter(visible=True).first.wait_for(timeout=60_000)
        finally:
            shot(popup, "run-page.png")
            popup.close()

        # Clicking a point of a front panel opens its run too.
        point = page.locator('.plot[data-kind="pareto"] .scatterlayer .trace .points path.point').first
        point.scroll_into_view_if_needed()
        box = point.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)  # plotly reports a click on the point it is hovering
        page.locator(".hoverlayer .hovertext").first.wait_for(timeout=10_000)
        with page.expect_popup() as popup_info:
            page.mouse.click(x, y)
        assert "/#/experiments/" in popup_info.value.url
        popup_info.value.close()
        assert not errors, errors
    except Exception:
        shot(page, "report-failure.png", full_page=True)
        raise
    finally:
        page.close()


def test_mlflow_ui_lists_trials_and_opens_the_report(browser, sweep, mlflow_ui):
    client = MlflowClient(sweep.tracking_uri)
    study = optuna.load_study(study_name=NAME, storage=sweep.storage)
    parent = client.get_run(study.user_attrs[PARENT_ATTR])
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(study.trials) == 1 + len(WINDOWS)
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        # The experiment's runs ("Model training" view): the sweep's parent run, its trial runs nested under it.
        page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        parent_cell = page.locator('[role="gridcell"]').filter(has_text=parent.info.run_name).first
        parent_cell.wait_for(timeout=90_000)
        for child in children:
            assert page.get_by_text(child.info.run_name).count() == 0  # collapsed under the parent
        parent_cell.locator("button").first.click()  # the expander beside the run's name
        for child in children:
            page.get_by_text(child.info.run_name).filter(visible=True).first.wait_for(timeout=30_000)
        shot(page, "mlflow-runs.png")

        # The parent run's artifacts: report.html renders inside MLflow's sandboxed viewer.
        page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts/report.html")
        frame = page.frame_locator("iframe.mlflow-html-iframe")
        frame.locator('.plot[data-kind="pareto"] .main-svg').first.wait_for(timeout=90_000)
        assert frame.get_by_role("heading", name="The front", exact=True).is_visible()
        inner = next(f for f in page.frames if f.url.startswith("blob:"))
        inner.evaluate("() => window.paretorayReport.ready")
        assert inner.evaluate("() => window.paretorayReport.base") == f"{mlflow_ui}/"
        assert frame.locator("#sandbox-note").is_visible()  # the sandbox forbids opening runs from here: say so
        drawn = inner.evaluate(COUNT_POINTS)
        assert all(p["drawn"] == len(study.trials) for p in drawn)
        shot(page, "mlflow-report.png")
    except Exception:
        shot(page, "mlflow-failure.png", full_page=True)
        raise
    finally:
        page.close()
