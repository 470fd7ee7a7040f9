"""kopf wiring: which events call what. Thin on purpose; the work is in reconcile, status/, cleanup.

`kopf run -m codistill_operator.handlers` loads this module; `python -m codistill_operator` too.
No kopf timers or daemons: those would put a finalizer on every run. The status loop is one
operator-wide task instead (status/loop.py), and the jobs (PyTorchJobs, TrainJobs) are only
watched (kopf writes nothing on them). A job kind whose CRD is not installed is not watched; kopf
starts watching it once the CRD appears (cluster-wide; namespaced, at the next start).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import kopf

from codistill import names
from codistill.names import API_GROUP, API_VERSION, KIND, PLURAL

from . import cleanup, metrics, reconcile
from .backends import KINDS
from .errors import Retry
from .names import COMPONENT, FINALIZER
from .runtime import State
from .settings import Config
from .status import loop

log = logging.getLogger(__name__)
RUNS = (API_GROUP, API_VERSION, PLURAL)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = memo.get("config") or Config.from_env()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = COMPONENT
    settings.posting.level = logging.WARNING  # our own events say what happened
    settings.scanning.disabled = not config.scanning
    # Timeouts on kopf's own calls; watches end every 5 minutes, so one a load balancer cut
    # silently is noticed and restarted.
    settings.networking.request_timeout = config.api_timeout
    settings.networking.connect_timeout = settings.watching.connect_timeout = 10.0
    settings.watching.server_timeout = 300  # an integer: the API server parses timeoutSeconds
    settings.watching.client_timeout = 330
    memo.state = State(config)
    memo.metrics = (metrics.serve(config.metrics_port, config.bind_address)
                    if config.metrics_port else None)
    memo.stopping = asyncio.Event()
    memo.refreshes = loop.Refreshes(config.refresh_concurrency)
    memo.loop = asyncio.create_task(loop.run(memo.state, memo.refreshes, memo.stopping))


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    memo.stopping.set()
    await memo.loop  # lets the refreshes in flight finish
    stop = memo.get("stop")
    if stop is not None:  # a signal stopped kopf: wake the thread kopf has waiting on this flag
        stop.set()
    if memo.metrics is not None:
        await asyncio.to_thread(memo.metrics.shutdown)
        memo.metrics.server_close()


def _retried(handler: str, work: Callable[[], str], delay: float) -> None:
    """Run one reconcile; every failure is retried after `delay` (kopf's default is a minute)."""
    try:
        metrics.measure(handler, work)
    except Retry as e:
        raise kopf.TemporaryError(str(e), delay=delay) from None
    except Exception as e:  # the API or the bucket failed mid-way: the next pass converges
        log.exception("%s failed", handler)
        raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=delay) from None


def _reconcile(state: State, namespace: str, name: str) -> None:
    with state.reconciling(namespace, name):
        _retried("reconcile", lambda: reconcile.reconcile(state, namespace, name),
                 state.config.retry_delay)


@kopf.on.resume(*RUNS)
@kopf.on.create(*RUNS)
@kopf.on.update(*RUNS, field="spec")
def reconcile_run(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    _reconcile(memo.state, namespace, name)


def _deletes_folder(spec: kopf.Spec, **_: Any) -> bool:
    return (spec.get("storage") or {}).get("onDelete") == "Delete"


@kopf.on.delete(*RUNS, when=_deletes_folder)
def delete_run(namespace: str, name: str, memo: kopf.Memo, retry: int, **_: Any) -> None:
    state: State = memo.state
    _retried("delete", lambda: cleanup.remove_folder(state, namespace, name, retry),
             state.config.delete_delay)


@kopf.on.event(*RUNS)
def track_run(type: str | None, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        memo.state.forget(namespace, name)
    else:
        memo.state.runs.setdefault((namespace, name), "Pending")


@kopf.on.event(*KINDS["pytorchjob"][:3], labels={names.LABEL_RUN: kopf.PRESENT})
@kopf.on.event(*KINDS["trainjob"][:3], labels={names.LABEL_RUN: kopf.PRESENT})
def job_changed(type: str | None, body: kopf.Body, namespace: str, memo: kopf.Memo,
                **_: Any) -> None:
    """A job's conditions changed: refresh its run; a job deleted by hand is recreated."""
    refs = body.get("metadata", {}).get("ownerReferences") or []
    owner = next((r["name"] for r in refs if r.get("kind") == KIND and r.get("controller")), None)
    if owner is None:
        return
    state: State = memo.state
    if type == "DELETED":
        _reconcile_until_done(state, namespace, owner)
    loop.refresh(state, namespace, owner)


def _reconcile_until_done(state: State, namespace: str, name: str) -> None:
    """Reconcile now, and again every retry delay until it passes (a job deleted while its
    group's pods are still going is created once they are gone). kopf retries only the
    handlers of the run itself, not those of its jobs' events: hence a timer, one per run."""
    try:
        _reconcile(state, namespace, name)
        return
    except kopf.TemporaryError as e:
        log.warning("run %s/%s not reconciled after a job deletion, trying again: %s",
                    namespace, name, e)
    if not state.retry_later(namespace, name):
        return  # a timer is already set for it
    timer = threading.Timer(state.config.retry_delay, _retry, (state, namespace, name))
    timer.daemon = True  # an operator that stops does not wait for it
    timer.start()


def _retry(state: State, namespace: str, name: str) -> None:
    state.retried(namespace, name)
    _reconcile_until_done(state, namespace, name)


@kopf.on.probe(id="runs")
def runs_probe(memo: kopf.Memo, **_: Any) -> int:
    return len(memo.state.runs)


@kopf.on.probe(id="oldestRefreshSeconds")
def refresh_probe(memo: kopf.Memo, **_: Any) -> float:
    """Fails liveness (kopf answers 500) once a refresh is stuck past its deadline."""
    oldest = memo.refreshes.oldest()
    if oldest > memo.state.config.refresh_deadline:
        raise RuntimeError(f"a status refresh has been running for {oldest:.0f} s")
    return round(oldest, 1)
