"""The Task interface: everything the trainer needs to know about a model and its data.

The trainer is generic; a task supplies the model, the data of shard `i of n`, the eval data, the
task loss and the logits that distillation compares. A user task is any `pkg.module:factory` whose
`factory(**args)` returns a Task.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import nn


class Batch(NamedTuple):
    """Model inputs (a tensor, or a tuple of tensors passed as positional args) and targets."""

    inputs: Any
    targets: torch.Tensor


class TrainData(abc.ABC):
    """One shard of the training data.

    Batches are a pure function of (seed, step): resuming at step t replays exactly the batches a
    run that never stopped would have seen, so the data position is just the step.
    """

    @abc.abstractmethod
    def batch(self, step: int, batch_size: int, seed: int) -> Batch: ...

    @abc.abstractmethod
    def __len__(self) -> int:
        """Examples (or tokens) in this shard, for reporting epochs."""


class Task(abc.ABC):
    """A model and its data. Subclass it, or return one from a `pkg.module:factory`."""

    name: str = "task"

    @abc.abstractmethod
    def model(self) -> nn.Module:
        """A freshly initialised model (the caller seeds torch first)."""

    @abc.abstractmethod
    def train_data(self, shard: int, num_shards: int) -> TrainData:
        """Shard `shard` of `num_shards` disjoint shards of the training data."""

    @abc.abstractmethod
    def eval_data(self, batch_size: int, batches: int) -> list[Batch]:
        """A fixed eval set, the same for every group and run (for ensemble and churn)."""

    @abc.abstractmethod
    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The task loss (a scalar mean) of the model's output on `batch`."""

    @abc.abstractmethod
    def logits(self, output: torch.Tensor) -> torch.Tensor:
        """Class logits of shape (N, C) that distillation and churn compare; a binary task
        returns two columns [0, z] so that softmax equals sigmoid(z)."""

    def targets(self, batch: Batch) -> torch.Tensor:
        """Class targets of shape (N,) aligned with `logits`, for accuracy."""
        return batch.targets.reshape(-1).long()

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        inputs = batch.inputs if isinstance(batch.inputs, tuple) else (batch.inputs,)
        return model(*inputs)
