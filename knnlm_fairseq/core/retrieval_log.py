"""What one kNN-LM pass retrieved, per scored token, so λ, k and T can be swept offline.

Layout of a retrieval log directory (rows in eval-lm's scoring order):
    target.npy       (n,) int32       the token being predicted
    lm_lp.npy        (n,) float32     the LM's natural-log probability of it
    ids.npy          (n, k) int64     the neighbours' datastore rows, nearest first (faiss's order); -1: none
    vals.npy         (n, k) int32     the neighbours' next tokens (0 where there is no neighbour)
    dist_approx.npy  (n, k) float32   faiss's distances (smaller is closer; inner products negated)
    dist_exact.npy   (n, k) float32   distances recomputed from the stored keys
    query.npy        (n, dim) float16 the query (the key of the evaluated position): pointer reuse and other
                                      indexes are simulated from it without an LM pass
    lm_entropy.npy   (n,) float32     entropy of the LM's distribution (nats): a signal for adaptive retrieval
    lm_max_lp.npy    (n,) float32     the LM's largest log-prob: another such signal
    block_start.npy  (n,) bool        the row's previous token was not scored with it (a block's first row):
                                      where a chain of pointer reuse must search again
    meta.json        k, dim, metric, split, datastore fingerprint, count, the index searched ("index": its
                                      identity, core/index.py index_identity); written last (the commit point)
"""
import os
from typing import Dict

import numpy as np

from .durable import StreamingNpy, read_json, write_json_atomic
from .errors import KnnlmError

META = "meta.json"
ARRAYS = {  # name -> (dtype, row axis: None, "k" or "dim")
    "target": (np.int32, None),
    "lm_lp": (np.float32, None),
    "ids": (np.int64, "k"),
    "vals": (np.int32, "k"),
    "dist_approx": (np.float32, "k"),
    "dist_exact": (np.float32, "k"),
    "query": (np.float16, "dim"),
    "lm_entropy": (np.float32, None),
    "lm_max_lp": (np.float32, None),
    "block_start": (np.bool_, None),
}


def bytes_per_token(k: int, dim: int, arrays: Dict = None) -> int:
    """Disk a retrieval log takes per scored token at this k and key dimension (22,545 B at k=1024, 1024-d)."""
    per = {None: 1, "k": k, "dim": dim}
    return sum(np.dtype(dtype).itemsize * per[axis] for dtype, axis in (arrays or ARRAYS).values())


# a continuous-cache log (--save-cache), from a base-LM pass; knnlm-sweep aligns it with a retrieval log
CACHE_ARRAYS = {  # name -> (dtype, row axis; "k" is the θ axis here)
    "target": (np.int32, None),
    "lm_lp": (np.float32, None),
    "cache_lp": (np.float32, "k"),  # log p_cache(target) for each θ of meta["thetas"]; -inf if not cached
    "found": (np.bool_, None),  # any cached position at all (a split's first token has none)
}


class RetrievalLogWriter:
    def __init__(self, path: str, k: int, meta: Dict, arrays: Dict = ARRAYS, flag: str = "--save-retrieval",
                 dim: int = 0):
        if os.path.exists(os.path.join(path, META)):
            raise KnnlmError(f"{path} already holds a log; pass a new {flag} directory")
        os.makedirs(path, exist_ok=True)
        self.path, self.k, self.dim, self.meta = path, k, dim, dict(meta)
        sizes = {None: (), "k": (k,), "dim": (dim,)}
        self.files = {name: StreamingNpy(os.path.join(path, f"{name}.npy"), dtype, sizes[axis])
                      for name, (dtype, axis) in arrays.items()}

    def add(self, **arrays: np.ndarray) -> None:
        """One array per name of the log's layout, each with n rows. Missing neighbours: id -1, dist inf."""
        for name, f in self.files.items():
            f.append(arrays[name])

    def close(self) -> Dict:
        counts = {f.rows for f in self.files.values()}
        assert len(counts) == 1, f"retrieval log arrays disagree in length: {counts}"
        for f in self.files.values():
            f.close()
        meta = dict(self.meta, k=self.k, dim=self.dim, count=counts.pop())
        write_json_atomic(os.path.join(self.path, META), meta)
        return meta


class RetrievalLog:
    """A finished retrieval log (or, with arrays=CACHE_ARRAYS, a cache log), memory-mapped."""

    def __init__(self, path: str, arrays: Dict = ARRAYS):
        mpath = os.path.join(path, META)
        if not os.path.exists(mpath):
            what, how = ("retrieval", "--knnlm --save-retrieval") if arrays is ARRAYS else ("cache", "--cache-size N "
                                                                                            "--save-cache")
            raise KnnlmError(f"{path} has no {META}: not a finished {what} log; run fairseq-eval-lm {how} {path}")
        self.meta = read_json(mpath, "write the log again")
        self.path = path
        sizes = {None: (), "k": (self.meta["k"],), "dim": (self.meta.get("dim", 0),)}
        for name, (dtype, axis) in arrays.items():
            fpath = os.path.join(path, f"{name}.npy")
            if not os.path.exists(fpath):
                raise KnnlmError(f"{path} has no {name}.npy (a log from an older version, or damaged); write it again")
            arr = np.load(fpath, mmap_mode="r")
            shape = (self.meta["count"],) + sizes[axis]
            if arr.shape != shape or arr.dtype != dtype:
                raise KnnlmError(f"{path}/{name}.npy holds {arr.dtype}{list(arr.shape)}, expected "
                                 f"{np.dtype(dtype)}{list(shape)}; the log is damaged, write it again")
            setattr(self, name, arr)

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])


def truncate_log(src: str, dest: str, n: int, chunk: int = 1 << 16) -> Dict:
    """The first n rows of a retrieval log as a new log: the scores an evaluation of the first n tokens would log.

    With --context-window the blocks of a prefix are the blocks of the full split, so each token keeps its context.
    Written through RetrievalLogWriter, so meta.json still comes last. Returns the new log's meta.
    """
    log = RetrievalLog(src)
    if n > log.count:
        raise KnnlmError(f"{src} holds {log.count} rows, fewer than the {n} asked")
    meta = {k: v for k, v in log.meta.items() if k not in ("k", "dim", "count")}
    w = RetrievalLogWriter(dest, log.k, dict(meta, truncated_from=os.path.abspath(src)), dim=log.meta.get("dim", 0))
    for s in range(0, n, chunk):
        w.add(**{name: np.asarray(getattr(log, name)[s : min(s + chunk, n)]) for name in ARRAYS})
    return w.close()
