"""A sweep across a real multi-node Ray cluster on this machine, and what it survives.

Two nodes started with `ray start` (tests/localcluster.py), each declaring 2 logical GPUs, real
MLflow and Optuna stores. Trials use the registered `noop` technique: it holds its actor for a
set time and does no model work, so a test can kill an actor, a node or the controller while a
trial is known to be running. Run with `make test-cluster` (plain `make test` deselects them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from paretoray.orchestrator import cli
from paretoray.orchestrator.controller import PARENT_ATTR, Controller
from paretoray.orchestrator.pool import ActorPool, ActorStartError
from paretoray.orchestrator.spec import parse
from paretoray.orchestrator.stores import resolve_stores
from tests.localcluster import ROOT, child_env
from tests.tiny import noop_spec

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def child_runs(tracking_uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`paretoray.role` = 'trial'", max_results=1000)
    return runs


def assert_each_trial_logged_once(runs: list, expected: int) -> None:
    numbers = [r.data.tags["paretoray.trial"] for r in runs]  # search_runs lists no deleted run
    assert len(numbers) == len(set(numbers)) == expected, Counter(numbers)


class Killer(threading.Thread):
    """Watches a running controller's trials in flight and acts on them from another thread."""

    def __init__(self, controller: Controller, act):
        super().__init__(daemon=True)
        self.controller, self.act, self.stop = controller, act, threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for running in self.controller.in_flight():
                    self.act(running)
                time.sleep(0.05)
        except BaseException as error:  # surfaced by the test
            self.error = error

    def __enter__(self) -> Killer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(5)
        assert self.error is None, self.error


def test_actors_spread_over_nodes_each_on_its_own_gpu(ray_cluster, tiny_model_dir, tmp_path):
    stores = resolve_stores(home=str(tmp_path))
    spec = parse(noop_spec(tiny_model_dir, "pinned", trials=4, count=4, sleep_s=0.5, num_gpus=1, spread=True), "<pinned>")
    result = Controller(spec, stores).run(progress=False)
    assert result.trials_finished == 4 and result.trials_failed == 0

    runs = child_runs(stores.tracking_uri, "pinned")
    assert_each_trial_logged_once(runs, 4)
    # 4 actors, 4 trials sent at once: one trial per actor, and the record names where it ran.
    placements = [(r.data.tags["paretoray.node_id"], r.data.tags["paretoray.gpu_ids"]) for r in runs]
    assert len(set(placements)) == 4, placements  # no logical GPU shared
    assert {node for node, _ in placements} == {ray_cluster.node_id("head"), ray_cluster.node_id("a")}
    assert all(gpus in ("0", "1") for _, gpus in placements)
    # The GPUs are declared, not real: the actors ran on CPU and their records say so.
    assert {r.data.tags["env.device"] for r in runs} == {"cpu"}


