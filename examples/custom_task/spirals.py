"""A complete user task: classify points of interleaved spirals with a small MLP.

Use it with `task: {name: spirals:make_task, args: {classes: 3}}` once this folder is on
PYTHONPATH (locally: `PYTHONPATH=examples/custom_task codistill run examples/custom.yaml`; on a
cluster: install the module into an image built FROM the codistill trainer image).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from codistill_trainer.shards import bounds, generator
from codistill_trainer.tasks import Batch, Task, TrainData

POINTS = 60_000


def spirals(classes: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` noisy points on `classes` interleaved spiral arms, and their arm as the label."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, classes, (n,), generator=g)
    r = torch.rand(n, generator=g)
    angle = 4 * r * math.pi + label * 2 * math.pi / classes
    xy = torch.stack([r * angle.cos(), r * angle.sin()], 1)
    return xy + 0.03 * torch.randn(n, 2, generator=g), label


class Shard(TrainData):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, shard: int):
        self.x, self.y, self.shard = x, y, shard

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        # A pure function of the step: what makes resume exact.
        idx = torch.randint(0, len(self.x), (batch_size,), generator=generator(seed, self.shard, step))
        return Batch(self.x[idx], self.y[idx])

    def __len__(self) -> int:
        return len(self.x)


class Spirals(Task):
    name = "spirals"

    def __init__(self, classes: int = 3, hidden: int = 64):
        self.classes, self.hidden = classes, hidden
        self.x, self.y = spirals(classes, POINTS, seed=1234)  # the same data in every process

    def model(self) -> nn.Module:
        h = self.hidden
        return nn.Sequential(nn.Linear(2, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                             nn.Linear(h, self.classes))

    def train_data(self, shard: int, num_shards: int) -> TrainData:
        lo, hi = bounds(POINTS * 9 // 10, shard, num_shards)  # the first 90 % is for training
        return Shard(self.x[lo:hi], self.y[lo:hi], shard)

    def eval_data(self, batch_size: int, batches: int) -> list[Batch]:
        start = POINTS * 9 // 10
        return [Batch(self.x[i:i + batch_size], self.y[i:i + batch_size])
                for i in range(start, min(start + batch_size * batches, POINTS), batch_size)]

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(output, batch.targets)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return output


def make_task(classes: int = 3, hidden: int = 64) -> Task:
    return Spirals(classes, hidden)
