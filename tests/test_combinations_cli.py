"""Flag combinations through the real CLIs, each checked against a number it must produce: the cache under a
small --softmax-batch, a context window of 0 in batches, --sample-break-mode eos (numpy alias), an IVF index whose probed list
holds fewer than k entries, a sharded dump interrupted and resumed, and knnlm-merge-dstore as a command.

One tiny world: a knnlm_tiny model trained 20 updates on random text, its valid split dumped with a context
window of 0 one block per batch (the reference every other dump is compared with); runs go two at a time."""
import json
import math
import re
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

import clis
from clis import USER_DIR, assert_refused, evaluated_tokens, loss_and_ppl, parallel, random_lines, tiny_lm, word_probs

pytestmark = pytest.mark.slow

TPS = 64
CACHE = ("--cache-size", 32, "--cache-theta", 0.3, "--cache-lmbda", 0.3)  # θ and μ of the cache runs
K, LMBDA, TEMP = 64, 0.5, 10.0  # the IVF run: k above the ~39 entries of an average list
FSIZE_KIB = 12  # the interrupted shard: its keys.npy may not pass 12 KiB (190 rows of 32 fp16)


def run(name: str, *args, **kw):
    """One thread per process: CLIs run two at a time on 2 shared cores."""
    return clis.run_cli(name, *args, env=clis.ONE_THREAD, **kw)


def eval_lm(w, *flags, cw: int = 0, check: bool = True, fsize_kib: int = 0):
    return run("fairseq-eval-lm", w.data, "--path", w.ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
               "--gen-subset", "valid", "--tokens-per-sample", TPS, "--context-window", cw, "--cpu",
               "--no-progress-bar", *flags, check=check, fsize_kib=fsize_kib)


def token_stream(w) -> np.ndarray:
    """What fairseq-preprocess makes of valid.txt: ids of each line's words, then </s> (id 2)."""
    ids = {line.split()[0]: i + 4 for i, line in enumerate(open(w.data / "dict.txt"))}  # after <s> <pad> </s> <unk>
    return np.array([t for line in open(w.root / "valid.txt") for t in [ids[x] for x in line.split()] + [2]])


def rows(path):
    from knnlm_fairseq.core.datastore import Datastore

    store = Datastore.open(str(path))
    return np.asarray(store.keys[:]), np.asarray(store.vals[:]), store.manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("combinations")
    rng = np.random.default_rng(0)
    random_lines(root / "train.txt", rng, 300, 60)
    random_lines(root / "valid.txt", rng, 80, 60)
    tiny_lm(root, root / "valid.txt", max_update=20)
    w = SimpleNamespace(root=root, data=root / "bin", ckpt=root / "ckpt" / "checkpoint_last.pt", ref=root / "ref",
                        sharded=root / "sharded")
    one_block = ("--batch-size", 1, "--dstore-commit-seconds", 0)  # a commit after every block

    def shard(i, **kw):
        return eval_lm(w, "--save-dstore", "--dstore-dir", w.sharded, *one_block, "--num-shards", 2, "--shard-id", i,
                       **kw)

    w.ref_dump, w.batched_dump = parallel(
        lambda: eval_lm(w, "--save-dstore", "--dstore-dir", w.ref, *one_block),
        lambda: eval_lm(w, "--save-dstore", "--dstore-dir", root / "batched", "--max-tokens", 8 * TPS),
    )
    _, w.interrupted = parallel(
        lambda: run("knnlm-build-index", w.ref, "--factory", "IVF64,Flat", "--output", "ivf.faiss", "--threads", 1,
                    "--no-progress-bar"),
        lambda: shard(1, fsize_kib=FSIZE_KIB, check=False),  # stopped by a full "disk" after some commits
    )
    w.interrupted_progress = json.loads((w.sharded / "shard-00001-of-00002" / "progress.json").read_text())
    w.resumed, w.ivf = parallel(
        lambda: shard(1),  # the same command: resumes
        lambda: eval_lm(w, "--knnlm", "--dstore-dir", w.ref, "--index-file", "ivf.faiss", "--probe", 1, "--k", K,
                        "--lmbda", LMBDA, "--knn-temp", TEMP, "--output-word-probs", "--save-retrieval",
                        root / "ivf-log", "--batch-size", 1),
    )
    w.shard0, w.eos = parallel(lambda: shard(0),
                               lambda: eval_lm(w, "--sample-break-mode", "eos", "--output-word-probs", check=False))
    w.merged = run("knnlm-merge-dstore", root / "merged", w.sharded / "shard-00000-of-00002",
                   w.sharded / "shard-00001-of-00002", "--same-dump")
    w.cache_small, w.cache_large = parallel(*[
        lambda sb=sb: eval_lm(w, *CACHE, "--save-cache", root / f"cache-sb{sb}", "--cache-thetas", 0.3,
                              "--softmax-batch", sb, "--output-word-probs", "--max-tokens", 4 * TPS, cw=16)
        for sb in (3, 1 << 20)
    ])
    return w


