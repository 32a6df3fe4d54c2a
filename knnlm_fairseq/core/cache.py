"""Continuous cache (Grave, Joulin & Usunier 2017) over the block being scored (pure torch).

The hidden states of the most recent positions of the evaluated text, context window included, form a
second, local datastore: position i stores (h_i, the token that followed it). For a query at position t,
p_cache(w) ∝ Σ_{i in [t - size, t), next(i) = w} exp(θ · h_t · h_i). Only positions strictly before t are
used, and next(i) = token i + 1 <= t is input the model has already seen: never the target of t.
"""
from typing import Tuple

import torch

from .knn import knn_scores


def similarities(states: torch.Tensor) -> torch.Tensor:
    """All dot products within each block: (B, T, C) -> (B, T, T), in float32."""
    h = states.float()
    return torch.bmm(h, h.transpose(1, 2))


def cache_neighbours(sims: torch.Tensor, tokens: torch.Tensor, pad: int, rows: torch.Tensor,
                     size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For query rows (flat indices into B*T), the cached positions t-1, ..., t-size of the same block.

    Returns sims (n, W) float, vals (n, W) the token that followed each cached position, and ok (n, W)
    marking cached positions that exist (>= 0, not padding, followed by a real token). W = min(size, T-1).
    """
    B, T, _ = sims.shape
    W = max(min(size, T - 1), 1)
    b, t = rows // T, rows % T  # (n,)
    pos = t.unsqueeze(1) - torch.arange(1, W + 1, device=rows.device)  # (n, W) most recent first
    ok = pos.ge(0)
    pos = pos.clamp_min(0)
    bb = b.unsqueeze(1).expand_as(pos)  # (n, W)
    vals = tokens[bb, (pos + 1).clamp_max(T - 1)]  # (n, W) next token: at most position t, which is input
    ok &= tokens[bb, pos].ne(pad) & vals.ne(pad)
    s = sims[bb, t.unsqueeze(1).expand_as(pos), pos]  # (n, W)
    return s, vals, ok


def cache_dists(sims: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """As kNN distances (smaller is closer, inf = absent): -h_t·h_i, so that temperature 1/θ gives exp(θ h_t·h_i)."""
    return (-sims).masked_fill(~ok, float("inf"))


def cache_target_log_probs(sims: torch.Tensor, vals: torch.Tensor, ok: torch.Tensor, target: torch.Tensor,
                           thetas) -> torch.Tensor:
    """log p_cache(target) for each θ, (n, len(thetas)); -inf where the target is not cached (or nothing is)."""
    d = cache_dists(sims, ok)  # (n, W)
    hit = vals.eq(target.unsqueeze(1)) & ok  # (n, W)
    out = []
    for theta in thetas:
        scores = knn_scores(d, 1.0 / theta)  # (n, W) normalized log weights
        out.append(torch.logsumexp(scores.masked_fill(~hit, float("-inf")), dim=1))
    return torch.stack(out, dim=1)
