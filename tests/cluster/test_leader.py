"""One operator acts at a time: the leader Lease against the real API server (row 17).

The protocol as client-go's: renewals keep the Lease, a holder that stops renewing (a crash, a
partitioned node) loses it after its duration, a clean stop hands it over at once, and an
instance that finds its Lease taken stops acting.
"""

from __future__ import annotations

import threading
import time

import kubernetes

from cluster.controlplane import ControlPlane
from codistill_operator.leader import Leader


def leaders(cp: ControlPlane, lease: str) -> tuple[Leader, Leader]:
    api = kubernetes.client.CoordinationV1Api(
        kubernetes.config.new_client_from_config(str(cp.kubeconfig)))
    return tuple(Leader(api, "default", who, name=lease, duration=2, renew_every=0.3)
                 for who in ("a", "b"))


def wait_until_acquired(leader: Leader, timeout: float) -> float:
    start = time.monotonic()
    while leader.try_acquire() is not None:
        assert time.monotonic() - start < timeout, "the Lease was never taken over"
        time.sleep(0.2)
    return time.monotonic() - start


def test_a_renewed_lease_is_kept_and_a_dead_holders_is_taken_over(
        control_plane: ControlPlane) -> None:
    a, b = leaders(control_plane, "crash")
    assert a.try_acquire() is None and b.try_acquire() == "a"
    done, lost = threading.Event(), threading.Event()
    a.keep(on_lost=lost.set, stop=done)
    time.sleep(3)  # past the duration: renewals alone keep it
    assert b.try_acquire() == "a" and not lost.is_set()
    done.set()  # a crashes: no more renewals, no release
    waited = wait_until_acquired(b, timeout=10)
    assert 1.5 < waited  # only once the record stood still for the lease's duration
    stale, lost = threading.Event(), threading.Event()
    a.keep(on_lost=lost.set, stop=stale)  # a comes back, still thinking it leads
    assert lost.wait(3), "a went on acting after b took its Lease"
    stale.set()


def test_a_released_lease_passes_at_once(control_plane: ControlPlane) -> None:
    a, b = leaders(control_plane, "handover")
    assert a.try_acquire() is None and b.try_acquire() == "a"
    a.release()
    assert b.try_acquire() is None and a.try_acquire() == "b"
    lease = b.api.read_namespaced_lease("handover", "default")
    assert lease.spec.holder_identity == "b" and lease.spec.lease_transitions == 1
