"""core/torch_search.py (--knn-backend torch) against faiss's own Flat indexes and a float64 brute force, on the CPU.

Oracles: faiss IndexFlatL2 / IndexFlatIP over the same keys (ids and distances), numpy float64 distances, and a
numpy int8 quantizer written here from the definition (scale = max|x| / 127 per dimension). Integer-valued keys
and queries make every distance exact in float32, so ties are real there and L2 ids must be faiss's exactly (the
smaller id wins a tie, as in faiss's L2 heaps). Chunk sizes force several chunks and a partial last one, k larger
than a chunk, k = ntotal, and rows split over several "devices" (CPU devices here: CI has no GPU).

Mutations seen to fail (each made by hand, run, reverted):
  |x|^2 dropped from the L2 distance (torch_search.py _search_shard: `dist = (qn + 0 * sh.norms[...])...`) ->
      every l2 comparison with faiss, the int8 test, the Retriever test, and the CLI test (word probs)
  chunk merge off by one (`ci = ci + (sh.lo + s - 1)`) -> every multi-chunk comparison and the CLI test
  ties left to topk (select() without its `short` repair) -> test_ties_are_broken_as_faiss_does_on_exact_arithmetic
  int8 scale max|x| / 255 (clamped at 127) -> test_int8_keys_recall_and_distances
  --knn-backend ignored (knn_eval.py passes backend="faiss") -> the CLI test; --knn-torch-dtype ignored -> the CLI
      test (int8 prints the float16 numbers); --knn-device ignored -> the CLI test (cuda not refused)
"""
import os
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch

import clis
from clis import USER_DIR, assert_refused, loss_and_ppl, parallel, word_probs
from knnlm_fairseq.core import index as ix, retriever
from knnlm_fairseq.core.errors import KnnlmError
from knnlm_fairseq.core.torch_search import FLT_MAX, TorchFlatIndex
from test_index import brute_force, make_dstore, queries

DIM = 32
FAISS = {"l2": faiss.IndexFlatL2, "ip": faiss.IndexFlatIP}


def clustered_keys(n: int = 2000, nq: int = 150, seed: int = 0):
    """fp16 keys (n, DIM) around 12 centers and float32 queries from the same centers."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, DIM)) * 3
    keys = (centers[rng.integers(0, 12, n)] + rng.standard_normal((n, DIM))).astype(np.float16)
    q = (centers[rng.integers(0, 12, nq)] + rng.standard_normal((nq, DIM))).astype(np.float32)
    return keys, q


def faiss_search(keys: np.ndarray, q: np.ndarray, k: int, metric: str):
    faiss.omp_set_num_threads(1)
    index = FAISS[metric](keys.shape[1])
    index.add(keys.astype(np.float32))
    return index.search(q, k)


def exact64(keys, q, metric: str) -> np.ndarray:
    """(nq, n) float64 "smaller is closer" distances."""
    x, q = keys.astype(np.float64), q.astype(np.float64)
    return ((q**2).sum(1)[:, None] + (x**2).sum(1)[None] - 2 * q @ x.T) if metric == "l2" else -(q @ x.T)


def assert_same_as_faiss(D, I, Df, If, keys, q, metric: str, tol: float):
    """Distances equal to float32 tolerance; ids equal except where faiss's and ours are (near-)tied."""
    np.testing.assert_allclose(D, Df, rtol=0, atol=tol)
    ref = exact64(keys, q, metric)
    differ = I != If
    assert differ.mean() < 0.002, differ.mean()
    r, c = np.nonzero(differ)
    assert (np.abs(ref[r, I[r, c]] - ref[r, If[r, c]]) < tol).all()  # only near-ties swap
    for row in range(len(q)):  # and every row holds a true k-NN set
        kth = np.sort(ref[row])[I.shape[1] - 1]
        assert (ref[row, I[row]] <= kth + tol).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("chunk_rows,k,batch", [(333, 50, 64), (100, 257, 1000), (2000, 17, 7), (4096, 5, 150)])
