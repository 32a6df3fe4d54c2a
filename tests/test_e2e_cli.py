"""The whole method through the real CLIs on a generated corpus: fairseq-preprocess -> fairseq-train
(knnlm_tiny, full and adaptive softmax) -> fairseq-eval-lm --save-dstore -> knnlm-build-index ->
fairseq-eval-lm --knnlm, each a subprocess, checked against stock fairseq and a numpy oracle."""
import hashlib
import json
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import clis
from clis import USER_DIR, assert_refused, evaluated_tokens, loss_and_ppl, parallel, word_probs

pytestmark = pytest.mark.slow  # starts fairseq CLIs

TPS, CW = 128, 64  # eval blocks of 128 tokens, 64 of them context: 64 scored per block
LMBDA, TEMP, K = 0.9, 0.1, 64  # the kNN run over a datastore of the evaluated split itself
DIM = 32  # knnlm_tiny's width
VALID_TOKENS = 2890  # words + one </s> per line of the seeded valid split


# one thread per process: runs go two at a time on 2 cores, and torch/faiss thread pools that
# oversubscribe the cores spin-wait (measured: a 2-thread tiny-model training run many times slower than a 1-thread one)
def run_cli(name: str, *args, check: bool = True):
    return clis.run_cli(name, *args, check=check, env=clis.ONE_THREAD)


