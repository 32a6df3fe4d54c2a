"""KnnLM: any fairseq language model, with the evaluation pipeline's components run around its two calls.

fairseq's SequenceScorer (behind fairseq-eval-lm) calls `model(**net_input)` and then
`model.get_normalized_probs(...)`, possibly on chunks of positions (--softmax-batch). The forward's states are
captured by hooks and handed to the pipeline; each chunk of log-probs goes through the pipeline in order, so
every scored position meets exactly its own key.
"""
from fairseq.models import BaseFairseqModel

from ..components.base import Pipeline


class KnnLM(BaseFairseqModel):
    def __init__(self, lm: BaseFairseqModel, pipeline: Pipeline):
        super().__init__()
        self.lm, self.pipeline = lm, pipeline

    @property
    def decoder(self):
        return self.lm.decoder

    def forward(self, *args, **kwargs):
        out = self.lm(*args, **kwargs)
        self.pipeline.on_forward(kwargs["src_tokens"] if "src_tokens" in kwargs else args[0])  # (B, T)
        return out

    def max_positions(self):
        return self.lm.max_positions()

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.lm.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        lm_lp = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample)  # (B', T', V)
        target = sample.get("target") if sample is not None else None  # (B', T'), this chunk's targets
        lp = self.pipeline.on_scores(lm_lp, target)
        return lp if log_probs else lp.exp()
