"""DatastoreWriter / Datastore: streamed round trip, manifest, and every refusal with its message."""
import json
import os
import shutil

import numpy as np
import pytest

from knnlm_fairseq.core import datastore as ds, durable, writer
from knnlm_fairseq.core.errors import KnnlmError


DIM, VOCAB = 16, 300_000  # a WikiText-103-sized vocabulary: ids past int16's 32767
META = {
    "key_type": "ffn_input",
    "split": "train",
    "context_window": 1536,
    "checkpoint": {"path": "/ckpt/checkpoint_best.pt", "sha256": "c" * 64},
    "dictionary": {"size": VOCAB, "sha256": "d" * 64},
}


def make_rows(n: int, seed: int = 0, dim: int = DIM, vocab: int = VOCAB, scale: float = 8.0):
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((n, dim)) * scale).astype(np.float32)  # (n, dim), not fp16-representable
    vals = rng.integers(0, vocab, size=n)  # (n,) int64 as a model would hand them over
    vals[:6] = [0, 32767, 32768, 65535, 65536, vocab - 1]  # int16 / uint16 edges and the last id
    return keys, vals


def abandon(w) -> None:
    """What a crashed dump leaves: arrays on disk, no manifest (the writer has no abort of its own)."""
    w.keys.f.close()
    w.vals.f.close()


def write(path, keys, vals, chunks=None, seed: int = 0, **kw):
    """Stream rows in many small add() calls of random sizes (some empty), then close."""
    w = writer.DatastoreWriter(str(path), keys.shape[1], kw.pop("vocab", VOCAB), kw.pop("meta", META), **kw)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, len(keys), size=chunks or max(1, len(keys) // 7)))
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(keys)]):
        w.add(keys[a:b], vals[a:b])
    return w.close()


@pytest.fixture(scope="module")
def rows():
    return make_rows(2000)


@pytest.fixture
def dstore_dir(tmp_path, rows):
    path = tmp_path / "dstore"
    write(path, *rows)
    return path


# ---- round trip -----------------------------------------------------------------------------------
def test_round_trip_many_small_adds(dstore_dir, rows):
    keys, vals = rows
    d = ds.Datastore.open(str(dstore_dir))
    assert d.count == len(keys) and d.dim == DIM
    assert d.keys.dtype == np.float16 and d.keys.shape == (len(keys), DIM)
    np.testing.assert_array_equal(d.keys, keys.astype(np.float16))  # exactly the fp16 cast, row order kept
    assert d.vals.dtype == np.int32
    np.testing.assert_array_equal(d.vals, vals)
    assert list(d.vals[:6]) == [0, 32767, 32768, 65535, 65536, VOCAB - 1]  # the int16 trap
    d.verify()


def test_files_are_plain_npy(dstore_dir, rows):
    keys, vals = rows
    k = np.load(dstore_dir / ds.KEYS)  # any numpy reads them: no custom header, no side files
    v = np.load(dstore_dir / ds.VALS)
    np.testing.assert_array_equal(k, keys.astype(np.float16))
    np.testing.assert_array_equal(v, vals.astype(np.int32))
    assert sorted(os.listdir(dstore_dir)) == sorted([ds.KEYS, ds.VALS, ds.MANIFEST])
    # rows stream behind a fixed header: the file is exactly header + data
    assert os.path.getsize(dstore_dir / ds.KEYS) == durable.NPY_HEADER_BYTES + keys.size * 2


def test_open_memory_maps_unless_asked(dstore_dir):
    assert isinstance(ds.Datastore.open(str(dstore_dir)).keys, np.memmap)
    assert isinstance(ds.Datastore.open(str(dstore_dir)).vals, np.memmap)
    mem = ds.Datastore.open(str(dstore_dir), in_memory=True)
    assert not isinstance(mem.keys, np.memmap) and not isinstance(mem.vals, np.memmap)
    with pytest.raises(ValueError):  # memmaps are read-only: nothing can write through a reader
        ds.Datastore.open(str(dstore_dir)).keys[0, 0] = 1


