"""KnnLM: wraps any fairseq language model so that its normalized probabilities are kNN-LM's.

fairseq's SequenceScorer (behind fairseq-eval-lm) calls `model(**net_input)` and then
`model.get_normalized_probs(...)`, possibly on chunks of positions (--softmax-batch). Keys are captured
by a forward hook during the first call and consumed in order by the second, so every scored
position meets exactly its own key.
"""
import logging
import time
from typing import Optional

import torch
from fairseq.models import BaseFairseqModel

from .. import cache, knn
from ..keys import KeyCapture

logger = logging.getLogger(__name__)


class KnnLM(BaseFairseqModel):
    """An LM plus, optionally, a datastore writer (dump) and a retriever (interpolation)."""

    def __init__(self, lm: BaseFairseqModel, key_type: str, pad: int, vocab_size: int,
                 retriever=None, lmbda: float = 0.0, temp: float = 1.0):
        super().__init__()
        self.lm = lm
        self.capture = KeyCapture(lm.decoder, key_type)
        self.pad, self.vocab_size = pad, vocab_size
        self.retriever, self.lmbda, self.temp = retriever, lmbda, temp
        self.writer = None  # set by the task once the split is known
        self.recorder = None  # a RetrievalLogWriter, for offline sweeps
        self._keys: Optional[torch.Tensor] = None
        self._cursor = 0
        self.knn_seconds = 0.0
        self.knn_queries = 0
        self.rows_per_chunk = 256  # interpolated rows per step: 256 x V floats (34 MB at V = 33k)
        self.cache_size, self.cache_theta, self.cache_lmbda = 0, 1.0, 0.0
        self.cache_capture = None
        self.cache_recorder, self.cache_thetas = None, ()  # a CacheLogWriter and its θ grid

    def enable_cache(self, key_type: str, size: int, theta: float, lmbda: float) -> None:
        """Mix in a continuous cache over the block's own `key_type` states: p = (1-μ)·p_kNN-LM + μ·p_cache."""
        self.cache_capture = KeyCapture(self.lm.decoder, key_type)
        self.cache_size, self.cache_theta, self.cache_lmbda = size, theta, lmbda

    @property
    def decoder(self):
        return self.lm.decoder

    def forward(self, *args, **kwargs):
        out = self.lm(*args, **kwargs)
        keys = self.capture.keys  # (B, T, C)
        self._keys = keys.reshape(-1, keys.size(-1))  # (B*T, C), the order --softmax-batch chunks in
        self._cursor = 0
        if self.cache_capture is not None:
            self._tokens = kwargs["src_tokens"] if "src_tokens" in kwargs else args[0]  # (B, T)
            self._sims = cache.similarities(self.cache_capture.keys)  # (B, T, T)
        return out

    def max_positions(self):
        return self.lm.max_positions()

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.lm.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        lm_lp = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample)  # (B', T', V)
        n = lm_lp.size(0) * lm_lp.size(1)
        keys = self._keys[self._cursor : self._cursor + n]  # (n, C)
        first = self._cursor  # flat index into (B*T) of this chunk's first row
        self._cursor += n
        assert keys.size(0) == n, "get_normalized_probs called for more positions than the forward produced"
        target = sample.get("target") if sample is not None else None
        if target is not None:
            scored = target.reshape(-1).ne(self.pad)  # (n,) context-window and padding positions are False
        else:
            scored = torch.ones(n, dtype=torch.bool, device=keys.device)
        if self.writer is not None and target is not None:
            self.writer.add(keys[scored].float().cpu().numpy(), target.reshape(-1)[scored].cpu().numpy())
        lp = lm_lp
        if self.retriever is not None and (self.lmbda > 0 or self.recorder is not None) and scored.any():
            t0 = time.perf_counter()
            if self.recorder is not None:
                approx, exact, vals = self.retriever.search(keys[scored], both=True)  # (N, k) each
                tgt = target.reshape(-1)[scored]  # (N,)
                self.recorder.add(
                    target=tgt.cpu().numpy(),
                    lm_lp=lm_lp.reshape(n, -1)[scored].gather(1, tgt.unsqueeze(1)).squeeze(1).float().cpu().numpy(),
                    vals=vals.numpy(), dist_approx=approx.numpy(), dist_exact=exact.numpy(),
                )
                dists = (exact if self.retriever.exact else approx).to(keys.device)
                vals = vals.to(keys.device)
            else:
                dists, vals = self.retriever.search(keys[scored])  # (N, k) each, one search for the batch
            flat = lm_lp.reshape(n, -1)  # (n, V): get_normalized_probs made it fresh, ours to overwrite
            rows = scored.nonzero().squeeze(1)  # (N,)
            # a query with no neighbour at all (empty IVF lists) keeps the LM distribution
            found = torch.isfinite(dists).any(-1).nonzero().squeeze(1)
            if self.lmbda == 0:
                found = found[:0]  # recording only: the LM's distribution is the answer
            for s in range(0, found.numel(), self.rows_per_chunk):  # bounded memory: never (N, V) copies
                sel = found[s : s + self.rows_per_chunk]
                r = rows[sel]
                mixed = knn.interpolate_full(flat[r].float(), dists[sel], vals[sel], self.lmbda, self.temp)
                flat[r] = mixed.to(flat.dtype)
            lp = flat.view(lm_lp.shape)  # reshape may have copied a non-contiguous input: return what we wrote
            self.knn_seconds += time.perf_counter() - t0
            self.knn_queries += int(scored.sum())
        if self.cache_capture is not None and scored.any():
            lp = self._mix_cache(lp, lm_lp, first, scored, target)
        return lp if log_probs else lp.exp()

    def _mix_cache(self, lp, lm_lp, first: int, scored, target):
        """p = (1-μ)·p + μ·p_cache on scored rows that have any cached position; the rest keep p."""
        n = lm_lp.size(0) * lm_lp.size(1)
        rows = scored.nonzero().squeeze(1)  # (N,) within this chunk
        sims, vals, ok = cache.cache_neighbours(self._sims, self._tokens, self.pad, rows + first, self.cache_size)
        if self.cache_recorder is not None:
            tgt = target.reshape(-1)[rows]  # (N,)
            self.cache_recorder.add(
                target=tgt.cpu().numpy(),
                lm_lp=lm_lp.reshape(n, -1)[rows].gather(1, tgt.unsqueeze(1)).squeeze(1).float().cpu().numpy(),
                cache_lp=cache.cache_target_log_probs(sims, vals, ok, tgt, self.cache_thetas).cpu().numpy(),
                found=ok.any(1).cpu().numpy(),
            )
        if self.cache_lmbda == 0:
            return lp
        flat = lp.reshape(n, -1)
        has = ok.any(1).nonzero().squeeze(1)  # rows with an empty cache (a split's first token) keep p
        dists = cache.cache_dists(sims, ok)
        for s in range(0, has.numel(), self.rows_per_chunk):
            sel = has[s : s + self.rows_per_chunk]
            r = rows[sel]
            mixed = knn.interpolate_full(flat[r].float(), dists[sel], vals[sel], self.cache_lmbda, 1.0 / self.cache_theta)
            flat[r] = mixed.to(flat.dtype)
        return flat.view(lm_lp.shape)
