"""Reading a datastore: fp16 keys and int32 values as memory-mapped .npy files, described by a manifest.

Layout of a datastore directory:
    keys.npy       (n, dim) float16 (or float32), memory-mapped on read
    vals.npy       (n,) int32 (int64 for vocabularies >= 2**31), the next-token ids
    manifest.json  count, dim, dtypes, key type, provenance; written last, so its presence marks completion
    progress.json  while dumping only (see writer.py)
A sharded datastore's directory holds only a manifest whose `shards` list names complete datastores (see
shards.py); it reads as their rows concatenated in order.
"""
import hashlib
import os
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from .durable import NPY_HEADER_BYTES, read_json, sha256_file
from .errors import KnnlmError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
KEYS = "keys.npy"
VALS = "vals.npy"
FORMAT_VERSION = 1


def dictionary_sha256(symbols) -> str:
    """Identity of a vocabulary: its symbols in id order (counts do not change token ids)."""
    return hashlib.sha256("\n".join(symbols).encode("utf-8")).hexdigest()


class RowConcat:
    """Read-only row concatenation of arrays (memmaps) that indexes like one numpy array, never copying all."""

    def __init__(self, parts: Sequence[np.ndarray]):
        assert parts, "no arrays to concatenate"
        assert len({(p.dtype, p.shape[1:]) for p in parts}) == 1, "parts differ in dtype or row shape"
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])  # (P + 1,) first row of each part, then n
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]),) + parts[0].shape[1:]
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = [p[max(start - lo, 0) : max(min(stop, hi) - lo, 0)]
                   for p, lo, hi in zip(self.parts, self.offsets[:-1], self.offsets[1:]) if lo < stop and hi > start]
            return np.concatenate(out) if out else self.parts[0][:0]
        if np.isscalar(idx):
            i = int(idx) + (len(self) if int(idx) < 0 else 0)
            p = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.parts[p][i - self.offsets[p]]
        ids = np.asarray(idx)
        flat = ids.reshape(-1)  # (m,)
        which = np.searchsorted(self.offsets, flat, side="right") - 1  # (m,) part of each row
        out = np.empty((flat.size,) + self.shape[1:], dtype=self.dtype)
        for p in np.unique(which):
            sel = which == p
            out[sel] = self.parts[p][flat[sel] - self.offsets[p]]
        return out.reshape(ids.shape + self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        arr = np.concatenate([np.asarray(p) for p in self.parts])  # the whole thing: only for small arrays
        return arr if dtype is None else arr.astype(dtype)


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
    def keys_in_memory(self) -> bool:
        """Whether every part's keys were read into RAM (--dstore-in-memory), not memory-mapped."""
        return not any(isinstance(k, np.memmap) for k in self.key_parts)

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
            raise KnnlmError(f"datastore directory {path} does not exist; dump one with --save-dstore first")
        if not os.path.exists(mpath):
            raise KnnlmError(
                f"{path} has no {MANIFEST}: the dump did not finish (or this is not a datastore); run the dump again"
            )
        manifest = read_json(mpath, "re-run the dump")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise KnnlmError(f"{mpath} has format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
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
                raise KnnlmError(f"{fpath} is unreadable ({e}); the datastore is damaged, dump it again") from None
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise KnnlmError(
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
                raise KnnlmError(f"shard {spath} is not the datastore {path}/{MANIFEST} was made from (changed "
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
            if sha256_file(fpath, skip=NPY_HEADER_BYTES) != self.manifest["sha256"][name]:
                raise KnnlmError(f"{fpath} does not match its checksum: the file is corrupted, dump it again")

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
            raise KnnlmError(
                f"datastore {self.path} was dumped with checkpoint {m['checkpoint']['path']} "
                f"(sha256 {m['checkpoint']['sha256'][:12]}), not this one; dump a datastore with this --path"
            )
        if dictionary_sha256 is not None and m["dictionary"]["sha256"] != dictionary_sha256:
            raise KnnlmError(
                f"datastore {self.path} was dumped with another dictionary ({m['dictionary']['size']} symbols); "
                f"binarize the data with the checkpoint's dict.txt (--srcdict) and dump again"
            )
        if key_type is not None and m["key_type"] != key_type:
            raise KnnlmError(
                f"datastore {self.path} holds '{m['key_type']}' keys but '{key_type}' was asked; "
                f"pass --knn-keytype {m['key_type']} or dump again"
            )
        if dim is not None and self.dim != dim:
            raise KnnlmError(
                f"datastore {self.path} has keys of dim {self.dim} but the model gives {dim}; "
                f"it belongs to another model, dump again"
            )

    def iter_keys(self, chunk: int = 1 << 16, start: int = 0) -> Iterator[Tuple[int, np.ndarray]]:
        """(start, float32 keys) in row order from row `start`, chunk by chunk: never the whole array in memory."""
        for start in range(start, self.count, chunk):
            yield start, np.asarray(self.keys[start : start + chunk], dtype=np.float32)