def test_iter_keys_covers_rows_in_order(dstore_dir, rows):
    d = ds.Datastore.open(str(dstore_dir))
    parts = list(d.iter_keys(chunk=300))
    assert [s for s, _ in parts] == list(range(0, 2000, 300))
    assert all(p.dtype == np.float32 for _, p in parts)
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), rows[0].astype(np.float16).astype(np.float32))


def test_float32_keys_exact(tmp_path, rows):
    keys, vals = rows
    keys = keys.copy()
    keys[7, 3] = 70000.0  # beyond fp16, fine in fp32
    m = write(tmp_path / "f32", keys, vals, key_dtype="float32")
    d = ds.Datastore.open(str(tmp_path / "f32"))
    assert m["key_dtype"] == "float32" and d.keys.dtype == np.float32
    np.testing.assert_array_equal(d.keys, keys)


def test_value_dtype_widens_only_past_int32():
    assert writer.value_dtype(267_744) == np.int32
    assert writer.value_dtype(2**31 - 1) == np.int32
    assert writer.value_dtype(2**31) == np.int64


def test_int64_values_for_huge_vocabularies(tmp_path):
    keys, _ = make_rows(10)
    vals = np.array([0, 2**31 - 1, 2**31, 2**33, 5, 6, 7, 8, 9, 2**34 - 1])
    m = write(tmp_path / "big", keys, vals, vocab=2**34)
    d = ds.Datastore.open(str(tmp_path / "big"))
    assert m["val_dtype"] == "int64" and d.vals.dtype == np.int64
    np.testing.assert_array_equal(d.vals, vals)


# ---- manifest ---------------------------------------------------------------------------------------
def test_manifest_describes_the_arrays(dstore_dir, rows):
    with open(dstore_dir / ds.MANIFEST) as f:
        m = json.load(f)
    assert m["count"] == 2000 and m["dim"] == DIM and m["vocab_size"] == VOCAB
    assert (m["key_dtype"], m["val_dtype"]) == ("float16", "int32")
    assert m["files"] == {"keys": ds.KEYS, "vals": ds.VALS}
    assert m["format_version"] == ds.FORMAT_VERSION
    for k, v in META.items():  # provenance passes through untouched
        assert m[k] == v
    assert len(m["fingerprint"]) == 64 and m["fingerprint"] == ds.Datastore.open(str(dstore_dir)).fingerprint


def test_close_returns_the_manifest_and_fingerprint_follows_content(tmp_path, rows):
    keys, vals = rows
    m1 = write(tmp_path / "a", keys, vals, chunks=3)
    m2 = write(tmp_path / "b", keys, vals, chunks=50, seed=9)  # same rows, other chunking
    with open(tmp_path / "a" / ds.MANIFEST) as f:
        assert json.load(f) == m1
    assert m1["fingerprint"] == m2["fingerprint"]
    v = vals.copy()
    v[-1] = (v[-1] + 1) % VOCAB
    assert write(tmp_path / "c", keys, v)["fingerprint"] != m1["fingerprint"]


def test_dictionary_sha256_is_order_sensitive():
    a = ds.dictionary_sha256(["<s>", "the", "cat"])
    assert a == ds.dictionary_sha256(("<s>", "the", "cat"))
    assert a != ds.dictionary_sha256(["<s>", "cat", "the"])  # same words, other ids
    assert a != ds.dictionary_sha256(["<s>", "the", "cat", "sat"])


# ---- refusals on open -------------------------------------------------------------------------------
def test_open_missing_dir(tmp_path):
    with pytest.raises(KnnlmError, match="does not exist.*--save-dstore"):
        ds.Datastore.open(str(tmp_path / "nowhere"))


def test_open_unfinished_dump(tmp_path, rows):
    keys, vals = rows
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    w.add(keys[:100], vals[:100])  # the dump crashes before close(): no manifest, arrays on disk
    abandon(w)
    with pytest.raises(KnnlmError, match="no manifest.json: the dump did not finish"):
        ds.Datastore.open(str(tmp_path / "d"))


