"""index.py on seeded clustered keys: Flat is brute force, IVF-PQ has recall, exact distances are the
stored fp16 keys' float64 distances, and every refusal is a one-line KnnlmError (no fairseq)."""
import json
import os
import shutil

import faiss
import numpy as np
import pytest
import torch

from clis import run_cli
from knnlm_fairseq.core import datastore as ds, retriever, writer
from knnlm_fairseq.core import index as ix
from knnlm_fairseq.core.errors import KnnlmError


DIM, N, CLUSTERS, NQ = 32, 3000, 24, 64
META = {
    "key_type": "last_ffn_input",
    "split": "train",
    "context_window": 0,
    "checkpoint": {"path": "/ckpt/checkpoint.pt", "sha256": "c" * 64},
    "dictionary": {"size": N, "sha256": "d" * 64},
}


def clustered(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    assign = rng.integers(0, len(centers), size=n)
    return (centers[assign] + rng.standard_normal((n, centers.shape[1]))).astype(np.float32)  # (n, dim)


def make_dstore(path, seed: int = 0, n: int = N) -> "ds.Datastore":
    """A datastore whose values are a permutation of the row ids: a retrieved value names its row."""
    rng = np.random.default_rng(1000 + seed)
    centers = rng.standard_normal((CLUSTERS, DIM)) * 4.0
    keys = clustered(n, seed, centers)
    vals = rng.permutation(n)  # (n,) distinct, so vals -> rows is invertible
    w = writer.DatastoreWriter(str(path), DIM, n, dict(META, dictionary={"size": n, "sha256": "d" * 64}))
    for s in range(0, n, 700):  # streamed in several adds, like a dump
        w.add(keys[s : s + 700], vals[s : s + 700])
    w.close()
    return ds.Datastore.open(str(path))


def queries(seed: int = 7) -> np.ndarray:
    """Fresh points from the datastore's clusters (same centers as make_dstore(seed=0))."""
    centers = np.random.default_rng(1000).standard_normal((CLUSTERS, DIM)) * 4.0
    return clustered(NQ, seed, centers)  # (NQ, dim) float32


def brute_force(dstore, q: np.ndarray, k: int, metric: str):
    """float64 distances ("smaller is closer") from the stored fp16 keys, and the k best row ids."""
    keys = np.asarray(dstore.keys, dtype=np.float64)  # (n, dim), exactly what was stored
    q = q.astype(np.float64)
    if metric == "l2":
        d = ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # (NQ, n)
    else:
        d = -(q @ keys.T)
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return d, ids


def row_of(dstore) -> np.ndarray:
    inv = np.empty(dstore.count, dtype=np.int64)
    inv[np.asarray(dstore.vals)] = np.arange(dstore.count)
    return inv


def no_temp_files(path) -> bool:
    return not any(".tmp" in name for name in os.listdir(path))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_dstore(tmp_path_factory.mktemp("idx") / "dstore")


@pytest.fixture(scope="module")
def flat(store):
    """Flat indexes for both metrics, in their own files inside the datastore directory."""
    out = {}
    for metric in ("l2", "ip"):
        path = os.path.join(store.path, f"flat_{metric}.faiss")
        meta = ix.build_index(store, path, factory="Flat", metric=metric, progress=False)
        out[metric] = (path, meta)
    return out


@pytest.fixture(scope="module")
def ivfpq(store):
    path = os.path.join(store.path, "ivfpq.faiss")
    # 4-bit codes: faiss trains 8-bit (256-centroid) PQ codebooks slowly on 2 cores
    meta = ix.build_index(store, path, factory="IVF32,PQ8x4", metric="l2", progress=False)
    return path, meta


# ---- Flat is brute force ---------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_flat_search_is_brute_force(store, flat, metric):
    index, _ = retriever.load_index(flat[metric][0], store)
    q = queries()
    _, truth = brute_force(store, q, 10, metric)
    _, ids = index.search(q, 10)
    np.testing.assert_array_equal(ids, truth)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("exact", [True, False])
def test_retriever_on_flat_returns_the_true_neighbours_and_their_distances(store, flat, metric, exact):
    index, meta = retriever.load_index(flat[metric][0], store)
    assert meta["metric"] == metric
    q = queries()
    d64, truth = brute_force(store, q, 16, metric)
    r = retriever.Retriever(store, index, metric, k=16, exact=exact)
    nb = r.search(torch.from_numpy(q))
    dists, vals = nb.dists("exact" if exact else "approx"), nb.values
    assert dists.shape == vals.shape == nb.ids.shape == (NQ, 16) and dists.dtype == torch.float32
    assert vals.dtype == nb.ids.dtype == torch.int64 and (nb.exact is None) == (not exact)
    np.testing.assert_array_equal(nb.ids.numpy(), truth)  # the datastore rows themselves, nearest first
    np.testing.assert_array_equal(vals.numpy(), np.asarray(store.vals)[truth])
    expect = np.take_along_axis(d64, truth, axis=1)
    # float32 arithmetic on |q|,|k| ~ 25: allow a few ulps of the squared norms, not of the difference
    scale = np.abs(q.astype(np.float64)).sum(1, keepdims=True) ** 2
    np.testing.assert_allclose(dists.numpy(), expect, rtol=1e-5, atol=1e-6 * scale.max())
    assert (np.diff(dists.numpy(), axis=1) >= -1e-6 * scale.max()).all()  # nearest first


def test_exact_distances_of_approximate_neighbours_are_the_stored_keys(store, ivfpq):
    """With IVF-PQ the neighbours are approximate, but exact=True distances are the fp16 keys' true ones."""
    index, _ = retriever.load_index(ivfpq[0], store)
    retriever.set_nprobe(index, 8)
    q = queries(seed=11)
    exact = retriever.Retriever(store, index, "l2", k=32, exact=True, chunk_floats=5 * 32 * DIM)  # several chunks
    approx = retriever.Retriever(store, index, "l2", k=32, exact=False)
    ne, na = exact.search(torch.from_numpy(q)), approx.search(torch.from_numpy(q))
    de, ve, da = ne.exact, ne.values, na.approx
    np.testing.assert_array_equal(ne.ids.numpy(), na.ids.numpy())  # same neighbours, only the distances differ
    torch.testing.assert_close(ne.approx, na.approx, rtol=0, atol=0)
    rows = row_of(store)[ve.numpy()]  # (NQ, 32) row ids of the retrieved values
    np.testing.assert_array_equal(rows, ne.ids.numpy())
    keys = np.asarray(store.keys, dtype=np.float64)
    truth = ((q.astype(np.float64)[:, None, :] - keys[rows]) ** 2).sum(-1)
    np.testing.assert_allclose(de.numpy(), truth, rtol=1e-4, atol=1e-3)
    # PQ distances are estimates: they do not equal the exact ones
    assert np.abs(da.numpy() - truth).max() > 1e-2


def test_missing_neighbours_are_inf_not_row_zero(tmp_path):
    """IVF with nprobe=1 on a tiny datastore may return fewer than k hits: those carry d=inf."""
    store = make_dstore(tmp_path / "small", n=400)
    path = str(tmp_path / "ivf.faiss")
    ix.build_index(store, path, factory="IVF8,Flat", progress=False)
    index, _ = retriever.load_index(path, store)
    retriever.set_nprobe(index, 1)
    q = queries()
    _, ids = index.search(q, 200)
    assert (ids < 0).any(), "test setup: some query must have fewer than k hits"
    for exact in (True, False):
        nb = retriever.Retriever(store, index, "l2", k=200, exact=exact).search(torch.from_numpy(q))
        np.testing.assert_array_equal(np.isinf(nb.dists("exact" if exact else "approx").numpy()), ids < 0)
        np.testing.assert_array_equal(nb.ids.numpy(), ids)  # -1 where faiss found nothing
        np.testing.assert_array_equal(nb.found.numpy(), ids >= 0)
        assert (nb.values.numpy()[ids < 0] == 0).all()


# ---- IVF-PQ ----------------------------------------------------------------------------------------
def test_ivfpq_recall_against_brute_force(store, ivfpq):
    """10-recall@k: the share of the true 10 nearest among the k returned (kNN-LM retrieves k >> 10)."""
    index, meta = retriever.load_index(ivfpq[0], store)
    assert meta["factory_used"] == "IVF32,PQ8x4" and faiss_nlist(index) == 32
    q = queries()
    _, truth = brute_force(store, q, 10, "l2")

    def recall(nprobe: int, k: int) -> float:
        retriever.set_nprobe(index, nprobe)
        _, ids = index.search(q, k)
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))

    assert recall(8, 100) >= 0.95  # measured 0.995; a random 100 of 3000 rows would give 0.03
    assert recall(8, 10) >= 0.3  # 4-bit PQ codes blur the order inside a cluster (measured 0.40)
    assert recall(1, 100) < recall(8, 100)  # nprobe reaches faiss: one list misses neighbours


