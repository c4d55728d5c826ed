"""Sweep reports: `paretoray report NAME [NAME ...]` and the live `report.html` on a sweep's parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from mlflow.tracking import MlflowClient

from paretoray.dashboards.data import ReportError, SweepData, collect_sweep, combine
from paretoray.dashboards.render import DEFAULT_MLFLOW_URL, render_report
from paretoray.names import REPORT_FILE  # noqa: F401  (re-exported by paretoray.dashboards)
from paretoray.orchestrator.stores import Stores, redact, strip_credentials



def default_mlflow_url(tracking_uri: str) -> str:
    """Where run links point: the tracking server itself (without the credentials its URI may carry:
    the page is a file anyone may be sent, and an MLflow artifact), else where `paretoray ui` serves."""
    return strip_credentials(tracking_uri).rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_MLFLOW_URL


def load_sweep(name: str, stores: Stores, client: MlflowClient | None = None) -> SweepData:
    return collect_sweep(stores.load_study(name), client or MlflowClient(tracking_uri=stores.tracking_uri))


def report_html(names: list[str], stores: Stores, force: bool = False, mlflow_url: str | None = None,
                command: str | None = None) -> str:
    """One page for one sweep, or several overlaid (refused if they are not comparable, unless `force`)."""
    client = MlflowClient(tracking_uri=stores.tracking_uri)
    sweeps = [load_sweep(name, stores, client) for name in names]
    url = strip_credentials(mlflow_url) if mlflow_url else default_mlflow_url(stores.tracking_uri)
    return render_report(combine(sweeps, force=force), url, command and redact(command))


def write_report(names: list[str], stores: Stores, out: Path, **options: Any) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report_html(names, stores, **options), encoding="utf-8")
    return out


def live_report_html(study: optuna.Study, client: MlflowClient, parent_run_id: str, records: dict[str, dict[str, Any]],
                     tracking_uri: str, finished: bool = False) -> str:
    """The report the controller logs on the parent run each time it refreshes the front's artifacts
    (`finished`: the last one, with every trial in)."""
    sweep = collect_sweep(study, client, parent_run_id=parent_run_id, records=records, finished=finished)
    return render_report(combine([sweep]), default_mlflow_url(tracking_uri), f"paretoray report {sweep.name}")
