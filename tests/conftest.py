"""Shared fixtures: a real S3 server (moto's, on loopback) with a clean bucket per test, and an
API server (kmock's emulator) with the operator's kopf handlers running against it."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from codistill.net import free_port

from .support.faultlog import FaultLog
from .support.kube import SECRETS, Cluster, Operator, secret
from .support.s3 import BUCKET, S3_KEY, S3_SECRET

CLUSTER_TIER = Path(__file__).resolve().parent / "cluster"
NOT_RUN = pytest.StashKey[str]()
FAULTS = pytest.StashKey[FaultLog]()


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave the real-cluster tier out where it cannot run (no Go, not root), unless required."""
    if collection_path != CLUSTER_TIER:
        return None
    from .cluster.conftest import REQUIRED, unavailable

    why = unavailable()
    if why is None or REQUIRED:
        return None
    config.stash[NOT_RUN] = why
    return True


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if NOT_RUN in config.stash:
        terminalreporter.write_line(f"not run: tests/cluster, the real-cluster tier: "
                                    f"{config.stash[NOT_RUN]}")
    log = config.stash.get(FAULTS, None)
    if log and log.rows:
        terminalreporter.section("fault suite")
        for line in log.lines():
            terminalreporter.write_line(line)
        written = log.write()
        if written:
            terminalreporter.write_line(f"written to {written}")


@pytest.fixture
def fault_log(request: pytest.FixtureRequest) -> FaultLog:
    """Record a row of the fault suite's summary: `fault_log(scenario, faults, steps_lost,
    outcome)`, called by a scenario once what it asserts has held."""
    return request.config.stash.setdefault(FAULTS, FaultLog())


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server as a real HTTP endpoint; yields its URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A reset S3 server with one empty bucket `codistill-test`, credentials in the env.

    Yields the endpoint; the bucket URL is `s3://codistill-test`.
    """
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=s3_server)
    fs.mkdir(BUCKET)
    return s3_server


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """An empty API server; kopf and the kubernetes client find it through $KUBECONFIG."""
    import kubernetes.config.kube_config

    running = Cluster(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(running.kubeconfig))
    # The client reads $KUBECONFIG once, when imported; kopf's login goes through that default.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(running.kubeconfig))
    yield running
    running.close()


@pytest.fixture
def operator(cluster: Cluster, s3: str) -> Iterator[Operator]:
    """kopf with the codistill handlers against `cluster`, the S3 credentials Secret in place."""
    cluster.create(SECRETS, secret())
    running = Operator()
    yield running
    running.stop()

