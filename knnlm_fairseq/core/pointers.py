"""Pointer reuse (RetoMaton, Alon et al. 2022), simulated offline from a retrieval log: how many searches it
saves and what it costs in perplexity, without an LM pass.

After the neighbours of token t are known, the entries that predicted the token that actually came next
(value == x_{t+1}) point on to the following datastore row, the same text one token later: candidates for
the neighbours of t+1. When at least `min_pointers` survive, t+1 uses them (distances recomputed exactly from
the stored keys and its own query) instead of searching; otherwise it searches. A block's first scored row
always searches (its previous token was scored in another block, possibly another batch).
"""
import math
from typing import Dict

import numpy as np

from .datastore import Datastore
from .knn import knn_target_log_probs


def _target_lp(dists: np.ndarray, vals: np.ndarray, target: int, temp: float) -> float:
    import torch

    return float(knn_target_log_probs(torch.from_numpy(dists[None].astype(np.float32)),
                                      torch.from_numpy(vals[None].astype(np.int64)), torch.tensor([target]),
                                      temp)[0])


def simulate(log, dstore: Datastore, kind: str, k: int, temp: float, lmbda: float, min_pointers: int) -> Dict:
    """Replay the log with pointer reuse: searched fraction and perplexity at (kind, k, T, λ).

    Searched rows use the log's own k nearest (as a search would return them); reused rows use the pointers'
    exact distances (approximate ones exist only for what the index returned).
    """
    keys, vals_all = dstore.keys, np.asarray(dstore.vals)
    ends = dstore.offsets[1:]  # a row's successor exists only inside its part (merged datastores)
    n = log.count
    target = np.asarray(log.target, dtype=np.int64)
    lm = np.asarray(log.lm_lp, dtype=np.float64)
    starts = np.asarray(log.block_start)
    dist_log = getattr(log, f"dist_{kind}")
    total, searched = 0.0, 0
    prev_ids = prev_vals = None
    for t in range(n):
        ptr = None
        if prev_ids is not None and not starts[t]:
            ptr = prev_ids[prev_vals == target[t - 1]] + 1  # entries that predicted x_t, one token on
            ptr = ptr[np.searchsorted(ends, ptr - 1, side="right") == np.searchsorted(ends, ptr, side="right")]
        if ptr is not None and len(ptr) >= min_pointers:
            q = np.asarray(log.query[t], dtype=np.float32)
            kk = np.asarray(keys[np.sort(ptr)], dtype=np.float32)  # (m, dim)
            d = ((kk - q) ** 2).sum(1)
            order = np.argsort(d, kind="stable")[:k]
            ids, d = np.sort(ptr)[order], d[order]
            v = vals_all[ids]
        else:
            searched += 1
            ids = np.asarray(log.ids[t, :k])
            ok = ids >= 0
            ids, d, v = ids[ok], np.asarray(dist_log[t, :k])[ok], np.asarray(log.vals[t, :k])[ok]
        if len(ids):
            knn = _target_lp(d, v, int(target[t]), temp)
            total += float(np.logaddexp(lm[t] + math.log1p(-lmbda), knn + math.log(lmbda))) if lmbda > 0 else lm[t]
        else:
            total += lm[t]
        prev_ids, prev_vals = ids, v
    return {"searched": searched / n, "ppl": math.exp(-total / n), "min_pointers": min_pointers, "kind": kind,
            "k": k, "temp": temp, "lmbda": lmbda}
