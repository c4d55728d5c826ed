"""One controller per sweep: a lease kept in the sweep's own Optuna store.

A controller takes the lease before it touches a sweep and renews it from a background thread;
a second `run`/`resume` of the same sweep finds it held and stops, naming the holder. The lease
expires `ttl_s` after its last renewal, so a holder that died on another machine frees the sweep
after at most that long; a holder on this machine whose process is gone (kill -9) frees it at once.

Where it lives follows the study storage, so that every controller of the sweep sees it:
- a database (SQLite, PostgreSQL, MySQL): a table `paretoray_leases` beside Optuna's tables. Taking
  the lease is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`, which both databases make
  atomic; a renewal is an `UPDATE ... WHERE holder = me`.
- Optuna's journal file: a JSON lease file beside it, read and written under an exclusive `flock`
  on a lock file (local and NFSv4 file systems).

Times are the holders' wall clocks: machines sharing a sweep should keep them in sync (NTP) to
well within `ttl_s`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

TTL_S = 60.0  # a holder that stops renewing loses the lease this long after its last renewal


class LeaseHeld(RuntimeError):
    """Another live controller holds the sweep."""

    def __init__(self, sweep: str, holder: dict[str, Any]):
        self.holder = holder
        left = max(0.0, float(holder.get("expires", 0)) - time.time())
        super().__init__(
            f"sweep {sweep!r} is being run by another controller: pid {holder.get('pid')} on {holder.get('host')} "
            f"(since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('since', 0))))}). "
            f"Wait for it to finish, or stop it; if that machine died, its lease expires in {left:.0f} s"
        )


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether a holder on this machine still runs (None: it is on another machine, so we cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid, "started": _process_start(pid),
            "since": time.time()}


def _stale(holder: dict[str, Any], now: float) -> bool:
    return float(holder["expires"]) < now or _alive_here(holder) is False


# ---- backends ------------------------------------------------------------------------------


class _SqlBackend:
    def __init__(self, url: str):
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {}
        if url.startswith("postgresql"):
            connect_args = {"connect_timeout": 10}
        self.engine = sa.create_engine(url, connect_args=connect_args, poolclass=sa.pool.NullPool)
        meta = sa.MetaData()
        self.table = sa.Table(
            "paretoray_leases", meta,
            sa.Column("sweep", sa.String(512), primary_key=True),
            sa.Column("holder", sa.Text, nullable=False),  # JSON: id, host, pid, started, since
            sa.Column("holder_id", sa.String(64), nullable=False),
            sa.Column("expires", sa.Float, nullable=False),
        )
        try:
            meta.create_all(self.engine, checkfirst=True)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
            # Two first controllers creating the table at once (PostgreSQL reports the loser's
            # CREATE as a duplicate type): the other one made it.
            meta.create_all(self.engine, checkfirst=True)

    def _upsert(self, conn, values: dict[str, Any], where):
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # MySQL has no conditional upsert: a plain insert, then a conditional update
            try:
                conn.execute(self.table.insert().values(**values))
            except sa.exc.IntegrityError:
                conn.rollback()
                conn.execute(self.table.update().where(self.table.c.sweep == values["sweep"]).where(where).values(**values))
            return
        statement = insert(self.table).values(**values)
        conn.execute(statement.on_conflict_do_update(index_elements=["sweep"], set_=values, where=where))

    def take(self, sweep: str, me: dict[str, Any], expires: float, now: float) -> dict[str, Any] | None:
        """Take the lease if free or expired; returns the holder that keeps it (None: it is ours)."""
        values = {"sweep": sweep, "holder": json.dumps(me), "holder_id": me["id"], "expires": expires}
        with self.engine.begin() as conn:
            self._upsert(conn, values, self.table.c.expires < now)
        holder = self.read(sweep)
        if holder is None or holder["id"] == me["id"]:
            return None
        if _alive_here(holder) is False:  # killed on this machine: take it over, unless someone else just did
            with self.engine.begin() as conn:
                conn.execute(self.table.update().where(self.table.c.sweep == sweep)
                             .where(self.table.c.holder_id == holder["id"]).values(**values))
            holder = self.read(sweep)
            if holder is None or holder["id"] == me["id"]:
                return None
        return holder

    def read(self, sweep: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(self.table.c.holder, self.table.c.expires).where(self.table.c.sweep == sweep)).first()
        return None if row is None else {**json.loads(row.holder), "expires": row.expires}

    def renew(self, sweep: str, me: dict[str, Any], expires: float) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(self.table.update().where(self.table.c.sweep == sweep)
                                  .where(self.table.c.holder_id == me["id"]).values(expires=expires))
        return result.rowcount == 1

    def release(self, sweep: str, me: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.table.delete().where(self.table.c.sweep == sweep).where(self.table.c.holder_id == me["id"]))

    def close(self) -> None:
        self.engine.dispose()


class _FileBackend:
    def __init__(self, journal: Path):
        self.folder = journal.parent
        self.stem = journal.name

    def _file(self, sweep: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in sweep)
        return self.folder / f"{self.stem}.lease-{safe}.json"

    def _locked(self, sweep: str, change) -> Any:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{self.stem}.lease.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                path = self._file(sweep)
                try:
                    holder = json.loads(path.read_text())
                except (OSError, ValueError):
                    holder = None
                new, answer = change(holder)
                if new is not holder:
                    if new is None:
                        path.unlink(missing_ok=True)
                    else:
                        tmp = path.with_suffix(".tmp")
                        tmp.write_text(json.dumps(new))
                        os.replace(tmp, path)
                return answer
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def take(self, sweep: str, me: dict[str, Any], expires: float, now: float) -> dict[str, Any] | None:
        def change(holder):
            if holder is None or holder["id"] == me["id"] or _stale(holder, now):
                return {**me, "expires": expires}, None
            return holder, holder
        return self._locked(sweep, change)

    def read(self, sweep: str) -> dict[str, Any] | None:
        return self._locked(sweep, lambda holder: (holder, holder))

    def renew(self, sweep: str, me: dict[str, Any], expires: float) -> bool:
        def change(holder):
            if holder is None or holder["id"] != me["id"]:
                return holder, False
            return {**holder, "expires": expires}, True
        return self._locked(sweep, change)

    def release(self, sweep: str, me: dict[str, Any]) -> None:
        self._locked(sweep, lambda holder: (None, None) if holder and holder["id"] == me["id"] else (holder, None))

    def close(self) -> None:
        pass


def backend_for(storage_url: str, journal: Path | None):
    return _FileBackend(journal) if journal is not None else _SqlBackend(storage_url)


# ---- the lease -----------------------------------------------------------------------------


@dataclass
class Lease:
    """A held lease, renewed every `ttl_s / 4` by a daemon thread until `release()`.

    `lost` is set when a renewal finds another holder (this controller was presumed dead, say
    after its machine was suspended for longer than `ttl_s`): the controller then stops.
    """

    sweep: str
    backend: Any
    me: dict[str, Any]
    ttl_s: float = TTL_S

    def __post_init__(self) -> None:
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.sweep}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        failures = 0
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.backend.renew(self.sweep, self.me, time.time() + self.ttl_s):
                    self.lost.set()
                    return
                failures = 0
            except Exception:  # the store is down for a moment: the lease lasts ttl_s, try again
                failures += 1
                if failures * self.ttl_s / 4 >= self.ttl_s:
                    self.lost.set()
                    return

    def release(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.backend.release(self.sweep, self.me)
        except Exception:  # the store is gone: the lease expires by itself
            pass
        self.backend.close()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(sweep: str, storage_url: str, journal: Path | None = None, ttl_s: float = TTL_S) -> Lease:
    """Take the sweep's lease or raise LeaseHeld naming the live holder."""
    backend = backend_for(storage_url, journal)
    me = _me()
    now = time.time()
    holder = backend.take(sweep, me, now + ttl_s, now)
    if holder is not None:
        backend.close()
        raise LeaseHeld(sweep, holder)
    return Lease(sweep, backend, me, ttl_s)


def holder_of(sweep: str, storage_url: str, journal: Path | None = None) -> dict[str, Any] | None:
    """The live holder of the sweep's lease, or None."""
    backend = backend_for(storage_url, journal)
    try:
        holder = backend.read(sweep)
    finally:
        backend.close()
    return None if holder is None or _stale(holder, time.time()) else holder
