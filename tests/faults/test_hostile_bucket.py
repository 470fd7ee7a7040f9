"""Corrupt and hostile objects in the bucket, under a running group and at its resume.

Nothing read from a shared bucket is trusted: a peer's channel rewritten with garbage, paths,
lies about sizes and steps, and well-formed weights that are NaN, of the wrong dtype or the wrong
shape must never become a teacher, and must never stop the group; a group's own torn pointer and
garbage newest state cost it at most those blobs, never its progress.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from codistill import failpoints, names
from tests.support.faultlog import FaultLog
from tests.support.faultrun import FaultRun
from tests.support.kube import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.slow]
STEPS, CHECKPOINT = 1500, 50
ATTACK_S = 6.0
# Steps of the hostile pointers: in range, but never a step the peer publishes (every 10).
NAN, FLOAT64, RESHAPED, SIZE_LIE = 1231, 1233, 1237, 1239
HOSTILE_STEPS = {NAN, FLOAT64, RESHAPED, SIZE_LIE, 10**19, 10**15}


def pointer(step: int, key: str, data: bytes) -> dict:
    return {"step": step, "key": key, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "time": time.time(), "previous": []}


def committed(channel: Path) -> tuple[str, bytes]:
    """The name and bytes of the blob the channel's pointer names. The group goes on publishing
    and pruning meanwhile (every 10 steps): a blob pruned between the two reads is read again
    from the next pointer."""
    def read() -> tuple[str, bytes] | None:
        try:
            key = json.loads((channel / names.POINTER).read_text())["key"]
            return key, (channel / key).read_bytes()
        except (FileNotFoundError, ValueError):  # pruned, or the pointer mid-rename
            return None

    return wait_for(read, f"a committed blob in {channel}", 30)


def hostile_objects(channel: Path, own: Path) -> list[Callable[[], None]]:
    """Writers of one hostile object each into the peer's teacher `channel`, built from a real
    blob there (so sha256 and sizes are right and only the hostile part is wrong); `own` is the
    attacked group's own teacher channel, which a path in a pointer must never reach."""
    real = committed(channel)[1]
    weights = st_load(real)
    latest = channel / names.POINTER

    def blob(step: int, tensors: dict[str, torch.Tensor]) -> Callable[[], None]:
        data = st_save(tensors)
        (channel / f"{step}.safetensors").write_bytes(data)
        return lambda: latest.write_text(json.dumps(pointer(step, f"{step}.safetensors", data)))

    mine, mine_bytes = committed(own)
    first, *_ = weights
    writers = [
        blob(NAN, {k: torch.full_like(v, math.nan) for k, v in weights.items()}),
        blob(FLOAT64, {k: v.double() for k, v in weights.items()}),
        blob(RESHAPED, {**weights, first: weights[first].reshape(-1)[:-1].clone()}),
    ]
    (channel / f"{SIZE_LIE}.safetensors").write_bytes(real + b"\0" * 2**20)
    lie = pointer(SIZE_LIE, f"{SIZE_LIE}.safetensors", real)  # says the size of `real`
    traversal = pointer(10, f"../../0/teacher/{mine}", mine_bytes)
    for doc in (lie, traversal, pointer(10**19, "10.safetensors", real),
                pointer(10**15, "10.safetensors", real), {**pointer(10, "10.safetensors", real),
                                                          "previous": 5}):
        writers.append(lambda doc=doc: latest.write_text(json.dumps(doc)))
    for text in ("{torn", "[1, 2]", "\0" * 64, json.dumps({"step": 10})):
        writers.append(lambda text=text: latest.write_text(text))
    return writers


def test_a_hostile_peer_channel_never_becomes_a_teacher(
        tmp_path: Path, fault_log: FaultLog) -> None:
    run = FaultRun(tmp_path, "hostile", STEPS, CHECKPOINT)
    root = Path(run.bucket.root)
    peer, own = root / names.teacher_dir(1), root / names.teacher_dir(0)
    run.start()
    run.wait_step(0, 200)
    writers = hostile_objects(peer, own)
    teachers, warnings, stop = set(), set(), threading.Event()

    def attack() -> None:
        while not stop.is_set():
            for write in writers:
                write()
                time.sleep(0.02)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    deadline = time.monotonic() + ATTACK_S
    while time.monotonic() < deadline:
        p = run.progress(0)
        if p is not None:
            teachers.update(p.teachers.values())
            warnings.update(p.warnings)
        time.sleep(0.05)
    stop.set()
    attacker.join()
    assert run.wait() == 0, run.output()[-3000:]  # never a crash (D8: NaN teacher weights)
    assert not teachers & HOSTILE_STEPS, teachers
    assert all(step % 10 == 0 for step in teachers), teachers  # only what the peer published
    refused = " ".join(warnings)
    assert "keeping last good teacher" in refused, warnings
    run.final_models_reported()
    fault_log("hostile peer channel for 6 s", len(writers), 0,
              f"{len(warnings)} distinct refusals shown, none loaded, no crash")


def test_a_torn_state_pointer_and_a_garbage_newest_state_cost_only_those(
        tmp_path: Path, fault_log: FaultLog) -> None:
    """Killed as state 300 was written but not committed; then its pointer is torn and the
    uncommitted 300 blob overwritten with garbage: the rerun resumes from 250, the newest state
    that verifies, never from step 0, and keeps the older states until a new one commits (D4)."""
    run = FaultRun(tmp_path, "torn", STEPS, CHECKPOINT)
    state = Path(run.bucket.root) / names.state_dir(0)
    run.start(CODISTILL_FAILPOINT=f"{failpoints.BEFORE_POINTER}:{names.state_dir(0)}/300.pt")
    assert run.wait() == 1, run.output()[-3000:]
    seen = run.step(0)
    pointer_file = state / names.POINTER
    pointer_file.write_bytes(pointer_file.read_bytes()[:20])  # torn
    blob = state / "300.pt"
    blob.write_bytes(b"\x80garbage" * (blob.stat().st_size // 8))
    run.start()
    resumed = wait_for(lambda: (p := run.progress(0)) and p.resumed_from is not None and p,
                       "the rerun's first progress", timeout=120)
    assert resumed.resumed_from == 250
    assert run.wait() == 0, run.output()[-3000:]
    run.final_models_reported()
    fault_log("torn state pointer + garbage newest state", 2, seen - 250,
              "resumed from the newest state that verifies (250), not step 0")