def faiss_nlist(index) -> int:
    return faiss.extract_index_ivf(index).nlist


@pytest.mark.parametrize("factory,n_train,expected", [
    ("IVF4096,PQ64", 1_000_000, "IVF4096,PQ64"),  # enough points: unchanged
    ("IVF4096,PQ64", 10_000, "IVF256,PQ64"),  # 10000 // 39
    ("IVF1024,Flat", 39 * 1024, "IVF1024,Flat"),  # exactly enough
    ("IVF1024,Flat", 39 * 1024 - 1, "IVF1023,Flat"),
    ("OPQ16_64,IVF512,PQ16", 3900, "OPQ16_64,IVF100,PQ16"),  # only the IVF count moves
    ("IVF64,PQ8", 10, "IVF1,PQ8"),  # never zero lists
    ("Flat", 10, "Flat"),
])
def test_scale_factory(factory, n_train, expected):
    assert ix.scale_factory(factory, n_train) == expected


def test_build_index_scales_ivf_lists_to_the_training_set(store, tmp_path):
    path = str(tmp_path / "scaled.faiss")
    meta = ix.build_index(store, path, factory="IVF4096,PQ4x4", train_size=1200, progress=False)
    assert meta["factory"] == "IVF4096,PQ4x4" and meta["factory_used"] == "IVF30,PQ4x4"  # 1200 // 39
    assert meta["train_size"] == 1200
    index, _ = retriever.load_index(path, store)
    assert faiss_nlist(index) == 30 and index.ntotal == N  # trained on a sample, holds every key
    # train_size above the datastore: every key trains, lists scaled to the datastore
    meta = ix.build_index(store, str(tmp_path / "all.faiss"), factory="IVF4096,Flat", train_size=10**9,
                          progress=False)
    assert meta["train_size"] == N and meta["factory_used"] == f"IVF{N // 39},Flat"


