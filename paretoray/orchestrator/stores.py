"""Where a sweep's records live: the MLflow tracking store and the Optuna study storage.

Embedded defaults put both on SQLite under `./paretoray-runs/` (override the folder with
`PARETORAY_HOME`). Every command takes `--tracking-uri` and `--storage`, which fall back to
`PARETORAY_TRACKING_URI` and `PARETORAY_STORAGE`. A storage ending in `.log` or `.journal` (or
starting with `journal:`) is Optuna's crash-safe journal file.

On a cluster both stores go on PostgreSQL (`postgresql://user:password@host:5432/db`, with the
`cluster` extra's psycopg), or the tracking URI is an MLflow server (`http://HEAD:5000`), which
then also keeps the artifacts. For a database tracking URI, artifacts go to
`PARETORAY_ARTIFACT_ROOT` when set (an `s3://` or shared-folder URI that `paretoray ui` can read
from elsewhere), else to `artifacts/` beside the local stores.
"""

from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend


# The password runs to the first `@`: SQLAlchemy's URL grammar allows `/` and `:` in it
# (postgresql://u:pa/ss@host), and a quote or whitespace ends a URL quoted in a message.
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<secret>[^@\s'\"]+)@")
# `key=SECRET` in a URL query (?password=, &sslpassword=) or a libpq conninfo (`host=h password=x`).
_SECRET_KEYS = r"(?:ssl)?password|passwd|pwd|passphrase|token|access_token|secret|client_secret|api_key|apikey|access_key|secret_key"
_QUERY_SECRETS = re.compile(rf"(?i)(?<![\w.-])(?P<key>(?:{_SECRET_KEYS})=)(?P<secret>[^&\s'\";,)]+)")


def redact(text: object) -> str:
    """`text` with every credential in a URI replaced by `***`: `scheme://user:SECRET@host` and
    `?password=SECRET` style query (or conninfo) parameters. Every message, log line, report and
    record that may carry a store URL goes through this."""
    shown = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _QUERY_SECRETS.sub(lambda m: f"{m['key']}***", shown)


def strip_credentials(url: str) -> str:
    """`url` without its user information and secret query parameters: for a link a page keeps
    (the report's run links), where `***` would only make the browser fail to log in."""
    without_user = re.sub(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@", r"\g<scheme>", url.strip())
    base, _, query = without_user.partition("?")
    kept = [part for part in query.split("&") if part and not re.fullmatch(rf"(?i)(?:{_SECRET_KEYS})=.*", part)]
    return redact(base + ("?" + "&".join(kept) if kept else ""))


class StoreError(ValueError):
    """A store URL that cannot be used here; the message says what to install or change."""


def _check_driver(url: str, flag: str) -> None:
    # SQLAlchemy 2.1 reads plain postgresql:// URLs with psycopg 3 (postgresql+psycopg2:// picks psycopg2).
    if url.startswith(("postgresql://", "postgresql+psycopg://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError(f"{flag} {redact(url.split('@')[-1])!r} is PostgreSQL, which needs psycopg: "
                             "pip install 'paretoray[cluster]' (or 'psycopg[binary]')") from None


@dataclass(frozen=True)
class Stores:
    tracking_uri: str
    storage: str
    artifact_root: str | None  # where new MLflow experiments keep artifacts (None: the server decides)

    def load_study(self, name: str) -> optuna.Study:
        """The sweep `name`'s study; a StoreError that lists the sweeps there when it is not one of them."""
        storage = self.optuna_storage()
        known = [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]
        if name not in known:
            raise StoreError(f"no sweep named {name!r} in {redact(self.storage)}; known: {', '.join(known) or 'none'}")
        return optuna.load_study(study_name=name, storage=storage)

    @property
    def journal(self) -> Path | None:
        """The journal file when the study storage is Optuna's journal (None: a database)."""
        url = self.storage
        if url.startswith("journal:") or url.endswith((".log", ".journal")):
            return Path(url.removeprefix("journal:").removeprefix("//"))
        return None

    def optuna_storage(self) -> BaseStorage:
        url = self.storage
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(self.journal)))
        sqlite = _sqlite_path(url)
        if sqlite is not None:
            write_ahead_log(sqlite)
        # SQLite's default lock wait (5 s) is too short for a controller writing while `results`, the
        # report or the MLflow UI read; PostgreSQL: a connection that cannot be made fails in 10 s.
        connect_args = {"timeout": 60} if sqlite is not None else {"connect_timeout": 10} if url.startswith("postgresql") else {}
        return RDBStorage(url, heartbeat_interval=None, engine_kwargs={"connect_args": connect_args} if connect_args else None)

    def lease(self, name: str):
        """Take sweep `name`'s controller lease (see lease.py); raises lease.LeaseHeld."""
        from paretoray.orchestrator import lease

        return lease.acquire(name, self.storage, self.journal)


def write_ahead_log(path: Path) -> None:
    """Put a SQLite file (created if missing) in WAL mode, which stays with the file.

    A commit then appends to the log and syncs it once, where the default rollback journal syncs
    the journal and the database; with SQLite's default synchronous=FULL every commit is still
    on disk when it returns. Readers (`paretoray results`, the MLflow UI) no longer block the
    controller's writes. Not for network file systems, where SQLite itself is unsafe.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _has_tables(path: Path) -> bool:
    if not path.exists():
        return False
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0] > 0


def initialize_sqlite(stores: Stores) -> None:
    """Create each SQLite store's schema atomically: built in a file beside it, then renamed over it.

    MLflow and Optuna create their tables on first use with migrations (MLflow's are dozens of
    alembic steps that SQLite cannot roll back); a controller killed during them leaves a file no
    later run can open (`table _alembic_tmp_... already exists`). A file that has no table yet
    holds no data, so replacing it loses nothing. A store that has tables is left as it is.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    builders = {
        _sqlite_path(stores.tracking_uri): lambda uri: SqlAlchemyStore(uri, stores.artifact_root or "./mlruns").engine.dispose(),
        None if stores.journal else _sqlite_path(stores.storage): lambda uri: RDBStorage(uri).engine.dispose(),
    }
    for path, build in builders.items():
        if path is None or _has_tables(path):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_stagings(path)
        staging = path.with_name(f".{path.name}.{os.getpid()}.init")
        try:
            build(f"sqlite:///{staging}")
            write_ahead_log(staging)
            if _has_tables(path):  # another controller finished first: keep its file
                continue
            for sidecar in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                sidecar.unlink(missing_ok=True)  # an empty database's log: nothing in it
            os.replace(staging, path)
        finally:
            for leftover in (staging, staging.with_name(staging.name + "-wal"), staging.with_name(staging.name + "-shm")):
                leftover.unlink(missing_ok=True)


def _remove_dead_stagings(path: Path) -> None:
    """Schemas a killed controller was building beside `path` (`.NAME.PID.init*`, its pid gone)."""
    for staging in path.parent.glob(f".{path.name}.*.init*"):
        pid = staging.name.removeprefix(f".{path.name}.").split(".", 1)[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            staging.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def _sqlite_path(uri: str) -> Path | None:
    # The query (`?timeout=`, or a `?password=` SQLite ignores) is no part of the file's name.
    return Path(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def resolve_stores(tracking_uri: str | None = None, storage: str | None = None, home: str | None = None) -> Stores:
    base = Path(home or os.environ.get("PARETORAY_HOME", "paretoray-runs")).absolute()
    tracking = tracking_uri or os.environ.get("PARETORAY_TRACKING_URI") or f"sqlite:///{base / 'mlflow.db'}"
    study_storage = storage or os.environ.get("PARETORAY_STORAGE") or f"sqlite:///{base / 'optuna.db'}"
    _check_driver(tracking, "--tracking-uri")
    _check_driver(study_storage, "--storage")
    sqlite = _sqlite_path(tracking)
    if sqlite is not None:
        write_ahead_log(sqlite)
    artifact_root: str | None
    if tracking.startswith(("http://", "https://", "databricks")):
        artifact_root = None  # the server keeps them (`mlflow server --serve-artifacts` proxies them)
    elif os.environ.get("PARETORAY_ARTIFACT_ROOT"):
        artifact_root = os.environ["PARETORAY_ARTIFACT_ROOT"]
    elif sqlite is not None:
        artifact_root = (sqlite.parent / "artifacts").absolute().as_uri()
    else:
        artifact_root = (base / "artifacts").as_uri()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return Stores(tracking_uri=tracking, storage=study_storage, artifact_root=artifact_root)
