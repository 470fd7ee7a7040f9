"""Built-in task `ctr`: a click-through-rate-style binary classifier on UCI Adult.

The paper's Criteo setting (a DNN on categorical and numeric features predicting a click), scaled
down: predict income > 50K from 8 categorical and 6 numeric columns. Categorical values are
embedded, numerics standardized with train-split statistics only, and an MLP gives one logit.
A fixed permutation holds out 20 % for eval; shards are disjoint slices of the rest; each epoch of
a shard is a permutation seeded by (seed, shard, epoch), so batch(step) is a pure function of step
and every example is seen once per epoch.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from codistill.spec import SpecError
from codistill_trainer import datasets, shards
from codistill_trainer.tasks import int_arg
from codistill_trainer.tasks.base import Batch, Task, TrainData

CATEGORICAL = (
    "workclass", "education", "marital-status", "occupation",
    "relationship", "race", "gender", "native-country",
)  # fmt: skip
NUMERIC = ("age", "fnlwgt", "educational-num", "capital-gain", "capital-loss", "hours-per-week")
LOG_SCALED = frozenset({"fnlwgt", "capital-gain", "capital-loss"})  # heavy tails: log1p first
LABEL, POSITIVE = "income", ">50K"
EVAL_FRACTION = 0.2
SPLIT_SEED = 1804_03235  # fixed: every process and run holds out the same rows


class Table(NamedTuple):
    """Rows as tensors: categorical codes (N, C), numerics (N, K) and 0/1 labels (N,)."""

    cats: torch.Tensor
    nums: torch.Tensor
    labels: torch.Tensor

    def take(self, idx: torch.Tensor | slice) -> Table:
        return Table(self.cats[idx], self.nums[idx], self.labels[idx])

    def batch(self) -> Batch:
        return Batch((self.cats, self.nums), self.labels)


def load(folder: Path) -> tuple[Table, list[int]]:
    """All rows of adult.csv as a Table (numerics not yet standardized), and each column's
    number of categories (codes are indices into the sorted distinct values)."""
    rows = datasets.read_adult(folder)
    missing = [c for c in (*CATEGORICAL, *NUMERIC, LABEL) if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{folder / datasets.ADULT}: missing columns {missing}; {datasets.FIX}")
    vocabs = [sorted({r[c] for r in rows}) for c in CATEGORICAL]
    index = [{v: i for i, v in enumerate(vocab)} for vocab in vocabs]
    cats = torch.tensor([[ix[r[c]] for ix, c in zip(index, CATEGORICAL)] for r in rows])
    nums = torch.tensor([[float(r[c]) for c in NUMERIC] for r in rows])
    logged = torch.tensor([c in LOG_SCALED for c in NUMERIC])
    nums = torch.where(logged, nums.clamp(min=0).log1p(), nums)
    labels = torch.tensor([float(r[LABEL] == POSITIVE) for r in rows])
    return Table(cats, nums, labels), [len(v) for v in vocabs]


class TabularMLP(nn.Module):
    """One embedding per categorical column, concatenated with the numerics, into an MLP."""

    def __init__(
        self, cardinalities: list[int], numeric: int, embed: int, hidden: int, layers: int
    ) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, embed) for n in cardinalities)
        dims = [len(cardinalities) * embed + numeric] + [hidden] * layers
        blocks = [m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())]
        self.mlp = nn.Sequential(*blocks, nn.Linear(dims[-1], 1))

    def forward(self, cats: torch.Tensor, nums: torch.Tensor) -> torch.Tensor:
        embedded = [e(cats[:, i]) for i, e in enumerate(self.embeds)]
        return self.mlp(torch.cat([*embedded, nums], dim=1)).squeeze(-1)


class RowShard(TrainData):
    """Disjoint rows of the train split; each epoch visits them in a fresh seeded order."""

    def __init__(self, rows: Table, shard: int) -> None:
        self.rows, self.shard = rows, shard
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        per_epoch = len(self) // batch_size
        if per_epoch == 0:
            raise SpecError(
                f"spec.training.batchSize: {batch_size} exceeds the {len(self)} rows of ctr "
                f"shard {self.shard}; use a smaller batch or fewer groups/processes"
            )
        epoch, i = divmod(step, per_epoch)
        order = self._epoch_order(seed, epoch)
        return self.rows.take(order[i * batch_size : (i + 1) * batch_size]).batch()

    def _epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        """The shard's permutation for `epoch`, kept for the steps of that epoch."""
        if self._order is None or self._order[0] != (seed, epoch):
            g = shards.generator(seed, self.shard, epoch)
            self._order = ((seed, epoch), torch.randperm(len(self), generator=g))
        return self._order[1]

    def __len__(self) -> int:
        return len(self.rows.labels)


class ClickThrough(Task):
    """Income > 50K from UCI Adult; `data_dir` defaults to datasets.data_dir()."""

    name = "ctr"

    def __init__(
        self, embed: int = 8, hidden: int = 64, layers: int = 2, data_dir: str | None = None
    ) -> None:
        self.embed = int_arg("embed", embed, 1)
        self.hidden = int_arg("hidden", hidden, 1)
        self.layers = int_arg("layers", layers, 0)
        self.folder = Path(data_dir) if data_dir else datasets.data_dir()
        datasets.require(self.folder, datasets.ADULT)  # fails now, not in a pod

    @cached_property
    def splits(self) -> tuple[Table, Table, list[int]]:
        """(train, eval, cardinalities), numerics standardized by the train split's statistics."""
        table, cardinalities = load(self.folder)
        n = len(table.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        held = round(n * EVAL_FRACTION)
        train, test = table.take(order[held:]), table.take(order[:held])
        mean, std = train.nums.mean(0), train.nums.std(0).clamp(min=1e-6)
        train, test = (t._replace(nums=(t.nums - mean) / std) for t in (train, test))
        return train, test, cardinalities

    def model(self) -> nn.Module:
        cardinalities = self.splits[2]
        return TabularMLP(cardinalities, len(NUMERIC), self.embed, self.hidden, self.layers)

    def train_data(self, shard: int, num_shards: int) -> TrainData:
        train = self.splits[0]
        lo, hi = shards.bounds(len(train.labels), shard, num_shards)
        return RowShard(train.take(slice(lo, hi)), shard)

    def eval_data(self, batch_size: int, batches: int) -> list[Batch]:
        """The first batch_size * batches held-out rows (all of them at most), in a fixed order."""
        test = self.splits[1].take(slice(0, batch_size * batches))
        count = len(test.labels)
        return [test.take(slice(i, i + batch_size)).batch() for i in range(0, count, batch_size)]

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(output, batch.targets)

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(output), output], dim=-1)
