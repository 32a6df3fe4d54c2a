"""Sharded search across torch.distributed ranks (core/dist_search.py): merge_topk against a brute-force top-k
over the concatenated shards, and two gloo processes, each holding one shard of a real sharded datastore and
searching its own batches, against one Flat index over the whole datastore (neighbours, both distances,
kNN-LM probabilities and perplexity)."""
import math
import os
import time
from datetime import timedelta

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knnlm_fairseq.core import knn, shards, writer
from knnlm_fairseq.core.datastore import Datastore
from knnlm_fairseq.core.dist_search import ShardedRetriever, ShardedSearch, merge_topk, open_sharded_search
from knnlm_fairseq.core.errors import KnnlmError
from knnlm_fairseq.core.index import build_index
from knnlm_fairseq.core.retriever import Retriever, open_retriever

FLT_MAX = float(np.finfo(np.float32).max)  # faiss's distance for a missing neighbour (negated for ip)


# ---- merge_topk against a brute force over the concatenated shards -----------------------------------------
def brute_topk(dists, ids, k, metric):
    """Row by row: every found candidate of every shard, sorted by (closeness, id) in Python; missing last."""
    n = len(dists[0])
    D = np.full((n, k), -np.inf if metric == "ip" else np.inf, np.float32)
    I = np.full((n, k), -1, np.int64)
    for r in range(n):
        cands = [(float(d[r, j]), int(i[r, j])) for d, i in zip(dists, ids) for j in range(i.shape[1]) if i[r, j] >= 0]
        cands.sort(key=lambda c: (-c[0] if metric == "ip" else c[0], c[1]))
        for j, (d, i) in enumerate(cands[:k]):
            D[r, j], I[r, j] = d, i
    return D, I


def random_shards(rng, n, widths, metric):
    """Per-shard top-k lists as faiss returns them: sorted, disjoint global ids, -1 (with ±FLT_MAX) past the
    shard's found neighbours, and distances on a coarse grid so that ties across shards are common."""
    dists, ids, start = [], [], 0
    for w in widths:
        d = (rng.integers(0, 6, size=(n, w)).astype(np.float32) - 2) / 4  # ties; ip can be < 0
        d = np.sort(d, axis=1)[:, ::-1] if metric == "ip" else np.sort(d, axis=1)
        i = start + np.argsort(rng.random((n, 10 * max(w, 1))), axis=1)[:, :w]  # distinct in a row, per shard
        found = rng.integers(0, w + 1, size=n)  # how many this shard found per row
        miss = np.arange(w)[None, :] >= found[:, None]
        i = np.where(miss, -1, i)
        d = np.where(miss, -FLT_MAX if metric == "ip" else FLT_MAX, d)
        d[miss & (rng.random((n, w)) < 0.5)] = 0.0  # a missing neighbour's distance must not matter
        dists.append(d.astype(np.float32))
        ids.append(i.astype(np.int64))
        start += 10 * max(w, 1)
    return dists, ids


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_merge_topk_equals_brute_force(metric):
    rng = np.random.default_rng(7)
    for widths, k in (((5, 3, 0), 4), ((8, 8), 8), ((2, 1), 6), ((4,), 4), ((3, 3, 3, 3), 5)):
        dists, ids = random_shards(rng, 50, widths, metric)
        D, I = merge_topk(dists, ids, k, metric)
        eD, eI = brute_topk(dists, ids, k, metric)
        assert D.shape == I.shape == (50, k) and D.dtype == np.float32 and I.dtype == np.int64
        np.testing.assert_array_equal(I, eI)
        np.testing.assert_array_equal(D, eD)


def test_merge_topk_ties_missing_and_empty():
    # two shards tie at 1.0: the smaller global id first, whichever shard it came from
    D, I = merge_topk([np.array([[1.0, 2.0]]), np.array([[0.5, 1.0]])], [np.array([[9, 4]]), np.array([[7, 3]])],
                      3, "l2")
    np.testing.assert_array_equal(I, [[7, 3, 9]])
    np.testing.assert_array_equal(D, [[0.5, 1.0, 1.0]])
    # inner products: larger is closer; fewer found than k: -1 and -inf (ip) / inf (l2)
    D, I = merge_topk([np.array([[0.2, -FLT_MAX]]), np.array([[0.9, 0.2]])], [np.array([[5, -1]]), np.array([[8, 2]])],
                      4, "ip")
    np.testing.assert_array_equal(I, [[8, 2, 5, -1]])
    np.testing.assert_array_equal(D, np.float32([[0.9, 0.2, 0.2, -np.inf]]))
    D, I = merge_topk([np.array([[FLT_MAX]])], [np.array([[-1]])], 2, "l2")
    np.testing.assert_array_equal(I, [[-1, -1]])
    np.testing.assert_array_equal(D, [[np.inf, np.inf]])
    D, I = merge_topk([np.zeros((0, 3)), np.zeros((0, 2))], [np.zeros((0, 3), int), np.zeros((0, 2), int)], 4, "l2")
    assert D.shape == I.shape == (0, 4)
    for bad in (dict(metric="cos"), dict(k=0)):
        with pytest.raises(KnnlmError):
            merge_topk([np.zeros((1, 2))], [np.zeros((1, 2), int)], **{"k": 2, "metric": "l2", **bad})


