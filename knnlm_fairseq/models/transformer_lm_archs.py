"""transformer_lm architectures: the kNN-LM paper's WikiText-103 model and small CPU models.

Each is a function that only sets defaults, then defers to fairseq's own architecture, so a
checkpoint trained with one of these loads with the stock `transformer_lm` code.
"""
from fairseq.models import register_model_architecture
from fairseq.models.transformer_lm import base_lm_architecture, transformer_lm_baevski_wiki103
from fairseq.utils import safe_getattr


def _defaults(args, **values) -> None:
    """Set each attribute not already given (on the command line or in a checkpoint's args)."""
    for name, value in values.items():
        setattr(args, name, safe_getattr(args, name, value))


@register_model_architecture("transformer_lm", "knnlm_wiki103")
def knnlm_wiki103(args):
    """Baevski & Auli (2019) adaptive-input LM used by the kNN-LM paper: exactly fairseq's
    `transformer_lm_wiki103` (16 layers, 1024 dims, 4096 FFN, 8 heads, pre-norm, adaptive input and
    softmax with cutoffs 20000,60000, tied adaptive weights and projections, dropout 0.3)."""
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("transformer_lm", "knnlm_wt2_small")
def knnlm_wt2_small(args):
    """The CPU model of ../shared/models/wt2-small/RECIPE.md: the wiki103 design at 4 x 256."""
    _defaults(args, decoder_layers=4, decoder_embed_dim=256, decoder_input_dim=256, decoder_output_dim=256,
              decoder_ffn_embed_dim=1024, decoder_attention_heads=4,
              # WikiText-2's 33k vocabulary: 2k frequent words in the head, two smaller tail clusters
              adaptive_input_cutoff="2000,10000", adaptive_softmax_cutoff="2000,10000",
              dropout=0.2)  # 2M training tokens overfit at 0.1
    transformer_lm_baevski_wiki103(args)


@register_model_architecture("transformer_lm", "knnlm_tiny")
def knnlm_tiny(args):
    """A seconds-to-train model for tests and smoke runs: 2 x 32, full softmax."""
    _defaults(args, decoder_layers=2, decoder_embed_dim=32, decoder_ffn_embed_dim=64, decoder_attention_heads=2,
              decoder_normalize_before=True, dropout=0.0)
    base_lm_architecture(args)
