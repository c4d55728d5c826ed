"""MLflow records of a sweep: one parent run, one nested run per trial, the front on the parent.

Only the controller writes here. Logging a trial is idempotent (a finished run for the same trial
number is found and reused), which is what lets a resumed sweep reconcile without duplicates.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import optuna
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from paretoray.names import RECORD_FILE, REPORT_FILE, ROLE_TAG, SAMPLES_FILE, SWEEP_TAG, TRIAL_TAG  # noqa: F401 (re-exported)
from paretoray.orchestrator import pareto
from paretoray.orchestrator.stores import Stores, redact

# Draws the sweep's report page: (study, client, parent run id, records cache, tracking URI, finished) -> HTML.
# The caller that composes the application passes one in (paretoray.dashboards.live_report_html); the
# recorder does not import the dashboards, which read what it writes.
ReportRenderer = Callable[[optuna.Study, MlflowClient, str, dict, str, bool], str]


def _param_text(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value) if isinstance(value, dict) else str(value)
    return text[:500]  # MLflow caps a param's value


def _redacted(values: dict[str, Any]) -> dict[str, str]:
    """Params and tags as MLflow keeps them, with any credential a value quotes hidden (stores.redact)."""
    return {k: redact(v) for k, v in values.items()}


def _flat_params(record: dict[str, Any]) -> dict[str, str]:
    """MLflow params: the technique and its parameters, `technique.param`. MLflow keys take letters,
    digits and `_ - . space : /` only: a composition's `outer+inner` is written `outer/inner`
    (`self_spec/snapkv.snapkv.max_capacity_prompt`); the technique's own value keeps its name."""
    params = {"technique": str(record.get("technique"))}
    prefix = re.sub(r"[^\w\-. :/]", "/", str(record.get("technique")))
    params.update({f"{prefix}.{k}": str(v) for k, v in record.get("params", {}).items()})
    return params


