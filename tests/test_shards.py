"""Sharded datastores: several complete datastores read as one (row order, gathers, index, exact distances),
and every refusal when they do not belong together."""
import json
import os

import numpy as np
import pytest
import torch

from knnlm_fairseq.core import datastore as ds, retriever, shards
from knnlm_fairseq.core import index as ix
from knnlm_fairseq.core.errors import KnnlmError
from test_datastore import META, make_rows, write



def test_rowconcat_indexes_like_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float16) for n in (5, 0, 7, 1, 9)]  # an empty part too
    whole = np.concatenate(parts)  # (22, 3)
    rc = ds.RowConcat(parts)
    assert rc.shape == whole.shape and len(rc) == 22 and rc.dtype == whole.dtype
    for sl in (slice(None), slice(3, 15), slice(5, 12), slice(20, 40), slice(-4, None), slice(2, 19, 3), slice(9, 9)):
        np.testing.assert_array_equal(rc[sl], whole[sl])
    ids = rng.integers(0, 22, size=(6, 4))  # any shape, unsorted, repeated
    np.testing.assert_array_equal(rc[ids], whole[ids])
    for i in (0, 4, 5, 12, 21, -1, -22):
        np.testing.assert_array_equal(rc[i], whole[i])
    np.testing.assert_array_equal(np.asarray(rc), whole)


def test_shard_ranges_tile_the_batches_in_order():
    for n in (0, 1, 5, 64, 1001):
        for w in (1, 2, 3, 8):
            ranges = [shards.shard_range(n, i, w) for i in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


@pytest.fixture
def three(tmp_path):
    rows = [make_rows(n, seed=s) for s, n in ((1, 300), (2, 6), (3, 450))]
    paths = [tmp_path / f"part{i}" for i in range(3)]
    for p, r in zip(paths, rows):
        write(p, *r)
    return paths, rows


def test_merged_reads_as_the_concatenation(tmp_path, three):
    paths, rows = three
    m = shards.merge(str(tmp_path / "all"), [str(p) for p in paths])
    merged = ds.Datastore.open(str(tmp_path / "all"))
    keys = np.concatenate([r[0] for r in rows]).astype(np.float16)
    vals = np.concatenate([r[1] for r in rows])
    assert merged.count == m["count"] == 756 and merged.dim == keys.shape[1]
    np.testing.assert_array_equal(merged.keys[:], keys)
    np.testing.assert_array_equal(merged.vals[:], vals)
    got = np.concatenate([k for _, k in merged.iter_keys(chunk=97)])
    np.testing.assert_array_equal(got, keys.astype(np.float32))
    assert [s["path"] for s in m["shards"]] == ["../part0", "../part1", "../part2"]  # relative: movable together
    merged.verify()
    merged.check_compatible(checkpoint_sha256=META["checkpoint"]["sha256"], key_type=META["key_type"])


def test_fingerprint_follows_shards_and_order(tmp_path, three):
    paths, _ = three
    a = shards.merge(str(tmp_path / "a"), [str(p) for p in paths])["fingerprint"]
    b = shards.merge(str(tmp_path / "b"), [str(p) for p in reversed(paths)])["fingerprint"]
    c = shards.merge(str(tmp_path / "c"), [str(p) for p in paths])["fingerprint"]
    assert a == c and a != b


def test_index_and_exact_distances_over_shards_equal_one_datastore(tmp_path, three):
    paths, rows = three
    shards.merge(str(tmp_path / "all"), [str(p) for p in paths])
    write(tmp_path / "single", np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]))
    q = torch.from_numpy(make_rows(40, seed=9)[0])  # (40, dim)
    out = []
    for name in ("all", "single"):
        store = ds.Datastore.open(str(tmp_path / name))
        ix.build_index(store, str(tmp_path / name / "index.faiss"), factory="Flat", progress=False)
        r = retriever.open_retriever(str(tmp_path / name), "index.faiss", k=64, nprobe=1, exact=True)
        out.append(r.search(q, exact=True))
    for name in ("ids", "values", "approx", "exact"):
        torch.testing.assert_close(getattr(out[0], name), getattr(out[1], name), rtol=0, atol=0)


