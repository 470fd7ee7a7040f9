"""The status loop: every run's status refreshed from its jobs and bucket, on a timer.

Progress files change without any Kubernetes event, hence a timer. Runs are refreshed
concurrently, at most `refresh_concurrency` at once, each at most once at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time

from .. import metrics
from ..runtime import State
from . import write

log = logging.getLogger(__name__)


class Refreshes:
    """The status refreshes in flight, one per run at most, and since when."""

    def __init__(self, concurrency: int):
        self.started: dict[tuple[str, str], float] = {}
        self.tasks: set[asyncio.Task] = set()
        # Their own threads: kopf's handlers and asyncio's default pool are not held up by them.
        self.pool = concurrent.futures.ThreadPoolExecutor(concurrency, "status")

    def start(self, state: State, key: tuple[str, str]) -> None:
        """Refresh `key` unless its last refresh is still running (it is then skipped, not
        queued: a run whose bucket or API hangs never holds the status of the others)."""
        if key in self.started:
            return
        self.started[key] = time.monotonic()
        task = asyncio.create_task(self._run(state, key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, state: State, key: tuple[str, str]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.pool, refresh, state, *key)
        finally:
            del self.started[key]

    def oldest(self) -> float:
        """Seconds the oldest refresh in flight has been running (0: none)."""
        now = time.monotonic()
        return now - min(self.started.values(), default=now)


async def run(state: State, refreshes: Refreshes, stopping: asyncio.Event) -> None:
    """Every `status_interval`: re-observe every run (progress files change without events)."""
    while not stopping.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), state.config.status_interval)
        for key, phase in list(state.runs.items()):
            if phase != "Invalid" and not stopping.is_set():  # invalid: no jobs to observe
                refreshes.start(state, key)
        metrics.count_phases(list(state.runs.values()))
    await asyncio.gather(*refreshes.tasks)  # their threads cannot be cancelled
    refreshes.pool.shutdown()


def refresh(state: State, namespace: str, name: str) -> None:
    """Refresh one run's status; a failure is logged, never raised."""
    try:
        metrics.measure("status", lambda: write.refresh(state, namespace, name))
    except Exception:  # one run's trouble must not stop the others' status
        log.exception("status of %s/%s not refreshed", namespace, name)
