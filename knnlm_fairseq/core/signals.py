"""How sure the LM is, per position: cheap signals that decide where retrieval is worth its cost (pure torch).

Adaptive retrieval (He et al. 2021) skips the search where such a signal says kNN will not help, and a
per-token λ (Drozdov et al. 2022) weighs p_kNN by it. Both read the LM's log-probs of the scored rows.
"""
from typing import Callable, Dict

import torch

CHUNK = 256  # rows per pass: 256 x V floats of temporaries, never N x V


def _rowwise(fn: Callable[[torch.Tensor], torch.Tensor], lp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.empty(rows.numel(), dtype=torch.float32, device=lp.device)
    for s in range(0, rows.numel(), CHUNK):
        out[s : s + CHUNK] = fn(lp[rows[s : s + CHUNK]].float())
    return out


def entropy(lp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """H(p_LM) in nats for rows of log-probs lp (n, V); (N,) float32. Words of probability 0 add nothing."""
    def h(x):
        return -torch.where(torch.isfinite(x), x.exp() * x, torch.zeros((), device=x.device)).sum(-1)

    return _rowwise(h, lp, rows)


def max_log_prob(lp: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """log max_w p_LM(w) for rows of lp (n, V); (N,) float32."""
    return _rowwise(lambda x: x.amax(-1), lp, rows)


SIGNALS: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "entropy": entropy,  # high: the LM is unsure, retrieval may help
    "max_lp": max_log_prob,  # low: the same, read from the top word only (one pass, no exp)
}