class Recorder:
    def __init__(self, stores: Stores, sweep: str, report: ReportRenderer | None = None):
        self.report = report
        if redact(stores.tracking_uri) != stores.tracking_uri:
            # A tracking server's client prints "View run ... at: URI/#/..." for each finished run,
            # the URI with its credentials.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.client = MlflowClient(tracking_uri=stores.tracking_uri)
        self.tracking_uri = stores.tracking_uri
        self.sweep = sweep
        experiment = self.client.get_experiment_by_name(sweep)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                sweep, artifact_location=f"{stores.artifact_root}/{sweep}" if stores.artifact_root else None
            )
        else:
            self.experiment_id = experiment.experiment_id
        self._pareto_tags: dict[str, str] = {}
        self._records: dict[str, dict[str, Any]] = {}  # trial.json by run id, read once for the report

    # ---- the sweep ------------------------------------------------------------------------

    def start_sweep(self, spec_json: dict[str, Any], spec_text: str | None) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"sweep {self.sweep}",
            tags=_redacted({SWEEP_TAG: self.sweep, "paretoray.role": "sweep", "paretoray.model": spec_json["model"]["id"],
                            "paretoray.task": spec_json["workload"]["task"]}),
        )
        run_id = run.info.run_id
        params = {
            "model": spec_json["model"]["id"],
            "dtype": spec_json["model"]["dtype"],
            "task": spec_json["workload"]["task"],
            "query_placement": spec_json["workload"].get("query_placement", "query_aware"),
            "sampler": spec_json["sampler"]["name"],
            "trials": spec_json["trials"],
            "actors": spec_json["actors"]["count"],
            "techniques": ",".join(spec_json["techniques"]),
            "objectives": ",".join(f"{k}:{v}" for k, v in spec_json["objectives"].items()),
            "constraints": ";".join(spec_json["constraints"]) or "none",
        }
        # The task's own settings (lengths, a data file, a metric...), whatever the task.
        params.update({f"workload.{k}": _param_text(v) for k, v in spec_json["workload"].items() if k not in ("task", "query_placement")})
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in _redacted(params).items()])
        self.client.log_text(run_id, redact(json.dumps(spec_json, indent=2)), "spec.json")
        if spec_text is not None:
            self.client.log_text(run_id, redact(spec_text), "spec.yaml")
        return run_id

    def sweep_runs(self) -> list:
        """This sweep's parent runs, newest first (more than one only after an interrupted creation)."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"],
            max_results=100,
        )

    def reopen_sweep(self, parent_run_id: str) -> None:
        self.client.update_run(parent_run_id, status="RUNNING")

    def finish_sweep(self, parent_run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_run_id, status=status)

    # ---- trials ---------------------------------------------------------------------------

    def find_trial_run(self, parent_run_id: str, number: int):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{number}'",
            max_results=10,
        )
        return runs[0] if runs else None

    def load_record(self, run_id: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, RECORD_FILE, tmp)
            return json.loads(Path(path).read_text())

    def discard_run(self, run_id: str) -> None:
        """A run left half-written by a controller that died: hide it, its trial will run again."""
        self.client.delete_run(run_id)

    def log_trial(
        self, parent_run_id: str, number: int, record: dict[str, Any], spec_json: dict[str, Any], may_exist: bool = True
    ) -> str:
        """One nested run for trial `number`; a finished run already there is reused (`may_exist=False`:
        the caller knows there is none, and the search is skipped)."""
        existing = self.find_trial_run(parent_run_id, number) if may_exist else None
        if existing is not None and existing.info.status in ("FINISHED", "FAILED"):
            return existing.info.run_id
        if existing is not None:
            self.discard_run(existing.info.run_id)
        ok = record.get("status") == "ok"
        actor = record.get("actor", {})
        tags = {
            MLFLOW_PARENT_RUN_ID: parent_run_id,
            MLFLOW_RUN_NAME: f"{number:04d} {record.get('label') or record.get('technique')}",
            TRIAL_TAG: str(number),
            SWEEP_TAG: self.sweep,
            "paretoray.role": "trial",
            "paretoray.technique": str(record.get("technique")),
            "paretoray.model": spec_json["model"]["id"],
            "paretoray.task": spec_json["workload"]["task"],
            "paretoray.workload": json.dumps(spec_json["workload"], sort_keys=True),
            "paretoray.query_placement": spec_json["workload"].get("query_placement", "query_aware"),
            "paretoray.status": str(record.get("status")),
            "paretoray.node_ip": str(actor.get("node_ip", "local")),
            "paretoray.node_id": str(actor.get("node_id", "local")),
            "paretoray.gpu_ids": ",".join(actor.get("gpu_ids", [])) or "none",
            "paretoray.attempts": str(record.get("attempts", 1)),
            "pareto": "false",
        }
        tags.update({f"env.{k}": str(v) for k, v in record.get("env", {}).items()})
        if record.get("error"):
            tags["paretoray.error"] = str(record["error"])[:4000]
        run = self.client.create_run(self.experiment_id, tags=_redacted(tags))
        run_id = run.info.run_id
        metrics = [
            Metric(k, float(v), 0, 0)
            for k, v in record.get("metrics", {}).items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        ]
        metrics.append(Metric("wall_s", float(record.get("wall_s", 0.0)), 0, 0))
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in _redacted(_flat_params(record)).items()])
        self.client.log_text(run_id, redact(json.dumps(record, indent=1, default=str)), RECORD_FILE)
        if record.get("samples"):
            self._log_samples(run_id, record["samples"])
        if record.get("traceback"):
            self.client.log_text(run_id, redact(record["traceback"]), "traceback.txt")
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
        return run_id

    def _log_samples(self, run_id: str, rows: list[dict[str, Any]]) -> None:
        """Per-sample results (lengths, output, scores, paired timings) as a parquet table of the trial run."""
        import polars as pl

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / SAMPLES_FILE
            pl.DataFrame(rows, infer_schema_length=None, strict=False).write_parquet(path)
            self.client.log_artifact(run_id, str(path))

    # ---- the front ------------------------------------------------------------------------

    def update_front(
        self, parent_run_id: str, study: optuna.Study, objectives: list[str], artifacts: bool = True, final: bool = False
    ) -> list[dict[str, Any]]:
        """Tag front members and log the parent's counts; with `artifacts`, also the front's tables and plots.

        The controller asks for the tags and counts at most once a second and for the artifacts
        (which take about a second to draw) at most every 30 s, and for both at the end (`final`:
        the report then says the sweep is finished, not running).
        """
        rows = pareto.trial_rows(study, objectives)
        for row in rows:
            run_id = row["mlflow_run_id"]
            wanted = "true" if row["pareto"] else "false"
            if run_id and self._pareto_tags.get(run_id) != wanted:
                self.client.set_tag(run_id, "pareto", wanted)
                self._pareto_tags[run_id] = wanted
        complete = [r for r in rows if r["state"] == "complete"]
        self.client.log_batch(
            parent_run_id,
            metrics=[
                Metric("trials_finished", len(rows), 0, len(rows)),
                Metric("trials_complete", len(complete), 0, len(rows)),
                Metric("pareto_size", sum(r["pareto"] for r in rows), 0, len(rows)),
            ],
        )
        if not complete or not artifacts:
            return rows
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            table = pareto.front_frame(rows, objectives)
            table.write_parquet(folder / "trials.parquet")
            table.filter(table["pareto"]).write_parquet(folder / "pareto_front.parquet")
            title = f"{self.sweep}: Pareto front ({len(complete)} trials)"
            pareto.plot_png(rows, objectives, [d.name.lower() for d in study.directions], title, folder / "pareto_front.png")
            names = ["trials.parquet", "pareto_front.parquet", "pareto_front.png"]
            report = self._write_report(study, parent_run_id, folder, final)
            if report is not None:
                names.append(report)
            for name in names:
                self.client.log_artifact(parent_run_id, str(folder / name))
        return rows

    def _write_report(self, study: optuna.Study, parent_run_id: str, folder: Path, final: bool) -> str | None:
        """The sweep's report page (paretoray.dashboards) written in `folder`: its file name, or None
        if it could not be drawn (a sweep never stops for that)."""
        if self.report is None:
            return None
        try:
            html = self.report(study, self.client, parent_run_id, self._records, self.tracking_uri, final)
            (folder / REPORT_FILE).write_text(html, encoding="utf-8")
            return REPORT_FILE
        except Exception as error:
            print(f"warning: the sweep report could not be refreshed: {type(error).__name__}: {redact(error)}", file=sys.stderr)
            return None