@pytest.mark.parametrize("in_memory", [False, True])
def test_open_truncated_keys(dstore_dir, in_memory):
    path = dstore_dir / ds.KEYS
    os.truncate(path, os.path.getsize(path) - 2 * DIM - 1)
    with pytest.raises(KnnlmError, match=r"keys.npy is unreadable .*damaged, dump it again"):
        ds.Datastore.open(str(dstore_dir), in_memory=in_memory)


def test_open_vals_from_another_dump(tmp_path, dstore_dir):
    keys, vals = make_rows(500, seed=1)
    write(tmp_path / "other", keys, vals)
    shutil.copy(tmp_path / "other" / ds.VALS, dstore_dir / ds.VALS)
    with pytest.raises(KnnlmError, match=r"vals.npy holds int32\[500\] but the manifest says int32\[2000\].*another dump"):
        ds.Datastore.open(str(dstore_dir))


def test_open_keys_of_other_dtype(tmp_path, dstore_dir, rows):
    np.save(dstore_dir / ds.KEYS, rows[0])  # right shape, float32 instead of the manifest's float16
    with pytest.raises(KnnlmError, match=r"holds float32\[2000, 16\] but the manifest says float16"):
        ds.Datastore.open(str(dstore_dir))


def test_open_invalid_json(dstore_dir):
    with open(dstore_dir / ds.MANIFEST, "w") as f:
        f.write('{"count": 2000, "dim": ')
    with pytest.raises(KnnlmError, match="manifest.json is not valid JSON"):
        ds.Datastore.open(str(dstore_dir))


def test_open_other_format_version(dstore_dir):
    with open(dstore_dir / ds.MANIFEST) as f:
        m = json.load(f)
    m["format_version"] = ds.FORMAT_VERSION + 1
    with open(dstore_dir / ds.MANIFEST, "w") as f:
        json.dump(m, f)
    with pytest.raises(KnnlmError, match=f"has format {ds.FORMAT_VERSION + 1}, expected {ds.FORMAT_VERSION}"):
        ds.Datastore.open(str(dstore_dir))


# ---- verify -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,offset", [(ds.KEYS, 0), (ds.KEYS, 2000 * DIM), (ds.VALS, 4 * 1234 + 2)])
def test_verify_detects_a_flipped_byte(dstore_dir, name, offset):
    ds.Datastore.open(str(dstore_dir)).verify()
    with open(dstore_dir / name, "r+b") as f:
        f.seek(durable.NPY_HEADER_BYTES + offset)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    d = ds.Datastore.open(str(dstore_dir))  # shapes still agree: only the checksum can tell
    with pytest.raises(KnnlmError, match=f"{name} does not match its checksum"):
        d.verify()


def test_verify_detects_same_size_vals_from_another_dump(tmp_path, dstore_dir, rows):
    keys, vals = rows
    write(tmp_path / "other", keys, np.roll(vals, 1))
    shutil.copy(tmp_path / "other" / ds.VALS, dstore_dir / ds.VALS)
    d = ds.Datastore.open(str(dstore_dir))
    with pytest.raises(KnnlmError, match="vals.npy does not match its checksum"):
        d.verify()


# ---- compatibility ----------------------------------------------------------------------------------
def test_check_compatible_accepts_its_own_provenance(dstore_dir):
    d = ds.Datastore.open(str(dstore_dir))
    d.check_compatible()
    d.check_compatible(checkpoint_sha256="c" * 64, dictionary_sha256="d" * 64, key_type="ffn_input", dim=DIM)


@pytest.mark.parametrize("kwargs,message", [
    ({"checkpoint_sha256": "e" * 64}, r"dumped with checkpoint /ckpt/checkpoint_best.pt \(sha256 cccccccccccc\).*this --path"),
    ({"dictionary_sha256": "e" * 64}, r"another dictionary \(300000 symbols\).*--srcdict"),
    ({"key_type": "final_layer"}, r"holds 'ffn_input' keys but 'final_layer' was asked; pass --knn-keytype ffn_input"),
    ({"dim": 1024}, r"keys of dim 16 but the model gives 1024"),
])
def test_check_compatible_refusals(dstore_dir, kwargs, message):
    d = ds.Datastore.open(str(dstore_dir))
    good = dict(checkpoint_sha256="c" * 64, dictionary_sha256="d" * 64, key_type="ffn_input", dim=DIM)
    with pytest.raises(KnnlmError, match=message):
        d.check_compatible(**dict(good, **kwargs))


