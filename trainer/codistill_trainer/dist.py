"""Every collective a group's ranks run together, in one place.

Each one must be called on every rank of the group at the same point of the loop, or the group
deadlocks; keeping them here makes them easy to find. In a single process (groups of one rank,
tests) each is the identity. On a GPU the process group has both backends (worker.py): NCCL for
CUDA tensors, gloo for the small CPU ones (steps, RNG states).
"""

from __future__ import annotations

from collections.abc import Mapping

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


def from_rank0(values: list[int]) -> list[int]:
    """Rank 0's values, on every rank."""
    t = torch.tensor(values, dtype=torch.int64)
    if world() > 1:
        dist.broadcast(t, src=0)
    return t.tolist()


def tensors_from_rank0(
    tensors: Mapping[str, torch.Tensor] | None,
    like: Mapping[str, tuple[torch.dtype, torch.Size]],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Rank 0's `tensors`, on `device` on every rank: rank 0 passes them (keyed as `like`), the
    other ranks None, and receive into tensors of `like`'s dtypes and shapes. One broadcast per
    tensor, in key order, so every rank sends or receives the same sequence."""
    found = {}
    for key in sorted(like):
        dtype, shape = like[key]
        if tensors is not None:
            t = tensors[key].to(device)
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        if world() > 1:
            dist.broadcast(t, src=0)
        found[key] = t
    return found


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t` (same shape on every rank), in rank order."""
    if world() == 1:
        return [t]
    found = [torch.empty_like(t) for _ in range(world())]
    dist.all_gather(found, t)
    return found
