"""A real multi-node Ray cluster on one machine, for the cluster tests, and the servers they use.

Each node is a `ray start --block` process in its own session (process group), so a test can
make a node leave the cluster by killing that group, as a machine that loses power would.
`ray start` hosts several nodes on one machine once the ports Ray fixes by default are made
distinct: the dashboard agent's HTTP port (52365) and the worker port range (10002-19999, which
two raylets would hand out twice; 0 lets the OS choose). Each node gets its own --temp-dir, so
sessions, sockets and logs stay apart from any other Ray on the machine, and teardown kills only
the processes this helper started (their groups, then any process still naming its temp dir),
never `ray stop`, which would stop every Ray on the machine.

Node ids are found through a marker resource per node (`paretoray_test_node_NAME: 1`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This worktree's paretoray first on the path (also for Ray's workers), no token auth, offline."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    return env


def _kill_group(process: subprocess.Popen, grace_s: float = 5.0) -> None:
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@dataclass
class _Node:
    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path


@dataclass
class LocalRayCluster:
    root: Path
    nodes: dict[str, _Node] = field(default_factory=dict)
    port: int = 0
    client_port: int = 0
    dashboard_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://127.0.0.1:{self.client_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], ready_timeout_s: float = 90.0) -> _Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.out"
        common = [
            "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--dashboard-agent-listen-port", str(free_port()), "--object-store-memory", str(150 * 2**20),
            "--resources", json.dumps({f"paretoray_test_node_{name}": 1}),
        ]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [str(BIN / "ray"), "start", *args, *common], stdout=out, stderr=subprocess.STDOUT,
                env=child_env(), start_new_session=True, cwd=self.root,
            )
        node = _Node(name, process, temp_dir, log)
        self.nodes[name] = node
        deadline = time.monotonic() + ready_timeout_s
        while b"Ray runtime started" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start for node {name} failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return node

    def start_head(self, *, num_cpus: int, num_gpus: int, dashboard: bool = True) -> None:
        self.port, self.client_port = free_port(), free_port()
        self.dashboard_port = free_port()
        args = ["--head", "--port", str(self.port), "--ray-client-server-port", str(self.client_port),
                "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
                "--include-dashboard", "true" if dashboard else "false", "--dashboard-port", str(self.dashboard_port),
                "--dashboard-host", "127.0.0.1"]
        self._start("head", args)

    def add_node(self, name: str, *, num_cpus: int, num_gpus: int) -> None:
        self._start(name, ["--address", self.address, "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus)])

    def node_id(self, name: str, timeout_s: float = 60.0) -> str:
        """The node's id once the cluster lists it alive (the caller is connected with ray.init)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for node in ray.nodes():
                if node["Alive"] and f"paretoray_test_node_{name}" in node["Resources"]:
                    return node["NodeID"]
            time.sleep(0.3)
        raise TimeoutError(f"node {name} did not join the cluster within {timeout_s:.0f} s")

    def kill_node(self, name: str) -> None:
        """The node leaves the cluster abruptly: its raylet, its workers and its actors are killed."""
        node = self.nodes.pop(name)
        # Collected before the kill: an actor's worker whose raylet is gone keeps answering its caller
        # directly for a moment, and once orphaned it is no longer the node's descendant.
        doomed = {child.pid for child in psutil.Process(node.process.pid).children(recursive=True)}
        try:
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.process.wait(timeout=10)
        for pid in doomed | set(_pids_naming(str(node.temp_dir))):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else []):
            _kill_group(self.nodes.pop(name).process)
        # Workers of a node outlive its raylet by a moment; anything still naming our temp dir is ours.
        time.sleep(0.5)
        for pid in _pids_naming(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def short_temp_root(prefix: str = "prc-") -> Path:
    """Ray's unix sockets live under the temp dir and their paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class Server:
    """A server process in its own session, stopped with its whole group."""

    process: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        _kill_group(self.process)


def start_mlflow_server(folder: Path, timeout_s: float = 120.0, port: int | None = None) -> Server:
    """`mlflow server` on loopback, SQLite backend, artifacts proxied by the server (as on the head).
    `port`: restart one that was stopped, on its port and with its data."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = folder / "mlflow-server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")],
            stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return Server(process, url, log)
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_group(process)
            raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or started here; the message says why."""


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else None


def start_postgres(folder: Path, timeout_s: float = 60.0) -> tuple[str, Server]:
    """A throwaway PostgreSQL server from Debian's packages on 127.0.0.1 with databases `optuna` and
    `mlflow`; returns the URL prefix `postgresql://postgres@127.0.0.1:PORT` and the server.

    Installs the `postgresql` package with apt-get when it is missing and this process is root.
    PostgreSQL refuses to run as root, so as root the server runs as the package's `postgres` user.
    """
    import pwd
    import shutil

    bindir = _postgres_bin()
    if bindir is None and os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT, "env": dict(os.environ, DEBIAN_FRONTEND="noninteractive")}
        subprocess.run(["apt-get", "update", "-q"], check=False, **quiet)
        subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], check=False, **quiet)
        bindir = _postgres_bin()
    if bindir is None:
        raise PostgresUnavailable("no PostgreSQL server binaries under /usr/lib/postgresql and apt-get could not install them")
    run_as: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable("running as root and there is no `postgres` user to run the server as") from None
        run_as = ["runuser", "-u", "postgres", "--"]
        os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    initdb = subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                            capture_output=True, text=True)
    if initdb.returncode != 0:
        raise PostgresUnavailable(f"initdb failed: {initdb.stderr.strip()[-1000:]}")
    port = free_port()
    log = folder / "postgres.log"
    out = open(log, "wb")
    # fsync off: a throwaway test server, not a durability test.
    process = subprocess.Popen(
        [*run_as, str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(folder),
         "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(process, f"postgresql://postgres@127.0.0.1:{port}", log)
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True)
            break
        except psycopg.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise PostgresUnavailable(f"the server did not start: {log.read_text()[-1000:]}") from None
            time.sleep(0.3)
    with connection.cursor() as cursor:
        for database in ("optuna", "mlflow"):
            cursor.execute(f"CREATE DATABASE {database}")
    connection.close()
    return server.url, server
