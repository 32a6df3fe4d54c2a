"""Recording what the hot path saw, per scored token, for offline sweeps (--save-retrieval, --save-cache)."""
import math
from typing import Dict, Sequence

from ..core import cache, signals
from ..core.retrieval_log import RetrievalLogWriter
from .base import Component, Step


class RetrievalRecorder(Component):
    """Each scored token's target, the LM's log-prob of it, its query and the LM's confidence signals, and its
    neighbours (ids, values, both distances). Place it after the search and before any mixer: it records
    step.neighbours as found and step.lp as the LM's."""

    def __init__(self, log: RetrievalLogWriter, key_type: str):
        self.log, self.key_types = log, (key_type,)
        self.lm_nll, self.count = 0.0, 0  # the base LM's loss over the recorded tokens, said beside the untuned one

    def on_scores(self, step: Step) -> None:
        self.lm_nll -= float(step.lm_target_lp.double().sum())
        self.count += int(step.lm_target_lp.numel())
        nb = step.neighbours
        assert nb is not None and nb.exact is not None, "RetrievalRecorder needs a search with both distances"
        self.log.add(target=step.target.cpu().numpy(), lm_lp=step.lm_target_lp.cpu().numpy(),
                     ids=nb.ids.numpy(), vals=nb.values.numpy(), dist_approx=nb.approx.numpy(),
                     dist_exact=nb.exact.numpy(), query=step.keys(self.key_types[0]).cpu().numpy(),
                     lm_entropy=signals.entropy(step.lp, step.rows, step.signal_cols).cpu().numpy(),
                     lm_max_lp=signals.max_log_prob(step.lp, step.rows, step.signal_cols).cpu().numpy(),
                     block_start=step.block_start.cpu().numpy())

    def close(self) -> Dict:
        meta = self.log.close()
        return {"rows": meta["count"], "path": self.log.path,
                "base_ppl": math.exp(self.lm_nll / self.count) if self.count else None}


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
