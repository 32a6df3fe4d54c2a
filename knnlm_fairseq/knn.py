"""kNN-LM math in log space: neighbour distributions and interpolation (pure torch).

p_kNN(w) ∝ Σ_{j: v_j = w} exp(-d_j / T) over the k retrieved neighbours (distances "smaller is closer";
inner products are passed negated). Neighbours that were not found carry d = inf.
"""
import math

import torch


def knn_scores(dists: torch.Tensor, temp: float) -> torch.Tensor:
    """log of each neighbour's normalized weight, (N, k); -inf for missing neighbours."""
    if temp <= 0:
        raise ValueError(f"kNN temperature must be > 0, got {temp}")
    found = torch.isfinite(dists)
    d = dists.float().masked_fill(~found, float("inf"))
    # shift by each row's nearest distance first: -(d - d_min)/T is exact where -d/T would round at large |d|
    d_min = d.amin(dim=-1, keepdim=True)
    d_min = d_min.masked_fill(~torch.isfinite(d_min), 0.0)
    logits = (-(d - d_min) / temp).masked_fill(~found, float("-inf"))  # (N, k)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (N, 1); -inf where nothing was found
    return logits - lse.masked_fill(~torch.isfinite(lse), 0.0)


def neighbor_log_probs(dists: torch.Tensor, vals: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """log p_kNN(v_j) for each neighbour j, (N, k): neighbours sharing a value share its total.

    Groups equal values within a row by sorting, so memory stays O(N·k), never O(N·V).
    """
    scores = knn_scores(dists, temp)  # (N, k)
    sv, order = vals.sort(dim=1)  # (N, k)
    ss = scores.gather(1, order)
    seg = torch.zeros_like(sv)
    seg[:, 1:] = (sv[:, 1:] != sv[:, :-1]).long().cumsum(1)  # segment id of each sorted neighbour
    peak = torch.full_like(ss, float("-inf")).scatter_reduce_(1, seg, ss, reduce="amax")  # (N, k)
    safe_peak = peak.masked_fill(~torch.isfinite(peak), 0.0)
    total = torch.zeros_like(ss).scatter_add_(1, seg, (ss - safe_peak.gather(1, seg)).exp())
    seg_lp = total.log() + safe_peak  # logsumexp per segment; -inf for all-missing segments
    out = torch.empty_like(ss)
    out.scatter_(1, order, seg_lp.gather(1, seg))  # back to the neighbours' original order
    return out


def knn_log_probs(dists: torch.Tensor, vals: torch.Tensor, vocab_size: int, temp: float = 1.0) -> torch.Tensor:
    """log p_kNN(w) for every word, (N, V); -inf for words no neighbour points to."""
    lp = neighbor_log_probs(dists, vals, temp)  # (N, k)
    return lp.new_full((lp.size(0), vocab_size), float("-inf")).scatter_(1, vals, lp)


def knn_target_log_probs(dists: torch.Tensor, vals: torch.Tensor, target: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """log p_kNN(target) per row without touching the vocabulary, (N,)."""
    scores = knn_scores(dists, temp)  # (N, k)
    hit = vals.eq(target.unsqueeze(-1))  # (N, k)
    return torch.logsumexp(scores.masked_fill(~hit, float("-inf")), dim=-1)


def interpolate(lm_lp: torch.Tensor, knn_lp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(λ·p_kNN + (1-λ)·p_LM), elementwise; λ=0 returns the LM and λ=1 the kNN log-probs unchanged."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
    if lmbda == 0.0:
        return lm_lp
    if lmbda == 1.0:
        return knn_lp
    return torch.logaddexp(lm_lp + math.log(1.0 - lmbda), knn_lp + math.log(lmbda))


def interpolate_full(lm_lp: torch.Tensor, dists: torch.Tensor, vals: torch.Tensor, lmbda: float,
                     temp: float = 1.0) -> torch.Tensor:
    """Interpolated log-probs over the whole vocabulary, (N, V), from LM log-probs (N, V) and k neighbours.

    p_kNN is zero off the (at most k) retrieved words, so those entries are just log(1-λ) + LM;
    only the neighbours' words need a logaddexp.
    """
    if lmbda == 0.0:
        return lm_lp
    nb = neighbor_log_probs(dists, vals, temp)  # (N, k)
    out = lm_lp + (math.log(1.0 - lmbda) if lmbda < 1.0 else float("-inf"))
    return out.scatter_(1, vals, interpolate(lm_lp.gather(1, vals), nb, lmbda))
