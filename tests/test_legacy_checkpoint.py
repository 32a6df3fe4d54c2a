"""A 2019-style checkpoint (model args as an argparse.Namespace, numpy scalars in its state) loads
under torch 2.13's safe unpickler once the plugin is imported, and scores exactly like the original."""
import argparse
import os

import numpy as np
import pytest
import torch

from clis import USER_DIR, WT2_CKPT, binarize_wt2_slice, loss_and_ppl, parallel, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(WT2_CKPT), reason="../shared/models/wt2-small is not present")]

# The args a fairseq 0.9 `fairseq-train --arch transformer_lm_wiki103` run pickled (0.9.0, Dec 2019: the kNN-LM
# authors' fork): its model flags (no layernorm_embedding, no_scale_embedding, quant_noise, scale_*, base_*,
# checkpoint_activations: those came in 2020-21) and the common/task/optimization flags of that release.
MODEL_09 = ("activation_fn", "dropout", "attention_dropout", "activation_dropout", "relu_dropout", "decoder_embed_dim",
            "decoder_output_dim", "decoder_input_dim", "decoder_ffn_embed_dim", "decoder_layers",
            "decoder_attention_heads", "decoder_normalize_before", "no_decoder_final_norm", "adaptive_softmax_cutoff",
            "adaptive_softmax_dropout", "adaptive_softmax_factor", "no_token_positional_embeddings",
            "share_decoder_input_output_embed", "character_embeddings", "character_filters", "character_embedding_dim",
            "char_embedder_highway_layers", "adaptive_input", "adaptive_input_factor", "adaptive_input_cutoff",
            "tie_adaptive_weights", "tie_adaptive_proj", "decoder_learned_pos", "decoder_layerdrop",
            "decoder_layers_to_keep")
TRAINING_09 = dict(
    no_progress_bar=False, log_interval=100, log_format="simple", tensorboard_logdir="", seed=1, cpu=False,
    fp16=True, memory_efficient_fp16=False, fp16_init_scale=128, fp16_scale_window=None, fp16_scale_tolerance=0.0,
    min_loss_scale=1e-4, threshold_loss_scale=None, user_dir=None, criterion="adaptive_loss", tokenizer=None,
    bpe=None, optimizer="nag", lr_scheduler="cosine", task="language_modeling", num_workers=1,
    skip_invalid_size_inputs_valid_test=True, max_tokens=3072, max_sentences=None, required_batch_size_multiple=8,
    dataset_impl=None, train_subset="train", valid_subset="valid", validate_interval=1, disable_validation=False,
    max_tokens_valid=3072, max_sentences_valid=None, curriculum=0, distributed_world_size=8, distributed_rank=0,
    distributed_backend="nccl", distributed_init_method=None, distributed_port=-1, device_id=0,
    distributed_no_spawn=False, ddp_backend="no_c10d", bucket_cap_mb=25, fix_batches_to_gpus=False,
    find_unused_parameters=False, fast_stat_sync=False, max_epoch=0, max_update=286000, clip_norm=0.1,
    sentence_avg=False, update_freq=[3], lr=[0.0001], min_lr=1e-09, use_bmuf=False, save_dir="checkpoints",
    restore_file="checkpoint_last.pt", reset_dataloader=False, reset_lr_scheduler=False, reset_meters=False,
    reset_optimizer=False, optimizer_overrides="{}", save_interval=1, save_interval_updates=0,
    keep_interval_updates=-1, keep_last_epochs=-1, no_save=False, no_epoch_checkpoints=False,
    no_last_checkpoints=False, no_save_optimizer_state=False, best_checkpoint_metric="loss",
    maximize_best_checkpoint_metric=False, sample_break_mode="none", tokens_per_sample=3072,
    output_dictionary_size=-1, self_target=False, future_target=False, past_target=False, add_bos_token=False,
    max_target_positions=None, lazy_load=False, raw_text=False, momentum=0.99, weight_decay=0.0, max_lr=1.0,
    t_mult=2.0, lr_period_updates=270000.0, lr_shrink=0.75, warmup_updates=16000, warmup_init_lr=1e-07)
# numpy 1.x names the scalar and array reconstructors under numpy.core (numpy 2: numpy._core); protocol 2 writes
# a GLOBAL as newline-terminated text, so renaming those bytes is exactly what numpy 1.x would have written
NUMPY1 = [(b"numpy._core.multiarray\nscalar\n", b"numpy.core.multiarray\nscalar\n"),
          (b"numpy._core.multiarray\n_reconstruct\n", b"numpy.core.multiarray\n_reconstruct\n")]


