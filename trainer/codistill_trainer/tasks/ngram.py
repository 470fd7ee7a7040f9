"""A character n-gram model of the training text, to sample unlimited text, fresh at every step.

The paper's regime is a very large dataset seen about once; the shipped corpus is 7 MB and is
read many times over. Text sampled from an n-gram model fitted to it has the corpus's local
statistics but is new at every step, so `lm` with `ngram: N` trains in the no-repetition regime
without a download.

The model is the training text itself, indexed so that every context is a range: position i's key
is its n-1 preceding character ids read as base-`vocab` digits, the most recent one most
significant, and the keys are sorted. The positions whose last k characters match a context are
then one contiguous range of the sorted keys, for every k, so a single sorted array serves all the
back-off orders. Sampling a next character for a context picks a uniform position in the range of
the longest suffix of the context seen in the text (stupid back-off; k = 0 is the unigram) and
emits the character that follows it there: exactly the maximum-likelihood conditional of that order.
"""

from __future__ import annotations

import torch

ORDERS = range(2, 9)  # orders `ngram` accepts; 1 would be the unigram, 0 turns sampling off
_DRAW = 2**62  # random integers in [0, _DRAW) taken modulo a range's count: exact, no float bias


class NgramModel:
    """Order-`order` character statistics of `ids` (character ids in [0, vocab)); the caller
    keeps vocab ** (order - 1) within int64."""

    def __init__(self, ids: torch.Tensor, order: int, vocab: int) -> None:
        self.order, self.vocab = order, vocab
        context = order - 1
        # units[k]: the key width of a context whose last k characters are fixed (k = 0..n-1).
        self.units = torch.tensor([vocab ** (context - k) for k in range(order)])
        ids = ids.long()
        keys = torch.zeros(len(ids) - context, dtype=torch.long)
        for back in range(1, order):  # character i - back weighs vocab ** (context - back)
            keys += ids[context - back : len(ids) - back] * vocab ** (context - back)
        self.keys, where = torch.sort(keys, stable=True)  # stable: the same order everywhere
        self.follow = ids[context:][where].to(torch.int16)  # what follows each sorted position

    def sample(self, g: torch.Generator, rows: int, length: int) -> torch.Tensor:
        """`rows` independent streams of `length` sampled character ids, drawn only from `g`.

        Each stream starts from the context of a random position of the text (not emitted), so
        windows begin mid-text as the corpus's windows do, not at a review start.
        """
        key = self.keys[torch.randint(0, len(self.keys), (rows,), generator=g)]
        draws = torch.randint(0, _DRAW, (length, rows), generator=g)
        out = torch.empty(rows, length, dtype=torch.int16)
        newest = self.vocab ** (self.order - 2)  # the weight of the most recent character in a key
        for t in range(length):
            lo_key = key[:, None] // self.units * self.units  # (rows, order): each suffix's range
            lo = torch.searchsorted(self.keys, lo_key)
            count = torch.searchsorted(self.keys, lo_key + self.units) - lo
            # Counts never grow with k and k = 0 counts every position: the last nonzero is the
            # longest suffix seen.
            k = (count > 0).sum(1, keepdim=True) - 1
            lo, count = lo.gather(1, k)[:, 0], count.gather(1, k)[:, 0]
            out[:, t] = self.follow[lo + draws[t] % count]
            key = out[:, t].long() * newest + key // self.vocab  # the oldest character drops out
        return out
