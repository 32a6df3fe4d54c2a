"""Past 2^31 rows: what a 3B-entry datastore needs to be 64-bit is 64-bit (row offsets, ids, counts, shard
ranges, the manifest, merges, the exact-distance gather, retrieval logs, knnlm-inspect's contexts).

No test writes terabytes: every array here is a SPARSE .npy (np.lib.format.open_memmap of a shape with more than
2^32 rows: only the pages written take disk) with a hand-written manifest, and rows are written and read near
2^31 - 1, 2^31, 2^32 + 5, the shard boundaries and the last row. The manifests carry placeholder checksums (hashing
the 100 GB the arrays declare would take minutes; nothing here calls verify()). Every row written holds content
that names its datastore and its row, so a row number cut to 32 bits reads a different (or an unwritten, zero)
row and the test fails. A real DatastoreWriter cannot start that far in cheaply: a resumed dump re-hashes every
row it keeps (8.6 GB of int32 values alone for 2^31 rows), so the header it writes is checked on its own.

Seen to fail, once each, with the code broken on purpose: offsets (Datastore.offsets, RowConcat.offsets) cast to
int32; the single-datastore key gather with int32 ids; the retriever's shard offsets as int32; a merged count
summed in int32; retrieval-log ids stored as int32; SourceText's offsets as int32; shard_range in int32; the .npy
header's row count cut to int32; the single-datastore count, RowConcat's local rows and scalar reads, the
exact-distance ids, knnlm-inspect's neighbour rows and SourceText's row in its part, each cut to int32.
"""
import hashlib
import io
import os
import shutil

import faiss
import numpy as np
import pytest
import torch

from knnlm_fairseq.cli import merge_dstore
from knnlm_fairseq.core import datastore as ds, durable, shards
from knnlm_fairseq.core.contexts import SourceText
from knnlm_fairseq.core.retrieval_log import RetrievalLog, RetrievalLogWriter, truncate_log
from knnlm_fairseq.core.retriever import Retriever
from knnlm_fairseq.inspect import data as inspect_data

N = 5_000_000_003  # rows of the big datastores: past 2^32 + 5
SHARDS = (3_000_000_000, N - 3_000_000_000)  # a sharded N: both shards past 2^31 rows, the second starting at 3e9
PROBES = (2**31 - 1, 2**31, 2**32 + 5, N - 1)
DIM, VOCAB = 8, 50_000
META = {
    "key_type": "ffn_input", "split": "train", "data": "/nowhere/data-bin", "context_window": 1536,
    "tokens_per_sample": 3072,
    "checkpoint": {"path": "/ckpt/checkpoint_best.pt", "sha256": "c" * 64},
    "dictionary": {"size": VOCAB, "sha256": "d" * 64},
}


def key_of(tag: int, row: int) -> np.ndarray:
    """(DIM,) float16 key of local `row` of datastore `tag`: the row's 7 low bytes, then the tag (all fp16-exact)."""
    return np.array(list(row.to_bytes(8, "little")[:7]) + [tag], dtype=np.float16)


def val_of(tag: int, row: int) -> int:
    return 1 + (row + 1000 * tag) % (VOCAB - 1)  # never 0: an unwritten row reads 0


def around(rows, n: int, width: int = 3):
    """Local rows within `width` of each of `rows`, and the first rows, inside [0, n)."""
    return sorted({x for r in list(rows) + [0] for x in range(r - width, r + width + 1) if 0 <= x < n})


def sparse_datastore(path: str, tag: int, n: int, rows) -> None:
    """A datastore of n rows (sparse files) with content at `rows` (local), opened by its manifest like a dump."""
    os.makedirs(path)
    keys = np.lib.format.open_memmap(os.path.join(path, ds.KEYS), mode="w+", dtype=np.float16, shape=(n, DIM))
    vals = np.lib.format.open_memmap(os.path.join(path, ds.VALS), mode="w+", dtype=np.int32, shape=(n,))
    for r in rows:
        keys[r], vals[r] = key_of(tag, r), val_of(tag, r)
    keys.flush()
    vals.flush()
    del keys, vals
    placeholder = {name: hashlib.sha256(f"{tag}:{name}".encode()).hexdigest() for name in ("keys", "vals")}
    durable.write_json_atomic(os.path.join(path, ds.MANIFEST), dict(
        META, format_version=ds.FORMAT_VERSION, count=n, dim=DIM, key_dtype="float16", val_dtype="int32",
        vocab_size=VOCAB, files={"keys": ds.KEYS, "vals": ds.VALS}, sha256=placeholder,
        fingerprint=hashlib.sha256((placeholder["keys"] + placeholder["vals"]).encode()).hexdigest()))


