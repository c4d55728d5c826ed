"""Shared fixtures: a tiny random Llama saved once, and one local Ray for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before Ray starts: no token auth for the test cluster; no hub access, ever.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before
# anything imports triton.
if _no_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray (7-14 s to start on 2 cores), shared by every end-to-end test."""
    import ray

    if ray.is_initialized():  # the cluster tests' driver connection, when both kinds run together
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """Two Ray nodes on this machine, `head` and `a`, each with 4 CPUs and 2 declared (logical) GPUs,
    the head with its dashboard (job API) and Ray Client server; this process joins as a driver."""
    import shutil

    import ray

    from tests.localcluster import LocalRayCluster, short_temp_root

    cluster = LocalRayCluster(short_temp_root())
    try:
        cluster.start_head(num_cpus=4, num_gpus=2)
        cluster.add_node("a", num_cpus=4, num_gpus=2)
        if ray.is_initialized():
            ray.shutdown()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        cluster.node_id("head"), cluster.node_id("a")
        yield cluster
    finally:
        ray.shutdown()
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    from tests.localcluster import start_mlflow_server

    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url():
    import shutil

    from tests.localcluster import PostgresUnavailable, short_temp_root, start_postgres

    folder = short_temp_root("prpg-")
    try:
        url, server = start_postgres(folder)
    except PostgresUnavailable as why:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL is not available here: {why}")
    yield url
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
