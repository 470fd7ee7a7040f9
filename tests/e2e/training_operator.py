"""A stand-in for the Kubeflow Training Operator, for end-to-end runs without a cluster.

It plays the real controller's part and nothing more: it watches PyTorchJobs through the
Kubernetes API, starts each replica's `pytorch` container command as a local process with the
environment the Training Operator injects (see codistill_trainer/cli/kubeflow.py, which holds only the
PyTorchJob contract) plus the pod template's env and `secretKeyRef` values read from the API, and
writes the job's status conditions as the controller does: Created, Running, Restarting on a
non-zero exit while `runPolicy.backoffLimit` allows, then Succeeded or Failed. A suspended job is
not started (or is stopped). It knows nothing about codistill beyond the PyTorchJob contract.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client

from codistill import names
from codistill.net import free_port
from codistill_trainer.cli import kubeflow

log = logging.getLogger("training-operator")
GROUP, VERSION, PLURAL = names.KUBEFLOW_GROUP, names.KUBEFLOW_VERSION, names.PYTORCHJOB_PLURAL


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Job:
    """One PyTorchJob being run: its processes and how often it was restarted."""

    namespace: str
    name: str
    uid: str
    body: dict[str, Any]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    restarts: int = 0
    done: bool = False
    conditions: list[dict[str, Any]] = field(default_factory=list)


class TrainingOperator:
    """Run PyTorchJobs found through `api_client` as local processes, until `stop()`."""

    def __init__(self, api_client: client.ApiClient, logs: Path, interval: float = 0.3):
        self.jobs_api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.logs, self.interval = logs, interval
        self.jobs: dict[str, Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-operator", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> TrainingOperator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for job in self.jobs.values():
            self._kill(job)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # a transient API error must not end the controller
                log.exception("reconcile failed")
            self._stop.wait(self.interval)

    # -- the controller --------------------------------------------------------------------
    def reconcile(self) -> None:
        listed = self.jobs_api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
        seen = set()
        for body in listed:
            uid = body["metadata"]["uid"]
            seen.add(uid)
            job = self.jobs.get(uid)
            if job is None:
                job = self.jobs[uid] = Job(body["metadata"]["namespace"], body["metadata"]["name"],
                                           uid, body)
                self._condition(job, "Created", "PyTorchJobCreated", "PyTorchJob is created.")
            job.body = body
            self._drive(job)
        for uid in set(self.jobs) - seen:  # deleted: its pods go with it
            self._kill(self.jobs.pop(uid))

    def _drive(self, job: Job) -> None:
        if job.done:
            return
        if job.body["spec"].get("runPolicy", {}).get("suspend"):
            if job.procs:
                self._kill(job)
                self._condition(job, "Suspended", "PyTorchJobSuspended", "PyTorchJob suspended.")
            return
        if not job.procs:
            self._start(job)
            self._condition(job, "Running", "PyTorchJobRunning", "PyTorchJob is running.")
            return
        codes = [p.poll() for p in job.procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            self._fail_or_restart(job, failed[0])
        elif all(c == 0 for c in codes):
            job.done = True
            self._condition(job, "Succeeded", "PyTorchJobSucceeded", "PyTorchJob succeeded.",
                            running=False)

    def _fail_or_restart(self, job: Job, code: int) -> None:
        """A replica failed: the others lose their collectives too, so the group restarts."""
        self._kill(job)
        limit = job.body["spec"].get("runPolicy", {}).get("backoffLimit")
        if limit is not None and job.restarts >= limit:
            job.done = True
            self._condition(job, "Failed", "PyTorchJobFailed",
                            f"a replica exited with code {code}; backoffLimit {limit} reached",
                            running=False)
            return
        job.restarts += 1
        self._condition(job, "Restarting", "PyTorchJobRestarting",
                        f"a replica exited with code {code}; restarting")
        self._start(job)
        self._condition(job, "Running", "PyTorchJobRunning", "PyTorchJob is running.")

    def _start(self, job: Job) -> None:
        pods = kubeflow.pods(job.body, lambda n, k: self._secret(job.namespace, n, k),
                             "127.0.0.1", free_port())
        self.logs.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        for pod in pods:
            with (self.logs / f"{pod.name}.log").open("ab") as out:
                job.procs.append(subprocess.Popen(
                    pod.command, env={**base, "OMP_NUM_THREADS": "1", **pod.env}, stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))

    def _kill(self, job: Job) -> None:
        for proc in job.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        job.procs = []

    def _secret(self, namespace: str, name: str, key: str) -> str:
        data = self.core.read_namespaced_secret(name, namespace).data or {}
        return base64.b64decode(data[key]).decode()

    def _condition(self, job: Job, kind: str, reason: str, message: str,
                   running: bool = True) -> None:
        """Append a condition as the controller does; a finished job's Running turns False."""
        for cond in job.conditions:
            if cond["type"] == kind or (not running and cond["type"] == "Running"):
                cond["status"] = "False"
        job.conditions.append({"type": kind, "status": "True", "reason": reason,
                               "message": message, "lastUpdateTime": _now(),
                               "lastTransitionTime": _now()})
        specs = job.body["spec"]["pytorchReplicaSpecs"]
        alive = sum(p.poll() is None for p in job.procs)
        status = {"conditions": job.conditions,
                  "replicaStatuses": {t: {"active": alive and s.get("replicas", 1)}
                                      for t, s in specs.items()},
                  "startTime": job.conditions[0]["lastTransitionTime"]}
        if not running:
            status["completionTime"] = _now()
        try:
            self.jobs_api.patch_namespaced_custom_object_status(
                GROUP, VERSION, job.namespace, PLURAL, job.name, {"status": status})
        except client.ApiException as e:
            if e.status != 404:  # deleted meanwhile
                raise
