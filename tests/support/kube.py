"""A Kubernetes API server for tests: kmock's emulator plus what kopf and the client rely on.

kmock 0.8's `KubernetesEmulator` speaks the API over real HTTP but assigns no uid,
resourceVersion or generation, answers creates with 200, lists without a kind, streams watches
as octet-stream and replays every object on each watch, ignores generateName, answers a failed
JSON-patch `test` with 500, isolates nothing under /status and collects no garbage. `Emulator`
adds those, so kopf and the kubernetes client run against it unchanged. There are no
controllers: tests play the Training Operator's part by patching job status themselves.

The `cluster` fixture (conftest.py) serves it on its own event loop in a thread, and `Operator` runs kopf on
another, so synchronous tests drive both over HTTP (as kubectl would) without deadlocks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import itertools
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import dicts, enums

from codistill import names
from codistill.net import free_port

from . import tables
from .s3 import S3_KEY, S3_SECRET

RUNS = kmock.resource(names.API_GROUP, names.API_VERSION, names.PLURAL)
JOBS = kmock.resource(names.KUBEFLOW_GROUP, names.KUBEFLOW_VERSION, names.PYTORCHJOB_PLURAL)
SECRETS = kmock.resource("", "v1", "secrets")
PODS = kmock.resource("", "v1", "pods")
EVENTS = kmock.resource("", "v1", "events")
CRDS = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kmock.resource("", "v1", "namespaces")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    # Names whose next create is stored but answered 500: a response lost on the way back.
    lose_create_response: set[str] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Served before the stock watch (higher priority), with the JSON content type kubectl wants.
        (self.fallback ** 1)[enums.action.WATCH] << {
            "Content-Type": "application/json"
        } << self._serve_watch

    async def _handle(self, request: kmock.Request) -> Any:
        # kmock keeps every request for assertions and matches each new one against all of them,
        # which grows quadratic; these tests assert on objects, so keep only the current one.
        del self._requests[:-1]
        if request.action == enums.action.CREATE and request.params.get("dryRun") == "All":
            # judged and not stored, as the API server's dry run
            return aiohttp.web.json_response(request.data, status=201)
        if request.resource is not None and request.action == enums.action.CREATE:
            self._stamp_new(request)
        elif request.resource is not None and request.action == enums.action.UPDATE:
            self._stamp_update(request)
        response = await super()._handle(request)
        if request.action == enums.action.CREATE and response.status == 200:
            response.set_status(201)
            name = request.data["metadata"]["name"]
            if name in self.lose_create_response:
                self.lose_create_response.discard(name)
                return await self._render_error(kmock.KubernetesError(500, "Timeout", "lost"))
        if request.action in (enums.action.DELETE, enums.action.UPDATE):
            await self._collect_garbage()
        return response

    def _stamp_new(self, request: kmock.Request) -> None:
        if request.resource == SECRETS and isinstance(request.data, dict):
            _string_data(request.data)
        meta = request.data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if request.namespace:
            meta.setdefault("namespace", request.namespace)
        meta.update(
            uid=str(uuid.uuid4()), generation=1, resourceVersion=str(next(self._versions)),
            creationTimestamp=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )

    def _has_status(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _stamp_update(self, request: kmock.Request) -> None:
        """Status/spec isolation, then a new resourceVersion (and generation if spec changed)."""
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return
        old = self.objects[key].raw
        wanted = (request.data.get("metadata") or {}).get("resourceVersion") if isinstance(
            request.data, dict) else None
        if wanted and wanted != old["metadata"].get("resourceVersion"):  # a precondition
            raise kmock.KubernetesError(409, "Conflict", "the object has been modified")
        if self._has_status(request.resource):
            _isolate(request.data, status_only=request.subresource == "status")
        try:
            new = dicts.patch_dict(copy.deepcopy(old), request.data)
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            # A failed `test` op (optimistic concurrency) or a bad path: 422, as the API server.
            raise kmock.KubernetesError(422, "Invalid", str(e)) from None
        stamp = {"resourceVersion": str(next(self._versions))}
        if new.get("spec") != old.get("spec"):
            stamp["generation"] = old["metadata"].get("generation", 1) + 1
        if isinstance(request.data, list):
            request.data.extend(
                {"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in stamp.items()
            )
        else:
            request.data.setdefault("metadata", {}).update(stamp)

    async def _serve_version(self, request: kmock.Request) -> Any:
        """kmock names the core group's version "/v1"; kubectl maps kinds only with "v1"."""
        found = await super()._serve_version(request)
        if isinstance(found, dict) and found.get("groupVersion") == "/v1":
            found["groupVersion"] = "v1"
        return found

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        found = await super()._serve_fetch(request)
        if (request.resource == RUNS and isinstance(found, dict) and "metadata" in found
                and tables.wants_table(request.headers.get("Accept", ""))):
            return tables.table([found], tables.printer_columns())
        return found

    async def _serve_list(self, request: kmock.Request) -> Any:
        found = await super()._serve_list(request)
        if request.resource == RUNS and tables.wants_table(request.headers.get("Accept", "")):
            return tables.table(found["items"], tables.printer_columns())
        group, version = request.resource.group, request.resource.version
        info = self.resources[request.resource] if request.resource in self.resources else None
        kind = info.kind if info and info.kind else request.resource.plural.capitalize()
        return {
            "apiVersion": f"{group}/{version}" if group else version,
            "kind": f"{kind}List",
            **found,
            "metadata": {"resourceVersion": str(next(self._versions))},
        }

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """Watch from the list's resourceVersion: kmock replays every object as ADDED first,
        the API server only what changed since (kopf would act on stale replays)."""
        since = int(request.params.get("resourceVersion") or 0)
        async for event in super()._serve_watch(request):
            if isinstance(event, dict) and event.get("type") == "ADDED" and since:
                if int(event["object"]["metadata"].get("resourceVersion", 0)) <= since:
                    continue
            yield event

    async def _collect_garbage(self) -> None:
        """Kubernetes' garbage collector, instantly: delete what lost all its owners."""
        async with self._lock:
            live = {o.raw["metadata"].get("uid") for o in self.objects.values() if not o.deleted}
            for (resource, _, _), obj in list(self.objects.items()):
                refs = [] if obj.deleted else obj.raw["metadata"].get("ownerReferences") or []
                if refs and not any(r.get("uid") in live for r in refs):
                    raw = obj.raw
                    obj.delete()
                    await self._buses[resource].put({"type": "DELETED", "object": raw})


