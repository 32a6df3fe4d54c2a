"""Building a FAISS index over a datastore from a factory string: sampled training, chunked adds, resumable.

The index file is written atomically with a sidecar (INDEX.json) naming the datastore it was built over;
retriever.py refuses an index whose sidecar does not match.

An index's identity, for what was tuned on it (retrieval logs, --knn-settings): the sha256 of the whole index
file, computed once at build time and recorded in the sidecar (`index_sha256`; one more sequential read of the
file, seconds for a multi-GB index against minutes to hours of building). Readers never re-hash the file: they
check that the sidecar belongs to it with `index_digest` (its size and first and last MiB: one stat and 2 MiB
read) and take the identity from the sidecar. The .ivfdata file of an --ondisk index is not part of the digest.
"""
import logging
import os
import re
import time
from typing import Dict

import faiss
import numpy as np

from .datastore import Datastore
from .durable import read_json, sha256_file, write_json_atomic
from .errors import KnnlmError

logger = logging.getLogger(__name__)

METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
DEFAULT_FACTORY = "IVF4096,PQ64"  # the paper's index
# faiss warns below 39 training points per centroid; fewer points give empty, useless lists
MIN_POINTS_PER_CENTROID = 39


def scale_factory(factory: str, n_train: int) -> str:
    """Shrink the IVF list count so each centroid gets enough training points (small datastores)."""

    def shrink(m: re.Match) -> str:
        nlist = int(m.group(2))
        fitted = max(1, min(nlist, n_train // MIN_POINTS_PER_CENTROID))
        return f"{m.group(1)}{fitted}"

    return re.sub(r"(IVF)(\d+)", shrink, factory, count=1)


def index_digest(path: str, edge: int = 1 << 20) -> str:
    """Cheap identity of an index file (size, first and last MiB): hashing a 7 GB index at every load is not."""
    import hashlib

    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        f.seek(max(0, size - edge))
        h.update(f.read(edge))
    return h.hexdigest()


def index_meta_path(index_path: str) -> str:
    return index_path + ".json"


def resolve_index_path(dstore_dir: str, index_file: str) -> str:
    """--index-file, relative to --dstore-dir unless absolute."""
    return index_file if os.path.isabs(index_file) else os.path.join(dstore_dir, index_file)


def index_identity(index_path: str) -> Dict:
    """What a retrieval log and the settings tuned on it record of the index they searched.

    id: "sha256:<the file's sha256 recorded at build time>"; an index built before that was recorded is named by
    its sidecar's cheap digest instead ("edges:<size, first and last MiB>"). Costs one stat and 2 MiB read: the
    sidecar is checked against the file, never the whole file re-hashed.
    """
    mpath = index_meta_path(index_path)
    if not os.path.exists(index_path) or not os.path.exists(mpath):
        raise KnnlmError(f"no index at {index_path} (with {os.path.basename(mpath)}); run knnlm-build-index first")
    meta = read_json(mpath, "rebuild the index with knnlm-build-index --force")
    if meta.get("index_digest") != index_digest(index_path):
        raise KnnlmError(f"{index_path} is not the index its sidecar {os.path.basename(mpath)} describes (copied "
                         f"or rebuilt separately); rebuild it with knnlm-build-index --force")
    sha = meta.get("index_sha256")
    return {"id": f"sha256:{sha}" if sha else f"edges:{meta['index_digest']}", "path": os.path.abspath(index_path),
            "factory": meta.get("factory_used", meta.get("factory")), "metric": meta.get("metric"),
            "ntotal": meta.get("ntotal")}


def check_output_free(index_path: str) -> None:
    """knnlm-build-index without --force: refuse to replace an index (settings tuned on it would silently apply to
    the new one). An index file beside an unfinished build's record (INDEX.partial.json) is that build's to resume."""
    mpath = index_meta_path(index_path)
    unfinished = os.path.exists(index_path + ".partial.json")
    if os.path.exists(mpath) or (os.path.exists(index_path) and not unfinished):
        what = ""
        if os.path.exists(mpath):
            try:
                meta = read_json(mpath, "")
                what = f" ({meta.get('factory_used', meta.get('factory'))}, {meta.get('ntotal'):,} keys)"
            except (KnnlmError, OSError, TypeError, ValueError):
                pass
        raise KnnlmError(f"{index_path} already holds an index{what}: retrieval logs and --knn-settings tuned on it "
                         f"would no longer match; pass --force to replace it (then record and tune again), or "
                         f"--output NEW_NAME to build another beside it")


def _sample_rows(dstore: Datastore, size: int, seed: int) -> np.ndarray:
    if size >= dstore.count:
        rows = np.arange(dstore.count)
    else:
        rows = np.sort(np.random.default_rng(seed).choice(dstore.count, size=size, replace=False))
    return np.asarray(dstore.keys[rows], dtype=np.float32)  # (size, dim), one gather from the memmap


def _write_index_atomic(index: faiss.Index, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    faiss.write_index(index, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_partial(index, partial: str, partial_meta: str, identity: Dict, train_s: float, add_s: float) -> None:
    """Snapshot to a new file, then point the record at it (the commit), then drop the older snapshot."""
    import glob

    path = f"{partial}.{int(index.ntotal)}"
    _write_index_atomic(index, path)
    write_json_atomic(partial_meta, dict(identity, added=int(index.ntotal), train_s=train_s, add_s=add_s,
                                         file=os.path.basename(path), digest=index_digest(path)))
    for old in glob.glob(glob.escape(partial) + ".*"):
        if old != path and not old.endswith(".json"):
            os.remove(old)


def _read_partial(partial: str, partial_meta: str, identity: Dict):
    """(index, progress) of an interrupted build with the same inputs, else None (start over)."""
    import json

    if not os.path.exists(partial_meta):
        return None
    with open(partial_meta) as f:
        done = json.load(f)
    path = os.path.join(os.path.dirname(partial), done.get("file", ""))
    if any(done.get(k) != v for k, v in identity.items()) or not os.path.isfile(path) or (
            done.get("digest") != index_digest(path)):
        logger.info(f"ignoring {partial_meta}: it belongs to another build")
        return None
    index = faiss.read_index(path)
    return (index, done) if index.ntotal == done["added"] else None


def _add_ondisk(trained: faiss.Index, dstore: Datastore, index_path: str, add_chunk: int, progress: bool):
    """IVF lists in INDEX.ivfdata, memory-mapped at search time (faiss.contrib.ondisk): RAM stays ~one chunk.

    Each chunk becomes a shard file of the trained index; the shards are merged into the on-disk lists.
    """
    from faiss.contrib.ondisk import merge_ondisk
    from tqdm import tqdm

    try:
        faiss.extract_index_ivf(trained)
    except RuntimeError:
        raise KnnlmError("--ondisk needs an IVF factory (e.g. 'IVF4096,PQ64')") from None
    shards = []
    with tqdm(total=dstore.count, unit="key", disable=not progress, desc="add (shards)") as bar:
        for start, keys in dstore.iter_keys(add_chunk):
            shard = faiss.clone_index(trained)
            shard.add_with_ids(keys, np.arange(start, start + len(keys), dtype=np.int64))  # global row ids
            shards.append(f"{index_path}.shard{len(shards)}")
            faiss.write_index(shard, shards[-1])
            bar.update(len(keys))
    index = faiss.clone_index(trained)
    ivfdata = os.path.abspath(index_path) + ".ivfdata"  # faiss stores this path inside the index file
    if os.path.exists(ivfdata):
        os.remove(ivfdata)
    merge_ondisk(index, shards, ivfdata)
    for f in shards:
        os.remove(f)
    return index


def build_index(
    dstore: Datastore,
    index_path: str,
    factory: str = DEFAULT_FACTORY,
    metric: str = "l2",
    train_size: int = 1_000_000,
    add_chunk: int = 1_000_000,
    seed: int = 1,
    use_gpu: bool = False,
    progress: bool = True,
    checkpoint_seconds: float = 600.0,
    ondisk: bool = False,
) -> Dict:
    """Train on <= train_size sampled keys, add every key in chunks, write index + sidecar atomically.

    The trained index, and every checkpoint_seconds the keys added so far, are saved to INDEX.partial:
    running the same build again after a crash resumes there instead of starting over. An index already at
    index_path is replaced: knnlm-build-index refuses that without --force (check_output_free).
    """
    if metric not in METRICS:
        raise KnnlmError(f"unknown metric '{metric}'; use one of {sorted(METRICS)}")
    if train_size < 1:
        raise KnnlmError(f"--train-size must be >= 1, got {train_size}")
    n_train = min(train_size, dstore.count)
    used = scale_factory(factory, n_train)
    if used != factory:
        logger.info(f"{factory} scaled to {used} for {n_train:,} training keys")
    partial, partial_meta = index_path + ".partial", index_path + ".partial.json"  # snapshots: INDEX.partial.<n>
    identity = {"fingerprint": dstore.fingerprint, "factory": used, "metric": metric, "train_size": n_train,
                "seed": seed, "ondisk": ondisk}
    resume = _read_partial(partial, partial_meta, identity)
    if resume is not None:
        index, done = resume
        train_s, add_s = done["train_s"], done["add_s"]
        logger.info(f"resuming {index_path}: trained, {done['added']:,} of {dstore.count:,} keys already added")
    else:
        try:
            index = faiss.index_factory(dstore.dim, used, METRICS[metric])
        except RuntimeError as e:
            raise KnnlmError(f"faiss cannot build '{used}' for dim {dstore.dim}: {str(e).splitlines()[-1]}") from None
        t0 = time.time()
        if not index.is_trained:
            work = faiss.index_cpu_to_all_gpus(index) if use_gpu else index
            try:
                work.train(_sample_rows(dstore, n_train, seed))
            except RuntimeError as e:  # e.g. 8-bit PQ needs >= 256 training keys per codebook
                raise KnnlmError(
                    f"faiss cannot train '{used}' on {n_train:,} keys ({str(e).strip().splitlines()[-1]}); "
                    f"use more keys (--train-size) or a smaller factory such as 'Flat'"
                ) from None
            index = faiss.index_gpu_to_cpu(work) if use_gpu else index
        train_s, add_s = time.time() - t0, 0.0
        _write_partial(index, partial, partial_meta, identity, train_s, add_s)  # training is the costly part
    if ondisk:
        t0 = time.time()
        index = _add_ondisk(index, dstore, index_path, add_chunk, progress)
        add_s = time.time() - t0
    else:
        work = faiss.index_cpu_to_all_gpus(index) if use_gpu else index
        from tqdm import tqdm

        t0, last = time.time(), time.time()
        with tqdm(total=dstore.count, initial=index.ntotal, unit="key", disable=not progress, desc="add") as bar:
            for _, keys in dstore.iter_keys(add_chunk, start=index.ntotal):
                work.add(keys)
                bar.update(len(keys))
                if time.time() - last >= checkpoint_seconds and work.ntotal < dstore.count:
                    snapshot = faiss.index_gpu_to_cpu(work) if use_gpu else work
                    _write_partial(snapshot, partial, partial_meta, identity, train_s, add_s + time.time() - t0)
                    last = time.time()
        add_s += time.time() - t0
        if use_gpu:
            index = faiss.index_gpu_to_cpu(work)
    _write_index_atomic(index, index_path)
    meta = {
        "index_digest": index_digest(index_path),  # cheap: does this sidecar belong to the file (checked at load)
        "index_sha256": sha256_file(index_path),  # the index's identity (logs and settings tuned on it)
        "factory": factory,
        "factory_used": used,
        "metric": metric,
        "ntotal": int(index.ntotal),
        "dim": dstore.dim,
        "train_size": n_train,
        "seed": seed,
        "train_s": round(train_s, 3),
        "add_s": round(add_s, 3),
        "dstore": {"path": os.path.abspath(dstore.path), "count": dstore.count, "fingerprint": dstore.fingerprint},
    }
    write_json_atomic(index_meta_path(index_path), meta)
    import glob

    for f in glob.glob(glob.escape(partial) + ".*"):  # after the final index and its sidecar are in place
        os.remove(f)
    logger.info(f"index {index_path}: {used}, {index.ntotal:,} keys, train {train_s:.1f}s, add {add_s:.1f}s")
    return meta
