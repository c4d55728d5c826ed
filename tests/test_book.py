"""The sweep book without Ray: records that must not wedge a sweep, half-created sweeps, store
outages, the controller lease and `sweep delete`. Real Optuna and MLflow stores (SQLite and the
journal file) in a temporary folder; real child processes for the lease."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from paretoray.names import PARENT_ATTR, SPEC_ATTR
from paretoray.orchestrator import cli, lease
from paretoray.orchestrator.book import StoreCalls, StoreOutage, SweepBook, SweepError, check_stores, sweep_state
from paretoray.orchestrator.spec import parse
from paretoray.orchestrator.stores import resolve_stores
from tests.tiny import noop_spec


@pytest.fixture
def stores(tmp_path):
    return resolve_stores(home=str(tmp_path / "runs"))


def noop_book(tmp_path, stores, name="book", constraints=(), trials=4):
    data = noop_spec(tmp_path, name, trials=trials, count=1, sleep_s=0.0)
    data["model"] = {"id": "smollm2-135m"}  # noop never loads it; a registry name needs no folder
    data["constraints"] = list(constraints)
    return SweepBook(parse(data, "<test>"), stores, "# test\n")


def constraint_values(frozen) -> list[float]:
    return [v for k, v in frozen.system_attrs.items() if k.startswith("constraints")]


def ok_record(ticket, **metrics):
    return {"trial": ticket.number, "technique": "noop", "params": ticket.params, "status": "ok", "label": "noop",
            "metrics": {"accuracy": 0.5, "latency_ms_per_token": 2.0, **metrics}, "wall_s": 0.1}


@pytest.mark.parametrize("value", [math.nan, None, "n/a", math.inf, "missing"])
def test_a_missing_or_nan_constraint_value_makes_the_trial_infeasible_and_resume_works(tmp_path, stores, value):
    book = noop_book(tmp_path, stores, constraints=["tokens_per_s >= 100"])
    book.open(resume=False)
    ticket = book.ask()
    extra = {} if value == "missing" else {"tokens_per_s": value}
    assert book.finish(ticket, ok_record(ticket, **extra)) is True
    frozen = book.study.trials[ticket.number]
    assert frozen.state == TrialState.COMPLETE
    assert constraint_values(frozen) == [math.inf]  # infeasible: never on the front
    book.close()

    again = noop_book(tmp_path, stores, constraints=["tokens_per_s >= 100"])
    again.open(resume=True)
    assert again.done == 1
    second = again.ask()
    assert again.finish(second, ok_record(second, tokens_per_s=500.0))
    assert constraint_values(again.study.trials[second.number]) == [-400.0]


def test_a_record_left_in_mlflow_with_a_bad_constraint_is_adopted_on_resume(tmp_path, stores):
    """The wedge the issue found: the MLflow run is written, the controller dies before Optuna is
    told; every resume replayed the crash. Now the adopted record is simply infeasible."""
    book = noop_book(tmp_path, stores, constraints=["tokens_per_s >= 100"])
    book.open(resume=False)
    ticket = book.ask()
    record = ok_record(ticket, tokens_per_s=math.nan)
    book.recorder.log_trial(book.parent, ticket.number, record, book.spec_json)  # ... and the controller dies here

    for _ in range(2):  # resume twice: neither replays a crash
        again = noop_book(tmp_path, stores, constraints=["tokens_per_s >= 100"])
        again.open(resume=True)
        trial = again.study.trials[ticket.number]
        assert trial.state == TrialState.COMPLETE and constraint_values(trial) == [math.inf]


def test_non_finite_objectives_are_recorded_failed(tmp_path, stores):
    book = noop_book(tmp_path, stores)
    book.open(resume=False)
    ticket = book.ask()
    assert book.finish(ticket, ok_record(ticket, accuracy=math.nan)) is False
    assert book.study.trials[ticket.number].state == TrialState.FAIL
    assert "not finite" in book.study.trials[ticket.number].user_attrs["error"]


def test_a_half_created_sweep_is_finished_by_resume_and_made_again_by_run(tmp_path, stores):
    book = noop_book(tmp_path, stores, name="half")
    # The controller died after storing the spec and making the parent run, before recording its id:
    book.recorder = None
    storage = stores.optuna_storage()
    study = optuna.create_study(study_name="half", storage=storage, directions=["minimize", "maximize"])
    book._store_spec(study)
    from paretoray.orchestrator.recorder import Recorder

    orphan = Recorder(stores, "half").start_sweep(book.spec_json, "# test\n")
    assert sweep_state(storage, "half") == "half"

    resumed = noop_book(tmp_path, stores, name="half")
    resumed.open(resume=True)
    assert resumed.parent == orphan  # adopted: one parent run, not two
    assert sweep_state(storage, "half") == "created"

    # A study that never got its spec: resume cannot know what to make, run makes it again.
    optuna.create_study(study_name="bare", storage=storage, directions=["minimize", "maximize"])
    with pytest.raises(SweepError, match="interrupted while it was being created"):
        noop_book(tmp_path, stores, name="bare").open(resume=True)
    fresh = noop_book(tmp_path, stores, name="bare")
    fresh.open(resume=False)
    assert SPEC_ATTR in fresh.study.user_attrs and PARENT_ATTR in fresh.study.user_attrs


def test_a_created_sweep_is_not_created_twice(tmp_path, stores):
    noop_book(tmp_path, stores, name="twice").open(resume=False)
    with pytest.raises(SweepError, match="already exists.*sweep resume twice"):
        noop_book(tmp_path, stores, name="twice").open(resume=False)


def test_store_calls_retry_transient_errors_then_name_the_store_without_its_password(stores):
    calls = StoreCalls("s", stores=stores.__class__("postgresql://bob:hunter2@db:5432/x", stores.storage, None),
                       attempts=3, backoff_s=0.01)
    flaky = iter([ConnectionError("reset"), ConnectionError("reset")])

    def sometimes():
        error = next(flaky, None)
        if error:
            raise error
        return 42

    assert calls("MLflow tracking store", "logging", sometimes) == 42
    with pytest.raises(StoreOutage) as caught:
        calls("MLflow tracking store", "logging", lambda: (_ for _ in ()).throw(ConnectionError("refused by db")))
    text = str(caught.value)
    assert "MLflow tracking store postgresql://bob:***@db:5432/x" in text and "hunter2" not in text
    assert "paretoray sweep resume s" in text
    with pytest.raises(KeyError):  # a bug is not an outage: raised at once
        calls("MLflow tracking store", "logging", lambda: {}["x"])


def test_a_store_that_does_not_answer_stops_the_sweep_before_anything_starts(tmp_path):
    dead = resolve_stores(tracking_uri="http://127.0.0.1:9/", home=str(tmp_path / "runs"))
    started = time.monotonic()
    with pytest.raises(StoreOutage, match=r"MLflow tracking store http://127\.0\.0\.1:9/"):
        check_stores(dead)
    assert time.monotonic() - started < 15


def test_sweep_run_against_a_dead_store_exits_1_naming_it(tmp_path, capsys):
    path = tmp_path / "dead.yaml"
    import yaml

    data = noop_spec(tmp_path, "dead", trials=1, count=1, sleep_s=0.0)
    data["model"] = {"id": "smollm2-135m"}
    path.write_text(yaml.safe_dump(data))
    started = time.monotonic()
    code = cli.main(["sweep", "run", str(path), "--tracking-uri", "http://u:pw-secret@127.0.0.1:9/",
                     "--storage", f"sqlite:///{tmp_path}/o.db", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 15
    assert "MLflow tracking store http://u:***@127.0.0.1:9/" in err and "pw-secret" not in err
    assert "Traceback" not in err


# ---- the lease -----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "journal", pytest.param("postgresql", marks=[pytest.mark.cluster, pytest.mark.slow])])
def lease_stores(request, tmp_path):
    """The lease lives where the study does: a table in SQLite or PostgreSQL, a file beside the journal."""
    storage = str(tmp_path / "optuna.log") if request.param == "journal" else None
    if request.param == "postgresql":
        storage = f"{request.getfixturevalue('postgres_url')}/optuna"
        backend = lease.backend_for(storage, None)  # makes the table
        with backend.engine.begin() as conn:  # rows an earlier run of these tests left
            conn.exec_driver_sql("DELETE FROM paretoray_leases WHERE sweep IN ('x', 'y')")
        backend.close()
    return resolve_stores(home=str(tmp_path / "runs"), storage=storage)


def test_a_held_lease_names_its_holder_and_is_free_again_after_release(lease_stores):
    held = lease_stores.lease("x")
    with pytest.raises(lease.LeaseHeld, match=rf"pid {os.getpid()} on "):
        lease_stores.lease("x")
    other = lease_stores.lease("y")  # per sweep
    other.release()
    held.release()
    lease_stores.lease("x").release()


HOLD = """
import sys, time
from paretoray.orchestrator.stores import resolve_stores
stores = resolve_stores(home=sys.argv[1], storage=sys.argv[2] or None)
held = stores.lease("x")
print("held", flush=True)
time.sleep(600)
"""


def test_a_holder_killed_on_this_machine_frees_the_sweep_at_once(lease_stores, tmp_path):
    storage = "" if lease_stores.storage.startswith("sqlite") else lease_stores.storage
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "runs"), storage], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(lease.LeaseHeld, match=rf"pid {child.pid} "):
            lease_stores.lease("x")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    lease_stores.lease("x").release()  # no waiting for the expiry


def test_a_holder_on_another_machine_keeps_the_sweep_until_its_lease_expires(lease_stores, monkeypatch):
    held = lease_stores.lease("x")
    held._stop.set()  # it stops renewing: a machine that died
    monkeypatch.setattr(lease, "_alive_here", lambda holder: None)  # as if on another machine
    with pytest.raises(lease.LeaseHeld, match="expires in"):
        lease_stores.lease("x")
    monkeypatch.setattr(lease.time, "time", lambda real=time.time: real() + lease.TTL_S + 1)
    taken = lease_stores.lease("x")  # expired: taken over
    assert not held.backend.renew("x", held.me, time.time() + 60)  # the old holder finds it lost
    taken.release()


def test_the_lease_thread_renews_and_reports_a_takeover(lease_stores):
    held = lease.acquire("x", lease_stores.storage, lease_stores.journal, ttl_s=0.4)
    time.sleep(1.0)  # several renewals: still ours
    assert not held.lost.is_set()
    backend = lease.backend_for(lease_stores.storage, lease_stores.journal)
    backend.release("x", held.me)  # gone from under it (as after an expiry and another's takeover)
    time.sleep(0.5)
    assert held.lost.is_set()
    held.release()


# ---- delete ---------------------------------------------------------------------------------------


def test_delete_removes_both_stores_and_frees_the_name(tmp_path, stores, capsys):
    book = noop_book(tmp_path, stores, name="gone")
    book.open(resume=False)
    ticket = book.ask()
    book.finish(ticket, ok_record(ticket))
    flags = ["--tracking-uri", stores.tracking_uri, "--storage", stores.storage]

    held = stores.lease("gone")
    assert cli.main(["sweep", "delete", "gone", "--yes", *flags]) == 1  # not while a controller runs it
    assert "being run by another controller" in capsys.readouterr().err
    held.release()

    assert cli.main(["sweep", "delete", "gone", *flags]) == 2  # no terminal to confirm in
    assert "--yes" in capsys.readouterr().err
    assert cli.main(["sweep", "delete", "gone", "--yes", *flags]) == 0
    assert sweep_state(stores.optuna_storage(), "gone") == "absent"
    assert MlflowClient(stores.tracking_uri).get_experiment_by_name("gone") is None
    again = noop_book(tmp_path, stores, name="gone")
    again.open(resume=False)  # the name is free
    assert again.done == 0
    assert cli.main(["sweep", "delete", "nothing", "--yes", *flags]) == 2
    assert "no sweep named 'nothing'" in capsys.readouterr().err


def test_a_controller_killed_while_the_stores_are_created_leaves_them_usable(tmp_path):
    """The first run builds both SQLite schemas (MLflow's are dozens of migrations SQLite cannot roll
    back). A controller killed at any moment of that leaves either no schema or a whole one, never a
    file that no later run can open."""
    home = tmp_path / "runs"
    code = ("import sys; from paretoray.orchestrator.stores import resolve_stores, initialize_sqlite; "
            f"initialize_sqlite(resolve_stores(home={str(home)!r}))")
    for delay in (0.0, 0.2, 0.5):  # after the build has begun: its staging file exists
        child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        deadline = time.monotonic() + 60
        while child.poll() is None and not list(home.glob(".*.init")) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        assert child.poll() is None, "the build finished before it could be killed"
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    assert list(home.glob(".*.init"))  # what the killed builds left
    stores = resolve_stores(home=str(home))
    check_stores(stores, timeout_s=120)  # raises StoreOutage on a half-built store
    assert MlflowClient(stores.tracking_uri).search_experiments(max_results=1) is not None
    assert not list(home.glob(".*.init*"))  # the killed builds' files are gone
