"""A self-describing datastore: fp16 keys and int32/int64 values as .npy files plus a manifest.

Layout of a datastore directory:
    keys.npy       (n, dim) float16 (or float32), memory-mapped on read
    vals.npy       (n,) int32 (int64 for vocabularies >= 2**31), the next-token ids
    manifest.json  count, dim, dtypes, key type, provenance; written last, so its presence marks completion
    progress.json  while dumping: rows safely on disk (fsynced) and the dump's identity; a re-run of the
                   same command resumes there, and the finished files are byte-identical to an uninterrupted dump
"""
import errno
import hashlib
import json
import logging
import os
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .shards import RowConcat, combined_manifest, shard_name

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
KEYS = "keys.npy"
VALS = "vals.npy"
FORMAT_VERSION = 1
# .npy header room reserved up front: rows stream in before the final shape is known
_HEADER_BYTES = 128


class DatastoreError(ValueError):
    """A datastore, index or request that cannot be used; the message names the fix."""


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def dictionary_sha256(symbols) -> str:
    """Identity of a vocabulary: its symbols in id order (counts do not change token ids)."""
    return hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()


def write_json_atomic(path: str, obj: Dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _npy_header(dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    body = repr(d).encode("latin1")
    prefix = np.lib.format.MAGIC_PREFIX + bytes([1, 0])
    pad = _HEADER_BYTES - len(prefix) - 2 - len(body) - 1
    assert pad >= 0, "npy header does not fit the reserved bytes"
    body = body + b" " * pad + b"\n"
    return prefix + len(body).to_bytes(2, "little") + body


def value_dtype(vocab_size: int) -> np.dtype:
    # int16 overflows past 32767 ids (WikiText-103 has 267k); int32 covers any real vocabulary
    return np.dtype(np.int32) if vocab_size < 2**31 else np.dtype(np.int64)


class StreamingNpy:
    """Appends rows to a .npy file whose header is written when the row count is known.

    resume_rows: reopen a file whose first rows are known good, drop anything after them and re-hash them.
    """

    def __init__(self, path: str, dtype: np.dtype, row_shape: Tuple[int, ...], resume_rows: Optional[int] = None):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.sha = hashlib.sha256()
        if resume_rows is None:
            self.rows = 0
            self.f = open(path, "wb")
            self.f.write(b"\0" * _HEADER_BYTES)
            return
        good = _HEADER_BYTES + resume_rows * self.row_bytes
        if not os.path.exists(path) or os.path.getsize(path) < good:
            raise DatastoreError(f"{path} is shorter than its progress record says; the unfinished dump is damaged, "
                                 f"delete {os.path.dirname(path)} and dump again")
        self.f = open(path, "r+b")
        self.f.truncate(good)  # rows after the last commit may be partial: they are written again
        self.f.seek(_HEADER_BYTES)
        left = good - _HEADER_BYTES
        while left:
            block = self.f.read(min(left, 1 << 24))
            self.sha.update(block)
            left -= len(block)
        self.rows = resume_rows

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        assert arr.shape[1:] == self.row_shape, f"row shape {arr.shape[1:]} != {self.row_shape}"
        buf = arr.tobytes()
        self.f.write(buf)
        self.sha.update(buf)
        self.rows += arr.shape[0]

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.sync()
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, (self.rows,) + self.row_shape))
        self.sync()
        self.f.close()


def _disk_errors(path: str, committed: int):
    """Turn a full disk into a one-line error that says the dump can resume."""

    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, kind, err, tb):
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise DatastoreError(
                    f"no space left writing {path} ({err.strerror}); free disk space and re-run the same command: "
                    f"the dump resumes from its last commit ({committed:,} rows)"
                ) from None
            return False

    return _Guard()


