"""kNN-LM's two hot-path jobs: search the datastore for the scored rows, and mix p_kNN into their log-probs."""
from typing import Dict, Optional

import torch

from ..core import knn
from ..core.retriever import Neighbours, Retriever
from .base import Component, Step, Timed


def no_neighbours(n: int, k: int, with_exact: bool) -> Neighbours:
    """n rows that found nothing: what a row the search skipped holds."""
    inf = torch.full((n, k), float("inf"))
    return Neighbours(ids=torch.full((n, k), -1, dtype=torch.long), values=torch.zeros(n, k, dtype=torch.long),
                      approx=inf, exact=inf.clone() if with_exact else None)


class KnnSearch(Component):
    """Sets step.neighbours: one batched search for the rows whose `step.search` is set; the others find nothing.

    both_distances: compute exact distances too whatever the retriever's setting (a retrieval log records both).
    """

    def __init__(self, retriever: Retriever, key_type: str, both_distances: bool = False):
        self.retriever, self.key_types = retriever, (key_type,)
        self.exact = True if both_distances else None
        self.timer, self.searched = Timed(), 0

    def on_scores(self, step: Step) -> None:
        queries = step.keys(self.key_types[0])  # (N, C)
        with self.timer(len(queries)):
            sel = step.search.nonzero().squeeze(1).cpu()  # (S,) rows that search
            self.searched += sel.numel()
            if sel.numel() == len(queries):
                step.neighbours = self.retriever.search(queries, exact=self.exact)
                return
            with_exact = self.exact or self.retriever.exact
            nb = no_neighbours(len(queries), self.retriever.k, with_exact)
            if sel.numel():
                found = self.retriever.search(queries[sel.to(queries.device)], exact=self.exact)
                for name in ("ids", "values", "approx", "exact"):
                    if getattr(nb, name) is not None:
                        getattr(nb, name)[sel] = getattr(found, name)
            step.neighbours = nb

    def close(self) -> Dict:
        stats = self.timer.stats()
        return dict(stats, searched=self.searched, queries_per_s=round(self.searched / max(stats["seconds"], 1e-9)),
                    **{f"{name}_seconds": round(t, 3) for name, t in self.retriever.seconds.items()})


class KnnMixer(Component):
    """p = λ·p_kNN + (1-λ)·p on the rows that found a neighbour; λ is step.lmbda per row when a component set
    it, else this mixer's own. kind: which distances p_kNN uses ('exact' or 'approx').

    target_only: interpolate only each row's target (all fairseq-eval-lm reads, and all the original kNN-LM code
    computes); the row's other words keep the LM's log-probs. The perplexity and word probabilities are the same;
    the rows are no longer distributions, as fairseq's own adaptive softmax leaves them when given a target.
    """

    def __init__(self, lmbda: float, temp: float, kind: str, chunk: int = 256, target_only: bool = False):
        knn.check_lmbda(lmbda)
        self.lmbda, self.temp, self.kind, self.target_only = lmbda, temp, kind, target_only
        self.chunk = chunk  # mixed rows per step: 256 x V floats (34 MB at V = 33k)
        self.timer = Timed()

    def on_scores(self, step: Step) -> None:
        nb: Optional[Neighbours] = step.neighbours
        per_row = step.lmbda is not None
        if nb is None or (not per_row and self.lmbda == 0):
            return  # nothing retrieved, or recording only: the distribution is unchanged
        with self.timer(len(nb)):
            dev = step.lp.device
            dists = nb.dists(self.kind).to(dev)  # (N, k)
            mix = torch.isfinite(dists).any(-1)  # (N,) a row with no neighbour at all keeps its distribution
            if per_row:
                mix &= step.lmbda > 0
            sel = mix.nonzero().squeeze(1)
            lam = step.lmbda[sel] if per_row else self.lmbda
            if self.target_only and step.target is not None:
                rows, tgt = step.rows[sel], step.target[sel]
                knn_lp = knn.knn_target_log_probs(dists[sel], nb.values.to(dev)[sel], tgt, self.temp)  # (S,)
                at = step.lp[rows, tgt].float()
                step.lp[rows, tgt] = knn.interpolate(at, knn_lp, lam).to(step.lp.dtype)
            else:
                knn.mix_rows(step.lp, step.rows[sel], dists[sel], nb.values.to(dev)[sel], lam, self.temp, self.chunk)

    def close(self) -> Dict:
        return self.timer.stats()
