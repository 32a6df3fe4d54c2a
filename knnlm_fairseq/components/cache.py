"""The continuous cache (Grave et al. 2017) on the hot path: p = (1-μ)·p + μ·p_cache over the block's own states."""
from typing import Dict

from ..core import cache, knn
from .base import Batch, Component, Step, Timed


class CacheMixer(Component):
    """Looks up each scored row's cache (the `size` positions before it in its block, context window included),
    leaves it in step.cache for recorders, and mixes it in with weight μ (rows with an empty cache keep p)."""

    def __init__(self, key_type: str, size: int, theta: float, mu: float, chunk: int = 256):
        self.key_types = (key_type,)
        self.size, self.theta, self.mu, self.chunk = size, theta, mu, chunk
        self.timer = Timed()

    def on_forward(self, batch: Batch) -> None:
        self.tokens, self.pad = batch.tokens, batch.pad  # (B, T)
        self.sims = cache.similarities(batch.keys[self.key_types[0]])  # (B, T, T)

    def on_scores(self, step: Step) -> None:
        with self.timer(step.rows.numel()):
            sims, vals, ok = cache.cache_neighbours(self.sims, self.tokens, self.pad, step.rows + step.first,
                                                    self.size)
            step.cache = (sims, vals, ok)  # (N, W) each
            if self.mu == 0:
                return
            has = ok.any(1).nonzero().squeeze(1)  # rows with an empty cache (a split's first token) keep p
            dists = cache.cache_dists(sims, ok)
            knn.mix_rows(step.lp, step.rows[has], dists[has], vals[has], self.mu, 1.0 / self.theta, self.chunk)

    def close(self) -> Dict:
        return self.timer.stats()