def test_fractional_gpus_pack_and_multi_gpu_actors_take_a_node(ray_cluster, tiny_model_dir):
    head, a = ray_cluster.node_id("head"), ray_cluster.node_id("a")

    halves = ActorPool(parse(noop_spec(tiny_model_dir, "half", trials=1, count=4, sleep_s=0, num_gpus=0.5), "<half>"))
    try:
        actors = halves.start(4)
        assert all(len(actor.info["gpu_ids"]) == 1 for actor in actors)
        shared = Counter((actor.info["node_id"], actor.info["gpu_ids"][0]) for actor in actors)
        assert max(shared.values()) <= 2, shared  # a half GPU each: at most two actors per GPU
    finally:
        halves.shutdown()

    whole = ActorPool(parse(noop_spec(tiny_model_dir, "pair", trials=1, count=2, sleep_s=0, num_gpus=2), "<pair>"))
    try:
        actors = whole.start(2)
        # each actor reserved both GPUs of one node (a STRICT_PACK placement group per actor)
        assert sorted(sorted(actor.info["gpu_ids"]) for actor in actors) == [["0", "1"], ["0", "1"]]
        assert {actor.info["node_id"] for actor in actors} == {head, a}
        assert all(actor.placed.placement_group is not None for actor in actors)
        # a third would need a third node with 2 free GPUs: a clear error, not a hang
        with pytest.raises(ActorStartError, match="did not start within 10 s: the cluster may lack 1.0 CPU / 2.0 GPU"):
            ActorPool(whole.spec, start_timeout_s=10).start(1)
    finally:
        whole.shutdown()
    deadline = time.monotonic() + 20
    while ray.available_resources().get("GPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 4  # every reservation given back


def test_killed_actor_trial_is_retried_then_recorded_failed(ray_cluster, tiny_model_dir, tmp_path):
    stores = resolve_stores(home=str(tmp_path))
    spec = parse(noop_spec(tiny_model_dir, "killed", trials=4, count=2, sleep_s=2.0, retries=1), "<killed>")
    controller = Controller(spec, stores)
    targets: dict[int, int] = {}  # trial -> attempts to kill: the first trial seen every time, the second once
    killed: dict[tuple[int, int], int] = {}

    def kill(running) -> None:
        if running.trial not in targets and len(targets) < 2:
            targets[running.trial] = 2 if not targets else 1
        wanted = targets.get(running.trial, 0)
        key = (running.trial, running.attempt)
        if running.attempt <= wanted and key not in killed and running.running_s > 0.3 and running.pid:
            killed[key] = running.pid
            os.kill(running.pid, signal.SIGKILL)

    with Killer(controller, kill):
        result = controller.run(progress=False)

    always, once = list(targets)
    assert set(killed) == {(always, 1), (always, 2), (once, 1)}
    assert (result.trials_finished, result.trials_failed, result.trials_retried, result.actors_replaced) == (4, 1, 2, 3)
    study = optuna.load_study(study_name="killed", storage=stores.storage)
    trials = {t.number: t for t in study.trials}
    failed = trials[always]
    assert failed.state == TrialState.FAIL
    assert "actor died on 2 attempt(s) (max_trial_retries 1)" in failed.user_attrs["error"]
    assert all(f"actor pid {killed[(always, n)]} " in failed.user_attrs["error"] for n in (1, 2))
    survived = trials[once]
    assert survived.state == TrialState.COMPLETE
    assert survived.user_attrs["actor"]["pid"] not in killed.values()  # finished on another actor

    runs = {int(r.data.tags["paretoray.trial"]): r for r in child_runs(stores.tracking_uri, "killed")}
    assert_each_trial_logged_once(list(runs.values()), 4)
    assert runs[always].info.status == "FAILED" and "died" in runs[always].data.tags["paretoray.error"]
    assert runs[once].info.status == "FINISHED" and runs[once].data.tags["paretoray.attempts"] == "2"
    assert {runs[n].data.tags["paretoray.attempts"] for n in runs if n not in targets} == {"1"}


def test_sweep_submitted_as_a_ray_job_records_to_the_tracking_server(ray_cluster, mlflow_server, tiny_model_dir, tmp_path, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(noop_spec(tiny_model_dir, "job", trials=3, count=1, sleep_s=0.1)))
    # What `ray job submit --address http://HEAD:8265 --working-dir . -- paretoray sweep run ...` does.
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    entrypoint = (f"paretoray sweep run {spec_path} --ray-address auto --no-progress "
                  f"--tracking-uri {mlflow_server.url} --storage sqlite:///{tmp_path / 'optuna.db'}")
    job = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
    deadline = time.monotonic() + 240
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "sweep job: 3 trials finished" in logs

    runs = child_runs(mlflow_server.url, "job")
    assert_each_trial_logged_once(runs, 3)
    tracking = MlflowClient(mlflow_server.url)
    parent = runs[0].data.tags["mlflow.parentRunId"]
    assert {"pareto_front.png", "trials.parquet"} <= {a.path for a in tracking.list_artifacts(parent)}  # proxied by the server

    capsys.readouterr()
    assert cli.main(["ui", "--tracking-uri", mlflow_server.url]) == 0  # a server is the UI already: nothing started
    assert mlflow_server.url in capsys.readouterr().out


def test_sweep_through_ray_client(ray_cluster, mlflow_server, tiny_model_dir, tmp_path):
    spec_path = tmp_path / "client.yaml"
    spec_path.write_text(yaml.safe_dump(noop_spec(tiny_model_dir, "client", trials=3, count=1, sleep_s=0.1)))
    command = [sys.executable, "-m", "paretoray.orchestrator.cli", "sweep", "run", str(spec_path), "--no-progress",
               "--ray-address", ray_cluster.client_address, "--tracking-uri", mlflow_server.url,
               "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]
    done = subprocess.run(command, capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "sweep client: 3 trials finished" in done.stdout
    assert_each_trial_logged_once(child_runs(mlflow_server.url, "client"), 3)


def test_sweep_on_postgresql_stores(ray_cluster, postgres_url, tiny_model_dir, tmp_path, capsys):
    optuna_url, mlflow_url = f"{postgres_url}/optuna", f"{postgres_url}/mlflow"
    stores = resolve_stores(tracking_uri=mlflow_url, storage=optuna_url, home=str(tmp_path))
    data = noop_spec(tiny_model_dir, "postgres", trials=4, count=2, sleep_s=0)
    data["techniques"] = {"dense": {}, "streaming_llm": {"window": [16, 32, 64]}}  # real trials on the tiny model
    data["workload"] = {"task": "passkey", "context_lengths": [192], "samples_per_length": 1, "max_new_tokens": 3}
    result = Controller(parse(data, "<postgres>"), stores).run(progress=False)
    assert result.trials_finished == 4

    study = optuna.load_study(study_name="postgres", storage=optuna_url)
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]) == 4
    runs = child_runs(mlflow_url, "postgres")
    assert_each_trial_logged_once(runs, 4)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials if "mlflow_run_id" in t.user_attrs} == {r.info.run_id for r in runs}
    client = MlflowClient(mlflow_url)
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(study.user_attrs[PARENT_ATTR])}

    capsys.readouterr()
    assert cli.main(["results", "postgres", "--format", "json", "--tracking-uri", mlflow_url, "--storage", optuna_url]) == 0
    assert '"mlflow_run_id"' in capsys.readouterr().out