# ---- writer refusals --------------------------------------------------------------------------------
FP16_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@FP16_OVERFLOW
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 70000.0, -65520.0])
def test_writer_refuses_nonfinite_fp16_keys(tmp_path, rows, bad):
    keys, vals = rows
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    w.add(keys[:10], vals[:10])
    k = keys[10:20].copy()
    k[3, 5] = bad
    with pytest.raises(KnnlmError, match=r"key row 13 is inf/NaN as float16.*--dstore-key-dtype float32"):
        w.add(k, vals[10:20])
    assert w.count == 10  # the refused batch left nothing behind
    w.add(keys[20:30], vals[20:30])
    w.close()
    np.testing.assert_array_equal(ds.Datastore.open(str(tmp_path / "d")).vals, np.r_[vals[:10], vals[20:30]])


@FP16_OVERFLOW
def test_writer_names_the_overflowing_magnitude(tmp_path, rows):
    keys, vals = rows
    k = keys[:4].copy()
    k[2, 0] = 70000.0  # finite in fp32, inf once cast to fp16 (max 65504)
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    with pytest.raises(KnnlmError, match=r"activation magnitude 7e\+04"):
        w.add(k, vals[:4])
    k[2, 0] = 65504.0  # the largest fp16 value is kept
    w.add(k, vals[:4])
    abandon(w)


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**40])
def test_writer_refuses_ids_outside_vocab(tmp_path, rows, bad):
    keys, vals = rows
    v = vals[:10].copy()
    v[4] = bad
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    with pytest.raises(KnnlmError, match=rf"token ids outside \[0, {VOCAB}\)"):
        w.add(keys[:10], v)
    assert w.count == 0
    abandon(w)


@pytest.mark.parametrize("shapes", [((5, DIM + 1), (5,)), ((5, DIM), (4,)), ((DIM,), (1,)), ((5, DIM), (5, 1))])
def test_writer_refuses_wrong_shapes(tmp_path, shapes):
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    with pytest.raises(KnnlmError, match=rf"expected keys \(n, {DIM}\) and vals \(n,\)"):
        w.add(np.zeros(shapes[0], np.float32), np.zeros(shapes[1], np.int64))
    abandon(w)


def test_writer_refuses_empty_datastore(tmp_path):
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    w.add(np.zeros((0, DIM), np.float32), np.zeros(0, np.int64))
    with pytest.raises(KnnlmError, match="no scored tokens were written.*--gen-subset"):
        w.close()
    assert not os.path.exists(tmp_path / "d" / ds.MANIFEST)
    abandon(w)


def test_writer_refuses_a_complete_datastore(dstore_dir, rows):
    before = durable.sha256_file(str(dstore_dir / ds.KEYS))
    with pytest.raises(KnnlmError, match="already holds a complete datastore; choose another --dstore-dir"):
        writer.DatastoreWriter(str(dstore_dir), DIM, VOCAB, META)
    assert durable.sha256_file(str(dstore_dir / ds.KEYS)) == before  # refused before touching anything


def test_writer_replaces_an_unfinished_dump(tmp_path, rows):
    keys, vals = rows
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    w.add(keys, vals)
    abandon(w)
    write(tmp_path / "d", keys[:50], vals[:50])
    d = ds.Datastore.open(str(tmp_path / "d"))
    assert d.count == 50
    np.testing.assert_array_equal(d.keys, keys[:50].astype(np.float16))
    d.verify()