# ---- files -----------------------------------------------------------------------------------------
def test_index_and_sidecar_are_written_atomically(store, flat, ivfpq):
    for path, meta in (flat["l2"], flat["ip"], ivfpq):
        assert os.path.getsize(path) > 0
        with open(path + ".json") as f:
            side = json.load(f)
        assert side == meta
        assert side["ntotal"] == N and side["dim"] == DIM
        assert side["dstore"] == {"path": os.path.abspath(store.path), "count": N, "fingerprint": store.fingerprint}
    assert no_temp_files(store.path), os.listdir(store.path)


def test_rebuild_replaces_the_index(tmp_path):
    store = make_dstore(tmp_path / "d", n=500)
    path = os.path.join(store.path, "index.faiss")
    ix.build_index(store, path, factory="Flat", metric="ip", progress=False)
    ix.build_index(store, path, factory="Flat", metric="l2", progress=False)
    _, meta = retriever.load_index(path, store)
    assert meta["metric"] == "l2"
    assert sorted(os.listdir(store.path)) == sorted([ds.KEYS, ds.VALS, ds.MANIFEST, "index.faiss", "index.faiss.json"])


# ---- refusals --------------------------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_load_index_refuses_an_index_of_another_datastore_of_the_same_size(tmp_path, store, flat):
    other = make_dstore(tmp_path / "other", seed=1)  # same count and dim, other content
    assert other.count == store.count and other.fingerprint != store.fingerprint
    with pytest.raises(KnnlmError) as e:
        retriever.load_index(flat["l2"][0], other)
    assert "was built for another datastore" in one_line(e) and f"knnlm-build-index {other.path}" in str(e.value)


