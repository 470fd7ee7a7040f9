"""The control plane for this tier, started once per session.

Without its binaries and without Go to build them, the tier is not run, and one line says so
(tests/conftest.py); CI sets CODISTILL_REQUIRE_CLUSTER=1, and then it fails instead (a skipped
tier proves nothing).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from cluster.controlplane import (
    RESTRICTED_PYTORCH_INIT_CONTAINER,
    ControlPlane,
    TrainingOperator,
    ensure_built,
    missing_binaries,
)
from tests.cluster.stack import NAMESPACE, Stack
from tests.cluster.stack import stack as build_stack
from tests.support.kube import wait_for


def unavailable() -> str | None:
    """Why this tier cannot run here, or None (tests/conftest.py then leaves it out, saying so
    in one line, unless CI requires it)."""
    if missing_binaries() and shutil.which("go") is None:
        return ("no Go toolchain to build kube-apiserver and the Kubeflow controllers "
                "(cluster/build.sh)")
    if os.geteuid() != 0:
        return "the process kubelet needs root (network namespaces)"
    return None


REQUIRED = os.environ.get("CODISTILL_REQUIRE_CLUSTER") == "1"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    why = unavailable()
    if why and REQUIRED:
        pytest.fail(f"the real-cluster tier cannot run: {why}")
    if why:  # asked for by path (`make test` leaves the tier out, see tests/conftest.py)
        pytest.skip(f"the real-cluster tier cannot run: {why}")
    ensure_built()  # minutes when cold; .ci/run builds first and prints the times
    operator = TrainingOperator(pytorch_init_container_template=RESTRICTED_PYTORCH_INIT_CONTAINER)
    # Both Kubeflow backends: PyTorchJobs (Training Operator) and TrainJobs (Trainer v2, JobSet);
    # and Kueue, which admits only jobs labelled with a queue (the others run at once)
    with ControlPlane(tmp_path_factory.mktemp("cluster"), training_operator=operator,
                      trainer_v2=True, kueue=True) as cp:
        yield cp


@pytest.fixture(scope="session")
def installed(control_plane: ControlPlane,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The chart installed (with the CRD), a node, a bucket: the README's cluster steps."""
    with build_stack(control_plane, tmp_path_factory.mktemp("stack")) as world:
        yield world


@pytest.fixture
def stack(installed: Stack) -> Iterator[Stack]:
    """The stack, and after each test none of its runs left training: a failed scenario must
    not slow the next one down on two cores."""
    yield installed
    for run in installed.get("codistillations") or []:
        installed.kubectl("delete", "codistillation", run["metadata"]["name"], "-n", NAMESPACE,
                          "--wait=false", "--ignore-not-found")  # may be going already
    wait_for(lambda: not installed.get("pods"), "every trainer pod gone", timeout=120)
