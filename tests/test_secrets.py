"""A password in the store URIs never leaves: not in output, files, MLflow records or `ps`.

The unit tests check each place a store URI is shown (errors, the sweep summary, `paretoray ui`'s
banner and the `mlflow server` command it builds, report links). The end-to-end tests run a real
noop sweep, then `results`, `report` and `ui` (a real `mlflow server`), with a password in both
URIs, and look for it everywhere: stdout and stderr, every file under the run folders (names and
bytes: databases, artifacts, logs, the report), every MLflow param, tag and artifact, the Optuna
study's attributes, Ray's session logs and the command lines of the UI's processes. The fast one
puts the password where SQLite ignores it (`?password=`) and in the userinfo of an MLflow server's
URL; the `cluster` one gives a PostgreSQL role a real password (scram-sha-256), so the stores and
the UI's server only work if it travels, by the environment, where it must.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from paretoray.dashboards.report import default_mlflow_url
from paretoray.orchestrator import cli
from paretoray.orchestrator.stores import StoreError, redact, resolve_stores, strip_credentials
from tests.localcluster import BIN, _kill_group, child_env, free_port
from tests.tiny import noop_spec

SECRET = f"Pw{uuid.uuid4().hex}"


# ---- where a URI is shown ----------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    f"postgresql://paretoray:{SECRET}@db:5432/optuna",
    f"postgresql+psycopg://paretoray:pa/ss:{SECRET}@db/optuna",  # SQLAlchemy allows / and : in a password
    f"error: no sweep in 'postgresql://u:{SECRET}@db/x'; known: none",
    f"http://paretoray:{SECRET}@head:5000",
    f"sqlite:////tmp/optuna.db?timeout=5&password={SECRET}",
    f"mysql://db/x?sslpassword={SECRET}&charset=utf8",
    f"host=db port=5432 user=paretoray password={SECRET} dbname=optuna",  # a libpq conninfo
    f"redis://:{SECRET}@cache:6379",
])
def test_redact_hides_the_secret(text):
    assert SECRET not in redact(text)
    assert SECRET not in strip_credentials(text)


def test_redact_keeps_what_is_not_a_secret():
    for text in ["http://127.0.0.1:5000/#/experiments/1", "sqlite:////tmp/a.db", "max_new_tokens=8 n_sink=4",
                 "postgresql://paretoray@db/optuna"]:
        assert redact(text) == text
    assert strip_credentials(f"http://u:{SECRET}@head:5000/?token={SECRET}&x=1") == "http://head:5000/?x=1"
    assert default_mlflow_url(f"https://u:{SECRET}@head:5000/") == "https://head:5000"


def test_store_errors_and_files_hide_the_secret(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}?password={SECRET}"
    stores = resolve_stores(f"sqlite:///{tmp_path / 'mlflow.db'}?password={SECRET}", storage, home=str(tmp_path))
    with pytest.raises(StoreError) as caught:
        stores.load_study("nope")
    assert "nope" in str(caught.value) and SECRET not in str(caught.value)
    # The query is no part of the SQLite file's name.
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["mlflow.db", "optuna.db"]
    assert not [p for p in tmp_path.rglob("*") if SECRET in str(p)]


def test_ui_passes_the_store_in_the_environment_not_argv(tmp_path, monkeypatch, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}?password={SECRET}"
    seen = {}

    def call(command, env):
        seen.update(command=command, env=env)
        return 0

    monkeypatch.setattr(cli.subprocess, "call", call)
    assert cli.main(["ui", "--port", "5123", "--tracking-uri", uri, "--storage", f"sqlite:///{tmp_path / 'o.db'}"]) == 0
    out, err = capfd.readouterr()
    assert "open http://127.0.0.1:5123" in out and "password=***" in out
    assert SECRET not in out + err
    assert not any(SECRET in word for word in seen["command"]) and "--backend-store-uri" not in seen["command"]
    assert seen["env"]["MLFLOW_BACKEND_STORE_URI"] == uri
    # `mlflow server`'s own parser reads it from there.
    from mlflow.cli import cli as mlflow_cli

    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", uri)
    params = mlflow_cli.commands["server"].make_context("mlflow server", list(seen["command"][2:])).params
    assert params["backend_store_uri"] == uri and params["port"] == 5123


def test_ui_for_a_tracking_server_shows_no_userinfo(capfd):
    assert cli.main(["ui", "--tracking-uri", f"http://paretoray:{SECRET}@head.example:5001/"]) == 0
    out, err = capfd.readouterr()
    assert "MLflow UI: http://head.example:5001" in out
    assert "ssh -L 5001:localhost:5001 head.example" in out
    assert SECRET not in out + err


def test_unexpected_errors_are_redacted(monkeypatch, capfd):
    def boom(args):
        raise RuntimeError(f"could not connect to postgresql://paretoray:{SECRET}@db/optuna")

    monkeypatch.setattr(cli, "_dispatch", boom)
    assert cli.main(["results", "x"]) == 1
    out, err = capfd.readouterr()
    assert "RuntimeError: could not connect to postgresql://paretoray:***@db/optuna" in err
    assert SECRET not in out + err


def test_the_ui_hint_never_repeats_the_password():
    args = cli.build_parser().parse_args(["results", "x", "--tracking-uri", f"postgresql://u:{SECRET}@db/m"])
    hint = cli._store_flags(args)
    assert SECRET not in hint and "PARETORAY_TRACKING_URI" in hint


# ---- end to end ----------------------------------------------------------------------------------


def leaks(secret: str, texts: dict[str, str], roots: list[Path]) -> list[str]:
    """Where `secret` appears: among `texts`, and in the names and bytes of every file under `roots`."""
    found = [name for name, text in texts.items() if secret in text]
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if secret in str(path):
                found.append(f"file name {path}")
            elif path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                found.append(f"file {path}")
    return found


def mlflow_records(tracking_uri: str, experiment: str, into: Path) -> tuple[dict[str, str], int]:
    """Every param, tag and artifact of the sweep's runs (artifacts downloaded under `into`), and the
    number of runs."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    texts = {"experiment": json.dumps({"tags": exp.tags, "artifact_location": exp.artifact_location})}
    for run in runs:
        texts[f"run {run.info.run_id} params and tags"] = json.dumps({"params": run.data.params, "tags": run.data.tags})
        client.download_artifacts(run.info.run_id, "", str(into / run.info.run_id))
    return texts, len(runs)


