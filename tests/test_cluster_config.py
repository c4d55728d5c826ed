"""The cluster launcher files: valid for Ray's own schema, and what they run exists.

Ray validates a file the way `ray up` does (`prepare_config`, then `validate_config` against
`ray-schema.json`); the `ray start` and `mlflow server` lines are parsed by those tools' own
command-line parsers; the paths they mount and the extra they install exist in this repository.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
FILES = ["cluster.yaml", "cluster-onprem.yaml"]
TOKEN = "~/.ray/auth_token"  # where Ray looks for its token (ray get-auth-token --generate writes it)
STORES_ENV = "~/.paretoray/stores.env"
COMMAND_SECTIONS = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                    "head_start_ray_commands", "worker_start_ray_commands"]


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def commands(config: dict, key: str) -> list[list[str]]:
    """Each shell command of a section as words, environment assignments and redirections dropped."""
    split = []
    for line in config.get(key, []):
        for part in re.split(r"\|\||&&|;", line):
            words = [w for w in shlex.split(part.split(">")[0]) if not re.match(r"^[A-Z_]+=", w)]
            if words:
                split.append(words[1:] if words[0] == "nohup" else words)
    return split


def tool_lines(config: dict, key: str, tool: str, subcommand: str) -> list[list[str]]:
    return [c[2:] for c in commands(config, key) if Path(c[0]).name == tool and c[1] == subcommand]


def home(path: str) -> str:
    return path.replace("/home/ubuntu/", "~/").replace("$HOME/", "~/")


def header(name: str) -> str:
    """The file's leading comment, the commands a user runs, joined across continuation lines."""
    lines = []
    for line in (ROOT / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines).replace("\\ ", "")


@pytest.mark.parametrize("name", FILES)
def test_ray_accepts_the_cluster_file(name):
    config = prepare_config(load(name))
    validate_config(config)
    assert config["head_node_type"] in config["available_node_types"]


def test_ray_rejects_a_broken_file():
    # The same validation, shown to bite: a misspelt field, and node types on the local provider.
    broken = load("cluster.yaml") | {"setup_comands": ["true"]}
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(broken))
    onprem = load("cluster-onprem.yaml") | {"available_node_types": {"gpu": {"node_config": {}, "resources": {}}}}
    with pytest.raises(click.ClickException, match="available_node_types is not supported"):
        prepare_config(onprem)


@pytest.mark.parametrize("name", FILES)
def test_mounts_and_installs_name_what_exists(name):
    config = load(name)
    mounted = {remote: (ROOT / local).resolve() for remote, local in config["file_mounts"].items() if local != TOKEN}
    assert all(local.exists() for local in mounted.values()), mounted
    # sweeps/ reaches the nodes inside a mounted folder
    assert any((ROOT / "sweeps").resolve().is_relative_to(local) for local in mounted.values())
    assert (ROOT / ".gitignore").exists() and config["rsync_filter"] == [".gitignore"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [c for c in commands(config, "setup_commands") if Path(c[0]).name in ("python", "python3", "pip")]
    editable = [c[c.index("-e") + 1] for c in installs if "-e" in c]
    assert editable, installs
    for target in editable:
        path, extra = re.match(r"^(.*)\[(\w+)\]$", target).groups()
        assert extra in extras, f"{name} installs extra {extra!r}; pyproject has {sorted(extras)}"
        home = path.replace("$HOME/", "~/").replace("/home/ubuntu/", "~/")
        assert home in {r.replace("/home/ubuntu/", "~/") for r in mounted}, (path, list(mounted))


@pytest.mark.parametrize("name", FILES)
def test_head_starts_ray_and_an_mlflow_server_the_controller_uses(name):
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import start as ray_start

    config = load(name)
    heads = tool_lines(config, "head_start_ray_commands", "ray", "start")
    workers = tool_lines(config, "worker_start_ray_commands", "ray", "start")
    assert len(heads) == 1 and workers
    for argv in heads + workers:  # ray's own parser: unknown or malformed flags raise here
        ray_start.make_context("ray start", list(argv))
    head = ray_start.make_context("ray start", list(heads[0])).params
    assert head["head"] and head["num_cpus"] == 0  # no actor lands on the controller's node
    servers = tool_lines(config, "head_start_ray_commands", "mlflow", "server")
    assert len(servers) == 1
    server = mlflow_cli.commands["server"].make_context("mlflow server", list(servers[0])).params
    assert server["serve_artifacts"] and server["host"] == "127.0.0.1"
    # its store comes from the environment (stores.env), not its command line, which `ps` shows
    assert server["backend_store_uri"] is None and "--backend-store-uri" not in servers[0]
    line = next(c for c in config["head_start_ray_commands"] if "mlflow server" in c)
    assert line.index(f". {STORES_ENV}") < line.index("mlflow server") and "set -a" in line
    # the head's `ray start` hands jobs the tracking URI of that server, and the Optuna storage of stores.env
    line = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert f"PARETORAY_TRACKING_URI=http://127.0.0.1:{server['port']}" in line
    assert line.index(f". {STORES_ENV}") < line.index("ray start") and "set -a" in line


@pytest.mark.parametrize("name", FILES)
def test_stores_env_is_made_private_with_both_store_uris(name, tmp_path):
    import subprocess

    config = load(name)
    (made,) = [c for c in config["head_setup_commands"] if STORES_ENV in c]
    assert made.startswith("umask 077 && ")
    # Run it as the head would (HOME elsewhere): a file only its user reads, that the shell can source.
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # the second run keeps what is there
        subprocess.run(["bash", "-c", made], env=env, check=True)
    path = tmp_path / ".paretoray" / "stores.env"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    shown = subprocess.run(["bash", "-c", f"set -a && . {path} && env"], env=env, capture_output=True, text=True, check=True)
    values = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)
    assert values["PARETORAY_STORAGE"].startswith("sqlite:///") and values["PARETORAY_STORAGE"].endswith("/paretoray-runs/optuna.db")
    assert values["MLFLOW_BACKEND_STORE_URI"].endswith("/paretoray-runs/mlflow.db")


