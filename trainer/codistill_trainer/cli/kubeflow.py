"""What the Kubeflow Training Operator (v1.9) does with a PyTorchJob, for running one without a
cluster: list its replicas and give each the environment the real controller injects.

Knows nothing about codistill, only the PyTorchJob contract (docs/architecture.md, "Kubeflow
PyTorchJob"): the local launcher and the end-to-end harness both run PyTorchJobs through it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codistill.names import CONTAINER

REPLICA_TYPES = ("Master", "Worker")
SecretLookup = Callable[[str, str], str]  # (secret name, key) -> value


@dataclass(frozen=True)
class Pod:
    """One replica of a PyTorchJob: the `pytorch` container's command and full environment."""

    job: str
    rtype: str
    index: int
    command: list[str]
    env: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.job}-{self.rtype.lower()}-{self.index}"


def nodes(job: dict[str, Any]) -> int:
    return sum(s.get("replicas", 1) for s in job["spec"]["pytorchReplicaSpecs"].values())


def injected_env(job: dict[str, Any], rtype: str, index: int, addr: str, port: int) -> dict[str, str]:
    """The controller's variables: WORLD_SIZE counts processes (nodes x nprocPerNode), RANK is
    the node's rank (0 for the Master, index + 1 for Workers); torchrun reads the PET_* ones."""
    nproc = job["spec"].get("nprocPerNode", "1")
    nproc_int = int(nproc) if str(nproc).isdigit() else 1
    rank = 0 if rtype == "Master" else index + 1
    return {
        "MASTER_ADDR": addr, "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nodes(job) * nproc_int), "RANK": str(rank),
        "PET_MASTER_ADDR": addr, "PET_MASTER_PORT": str(port),
        "PET_NNODES": str(nodes(job)), "PET_NODE_RANK": str(rank),
        "PET_NPROC_PER_NODE": str(nproc), "PYTHONUNBUFFERED": "1",
    }


def container_env(container: dict[str, Any], secret: SecretLookup) -> dict[str, str]:
    """The container's own env, with `secretKeyRef`s resolved through `secret`."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif ref := var.get("valueFrom", {}).get("secretKeyRef"):
            env[var["name"]] = secret(ref["name"], ref["key"])
    return env


def pods(job: dict[str, Any], secret: SecretLookup, addr: str, port: int) -> list[Pod]:
    """Every replica of `job`, Master first. `python` in a command is this interpreter."""
    found = []
    specs = job["spec"]["pytorchReplicaSpecs"]
    for rtype in REPLICA_TYPES:
        spec = specs.get(rtype)
        for i in range(spec.get("replicas", 1) if spec else 0):
            container = next(c for c in spec["template"]["spec"]["containers"]
                             if c["name"] == CONTAINER)
            command = list(container.get("command", [])) + list(container.get("args", []))
            if command and command[0] == "python":
                command[0] = sys.executable
            env = {**container_env(container, secret), **injected_env(job, rtype, i, addr, port)}
            found.append(Pod(job["metadata"]["name"], rtype, i, command, env))
    return found