# ---- continuous cache x --softmax-batch --------------------------------------------------------------
def cache_log(w, sb):
    return {name: np.load(w.root / f"cache-sb{sb}" / f"{name}.npy") for name in ("target", "lm_lp", "cache_lp", "found")}


def test_cache_with_softmax_batch_3_equals_one_chunk(world):
    """Chunks of 3 positions start anywhere in a block (context rows included): each row's cache is still the
    32 positions before it, so every cache probability is the same to the bit, and so is every printed word."""
    small, large = cache_log(world, 3), cache_log(world, 1 << 20)
    assert len(small["target"]) == evaluated_tokens(world.cache_large.output) > 500
    for name in ("target", "found", "cache_lp"):
        np.testing.assert_array_equal(small[name], large[name], err_msg=name)
    np.testing.assert_allclose(small["lm_lp"], large["lm_lp"], rtol=0, atol=2e-6)  # other matmul shapes
    _, lp_small, ps = word_probs(world.cache_small.output)
    _, lp_large, pl = word_probs(world.cache_large.output)
    assert len(ps) == len(small["target"]) and ps == pl
    assert loss_and_ppl(world.cache_small.output) == loss_and_ppl(world.cache_large.output)


def test_cache_mixture_is_the_printed_probability(world):
    """p = (1-μ)·p_LM + μ·p_cache(θ) on rows with a cache (all but the split's first): the number the runs print."""
    log = cache_log(world, 3)
    printed = word_probs(world.cache_small.output)[1]
    mu = CACHE[5]
    expected = np.where(log["found"], np.logaddexp(np.log1p(-mu) + log["lm_lp"], math.log(mu) + log["cache_lp"][:, 0]),
                        log["lm_lp"])
    assert not log["found"][0] and log["found"][1:].all()
    np.testing.assert_allclose(printed, expected, rtol=0, atol=2e-6)  # printed to 6 decimals
    assert np.mean(np.abs(printed - log["lm_lp"]) > 1e-3) > 0.9  # the cache really changed the numbers


# ---- context window 0 in batches --------------------------------------------------------------------
def test_context_window_0_with_8_blocks_per_batch_dumps_what_batch_size_1_does(world):
    """Padded batches of 8 blocks (the last one partial) store exactly the rows of one block at a time."""
    ref_keys, ref_vals, ref = rows(world.ref)
    keys, vals, m = rows(world.root / "batched")
    assert m["count"] == ref["count"] == evaluated_tokens(world.batched_dump.output) == evaluated_tokens(
        world.ref_dump.output)
    assert m["context_window"] == ref["context_window"] == 0
    assert ref["count"] % TPS != 0  # a partial last block, padded in its batch
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(keys, ref_keys)
    # row i is token i of the split, as knnlm-inspect's contexts and subsets' slices read it (fairseq orders a
    # split without a context window by a seeded shuffle, then size)
    np.testing.assert_array_equal(ref_vals, token_stream(world))


# ---- --sample-break-mode eos ------------------------------------------------------------------------
def test_sample_break_mode_eos(world):
    """fairseq 0.12.3 calls np.compat under eos, gone in numpy 2: the plugin's alias (plugin/numpy_compat.py) lets it
    score every token, as many as the default break mode."""
    assert world.eos.returncode == 0, world.eos.output[-3000:]
    assert evaluated_tokens(world.eos.output) == evaluated_tokens(world.ref_dump.output)


