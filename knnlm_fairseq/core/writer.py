"""Writing a datastore: rows streamed to disk, committed every few seconds, resumable after a crash.

A dump killed at any point and re-run with the same command truncates the arrays to the last commit
(progress.json: rows and the dump's identity), re-hashes them, skips the rows already stored, and ends with
files byte-identical to an uninterrupted dump. The manifest is written last: its presence marks completion.
"""
import hashlib
import json
import logging
import os
import time
from typing import Dict, Optional

import numpy as np

from .datastore import FORMAT_VERSION, KEYS, MANIFEST, PROGRESS, VALS, Datastore
from .durable import StreamingNpy, disk_errors, write_json_atomic
from .errors import KnnlmError

logger = logging.getLogger(__name__)


# manifest fields the writer computes itself; everything else (checkpoint, dictionary, context sizes) is provenance
COMPUTED = ("format_version", "count", "dim", "key_dtype", "val_dtype", "vocab_size", "files", "sha256", "fingerprint",
            "dump_seconds", "resumed_after_rows")


def value_dtype(vocab_size: int) -> np.dtype:
    # int16 overflows past 32767 ids (WikiText-103 has 267k); int32 covers any real vocabulary
    return np.dtype(np.int32) if vocab_size < 2**31 else np.dtype(np.int64)


class DatastoreWriter:
    """Streams (key, value) rows to disk; memory does not grow with the number of rows.

    `meta` holds provenance (key_type, split, checkpoint, dictionary, context sizes); it lands in the manifest.
    """

    def __init__(self, path: str, dim: int, vocab_size: int, meta: Dict, key_dtype: str = "float16",
                 commit_seconds: float = 30.0):
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise KnnlmError(
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
            raise KnnlmError(
                f"{self.path} holds an unfinished dump made with other settings (checkpoint, data, split, "
                f"context or key type); re-run that command to finish it, or delete {self.path}"
            )
        return int(progress["rows"])

    def _guard(self) -> disk_errors:
        return disk_errors(self.path, f"re-run the same command: the dump resumes from its last commit "
                                      f"({self.committed:,} rows)")

    def commit(self) -> None:
        """Make every row so far durable, then record it: a crash after this loses nothing before it."""
        with self._guard():
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
            raise KnnlmError(f"expected keys (n, {self.dim}) and vals (n,), got {keys.shape} and {vals.shape}")
        cast = keys.astype(self.key_dtype, copy=False)
        if not np.isfinite(cast).all():
            bad = int(self.count + np.flatnonzero(~np.isfinite(cast).all(axis=1))[0])
            raise KnnlmError(
                f"key row {bad} is inf/NaN as {self.key_dtype} (activation magnitude "
                f"{float(np.abs(keys[np.isfinite(keys)]).max(initial=0)):.3g}); dump again with "
                f"--dstore-key-dtype float32"
            )
        if vals.size and (vals.min() < 0 or vals.max() >= self.vocab_size):
            raise KnnlmError(f"token ids outside [0, {self.vocab_size}) in values")
        if self.skip:  # resuming: these rows are on disk already
            drop = min(self.skip, len(vals))
            self.skip -= drop
            cast, vals = cast[drop:], vals[drop:]
        with self._guard():
            self.keys.append(cast)
            self.vals.append(vals)
        if time.time() - self.last_commit >= self.commit_seconds:
            self.commit()

    def close(self) -> Dict:
        """Finish the arrays, then write the manifest (the commit point). Returns the manifest."""
        if self.count == 0:
            raise KnnlmError("no scored tokens were written: the split is empty; check --gen-subset and the data")
        if self.skip:
            raise KnnlmError(f"the resumed dump produced fewer rows than {self.path} already holds; "
                                 f"the data or settings changed, delete {self.path} and dump again")
        with self._guard():
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


def slice_datastore(src: str, dest: str, rows: np.ndarray, note: Dict, chunk: int = 1 << 16) -> Dict:
    """A datastore of some rows of src (same model, same keys), with its own manifest; returns the manifest.

    Row i of a --save-dstore dump over a file is token i, so the rows of whole articles are exactly the entries a
    dump of those articles would hold, each key computed with its context in the full text.
    """
    ds = Datastore.open(src)
    meta = {k: v for k, v in ds.manifest.items() if k not in COMPUTED}
    meta["sliced_from"] = dict(note, path=os.path.abspath(src), fingerprint=ds.fingerprint, count=ds.count)
    w = DatastoreWriter(dest, ds.dim, ds.manifest["vocab_size"], meta, key_dtype=ds.manifest["key_dtype"])
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]  # (c,) sorted row ids
        w.add(np.asarray(ds.keys[r]), np.asarray(ds.vals[r]))  # (c, dim), (c,)
    return w.close()
