"""Which slice of the data each process reads, and the per-step randomness that picks batches.

As in the paper, groups train on disjoint shards by default, and so do the ranks inside a group;
`shared` gives every group the same data (the paper's control), with ranks still disjoint.
"""

from __future__ import annotations

import torch

_MIX = 0x9E3779B1  # large odd constant: spreads (seed, shard, step) over the seed space


def shard_of(group: int, groups: int, rank: int, world: int, sharding: str) -> tuple[int, int]:
    """(shard index, number of shards) for `rank` of `world` in `group` of `groups`."""
    if sharding == "disjoint":
        return group * world + rank, groups * world
    if sharding == "shared":
        return rank, world
    raise ValueError(f"dataSharding: expected 'disjoint' or 'shared', got {sharding!r}")


def bounds(length: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `num_shards` near-equal contiguous slices of `length`."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    return length * shard // num_shards, length * (shard + 1) // num_shards


def generator(seed: int, shard: int, step: int) -> torch.Generator:
    """A generator that depends only on (seed, shard, step): batches replay exactly on resume."""
    g = torch.Generator()
    g.manual_seed(((seed * _MIX + shard) * _MIX + step) % (2**63 - 1))
    return g