def test_index_copied_into_another_datastore_is_refused(tmp_path, store, flat):
    other = make_dstore(tmp_path / "other", n=N - 1)
    for suffix in ("", ".json"):
        shutil.copy(flat["l2"][0] + suffix, os.path.join(other.path, "index.faiss" + suffix))
    with pytest.raises(KnnlmError) as e:
        retriever.open_retriever(other.path, "index.faiss", k=8, nprobe=1, exact=True)
    assert "built for another datastore" in one_line(e)


def test_index_file_swapped_under_its_sidecar_is_refused(tmp_path):
    a, b = make_dstore(tmp_path / "a", n=500, seed=2), make_dstore(tmp_path / "b", n=500, seed=3)
    for d in (a, b):
        ix.build_index(d, os.path.join(d.path, "index.faiss"), factory="Flat", progress=False)
    shutil.copy(os.path.join(b.path, "index.faiss"), os.path.join(a.path, "index.faiss"))  # a's sidecar stays
    with pytest.raises(KnnlmError) as e:
        retriever.load_index(os.path.join(a.path, "index.faiss"), a)
    assert "is not the index its sidecar" in one_line(e)


def test_missing_index_or_sidecar_is_refused(tmp_path, store, flat):
    other = make_dstore(tmp_path / "other", n=200)
    with pytest.raises(KnnlmError) as e:
        retriever.load_index(os.path.join(other.path, "index.faiss"), other)
    assert "run knnlm-build-index first" in one_line(e)
    shutil.copy(flat["l2"][0], os.path.join(other.path, "index.faiss"))  # index without its sidecar
    with pytest.raises(KnnlmError, match="run knnlm-build-index first"):
        retriever.load_index(os.path.join(other.path, "index.faiss"), other)


def test_metric_mismatch_is_refused(store, flat):
    with pytest.raises(KnnlmError) as e:
        retriever.open_retriever(store.path, flat["l2"][0], k=8, nprobe=1, exact=True, metric="ip")
    assert "pass --knn-sim l2" in one_line(e)
    r = retriever.open_retriever(store.path, flat["ip"][0], k=8, nprobe=1, exact=True, metric="ip")
    assert r.metric == "ip"


def test_k_larger_than_the_datastore_is_refused(store, flat):
    index, _ = retriever.load_index(flat["l2"][0], store)
    assert retriever.Retriever(store, index, "l2", k=N).k == N  # all of it is fine
    for k in (N + 1, 0):
        with pytest.raises(KnnlmError) as e:
            retriever.Retriever(store, index, "l2", k=k)
        one_line(e)
    with pytest.raises(KnnlmError, match=f"k={N + 1} exceeds the datastore's 3,000 entries"):
        retriever.open_retriever(store.path, flat["l2"][0], k=N + 1, nprobe=1, exact=True)


def test_build_index_refusals_leave_nothing_behind(tmp_path):
    store = make_dstore(tmp_path / "d", n=300)
    before = sorted(os.listdir(store.path))
    with pytest.raises(KnnlmError) as e:
        ix.build_index(store, os.path.join(store.path, "index.faiss"), factory="IVF16,Bogus7", progress=False)
    assert "faiss cannot build 'IVF7,Bogus7' for dim 32" in one_line(e)  # names what it tried, lists scaled
    with pytest.raises(KnnlmError) as e:
        ix.build_index(store, os.path.join(store.path, "index.faiss"), factory="Flat", metric="cosine",
                       progress=False)
    assert "unknown metric 'cosine'" in one_line(e)
    with pytest.raises(KnnlmError):  # PQ needs dim divisible by M
        ix.build_index(store, os.path.join(store.path, "index.faiss"), factory="IVF4,PQ5", progress=False)
    assert sorted(os.listdir(store.path)) == before


