"""Full training state for resume: model, optimizer, schedule, step, RNG and curve history.

Saved by rank 0 of a group to its own state channel in the bucket; loaded by every rank of the
group with `weights_only=True`. Batches are a pure function of the step (see tasks/base.py), so
the step is the data position.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from . import dist
from .exchange import Channel, CorruptCheckpoint, state_from_bytes

log = logging.getLogger(__name__)


def cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor on the CPU, detached from the live training state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def rng_states() -> list[torch.Tensor]:
    """Every rank's CPU RNG state (a collective: call it on all ranks of the group)."""
    return dist.gather(torch.get_rng_state())


def snapshot(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    history: list[dict[str, Any]],
    rng: list[torch.Tensor],
) -> dict[str, Any]:
    """A copy of the state, taken at a step boundary; serialising it can then run elsewhere."""
    return {
        "step": step,
        "model": cpu_copy(model.state_dict()),
        "optimizer": cpu_copy(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "history": copy.deepcopy(history),
    }


def _verified(state: Any, step: int, where: str) -> dict[str, Any]:
    """A loaded state that is what its name says: a dict whose `step` is the blob's step."""
    if not isinstance(state, dict) or type(state.get("step")) is not int or state["step"] != step:
        raise CorruptCheckpoint(f"{where}: not the training state of step {step}")
    return state


def load_latest(channel: Channel) -> dict[str, Any] | None:
    """The newest state that verifies, falling back to older retained ones; None if there is none.

    The pointer's entries come first (size and sha256 checked). When the pointer is unreadable,
    or none of its entries verifies, the folder's other blobs are tried newest first, each
    verified by loading it, so a bad pointer costs at most the blobs that are bad themselves."""
    tried: set[str] = set()
    try:
        candidates = channel.history()
    except CorruptCheckpoint as e:
        log.warning("ignoring state pointer: %s", e)
        candidates = []
    for pointer in candidates:
        tried.add(pointer.key)
        try:
            return state_from_bytes(channel.fetch(pointer), pointer.key)
        except CorruptCheckpoint as e:
            log.warning("skipping state at step %d: %s", pointer.step, e)
    for step, key in channel.blobs():
        if key in tried:
            continue
        try:
            state = _verified(state_from_bytes(channel.read_blob(key), key), step, key)
        except CorruptCheckpoint as e:
            log.warning("skipping uncommitted state %s: %s", key, e)
            continue
        log.warning("state pointer unusable: resuming from blob %s, found in the folder", key)
        return state
    return None


def restore(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rank: int,
) -> int:
    """Load `state` into the live objects; returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng") or []
    if rank < len(rng):  # same world size: each rank gets its own stream back
        torch.set_rng_state(rng[rank])
    return int(state["step"])