@pytest.mark.parametrize("name", FILES)
def test_no_store_uri_or_password_on_a_command_line(name):
    from paretoray.orchestrator.stores import redact

    config = load(name)
    for key in COMMAND_SECTIONS:
        for line in config.get(key, []):
            assert "postgresql" not in line and "--backend-store-uri" not in line, line
            assert redact(line) == line, line
    submit = re.search(r"ray job submit .*?--ray-address auto", header(name))
    assert submit and "--storage" not in submit.group() and "--tracking-uri" not in submit.group()


@pytest.mark.parametrize("name", FILES)
def test_ray_token_authentication_is_on_for_every_node_and_job_submission(name):
    config = load(name)
    text = (ROOT / name).read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    # Every `ray start`, head and workers, runs in token mode (the variable is Ray's only switch).
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key] if "ray start" in c]
    assert len(starts) == 2 and all(re.search(r"(^|\s)RAY_AUTH_MODE=token\s", c) for c in starts), starts
    # The token reaches every node: file_mounts go to the head and every worker, at the path Ray reads.
    tokens = [remote for remote, local in config["file_mounts"].items() if local == TOKEN]
    assert [home(r) for r in tokens] == [TOKEN]
    assert any(f"chmod 600 {TOKEN}" in c for c in config["setup_commands"])  # setup_commands run on every node
    # ... and job submission: the documented `ray job submit` runs in token mode, after the token is made.
    words = header(name)
    assert re.search(r"RAY_AUTH_MODE=token ray job submit ", words), words
    assert words.index("ray get-auth-token --generate") < words.index(f"ray up {name}")


def test_the_token_path_and_mode_are_rays():
    import os
    import subprocess
    import sys

    from ray._private.authentication.authentication_token_setup import _get_default_token_path

    assert str(_get_default_token_path()) == os.path.expanduser(TOKEN)
    probe = "from ray._raylet import AuthenticationMode, get_authentication_mode; print(get_authentication_mode() == AuthenticationMode.TOKEN)"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "RAY_AUTH_MODE": "token"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_cloud_workers_declare_gpus():
    config = prepare_config(load("cluster.yaml"))
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    assert sum(v.get("min_workers", 0) for v in workers.values()) >= 1


def test_click_is_the_parser_used():
    # make_context above must really parse: an unknown flag is an error, not ignored.
    from ray.scripts.scripts import start as ray_start

    with pytest.raises(click.exceptions.NoSuchOption):
        ray_start.make_context("ray start", ["--head", "--no-such-flag"])