def test_node_leaving_mid_trial_actors_recreated_elsewhere(ray_cluster, tiny_model_dir, tmp_path):
    """Runs last in this module: it takes node `a` away, then starts a fresh node for any test after it."""
    head, a = ray_cluster.node_id("head"), ray_cluster.node_id("a")
    stores = resolve_stores(home=str(tmp_path))
    spec = parse(noop_spec(tiny_model_dir, "departed", trials=4, count=2, sleep_s=3.0, num_gpus=1, spread=True), "<departed>")
    controller = Controller(spec, stores)
    left: dict[str, float] = {}
    lost_trial: list[int] = []

    def take_node_away(running) -> None:
        if not left and running.node_id == a and running.running_s > 0.5:
            lost_trial.append(running.trial)
            ray_cluster.kill_node("a")
            left["at"] = time.perf_counter()

    try:
        with Killer(controller, take_node_away):
            result = controller.run(progress=False)
        assert left, "no trial ever ran on node a: the actors were not spread"
        assert result.trials_finished == 4 and result.trials_failed == 0
        assert result.actors_replaced >= 1 and result.trials_retried >= 1
        runs = {int(r.data.tags["paretoray.trial"]): r for r in child_runs(stores.tracking_uri, "departed")}
        assert_each_trial_logged_once(list(runs.values()), 4)
        moved = runs[lost_trial[0]]
        assert moved.data.tags["paretoray.attempts"] == "2" and moved.data.tags["paretoray.node_id"] == head
        study = optuna.load_study(study_name="departed", storage=stores.storage)
        # the replacement actor lives on the head: node a's GPUs are gone
        assert all(runs[t.number].data.tags["paretoray.node_id"] == head
                   for t in study.trials if t.number >= lost_trial[0] and t.number in runs)
    finally:
        if "a" not in ray_cluster.nodes:
            ray_cluster.add_node("a2", num_cpus=4, num_gpus=2)