# ---- two gloo ranks, one shard each, against one Flat index over the whole ------------------------------------
DIM, VOCAB, N, SPLIT, K, TEMP, LMBDA = 16, 50, 4000, 1700, 8, 3.0, 0.25
META = {"key_type": "ffn_input", "split": "train", "context_window": 0,
        "checkpoint": {"path": "/ckpt.pt", "sha256": "c" * 64}, "dictionary": {"size": VOCAB, "sha256": "d" * 64}}
BATCHES = {0: [37, 120, 0], 1: [200, 0, 5, 64]}  # different sizes and counts; rank 0 ends with an empty call


def clustered(rng, n, centers):
    return (centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, DIM))).astype(np.float32)


def write_sharded(root, keys, vals, cut, metrics=("l2", "ip")):
    """Rows [0, cut) and [cut, n) as the two shards of a multi-worker dump, with Flat indexes per shard and over
    the whole."""
    for s, (a, b) in enumerate(((0, cut), (cut, len(keys)))):
        w = writer.DatastoreWriter(os.path.join(root, shards.shard_name(s, 2)), DIM, VOCAB, META)
        w.add(keys[a:b], vals[a:b])
        w.close()
        manifest = shards.assemble_shards(root, 2)  # the last shard to finish writes the whole's manifest
        assert (manifest is None) == (s == 0)
    for path in [os.path.join(root, shards.shard_name(s, 2)) for s in range(2)] + [root]:
        for metric in metrics:
            build_index(Datastore.open(path), os.path.join(path, f"index.{metric}.faiss"), "Flat", metric,
                        progress=False)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two-shard datastores: the main one (rows 0..1699, 1700..3999) and a tiny one whose shard 0 holds fewer
    rows than k; every rank's query batches with their targets."""
    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, DIM)) * 4
    keys, vals = clustered(rng, N, centers), rng.integers(0, VOCAB, N)  # values: random token ids
    write_sharded(str(tmp / "dstore"), keys, vals, SPLIT)
    write_sharded(str(tmp / "tiny"), keys[:300], vals[:300], 5, metrics=("l2",))  # 5 rows < K in shard 0
    queries, targets = {}, {}
    for r, sizes in BATCHES.items():  # near stored keys; the target is that key's token two times in three
        rows = [rng.integers(0, N, n) for n in sizes]
        queries[r] = [(keys[j] + 0.3 * rng.standard_normal((len(j), DIM))).astype(np.float32) for j in rows]
        targets[r] = [np.where(rng.random(len(j)) < 2 / 3, vals[j], rng.integers(0, VOCAB, len(j))) for j in rows]
    return str(tmp / "dstore"), str(tmp / "tiny"), queries, targets


def _refusals(rank, r, queries):
    """Contract breaches a rank cannot see alone: refused on every rank together, and the group still works."""
    out = []
    a, b = (ShardedSearch(r.local.index, r.offset, r.dstore.count, "l2") for _ in range(2))
    c = ShardedSearch(r.local.index, r.offset, r.dstore.count, ("l2", "ip")[rank])
    for call in (lambda: a.search(queries[0], K + rank),  # different k
                 lambda: a.search(np.zeros((3, DIM + rank), np.float32), K),  # rank 1's queries have a wrong shape
                 lambda: (a if rank == 0 else b).search(queries[0], K),  # ranks in different searches
                 lambda: c.search(queries[0], K)):  # shards of different metrics
        try:
            call()
            out.append("")
        except KnnlmError as e:
            out.append(str(e))
    a.finish()
    b.finish()
    try:  # shards that differ stay refused: even finish() cannot serve them
        c.finish()
    except KnnlmError as e:
        out.append(str(e))
    return np.array(out)


