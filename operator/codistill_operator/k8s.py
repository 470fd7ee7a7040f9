"""The few Kubernetes calls the operator makes, over the official (synchronous) client.

Exactly the verbs the chart's RBAC grants: codistillations get/patch (+ status), pytorchjobs and
trainjobs get/list/create/patch/delete, pods list, secrets get, events create; and the OpenAPI
document of Trainer v2's API group, which every authenticated client may read. kopf runs sync handlers in worker
threads, and the status loop calls in via `asyncio.to_thread`, so blocking calls are fine here.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from codistill import names
from codistill.names import API_GROUP, API_VERSION, KIND, PLURAL

from .backends import TRAINER_SCHEMA, JobKind
from .names import COMPONENT

JSON_PATCH = "application/json-patch+json"
T = TypeVar("T")


def or_none(call: Callable[[], T]) -> T | None:
    """The call's result, or None when the API answers 404 (the object does not exist)."""
    try:
        return call()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def connect() -> kubernetes.client.ApiClient:
    """In a pod: the service account; elsewhere: $KUBECONFIG (read now, not at import time)."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=config
        )
    return kubernetes.client.ApiClient(config)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """Every call has a (connect, read) timeout: without one, a connection the network dropped
    silently (a control-plane failover, a load balancer's idle cut) blocks its thread forever."""

    def __init__(self, client: kubernetes.client.ApiClient, timeout: float = 30.0):
        self.custom = kubernetes.client.CustomObjectsApi(client)
        self.core = kubernetes.client.CoreV1Api(client)
        self.instance = socket.gethostname()
        self._timeout = {"_request_timeout": (min(10.0, timeout), timeout)}

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        return or_none(lambda: self.custom.get_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, name, **self._timeout
        ))

    def patch_status(self, namespace: str, name: str, patch: dict[str, Any],
                     resource_version: str | None = None) -> None:
        """Merge-patch the status; with `resource_version`, only that version of the run (409
        Conflict otherwise: it changed, or was deleted and created again, since it was read)."""
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, PLURAL, name, body, **self._timeout
        )

    def list_jobs(self, kind: JobKind, namespace: str, run: dict[str, Any]) -> list[dict[str, Any]]:
        """The jobs of `kind` this run owns (by ownerReference uid, not only by label)."""
        name, uid = run["metadata"]["name"], run["metadata"].get("uid")
        found = self.custom.list_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural,
            label_selector=f"{names.LABEL_RUN}={name}", **self._timeout,
        )
        return [job for job in found.get("items", []) if owner_uid(job) == uid]

    def list_pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        """The pods of a run's jobs (they carry its label), as plain dicts."""
        found = self.core.list_namespaced_pod(
            namespace, label_selector=f"{names.LABEL_RUN}={run}", **self._timeout
        )
        return self.core.api_client.sanitize_for_serialization(found).get("items", [])

    def get_job(self, kind: JobKind, namespace: str, name: str) -> dict[str, Any] | None:
        return or_none(lambda: self.custom.get_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name, **self._timeout
        ))

    def create_job(self, kind: JobKind, namespace: str, job: dict[str, Any],
                   dry_run: bool = False) -> bool:
        """Create; False when a job of that name already exists (a re-delivered event).

        `dry_run`: the API server (schema, webhooks, admission) judges it and stores nothing."""
        extra = {"dry_run": "All"} if dry_run else {}
        try:
            self.custom.create_namespaced_custom_object(
                kind.group, kind.version, namespace, kind.plural, job, **extra, **self._timeout
            )
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def patch_job(self, kind: JobKind, namespace: str, name: str,
                  ops: list[dict[str, Any]]) -> None:
        self.custom.patch_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name, ops,
            _content_type=JSON_PATCH, **self._timeout,
        )

    def delete_job(self, kind: JobKind, namespace: str, name: str) -> None:
        """As `kind` says (JobKind.propagation); callers wait for the pods to be gone."""
        or_none(lambda: self.custom.delete_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name,
            propagation_policy=kind.propagation, **self._timeout,
        ))

    def trainer_schema(self) -> dict[str, Any] | None:
        """The OpenAPI v3 document of trainer.kubeflow.org/v1alpha1; None when not served."""
        client = self.core.api_client
        request = client.param_serialize("GET", TRAINER_SCHEMA, auth_settings=["BearerToken"],
                                         header_params={"Accept": "application/json"})
        response = client.call_api(*request, **self._timeout)
        response.read()
        if response.status == 404:
            return None
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(response.data)

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded; None when it does not exist. Never logged."""
        secret = or_none(lambda: self.core.read_namespaced_secret(name, namespace, **self._timeout))
        if secret is None:
            return None
        data = secret.data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def post_event(self, run: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on the run, shown by `kubectl describe`."""
        meta, stamp = run["metadata"], now()
        self.core.create_namespaced_event(meta["namespace"], {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": f"{API_GROUP}/operator",
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }, **self._timeout)


def api_message(error: ApiException) -> str:
    """The API server's own message (it names the field), else the HTTP reason."""
    try:
        return str(json.loads(error.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(error.reason)


def owner_uid(obj: dict[str, Any]) -> str | None:
    """The uid of the controller that owns `obj`, if any."""
    refs = obj.get("metadata", {}).get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)
