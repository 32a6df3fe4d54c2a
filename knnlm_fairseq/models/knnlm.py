"""KnnLM: any fairseq language model, with the evaluation pipeline's components run around its two calls.

fairseq's SequenceScorer (behind fairseq-eval-lm) calls `model(**net_input)` and then
`model.get_normalized_probs(...)`, possibly on chunks of positions (--softmax-batch). The forward's states are
captured by hooks and handed to the pipeline; each chunk of log-probs goes through the pipeline in order, so
every scored position meets exactly its own key.
"""
import time

import torch
from fairseq.models import BaseFairseqModel

from ..components.base import Pipeline


class KnnLM(BaseFairseqModel):
    def __init__(self, lm: BaseFairseqModel, pipeline: Pipeline):
        super().__init__()
        self.lm, self.pipeline = lm, pipeline
        self.seconds = {"lm_forward": 0.0, "lm_softmax": 0.0, "pipeline": 0.0}  # where an evaluation's time goes

    def _clock(self, like: torch.Tensor) -> float:
        if like.is_cuda:
            torch.cuda.synchronize(like.device)  # kernels run asynchronously: time what finished
        return time.perf_counter()

    @property
    def decoder(self):
        return self.lm.decoder

    def forward(self, *args, **kwargs):
        tokens = kwargs["src_tokens"] if "src_tokens" in kwargs else args[0]  # (B, T)
        t0 = self._clock(tokens)
        out = self.lm(*args, **kwargs)
        t1 = self._clock(tokens)
        self.pipeline.on_forward(tokens)
        self.seconds["lm_forward"] += t1 - t0
        self.seconds["pipeline"] += self._clock(tokens) - t1
        return out

    def max_positions(self):
        return self.lm.max_positions()

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.lm.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        t0 = self._clock(net_output[0])
        lm_lp = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample)  # (B', T', V)
        t1 = self._clock(lm_lp)
        target = sample.get("target") if sample is not None else None  # (B', T'), this chunk's targets
        lp = self.pipeline.on_scores(lm_lp, target)
        self.seconds["lm_softmax"] += t1 - t0
        self.seconds["pipeline"] += self._clock(lp) - t1
        return lp if log_probs else lp.exp()