# ---- corpus -----------------------------------------------------------------------------------------
def sentences(seed: int, n_lines: int):
    """Lines of 2-4 templated sentences over ~160 words; the object noun depends on subject and verb."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        sents = []
        for _ in range(rng.integers(2, 5)):
            n, v, a = rng.integers(80), rng.integers(40), rng.integers(40)
            sents.append(f"the a{a} n{n} v{v} a n{(7 * n + v) % 80} of a{(a + v) % 40} .")
        lines.append(" ".join(sents))
    return lines


def token_stream(text_path: str, dict_path: str) -> np.ndarray:
    """What fairseq-preprocess makes of a text: ids of the words of each line, then </s> (id 2)."""
    words = [line.split()[0] for line in open(dict_path)]
    ids = {w: i + 4 for i, w in enumerate(words)}  # <s> <pad> </s> <unk> come first
    out = []
    for line in open(text_path):
        out.extend(ids[w] for w in line.split())
        out.append(2)
    return np.array(out)


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---- the pipeline -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    raw = root / "raw"
    raw.mkdir()
    for split, seed, n in (("train", 0, 700), ("valid", 1, 100), ("test", 2, 20)):
        (raw / f"{split}.txt").write_text("\n".join(sentences(seed, n)) + "\n")
    data = root / "bin"
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
            "--testpref", raw / "test.txt", "--destdir", data, "--workers", "1")

    def train(name: str, *extra):
        return lambda: run_cli(
            "fairseq-train", data, "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "knnlm_tiny",
            "--optimizer", "adam", "--lr", "0.005", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "10",
            "--max-tokens", "2048", "--tokens-per-sample", TPS, "--max-epoch", "3", "--save-dir", root / name,
            "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0", "--seed", "1", "--cpu",
            "--no-progress-bar", *extra)

    parallel(train("full"), train("adaptive", "--criterion", "adaptive_loss", "--adaptive-softmax-cutoff", "20,80",
                                   "--ddp-backend", "legacy_ddp"))
    w = SimpleNamespace(root=root, raw=raw, data=data, full=str(root / "full" / "checkpoint_last.pt"),
                        adaptive=str(root / "adaptive" / "checkpoint_last.pt"),
                        dstore_full=str(root / "dstore-full"), dstore_adaptive=str(root / "dstore-adaptive"))
    w.dump_full, w.dump_adaptive = parallel(
        lambda: eval_lm(w, w.full, "--save-dstore", "--dstore-dir", w.dstore_full),
        lambda: eval_lm(w, w.adaptive, "--save-dstore", "--dstore-dir", w.dstore_adaptive),
    )
    flat = ("--factory", "Flat", "--threads", "1", "--no-progress-bar")
    w.flat_full, w.flat_adaptive = parallel(lambda: run_cli("knnlm-build-index", w.dstore_full, *flat),
                                            lambda: run_cli("knnlm-build-index", w.dstore_adaptive, *flat))
    # 4-bit PQ codes: faiss trains 8-bit (256-centroid) codebooks slowly on 2 cores
    w.ivf_full = run_cli("knnlm-build-index", w.dstore_full, "--factory", "IVF16,PQ8x4", "--output", "ivfpq.faiss",
                         "--threads", "1", "--no-progress-bar")
    return w


def eval_lm(w, ckpt: str, *flags, task: str = "knn_eval", check: bool = True):
    return run_cli("fairseq-eval-lm", w.data, "--path", ckpt, "--user-dir", USER_DIR, "--task", task,
                   "--gen-subset", "valid", "--tokens-per-sample", TPS, "--context-window", CW, "--max-tokens", "4096",
                   "--cpu", "--no-progress-bar", *flags, check=check)


def knn_flags(dstore: str, *extra):
    return ("--knnlm", "--dstore-dir", dstore, "--lmbda", LMBDA, "--knn-temp", TEMP, "--k", K, *extra)


@pytest.fixture(scope="module")
def runs(world):
    """The scoring runs several tests compare, two at a time; every one prints its word probabilities."""
    w, wp = world, "--output-word-probs"
    names_calls = {
        "base_full": lambda: eval_lm(w, w.full, wp, task="language_modeling"),
        "base_adaptive": lambda: eval_lm(w, w.adaptive, wp, task="language_modeling"),
        "zero_full": lambda: eval_lm(w, w.full, "--knnlm", "--dstore-dir", w.dstore_full, "--lmbda", "0", wp),
        "zero_adaptive": lambda: eval_lm(w, w.adaptive, "--knnlm", "--dstore-dir", w.dstore_adaptive, "--lmbda", "0",
                                         wp),
        "knn_full": lambda: eval_lm(w, w.full, *knn_flags(w.dstore_full), wp),
        "knn_approx": lambda: eval_lm(w, w.full, *knn_flags(w.dstore_full, "--knn-dist", "approx"), wp),
        "knn_sb7": lambda: eval_lm(w, w.full, *knn_flags(w.dstore_full, "--softmax-batch", "7"), wp),
        "knn_ivf": lambda: eval_lm(w, w.full, *knn_flags(w.dstore_full, "--index-file", "ivfpq.faiss", "--probe", "4")),
        "knn_adaptive": lambda: eval_lm(w, w.adaptive, *knn_flags(w.dstore_adaptive), wp),
        # the same dump in other pieces: 3 blocks per batch, probabilities asked for 7 positions at a time
        "dump_chunked": lambda: eval_lm(w, w.full, "--save-dstore", "--dstore-dir", w.root / "dstore-chunked",
                                        "--softmax-batch", "7", "--batch-size", "3"),
    }
    return dict(zip(names_calls, parallel(*names_calls.values())))


# ---- dump ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["full", "adaptive"])
def test_dump_holds_every_scored_token_in_order(world, runs, model):
    dstore = getattr(world, f"dstore_{model}")
    dump = getattr(world, f"dump_{model}")
    stream = token_stream(world.raw / "valid.txt", world.data / "dict.txt")
    manifest = json.load(open(os.path.join(dstore, "manifest.json")))
    assert manifest["count"] == evaluated_tokens(dump.output) == len(stream) == VALID_TOKENS
    keys = np.load(os.path.join(dstore, "keys.npy"), mmap_mode="r")
    vals = np.load(os.path.join(dstore, "vals.npy"))
    assert keys.shape == (len(stream), DIM) and keys.dtype == np.float16
    assert np.isfinite(keys).all() and np.abs(keys).max() > 0
    assert vals.dtype == np.int32
    np.testing.assert_array_equal(vals, stream)  # the valid split's targets, every one, in order
    # the dump scores like the stock CLI: dumping does not change the model's probabilities
    assert loss_and_ppl(dump.output) == loss_and_ppl(runs[f"base_{model}"].output)
    ckpt = getattr(world, model)
    assert manifest["checkpoint"]["sha256"] == sha256(ckpt) and manifest["checkpoint"]["path"] == os.path.abspath(ckpt)
    assert manifest["dictionary"]["size"] == 4 + sum(1 for _ in open(world.data / "dict.txt"))
    assert (manifest["split"], manifest["context_window"], manifest["tokens_per_sample"]) == ("valid", CW, TPS)
    assert (manifest["key_type"], manifest["dim"]) == ("last_ffn_input", DIM)


def test_dump_does_not_depend_on_batching(world, runs):
    """Keys are consumed in the order the scorer asks for positions, whatever the batch and chunk sizes."""
    chunked = str(world.root / "dstore-chunked")
    a, b = (json.load(open(os.path.join(d, "manifest.json"))) for d in (chunked, world.dstore_full))
    assert a["count"] == b["count"]
    np.testing.assert_array_equal(np.load(os.path.join(chunked, "vals.npy")),
                                  np.load(os.path.join(world.dstore_full, "vals.npy")))
    # other batch shapes may round a last bit differently (measured: one row off by one fp16 ulp)
    ka = np.load(os.path.join(chunked, "keys.npy")).astype(np.float32)
    kb = np.load(os.path.join(world.dstore_full, "keys.npy")).astype(np.float32)
    np.testing.assert_allclose(ka, kb, rtol=2e-3, atol=1e-4)
    assert np.mean(ka == kb) > 0.99


def test_printed_words_are_the_valid_split(world, runs):
    words, _, _ = word_probs(runs["base_full"].output)
    expected = [w for line in open(world.raw / "valid.txt") for w in line.split() + ["</s>"]]
    assert words == expected


def test_keys_differ_between_checkpoints(world):
    a = np.load(os.path.join(world.dstore_full, "keys.npy"))
    b = np.load(os.path.join(world.dstore_adaptive, "keys.npy"))
    assert a.shape == b.shape and not np.allclose(a, b, atol=1e-2)


# ---- index -----------------------------------------------------------------------------------------
def test_indexes_were_built_for_the_dump(world):
    count = json.load(open(os.path.join(world.dstore_full, "manifest.json")))["count"]
    fingerprint = json.load(open(os.path.join(world.dstore_full, "manifest.json")))["fingerprint"]
    for name, used in (("index.faiss", "Flat"), ("ivfpq.faiss", "IVF16,PQ8x4")):
        assert os.path.getsize(os.path.join(world.dstore_full, name)) > 0
        meta = json.load(open(os.path.join(world.dstore_full, name + ".json")))
        assert meta["factory_used"] == used and meta["ntotal"] == count and meta["dim"] == DIM
        assert meta["dstore"]["fingerprint"] == fingerprint
    assert not [f for f in os.listdir(world.dstore_full) if ".tmp" in f]


# ---- scoring ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["full", "adaptive"])
def test_lambda_zero_is_stock_eval_lm(world, runs, model):
    base, zero = runs[f"base_{model}"].output, runs[f"zero_{model}"].output
    count = json.load(open(os.path.join(getattr(world, f"dstore_{model}"), "manifest.json")))["count"]
    assert f"kNN-LM: {count:,} entries" in zero  # the kNN path really ran, with its datastore opened
    (lb, _), (lz, _) = loss_and_ppl(base), loss_and_ppl(zero)
    assert abs(lz - lb) / lb < 1e-4
    assert evaluated_tokens(base) == evaluated_tokens(zero)
    wb, _, sb = word_probs(base)
    wz, _, sz = word_probs(zero)
    assert wb == wz and len(sb) == count
    assert sb == sz  # every printed word probability, digit for digit


@pytest.mark.parametrize("model", ["full", "adaptive"])
def test_datastore_of_the_evaluated_split_drives_perplexity_down(runs, model):
    _, base = loss_and_ppl(runs[f"base_{model}"].output)
    _, knn = loss_and_ppl(runs[f"knn_{model}"].output)
    assert 5 < base < 168  # the tiny model learned something, and is far from perfect
    assert knn < 0.5 * base, (knn, base)


def test_interpolated_word_probs(runs):
    """Printed word probs are the interpolation: never below (1-λ)·p_LM, and changed almost everywhere."""
    wb, lb, _ = word_probs(runs["base_full"].output)
    wk, lk, _ = word_probs(runs["knn_full"].output)
    assert wb == wk
    assert (lk >= lb + math.log(1 - LMBDA) - 2e-6).all()
    assert np.mean(np.abs(lk - lb) > 1e-3) > 0.9
    assert np.mean(lk) > np.mean(lb)


def test_interpolated_word_probs_match_a_numpy_oracle(world, runs):
    """p = λ·p_kNN + (1-λ)·p_LM with p_kNN from a float64 brute-force search over the dumped keys.

    The datastore is over the evaluated split, so position i's query is its own dumped key (stored fp16:
    the tolerance covers query rounding, magnified by 1/T)."""
    keys = np.load(os.path.join(world.dstore_full, "keys.npy")).astype(np.float64)  # (n, dim)
    vals = np.load(os.path.join(world.dstore_full, "vals.npy"))  # (n,)
    sq = (keys**2).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * keys @ keys.T  # (n, n) squared L2
    nn = np.argsort(d, axis=1)[:, :K]  # (n, K)
    logits = -np.take_along_axis(d, nn, 1) / TEMP
    weights = np.exp(logits - logits.max(1, keepdims=True))
    p_knn = (weights * (vals[nn] == vals[:, None])).sum(1) / weights.sum(1)  # (n,)
    _, lb, _ = word_probs(runs["base_full"].output)
    _, lk, _ = word_probs(runs["knn_full"].output)
    expected = np.log(LMBDA * p_knn + (1 - LMBDA) * np.exp(lb))
    err = np.abs(lk - expected)
    assert err.max() < 1e-2 and err.mean() < 1e-3, (err.max(), err.mean())


def test_exact_and_approx_distances_agree_on_flat(runs):
    (le, _), (la, _) = loss_and_ppl(runs["knn_full"].output), loss_and_ppl(runs["knn_approx"].output)
    assert "exact distances" in runs["knn_full"].output and "approx distances" in runs["knn_approx"].output
    assert abs(le - la) / le < 1e-3
    _, pe, _ = word_probs(runs["knn_full"].output)
    _, pa, _ = word_probs(runs["knn_approx"].output)
    assert np.abs(pe - pa).max() < 5e-3  # float32 rounding of distances, over T = 0.1


def test_odd_softmax_batch_scores_the_same(runs):
    assert loss_and_ppl(runs["knn_sb7"].output) == loss_and_ppl(runs["knn_full"].output)
    _, p7, _ = word_probs(runs["knn_sb7"].output)
    _, p, _ = word_probs(runs["knn_full"].output)
    assert len(p7) == len(p) > 0
    # faiss's search takes another code path for 7 queries than for a whole batch (no BLAS): a near tie
    # at the k-th neighbour may swap, which T = 0.1 magnifies; everything else is identical as printed
    np.testing.assert_allclose(p7, p, atol=1e-3)
    assert np.mean(np.abs(p7 - p) <= 1e-6) > 0.99


def test_ivfpq_index_with_exact_distances(runs):
    _, base = loss_and_ppl(runs["base_full"].output)
    _, ivf = loss_and_ppl(runs["knn_ivf"].output)
    assert "nprobe=4" in runs["knn_ivf"].output
    assert ivf < 0.5 * base, (ivf, base)


# ---- refusals --------------------------------------------------------------------------------------
def other_index(w, tmp_path):
    """The full model's datastore with the adaptive datastore's index copied in (same size, other keys)."""
    d = str(tmp_path / "mixed")
    os.makedirs(d)
    for f in ("keys.npy", "vals.npy", "manifest.json"):
        shutil.copy(os.path.join(w.dstore_full, f), d)
    for f in ("index.faiss", "index.faiss.json"):
        shutil.copy(os.path.join(w.dstore_adaptive, f), d)
    return w.full, ("--knnlm", "--dstore-dir", d)


REFUSALS = {
    "other_checkpoint": (lambda w, t: (w.adaptive, ("--knnlm", "--dstore-dir", w.dstore_full)),
                         r"was dumped with checkpoint .*full/checkpoint_last.pt.*not this one"),
    "save_into_a_datastore": (lambda w, t: (w.full, ("--save-dstore", "--dstore-dir", w.dstore_adaptive)),
                              r"already holds a datastore"),
    "index_of_another_datastore": (other_index, r"was built for another datastore"),
    "lmbda_above_one": (lambda w, t: (w.full, ("--knnlm", "--dstore-dir", w.dstore_full, "--lmbda", "1.5")),
                        r"--lmbda must be in \[0, 1.*1\.5"),
    "negative_temperature": (lambda w, t: (w.full, ("--knnlm", "--dstore-dir", w.dstore_full, "--knn-temp", "-1")),
                             r"--knn-temp must be > 0"),
    "k_above_count": (lambda w, t: (w.full, ("--knnlm", "--dstore-dir", w.dstore_full, "--k", VALID_TOKENS + 1)),
                      rf"k={VALID_TOKENS + 1} exceeds the datastore's {VALID_TOKENS:,} entries"),
}


@pytest.fixture(scope="module")
def refused(world, tmp_path_factory):
    """Every refused run, two at a time, with sha256s of the adaptive datastore before and after."""
    def state():
        return {f: sha256(os.path.join(world.dstore_adaptive, f)) for f in sorted(os.listdir(world.dstore_adaptive))}

    before = state()
    tmp = tmp_path_factory.mktemp("refusals")
    cases = [make(world, tmp) for make, _ in REFUSALS.values()]
    procs = parallel(*[lambda c=c: eval_lm(world, c[0], *c[1], check=False) for c in cases])
    return dict(zip(REFUSALS, procs)), before, state()


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refusal(refused, name):
    procs, _, _ = refused
    assert_refused(procs[name], REFUSALS[name][1])


def test_refused_dump_left_the_datastore_it_found_alone(refused):
    _, before, after = refused
    assert after == before
