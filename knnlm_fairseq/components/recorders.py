"""Recording what the hot path saw, per scored token, for offline sweeps (--save-retrieval, --save-cache)."""
from typing import Dict, Sequence

from ..core import cache
from ..core.retrieval_log import RetrievalLogWriter
from .base import Component, Step


class RetrievalRecorder(Component):
    """Each scored token's target, the LM's log-prob of it and its neighbours (ids, values, both distances).
    Place it after the search: it records step.neighbours as found."""

    def __init__(self, log: RetrievalLogWriter):
        self.log = log

    def on_scores(self, step: Step) -> None:
        nb = step.neighbours
        assert nb is not None and nb.exact is not None, "RetrievalRecorder needs a search with both distances"
        self.log.add(target=step.target.cpu().numpy(), lm_lp=step.lm_target_lp.cpu().numpy(),
                     ids=nb.ids.numpy(), vals=nb.values.numpy(), dist_approx=nb.approx.numpy(),
                     dist_exact=nb.exact.numpy())

    def close(self) -> Dict:
        meta = self.log.close()
        return {"rows": meta["count"], "path": self.log.path}


class CacheRecorder(Component):
    """log p_cache(target) for each θ of a grid, from the cache the CacheMixer looked up (place it after)."""

    def __init__(self, log: RetrievalLogWriter, thetas: Sequence[float]):
        self.log, self.thetas = log, list(thetas)

    def on_scores(self, step: Step) -> None:
        sims, vals, ok = step.cache
        self.log.add(target=step.target.cpu().numpy(), lm_lp=step.lm_target_lp.cpu().numpy(),
                     cache_lp=cache.cache_target_log_probs(sims, vals, ok, step.target, self.thetas).cpu().numpy(),
                     found=ok.any(1).cpu().numpy())

    def close(self) -> Dict:
        meta = self.log.close()
        return {"rows": meta["count"], "path": self.log.path}
