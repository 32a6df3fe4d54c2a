"""kNN-LM math in log space: neighbour distributions and interpolation (pure torch).

p_kNN(w) ∝ Σ_{j: v_j = w} exp(-d_j / T) over the k retrieved neighbours (distances "smaller is closer";
inner products are passed negated). Neighbours that were not found carry d = inf.
"""
import math
from typing import Union

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


Lambda = Union[float, torch.Tensor]  # one λ for all rows, or a per-row (N,) tensor


def _log_weights(lmbda: Lambda, like: torch.Tensor):
    """log(1-λ) and log λ: Python floats for one λ (as the paper's code computes them), else float64 tensors
    cast to `like`'s dtype and shaped (N, 1, ...) to broadcast against its rows."""
    if not torch.is_tensor(lmbda):
        return (math.log(1.0 - lmbda) if lmbda < 1.0 else float("-inf"),
                math.log(lmbda) if lmbda > 0.0 else float("-inf"))
    lam = lmbda.to(device=like.device, dtype=torch.float64).view(-1, *([1] * (like.dim() - 1)))  # (N, 1, ...)
    return torch.log1p(-lam).to(like.dtype), torch.log(lam).to(like.dtype)


def check_lmbda(lmbda: Lambda) -> None:
    lam = torch.as_tensor(lmbda)
    if lam.numel() and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")


def interpolate(lm_lp: torch.Tensor, knn_lp: torch.Tensor, lmbda: Lambda) -> torch.Tensor:
    """log(λ·p_kNN + (1-λ)·p_LM), elementwise; λ may be per row. λ=0 gives the LM and λ=1 the kNN log-probs
    unchanged."""
    check_lmbda(lmbda)
    if not torch.is_tensor(lmbda):
        if lmbda == 0.0:
            return lm_lp
        if lmbda == 1.0:
            return knn_lp
    log_1m, log_l = _log_weights(lmbda, lm_lp)
    # rows at λ=0 are the LM exactly: logaddexp(x, -inf) = x
    return torch.logaddexp(lm_lp + log_1m, knn_lp + log_l)


def interpolate_full(lm_lp: torch.Tensor, dists: torch.Tensor, vals: torch.Tensor, lmbda: Lambda,
                     temp: float = 1.0) -> torch.Tensor:
    """Interpolated log-probs over the whole vocabulary, (N, V), from LM log-probs (N, V) and k neighbours.

    p_kNN is zero off the (at most k) retrieved words, so those entries are just log(1-λ) + LM;
    only the neighbours' words need a logaddexp. λ: a float or a per-row (N,) tensor.
    """
    if not torch.is_tensor(lmbda) and lmbda == 0.0:
        return lm_lp
    nb = neighbor_log_probs(dists, vals, temp)  # (N, k)
    log_1m, _ = _log_weights(lmbda, lm_lp)
    out = lm_lp + log_1m  # (N, V); -inf at λ=1
    return out.scatter_(1, vals, interpolate(lm_lp.gather(1, vals), nb, lmbda))


def _runs(rows: torch.Tensor):
    """Maximal runs of consecutive values in increasing rows: [(i, j, first row)], rows[i:j] = first + 0..j-i-1."""
    if rows.numel() == 0:
        return []
    breaks = (torch.diff(rows) != 1).nonzero().squeeze(1) + 1  # (R-1,) where a new run starts
    starts = [0] + breaks.tolist()
    ends = starts[1:] + [rows.numel()]
    firsts = rows[starts].tolist()
    return list(zip(starts, ends, firsts))


_SCRATCH: dict = {}  # (V, device) -> a zeroed (256, V) float32 buffer, kept zero between calls


def _scratch(rows: int, vocab: int, device) -> torch.Tensor:
    buf = _SCRATCH.get((vocab, str(device)))
    if buf is None or buf.size(0) < rows:
        buf = _SCRATCH[(vocab, str(device))] = torch.zeros(max(rows, 256), vocab, device=device)
    return buf[:rows]


def mix_rows(lp: torch.Tensor, rows: torch.Tensor, dists: torch.Tensor, vals: torch.Tensor, lmbda: Lambda,
             temp: float, chunk: int = 256) -> None:
    """In place: lp[rows] becomes log(λ·p_kNN + (1-λ)·p), p = exp(lp[rows]); λ a float or per row (N,).

    lp (n, V); rows (N,) increasing, each with at least one finite distance; dists, vals (N, k). Off the
    retrieved words this is log(1-λ) + lp, added in place over runs of consecutive rows (one pass over memory,
    no (N, V) copies); at the k retrieved words, p_kNN sums the weights of equal words (scatter-add into a
    scratch row that is zeroed again by scattering zeros: O(k) per row, not O(V)). Equals interpolate_full on
    each row up to float32 rounding.
    """
    per_row = torch.is_tensor(lmbda)
    for s in range(0, rows.numel(), chunk):
        r, v = rows[s : s + chunk], vals[s : s + chunk]  # (c,), (c, k)
        lam = lmbda[s : s + chunk] if per_row else lmbda
        log_1m, log_l = _log_weights(lam, dists)  # floats, or (c, 1) each
        at = torch.empty(v.shape, dtype=torch.float32, device=lp.device)  # (c, k) the LM at the neighbours' words
        for i, j, first in _runs(r):
            at[i:j] = lp[first : first + j - i].gather(1, v[i:j]).float()
        buf = _scratch(r.numel(), lp.size(1), lp.device)  # (c, V) zeros
        buf.scatter_add_(1, v, knn_scores(dists[s : s + chunk], temp).exp())  # p_kNN of each retrieved word
        p_knn = buf.gather(1, v)  # (c, k) the word's total, repeated for each of its neighbours
        buf.scatter_(1, v, 0.0)
        mixed = torch.logaddexp(at + log_1m, p_knn.log() + log_l).to(lp.dtype)  # (c, k)
        for i, j, first in _runs(r):
            block = lp[first : first + j - i]
            block.add_(log_1m if not per_row else log_1m[i:j].to(lp.dtype))
            block.scatter_(1, v[i:j], mixed[i:j])  # equal words of a row carry equal values
