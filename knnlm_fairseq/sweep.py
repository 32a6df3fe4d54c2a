"""Offline sweep of λ, k and T over a retrieval log: no LM forward, no search, one read of the log.

Each token's interpolated log-prob is log(λ·p_kNN + (1-λ)·p_LM) of its target, exactly as `--knnlm`
computes it in eval-lm; k' < k uses the k' nearest (faiss's order), as a search with k' would return.
"""
import math
from typing import Dict, Sequence

import numpy as np
import torch

from .retrieval_log import RetrievalLog

KINDS = ("approx", "exact")


def sweep(log: RetrievalLog, lmbdas: Sequence[float], ks: Sequence[int], temps: Sequence[float],
          kinds: Sequence[str] = KINDS, chunk: int = 16384) -> Dict:
    """Perplexity for every (kind, k, T, λ): {"ppl": {kind: array (len(ks), len(temps), len(lmbdas))}, ...}."""
    bad = [k for k in ks if not 1 <= k <= log.k]
    if bad:
        raise ValueError(f"k values {bad} are outside 1..{log.k}, the k the log was written with")
    if any(not 0.0 <= lm < 1.0 for lm in lmbdas):
        raise ValueError("λ values must be in [0, 1): at λ=1 a target no neighbour predicts has probability 0")
    if any(t <= 0 for t in temps):
        raise ValueError("temperatures must be > 0")
    lam = torch.tensor(lmbdas, dtype=torch.float64)  # (L,)
    log_1m = torch.log1p(-lam)  # (L,)
    log_l = torch.log(lam)  # (L,); -inf at λ=0, where the mixture is the LM itself
    totals = {kind: torch.zeros(len(ks), len(temps), len(lmbdas), dtype=torch.float64) for kind in kinds}
    lm_total = 0.0
    for s in range(0, log.count, chunk):
        tgt = torch.from_numpy(np.asarray(log.target[s : s + chunk], dtype=np.int64))  # (c,)
        lm = torch.from_numpy(np.asarray(log.lm_lp[s : s + chunk], dtype=np.float64))  # (c,)
        vals = torch.from_numpy(np.asarray(log.vals[s : s + chunk], dtype=np.int64))  # (c, K)
        lm_total += float(lm.sum())
        hit = vals.eq(tgt.unsqueeze(-1))  # (c, K)
        cols = torch.tensor([k - 1 for k in ks])  # prefix ends: the k nearest in faiss's order
        for kind in kinds:
            dist = torch.from_numpy(np.array(getattr(log, f"dist_{kind}")[s : s + chunk]))  # (c, K)
            ok = torch.isfinite(dist)
            found = ok.cumsum(1).index_select(1, cols).gt(0).unsqueeze(-1)  # (c, nk, 1); none: eval keeps the LM
            d = dist.masked_fill(~ok, float("inf"))
            d_min = d.amin(1, keepdim=True).masked_fill(~ok.any(1, keepdim=True), 0.0)  # any per-row shift cancels
            for j, t in enumerate(temps):
                logits = (-(d - d_min) / t).masked_fill(~ok, float("-inf"))  # (c, K)
                # every k at once: log Σ over each prefix, for all neighbours and for those that are the target
                lse_all = torch.logcumsumexp(logits, 1).index_select(1, cols)  # (c, nk)
                lse_hit = torch.logcumsumexp(logits.masked_fill(~hit, float("-inf")), 1).index_select(1, cols)
                knn = (lse_hit - lse_all.masked_fill(~found.squeeze(-1), 0.0)).double().unsqueeze(-1)  # (c, nk, 1)
                lm3 = lm.view(-1, 1, 1)
                mix = torch.logaddexp(lm3 + log_1m, knn + log_l)  # (c, nk, L)
                mix = torch.where(lam == 0, lm3, mix)
                mix = torch.where(found, mix, lm3)
                totals[kind][:, j] += mix.sum(0)
    n = log.count
    return {
        "n_tokens": n,
        "base_ppl": math.exp(-lm_total / n),
        "lmbdas": list(lmbdas), "ks": list(ks), "temps": list(temps),
        "ppl": {kind: torch.exp(-tot / n).numpy() for kind, tot in totals.items()},
    }


def best(result: Dict, kind: str, k: int = None, temp: float = None) -> Dict:
    """The lowest-perplexity setting of `kind`, optionally with k and/or T held fixed."""
    ppl = result["ppl"][kind].copy()
    if k is not None:
        mask = np.array(result["ks"]) != k
        ppl[mask] = np.inf
    if temp is not None:
        ppl[:, np.array(result["temps"]) != temp] = np.inf
    i, j, l = np.unravel_index(np.argmin(ppl), ppl.shape)
    return {"kind": kind, "k": result["ks"][i], "temp": result["temps"][j], "lmbda": result["lmbdas"][l],
            "ppl": float(ppl[i, j, l])}


def lookup(result: Dict, kind: str, k: int, temp: float, lmbda: float) -> float:
    i, j = result["ks"].index(k), result["temps"].index(temp)
    return float(result["ppl"][kind][i, j, result["lmbdas"].index(lmbda)])
