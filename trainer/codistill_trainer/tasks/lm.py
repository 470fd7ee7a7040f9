"""Built-in task `lm`: a character-level language model on clothing reviews.

The paper's Common Crawl LSTM language model, scaled down to a 7 MB corpus that trains on a CPU:
a small LSTM (`cell: gru` is the alternative; the LSTM is the faster of the two on CPU) predicts
the next character. A fixed 1 in 20 reviews is held out for eval; the rest, joined, is cut into
contiguous disjoint shards, and each step draws random windows inside its shard from a generator
seeded by (seed, shard, step), so a batch is a pure function of the step.

`ngram: N` (2..8; default 0, off) trains instead on unlimited text sampled from an order-N
character n-gram model fitted to the training reviews (tasks/ngram.py): the paper's regime of a
very large dataset with little repetition, without a download. Eval stays on the held-out reviews,
so eval losses compare across the two.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from codistill.spec import SpecError
from codistill_trainer import datasets, shards
from codistill_trainer.tasks import int_arg
from codistill_trainer.tasks.base import Batch, Task, TrainData
from codistill_trainer.tasks.ngram import ORDERS, NgramModel

EVAL_EVERY = 20  # review i is held out when i % EVAL_EVERY == EVAL_EVERY - 1 (5 %)
CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}


def encode(text: str, chars: str) -> torch.Tensor:
    """Character ids of `text` (int16): 1 + the index in `chars`, 0 for any other character."""
    if not text:
        return torch.zeros(0, dtype=torch.int16)
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    table = torch.zeros(max(map(ord, chars)) + 2, dtype=torch.int16)  # last slot: beyond `chars`
    table[torch.tensor([ord(c) for c in chars])] = torch.arange(1, len(chars) + 1).short()
    return table[codes.clamp(max=len(table) - 1)]


def windows(ids: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    """Inputs ids[s:s+T] and next-character targets ids[s+1:s+T+1] for every start s."""
    chunk = ids[starts[:, None] + torch.arange(seq_len + 1)].long()
    return Batch(chunk[:, :-1], chunk[:, 1:])


class CharRNN(nn.Module):
    """Embedding -> recurrent layers -> per-position logits over the vocabulary."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = CELLS[cell](embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


class TextShard(TrainData):
    """One contiguous slice of the training text; every window lies wholly inside it."""

    def __init__(self, ids: torch.Tensor, shard: int, seq_len: int) -> None:
        self.ids, self.shard, self.seq_len = ids, shard, seq_len

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        g = shards.generator(seed, self.shard, step)
        starts = torch.randint(0, len(self.ids) - self.seq_len, (batch_size,), generator=g)
        return windows(self.ids, starts, self.seq_len)

    def __len__(self) -> int:
        return len(self.ids)


class SampledText(TrainData):
    """Windows of text sampled afresh at every step from an n-gram model, not read from the corpus.

    Shards are separate streams because their generators are seeded with distinct (seed, shard,
    step) triples, as TextShard's are: two shards share a window only by chance.
    """

    def __init__(self, ngram: NgramModel, shard: int, seq_len: int, length: int) -> None:
        self.ngram, self.shard, self.seq_len, self.length = ngram, shard, seq_len, length

    def batch(self, step: int, batch_size: int, seed: int) -> Batch:
        g = shards.generator(seed, self.shard, step)
        text = self.ngram.sample(g, batch_size, self.seq_len + 1).flatten()
        return windows(text, torch.arange(batch_size) * (self.seq_len + 1), self.seq_len)

    def __len__(self) -> int:
        """The characters of the corpus shard it stands in for, so epochs read the same."""
        return self.length


class LanguageModel(Task):
    """Next-character prediction; `data_dir` defaults to datasets.data_dir()."""

    name = "lm"

    def __init__(
        self,
        seq_len: int = 64,
        embed: int = 64,
        hidden: int = 128,
        layers: int = 1,
        cell: str = "lstm",
        ngram: int = 0,
        data_dir: str | None = None,
    ) -> None:
        self.seq_len = int_arg("seq_len", seq_len, 1)
        self.sizes = (int_arg("embed", embed, 1), int_arg("hidden", hidden, 1))
        self.layers = int_arg("layers", layers, 1)
        if cell not in CELLS:
            raise SpecError(f"spec.task.args.cell: expected one of {sorted(CELLS)}, got {cell!r}")
        self.cell = cell
        self.ngram = int_arg("ngram", ngram, 0)
        if self.ngram and self.ngram not in ORDERS:
            raise SpecError(
                f"spec.task.args.ngram: expected 0 (off) or an order in {ORDERS.start}.."
                f"{ORDERS.stop - 1}, got {ngram!r}"
            )
        self.folder = Path(data_dir) if data_dir else datasets.data_dir()
        self.chars = datasets.read_vocab(self.folder)  # fails now, not in a pod, if data is missing
        if self.vocab_size ** max(self.ngram - 1, 0) >= 2**62:  # a context key must fit int64
            raise SpecError(
                f"spec.task.args.ngram: order {self.ngram} is too high for {self.vocab_size} "
                "characters"
            )
        datasets.require(self.folder, datasets.REVIEWS)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @cached_property
    def splits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train ids, eval ids): read and encoded once, on first use."""
        reviews = datasets.read_reviews(self.folder)
        held = [i % EVAL_EVERY == EVAL_EVERY - 1 for i in range(len(reviews))]
        train = "".join(r + "\n" for r, h in zip(reviews, held) if not h)
        test = "".join(r + "\n" for r, h in zip(reviews, held) if h)
        return encode(train, self.chars), encode(test, self.chars)

    @cached_property
    def sampler(self) -> NgramModel:
        """The n-gram model of the train text (never the held-out one), fitted once."""
        return NgramModel(self.splits[0], self.ngram, self.vocab_size)

    def model(self) -> nn.Module:
        return CharRNN(self.vocab_size, *self.sizes, self.layers, self.cell)

    def train_data(self, shard: int, num_shards: int) -> TrainData:
        train = self.splits[0]
        lo, hi = shards.bounds(len(train), shard, num_shards)
        if self.ngram:
            return SampledText(self.sampler, shard, self.seq_len, hi - lo)
        self._fits(hi - lo, f"shard {shard} of {num_shards}")
        return TextShard(train[lo:hi], shard, self.seq_len)

    def eval_data(self, batch_size: int, batches: int) -> list[Batch]:
        """Evenly spaced windows over the held-out text: no randomness, the same everywhere."""
        test = self.splits[1]
        self._fits(len(test), "the held-out text")
        n = batch_size * batches
        starts = torch.arange(n) * (len(test) - self.seq_len - 1) // max(n - 1, 1)
        return [windows(test, s, self.seq_len) for s in starts.split(batch_size)]

    def loss(self, output: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(output), batch.targets.reshape(-1))

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(-1, output.shape[-1])

    def _fits(self, length: int, what: str) -> None:
        if length < self.seq_len + 1:
            raise SpecError(
                f"spec.task.args.seq_len: {what} has {length} characters of {self.folder}, fewer "
                f"than seq_len + 1 = {self.seq_len + 1}; use a shorter seq_len or fewer shards"
            )
