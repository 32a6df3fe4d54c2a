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
            for j, t in enumerate(temps):
                knn, found = _prefix_knn_lp(dist, hit, cols, t)  # (c, nk) each
                lm3 = lm.view(-1, 1, 1)
                mix = torch.logaddexp(lm3 + log_1m, knn.unsqueeze(-1) + log_l)  # (c, nk, L)
                mix = torch.where(lam == 0, lm3, mix)
                mix = torch.where(found.unsqueeze(-1), mix, lm3)  # no neighbour: eval keeps the LM
                totals[kind][:, j] += mix.sum(0)
    n = log.count
    return {
        "n_tokens": n,
        "base_ppl": math.exp(-lm_total / n),
        "lmbdas": list(lmbdas), "ks": list(ks), "temps": list(temps),
        "ppl": {kind: torch.exp(-tot / n).numpy() for kind, tot in totals.items()},
    }


def _prefix_knn_lp(dist: torch.Tensor, hit: torch.Tensor, cols: torch.Tensor, temp: float):
    """log p_kNN(target) from the first k neighbours, for every k of cols (= k - 1) at once: (c, nk) float64,
    and whether any of those k was found (c, nk)."""
    ok = torch.isfinite(dist)  # (c, K)
    found = ok.cumsum(1).index_select(1, cols).gt(0)  # (c, nk)
    d = dist.masked_fill(~ok, float("inf"))
    d_min = d.amin(1, keepdim=True).masked_fill(~ok.any(1, keepdim=True), 0.0)  # any per-row shift cancels
    logits = (-(d - d_min) / temp).masked_fill(~ok, float("-inf"))  # (c, K)
    # log Σ over each prefix, for all neighbours and for those that are the target
    lse_all = torch.logcumsumexp(logits, 1).index_select(1, cols)  # (c, nk)
    lse_hit = torch.logcumsumexp(logits.masked_fill(~hit, float("-inf")), 1).index_select(1, cols)
    return (lse_hit - lse_all.masked_fill(~found, 0.0)).double(), found


def token_log_probs(log: RetrievalLog, kind: str, k: int, temp: float, chunk: int = 16384):
    """Per token: the LM's and the kNN's log-prob of its target at one (k, T), and whether any neighbour was found.
    (n,) float64, (n,) float64, (n,) bool. Mix with `mix_knn` for any λ."""
    lm, knn = np.empty(log.count), np.empty(log.count)
    found = np.empty(log.count, dtype=bool)
    cols = torch.tensor([k - 1])
    for s in range(0, log.count, chunk):
        tgt = torch.from_numpy(np.asarray(log.target[s : s + chunk], dtype=np.int64))  # (c,)
        vals = torch.from_numpy(np.asarray(log.vals[s : s + chunk], dtype=np.int64))  # (c, K)
        dist = torch.from_numpy(np.array(getattr(log, f"dist_{kind}")[s : s + chunk]))  # (c, K)
        kl, f = _prefix_knn_lp(dist, vals.eq(tgt.unsqueeze(-1)), cols, temp)  # (c, 1) each
        lm[s : s + chunk] = np.asarray(log.lm_lp[s : s + chunk], dtype=np.float64)
        knn[s : s + chunk], found[s : s + chunk] = kl[:, 0].numpy(), f[:, 0].numpy()
    return lm, knn, found


def mix_knn(lm: np.ndarray, knn: np.ndarray, found: np.ndarray, lmbda: float) -> np.ndarray:
    """log(λ·p_kNN + (1-λ)·p_LM) per token, as eval-lm computes it (the LM's where nothing was found or λ=0)."""
    if lmbda == 0:
        return lm
    with np.errstate(divide="ignore"):
        mix = np.logaddexp(lm + math.log1p(-lmbda), knn + math.log(lmbda))
    return np.where(found, mix, lm)


def sweep_cache(cache_log: RetrievalLog, base_lp: np.ndarray, targets: np.ndarray, mus: Sequence[float]) -> Dict:
    """Perplexity of (1-μ)·p + μ·p_cache for every θ of the log and μ, (nθ, nμ); p is base_lp's (n,) log-probs of
    `targets` (the LM's, or kNN-LM's at one setting). Tokens with an empty cache keep p, as eval-lm does."""
    if len(targets) != cache_log.count or not np.array_equal(np.asarray(cache_log.target), np.asarray(targets)):
        raise ValueError(f"the cache log {cache_log.path} ({cache_log.count:,} tokens) does not score the same tokens "
                         f"as its retrieval log ({len(targets):,}); record both with the same split and eval settings")
    if any(not 0.0 <= m < 1.0 for m in mus):
        raise ValueError("cache weights must be in [0, 1)")
    mu = torch.tensor(mus, dtype=torch.float64)  # (M,)
    base = torch.from_numpy(base_lp).view(-1, 1, 1)  # (n, 1, 1)
    cache = torch.from_numpy(np.asarray(cache_log.cache_lp, dtype=np.float64)).unsqueeze(-1)  # (n, nθ, 1)
    found = torch.from_numpy(np.asarray(cache_log.found)).view(-1, 1, 1)
    mix = torch.logaddexp(base + torch.log1p(-mu), cache + torch.log(mu))  # (n, nθ, M)
    mix = torch.where((mu == 0) | ~found, base, mix)
    return {"thetas": list(cache_log.meta["thetas"]), "mus": list(mus),
            "ppl": torch.exp(-mix.mean(0)).numpy()}


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
