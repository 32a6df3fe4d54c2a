"""config/*.yaml build the models they name under the real fairseq-hydra-train, hold the papers' recipes; tiny trains.

A config is proven by the model it builds: tests/build_model.py runs fairseq-hydra-train's own entry point up to
the built model, and `fairseq-train --arch NAME`'s parser in the same process, and prints both models' parameters.
"""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from clis import ROOT, SHARED, USER_DIR, WT2_CKPT, parallel, run_cli

pytestmark = pytest.mark.slow  # starts fairseq CLIs

CONFIG = os.path.join(ROOT, "config")
RECIPE = os.path.join(SHARED, "models", "wt2-small", "RECIPE.md")


def compose(name, *overrides):
    """The job config fairseq-hydra-train would run (hydra's --cfg job prints it and exits)."""
    out = run_cli("fairseq-hydra-train", "--config-dir", CONFIG, "--config-name", name, "task.data=/nowhere",
                  f"common.user_dir={USER_DIR}", *overrides, "--cfg", "job").stdout
    return yaml.safe_load(out[out.index("_name") - 2 if out.startswith("#") else 0:])


def test_wt103_is_the_papers_training_recipe():
    c = compose("wt103")
    # the kNN-LM authors' README: --arch transformer_lm_wiki103 --max-update 286000 --max-lr 1.0 --t-mult 2
    # --lr-period-updates 270000 --lr-scheduler cosine --lr-shrink 0.75 --warmup-updates 16000
    # --warmup-init-lr 1e-07 --min-lr 1e-09 --optimizer nag --lr 0.0001 --clip-norm 0.1 --criterion adaptive_loss
    # --max-tokens 3072 --update-freq 3 --tokens-per-sample 3072 --seed 1 --sample-break-mode none, 8 GPUs
    assert c["model"]["_name"] == "knnlm_wiki103"
    assert c["optimization"]["max_update"] == 286000
    assert c["optimization"]["lr"] == [1.0]  # fairseq 0.12's cosine peak (0.9's --max-lr)
    assert c["lr_scheduler"]["min_lr"] == pytest.approx(1e-4)  # 0.9's --lr
    assert c["optimization"]["stop_min_lr"] == pytest.approx(1e-9)  # 0.9's --min-lr
    assert c["lr_scheduler"]["_name"] == "cosine"
    assert (c["lr_scheduler"]["t_mult"], c["lr_scheduler"]["lr_period_updates"]) == (2, 270000)
    assert c["lr_scheduler"]["lr_shrink"] == pytest.approx(0.75)
    assert c["lr_scheduler"]["warmup_updates"] == 16000
    assert c["lr_scheduler"]["warmup_init_lr"] == pytest.approx(1e-7)
    assert c["optimizer"]["_name"] == "nag"
    assert c["optimization"]["clip_norm"] == pytest.approx(0.1)
    assert c["criterion"]["_name"] == "adaptive_loss"
    assert c["dataset"]["max_tokens"] == 3072 and c["optimization"]["update_freq"] == [3]
    assert c["task"]["tokens_per_sample"] == 3072 and c["task"]["sample_break_mode"] == "none"
    assert c["distributed_training"]["distributed_world_size"] == 8
    assert c["common"]["seed"] == 1 and c["common"]["fp16"] is True


def recipe_flags():
    text = open(RECIPE).read()
    cmd = text[text.index("fairseq-train"):].split("\n\n")[0].replace("\\\n", " ")
    words = shlex.split(cmd)
    flags, i = {}, 0
    while i < len(words):
        if words[i].startswith("--"):
            has_value = i + 1 < len(words) and not words[i + 1].startswith("--")
            flags[words[i][2:]] = words[i + 1] if has_value else True
            i += 2 if has_value else 1
        else:
            i += 1
    return flags


@pytest.mark.skipif(not os.path.exists(RECIPE), reason="needs ../shared/models/wt2-small/RECIPE.md")
def test_wt2_small_matches_recipe_md():
    f, c = recipe_flags(), compose("wt2_small")
    assert c["optimization"]["lr"] == [float(f["lr"])]
    assert c["lr_scheduler"]["warmup_updates"] == int(f["warmup-updates"])
    assert c["optimizer"]["weight_decay"] == pytest.approx(float(f["weight-decay"]))
    assert c["optimizer"]["adam_betas"].replace(" ", "") == f["adam-betas"]
    assert c["optimization"]["clip_norm"] == pytest.approx(float(f["clip-norm"]))
    assert c["dataset"]["max_tokens"] == int(f["max-tokens"])
    assert c["task"]["tokens_per_sample"] == int(f["tokens-per-sample"])
    assert c["optimization"]["max_epoch"] == int(f["max-epoch"])
    assert c["criterion"]["_name"] == f["criterion"]
    assert c["distributed_training"]["ddp_backend"] == f["ddp-backend"]
    for key in ("dropout", "attention-dropout", "activation-dropout"):
        assert c["model"][key.replace("-", "_")] == pytest.approx(float(f[key]))
    assert c["common"]["seed"] == int(f["seed"])
    assert c["model"]["_name"] == "knnlm_wt2_small"  # its shape: test_wt2_small_builds_the_shipped_checkpoint


