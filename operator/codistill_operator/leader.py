"""One active operator at a time: a Lease (coordination.k8s.io) in the operator's namespace.

The same protocol as client-go's leader election: the holder renews the Lease every few seconds;
another instance takes it over only once the record has not changed for `leaseDurationSeconds`
by its own clock (so clocks that disagree do not matter). A second replica, or a second release
in the same namespace, waits as a standby instead of acting on the same runs; an instance that
cannot renew in time stops (a partitioned node's pod is then no longer the leader), and one that
stops cleanly releases the Lease so a standby takes over at once.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable

import kubernetes
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
LEASE = "codistill-operator"


def identity() -> str:
    """Unique per process: the pod name alone repeats when a pod restarts in place."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Leader:
    def __init__(self, api: kubernetes.client.CoordinationV1Api, namespace: str,
                 holder: str | None = None, *, name: str = LEASE, duration: int = 15,
                 renew_every: float = 5.0, timeout: float = 10.0):
        self.api, self.namespace, self.name = api, namespace, name
        self.holder = holder or identity()
        self.duration, self.renew_every = duration, renew_every
        self._timeout = {"_request_timeout": (timeout, timeout)}
        self._seen: tuple[str | None, str | None] = (None, None)  # (holder, resourceVersion)
        self._seen_at = time.monotonic()

    def _read(self) -> kubernetes.client.V1Lease | None:
        try:
            return self.api.read_namespaced_lease(self.name, self.namespace, **self._timeout)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _expired(self, lease: kubernetes.client.V1Lease) -> bool:
        """Whether the record stood still for its whole duration, timed by our own clock."""
        seen = (lease.spec.holder_identity, lease.metadata.resource_version)
        if seen != self._seen:
            self._seen, self._seen_at = seen, time.monotonic()
        duration = lease.spec.lease_duration_seconds or self.duration
        return time.monotonic() - self._seen_at > duration

    def _write(self, lease: kubernetes.client.V1Lease | None) -> bool:
        """Make us the holder, or renew; False when another instance wrote first (409)."""
        now = _now()
        try:
            if lease is None:
                spec = kubernetes.client.V1LeaseSpec(
                    holder_identity=self.holder, lease_duration_seconds=self.duration,
                    acquire_time=now, renew_time=now, lease_transitions=0)
                body = kubernetes.client.V1Lease(metadata=kubernetes.client.V1ObjectMeta(
                    name=self.name, namespace=self.namespace), spec=spec)
                self.api.create_namespaced_lease(self.namespace, body, **self._timeout)
                return True
            spec = lease.spec
            if spec.holder_identity != self.holder:  # a takeover, counted as client-go does
                spec.acquire_time, spec.holder_identity = now, self.holder
                spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.renew_time, spec.lease_duration_seconds = now, self.duration
            # lease.metadata.resourceVersion makes this fail (409) if anyone wrote since our read
            self.api.replace_namespaced_lease(self.name, self.namespace, lease, **self._timeout)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def try_acquire(self) -> str | None:
        """Take or renew the Lease; None when we hold it, else who does."""
        lease = self._read()
        current = lease.spec.holder_identity if lease else None
        free = lease is None or current in (None, "", self.holder) or self._expired(lease)
        if free and self._write(lease):
            return None
        return current if current not in (None, "", self.holder) else "another instance"

    def acquire(self, retry_every: float = 2.0) -> None:
        """Wait, as a standby, until this instance holds the Lease."""
        waiting_on = None
        while True:
            try:
                holder = self.try_acquire()
            except (ApiException, OSError) as e:  # the API is unreachable: keep trying
                holder = f"unknown ({type(e).__name__})"
            if holder is None:
                log.info("leading: holding the lease %s/%s as %s", self.namespace, self.name,
                         self.holder)
                return
            if holder != waiting_on:
                log.info("standby: the lease %s/%s is held by %s", self.namespace, self.name,
                         holder)
                waiting_on = holder
            time.sleep(retry_every)

    def keep(self, on_lost: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Renew in a thread until `stop`; `on_lost()` once renewing failed for too long or
        another instance took the Lease (it must then stop acting on runs)."""
        deadline = self.duration * 2 / 3  # client-go's renew deadline: before others may take it

        def renew() -> None:
            last = time.monotonic()
            while not stop.wait(self.renew_every):
                try:
                    holder = self.try_acquire()
                except (ApiException, OSError) as e:  # unreachable: fine for a while
                    if time.monotonic() - last <= deadline:
                        continue
                    holder = f"unknown, not renewed for {deadline:.0f} s ({type(e).__name__})"
                if holder is None:
                    last = time.monotonic()
                    continue
                log.error("lost the lease %s/%s (holder: %s); stopping", self.namespace,
                          self.name, holder)
                on_lost()
                return

        thread = threading.Thread(target=renew, name="leader-lease", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Give the Lease up (a standby then takes over at once); best effort."""
        try:
            lease = self._read()
            if lease is None or lease.spec.holder_identity != self.holder:
                return
            lease.spec.holder_identity, lease.spec.lease_duration_seconds = None, 1
            self.api.replace_namespaced_lease(self.name, self.namespace, lease, **self._timeout)
        except (ApiException, OSError) as e:
            log.warning("lease %s/%s not released: %s", self.namespace, self.name, e)
