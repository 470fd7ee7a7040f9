"""Prometheus metrics: reconciles, errors, reconcile latency and runs by phase."""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from .status.schema import Phase

RECONCILES = Counter(
    "codistill_reconciles_total", "Reconciles, by handler and outcome.", ["handler", "outcome"]
)
ERRORS = Counter("codistill_reconcile_errors_total", "Reconciles that raised.", ["handler"])
LATENCY = Histogram(
    "codistill_reconcile_duration_seconds", "Time one reconcile took.", ["handler"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RUNS = Gauge("codistill_runs", "Codistillation runs, by phase.", ["phase"])
PHASES: tuple[str, ...] = Phase.__args__


def measure(handler: str, work: Callable[[], str]) -> str:
    """Run one reconcile; count its outcome (what `work` returns) or its error, and time it."""
    start = time.perf_counter()
    try:
        outcome = work()
    except Exception:
        ERRORS.labels(handler).inc()
        raise
    finally:
        LATENCY.labels(handler).observe(time.perf_counter() - start)
    RECONCILES.labels(handler, outcome).inc()
    return outcome


def count_phases(phases: Iterable[str]) -> None:
    tally = Tally(phases)
    for phase in PHASES:
        RUNS.labels(phase).set(tally.get(phase, 0))


def serve(port: int, address: str = "0.0.0.0"):  # noqa: ANN201 - prometheus_client's server
    """Serve /metrics on `port` in a thread; returns the server so cleanup can shut it down."""
    server, _thread = start_http_server(port, addr=address)
    return server
