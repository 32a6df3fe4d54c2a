"""Hostile inputs to the real CLI that the other files do not cover: each is one line naming the fix, no number."""
import os

import pytest
import torch

from clis import USER_DIR, run_cli

pytestmark = pytest.mark.slow  # starts fairseq-eval-lm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "train.txt").write_text("a b c d e f g\n" * 50)
    (tmp / "empty.txt").write_text("")
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", tmp / "train.txt", "--validpref", tmp / "empty.txt",
            "--destdir", tmp / "bin", "--workers", "1")
    run_cli("fairseq-train", tmp / "bin", "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "knnlm_tiny",
            "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "512", "--tokens-per-sample", "32",
            "--max-update", "1", "--save-dir", tmp / "ckpt", "--no-epoch-checkpoints", "--cpu",
            "--num-workers", "0", "--disable-validation", env={"OMP_NUM_THREADS": "1"})
    return tmp


def eval_lm(data, ckpt, *args):
    return run_cli("fairseq-eval-lm", data / "bin", "--path", ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
                   "--cpu", "--tokens-per-sample", "32", *args, check=False, env={"OMP_NUM_THREADS": "1"})


def assert_one_line_refusal(proc, pattern):
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("knnlm_fairseq: error:"), proc.stderr[-2000:]
    assert pattern in last and "Traceback" not in proc.stderr and "Perplexity" not in proc.output


@pytest.mark.parametrize("content", [os.urandom(4096), b"not a checkpoint\n", b""])
def test_a_file_that_is_not_a_checkpoint(data, content):
    bad = data / "bad.pt"
    bad.write_bytes(content)
    proc = eval_lm(data, bad, "--gen-subset", "train")
    assert_one_line_refusal(proc, "not a readable PyTorch checkpoint")


def test_a_checkpoint_that_pickles_code_is_refused_not_run(data):
    state = torch.load(data / "ckpt" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    state["extra_state"]["hook"] = torch.nn.Identity()  # a class outside the allow-list
    torch.save(state, data / "code.pt")
    proc = eval_lm(data, data / "code.pt", "--gen-subset", "train")
    assert_one_line_refusal(proc, "needs a class that safe loading refuses")
    assert "torch.nn.modules.linear.Identity" in proc.stderr


def test_dumping_an_empty_split(data):
    proc = eval_lm(data, data / "ckpt" / "checkpoint_last.pt", "--gen-subset", "valid", "--save-dstore",
                   "--dstore-dir", data / "dstore")
    assert_one_line_refusal(proc, "split 'valid' is empty")
    assert not (data / "dstore" / "manifest.json").exists()
