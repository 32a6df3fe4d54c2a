"""Wrappers around fairseq's epoch iterator for eval-lm: resumed dumps, sharded dumps, and an end-of-split hook.

Each keeps `len()` and `.n` so fairseq's progress bar and logging work unchanged.
"""
import logging

import numpy as np
from fairseq.data import BaseWrapperDataset

logger = logging.getLogger(__name__)


class _Wrapper:
    """Delegates len(), .n and iteration to the wrapped iterator; subclasses define __next__."""

    itr = None

    def __len__(self):
        return len(self.itr)

    @property
    def n(self):
        return self.itr.n

    def __iter__(self):
        return self


class SkipWritten(_Wrapper):
    """A resumed dump: drops batches whose scored tokens are all on disk already (the model never sees them)."""

    def __init__(self, itr, writer, pad: int):
        self.itr, self.writer, self.pad, self.skipped, self.logged = itr, writer, pad, 0, False

    def __next__(self):
        while True:
            sample = next(self.itr)
            scored = int(sample["target"].ne(self.pad).sum()) if sample else 0
            if 0 < scored <= self.writer.skip:
                self.writer.skip -= scored
                self.skipped += 1
                continue
            if self.skipped and not self.logged:
                logger.info(f"resumed: skipped {self.skipped} batches already in the datastore; the perplexity "
                            f"printed below covers only the rest")
                self.logged = True
            return sample


class BatchRange(_Wrapper):
    """Batches [start, stop) of an epoch iterator; the ones before are still drawn (and collated), never scored."""

    def __init__(self, itr, start: int, stop: int):
        self.itr, self.start, self.stop, self.pos = itr, start, stop, 0

    def __len__(self):
        return self.stop - self.start

    @property
    def n(self):
        return max(self.pos - self.start, 0)

    def __next__(self):
        while self.pos < self.start:
            next(self.itr)
            self.pos += 1
        if self.pos >= self.stop:
            raise StopIteration
        self.pos += 1
        return next(self.itr)


class ThenFinish(_Wrapper):
    """Delegates to an epoch iterator and calls `on_end` once it is exhausted (never on an error)."""

    def __init__(self, itr, on_end):
        self.itr, self.on_end, self.done = itr, on_end, False

    def __next__(self):
        try:
            return next(self.itr)
        except StopIteration:
            if not self.done:
                self.done = True
                self.on_end()
            raise


class FirstTokens(_Wrapper):
    """The split's first blocks, up to the one that brings the scored tokens to at least `limit`: a prefix of the
    split in whole blocks, each with the context window it has in the full split. The batch that reaches the limit
    is cut after that block (its rows are blocks in text order)."""

    def __init__(self, itr, limit: int, pad: int):
        self.itr, self.limit, self.pad, self.scored = itr, limit, pad, 0

    def __next__(self):
        if self.scored >= self.limit:
            raise StopIteration
        sample = next(self.itr)
        if sample:
            per_block = sample["target"].ne(self.pad).sum(1)  # (B,) tokens each block scores
            reached = (per_block.cumsum(0) + self.scored >= self.limit).nonzero()
            if len(reached):
                sample = _first_rows(sample, int(reached[0]) + 1, len(per_block))
                sample["nsentences"] = int(reached[0]) + 1
                sample["ntokens"] = int(sample["target"].ne(self.pad).sum())
            self.scored += int(sample["target"].ne(self.pad).sum())
        return sample


def _first_rows(sample, rows: int, batch: int):
    """The sample with every per-block tensor (first dimension `batch`) cut to its first `rows` rows."""
    if isinstance(sample, dict):
        return {key: _first_rows(value, rows, batch) for key, value in sample.items()}
    if hasattr(sample, "shape") and len(sample.shape) and sample.shape[0] == batch:
        return sample[:rows]
    return sample


class InTextOrder(BaseWrapperDataset):
    """A split's blocks in text order. Without a context window fairseq-eval-lm batches a split in a seeded shuffle
    sorted by size (LMContextWindowDataset, used only for a context window > 0, keeps the order); our files need
    row i to be token i of the split (knnlm-inspect's contexts, subsets' slices, retrieval logs)."""

    def ordered_indices(self):
        return np.arange(len(self), dtype=np.int64)
