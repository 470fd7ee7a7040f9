"""A background worker that keeps bucket writes off the training thread.

Publishing a teacher, saving state and writing progress only need the *latest* version of each:
a job submitted under a name replaces one still waiting under that name, so a slow bucket makes
the trainer skip intermediate versions instead of stalling or queueing without bound. A job
submitted with `retry` that fails is tried again, with backoff, until it lands or a newer one
under its name supersedes it: a failed state save must not widen what a kill can lose.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30.0


class Uploader:
    def __init__(self) -> None:
        self._pending: dict[str, Callable[[], None]] = {}
        self._retry: dict[str, int] = {}  # name -> failures so far, for jobs that retry
        self._not_before: dict[str, float] = {}  # name -> when its retry is due
        self._busy = False
        self._closed = False
        self._cv = threading.Condition()
        self.errors: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="codistill-uploader", daemon=True)
        self._thread.start()

    def submit(self, name: str, job: Callable[[], None], retry: bool = False) -> None:
        with self._cv:
            self._pending.pop(name, None)
            self._pending[name] = job  # re-insert: FIFO order by latest submission
            self._not_before.pop(name, None)
            if retry:
                self._retry[name] = 0
            else:
                self._retry.pop(name, None)
            self._cv.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run what is pending, then end the thread. Joining matters: a thread still freeing
        tensors while the interpreter shuts down aborts the whole process."""
        done = self.flush(timeout)
        with self._cv:
            self._closed = True
            self._pending.clear()  # after the timeout: what still waits for a retry is given up
            self._cv.notify_all()
        self._thread.join(timeout)
        return done

    def _next(self) -> tuple[str, Callable[[], None]] | None:
        """The oldest job that is due (under the lock); None when closed with nothing left."""
        while True:
            now = time.monotonic()
            due = [n for n in self._pending if self._not_before.get(n, 0.0) <= now]
            if due:
                self._busy = True
                return due[0], self._pending.pop(due[0])
            if self._closed and not self._pending:
                return None
            waits = [self._not_before[n] - now for n in self._pending]
            self._cv.wait(min(waits) if waits else None)

    def _run(self) -> None:
        while True:
            with self._cv:
                found = self._next()
            if found is None:
                return
            name, job = found
            try:
                job()
                self.errors.pop(name, None)
                failed = None
            except Exception as e:  # keep training; the error is reported in progress
                log.warning("background %s failed: %s", name, e)
                self.errors[name] = f"{type(e).__name__}: {e}"
                failed = job
            finally:
                del job  # free what it holds (weights) now, on this thread, under the GIL
                with self._cv:
                    self._busy = False
                    if failed is not None and name in self._retry and name not in self._pending:
                        self._retry[name] += 1  # again, unless a newer one superseded it
                        self._pending[name] = failed
                        self._not_before[name] = time.monotonic() + min(
                            2.0 ** (self._retry[name] - 1), MAX_BACKOFF_S)
                    failed = None
                    self._cv.notify_all()
