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
    mounted = {remote: (ROOT / local).resolve() for remote, local in config["file_mounts"].items()}
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
    # the head's `ray start` hands jobs the tracking URI of that server
    line = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    assert f"PARETORAY_TRACKING_URI=http://127.0.0.1:{server['port']}" in line
    assert "PARETORAY_STORAGE=" in line


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