def test_equals_faiss_flat_on_clustered_keys(metric, chunk_rows, k, batch):
    """Several chunks with a partial last one (2000 = 6 x 333 + 2), k above the chunk (257 > 100), one chunk
    exactly, a chunk larger than the keys; query batches that split the queries unevenly."""
    keys, q = clustered_keys()
    Df, If = faiss_search(keys, q, k, metric)
    D, I = TorchFlatIndex([keys], metric, device="cpu", chunk_rows=chunk_rows, query_batch=batch).search(q, k)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (len(q), k)
    assert_same_as_faiss(D, I, Df, If, keys, q, metric, tol=1e-5 * np.abs(Df).max())


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rows_split_over_devices_and_parts_search_as_one(metric):
    """Keys in 3 parts (a sharded datastore) held by 3 devices: the same answer as one device, bit for bit."""
    keys, q = clustered_keys(n=1001)
    parts = [keys[:400], keys[400:401], keys[401:]]
    one = TorchFlatIndex([keys], metric, device="cpu", chunk_rows=128).search(q, 40)
    three = TorchFlatIndex(parts, metric, device=["cpu"] * 3, chunk_rows=128)
    assert [(s.lo, s.hi) for s in three.shards] == [(0, 334), (334, 667), (667, 1001)]
    for a, b in zip(one, three.search(q, 40)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ties_are_broken_as_faiss_does_on_exact_arithmetic(metric):
    """Small integers: every distance is exact in float32 and most are tied. L2: faiss's ids exactly (the smaller id
    wins a tie); inner product: faiss's distances exactly, and ids that are a true k-NN set with ties by id."""
    rng = np.random.default_rng(3)
    keys = rng.integers(-2, 3, size=(3000, 8)).astype(np.float16)
    q = rng.integers(-2, 3, size=(200, 8)).astype(np.float32)
    Df, If = faiss_search(keys, q, 100, metric)
    for devices, chunk in ((["cpu"], 64), (["cpu"] * 2, 1000), (["cpu"], 4096)):
        D, I = TorchFlatIndex([keys], metric, device=devices, chunk_rows=chunk, query_batch=50).search(q, 100)
        np.testing.assert_array_equal(D, Df)
        ref = exact64(keys, q, metric)
        assert (np.take_along_axis(ref, I, 1) == (D if metric == "l2" else -D)).all()
        truth = np.lexsort((np.broadcast_to(np.arange(3000), ref.shape), ref), axis=1)[:, :100]  # (d, id) order
        np.testing.assert_array_equal(I, truth)
        if metric == "l2":
            np.testing.assert_array_equal(I, If)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_k_of_ntotal_and_beyond_pads_as_faiss(metric):
    keys, q = clustered_keys(n=300, nq=20)
    for k in (300, 310):
        Df, If = faiss_search(keys, q, k, metric)
        D, I = TorchFlatIndex([keys], metric, device="cpu", chunk_rows=64).search(q, k)
        assert (np.sort(I[:, :300], 1) == np.arange(300)).all()  # every row once
        np.testing.assert_array_equal(I[:, 300:], If[:, 300:])  # -1
        np.testing.assert_array_equal(D[:, 300:], Df[:, 300:])  # faiss's FLT_MAX (l2) or -FLT_MAX (ip)
        assert_same_as_faiss(D[:, :300], I[:, :300], Df[:, :300], If[:, :300], keys, q, metric, 1e-5 * np.abs(Df[:, :300]).max())
    assert abs(D[0, -1]) == FLT_MAX


def test_int8_keys_recall_and_distances():
    """int8 keys: exactly this file's quantizer (scale = max|x| / 127 per dim), distances those of the dequantized
    keys, recall@k of the exact neighbours >= 0.95, and distances within 1% of the exact ones on average (5% at most)."""
    keys, q = clustered_keys(n=3000, nq=100)
    x = keys.astype(np.float32)
    scale = np.abs(x).max(0) / np.float32(127)  # (DIM,) float32, as the index computes it
    codes = np.clip(np.round(x / scale), -127, 127)  # round half to even, as torch.round
    deq = codes * scale  # (n, DIM) float32
    index = TorchFlatIndex([keys[:1000], keys[1000:]], "l2", device="cpu", key_dtype="int8", chunk_rows=700)
    stored = torch.cat([s.keys for s in index.shards]).numpy()
    assert stored.dtype == np.int8 and np.abs(codes).max() == 127
    np.testing.assert_array_equal(index.shards[0].scale.numpy(), scale)
    np.testing.assert_array_equal(stored, codes)
    k = 64
    D, I = index.search(q, k)
    deq_d = exact64(deq, q, "l2")
    np.testing.assert_allclose(D, np.take_along_axis(deq_d, I, 1), rtol=1e-5, atol=1e-4)  # the dequantized keys'
    De, Ie = faiss_search(keys, q, k, "l2")
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(I, Ie)])
    assert recall >= 0.95, recall
    rel = np.abs(D - np.take_along_axis(exact64(keys, q, "l2"), I, 1)) / np.abs(De).mean()  # against exact
    assert rel.mean() < 0.01 and rel.max() < 0.05, (rel.mean(), rel.max())
    assert recall < 1 or not np.array_equal(D, De)  # quantized for real: not the float16 answer


