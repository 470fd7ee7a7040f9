"""A full disk under a local run: its bucket is a folder on a small tmpfs, filled to the last
byte mid-run and freed a few seconds later.

Training must go on through it, every write that failed must be written again once there is room
(the final teacher, state and final.json included), no temporary file may be left behind to keep
the disk full (D10), and `codistill status` must show the groups' progress getting old.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from codistill.storage import TMP_MARK
from tests.support.faultlog import FaultLog
from tests.support.faultrun import FaultRun

pytestmark = [pytest.mark.faults, pytest.mark.slow]
STEPS, CHECKPOINT = 1200, 50
FULL_S = 6.0
SIZE = "16m"  # room for the run folder (about 1 MB) and more


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path) -> Path:
    """Write until the filesystem has no byte left; returns the filler file."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 1):  # then the last partial block
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_delays_writes_and_loses_none(small_disk: Path, tmp_path: Path,
                                                  fault_log: FaultLog) -> None:
    run = FaultRun(tmp_path, "full", STEPS, CHECKPOINT, storage={"url": small_disk.as_uri()})
    run.start()
    run.wait_step(0, 200)
    filler = fill(small_disk)
    full_at = run.step(0)
    time.sleep(FULL_S)
    shown = subprocess.run([sys.executable, "-m", "codistill_trainer", "status", run.url],
                           capture_output=True, text=True, timeout=60).stdout
    stuck = run.step(0)
    filler.unlink()
    assert run.wait() == 0, run.output()[-3000:]
    assert stuck <= full_at + 10, (full_at, stuck)  # no progress could be written meanwhile
    age = re.search(r"^\s*0\s+training\s+\S+\s+\S+%\s+(\d+)s\s", shown, re.M)
    assert age and int(age[1]) >= FULL_S - 1, shown  # the age column shows the stuck writer
    for g in (0, 1):
        assert run.progress(g).resumed_from is None
        assert run.pointer_step(g, "teacher") == run.pointer_step(g, "state") == STEPS
    assert [p.name for p in small_disk.rglob(f"*{TMP_MARK}*")] == []
    run.final_models_reported()
    fault_log(f"disk full for {FULL_S:.0f} s (tmpfs)", 1, 0,
              "training went on, every failed write landed later, no temporary file left")