def optuna_records(storage, name: str) -> str:
    study = optuna.load_study(study_name=name, storage=storage)
    system = storage.get_study_system_attrs(study._study_id)
    return json.dumps([study.user_attrs, system, [(t.params, t.user_attrs, t.system_attrs) for t in study.trials]], default=str)


def ray_session_logs() -> list[Path]:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # None when this driver joined a cluster
    return [Path(node.get_session_dir_path()) / "logs"] if node is not None else []


def start_ui(env: dict[str, str], timeout_s: float = 180.0):
    """`paretoray ui` for real, the stores given by the environment (as the README says): its output
    so far, the command lines of all its processes, the server's environment, and the URL."""
    port = free_port()
    out = tempfile.NamedTemporaryFile(prefix="paretoray-ui-", suffix=".log", delete=False)
    process = subprocess.Popen([str(BIN / "paretoray"), "ui", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                               env=child_env(**env), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, Path(out.name).read_text()[-3000:]
            time.sleep(0.5)
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        command_lines = {p.pid: " ".join(p.cmdline()) for p in tree}
        servers = [p for p in tree if "mlflow" in command_lines[p.pid] and "server" in command_lines[p.pid]]
        server_env = servers[0].environ() if servers else {}
        return process, Path(out.name), command_lines, server_env, url
    except BaseException:
        _kill_group(process)
        raise


def check_sweep_leaks_nothing(*, secret: str, tracking: str, storage: str, ui_tracking: str, run_links: str, tmp_path: Path,
                              spec_dir: Path, capfd, monkeypatch, extra_roots: list[Path] = ()) -> None:
    """The sweep, results, report and ui with `secret` in both store URIs; nothing shows it."""
    name = f"secret{uuid.uuid4().hex[:6]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(noop_spec(spec_dir, name, trials=3, count=2, sleep_s=0)))
    home = tmp_path / "home"
    monkeypatch.setenv("PARETORAY_HOME", str(home))
    outputs: dict[str, str] = {}

    # The flags on purpose (what a user may type); the summary's hint then says to use the environment.
    code = cli.main(["sweep", "run", str(spec), "--tracking-uri", tracking, "--storage", storage, "--no-progress"])
    outputs["sweep run"] = "".join(capfd.readouterr())
    assert code == 0, outputs["sweep run"][-3000:]
    assert f"sweep {name}: 3 trials finished" in outputs["sweep run"]

    monkeypatch.setenv("PARETORAY_TRACKING_URI", tracking)
    monkeypatch.setenv("PARETORAY_STORAGE", storage)
    for form in ("json", "table"):
        assert cli.main(["results", name, "--format", form]) == 0
        outputs[f"results {form}"] = "".join(capfd.readouterr())
    assert len(json.loads(outputs["results json"])) == 3
    report = tmp_path / "report.html"
    assert cli.main(["report", name, "-o", str(report)]) == 0
    outputs["report"] = "".join(capfd.readouterr())
    assert report.stat().st_size > 10_000
    assert f'data-mlflow-url="{run_links}/"' in report.read_text()  # the links keep working, without credentials
    assert cli.main(["results", "no-such-sweep"]) == 2  # an error that names the storage
    outputs["results error"] = "".join(capfd.readouterr())
    assert "no sweep named 'no-such-sweep'" in outputs["results error"]
    if tracking.startswith("http"):  # the server is the UI: only a banner (a database URI starts one: below)
        assert cli.main(["ui", "--tracking-uri", tracking]) == 0
        outputs["ui banner"] = "".join(capfd.readouterr())

    process, ui_log, command_lines, server_env, url = start_ui({"PARETORAY_TRACKING_URI": ui_tracking,
                                                                 "PARETORAY_STORAGE": storage})
    try:
        # The server reads the store it was given in its environment: the sweep is there.
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}", timeout=30) as r:
            assert json.load(r)["experiment"]["name"] == name
        assert server_env.get("MLFLOW_BACKEND_STORE_URI") == ui_tracking
        outputs.update({f"ui process {pid} argv": line for pid, line in command_lines.items()})
        assert any("mlflow" in line and "server" in line for line in command_lines.values()), command_lines
    finally:
        _kill_group(process)
    outputs["ui output"] = ui_log.read_text(errors="replace")
    assert f"open {url}" in outputs["ui output"]
    ui_log.unlink()

    records, runs = mlflow_records(tracking, name, tmp_path / "downloaded")
    assert runs == 4  # the parent and three trials
    outputs.update(records)
    outputs["optuna"] = optuna_records(resolve_stores(tracking, storage).optuna_storage(), name)
    downloaded = {p.name for p in (tmp_path / "downloaded").rglob("*") if p.is_file()}
    assert {"trial.json", "spec.json", "spec.yaml", "trials.parquet", "report.html"} <= downloaded, downloaded
    found = leaks(secret, outputs, [tmp_path, *extra_roots, *ray_session_logs()])
    assert not found, found


@pytest.mark.slow
def test_a_sweep_with_passwords_in_both_uris_leaks_them_nowhere(ray_session, tiny_model_dir, tmp_path, capfd, monkeypatch):
    from tests.localcluster import start_mlflow_server

    server_folder = tmp_path / "server"
    server = start_mlflow_server(server_folder)
    try:
        # The tracking server ignores the credentials; the client sends them (HTTP basic auth).
        tracking = server.url.replace("http://", f"http://paretoray:{SECRET}@")
        storage = f"sqlite:///{tmp_path / 'optuna.db'}?password={SECRET}"  # SQLite ignores the query
        check_sweep_leaks_nothing(secret=SECRET, tracking=tracking, storage=storage, tmp_path=tmp_path, run_links=server.url,
                                  ui_tracking=f"sqlite:///{server_folder / 'mlflow.db'}?password={SECRET}",
                                  spec_dir=tiny_model_dir, capfd=capfd, monkeypatch=monkeypatch)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_with_password():
    """PostgreSQL where role `paretoray` must give its password (scram-sha-256): URLs of its databases."""
    import shutil

    import psycopg

    from tests.localcluster import PostgresUnavailable, short_temp_root, start_postgres

    folder = short_temp_root("prpw-")
    try:
        url, server = start_postgres(folder)
    except PostgresUnavailable as why:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL is not available here: {why}")
    try:
        port = int(url.rsplit(":", 1)[1])
        hba = folder / "data" / "pg_hba.conf"
        hba.write_text(f"host all paretoray 127.0.0.1/32 scram-sha-256\n{hba.read_text()}")
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as admin:
            admin.execute(f"CREATE ROLE paretoray LOGIN PASSWORD '{SECRET}'")
            for database in ("pw_optuna", "pw_mlflow"):
                admin.execute(f"CREATE DATABASE {database} OWNER paretoray")
            admin.execute("SELECT pg_reload_conf()")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host="127.0.0.1", port=port, user="paretoray", password="wrong", dbname="pw_optuna").close()
        base = f"postgresql://paretoray:{SECRET}@127.0.0.1:{port}"
        yield f"{base}/pw_optuna", f"{base}/pw_mlflow", server.log
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.cluster
@pytest.mark.slow
def test_postgresql_with_a_password_leaks_it_nowhere(postgres_with_password, ray_session, tiny_model_dir, tmp_path, capfd,
                                                     monkeypatch):
    storage, tracking, postgres_log = postgres_with_password
    check_sweep_leaks_nothing(secret=SECRET, tracking=tracking, storage=storage, ui_tracking=tracking, tmp_path=tmp_path,
                              run_links="http://127.0.0.1:5000",
                              spec_dir=tiny_model_dir, capfd=capfd, monkeypatch=monkeypatch, extra_roots=[postgres_log])