# ---- through the Retriever: open_retriever(backend="torch") ---------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = make_dstore(tmp_path_factory.mktemp("torch") / "dstore")
    for metric in ("l2", "ip"):
        ix.build_index(store, os.path.join(store.path, f"flat_{metric}.faiss"), factory="Flat", metric=metric,
                       progress=False)
    return store


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_open_retriever_torch_returns_the_flat_retrievers_neighbours(store, metric):
    """Same ids and values as the faiss Flat retriever, the same exact gather, approx distances to float32."""
    q = torch.from_numpy(queries())
    ours = retriever.open_retriever(store.path, f"flat_{metric}.faiss", 16, 32, exact=True, backend="torch", device="cpu")
    theirs = retriever.open_retriever(store.path, f"flat_{metric}.faiss", 16, 32, exact=True)
    assert isinstance(ours.index, TorchFlatIndex) and ours.metric == ours.index.metric == metric
    a, b = ours.search(q), theirs.search(q)
    d64, truth = brute_force(store, queries(), 16, metric)
    np.testing.assert_array_equal(a.ids.numpy(), truth)
    np.testing.assert_array_equal(a.ids.numpy(), b.ids.numpy())
    np.testing.assert_array_equal(a.values.numpy(), b.values.numpy())
    np.testing.assert_array_equal(a.exact.numpy(), b.exact.numpy())  # the Retriever's own gather, unchanged
    tol = 1e-5 * np.abs(d64).max()
    np.testing.assert_allclose(a.approx.numpy(), b.approx.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(a.approx.numpy(), a.exact.numpy(), rtol=0, atol=tol)  # float16 keys: exact already


def test_open_retriever_refusals(store, monkeypatch):
    def refused(message, **kw):
        with pytest.raises(KnnlmError, match=message) as e:
            retriever.open_retriever(store.path, kw.pop("index_file", "flat_l2.faiss"), 16, 32, exact=True, **kw)
        assert "\n" not in str(e.value)

    refused(r"--knn-device and --knn-torch-dtype set the torch search; add --knn-backend torch", key_dtype="int8")
    refused(r"add --knn-backend torch", device="cpu")
    refused(r"drop --knn-gpu", backend="torch", gpu=True)
    refused(r"built for 'l2' similarity, not 'ip'; pass --knn-sim l2", backend="torch", metric="ip")
    refused(r"no index at .*run knnlm-build-index", backend="torch", index_file="missing.faiss")
    refused(r"unknown key dtype 'bf16'", backend="torch", key_dtype="bf16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused(r"--knn-device cuda needs a visible GPU.*pass --knn-device cpu", backend="torch", device="cuda")


# ---- the real CLI ------------------------------------------------------------------------------------------
TPS, CW, BSZ, K, LMBDA, TEMP = 32, 16, 4, 16, 0.5, 2.0


@pytest.mark.slow
def test_knn_backend_torch_prints_the_faiss_flat_numbers(tmp_path):
    """fairseq-eval-lm --knnlm --knn-backend torch over a tiny model's datastore: the perplexity and every word
    probability of the faiss Flat run (exact distances: the same strings; faiss's own distances: to 1e-5), and the
    run says it searched in torch. --knn-torch-dtype int8 prints other (close) numbers and says int8; --knn-device
    cuda on a machine without a visible GPU is refused."""
    from test_alignment_cli import templated_lm

    data, ckpt = templated_lm(tmp_path)
    dstore = str(tmp_path / "dstore")

    def eval_lm(*flags, env=None):
        return clis.run_cli("fairseq-eval-lm", data, "--path", ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
                            "--tokens-per-sample", TPS, "--context-window", CW, "--batch-size", BSZ, "--cpu",
                            "--no-progress-bar", *flags, check=False, env=dict(clis.ONE_THREAD, **(env or {})))

    assert eval_lm("--gen-subset", "train", "--save-dstore", "--dstore-dir", dstore).returncode == 0
    clis.run_cli("knnlm-build-index", dstore, "--factory", "Flat", "--threads", "1", "--no-progress-bar",
                 env=clis.ONE_THREAD)
    knn = ("--gen-subset", "valid", "--knnlm", "--dstore-dir", dstore, "--k", K, "--lmbda", LMBDA, "--knn-temp", TEMP,
           "--knn-threads", 1, "--output-word-probs")
    torch_ = ("--knn-backend", "torch")
    calls = {"faiss": lambda: eval_lm(*knn), "torch": lambda: eval_lm(*knn, *torch_),
             "faiss_approx": lambda: eval_lm(*knn, "--knn-dist", "approx"),
             "torch_approx": lambda: eval_lm(*knn, *torch_, "--knn-dist", "approx"),
             "int8": lambda: eval_lm(*knn, *torch_, "--knn-dist", "approx", "--knn-torch-dtype", "int8"),
             "cuda": lambda: eval_lm(*knn, *torch_, "--knn-device", "cuda", env={"CUDA_VISIBLE_DEVICES": ""})}
    runs = SimpleNamespace(**dict(zip(calls, parallel(*calls.values()))))
    for name in ("faiss", "torch", "faiss_approx", "torch_approx", "int8"):
        assert getattr(runs, name).returncode == 0, getattr(runs, name).output[-3000:]
    for name in ("torch", "torch_approx"):
        assert "torch search: " in getattr(runs, name).output and " as float16 " in getattr(runs, name).output
    assert "torch search: " not in runs.faiss.output and " as int8 " in runs.int8.output
    assert "on cpu," in runs.torch.output  # auto, where torch sees no GPU

    words, lp, text = word_probs(runs.faiss.output)
    words_t, lp_t, text_t = word_probs(runs.torch.output)
    assert len(lp) > 300 and words_t == words and text_t == text  # exact distances: the printed strings
    assert loss_and_ppl(runs.torch.output) == loss_and_ppl(runs.faiss.output)
    _, lp_a, _ = word_probs(runs.faiss_approx.output)
    _, lp_ta, _ = word_probs(runs.torch_approx.output)
    assert len(lp_ta) == len(lp_a) == len(lp) and np.abs(lp_ta - lp_a).max() <= 1e-5
    assert abs(loss_and_ppl(runs.torch_approx.output)[0] - loss_and_ppl(runs.faiss_approx.output)[0]) <= 1e-4
    assert np.abs(lp_a - lp).max() < 1e-4  # Flat: faiss's distances are exact ones up to float32 rounding

    _, lp_8, _ = word_probs(runs.int8.output)
    err = np.abs(lp_8 - lp_ta)
    assert (err > 1e-5).mean() > 0.1 and err.mean() < 0.01, (err.mean(), err.max())  # near, not equal
    assert_refused(runs.cuda, r"--knn-device cuda needs a visible GPU.*pass --knn-device cpu")
