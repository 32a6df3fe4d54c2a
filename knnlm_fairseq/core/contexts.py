"""The text a datastore entry came from: row -> the tokens around it in the split it was dumped from.

A dump scores every token of its split once, in order, so row i of a datastore part is token i of the part's
binarized split. The manifest names that split (data directory, split, the sha256 of its .bin): a split that
moved or changed since is refused, and every context is checked against the entry's own value, so a context from
the wrong text is never shown.
"""
import os
from typing import List, Tuple

import numpy as np

from .databin import split_paths, split_sha256, token_stream
from .datastore import Datastore
from .errors import KnnlmError


class SourceText:
    def __init__(self, dstore: Datastore):
        self.dstore = dstore
        self.offsets = dstore.offsets  # (P + 1,) first row of each part
        self.streams = [self._stream(part) for part in dstore.parts]

    @staticmethod
    def _stream(part: Datastore) -> np.ndarray:
        m = part.manifest
        data, split, sha = m.get("data"), m.get("split"), m.get("data_sha256")
        if not (data and split):
            raise KnnlmError(f"datastore {part.path} does not name the split it was dumped from; dump it again to "
                             f"see its entries' contexts")
        bin_path = split_paths(data, split)[0]
        if not os.path.exists(bin_path):
            raise KnnlmError(f"datastore {part.path} was dumped from {bin_path}, which is gone; put the binarized "
                             f"split back there (or dump again) to see its entries' contexts")
        if sha is not None and split_sha256(data, split) != sha:
            raise KnnlmError(f"{bin_path} changed since datastore {part.path} was dumped from it (sha256 differs); "
                             f"binarize the original text again or dump again")
        stream = token_stream(data, split)
        # every value is the token at its row: the split is the text of these entries (older manifests carry no
        # sha256; this check holds for them too)
        if len(stream) != part.count or not np.array_equal(np.asarray(part.vals), stream):
            raise KnnlmError(f"{bin_path} is not the text datastore {part.path} was dumped from (its tokens are not "
                             f"the entries' values, in order); binarize the original text again or dump again")
        return stream

    def context(self, row: int, left: int, right: int) -> Tuple[List[int], int]:
        """Token ids around datastore row `row` (up to `left` before its value, `right` after) and the index of
        the value in them."""
        p = int(np.searchsorted(self.offsets, row, side="right")) - 1
        pos = row - int(self.offsets[p])
        stream = self.streams[p]
        start = max(0, pos - left)
        window = [int(x) for x in stream[start : pos + right + 1]]
        at = pos - start
        if window[at] != int(self.dstore.vals[row]):
            raise KnnlmError(f"row {row} of {self.dstore.path} holds token {int(self.dstore.vals[row])} but its text "
                             f"has {window[at]} there; the datastore and its source disagree, dump again")
        return window, at
