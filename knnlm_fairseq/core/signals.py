"""How sure the LM is, per position: cheap signals that decide where retrieval is worth its cost (pure torch).

Adaptive retrieval (He et al. 2021) skips the search where such a signal says kNN will not help, and a
per-token λ (Drozdov et al. 2022) weighs p_kNN by it. Both read the LM's log-probs of the scored rows.

`cols`: how many leading columns of the log-probs are a real distribution for every row. With an adaptive
softmax, fairseq computes a tail cluster only for the rows whose target falls in it (the other rows hold zeros
there), so only the head words (the first cutoff[0] columns) are valid for all rows; a signal read from more
would depend on the target. Over the head, the missing mass (the tail clusters together) counts as one outcome.
"""
from typing import Callable, Dict, Optional

import torch

CHUNK = 256  # rows per pass: 256 x V floats of temporaries, never N x V


def _rowwise(fn: Callable[[torch.Tensor], torch.Tensor], lp: torch.Tensor, rows: torch.Tensor,
             cols: Optional[int]) -> torch.Tensor:
    out = torch.empty(rows.numel(), dtype=torch.float32, device=lp.device)
    for s in range(0, rows.numel(), CHUNK):
        out[s : s + CHUNK] = fn(lp[rows[s : s + CHUNK], :cols].float())
    return out


def entropy(lp: torch.Tensor, rows: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
    """H(p_LM) in nats over the first `cols` words plus the rest of the mass as one outcome; (N,) float32."""
    def h(x):
        p = x.exp()
        inside = -torch.where(torch.isfinite(x), p * x, torch.zeros((), device=x.device)).sum(-1)
        rest = (1 - p.sum(-1)).clamp_min(0)
        return inside - torch.where(rest > 0, rest * rest.clamp_min(1e-30).log(), torch.zeros((), device=x.device))

    return _rowwise(h, lp, rows, cols)


def max_log_prob(lp: torch.Tensor, rows: torch.Tensor, cols: Optional[int] = None) -> torch.Tensor:
    """log max_w p_LM(w) over the first `cols` words; (N,) float32."""
    return _rowwise(lambda x: x.amax(-1), lp, rows, cols)


SIGNALS: Dict[str, Callable[..., torch.Tensor]] = {
    "entropy": entropy,  # high: the LM is unsure, retrieval may help
    "max_lp": max_log_prob,  # low: the same, read from the top word only (one pass, no exp)
}
