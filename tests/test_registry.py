"""Our registrations are ours, and the paper's architecture is exactly fairseq's transformer_lm_wiki103."""
import argparse

import pytest
import torch

fairseq = pytest.importorskip("fairseq")
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY  # noqa: E402
from fairseq.tasks import TASK_REGISTRY  # noqa: E402

import knnlm_fairseq  # noqa: E402,F401
from knnlm_fairseq.models import transformer_lm_archs as archs  # noqa: E402
from knnlm_fairseq.tasks.knn_eval import KnnEvalTask  # noqa: E402

SHIPPED = "../shared/models/wt2-small/checkpoint.pt"


@pytest.mark.parametrize("name", ["knnlm_wiki103", "knnlm_wt2_small", "knnlm_tiny"])
def test_architectures_are_ours(name):
    assert ARCH_CONFIG_REGISTRY[name] is getattr(archs, name)
    assert ARCH_MODEL_NAME_REGISTRY[name] == "transformer_lm"


def test_task_is_ours():
    assert TASK_REGISTRY["knn_eval"] is KnnEvalTask


def _arch_defaults(fn):
    args = argparse.Namespace()
    fn(args)
    return vars(args)


def test_wiki103_matches_fairseq_exactly():
    ours = _arch_defaults(archs.knnlm_wiki103)
    assert ours == _arch_defaults(ARCH_CONFIG_REGISTRY["transformer_lm_wiki103"])
    # the paper's model (Baevski & Auli 2019), as the kNN-LM paper used it
    assert ours["decoder_layers"] == 16 and ours["decoder_embed_dim"] == 1024
    assert ours["decoder_ffn_embed_dim"] == 4096 and ours["decoder_attention_heads"] == 8
    assert ours["adaptive_input_cutoff"] == ours["adaptive_softmax_cutoff"] == "20000,60000"
    assert ours["decoder_normalize_before"] and ours["adaptive_input"] and ours["tie_adaptive_weights"]


def test_wt2_small_matches_the_shipped_checkpoint():
    import os

    if not os.path.exists(SHIPPED):
        pytest.skip("../shared/models/wt2-small is not present")
    saved = torch.load(SHIPPED, map_location="cpu", weights_only=True)["cfg"]["model"]
    ours = _arch_defaults(archs.knnlm_wt2_small)
    for key in ("decoder_layers", "decoder_embed_dim", "decoder_input_dim", "decoder_output_dim",
                "decoder_ffn_embed_dim", "decoder_attention_heads", "adaptive_input_cutoff",
                "adaptive_softmax_cutoff", "adaptive_input", "tie_adaptive_weights", "tie_adaptive_proj",
                "decoder_normalize_before", "no_decoder_final_norm", "dropout", "attention_dropout",
                "activation_dropout", "adaptive_softmax_dropout"):
        assert ours[key] == saved[key], key
