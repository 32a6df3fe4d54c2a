"""`make wikitext103` end to end on a stand-in: WikiText-shaped text zipped and a tiny legacy-format
checkpoint tarball (fairseq's adaptive_lm_wiki103.v2 layout), both served from file:// URLs."""
import json
import os
import shutil
import subprocess
import tarfile
import zipfile

import pytest

from clis import BIN, ROOT, USER_DIR, WT2_RAW, run_cli
from test_legacy_checkpoint import make_legacy

pytestmark = pytest.mark.skipif(not os.path.exists(WT2_RAW), reason="needs ../shared/data/wikitext-2")


def head(path, n):
    with open(path) as f:
        return "".join(line for _, line in zip(range(n), f))


def make(tmp, *overrides, check=True):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["make", "-C", ROOT, "wikitext103", f"BIN={BIN}"] + list(overrides),
                          capture_output=True, text=True, env=env)
    proc.output = proc.stdout + proc.stderr
    if check:
        assert proc.returncode == 0, proc.output[-4000:]
    return proc


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wt103")
    # WikiText-103's zip layout: wikitext-103/wiki.{train,valid,test}.tokens
    with zipfile.ZipFile(tmp / "wikitext-103-v1.zip", "w") as z:
        for split, n in (("train", 600), ("valid", 120), ("test", 120)):
            z.writestr(f"wikitext-103/wiki.{split}.tokens", head(os.path.join(WT2_RAW, f"wiki.{split}.tokens"), n))
    # a tiny model trained on the stand-in train text, saved the 2019 way, tarred like adaptive_lm_wiki103.v2
    raw = tmp / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text(head(os.path.join(WT2_RAW, "wiki.train.tokens"), 600))
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "train.txt",
            "--destdir", raw / "bin", "--workers", "1")
    run_cli("fairseq-train", raw / "bin", "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "knnlm_tiny",
            "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "2048", "--tokens-per-sample", "256",
            "--max-update", "30", "--save-dir", raw / "ckpt", "--no-epoch-checkpoints", "--cpu", "--num-workers", "0",
            "--seed", "1", "--disable-validation")
    pkg = tmp / "pkg" / "adaptive_lm_wiki103.v2"
    pkg.mkdir(parents=True)
    make_legacy(str(raw / "ckpt" / "checkpoint_last.pt"), str(pkg / "model.pt"))
    shutil.copy(raw / "bin" / "dict.txt", pkg / "dict.txt")
    with tarfile.open(tmp / "model.tar.bz2", "w:bz2") as t:
        t.add(pkg, arcname="adaptive_lm_wiki103.v2")
    paper = tmp / "paper.json"
    paper.write_text(json.dumps({"source": "stand-in", "tolerance": 1e9, "rows": [
        {"split": "valid", "key": "base_ppl", "paper": 17.96}, {"split": "test", "key": "knnlm_ppl_exact", "paper": 16.12}]}))
    work = tmp / "run"
    variables = [
        f"WT103_URL=file://{tmp / 'wikitext-103-v1.zip'}", f"WT103_CKPT_URL=file://{tmp / 'model.tar.bz2'}",
        f"WT103_DATA={work / 'data' / 'wikitext-103'}", f"WT103_BIN={work / 'bin'}",
        f"WT103_CKPT_DIR={work / 'ckpt'}", f"WT103_OUT={work / 'out'}", f"WT103_WORK={work / 'dstore'}",
        "WT103_DEVICE=--cpu", f"WT103_PAPER={paper}",
        # the real target's stages with small sizes (the real ones: see the Makefile's WT103_ARGS)
        "WT103_ARGS=--factory IVF4096,PQ8 --train-size 100000 --probe 8 --k 64 --lmbda 0.25 --knn-temp 1 --temps 1 "
        "--dump-tokens-per-sample 256 --dump-context-window 128 --eval-tokens-per-sample 256 "
        "--eval-context-window 192 --max-tokens 2048 --eval-extra=--softmax-batch=1024",
    ]
    return tmp, work, variables


def test_full_target_on_the_standin(standin):
    tmp, work, variables = standin
    proc = make(tmp, "WT103_NEED_GB=0", *variables)
    m = json.loads((work / "out" / "metrics.json").read_text())
    assert m["dstore"]["n"] > 10_000 and m["index"]["factory"].startswith("IVF")  # IVF4096 scaled to the sample
    for split in ("valid", "test"):
        assert m[split]["n_tokens"] > 1000 and m[split]["base_ppl"] > 1
        # the run's eval-lm numbers and the offline sweep agree
        assert m[split]["eval_lm_knnlm_ppl_exact"] == pytest.approx(m[split]["sweep_at_eval_settings_exact"], abs=0.01)
    assert [r["pass"] for r in m["paper"]["rows"]] == [True, True]
    report = (work / "out" / "report.md").read_text()
    assert "Against the paper" in report and "PASS" in report
    assert "check_disk" in proc.output
    assert os.path.exists(work / "ckpt" / "model.pt") and os.path.exists(work / "bin" / "test.bin")


def test_refuses_without_disk(standin):
    tmp, work, variables = standin
    other = [v.replace(str(work), str(tmp / "nodisk")) for v in variables]
    proc = make(tmp, "WT103_NEED_GB=1000000000", *other, check=False)
    assert proc.returncode != 0
    assert "needs 1000000000 GB" in proc.output
    assert not os.path.exists(tmp / "nodisk" / "data" / "wikitext-103-v1.zip")  # refused before downloading