class Layout:
    """Which (tag, local row) a global row of datastores read in order is: the oracle, in plain Python ints."""

    def __init__(self, parts):
        self.parts = list(parts)  # [(tag, count)]
        self.starts = [sum(c for _, c in self.parts[:i]) for i in range(len(self.parts) + 1)]

    def locate(self, row: int):
        for (tag, count), start in zip(self.parts, self.starts):
            if start <= row < start + count:
                return tag, row - start, start, count
        raise IndexError(row)

    def key(self, row: int) -> np.ndarray:
        tag, local, _, _ = self.locate(row)
        return key_of(tag, local)

    def val(self, row: int) -> int:
        tag, local, _, _ = self.locate(row)
        return val_of(tag, local)


SINGLE = Layout([(1, N)])
SHARDED = Layout([(2, SHARDS[0]), (3, SHARDS[1])])
SHARD_PROBES = (2**31 - 1, 2**31, SHARDS[0] - 1, SHARDS[0], 2**32 + 5, N - 1)


def disk_use(root: str):
    """(bytes on disk, apparent bytes) of every file under root."""
    used = apparent = 0
    for d, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(d, f))
            used, apparent = used + st.st_blocks * 512, apparent + st.st_size
    return used, apparent


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """single/ (N rows), sharded/shard-0000{0,1}-of-00002 (3e9 + 2e9 rows): sparse, deleted afterwards."""
    top = tmp_path_factory.mktemp("past-2-31")
    try:
        sparse_datastore(str(top / "single"), 1, N, around(PROBES, N))
        for i, ((tag, count), start) in enumerate(zip(SHARDED.parts, SHARDED.starts)):
            local = [r - start for r in SHARD_PROBES if start <= r < start + count]
            sparse_datastore(str(top / "sharded" / shards.shard_name(i, 2)), tag, count, around(local, count))
        yield top
        used, apparent = disk_use(str(top))
        assert apparent > 1.9e11 and used < 64 << 20, f"not sparse: {used:,} bytes on disk for {apparent:,} declared"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def expect_rows(store, layout: Layout, rows) -> None:
    """Scalar, fancy (any shape, unsorted) and key/value reads of `rows` against the layout's content."""
    for r in rows:
        np.testing.assert_array_equal(store.keys[r], layout.key(r), err_msg=f"key of row {r}")
        assert int(store.vals[r]) == layout.val(r), f"value of row {r}"
    ids = np.array(rows[::-1] + rows, dtype=np.int64).reshape(2, -1)
    np.testing.assert_array_equal(store.keys[ids], np.stack([layout.key(int(r)) for r in ids.reshape(-1)])
                                  .reshape(ids.shape + (DIM,)))
    np.testing.assert_array_equal(store.vals[ids], np.vectorize(layout.val)(ids))


# ---- (a) one datastore ----------------------------------------------------------------------------------
def test_datastore_reads_rows_past_2_32(root):
    store = ds.Datastore.open(str(root / "single"))
    assert store.count == N and store.keys.shape == (N, DIM) and store.vals.shape == (N,)
    assert store.offsets.tolist() == [0, N] and store.offsets.dtype == np.int64
    expect_rows(store, SINGLE, list(PROBES))
    np.testing.assert_array_equal(store.keys[N - 4 : N], np.stack([SINGLE.key(r) for r in range(N - 4, N)]))
    got = list(store.iter_keys(chunk=3, start=N - 4))  # (start, float32 keys) up to the last row
    assert [s for s, _ in got] == [N - 4, N - 1]
    np.testing.assert_array_equal(np.concatenate([k for _, k in got]),
                                  np.stack([SINGLE.key(r) for r in range(N - 4, N)]).astype(np.float32))
    store.check_compatible(dim=DIM, key_type=META["key_type"])


@pytest.mark.parametrize("dtype,row_shape", [(np.float16, (1024,)), (np.int32, ()), (np.int64, (1024,)),
                                             (np.float16, (4096,))])
def test_streamed_npy_header_declares_rows_past_2_32(dtype, row_shape):
    """The header StreamingNpy.close() writes (keys.npy, vals.npy, a retrieval log's arrays) for N rows is read by
    numpy's own parser as N rows, within the bytes reserved for it."""
    header = durable._npy_header(np.dtype(dtype), (N,) + row_shape)
    assert len(header) == durable.NPY_HEADER_BYTES
    f = io.BytesIO(header)
    assert np.lib.format.read_magic(f) == (1, 0)
    shape, fortran, got = np.lib.format.read_array_header_1_0(f)
    assert (shape, fortran, got) == ((N,) + row_shape, False, np.dtype(dtype))
    assert f.tell() == durable.NPY_HEADER_BYTES  # the rows start where the writer puts them


