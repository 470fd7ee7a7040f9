"""The teachers: stale copies of the peer groups' models, tolerant of missing or broken ones.

On rank 0 of each group only, a background poller watches the teacher channels of the peers the
group will distill from (`Draw`: all of them, or `teachers: k` drawn once per reload period),
and fetches, verifies and decodes every new blob off the training thread. At a reload boundary rank 0
tells the other ranks which versions it holds and broadcasts their weights, and all ranks swap
them in together, so every rank of a group distills from the same teacher, and the bucket sees
one reader per group instead of one per rank (64 groups of 8 ranks polling every second would be
32,256 pointer reads a second, 6x what one S3 prefix serves; see BENCHMARKS.md). A peer that is missing, late, stale or corrupt is left out (or
keeps its last good version) and the reason is kept for progress and status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from codistill.storage import Bucket, StorageError

from . import dist, weights
from .exchange import CorruptCheckpoint, teacher_channel, weights_from_bytes
from .shards import generator
from .tasks.base import Batch, Task

log = logging.getLogger(__name__)
NONE = -1  # "no version" in the agreement tensor
INT64_MAX = 2**63 - 1  # the agreement tensor is int64: a larger step cannot even be all-reduced

# Pointer reads a second the whole run may make: half of what one S3 prefix serves (5,500 GET/s),
# the rest left to blob fetches, status and the operator. Every group's poller reads each peer's
# pointer it polls once per poll, so G groups polling P peers each read G x P pointers per poll
# interval (P = G - 1 with `teachers: all`, at most 2k with `teachers: k`).
POINTER_READS_PER_S = 2750


def poll_interval(asked: float, groups: int, polled: int) -> float:
    """pollIntervalSeconds, raised where the run's pointer reads would pass POINTER_READS_PER_S
    (with every peer polled: from 54 groups at the default 1 s; 128 groups poll every 5.9 s)."""
    return max(asked, groups * polled / POINTER_READS_PER_S)


# What a model's state_dict looks like: each entry's dtype and shape.
Layout = dict[str, tuple[torch.dtype, torch.Size]]


def layout(state: Mapping[str, torch.Tensor]) -> Layout:
    return {k: (v.dtype, v.shape) for k, v in state.items()}


def bad_weights(weights: Mapping[str, torch.Tensor], expected: Layout | None = None) -> str | None:
    """Why these teacher weights must not be used, or None when they may.

    `load_state_dict` silently casts (float64 or int8 into float32 parameters) and happily loads
    NaN/inf, which then makes the student's loss non-finite: both are refused here.
    """
    if expected is not None:
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or extra:
            return f"keys differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
        for k, (dtype, shape) in expected.items():
            if weights[k].dtype != dtype:
                return f"{k} is {weights[k].dtype}, the model's is {dtype}"
            if weights[k].shape != shape:
                return f"{k} has shape {tuple(weights[k].shape)}, the model's is {tuple(shape)}"
    for k, v in weights.items():
        if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
            return f"{k} has non-finite values (NaN/inf)"
    return None


@dataclass(frozen=True)
class Draw:
    """The peers a group distills from in each reload period: `all`, or k of them drawn the same
    way on every rank of the group. One draw per period, not per step, so a group fetches and
    holds only k teachers (and the next period's, fetched ahead): with 64 groups, 2 instead of 63
    models in memory and 2-4 blob reads per exchange instead of 63 (BENCHMARKS.md, section 8)."""

    peers: tuple[int, ...]
    k: int | str = "all"
    seed: int = 0
    period: int = 1  # reloadEverySteps: a draw lasts from one reload boundary to the next

    def at(self, step: int) -> list[int]:
        """The peers of the period that holds `step`."""
        if self.k == "all" or len(self.peers) <= int(self.k):
            return sorted(self.peers)
        order = torch.randperm(len(self.peers),
                               generator=generator(self.seed, 0, step // self.period)).tolist()
        return sorted(self.peers[i] for i in order[: int(self.k)])

    def most(self) -> int:
        """The most peers `ahead` can name: what the poller polls at most."""
        return len(self.peers) if self.k == "all" else min(2 * int(self.k), len(self.peers))

    def ahead(self, step: int) -> set[int]:
        """What the poller should fetch from `step` on: this period's peers and the next's."""
        return {*self.at(step), *self.at(step + self.period)}


class PeerPoller:
    """Polls peers' pointers in a thread; keeps each peer's last few verified versions in memory.
    Only the peers `want` names are polled and kept (all of them until it is called)."""

    def __init__(
        self,
        bucket: Bucket,
        peers: Sequence[int],
        interval: float = 1.0,
        keep: int = 2,
        max_step: int | None = None,
        expected: Layout | None = None,
    ):
        """`max_step` (training.steps) bounds the pointer steps trusted; `expected` is the model's
        `layout` that fetched weights must match (Teachers sets it when the caller did not)."""
        self.channels = {p: teacher_channel(bucket, p) for p in peers}
        self.interval, self.keep = interval, keep
        self.max_step = INT64_MAX if max_step is None else min(max_step, INT64_MAX)
        self.expected = expected
        self._versions: dict[int, dict[int, dict[str, torch.Tensor]]] = {p: {} for p in peers}
        self._wanted = frozenset(peers)
        self._refused: dict[int, tuple[int, str, str]] = {}  # the last refused pointer, per peer
        self.warnings: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="codistill-poller", daemon=True)

    def start(self) -> PeerPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():  # joined, so it frees no tensors during interpreter shutdown
            self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval)

    def want(self, peers: Iterable[int]) -> None:
        """Poll only these peers from now on, and free the versions held of the others."""
        wanted = frozenset(peers)
        with self._lock:
            self._wanted = wanted
            for peer, versions in self._versions.items():
                if peer not in wanted:
                    versions.clear()

    def poll_once(self) -> None:
        for peer, channel in self.channels.items():
            if peer not in self._wanted:
                continue
            try:
                pointer = channel.latest()
                if pointer is None or pointer.step in self._versions[peer]:
                    continue
                seen = (pointer.step, pointer.key, pointer.sha256)
                if self._refused.get(peer) == seen:
                    continue  # already refused (and warned about): not fetched again
                if not 0 <= pointer.step <= self.max_step:
                    self._refuse(peer, seen, f"pointer step {pointer.step} is outside "
                                             f"[0, {self.max_step}]")
                    continue
                bound = weights.max_size(self.expected) if self.expected else pointer.bytes
                if pointer.bytes > bound:  # refused before a buffer of that size is allocated
                    self._refuse(peer, seen, f"pointer says {pointer.bytes} bytes, a model of "
                                             f"this layout takes at most {bound}")
                    continue
                fetched = weights_from_bytes(channel.fetch(pointer), pointer.key)
            except (CorruptCheckpoint, StorageError) as e:
                self.warnings[peer] = f"peer {peer}: {e}; keeping last good teacher"
                log.warning("%s", self.warnings[peer])
                continue
            reason = bad_weights(fetched, self.expected)
            if reason is not None:
                self._refuse(peer, seen, f"step {pointer.step}: {reason}")
                continue
            with self._lock:
                if peer not in self._wanted:  # dropped by `want` while it was being fetched
                    continue
                versions = self._versions[peer]
                versions[pointer.step] = fetched
                for old in sorted(versions)[: -self.keep]:
                    del versions[old]
            self.warnings.pop(peer, None)

    def _refuse(self, peer: int, seen: tuple[int, str, str], reason: str) -> None:
        self._refused[peer] = seen
        self.warnings[peer] = f"peer {peer}: {reason}; keeping last good teacher"
        log.warning("%s", self.warnings[peer])

    def snapshot(self) -> dict[int, tuple[int, dict[str, torch.Tensor]]]:
        """Each peer's newest verified version, as (step, weights), taken in one go."""
        with self._lock:
            return {p: (max(v), v[max(v)]) for p, v in self._versions.items() if v}

    def newest(self) -> dict[int, int]:
        held = self.snapshot()
        return {p: held[p][0] if p in held else NONE for p in self.channels}

    def get(self, peer: int, step: int) -> dict[str, torch.Tensor] | None:
        with self._lock:
            return self._versions[peer].get(step)


class Teachers:
    """The peer models this group distills from, in eval mode and never trained."""

    def __init__(
        self, task: Task, draw: Draw, poller: PeerPoller | None, max_staleness: int,
        device: torch.device | None = None, dtype: torch.dtype = torch.float32,
    ):
        """`poller` is rank 0's (None on the other ranks, which get their teachers from it).
        `dtype` is what the teachers are held in (bfloat16 halves their memory); what peers
        publish is checked against the task model's own float32 layout all the same."""
        self.task, self.draw, self.poller, self.max_staleness = task, draw, poller, max_staleness
        self.device, self.dtype = device or torch.device("cpu"), dtype
        self.models: dict[int, nn.Module] = {}
        self.steps: dict[int, int] = {}
        self.warnings: dict[int, str] = {}
        self._refused: dict[int, int] = {}  # a step refused by _load, per peer: not retried
        self.expected = layout(task.model().state_dict())  # _load checks whatever the poller did
        if poller is not None and poller.expected is None:  # refused in its thread already
            poller.expected = self.expected

    def refresh(self, at: int) -> None:
        """At the reload boundary before step `at`: drop the teachers this period did not draw
        and swap in rank 0's newer versions of those it did, on every rank together (a
        collective: call on all ranks). Every rank decides the same: the draw, `steps` and
        `_refused` agree on all of them."""
        peers = self.draw.at(at)
        for gone in set(self.models) - set(peers):
            del self.models[gone], self.steps[gone]
        if self.poller is not None:
            self.poller.want(self.draw.ahead(at))
        held = self.poller.snapshot() if self.poller is not None else {}
        newest = dist.from_rank0([held[p][0] if p in held else NONE for p in peers])
        for peer, step in zip(peers, newest):
            if step == NONE or step <= self.steps.get(peer, NONE) or self._refused.get(peer) == step:
                continue
            sent = held[peer][1] if peer in held else None
            self._load(peer, step, dist.tensors_from_rank0(sent, self.expected, self.device))

    def all_warnings(self) -> list[str]:
        """Why a teacher is missing, old or refused: this object's, then its poller's."""
        polled = self.poller.warnings.values() if self.poller is not None else ()
        return [*self.warnings.values(), *polled]

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.stop()

    def _load(self, peer: int, step: int, weights: dict[str, torch.Tensor]) -> None:
        if peer in self.models:
            model = self.models[peer]
        else:
            model = self.task.model().to(self.device, self.dtype)
        # Checked before loading: load_state_dict casts dtypes silently (on purpose only to
        # self.dtype) and, on a failure, may already have overwritten part of the last good
        # teacher. The verdict is the same on every rank: the blob is identical everywhere.
        reason = bad_weights(weights, self.expected)
        if reason is None:
            try:
                model.load_state_dict(weights)
            except RuntimeError as e:
                reason = f"weights do not fit the model ({e})"
        if reason is not None:
            self._refused[peer] = step
            self.warnings[peer] = f"peer {peer} step {step}: {reason}; keeping last good teacher"
            log.warning("%s", self.warnings[peer])
            return
        model.eval().requires_grad_(False)
        self.models[peer], self.steps[peer] = model, step
        self.warnings.pop(peer, None)

    def usable(self, step: int) -> list[int]:
        """Peers with a loaded version no more than maxStalenessSteps behind `step`."""
        fresh = []
        for peer, teacher_step in self.steps.items():
            if step - teacher_step <= self.max_staleness:
                fresh.append(peer)
                self.warnings.pop(peer, None)
            else:
                self.warnings[peer] = (
                    f"peer {peer} is {step - teacher_step} steps stale "
                    f"(> maxStalenessSteps {self.max_staleness}); skipped"
                )
        return sorted(fresh)

    def logits(self, batch: Batch, peers: Sequence[int]) -> list[torch.Tensor]:
        """The chosen teachers' logits on the student's batch (inference only)."""
        with torch.inference_mode():
            return [self.task.logits(self.task.forward(self.models[p], batch)) for p in peers]

    def staleness(self, step: int) -> dict[int, int]:
        return {p: step - s for p, s in self.steps.items()}

