"""The evaluation hot path as a pipeline of small components (pure torch; no fairseq).

A scorer (fairseq-eval-lm's SequenceScorer, or our own loop) runs the LM forward once per batch, then asks for
normalized log-probabilities, possibly in chunks of positions (--softmax-batch). The pipeline turns those two
calls into a sequence of component calls:

    on_forward(batch)  once per forward: the input tokens and the states captured at every key type any
                       component asked for, batch-first (B, T, C)
    on_scores(step)    once per chunk: the scored rows of the chunk, their keys and targets, the LM's log-probs
                       and the log-probs being returned, which components may rewrite row by row (in order)
    close()            once at the end of the split: finish files; returns the component's statistics

A new retrieval technique is one more component placed in the list, e.g. a gate that clears `step.search`
for some rows before the search runs, or a recorder that reads `step.neighbours` after it.
"""
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..core.keys import KeyCapture
from ..core.retriever import Neighbours


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) input tokens of the forward
    keys: Dict[str, torch.Tensor]  # key type -> (B, T, C) states captured during the forward
    pad: int  # the padding id: positions holding it are not tokens


@dataclass
class Step:
    """One chunk of n flattened positions (rows of B*T, in the order the scorer asks for them)."""

    batch: Batch
    first: int  # flat index into B*T of the chunk's first row
    lp: torch.Tensor  # (n, V) log-probs being returned; components overwrite rows in place
    rows: torch.Tensor  # (N,) chunk rows that are scored (not padding, not the context window)
    target: Optional[torch.Tensor]  # (N,) their targets; None when the scorer gave no sample
    lm_target_lp: Optional[torch.Tensor]  # (N,) the LM's own log-prob of each target, before any component
    search: torch.Tensor  # (N,) bool: rows that retrieve; gates clear rows
    block_start: torch.Tensor  # (N,) bool: the row's previous position is not scored (a block's first scored row)
    signal_cols: Optional[int] = None  # leading columns of lp valid for every row (core/signals.py); None: all
    lmbda: Optional[torch.Tensor] = None  # (N,) per-row kNN weight, when a component sets one
    neighbours: Optional[Neighbours] = None  # (N, k), set by the search; rows that did not search find nothing
    cache: Optional[tuple] = None  # continuous cache (sims, vals, ok), each (N, W), set by the cache component
    extras: Dict[str, object] = field(default_factory=dict)  # what one component leaves for a later one

    def keys(self, key_type: str) -> torch.Tensor:
        """The scored rows' states at `key_type`, (N, C)."""
        keys = self.batch.keys[key_type]
        flat = keys.reshape(-1, keys.size(-1))  # (B*T, C): the order --softmax-batch chunks in
        return flat[self.first + self.rows]


class Component:
    """Base class: override what the component needs; `key_types` names the states it reads."""

    key_types: Sequence[str] = ()

    def on_forward(self, batch: Batch) -> None:
        pass

    def on_scores(self, step: Step) -> None:
        pass

    def close(self) -> Dict:
        return {}


class Timed:
    """Seconds spent and rows handled by a component, for its closing statistics."""

    def __init__(self):
        self.seconds, self.rows = 0.0, 0

    def __call__(self, rows: int):
        self.rows += rows
        return self

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self.t0

    def stats(self) -> Dict:
        return {"rows": self.rows, "seconds": round(self.seconds, 3)}


class Pipeline:
    """Captures the key types its components read and runs them in order on every forward and chunk."""

    def __init__(self, decoder, components: List[Component], pad: int):
        self.components, self.pad = list(components), pad
        # an adaptive softmax fills a tail cluster only for rows whose target is in it: signals read the head
        adaptive = getattr(decoder, "adaptive_softmax", None)
        self.signal_cols = int(adaptive.cutoff[0]) if adaptive is not None else None
        key_types = {kt for c in self.components for kt in c.key_types}
        self.captures = {kt: KeyCapture(decoder, kt) for kt in sorted(key_types)}
        self.batch: Optional[Batch] = None
        self.cursor = 0
        self.prev_scored = False  # whether the position before the next chunk's first one is scored

    def on_forward(self, tokens: torch.Tensor) -> None:
        self.batch = Batch(tokens=tokens, keys={kt: c.keys for kt, c in self.captures.items()}, pad=self.pad)
        self.cursor = 0
        self.prev_scored = False
        for c in self.components:
            c.on_forward(self.batch)

    def on_scores(self, lm_lp: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
        """lm_lp (B', T', V) for the next chunk of positions, target (B', T') or None -> log-probs (B', T', V)."""
        if not self.components:
            return lm_lp
        n = lm_lp.size(0) * lm_lp.size(1)
        first, self.cursor = self.cursor, self.cursor + n
        total = self.batch.tokens.numel()
        assert self.cursor <= total, "log-probs asked for more positions than the forward produced"
        flat = lm_lp.reshape(n, -1)  # (n, V): fresh from the LM's softmax, ours to overwrite
        if target is not None:
            tgt = target.reshape(-1)  # (n,)
            scored = tgt.ne(self.pad)  # (n,) context-window and padding positions are out
            rows = scored.nonzero().squeeze(1)  # (N,)
            tgt = tgt[rows]
            lm_target_lp = flat[rows, tgt].float()  # (N,), before any component rewrites a row
        else:
            scored = torch.ones(n, dtype=torch.bool, device=flat.device)
            rows, tgt, lm_target_lp = torch.arange(n, device=flat.device), None, None
        prev = torch.cat([scored.new_tensor([self.prev_scored]), scored[:-1]])  # (n,) the position before is scored
        width = self.batch.tokens.size(1)
        block_start = (~prev | ((torch.arange(n, device=flat.device) + first) % width == 0))[rows]  # (N,)
        self.prev_scored = bool(scored[-1])
        step = Step(batch=self.batch, first=first, lp=flat, rows=rows, target=tgt, lm_target_lp=lm_target_lp,
                    search=torch.ones(rows.numel(), dtype=torch.bool, device=flat.device), block_start=block_start,
                    signal_cols=self.signal_cols)
        if rows.numel():
            for c in self.components:
                c.on_scores(step)
        return step.lp.view(lm_lp.shape)  # reshape may have copied a non-contiguous input: return what we wrote

    def close(self) -> Dict[str, Dict]:
        """Close every component once; {component name: statistics}."""
        stats = {}
        for c in self.components:
            stats[type(c).__name__] = c.close()
        return stats

    def remove(self) -> None:
        for cap in self.captures.values():
            cap.remove()
