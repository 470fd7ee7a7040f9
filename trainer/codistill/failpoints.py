"""Failpoints: named places where the fault suite kills a trainer on purpose (as etcd's gofail
and FreeBSD's fail(9) do), to prove that a kill at the worst moment loses nothing.

Off unless $CODISTILL_FAILPOINT names one as `<point>:<key>`: the process that reaches that point
for that key kills itself with SIGKILL, as a lost machine would, with nothing cleaned up.
"""

from __future__ import annotations

import os
import signal

ENV = "CODISTILL_FAILPOINT"
BEFORE_RENAME = "before-rename"  # a local write is in its temporary file, not yet renamed
BEFORE_POINTER = "before-pointer"  # a channel's blob is written, its pointer not yet moved
BEFORE_FINAL = "before-final"  # a group's final teacher and state landed, final.json not written


def reach(point: str, key: str) -> None:
    if os.environ.get(ENV) == f"{point}:{key}":
        os.kill(os.getpid(), signal.SIGKILL)