def test_tiny_config_trains_and_evaluates(tmp_path):
    words = [f"w{i}" for i in range(30)]
    with open(tmp_path / "train.txt", "w") as f:
        for i in range(300):
            f.write(" ".join(words[(i + j) % 30] for j in range(12)) + "\n")
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", tmp_path / "train.txt",
            "--validpref", tmp_path / "train.txt", "--destdir", tmp_path / "bin", "--workers", "1")
    save = tmp_path / "ckpt"
    out = run_cli("fairseq-hydra-train", "--config-dir", CONFIG, "--config-name", "tiny", f"task.data={tmp_path / 'bin'}",
                  f"common.user_dir={USER_DIR}", f"checkpoint.save_dir={save}", f"hydra.run.dir={tmp_path / 'hydra'}").output
    assert re.search(r"num_updates.*20|done training", out)
    trained = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert trained["cfg"]["model"]["_name"] == "knnlm_tiny"
    assert trained["model"]["decoder.layers.1.fc1.weight"].shape == (64, 32)  # 2 layers x 32 dims, FFN 64
    assert "decoder.layers.2.fc1.weight" not in trained["model"]
    ev = run_cli("fairseq-eval-lm", tmp_path / "bin", "--path", save / "checkpoint_last.pt", "--user-dir", USER_DIR,
                 "--cpu", "--tokens-per-sample", "64", "--gen-subset", "valid").output
    assert "Perplexity" in ev


# ---- each config builds its architecture through fairseq-hydra-train ------------------------------------------
ARCH_OF = {"tiny": "knnlm_tiny", "wt2_small": "knnlm_wt2_small", "wt2_small_10pct": "knnlm_wt2_small",
           "wt103": "knnlm_wiki103"}
WT103_TYPES = 267_735  # WikiText-103's word types; fairseq adds 4 specials: 267,739 symbols
WT103_PARAMS = 246_933_184  # fairseq-train --arch knnlm_wiki103 on that dictionary (measured on an H200 run too)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{config: (argparse build, hydra build)}: state-dict shapes, parameter count and model config of each."""
    tmp = tmp_path_factory.mktemp("builds")
    (tmp / "wt2").mkdir()
    (tmp / "wt2" / "dict.txt").write_text(open(os.path.join(os.path.dirname(WT2_CKPT), "dict.txt")).read())
    (tmp / "wt103").mkdir()
    (tmp / "wt103" / "dict.txt").write_text("".join(f"w{i} {10**6 - i}\n" for i in range(WT103_TYPES)))

    def build(name):
        data = tmp / ("wt103" if name == "wt103" else "wt2")
        cmd = [sys.executable, os.path.join(ROOT, "tests", "build_model.py"), "both", str(data), ARCH_OF[name],
               USER_DIR, CONFIG, name, f"hydra.run.dir={tmp / 'hydra' / name}",
               "distributed_training.distributed_world_size=1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        argparse_build, hydra_build = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        return name, (argparse_build, hydra_build)

    return dict(parallel(*[lambda n=n: build(n) for n in ARCH_OF]))


@pytest.mark.parametrize("name", sorted(ARCH_OF))
def test_config_builds_its_architecture(built, name):
    by_arch, by_hydra = built[name]
    assert by_hydra["model_cfg"]["_name"] == ARCH_OF[name]
    assert by_hydra["params"] == by_arch["params"]  # every parameter's name and shape
    assert by_hydra["count"] == by_arch["count"]
    # every value the architecture function decides, as --arch sets it (a config may change only regularisation)
    from knnlm_fairseq.models.arch_configs import arch_fields

    regularisation = {"dropout", "attention_dropout", "activation_dropout", "relu_dropout"}
    for key in set(arch_fields(ARCH_OF[name])) - regularisation:
        assert by_hydra["model_cfg"][key] == by_arch["model_cfg"][key], (name, key)


def test_wt103_builds_the_papers_model(built):
    by_arch, by_hydra = built["wt103"]
    assert by_hydra["count"] == WT103_PARAMS
    cfg = by_hydra["model_cfg"]
    assert (cfg["decoder_layers"], cfg["decoder_embed_dim"], cfg["decoder_ffn_embed_dim"]) == (16, 1024, 4096)
    assert cfg["adaptive_input"] and cfg["decoder_normalize_before"] and cfg["tie_adaptive_weights"]
    assert cfg["adaptive_softmax_cutoff"] == "20000,60000"
    assert by_hydra["params"]["decoder.embed_tokens.embeddings.0.0.weight"] == [20000, 1024]  # adaptive input head


def test_wt2_small_builds_the_shipped_checkpoint(built):
    saved = torch.load(WT2_CKPT, map_location="cpu", weights_only=True)["model"]
    shapes = {name: list(t.shape) for name, t in saved.items()}
    for name in ("wt2_small", "wt2_small_10pct"):
        assert built[name][1]["params"] == shapes, name


def test_tiny_builds_2_by_32(built):
    cfg = built["tiny"][1]["model_cfg"]
    assert (cfg["decoder_layers"], cfg["decoder_embed_dim"], cfg["decoder_ffn_embed_dim"]) == (2, 32, 64)


def test_model_configs_are_written_from_the_architectures():
    """config/model/*.yaml hold what the architecture functions set: edit the function, then regenerate."""
    from knnlm_fairseq.models import arch_configs

    for arch in arch_configs.ARCHS:
        with open(os.path.join(CONFIG, "model", f"{arch}.yaml")) as f:
            assert f.read() == arch_configs.render(arch), (
                f"config/model/{arch}.yaml is stale: python -m knnlm_fairseq.models.arch_configs config/model")
