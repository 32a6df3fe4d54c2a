"""Sharded datastores: several complete datastores read as one, in order.

A sharded datastore directory holds only a manifest whose `shards` list names complete datastores (paths
relative to it) with their counts and fingerprints; rows are the shards' rows concatenated in that order.
Shards come from a multi-worker dump (`shard-00000-of-00002`, ... inside the directory, one per worker or
per `--num-shards/--shard-id` job) or from `knnlm-merge-dstore` over any compatible datastores.
"""
import hashlib
import os
import logging
from typing import Dict, List, Optional, Tuple

from .datastore import MANIFEST, Datastore
from .durable import write_json_atomic
from .errors import KnnlmError

logger = logging.getLogger(__name__)

# what must agree for rows of different shards to mean the same thing: the model, the vocabulary, the key
KEY_FIELDS = ("key_type", "dim", "key_dtype", "val_dtype", "vocab_size")
# what a multi-worker dump of one split also shares: every shard is a part of the same command's output
DUMP_FIELDS = ("split", "data", "context_window", "tokens_per_sample", "scored_tokens_per_block", "sample_break_mode")


def shard_name(shard_id: int, num_shards: int) -> str:
    return f"shard-{shard_id:05d}-of-{num_shards:05d}"


def shard_range(num_batches: int, shard_id: int, num_shards: int) -> Tuple[int, int]:
    """Contiguous batches [start, stop) of one shard: shards concatenated in id order are the unsharded order."""
    return num_batches * shard_id // num_shards, num_batches * (shard_id + 1) // num_shards


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


def merge(out_dir: str, sources: List[str], same_dump: bool = False) -> Dict:
    """Write out_dir/manifest.json describing `sources` (complete datastores) read as one; copies no rows."""
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise KnnlmError(f"{out_dir} already holds a datastore; choose another output directory")
    if not sources:
        raise KnnlmError("nothing to merge: name at least one datastore")
    shards = [(src, Datastore.open(src).manifest) for src in sources]
    try:
        manifest = combined_manifest(out_dir, shards, same_dump)
    except ValueError as e:
        raise KnnlmError(str(e)) from None
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
        raise KnnlmError(str(e)) from None
    write_json_atomic(os.path.join(path, MANIFEST), manifest)
    logger.info(f"datastore {path}: {manifest['count']:,} entries in {num_shards} shards")
    return manifest
