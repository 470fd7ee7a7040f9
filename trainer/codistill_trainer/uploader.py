"""A background worker that keeps bucket writes off the training thread.

Publishing a teacher, saving state and writing progress only need the *latest* version of each:
a job submitted under a name replaces one still waiting under that name, so a slow bucket makes
the trainer skip intermediate versions instead of stalling or queueing without bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Uploader:
    def __init__(self) -> None:
        self._pending: dict[str, Callable[[], None]] = {}
        self._busy = False
        self._closed = False
        self._cv = threading.Condition()
        self.errors: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="codistill-uploader", daemon=True)
        self._thread.start()

    def submit(self, name: str, job: Callable[[], None]) -> None:
        with self._cv:
            self._pending.pop(name, None)
            self._pending[name] = job  # re-insert: FIFO order by latest submission
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
            self._cv.notify_all()
        self._thread.join(timeout)
        return done

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed)
                if not self._pending:
                    return
                name = next(iter(self._pending))
                job = self._pending.pop(name)
                self._busy = True
            try:
                job()
                self.errors.pop(name, None)
            except Exception as e:  # keep training; the error is reported in progress
                log.warning("background %s failed: %s", name, e)
                self.errors[name] = f"{type(e).__name__}: {e}"
            finally:
                del job  # free what it holds (weights) now, on this thread, under the GIL
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
