"""Adaptive retrieval with a per-token λ: where the LM is sure of itself, kNN adds little and costs a search.

One signal of the LM's confidence (core/signals.py) is cut into buckets at fixed edges; bucket b gets its own
λ_b (Drozdov et al. 2022), tuned offline on valid by knnlm-sweep. Rows whose λ is 0 do not search (He et al.
2021): their distribution is the LM's exactly.
"""
from typing import Dict, Sequence

import torch

from ..core import adaptive, signals
from .base import Component, Step, Timed


class SignalGate(Component):
    def __init__(self, signal: str, edges: Sequence[float], lmbdas: Sequence[float]):
        adaptive.check_gate(signal, edges, lmbdas)
        self.signal = signal
        self.edges = torch.tensor(list(edges), dtype=torch.float32)  # (B-1,)
        self.lmbdas = torch.tensor(list(lmbdas), dtype=torch.float32)  # (B,)
        self.timer, self.gated = Timed(), 0

    def on_scores(self, step: Step) -> None:
        with self.timer(step.rows.numel()):
            value = signals.SIGNALS[self.signal](step.lp, step.rows, step.signal_cols)  # (N,)
            dev = value.device
            lam = self.lmbdas.to(dev)[torch.bucketize(value, self.edges.to(dev), right=True)]  # (N,)
            step.lmbda = lam
            step.search &= lam > 0
            self.gated += int((lam == 0).sum())

    def close(self) -> Dict:
        return dict(self.timer.stats(), skipped=self.gated)
