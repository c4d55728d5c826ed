"""End to end on the real parts: a local Ray with 2 actors, Optuna and MLflow on SQLite.

Checks what a user would look at: the MLflow parent run and its trial runs, the `pareto` tags
against Optuna's front, the front's artifacts, `paretoray results --format json`, a failing
trial that leaves the actor usable, and resume after the controller died mid-sweep.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from paretoray.actors.techniques import Technique, register
from paretoray.orchestrator import cli
from paretoray.orchestrator.controller import PARENT_ATTR, Controller, SweepError
from paretoray.orchestrator.recorder import Recorder
from paretoray.orchestrator.spec import parse
from paretoray.orchestrator.stores import resolve_stores
from tests.tiny import noop_spec

pytestmark = pytest.mark.slow


@register
@dataclass(frozen=True)
class DriverOnly(Technique):
    """Registered in the test process only: the actors do not know it, so its trials raise there
    (the same failure a driver/cluster version skew produces)."""

    name = "driver_only_test"
    params = {}


def spec_for(model_dir: Path, name: str, trials: int, techniques: dict, sampler: dict | None = None):
    data = {
        "name": name,
        "model": {"id": str(model_dir), "dtype": "float32", "compile": False},
        "workload": {"task": "passkey", "context_lengths": [192, 256], "samples_per_length": 1, "max_new_tokens": 4},
        "techniques": techniques,
        "objectives": {"latency_ms_per_token": "minimize", "accuracy": "maximize", "kv_cache_mb": "minimize"},
        "constraints": ["accuracy >= 0.0"],
        "sampler": sampler or {"name": "random", "seed": 1},
        "trials": trials,
        "actors": {"count": 2, "num_cpus": 1, "num_gpus": 0},
    }
    return parse(data, f"<{name}>")


def children(client: MlflowClient, experiment: str, parent: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


def results_json(capsys, name: str, stores, *extra: str) -> list[dict]:
    capsys.readouterr()
    code = cli.main(["results", name, "--format", "json", "--tracking-uri", stores.tracking_uri, "--storage", stores.storage, *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_sweep_records_trials_and_front(ray_session, tiny_model_dir, tmp_path, capsys):
    stores = resolve_stores(home=str(tmp_path / "runs"))
    techniques = {"dense": {}, "driver_only_test": {}, "streaming_llm": {"n_sink": 2, "window": [8, 32, 512]}}
    spec = spec_for(tiny_model_dir, "e2e", 5, techniques, sampler={"name": "grid", "seed": 0})
    from paretoray.dashboards import live_report_html

    result = Controller(spec, stores, spec_text="# e2e\n", report=live_report_html).run(progress=False)
    assert result.trials_finished == 5

    study = optuna.load_study(study_name="e2e", storage=stores.storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    assert len(finished) == 5
    labels = sorted(t.user_attrs["label"] or t.user_attrs["technique"] for t in finished)
    assert labels == ["dense", "driver_only_test", "streaming_llm(n_sink=2,window=32)",
                      "streaming_llm(n_sink=2,window=512)", "streaming_llm(n_sink=2,window=8)"]
    failed = [t for t in finished if t.state == TrialState.FAIL]
    assert [t.user_attrs["technique"] for t in failed] == ["driver_only_test"]
    assert "unknown technique 'driver_only_test'" in failed[0].user_attrs["error"]

    client = MlflowClient(stores.tracking_uri)
    parent = study.user_attrs[PARENT_ATTR]
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["paretoray.role"] == "sweep"
    assert parent_run.data.params["model"] == str(tiny_model_dir)
    runs = children(client, "e2e", parent)
    assert len(runs) == 5
    by_trial = {int(r.data.tags["paretoray.trial"]): r for r in runs}
    assert set(by_trial) == {t.number for t in finished}
    bad = by_trial[failed[0].number]
    assert bad.info.status == "FAILED"
    assert "traceback.txt" in {a.path for a in client.list_artifacts(bad.info.run_id)}
    good = by_trial[next(t.number for t in finished if t.user_attrs["technique"] == "dense")]
    assert good.info.status == "FINISHED"
    for key in ("accuracy", "latency_ms_per_token", "ttft_ms", "kv_cache_mb", "peak_memory_mb", "speedup"):
        assert key in good.data.metrics
    assert good.data.tags["paretoray.technique"] == "dense"
    assert good.data.tags["env.device"] == "cpu" and good.data.tags["paretoray.node_ip"] != "local"

    # The pareto tags are Optuna's front, exactly.
    front = {t.number for t in study.best_trials}
    assert front and front == {n for n, r in by_trial.items() if r.data.tags["pareto"] == "true"}

    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"spec.json", "spec.yaml", "pareto_front.png", "report.html", "pareto_front.parquet", "trials.parquet"} <= artifacts
    local = Path(client.download_artifacts(parent, "pareto_front.parquet", str(tmp_path)))
    assert set(pl.read_parquet(local)["trial"].to_list()) == front
    png = Path(client.download_artifacts(parent, "pareto_front.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    listed = results_json(capsys, "e2e", stores, "--pareto")
    assert {row["trial"] for row in listed} == front
    for row in listed:
        assert set(row) >= {"trial", "technique", "params", "metrics", "pareto", "mlflow_run_id"}
        assert row["pareto"] is True
        assert client.get_run(row["mlflow_run_id"]).info.run_id == row["mlflow_run_id"]
    assert len(results_json(capsys, "e2e", stores)) == 5

    with pytest.raises(SweepError, match="already exists.*sweep resume e2e"):
        Controller(spec, stores).run(progress=False)


def test_resume_after_controller_died(ray_session, tiny_model_dir, tmp_path, capsys):
    stores = resolve_stores(home=str(tmp_path / "runs"))
    spec = spec_for(tiny_model_dir, "resumable", 5, {"dense": {}, "streaming_llm": {"window": {"low": 8, "high": 256}}})
    Controller(spec, stores, spec_text="# r\n").run(trials=2, progress=False)

    # Simulate a controller killed mid-sweep with two trials in flight:
    study = optuna.load_study(study_name="resumable", storage=stores.storage)
    parent = study.user_attrs[PARENT_ATTR]
    recorder = Recorder(stores, "resumable")
    client = MlflowClient(stores.tracking_uri)
    done_record = recorder.load_record(children(client, "resumable", parent)[0].info.run_id)
    #  (a) one whose result reached MLflow before the crash but was never told to Optuna,
    logged = study.ask({"technique": optuna.distributions.CategoricalDistribution(["dense", "streaming_llm"])})
    logged_record = copy.deepcopy(done_record) | {"trial": logged.number}
    logged.set_user_attr("technique", logged_record["technique"])
    logged_run = recorder.log_trial(parent, logged.number, logged_record, json.loads(spec.model_dump_json()))
    #  (b) one still computing, its MLflow run never finished.
    study.enqueue_trial({"technique": "streaming_llm", "streaming_llm.window": 30})
    running = study.ask()
    running.suggest_categorical("technique", ["dense", "streaming_llm"])
    running.suggest_int("streaming_llm.window", 8, 256, log=True)
    half = client.create_run(client.get_experiment_by_name("resumable").experiment_id,
                             tags={"mlflow.parentRunId": parent, "paretoray.trial": str(running.number)})
    client.set_terminated(parent, "KILLED")

    code = cli.main(["sweep", "resume", "resumable", "--no-progress", "--tracking-uri", stores.tracking_uri, "--storage", stores.storage])
    assert code == 0

    study = optuna.load_study(study_name="resumable", storage=stores.storage)
    states = {t.number: t for t in study.trials}
    assert states[logged.number].state == TrialState.COMPLETE  # adopted, not re-run
    assert states[logged.number].user_attrs["mlflow_run_id"] == logged_run
    assert states[running.number].user_attrs.get("interrupted") is True  # asked again instead
    assert states[running.number].params == {"technique": "streaming_llm", "streaming_llm.window": 30}
    rerun = [t for t in study.trials if t.number > running.number and t.params == states[running.number].params]
    assert rerun and rerun[0].state == TrialState.COMPLETE
    assert client.get_run(half.info.run_id).info.lifecycle_stage == "deleted"

    runs = children(client, "resumable", parent)  # deleted runs are not listed
    numbers = [int(r.data.tags["paretoray.trial"]) for r in runs]
    assert len(numbers) == len(set(numbers)) == 5  # the spec's 5 trials, none logged twice
    assert running.number not in numbers
    assert client.get_run(parent).info.status == "FINISHED"
    assert len(results_json(capsys, "resumable", stores)) == 5


@pytest.mark.slow
def test_fast_trials_refresh_the_front_at_most_once_a_second_and_at_the_end(ray_session, tiny_model_dir, tmp_path, monkeypatch):
    """Front tags read every trial from storage: a burst of instant trials must not pay that per trial,
    and the sweep must still end with every front member tagged and the parent's counts complete."""
    data = noop_spec(tiny_model_dir, "burst", trials=30, count=2, sleep_s=0.0)
    stores = resolve_stores(home=str(tmp_path))
    refreshes = []
    original = Recorder.update_front

    def counted(self, *args, **kwargs):
        refreshes.append(time.perf_counter())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Recorder, "update_front", counted)
    result = Controller(parse(data, "<burst>"), stores).run(progress=False)
    assert result.trials_finished == 30
    assert len(refreshes) < 30  # not once per trial ...
    in_loop = refreshes[:-1]  # ... the last is the sweep's final refresh
    assert all(b - a >= 0.99 for a, b in zip(in_loop, in_loop[1:]))
    client = MlflowClient(stores.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["trials_finished"] == 30
    front = {r["mlflow_run_id"] for r in result.rows if r["pareto"]}
    tagged = {r.info.run_id for r in client.search_runs([parent.info.experiment_id], "tags.pareto = 'true'")}
    assert tagged == front and front


def test_dataset_sweep_records_intervals_and_paired_speedups(ray_session, tiny_model_dir, tmp_path, capsys):
    """`task: dataset` on a JSONL file of one's own, through the command line, into MLflow."""
    rows = [
        {"context": f"Note {i}: the code word for box {i} is {word}. " * 6, "question": f"What is the code word for box {i}?",
         # Any common letter counts (`contains`), so that even a random tiny model scores and
         # relative_accuracy (technique / dense on the same samples) is defined.
         "answer_prefix": " The code word is", "answer": [word, *"etaoinsrhl"]}
        for i, word in enumerate(["lemon", "anchor", "violet", "copper", "falcon"])
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "byod",
        "model": {"id": str(tiny_model_dir), "dtype": "float32", "compile": True},  # the compiled path, end to end
        "workload": {"task": "dataset", "path": str(data), "metric": "contains", "max_new_tokens": 4, "repeats": 2},
        "techniques": {"dense": {}, "streaming_llm": {"n_sink": 2, "window": [16, 64]}},
        "objectives": {"speedup": "maximize", "accuracy": "maximize"},
        "sampler": {"name": "grid", "seed": 0},
        "trials": 3,
        "actors": {"count": 2, "num_cpus": 1, "num_gpus": 0},
    }
    spec_file = tmp_path / "byod.yaml"
    spec_file.write_text(json.dumps(spec))  # JSON is YAML
    stores = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", f"sqlite:///{tmp_path}/optuna.db"]
    assert cli.main(["sweep", "run", str(spec_file), "--no-progress", *stores]) == 0
    capsys.readouterr()
    assert cli.main(["results", "byod", "--format", "json", *stores]) == 0
    trials = json.loads(capsys.readouterr().out)
    assert len(trials) == 3
    for trial in trials:
        metrics = trial["metrics"] if "metrics" in trial else trial
        for key in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "relative_accuracy", "speedup",
                    "speedup_ci_low", "speedup_ci_high", "dense_accuracy"):
            assert key in metrics, (key, sorted(metrics))
        assert metrics["accuracy_ci_low"] <= metrics["accuracy"] <= metrics["accuracy_ci_high"]
        assert metrics["speedup_ci_low"] <= metrics["speedup"] <= metrics["speedup_ci_high"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    study = optuna.load_study(study_name="byod", storage=f"sqlite:///{tmp_path}/optuna.db")
    parent = study.user_attrs[PARENT_ATTR]
    assert client.get_run(parent).data.params["workload.metric"] == "contains"
    for run in children(client, "byod", parent):
        assert run.info.status == "FINISHED"
        assert {"accuracy_ci_low", "speedup_ci_high", "relative_accuracy"} <= set(run.data.metrics)
        local = client.download_artifacts(run.info.run_id, "samples.parquet", str(tmp_path / run.info.run_id))
        table = pl.read_parquet(local)
        assert table.height == 5 and table["sample_id"].to_list() == [f"dataset/r{i}" for i in range(5)]
        assert {"output", "dense_output", "accuracy", "dense_accuracy", "speedup", "prompt_tokens"} <= set(table.columns)
        assert (table["repeats"] == 2).all()
        # compile: true: both the technique and its dense pair decoded through the compiled step
        assert run.data.tags["env.decode"] == "compiled"
        assert table["compiled"].all() and table["dense_compiled"].all()


def test_bad_data_fails_before_ray_naming_file_line_and_column(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"context": "a", "answer": "b"}\n{"context": "c", "answer": 7}\n')
    spec = {"model": "smollm2-135m", "workload": {"task": "dataset", "path": str(data)}, "techniques": {"dense": {}},
            "objectives": {"accuracy": "maximize"}, "trials": 1}
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(json.dumps(spec))
    started = time.perf_counter()
    assert cli.main(["sweep", "run", str(spec_file), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
                     "--storage", f"sqlite:///{tmp_path}/o.db"]) == 2
    err = capsys.readouterr().err
    assert "workload.path" in err and "bad.jsonl" in err and "line 2" in err and "answer" in err
    assert "Traceback" not in err and time.perf_counter() - started < 30


def alive_trial_runners() -> list:
    from ray._private import state

    return [a for a in state.actors().values() if a.get("State") == "ALIVE" and "TrialRunner" in str(a.get("ActorClassName"))]


def test_hung_trials_time_out_are_retried_then_recorded_failed_and_no_actor_outlives_the_sweep(ray_session, tiny_model_dir, tmp_path):
    """10 trials of which 3 hang (an hour's sleep) with `trial_timeout_s: 10`: each hung attempt's actor
    is killed and replaced, the trial retried once, then recorded failed "timed out"; the 7 others
    complete; the whole sweep ends within 2 minutes and leaves no actor alive."""
    from paretoray.orchestrator.book import SweepBook

    data = noop_spec(tiny_model_dir, "hung", trials=10, count=2, sleep_s=0.0)
    data["techniques"]["noop"]["sleep_s"] = [0.2, 3600.0]
    data["actors"]["trial_timeout_s"] = 10
    spec = parse(data, "<hung>")
    stores = resolve_stores(home=str(tmp_path))
    book = SweepBook(spec, stores)
    book.open(resume=False)
    hung = {1, 4, 7}
    for i in range(10):  # which trials hang, fixed
        book.study.enqueue_trial({"technique": "noop", "noop.sleep_s": 3600.0 if i in hung else 0.2, "noop.knob": i / 10})
    book.close()

    started = time.monotonic()
    result = Controller(spec, stores).run(resume=True, progress=False)
    assert time.monotonic() - started < 120
    assert (result.trials_finished, result.trials_failed, result.trials_timed_out) == (10, 3, 6)
    study = optuna.load_study(study_name="hung", storage=stores.storage)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert sorted(t.params["noop.sleep_s"] for t in failed) == [3600.0] * 3
    assert all("timed out on 2 attempt(s)" in t.user_attrs["error"] for t in failed)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 7
    deadline = time.monotonic() + 20
    while alive_trial_runners() and time.monotonic() < deadline:  # ray.kill is asynchronous
        time.sleep(0.5)
    assert alive_trial_runners() == []


def test_an_error_escaping_the_runner_counts_as_a_dead_actor(ray_session, tiny_model_dir, tmp_path, monkeypatch):
    """A sticky CUDA error re-raised outside the trial's own handling arrives as a task error: the
    actor is replaced and the trial retried, then recorded failed, and the sweep goes on."""
    from paretoray.orchestrator import dispatcher

    data = noop_spec(tiny_model_dir, "escapes", trials=3, count=1, sleep_s=0.0)
    spec = parse(data, "<escapes>")
    stores = resolve_stores(home=str(tmp_path))
    sent = []
    original = dispatcher.Dispatcher._send

    def send(self, dispatch, actor):
        original(self, dispatch, actor)
        sent.append(dispatch.ticket.number)
        if dispatch.ticket.number == 0:  # this trial's call is replaced by one that raises in the actor
            ref = next(r for r, d in self.in_flight.items() if d is dispatch)
            del self.in_flight[ref]
            self.in_flight[actor.handle.run_trial.remote(None)] = dispatch  # fails before its try

    monkeypatch.setattr(dispatcher.Dispatcher, "_send", send)
    result = Controller(spec, stores).run(progress=False)
    assert (result.trials_finished, result.trials_failed, result.trials_retried, result.actors_replaced) == (3, 1, 1, 2)
    failed = [t for t in optuna.load_study(study_name="escapes", storage=stores.storage).trials if t.state == TrialState.FAIL]
    assert "raised outside the trial runner" in failed[0].user_attrs["error"]


def test_compositions_and_batch_sizes_sweep_end_to_end(ray_session, tiny_model_dir, tmp_path, capsys):
    """A composition is a technique like any other through Ray, Optuna and MLflow: its members'
    parameters swept and logged, the batch size a dimension (a technique that cannot batch at 1)."""
    data = {
        "name": "composed",
        "model": {"id": str(tiny_model_dir), "dtype": "float32", "compile": False},
        "workload": {"task": "passkey", "context_lengths": [192], "samples_per_length": 2, "max_new_tokens": 4,
                     "batch_size": [1, 2], "fidelity": False},
        "techniques": {"dense": {}, "self_spec+streaming_llm": {"streaming_llm": {"window": 16}},
                       "kv_quant+snapkv": {"kv_quant": {"bits": 4}, "snapkv": {"max_capacity_prompt": 64, "window_size": 8}}},
        "objectives": {"throughput_tokens_s": "maximize", "accuracy": "maximize"},
        "sampler": {"name": "grid", "seed": 0},
        "trials": 5,
        "actors": {"count": 2, "num_cpus": 1, "num_gpus": 0},
    }
    spec_file = tmp_path / "composed.yaml"
    spec_file.write_text(json.dumps(data))
    stores = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--storage", f"sqlite:///{tmp_path}/optuna.db"]
    assert cli.main(["sweep", "run", str(spec_file), "--no-progress", *stores]) == 0
    study = optuna.load_study(study_name="composed", storage=f"sqlite:///{tmp_path}/optuna.db")
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 5, [(t.state, t.user_attrs.get("error")) for t in study.trials]
    batches = sorted((t.user_attrs["technique"], t.user_attrs["params"]["workload.batch_size"]) for t in done)
    assert batches == [("dense", 1), ("dense", 2), ("kv_quant+snapkv", 1), ("self_spec+streaming_llm", 1),
                       ("self_spec+streaming_llm", 2)]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = children(client, "composed", study.user_attrs[PARENT_ATTR])
    logged = {r.data.params["technique"]: r for r in runs}
    assert logged["kv_quant+snapkv"].data.params["kv_quant/snapkv.kv_quant.bits"] == "4"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.metrics["output_match"] for r in runs if r.data.params["technique"] == "self_spec+streaming_llm"} == {1.0}