# ---- IVF: fewer than k neighbours -------------------------------------------------------------------
def test_ivf_list_shorter_than_k_mixes_only_the_found_neighbours(world):
    """nprobe 1, k above the probed list's size: faiss returns -1 for the rest. Perplexity stays finite, each row's
    neighbours are exactly one whole inverted list, and every printed probability is a float64 oracle's
    λ·p_kNN + (1-λ)·p_LM with p_kNN over the found neighbours only."""
    out = world.ivf.output
    assert "nprobe=1" in out
    loss, ppl = loss_and_ppl(out)
    assert math.isfinite(loss) and math.isfinite(ppl)
    log = {n: np.load(world.root / "ivf-log" / f"{n}.npy") for n in ("ids", "vals", "query", "lm_lp", "target")}
    ids = log["ids"]  # (n, K)
    found = ids >= 0
    n_found = found.sum(1)
    assert (n_found >= 1).all() and np.mean(n_found < K) > 0.5, np.bincount(n_found)
    # fewer than k means the probed list ran out: the found rows are all of one list
    index = faiss.read_index(str(world.ref / "ivf.faiss"))
    ivf = faiss.extract_index_ivf(index)  # a view into `index`: keep that alive
    sizes = [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    lists = {frozenset(faiss.rev_swig_ptr(ivf.invlists.get_ids(i), n).tolist()) for i, n in enumerate(sizes) if n}
    assert ivf.nlist > 8 and np.median(sizes) < K
    short = np.flatnonzero(n_found < K)
    assert all(frozenset(ids[i, found[i]].tolist()) in lists for i in short)
    assert (np.sort(found, axis=1)[:, ::-1] == found).all()  # the missing ones are last, never in between
    # the oracle: exact float64 distances from the logged (fp16) query to the stored keys of the found rows
    keys = np.load(world.ref / "keys.npy").astype(np.float64)
    vals = np.load(world.ref / "vals.npy")
    q = log["query"].astype(np.float64)  # (n, dim)
    d = ((keys[np.where(found, ids, 0)] - q[:, None, :]) ** 2).sum(-1)  # (n, K)
    logits = np.where(found, -d / TEMP, -np.inf)
    wts = np.exp(logits - logits.max(1, keepdims=True))  # 0 where missing
    p_knn = (wts * (vals[np.where(found, ids, 0)] == log["target"][:, None])).sum(1) / wts.sum(1)
    expected = np.log(LMBDA * p_knn + (1 - LMBDA) * np.exp(log["lm_lp"].astype(np.float64)))
    printed = word_probs(out)[1]
    assert len(printed) == len(expected) and np.isfinite(printed).all()
    err = np.abs(printed - expected)
    assert err.max() < 1e-3 and err.mean() < 1e-4, (err.max(), err.mean())


# ---- a sharded dump, interrupted and resumed; knnlm-merge-dstore -----------------------------------
def test_interrupted_shard_resumes_and_the_shards_are_the_single_dump(world):
    assert_refused(world.interrupted, r"no space left writing .*shard-00001-of-00002 .*the dump resumes from its last "
                                      r"commit \(([0-9,]+) rows\)")
    committed = int(re.search(r"\(([0-9,]+) rows\)", world.interrupted.stderr).group(1).replace(",", ""))
    assert committed == world.interrupted_progress["rows"] > 0
    shard1 = json.loads((world.sharded / "shard-00001-of-00002" / "manifest.json").read_text())
    assert shard1["resumed_after_rows"] == committed < shard1["count"]
    assert "resuming the dump" in world.resumed.stderr
    ref_keys, ref_vals, ref = rows(world.ref)
    keys, vals, m = rows(world.sharded)
    assert [s["count"] for s in m["shards"]][1] == shard1["count"] and m["count"] == ref["count"]
    np.testing.assert_array_equal(vals, ref_vals)
    np.testing.assert_array_equal(keys, ref_keys)


def test_merge_dstore_command_reads_as_the_single_dump(world):
    """knnlm-merge-dstore as a command: exit 0, the merged datastore is the reference row for row, and it is
    the very datastore the shards assembled themselves into (same fingerprint)."""
    assert world.merged.returncode == 0 and f"{world.root / 'merged'}: " in world.merged.stdout
    ref_keys, ref_vals, ref = rows(world.ref)
    keys, vals, m = rows(world.root / "merged")
    assert m["count"] == ref["count"] and len(m["shards"]) == 2
    np.testing.assert_array_equal(vals, ref_vals)
    assert keys.tobytes() == ref_keys.tobytes()
    assert m["fingerprint"] == json.loads((world.sharded / "manifest.json").read_text())["fingerprint"]