# ---- (b) the exact-distance gather ----------------------------------------------------------------------
def retriever_over(store, metric: str, k: int, monkeypatch) -> Retriever:
    # Retriever() copies every value into RAM as int64 (24 GB for 3B rows, as docs/datastore.md's capacity plan
    # says; 40 GB for these N). The key gather under test reads only keys, so only one value per part is copied.
    monkeypatch.setattr(ds.Datastore, "val_parts", property(lambda self: [p.vals[:1] for p in self.parts]))
    return Retriever(store, faiss.IndexFlatL2(DIM) if metric == "l2" else faiss.IndexFlatIP(DIM), metric, k)


def expect_exact(r: Retriever, layout: Layout, rows, metric: str) -> None:
    ids = torch.tensor([list(rows), list(rows[::-1])], dtype=torch.int64)  # (2, k) faiss's int64 labels
    keys = np.stack([layout.key(int(i)) for i in ids.reshape(-1)])  # (2k, DIM)
    torch.testing.assert_close(r.gather_keys(ids.reshape(-1)), torch.from_numpy(keys), rtol=0, atol=0)
    q = torch.tensor([[3.0, -1.5, 0.25, 7.0, 2.0, -4.0, 1.0, 0.5], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    kk = keys.astype(np.float64).reshape(2, len(rows), DIM)
    qq = q.double().numpy()[:, None, :]
    want = ((kk - qq) ** 2).sum(-1) if metric == "l2" else -(kk * qq).sum(-1)  # float64 oracle, (2, k)
    torch.testing.assert_close(r.exact_dists(q, ids), torch.from_numpy(want).float(), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_distance_gather_past_2_32(root, metric, monkeypatch):
    store = ds.Datastore.open(str(root / "single"))
    r = retriever_over(store, metric, len(PROBES), monkeypatch)
    expect_exact(r, SINGLE, PROBES, metric)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_distance_gather_across_shards_past_2_32(root, metric, monkeypatch):
    shards.assemble_shards(str(root / "sharded"), 2)
    store = ds.Datastore.open(str(root / "sharded"))
    r = retriever_over(store, metric, len(SHARD_PROBES), monkeypatch)
    assert r.offsets.dtype == torch.int64 and r.offsets.tolist() == [0, SHARDS[0], N]
    expect_exact(r, SHARDED, SHARD_PROBES, metric)


# ---- (c) a sharded datastore -----------------------------------------------------------------------------
def test_sharded_datastore_reads_as_one_past_2_32(root):
    m = shards.assemble_shards(str(root / "sharded"), 2)
    assert m["count"] == N and [s["count"] for s in m["shards"]] == list(SHARDS)
    store = ds.Datastore.open(str(root / "sharded"))
    assert store.count == N and len(store.keys) == N and store.keys.shape == (N, DIM)
    for offsets in (store.offsets, store.keys.offsets, store.vals.offsets):
        assert offsets.dtype == np.int64 and offsets.tolist() == [0, SHARDS[0], N]
    expect_rows(store, SHARDED, list(SHARD_PROBES))
    b = SHARDS[0]  # a slice across the boundary, and the last rows
    np.testing.assert_array_equal(store.keys[b - 3 : b + 3], np.stack([SHARDED.key(r) for r in range(b - 3, b + 3)]))
    np.testing.assert_array_equal(store.vals[b - 3 : b + 3], [SHARDED.val(r) for r in range(b - 3, b + 3)])
    np.testing.assert_array_equal(store.vals[-2:], [SHARDED.val(N - 2), SHARDED.val(N - 1)])
    start, keys = next(store.iter_keys(chunk=4, start=b - 2))  # one chunk that spans both shards
    assert start == b - 2
    np.testing.assert_array_equal(keys, np.stack([SHARDED.key(r) for r in range(b - 2, b + 2)]))


def test_shard_ranges_tile_more_than_2_32_batches():
    for n in (2**31 + 1, 2**32 + 7, 3 * 2**32 + 1):
        for w in (2, 3, 7):
            ranges = [shards.shard_range(n, i, w) for i in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n, (n, w, ranges)
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


# ---- (d) merging ----------------------------------------------------------------------------------------------
def test_merge_counts_and_offsets_past_2_33(root, capsys):
    shards.assemble_shards(str(root / "sharded"), 2)
    out = str(root / "merged")
    try:
        assert merge_dstore.main([out, str(root / "sharded"), str(root / "single")]) == 0
        assert f"{2 * N:,} entries" in capsys.readouterr().out
        m = ds.Datastore.open(out).manifest
        assert m["count"] == 2 * N and [s["count"] for s in m["shards"]] == [N, N]
        store = ds.Datastore.open(out)
        assert store.count == 2 * N and len(store.keys) == 2 * N
        assert store.offsets.dtype == np.int64 and store.offsets.tolist() == [0, SHARDS[0], N, 2 * N]
        merged = Layout(SHARDED.parts + SINGLE.parts)
        expect_rows(store, merged, [2**31, SHARDS[0], N - 1, N, N + 2**32 + 5, 2 * N - 1])
        np.testing.assert_array_equal(store.vals[N - 2 : N + 2], [merged.val(r) for r in range(N - 2, N + 2)])
        # the fingerprint covers the counts: the same sources in another order are another datastore
        other = shards.merge(str(root / "merged-other"), [str(root / "single"), str(root / "sharded")])
        assert other["count"] == 2 * N and other["fingerprint"] != m["fingerprint"]
    finally:
        for name in ("merged", "merged-other"):
            shutil.rmtree(root / name, ignore_errors=True)


# ---- (e) retrieval logs -----------------------------------------------------------------------------------
def test_retrieval_log_round_trips_neighbour_rows_past_2_32(root):
    ids = np.array([[2**31 - 1, 2**31, 2**32 + 5, -1], [N - 1, 0, 2 * N - 1, 2**31 + 7]], dtype=np.int64)
    n, k = ids.shape
    rows = dict(ids=ids, target=np.array([5, 6]), lm_lp=np.full(n, -2.0), vals=np.full((n, k), 3),
                dist_approx=np.ones((n, k)), dist_exact=np.ones((n, k)), query=np.zeros((n, DIM)),
                lm_entropy=np.ones(n), lm_max_lp=np.full(n, -0.5), block_start=np.array([True, False]))
    path, short = str(root / "log"), str(root / "log-short")
    try:
        w = RetrievalLogWriter(path, k, {"split": "valid"}, dim=DIM)
        w.add(**rows)
        w.close()
        log = RetrievalLog(path)
        assert log.ids.dtype == np.int64
        np.testing.assert_array_equal(log.ids, ids)
        truncate_log(path, short, 1)
        np.testing.assert_array_equal(RetrievalLog(short).ids, ids[:1])
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(short, ignore_errors=True)


# the layout core/retrieval_log.py's docstring documents: name -> (dtype, row shape)
LOG_K = 2
LOG_LAYOUT = {"target": (np.int32, ()), "lm_lp": (np.float32, ()), "ids": (np.int64, (LOG_K,)),
              "vals": (np.int32, (LOG_K,)), "dist_approx": (np.float32, (LOG_K,)),
              "dist_exact": (np.float32, (LOG_K,)), "query": (np.float16, (DIM,)), "lm_entropy": (np.float32, ()),
              "lm_max_lp": (np.float32, ()), "block_start": (np.bool_, ())}


def test_retrieval_log_past_2_32_rows_reads_and_scores_its_last_rows(root):
    """A log of more than 2^32 scored tokens (sparse): the last rows read back, and knnlm-inspect's scores of
    them match a float64 oracle."""
    n = 2**32 + 8
    path = root / "biglog"
    os.makedirs(path)
    try:
        arrays = {name: np.lib.format.open_memmap(str(path / f"{name}.npy"), mode="w+", dtype=dt, shape=(n,) + s)
                  for name, (dt, s) in LOG_LAYOUT.items()}
        tail = {n - 2: dict(target=7, lm_lp=-3.0, ids=[2**32 + 5, 2**31], vals=[7, 9], dist=[1.0, 2.5]),
                n - 1: dict(target=9, lm_lp=-1.0, ids=[N - 1, -1], vals=[9, 0], dist=[0.5, np.inf])}
        for r, t in tail.items():
            arrays["target"][r], arrays["lm_lp"][r], arrays["ids"][r], arrays["vals"][r] = (
                t["target"], t["lm_lp"], t["ids"], t["vals"])
            arrays["dist_exact"][r] = arrays["dist_approx"][r] = t["dist"]
        for a in arrays.values():
            a.flush()
        del arrays
        durable.write_json_atomic(str(path / "meta.json"), {"k": LOG_K, "dim": DIM, "count": n, "split": "valid"})
        log = RetrievalLog(str(path))
        assert log.count == n
        for r, t in tail.items():
            assert log.ids[r].tolist() == t["ids"] and int(log.target[r]) == t["target"]
        lam, temp = 0.25, 2.0
        s = inspect_data.token_scores(log, "exact", LOG_K, temp, lam, slice(n - 2, n))
        for j, (r, t) in enumerate(tail.items()):
            d = np.array(t["dist"], dtype=np.float64)
            w = np.exp(-d / temp) / np.exp(-d / temp).sum()
            p_knn = float(sum(wi for wi, v in zip(w, t["vals"]) if v == t["target"]))
            p_lm = np.exp(t["lm_lp"])
            assert s["target"][j] == t["target"]
            assert s["p_knn"][j] == pytest.approx(p_knn, rel=1e-6)
            assert s["p"][j] == pytest.approx(lam * p_knn + (1 - lam) * p_lm, rel=1e-6)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---- (f) knnlm-inspect's contexts ------------------------------------------------------------------------
class WindowOnly:
    """A part's text that refuses reads longer than one context window (a wrong row would read billions)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, _ = idx.indices(len(self.tokens))
            assert stop - start <= 64, f"one context read {stop - start:,} tokens of the text"
        return self.tokens[idx]


@pytest.fixture
def text_is_values(monkeypatch):
    # SourceText checks, when it opens a part, that the part's binarized split is token for token its values (and
    # its sha256): for 3e9 rows that reads 12 GB of values and the whole split, so here each part's text *is* its
    # values array. What stays under test is context(): global row -> part, row in the part, window, check.
    monkeypatch.setattr(SourceText, "_stream", staticmethod(lambda part: WindowOnly(part.vals)))


def expect_contexts(source: SourceText, layout: Layout, rows, left: int = 3, right: int = 2) -> None:
    for r in rows:
        _, local, start, count = layout.locate(r)
        window = list(range(start + max(0, local - left), start + min(count, local + right + 1)))  # global rows
        ctx, at = source.context(r, left, right)
        assert ctx == [layout.val(x) for x in window] and window[at] == r, f"context of row {r}"


def test_contexts_past_2_32_in_a_sharded_datastore(root, text_is_values):
    shards.assemble_shards(str(root / "sharded"), 2)
    source = SourceText(ds.Datastore.open(str(root / "sharded")))
    expect_contexts(source, SHARDED, SHARD_PROBES)  # a shard's text starts at its first row: no context before


def test_inspect_shows_neighbours_past_2_32_with_their_text(root, text_is_values):
    """knnlm-inspect's page data (inspect/data.build) for a log whose neighbours are rows past 2^31 and 2^32."""
    shards.assemble_shards(str(root / "sharded"), 2)
    store = ds.Datastore.open(str(root / "sharded"))
    nbrs = [[2**31, 2**32 + 5, SHARDS[0]], [N - 1, 2**31 - 1, SHARDS[0] - 1]]
    path = str(root / "inspect-log")
    try:
        w = RetrievalLogWriter(path, 3, {"split": "valid"}, dim=DIM)
        vals = np.array([[SHARDED.val(r) for r in row] for row in nbrs])
        d = np.array([[1.0, 2.0, 3.0], [0.5, 1.5, 2.5]], dtype=np.float32)
        w.add(ids=np.array(nbrs), target=vals[:, 0], lm_lp=np.full(2, -2.0), vals=vals, dist_approx=d, dist_exact=d,
              query=np.zeros((2, DIM)), lm_entropy=np.ones(2), lm_max_lp=np.full(2, -0.5),
              block_start=np.array([True, False]))
        w.close()
        symbols = [f"w{i}" for i in range(VOCAB)]
        page = inspect_data.build(RetrievalLog(path), symbols, SourceText(store), "exact", 3, 1.0, 0.25, shown=3,
                                  left=3, right=2)
        words = page["vocab"]
        for t, row in enumerate(nbrs):
            got = page["tokens"]["nb"][t]
            assert [e[0] for e in got] == row
            for e in got:
                _, local, start, count = SHARDED.locate(e[0])
                window = range(start + max(0, local - 3), start + min(count, local + 3))
                assert [words[c] for c in e[4]] == [f"w{SHARDED.val(x)}" for x in window], f"text of row {e[0]}"
                assert words[e[4][e[5]]] == words[e[3]] == f"w{SHARDED.val(e[0])}"
    finally:
        shutil.rmtree(path, ignore_errors=True)
