"""Every collective a group's ranks run together, in one place.

Each one must be called on every rank of the group at the same point of the loop, or the group
deadlocks; keeping them here makes them easy to find. In a single process (groups of one rank,
tests) each is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> int:
    """Ranks in this group's process group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """Reduce `t` in place across the group; returns it."""
    if world() > 1:
        dist.all_reduce(t, op=op)
    return t


def min_int(values: list[int]) -> list[int]:
    """The smallest of each value over the ranks: what every rank of the group has."""
    return all_reduce(torch.tensor(values, dtype=torch.int64), dist.ReduceOp.MIN).tolist()


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), in rank order."""
    if world() == 1:
        return [t]
    found = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(found, t)
    return found
