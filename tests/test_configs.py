"""config/*.yaml compose under the real fairseq-hydra-train and hold the papers' recipes; tiny.yaml trains."""
import os
import re
import shlex

import pytest
import yaml

from clis import ROOT, SHARED, USER_DIR, run_cli

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
    assert c["model"]["_name"] == "knnlm_wt2_small"  # its shape is checked against RECIPE.md in test_registry


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
    assert (save / "checkpoint_last.pt").exists()
    ev = run_cli("fairseq-eval-lm", tmp_path / "bin", "--path", save / "checkpoint_last.pt", "--user-dir", USER_DIR,
                 "--cpu", "--tokens-per-sample", "64", "--gen-subset", "valid").output
    assert "Perplexity" in ev
