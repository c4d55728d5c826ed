"""Actor placement and the front's refresh split, without Ray: what a spec asks of Ray, which
device an actor uses, the one line a dead actor leaves, and which front writes are cheap."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from paretoray.actors.actor import Placement
from paretoray.orchestrator.pool import actor_failure
from paretoray.orchestrator.recorder import Recorder
from paretoray.orchestrator.stores import resolve_stores


@pytest.mark.parametrize(
    "gpus, device, group",
    [(0, "cpu", False), (0.25, None, False), (1, None, False), (2, None, True), (8, None, True)],
)
def test_placement_device_and_reservation(gpus, device, group):
    # None: the actor resolves it in its own process, CUDA when Ray's GPUs are real, else CPU.
    placement = Placement(num_cpus=1, num_gpus=gpus)
    assert placement.device == device and placement.uses_placement_group is group


def test_actor_failure_is_one_line_and_prefers_the_loaders_reason():
    class Died(Exception):
        error_msg = "Traceback (most recent call last):\n  ...\nModelLoadError: model '/x' did not load: no config.json\n"

    assert actor_failure(Died()) == "model '/x' did not load: no config.json"
    assert actor_failure(RuntimeError("The actor died unexpectedly.\n\tclass_name: TrialRunner")) == (
        "RuntimeError: The actor died unexpectedly."
    )


def test_front_tags_every_trial_and_artifacts_only_when_asked(tmp_path):
    stores = resolve_stores(home=str(tmp_path))
    from paretoray.dashboards import live_report_html

    recorder = Recorder(stores, "front", report=live_report_html)
    spec_json = {"model": {"id": "m", "dtype": "auto"}, "workload": {"task": "passkey", "context_lengths": [128],
                 "samples_per_length": 1}, "sampler": {"name": "random"}, "trials": 3, "actors": {"count": 1},
                 "techniques": {"noop": {}}, "objectives": {"latency_ms_per_token": "minimize", "accuracy": "maximize"},
                 "constraints": []}
    parent = recorder.start_sweep(spec_json, None)
    study = optuna.create_study(directions=["minimize", "maximize"], storage=stores.storage, study_name="front")
    for number, knob in enumerate([0.2, 0.8, 0.5]):
        trial = study.ask()
        metrics = {"latency_ms_per_token": 1 + 9 * knob**2, "accuracy": knob}
        record = {"technique": "noop", "params": {"knob": knob}, "status": "ok", "metrics": metrics}
        run_id = recorder.log_trial(parent, trial.number, record, spec_json)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("metrics", metrics)
        study.tell(trial, [metrics["latency_ms_per_token"], metrics["accuracy"]])
    client = MlflowClient(stores.tracking_uri)

    rows = recorder.update_front(parent, study, ["latency_ms_per_token", "accuracy"], artifacts=False)
    assert all(row["pareto"] for row in rows)  # a monotone trade-off: every point is on the front
    assert {client.get_run(row["mlflow_run_id"]).data.tags["pareto"] for row in rows} == {"true"}
    assert client.get_run(parent).data.metrics["pareto_size"] == 3
    assert not {a.path for a in client.list_artifacts(parent)} & {"pareto_front.png", "trials.parquet"}

    recorder.update_front(parent, study, ["latency_ms_per_token", "accuracy"], artifacts=True)
    assert {"pareto_front.png", "report.html", "trials.parquet"} <= {a.path for a in client.list_artifacts(parent)}


@pytest.mark.parametrize("constrained", [False, True])
def test_front_is_optunas_best_trials(constrained):
    import random

    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    rng = random.Random(0)
    for _ in range(60):
        trial = study.ask()
        if constrained:
            trial.set_constraint("c", rng.uniform(-1, 1))
        if rng.random() < 0.1:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, [rng.random(), rng.random(), rng.random()])
    from paretoray.orchestrator.pareto import pareto_numbers

    assert pareto_numbers(study) == {t.number for t in study.best_trials} != set()


def test_ray_client_connection_refused_once_is_retried(monkeypatch, capsys):
    """A real Ray Client proxy fails a server start only under load (seen once in test_cluster); the
    retry is what is tested here, so ray.init answers as that proxy did, then connects."""
    from paretoray.orchestrator import controller

    calls = []

    def init(address=None, **_kwargs):
        calls.append(address)
        if len(calls) == 1:
            raise ConnectionAbortedError("Initialization failure from server:\nTraceback ...")

    monkeypatch.setattr(controller.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(controller.ray, "init", init)
    monkeypatch.setattr(controller.time, "sleep", lambda _s: None)
    controller.connect_ray("ray://head:10001", spec=None)
    assert calls == ["ray://head:10001"] * 2
    assert "retrying (1/2)" in capsys.readouterr().err

    calls.clear()
    monkeypatch.setattr(controller.ray, "init", lambda address=None, **_: calls.append(address) or (_ for _ in ()).throw(
        ConnectionAbortedError("refused")))
    with pytest.raises(ConnectionAbortedError):
        controller.connect_ray("127.0.0.1:6379", spec=None)  # not a client address: no retry
    assert len(calls) == 1


def test_a_compositions_parameters_are_logged_under_keys_mlflow_accepts(tmp_path):
    stores = resolve_stores(home=str(tmp_path))
    recorder = Recorder(stores, "composed")
    spec_json = {"model": {"id": "m", "dtype": "auto"}, "workload": {"task": "passkey", "context_lengths": [128],
                 "samples_per_length": 1}, "sampler": {"name": "random"}, "trials": 1, "actors": {"count": 1},
                 "techniques": {"self_spec+snapkv": {}}, "objectives": {"accuracy": "maximize"}, "constraints": []}
    parent = recorder.start_sweep(spec_json, None)
    record = {"technique": "self_spec+snapkv", "status": "ok", "metrics": {"accuracy": 1.0},
              "params": {"self_spec.gamma": 4, "snapkv.max_capacity_prompt": 256.0, "workload.batch_size": 3}}
    run_id = recorder.log_trial(parent, 0, record, spec_json)
    params = MlflowClient(stores.tracking_uri).get_run(run_id).data.params
    assert params["technique"] == "self_spec+snapkv"
    assert params["self_spec/snapkv.self_spec.gamma"] == "4"
    assert params["self_spec/snapkv.workload.batch_size"] == "3"