def _string_data(secret: dict[str, Any]) -> None:
    """A Secret's write-only `stringData` is merged into `data` (base64), as the API server does."""
    plain = secret.pop("stringData", None) or {}
    data = secret.setdefault("data", {})
    data.update({k: base64.b64encode(str(v).encode()).decode() for k, v in plain.items()})


def _isolate(patch: Any, status_only: bool) -> None:
    """The status subresource changes only status; the main resource never changes status."""
    if isinstance(patch, list):
        keep = [op for op in patch if op.get("path", "").startswith("/status") == status_only]
        patch[:] = keep
    elif isinstance(patch, dict):
        if status_only:
            status = patch.get("status")
            patch.clear()
            if status is not None:
                patch["status"] = status
        else:
            patch.pop("status", None)


def declare(emulator: Emulator) -> None:
    """The resources the operator uses, as the cluster's CRDs and core API would list them."""
    emulator.resources[RUNS] = kmock.ResourceInfo(
        kind="Codistillation", singular="codistillation", shortnames={"codist"},
        namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    emulator.resources[JOBS] = kmock.ResourceInfo(
        kind="PyTorchJob", singular="pytorchjob", namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    emulator.resources[SECRETS] = kmock.ResourceInfo(
        kind="Secret", singular="secret", namespaced=True, verbs={"get", "list", "create"},
    )
    emulator.resources[PODS] = kmock.ResourceInfo(  # none run: the operator only lists them
        kind="Pod", singular="pod", namespaced=True, verbs={"get", "list", "create", "delete"},
    )
    emulator.resources[EVENTS] = kmock.ResourceInfo(
        kind="Event", singular="event", namespaced=True, verbs={"get", "list", "create"},
    )
    # kopf waits for these in discovery before it watches anything. (kmock 0.8 cannot parse
    # /api/v1/namespaces itself, so operators under test watch cluster-wide, not namespaces.)
    emulator.resources[CRDS] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False,
        verbs={"get", "list", "watch"},
    )
    emulator.resources[NAMESPACES] = kmock.ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False, verbs={"get", "list", "watch"},
    )