def test_replaced_shard_is_refused(tmp_path, three):
    paths, _ = three
    shards.merge(str(tmp_path / "all"), [str(p) for p in paths])
    os.rename(paths[1], tmp_path / "old")
    write(paths[1], *make_rows(6, seed=77))  # same size, other rows
    with pytest.raises(KnnlmError, match="changed or replaced since"):
        ds.Datastore.open(str(tmp_path / "all"))


def test_missing_shard_is_refused(tmp_path, three):
    paths, _ = three
    shards.merge(str(tmp_path / "all"), [str(p) for p in paths])
    os.rename(paths[2], tmp_path / "moved")
    with pytest.raises(KnnlmError, match="does not exist"):
        ds.Datastore.open(str(tmp_path / "all"))


@pytest.mark.parametrize("change, message", [
    ({"key_type": "last_ffn_output"}, "key_type"),
    ({"checkpoint": {"path": "/other.pt", "sha256": "e" * 64}}, "another checkpoint"),
    ({"dictionary": {"size": 300_000, "sha256": "f" * 64}}, "another dictionary"),
])
def test_merge_refuses_datastores_that_do_not_belong_together(tmp_path, three, change, message):
    paths, _ = three
    write(tmp_path / "odd", *make_rows(10, seed=5), meta={**META, **change})
    with pytest.raises(KnnlmError, match=message):
        shards.merge(str(tmp_path / "all"), [str(paths[0]), str(tmp_path / "odd")])
    assert not (tmp_path / "all" / "manifest.json").exists()


def test_merge_refuses_other_dim_and_key_dtype(tmp_path, three):
    paths, _ = three
    write(tmp_path / "wide", *make_rows(10, seed=5, dim=8))
    with pytest.raises(KnnlmError, match="dim"):
        shards.merge(str(tmp_path / "x"), [str(paths[0]), str(tmp_path / "wide")])
    write(tmp_path / "f32", *make_rows(10, seed=5), key_dtype="float32")
    with pytest.raises(KnnlmError, match="key_dtype"):
        shards.merge(str(tmp_path / "y"), [str(paths[0]), str(tmp_path / "f32")])


def test_same_dump_requires_the_same_split(tmp_path, three):
    paths, _ = three
    write(tmp_path / "valid", *make_rows(10, seed=5), meta={**META, "split": "valid"})
    shards.merge(str(tmp_path / "ok"), [str(paths[0]), str(tmp_path / "valid")])  # two corpora: allowed
    with pytest.raises(KnnlmError, match="split"):
        shards.merge(str(tmp_path / "no"), [str(paths[0]), str(tmp_path / "valid")], same_dump=True)


def test_merge_refuses_an_existing_datastore_and_incomplete_sources(tmp_path, three):
    paths, _ = three
    with pytest.raises(KnnlmError, match="already holds a datastore"):
        shards.merge(str(paths[0]), [str(paths[1])])
    (tmp_path / "half").mkdir()
    with pytest.raises(KnnlmError, match="no manifest.json"):
        shards.merge(str(tmp_path / "z"), [str(paths[0]), str(tmp_path / "half")])


def test_assemble_waits_for_every_shard(tmp_path):
    top = tmp_path / "dstore"
    rows = make_rows(100, seed=4)
    meta = {**META, "shard": {"id": 0, "of": 2}}
    write(top / shards.shard_name(0, 2), rows[0][:60], rows[1][:60], meta=meta)
    assert shards.assemble_shards(str(top), 2) is None and not (top / "manifest.json").exists()
    write(top / shards.shard_name(1, 2), rows[0][60:], rows[1][60:], meta={**META, "shard": {"id": 1, "of": 2}})
    m = shards.assemble_shards(str(top), 2)
    assert m["count"] == 100 and json.loads((top / "manifest.json").read_text())["count"] == 100
    np.testing.assert_array_equal(ds.Datastore.open(str(top)).vals[:], rows[1])
    assert shards.assemble_shards(str(top), 2)["fingerprint"] == m["fingerprint"]  # a second finisher: same answer