class DatastoreWriter:
    """Streams (key, value) rows to disk; memory does not grow with the number of rows.

    `meta` holds provenance (key_type, split, checkpoint, dictionary, context sizes); it lands in the manifest.
    """

    def __init__(self, path: str, dim: int, vocab_size: int, meta: Dict, key_dtype: str = "float16",
                 commit_seconds: float = 30.0):
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise DatastoreError(
                f"{path} already holds a complete datastore; choose another --dstore-dir or delete it first"
            )
        os.makedirs(path, exist_ok=True)
        self.path, self.dim, self.meta = path, dim, dict(meta)
        self.key_dtype = np.dtype(key_dtype)
        self.vocab_size = vocab_size
        self.commit_seconds = commit_seconds
        # everything that decides the bytes: a resumed dump must be the same dump
        self.identity = hashlib.sha256(json.dumps(
            {"meta": {k: v for k, v in self.meta.items() if k != "versions"}, "dim": dim, "vocab": vocab_size,
             "key_dtype": self.key_dtype.name}, sort_keys=True).encode()).hexdigest()
        resume = self._resume_point()
        self.keys = StreamingNpy(os.path.join(path, KEYS), self.key_dtype, (dim,), resume)
        self.vals = StreamingNpy(os.path.join(path, VALS), value_dtype(vocab_size), (), resume)
        self.resumed_rows = resume or 0
        self.skip = self.resumed_rows  # incoming rows already on disk, dropped by add()
        self.committed = self.resumed_rows
        self.last_commit = time.time()
        self.started = time.time()
        if resume:
            logger.info(f"resuming the dump in {path} after {resume:,} rows already on disk")

    def _resume_point(self) -> Optional[int]:
        ppath = os.path.join(self.path, PROGRESS)
        if not os.path.exists(ppath):
            return None  # nothing was committed: start over
        with open(ppath) as f:
            progress = json.load(f)
        if progress["identity"] != self.identity:
            raise DatastoreError(
                f"{self.path} holds an unfinished dump made with other settings (checkpoint, data, split, "
                f"context or key type); re-run that command to finish it, or delete {self.path}"
            )
        return int(progress["rows"])

    def commit(self) -> None:
        """Make every row so far durable, then record it: a crash after this loses nothing before it."""
        with _disk_errors(self.path, self.committed):
            self.keys.sync()
            self.vals.sync()
            write_json_atomic(os.path.join(self.path, PROGRESS), {"rows": self.count, "identity": self.identity})
        self.committed = self.count
        self.last_commit = time.time()

    @property
    def count(self) -> int:
        return self.vals.rows

    def add(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """keys: (n, dim) float, vals: (n,) int token ids."""
        keys = np.asarray(keys)
        vals = np.asarray(vals)
        if keys.ndim != 2 or keys.shape[1] != self.dim or vals.shape != (keys.shape[0],):
            raise DatastoreError(f"expected keys (n, {self.dim}) and vals (n,), got {keys.shape} and {vals.shape}")
        cast = keys.astype(self.key_dtype, copy=False)
        if not np.isfinite(cast).all():
            bad = int(self.count + np.flatnonzero(~np.isfinite(cast).all(axis=1))[0])
            raise DatastoreError(
                f"key row {bad} is inf/NaN as {self.key_dtype} (activation magnitude "
                f"{float(np.abs(keys[np.isfinite(keys)]).max(initial=0)):.3g}); dump again with "
                f"--dstore-key-dtype float32"
            )
        if vals.size and (vals.min() < 0 or vals.max() >= self.vocab_size):
            raise DatastoreError(f"token ids outside [0, {self.vocab_size}) in values")
        if self.skip:  # resuming: these rows are on disk already
            drop = min(self.skip, len(vals))
            self.skip -= drop
            cast, vals = cast[drop:], vals[drop:]
        with _disk_errors(self.path, self.committed):
            self.keys.append(cast)
            self.vals.append(vals)
        if time.time() - self.last_commit >= self.commit_seconds:
            self.commit()

    def close(self) -> Dict:
        """Finish the arrays, then write the manifest (the commit point). Returns the manifest."""
        if self.count == 0:
            raise DatastoreError("no scored tokens were written: the split is empty; check --gen-subset and the data")
        if self.skip:
            raise DatastoreError(f"the resumed dump produced fewer rows than {self.path} already holds; "
                                 f"the data or settings changed, delete {self.path} and dump again")
        with _disk_errors(self.path, self.committed):
            self.keys.close()
            self.vals.close()
        manifest = dict(self.meta)
        manifest.update(
            format_version=FORMAT_VERSION,
            count=self.count,
            dim=self.dim,
            key_dtype=self.key_dtype.name,
            val_dtype=self.vals.dtype.name,
            vocab_size=self.vocab_size,
            files={"keys": KEYS, "vals": VALS},
            sha256={"keys": self.keys.sha.hexdigest(), "vals": self.vals.sha.hexdigest()},
            fingerprint=hashlib.sha256(
                (self.keys.sha.hexdigest() + self.vals.sha.hexdigest()).encode()
            ).hexdigest(),
            dump_seconds=round(time.time() - self.started, 3),
            resumed_after_rows=self.resumed_rows,
        )
        write_json_atomic(os.path.join(self.path, MANIFEST), manifest)
        if os.path.exists(os.path.join(self.path, PROGRESS)):
            os.remove(os.path.join(self.path, PROGRESS))  # after the manifest: there is always one or the other
        logger.info(f"datastore {self.path}: {self.count:,} entries of dim {self.dim} ({self.key_dtype.name})")
        return manifest


class Datastore:
    """A finished datastore, memory-mapped: nothing is read until rows are indexed.

    A sharded one (see shards.py) reads as the concatenation of its shards; `parts` are the underlying
    single datastores in row order.
    """

    def __init__(self, path: str, manifest: Dict, keys: np.ndarray, vals: np.ndarray, parts=None):
        self.path, self.manifest, self.keys, self.vals = path, manifest, keys, vals
        self.parts = parts or [self]

    @property
    def key_parts(self):
        return [p.keys for p in self.parts]

    @property
    def val_parts(self):
        return [p.vals for p in self.parts]

    @property
    def offsets(self) -> np.ndarray:
        return np.cumsum([0] + [p.count for p in self.parts])  # (P + 1,)

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @classmethod
    def open(cls, path: str, in_memory: bool = False) -> "Datastore":
        mpath = os.path.join(path, MANIFEST)
        if not os.path.isdir(path):
            raise DatastoreError(f"datastore directory {path} does not exist; dump one with --save-dstore first")
        if not os.path.exists(mpath):
            raise DatastoreError(
                f"{path} has no {MANIFEST}: the dump did not finish (or this is not a datastore); run the dump again"
            )
        try:
            with open(mpath) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise DatastoreError(f"{mpath} is not valid JSON ({e}); re-run the dump") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DatastoreError(f"{mpath} has format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
        if "shards" in manifest:
            return cls._open_sharded(path, manifest, in_memory)
        n, dim = manifest["count"], manifest["dim"]
        mode = None if in_memory else "r"
        arrays = {}
        for name, shape, dtype in (("keys", (n, dim), manifest["key_dtype"]), ("vals", (n,), manifest["val_dtype"])):
            fpath = os.path.join(path, manifest["files"][name])
            try:
                arr = np.load(fpath, mmap_mode=mode)
            except (OSError, ValueError) as e:
                raise DatastoreError(f"{fpath} is unreadable ({e}); the datastore is damaged, dump it again") from None
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise DatastoreError(
                    f"{fpath} holds {arr.dtype}{list(arr.shape)} but the manifest says {dtype}{list(shape)}; "
                    f"the file is truncated or from another dump, dump it again"
                )
            arrays[name] = arr
        return cls(path, manifest, arrays["keys"], arrays["vals"])

    @classmethod
    def _open_sharded(cls, path: str, manifest: Dict, in_memory: bool) -> "Datastore":
        parts = []
        for shard in manifest["shards"]:
            spath = os.path.normpath(os.path.join(path, shard["path"]))
            ds = cls.open(spath, in_memory)
            if ds.count != shard["count"] or ds.fingerprint != shard["fingerprint"]:
                raise DatastoreError(f"shard {spath} is not the datastore {path}/{MANIFEST} was made from (changed "
                                     f"or replaced since); merge the shards again")
            parts.extend(ds.parts)
        return cls(path, manifest, RowConcat([p.keys for p in parts]), RowConcat([p.vals for p in parts]), parts)

    def verify(self) -> None:
        """Re-hash both arrays against the manifest (reads every byte)."""
        if len(self.parts) > 1 or self.parts[0] is not self:
            for part in self.parts:
                part.verify()
            return
        for name in ("keys", "vals"):
            fpath = os.path.join(self.path, self.manifest["files"][name])
            h = hashlib.sha256()
            with open(fpath, "rb") as f:
                f.seek(_HEADER_BYTES)
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != self.manifest["sha256"][name]:
                raise DatastoreError(f"{fpath} does not match its checksum: the file is corrupted, dump it again")

    def check_compatible(
        self,
        checkpoint_sha256: Optional[str] = None,
        dictionary_sha256: Optional[str] = None,
        key_type: Optional[str] = None,
        dim: Optional[int] = None,
    ) -> None:
        """Refuse a datastore made with another model, vocabulary, key type or key size."""
        m = self.manifest
        if checkpoint_sha256 is not None and m["checkpoint"]["sha256"] != checkpoint_sha256:
            raise DatastoreError(
                f"datastore {self.path} was dumped with checkpoint {m['checkpoint']['path']} "
                f"(sha256 {m['checkpoint']['sha256'][:12]}), not this one; dump a datastore with this --path"
            )
        if dictionary_sha256 is not None and m["dictionary"]["sha256"] != dictionary_sha256:
            raise DatastoreError(
                f"datastore {self.path} was dumped with another dictionary ({m['dictionary']['size']} symbols); "
                f"binarize the data with the checkpoint's dict.txt (--srcdict) and dump again"
            )
        if key_type is not None and m["key_type"] != key_type:
            raise DatastoreError(
                f"datastore {self.path} holds '{m['key_type']}' keys but '{key_type}' was asked; "
                f"pass --knn-keytype {m['key_type']} or dump again"
            )
        if dim is not None and self.dim != dim:
            raise DatastoreError(
                f"datastore {self.path} has keys of dim {self.dim} but the model gives {dim}; "
                f"it belongs to another model, dump again"
            )

    def iter_keys(self, chunk: int = 1 << 16, start: int = 0) -> Iterator[Tuple[int, np.ndarray]]:
        """(start, float32 keys) in row order from row `start`, chunk by chunk: never the whole array in memory."""
        for start in range(start, self.count, chunk):
            yield start, np.asarray(self.keys[start : start + chunk], dtype=np.float32)


def merge(out_dir: str, sources: List[str], same_dump: bool = False) -> Dict:
    """Write out_dir/manifest.json describing `sources` (complete datastores) read as one; copies no rows."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise DatastoreError(f"{out_dir} already holds a datastore; choose another output directory")
    if not sources:
        raise DatastoreError("nothing to merge: name at least one datastore")
    shards = [(src, Datastore.open(src).manifest) for src in sources]
    try:
        manifest = combined_manifest(out_dir, shards, same_dump)
    except ValueError as e:
        raise DatastoreError(str(e)) from None
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def assemble_shards(path: str, num_shards: int) -> Optional[Dict]:
    """After one shard of a multi-worker dump finishes: if every shard has, write the datastore's manifest.

    Each worker calls this after closing its own shard, so the last one to finish always sees all of them;
    two finishing together write the same manifest (atomic rename), so no coordination is needed.
    """
    names = [shard_name(i, num_shards) for i in range(num_shards)]
    done = [n for n in names if os.path.exists(os.path.join(path, n, MANIFEST))]
    if len(done) < num_shards:
        logger.info(f"{len(done)} of {num_shards} shards of {path} are complete; the datastore is complete when all are")
        return None
    if os.path.exists(os.path.join(path, MANIFEST)):
        return Datastore.open(path).manifest
    shards = [(os.path.join(path, n), Datastore.open(os.path.join(path, n)).manifest) for n in names]
    try:
        manifest = combined_manifest(path, shards, same_dump=True)
    except ValueError as e:
        raise DatastoreError(str(e)) from None
    write_json_atomic(os.path.join(path, MANIFEST), manifest)
    logger.info(f"datastore {path}: {manifest['count']:,} entries in {num_shards} shards")
    return manifest