# ---- crash safety: commit, resume, full disk ------------------------------------------------------
def crash_after(path, keys, vals, stop, commits, seed=0):
    """Feed rows in random-size adds, committing at the given add indices, and 'crash' after add `stop`."""
    w = writer.DatastoreWriter(str(path), DIM, VOCAB, META, commit_seconds=1e9)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, len(keys), size=40))
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, len(keys)])):
        if i == stop:
            break
        w.add(keys[a:b], vals[a:b])
        if i in commits:
            w.commit()
        if i == stop - 1:
            w.keys.f.write(b"\x07" * 9)  # a torn write past the last commit
    abandon(w)
    return w.committed


@pytest.mark.parametrize("stop,commits", [(5, {1, 3}), (30, {0, 10, 28}), (41, {40}), (3, set())])
def test_resume_is_byte_identical(tmp_path, rows, stop, commits):
    keys, vals = rows
    ref = write(tmp_path / "ref", keys, vals)
    committed = crash_after(tmp_path / "d", keys, vals, stop, commits)
    assert not (tmp_path / "d" / ds.MANIFEST).exists()
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)  # the same dump, run again from the start
    assert w.resumed_rows == committed
    for a in range(0, len(keys), 333):
        w.add(keys[a:a + 333], vals[a:a + 333])
    m = w.close()
    assert m["fingerprint"] == ref["fingerprint"]
    for name in (ds.KEYS, ds.VALS):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not (tmp_path / "d" / ds.PROGRESS).exists()


def test_resume_refuses_other_settings(tmp_path, rows):
    keys, vals = rows
    crash_after(tmp_path / "d", keys, vals, 10, {5})
    other = dict(META, context_window=META.get("context_window", 0) + 1)
    with pytest.raises(KnnlmError, match="unfinished dump made with other settings"):
        writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, other)


def test_full_disk_is_one_clear_error_and_resumable(tmp_path, rows, monkeypatch):
    import errno

    keys, vals = rows
    w = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META, commit_seconds=1e9)
    w.add(keys[:500], vals[:500])
    w.commit()

    def full(buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w.keys, "f", type("F", (), {"write": staticmethod(full), "close": w.keys.f.close,
                                                    "flush": w.keys.f.flush, "fileno": w.keys.f.fileno})())
    with pytest.raises(KnnlmError, match=r"no space left .* re-run the same command.*\(500 rows\)"):
        w.add(keys[500:900], vals[500:900])
    abandon(w)
    resumed = writer.DatastoreWriter(str(tmp_path / "d"), DIM, VOCAB, META)
    assert resumed.resumed_rows == 500
    resumed.add(keys, vals)
    resumed.close()
    d = ds.Datastore.open(str(tmp_path / "d"))
    np.testing.assert_array_equal(d.vals, vals)
    d.verify()


def test_slice_keeps_rows_and_provenance_with_its_own_manifest(dstore_dir, rows, tmp_path):
    """A slice (the datastore over a subset of the dumped text) is written by DatastoreWriter: its own manifest and
    checksums, the source's provenance (eval-lm's compatibility checks still apply) and where it came from."""
    keys, vals = rows
    pick = np.r_[10:50, 300:420, 1990:2000]  # (170,) sorted rows
    manifest = writer.slice_datastore(str(dstore_dir), str(tmp_path / "part"), pick, {"subset_percent": 10}, chunk=64)
    part = ds.Datastore.open(str(tmp_path / "part"))
    part.verify()
    assert part.manifest == manifest and part.count == len(pick)
    np.testing.assert_array_equal(part.keys, keys[pick].astype(np.float16))
    np.testing.assert_array_equal(part.vals, vals[pick])
    full = ds.Datastore.open(str(dstore_dir))
    assert all(part.manifest[k] == full.manifest[k] for k in META)
    assert part.manifest["sliced_from"] == {"subset_percent": 10, "path": os.path.abspath(dstore_dir),
                                            "fingerprint": full.fingerprint, "count": len(keys)}
    with pytest.raises(KnnlmError, match="already holds a complete datastore"):
        writer.slice_datastore(str(dstore_dir), str(tmp_path / "part"), pick, {})