def kubeconfig(url: str, path: Path) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
    }))
    return path


class Cluster:
    """The emulator on its own event loop in a thread, driven from synchronous tests over HTTP
    (so every change reaches kopf's watches as it would on a real cluster)."""

    def __init__(self, tmp: Path):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._stack = contextlib.AsyncExitStack()
        self.emulator = self.run(self._start())
        self.url = str(self._server.url).rstrip("/")
        self.kubeconfig = kubeconfig(self.url, tmp / "kubeconfig")

    async def _start(self) -> Emulator:
        emulator = await self._stack.enter_async_context(Emulator())
        self._server = await self._stack.enter_async_context(kmock.Server(emulator))
        declare(emulator)
        return emulator

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @staticmethod
    def path(resource: kmock.resource, namespace: str, name: str | None = None) -> str:
        base = f"/apis/{resource.group}/{resource.version}" if resource.group else "/api/v1"
        return f"{base}/namespaces/{namespace}/{resource.plural}" + (f"/{name}" if name else "")

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def create(self, resource: kmock.resource, body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        namespace = body.setdefault("metadata", {}).setdefault("namespace", "default")
        return self.request("POST", self.path(resource, namespace), body)

    def get(self, resource: kmock.resource, name: str, namespace: str = "default") -> Any:
        return self.request("GET", self.path(resource, namespace, name))

    def list(self, resource: kmock.resource, namespace: str = "default") -> list[dict[str, Any]]:
        return self.request("GET", self.path(resource, namespace))["items"]

    def patch(self, resource: kmock.resource, name: str, patch: dict[str, Any],
              namespace: str = "default", subresource: str = "") -> Any:
        path = self.path(resource, namespace, name) + (f"/{subresource}" if subresource else "")
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def delete(self, resource: kmock.resource, name: str, namespace: str = "default") -> Any:
        return self.request("DELETE", self.path(resource, namespace, name))

    def events(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return [e for e in self.list(EVENTS, namespace)
                if e.get("involvedObject", {}).get("name") == name]


def wait_for(probe: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll until `probe()` is truthy and return it: the operator works asynchronously. The
    deadline only keeps a broken run from hanging; nothing here asserts how fast it was."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}; last saw {value!r}")
        time.sleep(0.05)


class Operator:
    """kopf running the codistill handlers for real, on its own loop and thread (as in its own
    process: it must not take the API server's tasks for its own), until `stop()`.
    Its liveness probe and metrics are served on free ports (`liveness`, `metrics`)."""

    def __init__(self, **config: Any):
        import kopf

        from codistill_operator import handlers
        from codistill_operator.settings import Config

        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._stop = asyncio.Event()
        ready = asyncio.Event()
        memo = kopf.Memo(config=Config(**{**FAST, "metrics_port": self.metrics, **config}))
        self._future = asyncio.run_coroutine_threadsafe(kopf.operator(
            registry=kopf.get_default_registry(), standalone=True, clusterwide=True,
            stop_flag=self._stop, ready_flag=ready, memo=memo, liveness_endpoint=self.liveness,
        ), self.loop)
        assert handlers.RUNS  # the import above registered the handlers
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(ready.wait(), 30), self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._future.result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


SECRET = "s3-creds"
# Seconds, not the production minutes: a test waits for the operator's retries and refreshes.
FAST = dict(status_interval=0.2, retry_delay=0.3, delete_attempts=3, delete_delay=0.2,
            metrics_port=0)


def secret(name: str = SECRET, **data: str) -> dict[str, Any]:
    keys = data or {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}}


def manifest(name: str, endpoint: str, **spec: Any) -> dict[str, Any]:
    """A small valid run on the test bucket; keyword arguments replace top-level spec fields."""
    return {
        "apiVersion": "codistill.io/v1alpha1",
        "kind": "Codistillation",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "groups": 2,
            "workersPerGroup": 2,
            "task": {"name": "lm", "args": {"hidden": 32}},
            "training": {"steps": 100},
            "storage": {"url": "s3://codistill-test/runs", "endpoint": endpoint,
                        "credentialsSecret": SECRET},
            **spec,
        },
    }
