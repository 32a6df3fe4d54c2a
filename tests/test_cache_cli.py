"""The continuous cache through the real CLIs: weight 0 is kNN-LM exactly, the cache lowers perplexity on text
that repeats itself, and knnlm-sweep's offline numbers equal fairseq-eval-lm's at the same settings."""
import json
import math

import numpy as np
import pytest

from clis import ONE_THREAD, USER_DIR, loss_and_ppl, random_lines, run_cli, tiny_lm

pytestmark = pytest.mark.slow  # starts fairseq CLIs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    random_lines(tmp / "train.txt", rng, 300, 200)
    # valid: every line said twice, as names and phrases recur within a document (well inside one block)
    with open(tmp / "valid.txt", "w") as f:
        for _ in range(30):
            line = " ".join(f"w{i}" for i in rng.integers(0, 200, size=10))
            f.write(f"{line} {line}\n")
    tiny_lm(tmp, tmp / "valid.txt", max_update=30)
    ev = common(tmp, "train")
    run_cli(*ev, "--save-dstore", "--dstore-dir", tmp / "dstore", env=ONE_THREAD)
    run_cli("knnlm-build-index", tmp / "dstore", "--factory", "Flat", "--no-progress-bar")
    return tmp


def common(tmp, split="valid"):
    return ["fairseq-eval-lm", tmp / "bin", "--path", tmp / "ckpt" / "checkpoint_last.pt", "--user-dir", USER_DIR,
            "--task", "knn_eval", "--gen-subset", split, "--tokens-per-sample", 96, "--context-window", 32,
            "--max-tokens", 960, "--cpu", "--no-progress-bar"]


def ppl(tmp, *extra):
    return loss_and_ppl(run_cli(*common(tmp), *extra, env=ONE_THREAD).output)[1]


KNN = ["--knnlm", "--k", 16, "--lmbda", 0.25, "--knn-temp", 3]


def test_cache_weight_zero_is_knnlm_exactly(setup):
    dstore = ["--dstore-dir", setup / "dstore"]
    assert ppl(setup, *KNN, *dstore, "--cache-size", 64, "--cache-lmbda", 0) == ppl(setup, *KNN, *dstore)


def test_cache_helps_on_repeating_text_and_sweep_matches_eval_lm(setup):
    base = ppl(setup)
    # offline: a base pass recording the cache, a kNN pass recording retrieval, then knnlm-sweep tunes both
    run_cli(*common(setup), "--cache-size", 95, "--save-cache", setup / "clog", "--cache-thetas", "0.03,0.3,3",
            env=ONE_THREAD)
    run_cli(*common(setup), *KNN, "--dstore-dir", setup / "dstore", "--save-retrieval", setup / "rlog", env=ONE_THREAD)
    out = setup / "sweep.json"
    run_cli("knnlm-sweep", setup / "rlog", "--lmbdas", "0,0.25", "--ks", 16, "--temps", 3, "--cache-logs",
            setup / "clog", "--mus", "0,0.3,0.6", "--output", out)
    res = json.loads(out.read_text())["cache"]
    row, tuned = res["logs"][0], res["tuned"]
    assert math.isclose(np.array(row["cache_grid"])[0, 0], base, rel_tol=1e-4)  # μ = 0: the LM
    # online, at the tuned settings: the same numbers
    c = tuned["cache"]
    cached = ppl(setup, "--cache-size", 95, "--cache-lmbda", c["mu"], "--cache-theta", c["theta"])
    assert math.isclose(row["cache"], cached, rel_tol=1e-4), (row["cache"], cached)
    assert cached < 0.8 * base, (base, cached)
    kc = tuned["knn_cache"]
    both = ppl(setup, "--knnlm", "--k", 16, "--lmbda", kc["lmbda"], "--knn-temp", 3, "--dstore-dir", setup / "dstore",
               "--cache-size", 95, "--cache-lmbda", kc["mu"], "--cache-theta", kc["theta"])
    assert math.isclose(row["knn_cache"], both, rel_tol=1e-4), (row["knn_cache"], both)


def test_save_cache_refuses_knnlm(setup):
    proc = run_cli(*common(setup), *KNN, "--dstore-dir", setup / "dstore", "--cache-size", 8, "--save-cache",
                   setup / "x", check=False)
    assert proc.returncode != 0 and "knnlm_fairseq: error: --save-cache records the cache" in proc.stderr
