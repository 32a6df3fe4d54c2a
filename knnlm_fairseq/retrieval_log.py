"""What one kNN-LM pass retrieved, per scored token, so λ, k and T can be swept offline.

Layout of a retrieval log directory (rows in eval-lm's scoring order):
    target.npy       (n,) int32       the token being predicted
    lm_lp.npy        (n,) float32     the LM's natural-log probability of it
    vals.npy         (n, k) int32     the neighbours' next tokens, nearest first (faiss's order)
    dist_approx.npy  (n, k) float32   faiss's distances (smaller is closer; inner products negated)
    dist_exact.npy   (n, k) float32   distances recomputed from the stored keys
    meta.json        k, metric, split, datastore fingerprint, count; written last (the commit point)
"""
import json
import os
from typing import Dict

import numpy as np

from .datastore import DatastoreError, StreamingNpy, write_json_atomic

META = "meta.json"
ARRAYS = {  # name -> (dtype, has a k axis)
    "target": (np.int32, False),
    "lm_lp": (np.float32, False),
    "vals": (np.int32, True),
    "dist_approx": (np.float32, True),
    "dist_exact": (np.float32, True),
}


class RetrievalLogWriter:
    def __init__(self, path: str, k: int, meta: Dict):
        if os.path.exists(os.path.join(path, META)):
            raise DatastoreError(f"{path} already holds a retrieval log; pass a new --save-retrieval directory")
        os.makedirs(path, exist_ok=True)
        self.path, self.k, self.meta = path, k, dict(meta)
        self.files = {
            name: StreamingNpy(os.path.join(path, f"{name}.npy"), dtype, (k,) if has_k else ())
            for name, (dtype, has_k) in ARRAYS.items()
        }

    def add(self, **arrays: np.ndarray) -> None:
        """target, lm_lp: (n,); vals, dist_approx, dist_exact: (n, k). Missing neighbours: dist = inf."""
        for name, f in self.files.items():
            f.append(arrays[name])

    def close(self) -> Dict:
        counts = {f.rows for f in self.files.values()}
        assert len(counts) == 1, f"retrieval log arrays disagree in length: {counts}"
        for f in self.files.values():
            f.close()
        meta = dict(self.meta, k=self.k, count=counts.pop())
        write_json_atomic(os.path.join(self.path, META), meta)
        return meta


class RetrievalLog:
    """A finished retrieval log, memory-mapped."""

    def __init__(self, path: str):
        mpath = os.path.join(path, META)
        if not os.path.exists(mpath):
            raise DatastoreError(
                f"{path} has no {META}: not a finished retrieval log; run fairseq-eval-lm --knnlm --save-retrieval {path}"
            )
        with open(mpath) as f:
            self.meta = json.load(f)
        self.path = path
        for name, (dtype, has_k) in ARRAYS.items():
            arr = np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r")
            shape = (self.meta["count"], self.meta["k"]) if has_k else (self.meta["count"],)
            if arr.shape != shape or arr.dtype != dtype:
                raise DatastoreError(f"{path}/{name}.npy holds {arr.dtype}{list(arr.shape)}, expected "
                                     f"{np.dtype(dtype)}{list(shape)}; the log is damaged, write it again")
            setattr(self, name, arr)

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])