def _worker(rank, world, init, root, tiny, queries, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        res = {}
        for metric in ("l2", "ip"):
            for merge_on in ("approx", "exact"):
                r = open_sharded_search(root, rank, world, f"index.{metric}.faiss", k=K, exact=merge_on == "approx",
                                        merge_on=merge_on)
                for b, q in enumerate(queries):
                    nb = r.search(torch.from_numpy(q))
                    for name in ("ids", "values", "approx", "exact"):
                        res[f"{metric}_{merge_on}_{name}_{b}"] = getattr(nb, name).numpy()
                r.finish()
            fl = ShardedSearch(r.local.index, r.offset, r.dstore.count, metric)  # the faiss-level view
            for b, q in enumerate(queries):
                res[f"{metric}_faiss_D_{b}"], res[f"{metric}_faiss_I_{b}"] = fl.search(q, K)
            fl.finish()
        t = open_sharded_search(tiny, rank, world, "index.l2.faiss", k=K, exact=True)
        for b, q in enumerate(queries):
            nb = t.search(torch.from_numpy(q))
            res[f"tiny_ids_{b}"], res[f"tiny_exact_{b}"] = nb.ids.numpy(), nb.exact.numpy()
        t.finish()
        # indexes over all 5 rows of shard 0 and 1 row of shard 1: 6 found, fewer than k (missing: id -1, value 0,
        # inf), from a shard padded to k and a shard where faiss found fewer than its k
        few = faiss.IndexFlatL2(DIM)
        few.add(np.asarray(t.local.dstore.keys[: 5 if rank == 0 else 1], dtype=np.float32))
        f = ShardedRetriever(Retriever(t.local.dstore, few, "l2", t.local.k), t.offset, t.dstore, K)
        nb = f.search(torch.from_numpy(queries[0]))
        res["few_ids"], res["few_values"], res["few_exact"] = nb.ids.numpy(), nb.values.numpy(), nb.exact.numpy()
        f.finish()
        res["refusals"] = _refusals(rank, r, queries)
        np.savez(os.path.join(out, f"rank{rank}.npz"), **res)
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, root, tiny, queries, world=2, limit=60.0):
    spawn = mp.get_context("spawn")
    ctx = [spawn.Process(target=_worker, args=(r, world, f"file://{tmp_path}/rendezvous", root, tiny, queries[r],
                                                str(tmp_path))) for r in range(world)]
    for p in ctx:
        p.start()
    deadline = time.time() + limit
    for p in ctx:
        p.join(max(0.0, deadline - time.time()))
    alive = [p for p in ctx if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, f"ranks still running after {limit} s: killed"
    assert [p.exitcode for p in ctx] == [0] * world, f"a rank failed: exit codes {[p.exitcode for p in ctx]}"
    return [dict(np.load(os.path.join(tmp_path, f"rank{r}.npz"))) for r in range(world)]


def log_probs(dists, vals, targets):
    """Numpy oracle: log(λ p_kNN(target) + (1-λ) p_LM(target)), p_kNN ∝ exp(-d/T) over found neighbours, uniform LM."""
    out = []
    for d, v, t in zip(dists.astype(np.float64), vals, targets):
        found = np.isfinite(d)
        w = np.exp(-(d[found] - d[found].min()) / TEMP)
        p = w[v[found] == t].sum() / w.sum()
        out.append(math.log(LMBDA * p + (1 - LMBDA) / VOCAB))
    return np.array(out)


def test_two_ranks_equal_one_flat_index(tmp_path, sharded):
    root, tiny, queries, targets = sharded
    ranks = run_ranks(tmp_path, root, tiny, queries)
    for rank, got in enumerate(ranks):
        k, shape, other, metric, finish = got["refusals"]
        assert "different k [8, 9]" in k, k
        assert ("expected (n, 16)" if rank else "rank 1 searched with queries of a wrong shape") in shape, shape
        assert "rounds of different sharded searches" in other
        assert "differ in metrics ([0, 1])" in metric and "differ in metrics" in finish, (metric, finish)
        small = open_retriever(tiny, "index.l2.faiss", K, 1, exact=True)
        rows = np.arange(6)  # the rows those indexes hold, in numpy float64
        keys = np.asarray(small.dstore.keys[rows], dtype=np.float64)  # (6, dim)
        q = queries[rank][0].astype(np.float64)
        d2 = (q**2).sum(1)[:, None] + (keys**2).sum(1)[None, :] - 2 * q @ keys.T  # (n, 6)
        order = np.argsort(d2, axis=1, kind="stable")
        np.testing.assert_array_equal(got["few_ids"][:, :6], rows[order])
        np.testing.assert_array_equal(got["few_ids"][:, 6:], -1)
        np.testing.assert_array_equal(got["few_values"], np.where(got["few_ids"] < 0, 0, small.vals.numpy()[
            got["few_ids"].clip(0)]))
        np.testing.assert_allclose(got["few_exact"][:, :6], np.take_along_axis(d2, order, 1), rtol=1e-4, atol=1e-3)
        assert np.isinf(got["few_exact"][:, 6:]).all()
        for b, q in enumerate(queries[rank]):  # shard 0 found 5 of k: the merge fills from shard 1
            want = small.search(torch.from_numpy(q))
            np.testing.assert_array_equal(got[f"tiny_ids_{b}"], want.ids.numpy())
            np.testing.assert_allclose(got[f"tiny_exact_{b}"], want.exact.numpy(), rtol=1e-5, atol=1e-4)
        for metric in ("l2", "ip"):
            whole = open_retriever(root, f"index.{metric}.faiss", K, 1, exact=True, metric=metric)
            flat = faiss.read_index(os.path.join(root, f"index.{metric}.faiss"))
            lp = {}
            for b, q in enumerate(queries[rank]):
                want = whole.search(torch.from_numpy(q))  # the single index: neighbours and exact distances
                for merge_on in ("approx", "exact"):
                    tag = f"{metric}_{merge_on}"
                    np.testing.assert_array_equal(got[f"{tag}_ids_{b}"], want.ids.numpy(), err_msg=tag)
                    np.testing.assert_array_equal(got[f"{tag}_values_{b}"], want.values.numpy(), err_msg=tag)
                    np.testing.assert_allclose(got[f"{tag}_approx_{b}"], want.approx.numpy(), rtol=1e-5, atol=1e-4)
                    np.testing.assert_allclose(got[f"{tag}_exact_{b}"], want.exact.numpy(), rtol=1e-5, atol=1e-4)
                    lp.setdefault(merge_on, []).append(log_probs(got[f"{tag}_exact_{b}"], got[f"{tag}_values_{b}"],
                                                                 targets[rank][b]))
                lp.setdefault("whole", []).append(log_probs(want.exact.numpy(), want.values.numpy(), targets[rank][b]))
                # the package's own p_kNN on the merged neighbours agrees with the oracle
                mine = knn.interpolate(torch.full((len(q),), -math.log(VOCAB), dtype=torch.float64),
                                       knn.knn_target_log_probs(torch.from_numpy(got[f"{metric}_approx_exact_{b}"]),
                                                                torch.from_numpy(got[f"{metric}_approx_values_{b}"]),
                                                                torch.from_numpy(targets[rank][b]), TEMP).double(),
                                       LMBDA)
                np.testing.assert_allclose(mine.numpy(), lp["approx"][-1], atol=1e-6)
                D, I = flat.search(q, K)  # faiss level: raw distances, ip larger-is-closer
                np.testing.assert_array_equal(got[f"{metric}_faiss_I_{b}"], I)
                np.testing.assert_allclose(got[f"{metric}_faiss_D_{b}"], D, rtol=1e-5, atol=1e-4)
            ppl = {name: math.exp(-np.concatenate(v).mean()) for name, v in lp.items()}
            for merge_on in ("approx", "exact"):
                np.testing.assert_allclose(np.concatenate(lp[merge_on]), np.concatenate(lp["whole"]), atol=1e-6)
                assert abs(ppl[merge_on] - ppl["whole"]) < 1e-6 * ppl["whole"], (metric, ppl)
            if metric == "l2":  # the neighbours help (unnormalized inner products pick long keys, not close ones)
                assert 1 < ppl["whole"] < VOCAB / 4, ppl
    for r, sizes in BATCHES.items():  # every batch came back with its own rows, empty ones too
        assert [len(ranks[r][f"l2_approx_ids_{b}"]) for b in range(len(sizes))] == sizes
    ids = np.concatenate([got[f"l2_approx_ids_{b}"].ravel() for got, n in zip(ranks, (3, 4)) for b in range(n)])
    assert (ids < SPLIT).mean() > 0.2 and (ids >= SPLIT).mean() > 0.2  # both shards supply neighbours


def test_open_sharded_search_refusals(sharded):
    root = sharded[0]
    with pytest.raises(KnnlmError, match="2 shards but 3 ranks"):
        open_sharded_search(root, 0, 3, "index.l2.faiss", k=K)
    with pytest.raises(KnnlmError, match="torch.distributed"):  # no process group in this process
        open_sharded_search(root, 1, 2, "index.l2.faiss", k=K)
    with pytest.raises(KnnlmError, match="no manifest|not a finished"):
        open_sharded_search(os.path.join(root, "missing"), 0, 2, k=K)
