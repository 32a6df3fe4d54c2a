"""The continuous cache through the real CLIs: weight 0 is kNN-LM exactly, the cache lowers perplexity on text
that repeats itself, and knnlm-sweep's offline numbers equal fairseq-eval-lm's at the same settings."""
import json
import math

import numpy as np
import pytest

from clis import ONE_THREAD, USER_DIR, loss_and_ppl, random_lines, run_cli, tiny_lm, word_probs

pytestmark = pytest.mark.slow  # starts fairseq CLIs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    random_lines(tmp / "train.txt", rng, 300, 200)
    # valid: every line said twice, as names and phrases recur within a document (well inside one block);
    # train holds each line once more, so the datastore knows what follows and kNN-LM helps too (tuned λ > 0)
    lines = [" ".join(f"w{i}" for i in rng.integers(0, 200, size=10)) for _ in range(30)]
    with open(tmp / "valid.txt", "w") as f:
        f.writelines(f"{line} {line}\n" for line in lines)
    with open(tmp / "train.txt", "a") as f:
        f.writelines(f"{line}\n" for line in lines)
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
    """(loss, perplexity) as eval-lm prints them: the base-2 loss to 4 decimals, the perplexity to only 2."""
    return loss_and_ppl(run_cli(*common(tmp), *extra, env=ONE_THREAD).output)


def same_ppl(swept: float, printed) -> bool:
    """knnlm-sweep's unrounded perplexity against eval-lm's printed (loss, ppl), compared as base-2 losses: the loss
    is printed to 4 decimals (off by <= 5e-5), the perplexity to 2 (off by up to 0.005 / ppl relative: rounding alone
    breaks a 1e-4 relative tolerance below a perplexity of 50)."""
    return abs(math.log2(swept) - printed[0]) <= 5e-5 + 1e-5


KNN = ["--knnlm", "--k", 16, "--lmbda", 0.25, "--knn-temp", 3]


def test_cache_weight_zero_is_knnlm_exactly(setup):
    dstore = ["--dstore-dir", setup / "dstore", "--output-word-probs"]
    knn = run_cli(*common(setup), *KNN, *dstore, env=ONE_THREAD).output
    zero = run_cli(*common(setup), *KNN, *dstore, "--cache-size", 64, "--cache-lmbda", 0, env=ONE_THREAD).output
    assert loss_and_ppl(zero) == loss_and_ppl(knn)
    words, _, printed = word_probs(knn)
    assert len(words) > 500 and word_probs(zero)[2] == printed  # every word's probability, digit for digit


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
    assert same_ppl(np.array(row["cache_grid"])[0, 0], base), (row["cache_grid"], base)  # μ = 0: the LM
    # online, at the tuned settings: the same numbers
    c = tuned["cache"]
    cached = ppl(setup, "--cache-size", 95, "--cache-lmbda", c["mu"], "--cache-theta", c["theta"])
    assert same_ppl(row["cache"], cached), (row["cache"], cached)
    assert cached[1] < 0.8 * base[1], (base, cached)
    kc = tuned["knn_cache"]
    both = ppl(setup, "--knnlm", "--k", 16, "--lmbda", kc["lmbda"], "--knn-temp", 3, "--dstore-dir", setup / "dstore",
               "--cache-size", 95, "--cache-lmbda", kc["mu"], "--cache-theta", kc["theta"])
    assert same_ppl(row["knn_cache"], both), (row["knn_cache"], both)
    # both parts at work: a λ of 0 or a μ of 0 would make this the cache or kNN-LM alone under another name
    assert kc["lmbda"] > 0 and kc["mu"] > 0 and both[1] < cached[1], (kc, both, cached)


def test_save_cache_refuses_knnlm(setup):
    proc = run_cli(*common(setup), *KNN, "--dstore-dir", setup / "dstore", "--cache-size", 8, "--save-cache",
                   setup / "x", check=False)
    assert proc.returncode != 0 and "knnlm_fairseq: error: --save-cache records the cache" in proc.stderr