def make_legacy(src: str, dst: str) -> None:
    """The shipped checkpoint's weights as fairseq 0.9 with numpy 1.x and torch 1.x wrote a checkpoint: args
    Namespace (0.9's fields only, stock architecture name), no cfg, fused self-attention in_proj weights, numpy
    scalars and arrays in extra_state, torch's legacy (pre-zip) serialization, numpy.core pickle globals."""
    state = torch.load(src, map_location="cpu", weights_only=True)
    model_cfg = state["cfg"]["model"]
    args = argparse.Namespace(arch="transformer_lm_wiki103", data="data-bin/wikitext-103", **TRAINING_09)
    for key in MODEL_09:
        setattr(args, key, model_cfg[key])
    weights = {}
    for name, tensor in state["model"].items():  # 0.9's MultiheadAttention kept q, k, v as one projection
        if ".self_attn.q_proj." in name:
            kind = name.rsplit(".", 1)[1]
            base = name.split(".q_proj.")[0]
            weights[f"{base}.in_proj_{kind}"] = torch.cat(
                [state["model"][f"{base}.{p}_proj.{kind}"] for p in ("q", "k", "v")])
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            weights[name] = tensor
    legacy = {"args": args, "model": weights, "optimizer_history": [
        {"criterion_name": "AdaptiveLoss", "optimizer_name": "FairseqNAG", "lr_scheduler_state": {"best": np.float64(2.91)},
         "num_updates": np.int64(286000)}],
        "extra_state": {"epoch": 106, "val_loss": np.float32(2.91), "best": np.float64(2.91),
                        "train_iterator": {"epoch": 106, "iterations_in_epoch": 0, "shuffle": True},
                        "rng": np.arange(4, dtype=np.int64)}, "last_optimizer_state": None}
    torch.save(legacy, dst, _use_new_zipfile_serialization=False)
    with open(dst, "rb") as f:
        data = f.read()
    for new, old in NUMPY1:
        assert new in data
        data = data.replace(new, old)
    with open(dst, "wb") as f:
        f.write(data)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    data = binarize_wt2_slice(str(root / "wt2"), train_lines=40, valid_lines=60)
    path = str(root / "legacy.pt")
    make_legacy(WT2_CKPT, path)
    return data, path


def test_is_really_legacy(legacy):
    _, path = legacy
    with open(path, "rb") as f:
        data = f.read()  # protocol-2 pickle GLOBALs are "module\nname\n" text
    assert b"argparse\nNamespace\n" in data and b"numpy.core.multiarray\nscalar\n" in data
    assert b"numpy.core.multiarray\n_reconstruct\n" in data and b"numpy._core" not in data
    with open(path, "rb") as f:
        assert not f.read(4).startswith(b"PK")  # torch's legacy format, not a zip archive
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert "cfg" not in state and isinstance(state["args"], argparse.Namespace)
    assert not hasattr(state["args"], "layernorm_embedding") and state["args"].arch == "transformer_lm_wiki103"
    assert "decoder.layers.0.self_attn.in_proj_weight" in state["model"]
    assert "decoder.layers.0.self_attn.q_proj.weight" not in state["model"]


def test_stock_fairseq_refuses_it_under_safe_loading(legacy):
    data, path = legacy
    proc = run_cli("fairseq-eval-lm", data, "--path", path, "--gen-subset", "valid", "--cpu", check=False)
    assert proc.returncode != 0 and "weights_only" in proc.output


def test_plugin_loads_it_and_scores_like_the_original(legacy):
    data, path = legacy
    common = [data, "--gen-subset", "valid", "--tokens-per-sample", "512", "--context-window", "128", "--cpu"]
    new = run_cli("fairseq-eval-lm", *common, "--path", WT2_CKPT)
    old = run_cli("fairseq-eval-lm", *common, "--path", path, "--user-dir", USER_DIR)
    assert loss_and_ppl(old.output) == loss_and_ppl(new.output)


def test_safe_loading_stays_on(tmp_path):
    """The allow-list admits data-only classes, not arbitrary code."""
    from knnlm_fairseq.plugin.checkpoints import allow_legacy_checkpoints

    allow_legacy_checkpoints()

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": os.system}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, map_location="cpu")


def test_model_overrides_reach_the_legacy_model(legacy):
    """--model-overrides (how users adapt old checkpoints) applies through the legacy loader: keeping 3 of the 4
    layers changes the score, and equally for the 2019 file and the shipped one."""
    data, path = legacy
    common = [data, "--gen-subset", "valid", "--tokens-per-sample", "512", "--context-window", "128", "--cpu",
              "--user-dir", USER_DIR, "--model-overrides", "{'decoder_layers_to_keep': '0,1,2'}"]
    old, new = parallel(lambda: run_cli("fairseq-eval-lm", *common, "--path", path),
                        lambda: run_cli("fairseq-eval-lm", *common, "--path", WT2_CKPT))
    full = run_cli("fairseq-eval-lm", *common[:-2], "--path", path)
    assert loss_and_ppl(old.output) == loss_and_ppl(new.output)
    assert loss_and_ppl(old.output)[1] > loss_and_ppl(full.output)[1] * 1.05  # a layer fewer scores worse
