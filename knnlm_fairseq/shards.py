"""Sharded datastores: several complete datastores read as one, in order.

A sharded datastore directory holds only a manifest whose `shards` list names complete datastores (paths
relative to it) with their counts and fingerprints; rows are the shards' rows concatenated in that order.
Shards come from a multi-worker dump (`shard-00000-of-00002`, ... inside the directory, one per worker or
per `--num-shards/--shard-id` job) or from `knnlm-merge-dstore` over any compatible datastores.
"""
import hashlib
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

# what must agree for rows of different shards to mean the same thing: the model, the vocabulary, the key
KEY_FIELDS = ("key_type", "dim", "key_dtype", "val_dtype", "vocab_size")
# what a multi-worker dump of one split also shares: every shard is a part of the same command's output
DUMP_FIELDS = ("split", "data", "context_window", "tokens_per_sample", "scored_tokens_per_block", "sample_break_mode")


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def shard_range(num_batches: int, shard_id: int, num_shards: int) -> Tuple[int, int]:
    """Contiguous batches [start, stop) of one shard: shards concatenated in id order are the unsharded order."""
    return num_batches * shard_id // num_shards, num_batches * (shard_id + 1) // num_shards


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


def combined_manifest(out_dir: str, shards: List[Tuple[str, Dict]], same_dump: bool) -> Dict:
    """The manifest of a datastore made of `shards` [(path, manifest)], or ValueError naming the mismatch.

    same_dump: the shards are parts of one dump (a multi-worker run), so its settings must agree too.
    """
    first_path, first = shards[0]
    fields = KEY_FIELDS + (DUMP_FIELDS if same_dump else ())
    for path, m in shards[1:]:
        for name in fields:
            if m.get(name) != first.get(name):
                raise ValueError(f"{path} has {name}={m.get(name)!r} but {first_path} has {first.get(name)!r}; "
                                 f"only datastores dumped alike can be merged")
        for name in ("checkpoint", "dictionary"):
            if m[name]["sha256"] != first[name]["sha256"]:
                raise ValueError(f"{path} was dumped with another {name} than {first_path}; dump it again with the "
                                 f"same --path and data binarized with the same dict.txt")
    out = {name: first[name] for name in KEY_FIELDS + ("checkpoint", "dictionary", "format_version")}
    for name in DUMP_FIELDS:  # provenance that all shards share is kept; differing values stay per shard
        if all(m.get(name) == first.get(name) for _, m in shards):
            out[name] = first.get(name)
    out["count"] = sum(int(m["count"]) for _, m in shards)
    out["shards"] = [
        {"path": os.path.relpath(os.path.abspath(path), os.path.abspath(out_dir)), "count": int(m["count"]),
         "fingerprint": m["fingerprint"], **{k: m.get(k) for k in ("split", "data") if k not in out}}
        for path, m in shards
    ]
    out["fingerprint"] = hashlib.sha256(
        "".join(f"{s['fingerprint']}:{s['count']};" for s in out["shards"]).encode()
    ).hexdigest()
    return out
