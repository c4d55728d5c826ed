"""Controllers that race, die at random moments, or lose a store, on a real two-node Ray cluster
with real stores (SQLite, Optuna's journal file, PostgreSQL, an MLflow tracking server). Every
controller here is a separate `paretoray` process, as a user would start it. `make test-cluster`."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from paretoray.orchestrator.stores import resolve_stores
from tests.localcluster import child_env
from tests.tiny import noop_spec

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PARETORAY = [sys.executable, "-m", "paretoray.orchestrator.cli"]


def store_flags(stores) -> list[str]:
    return ["--tracking-uri", stores.tracking_uri, "--storage", stores.storage, "--no-progress"]


def start(args: list[str], log, cwd) -> subprocess.Popen:
    return subprocess.Popen([*PARETORAY, *args], stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd,
                            start_new_session=True)


def finished(study: optuna.Study) -> list:
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL) and not t.user_attrs.get("interrupted")]


def trial_runs(tracking_uri: str, name: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], filter_string="tags.`paretoray.role` = 'trial'", max_results=5000)


def parent_runs(tracking_uri: str, name: str) -> list:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], filter_string="tags.`paretoray.role` = 'sweep'", max_results=100)


def assert_consistent(stores, name: str, expected: int) -> None:
    """Exactly `expected` finished trials, each with one MLflow run and each run with its trial; one parent."""
    study = optuna.load_study(study_name=name, storage=stores.optuna_storage())
    done = finished(study)
    assert len(done) == expected, Counter(t.state.name for t in study.trials)
    runs = trial_runs(stores.tracking_uri, name)  # deleted (discarded) runs are not listed
    numbers = Counter(int(r.data.tags["paretoray.trial"]) for r in runs)
    assert max(numbers.values()) == 1, numbers  # no duplicate run
    assert set(numbers) == {t.number for t in done}  # no lost trial, no orphan run
    assert {t.user_attrs["mlflow_run_id"] for t in done} == {r.info.run_id for r in runs}
    for lost in (t for t in study.trials if t.user_attrs.get("interrupted")):  # re-asked, and measured
        assert any(t.number > lost.number and t.params == lost.params for t in done), lost.number
    assert len(parent_runs(stores.tracking_uri, name)) == 1


def test_two_resumes_started_together_one_proceeds_the_other_names_it(ray_cluster, tiny_model_dir, tmp_path):
    """10 rounds of two `sweep resume` started at the same moment: the lease lets exactly one
    proceed, the other exits 1 within seconds naming the holder's pid, and touches nothing. In the
    first two rounds the winner runs a new trial on the cluster; in the other eight the sweep has
    all its trials and the winner reconciles, redraws the front and closes it (seconds, no Ray),
    which keeps 10 rounds within CI's time. (The lease on the journal file and on PostgreSQL, with
    processes too: tests/test_book.py.)"""
    stores = resolve_stores(home=str(tmp_path / "runs"))
    name = "race"
    spec = tmp_path / "race.yaml"
    spec.write_text(yaml.safe_dump(noop_spec(tiny_model_dir, name, trials=1, count=1, sleep_s=0.5)))
    flags = [*store_flags(stores), "--ray-address", ray_cluster.address]
    with open(tmp_path / "create.log", "wb") as log:
        assert start(["sweep", "run", str(spec), *flags], log, tmp_path).wait(180) == 0
    for round_ in range(10):
        trials = 1 + min(round_ + 1, 2)  # rounds 0 and 1 add a trial each
        logs = [open(tmp_path / f"r{round_}-{i}.log", "wb") for i in range(2)]
        args = ["sweep", "resume", name, "--trials", str(trials), *flags]
        racers = [start(args, log, tmp_path) for log in logs]
        started = time.monotonic()
        codes = [p.wait(180) for p in racers]
        for log in logs:
            log.close()
        texts = [(tmp_path / f"r{round_}-{i}.log").read_text() for i in range(2)]
        assert sorted(codes) == [0, 1], texts
        winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
        assert f"being run by another controller: pid {racers[winner].pid} on" in texts[loser], texts[loser]
        assert "Traceback" not in texts[loser] and time.monotonic() - started < 180
        assert f"sweep {name}: {trials} trials finished" in texts[winner]
    assert_consistent(stores, name, 3)


def sweep_progress(stores, name: str) -> tuple[str, int]:
    """(the sweep's state: absent, half or created; its finished trials)."""
    from paretoray.orchestrator.book import sweep_state

    storage = stores.optuna_storage()
    state = sweep_state(storage, name)
    return state, (len(finished(optuna.load_study(study_name=name, storage=storage))) if state != "absent" else 0)


def test_controller_killed_at_random_moments_then_resumed_loses_and_duplicates_nothing(ray_cluster, tiny_model_dir, tmp_path):
    """`kill -9` of the controller at 20 random moments of a 30-trial sweep, each followed by
    `sweep run --resume-if-exists`; the last one runs to the end. The moments are drawn from three
    phases so that each is hit whatever the machine's speed: while it starts (before the sweep
    exists), right after the study appears (while it is being created: spec, parent run), and
    just after some trials finished (trials in flight, records being written)."""
    stores = resolve_stores(home=str(tmp_path / "runs"))
    spec = tmp_path / "killed.yaml"
    spec.write_text(yaml.safe_dump(noop_spec(tiny_model_dir, "killed", trials=30, count=2, sleep_s=0.3)))
    args = ["sweep", "run", str(spec), "--resume-if-exists", *store_flags(stores), "--ray-address", ray_cluster.address]
    rng = random.Random(14)
    killed_at = Counter()
    for kill in range(20):
        phase = ("starting", "creating", "creating", "trials", "starting")[kill % 5]  # 8, 8 and 4 of the 20
        with open(tmp_path / f"kill{kill}.log", "wb") as log:
            controller = start(args, log, tmp_path)
            _, done = sweep_progress(stores, "killed")
            wanted = done + rng.randint(1, 3)
            deadline = time.monotonic() + 120
            if phase == "starting":
                time.sleep(rng.uniform(0.5, 3.0))
            while phase != "starting" and controller.poll() is None and time.monotonic() < deadline:
                state, done = sweep_progress(stores, "killed")
                if (phase == "creating" and state != "absent") or (phase == "trials" and done >= wanted):
                    time.sleep(rng.uniform(0.0, 0.3))
                    break
                time.sleep(0.05)
            if controller.poll() is None:
                killed_at[(phase, sweep_progress(stores, "killed")[0])] += 1
                os.killpg(controller.pid, signal.SIGKILL)  # no finally, no atexit
            controller.wait(10)
    with open(tmp_path / "last.log", "wb") as log:
        code = start(args, log, tmp_path).wait(300)
    assert code == 0, (tmp_path / "last.log").read_text()[-3000:]
    assert_consistent(stores, "killed", 30)
    assert killed_at[("starting", "absent")] and killed_at[("trials", "created")], killed_at


def test_a_tracking_server_that_goes_away_ends_the_sweep_with_the_resume_command(ray_cluster, tiny_model_dir, tmp_path):
    """Mid-sweep the MLflow server stops: bounded retries, then exit 1 naming the store and the resume
    command, no traceback; with the server back, `resume` finishes with no duplicate run."""
    from tests.localcluster import start_mlflow_server

    folder = tmp_path / "server"
    server = start_mlflow_server(folder)
    port = int(server.url.rsplit(":", 1)[1])
    stores = resolve_stores(tracking_uri=server.url, home=str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    spec = tmp_path / "outage.yaml"
    spec.write_text(yaml.safe_dump(noop_spec(tiny_model_dir, "outage", trials=8, count=1, sleep_s=0.5)))
    flags = [*store_flags(stores), "--ray-address", ray_cluster.address]
    log_path = tmp_path / "outage.log"
    try:
        with open(log_path, "wb") as log:
            controller = start(["sweep", "run", str(spec), *flags], log, tmp_path)
            deadline = time.monotonic() + 180
            while True:
                assert controller.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                try:
                    if len(finished(optuna.load_study(study_name="outage", storage=stores.optuna_storage()))) >= 3:
                        break
                except KeyError:
                    pass
                time.sleep(0.3)
            server.stop()
            stopped = time.monotonic()
            code = controller.wait(180)
        text = log_path.read_text()
        assert code == 1, text[-3000:]
        assert time.monotonic() - stopped < 120
        assert f"MLflow tracking store {server.url}" in text and "stopped answering" in text
        assert "paretoray sweep resume outage" in text and "Traceback" not in text
    finally:
        server.stop()
    server = start_mlflow_server(folder, port=port)
    try:
        with open(tmp_path / "resume.log", "wb") as log:
            assert start(["sweep", "resume", "outage", *flags], log, tmp_path).wait(300) == 0, \
                (tmp_path / "resume.log").read_text()[-3000:]
        assert_consistent(stores, "outage", 8)
    finally:
        server.stop()


def test_a_store_that_is_down_at_the_start_is_named_within_15_seconds(tmp_path, tiny_model_dir):
    """A PostgreSQL storage on a closed port: exit 1 naming it (password hidden) before Ray or any actor."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = tmp_path / "down.yaml"
    spec.write_text(yaml.safe_dump(noop_spec(tiny_model_dir, "down", trials=1, count=1, sleep_s=0.0)))
    started = time.monotonic()
    result = subprocess.run([*PARETORAY, "sweep", "run", str(spec), "--storage", f"postgresql://u:pw-123@127.0.0.1:{port}/optuna",
                             "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--no-progress"],
                            capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=120)
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 15 + 10  # + the interpreter's start and imports
    assert f"Optuna study storage postgresql://u:***@127.0.0.1:{port}/optuna" in result.stderr
    assert "pw-123" not in result.stderr + result.stdout and "Traceback" not in result.stderr