# ---- the console script ----------------------------------------------------------------------------
def test_console_script_builds_an_index(tmp_path):
    store = make_dstore(tmp_path / "d", n=600)
    proc = run_cli("knnlm-build-index", store.path, "--factory", "IVF64,PQ4x4", "--train-size", "500",
                   "--threads", "1", "--no-progress-bar")
    assert "scaled to IVF12,PQ4x4" in proc.output  # 500 // 39
    index, meta = retriever.load_index(os.path.join(store.path, "index.faiss"), store)
    assert index.ntotal == 600 and meta["factory_used"] == "IVF12,PQ4x4" and meta["train_size"] == 500
    assert no_temp_files(store.path)


@pytest.mark.parametrize("args", [["--factory", "IVF16,NotAnIndex"], ["--factory", "PQ7"]])
def test_console_script_bad_factory(tmp_path, args):
    store = make_dstore(tmp_path / "d", n=300)
    before = sorted(os.listdir(store.path))
    proc = run_cli("knnlm-build-index", store.path, *args, "--threads", "1", "--no-progress-bar", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.output, proc.output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("knnlm-build-index: error: ")]
    assert len(errors) == 1 and "faiss cannot build" in errors[0], proc.stderr
    assert sorted(os.listdir(store.path)) == before  # no index, no sidecar, no temp file


def test_console_script_training_failure_is_a_one_line_error(tmp_path):
    store = make_dstore(tmp_path / "d", n=100)  # fewer keys than the 256 centroids of each PQ8 codebook
    proc = run_cli("knnlm-build-index", store.path, "--factory", "IVF64,PQ8", "--threads", "1", "--no-progress-bar",
                   check=False)
    assert proc.returncode != 0 and not os.path.exists(os.path.join(store.path, "index.faiss"))
    assert "Traceback" not in proc.output
    assert proc.stderr.strip().splitlines()[-1].startswith("knnlm-build-index: error: ")


def test_console_script_missing_datastore(tmp_path):
    proc = run_cli("knnlm-build-index", tmp_path / "nowhere", "--factory", "Flat", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.output
    assert proc.stderr.strip().splitlines()[-1].startswith("knnlm-build-index: error: ")
    assert "does not exist" in proc.stderr
    assert not os.path.exists(tmp_path / "nowhere")



def test_ondisk_ivf_lists_search_like_the_in_memory_index(store, ivfpq, tmp_path):
    """--ondisk: same trained index (same seed), lists merged into a memory-mapped .ivfdata: same answers."""
    path = os.path.join(store.path, "ondisk.faiss")
    meta = ix.build_index(store, path, factory="IVF32,PQ8x4", metric="l2", add_chunk=700, progress=False,
                          ondisk=True)
    assert os.path.exists(path + ".ivfdata") and not [f for f in os.listdir(store.path) if ".shard" in f]
    on, _ = retriever.load_index(path, store)
    mem, _ = retriever.load_index(ivfpq[0], store)
    assert on.ntotal == mem.ntotal == store.count and meta["ntotal"] == store.count
    assert os.path.getsize(path + ".ivfdata") > os.path.getsize(path)  # the lists live outside the index file
    q = np.asarray(store.keys[:NQ], dtype=np.float32)
    for index in (on, mem):
        retriever.set_nprobe(index, 8)
    d_on, i_on = on.search(q, 10)
    d_mem, i_mem = mem.search(q, 10)
    np.testing.assert_array_equal(i_on, i_mem)
    np.testing.assert_allclose(d_on, d_mem, rtol=1e-6)


def test_ondisk_needs_an_ivf_factory(store, tmp_path):
    with pytest.raises(KnnlmError, match="--ondisk needs an IVF factory"):
        ix.build_index(store, str(tmp_path / "flat.faiss"), factory="Flat", progress=False, ondisk=True)


def test_build_index_gpu_without_faiss_gpu_is_one_line(store, tmp_path):
    """knnlm-build-index --gpu on faiss-cpu: one line naming faiss-gpu (it was a NameError inside faiss), no file."""
    proc = run_cli("knnlm-build-index", store.path, "--factory", "Flat", "--output", str(tmp_path / "g.faiss"),
                   "--gpu", "--no-progress-bar", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.output
    assert proc.stderr.strip().splitlines()[-1].startswith("knnlm-build-index: error: --gpu needs faiss-gpu")
    assert not os.path.exists(tmp_path / "g.faiss")
