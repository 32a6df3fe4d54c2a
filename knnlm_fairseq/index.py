"""FAISS indexes over a datastore: build from a factory string, load with checks, batched search."""
import logging
import os
import re
import time
import warnings
from typing import Dict, Optional, Tuple

import faiss
import numpy as np
import torch

from .datastore import Datastore, DatastoreError, write_json_atomic

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
        raise DatastoreError("--ondisk needs an IVF factory (e.g. 'IVF4096,PQ64')") from None
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
    running the same build again after a crash resumes there instead of starting over.
    """
    if metric not in METRICS:
        raise DatastoreError(f"unknown metric '{metric}'; use one of {sorted(METRICS)}")
    if train_size < 1:
        raise DatastoreError(f"--train-size must be >= 1, got {train_size}")
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
            raise DatastoreError(f"faiss cannot build '{used}' for dim {dstore.dim}: {str(e).splitlines()[-1]}") from None
        t0 = time.time()
        if not index.is_trained:
            work = faiss.index_cpu_to_all_gpus(index) if use_gpu else index
            try:
                work.train(_sample_rows(dstore, n_train, seed))
            except RuntimeError as e:  # e.g. 8-bit PQ needs >= 256 training keys per codebook
                raise DatastoreError(
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
        "index_digest": index_digest(index_path),
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


def load_index(index_path: str, dstore: Datastore) -> Tuple[faiss.Index, Dict]:
    """Load an index and refuse it unless it was built over exactly this datastore."""
    import json

    mpath = index_meta_path(index_path)
    if not os.path.exists(index_path) or not os.path.exists(mpath):
        raise DatastoreError(f"no index at {index_path} (with {os.path.basename(mpath)}); run knnlm-build-index first")
    with open(mpath) as f:
        meta = json.load(f)
    if meta["dstore"]["fingerprint"] != dstore.fingerprint or meta["ntotal"] != dstore.count:
        raise DatastoreError(
            f"index {index_path} was built for another datastore ({meta['ntotal']:,} keys from "
            f"{meta['dstore']['path']}); rebuild it with knnlm-build-index {dstore.path}"
        )
    if meta.get("index_digest") != index_digest(index_path):
        raise DatastoreError(f"{index_path} is not the index its sidecar {os.path.basename(mpath)} describes (copied "
                             f"or rebuilt separately); rebuild it with knnlm-build-index {dstore.path}")
    try:
        index = faiss.read_index(index_path)
    except RuntimeError as e:
        raise DatastoreError(f"{index_path} is not a readable faiss index ({str(e).splitlines()[-1]}); rebuild it") from None
    if index.ntotal != dstore.count or index.d != dstore.dim:
        raise DatastoreError(f"index {index_path} holds {index.ntotal} x {index.d}, not the datastore's shape; rebuild it")
    return index, meta


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index: nothing to probe


class Retriever:
    """k nearest datastore entries for a batch of queries, with faiss or exact (recomputed) distances.

    Distances are "smaller is closer": squared L2, or the negated inner product.
    """

    def __init__(self, dstore: Datastore, index: faiss.Index, metric: str, k: int, exact: bool = True,
                 chunk_floats: int = 1 << 22):
        if k < 1:
            raise DatastoreError(f"k must be >= 1, got {k}")
        if k > dstore.count:
            raise DatastoreError(f"k={k} exceeds the datastore's {dstore.count:,} entries; pass a smaller --k")
        self.dstore, self.index, self.metric, self.k, self.exact = dstore, index, metric, k, exact
        # torch views of the memmaps: index_select gathers rows in parallel, unlike numpy fancy indexing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmap: we never write through these
            self.key_parts = [torch.from_numpy(np.asarray(k)) for k in dstore.key_parts]  # [(n_p, dim) float16]
            self.vals = torch.from_numpy(np.concatenate([np.asarray(v) for v in dstore.val_parts])).long()  # (n,)
        self.offsets = torch.from_numpy(dstore.offsets)  # (P + 1,) first row of each shard
        self.chunk_floats = chunk_floats  # floats per exact-distance chunk: 16 MB stays in cache

    def search(self, queries: torch.Tensor, both: bool = False):
        """queries: (N, dim). Returns dists (N, k) float32 and vals (N, k) int64 on the queries' device.

        With both=True: (approx dists, exact dists, vals) on the CPU, for a retrieval log.
        """
        q = queries.detach().float().cpu().contiguous()  # (N, dim)
        D, I = self.index.search(q.numpy(), self.k)  # one faiss call for the whole batch
        ids = torch.from_numpy(I)
        missing = ids < 0
        ids = ids.clamp_min(0)
        vals = self.vals.index_select(0, ids.view(-1)).view(ids.shape)  # (N, k)
        approx = torch.from_numpy(D)
        if self.metric == "ip":
            approx = -approx
        approx = approx.masked_fill(missing, float("inf"))
        exact = self.exact_dists(q, ids).masked_fill_(missing, float("inf")) if (self.exact or both) else None
        if both:
            return approx, exact, vals
        dists = exact if self.exact else approx
        return dists.to(queries.device), vals.to(queries.device)

    def gather_keys(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored keys of datastore rows `ids` (m,) -> (m, dim), across shards."""
        if len(self.key_parts) == 1:
            return self.key_parts[0].index_select(0, ids)
        which = torch.searchsorted(self.offsets, ids, right=True) - 1  # (m,) shard of each row
        out = torch.empty(ids.numel(), self.dstore.dim, dtype=self.key_parts[0].dtype)
        for p in which.unique().tolist():
            sel = (which == p).nonzero().squeeze(1)
            out[sel] = self.key_parts[p].index_select(0, ids[sel] - self.offsets[p])
        return out

    def exact_dists(self, q: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Distances from the stored keys: one gather per chunk of queries, bounded memory. (N, k)"""
        n, k = ids.shape
        out = torch.empty(n, k)
        step = max(1, self.chunk_floats // (k * self.dstore.dim))
        for s in range(0, n, step):
            qs = q[s : s + step]  # (c, dim)
            keys = self.gather_keys(ids[s : s + step].reshape(-1)).view(-1, k, self.dstore.dim).float()
            dots = torch.bmm(keys, qs.unsqueeze(-1)).squeeze(-1)  # (c, k)
            if self.metric == "l2":
                sq = torch.linalg.vector_norm(keys, dim=-1).square_() + qs.square().sum(-1, keepdim=True)
                out[s : s + step] = (sq - 2 * dots).clamp_min_(0)
            else:
                out[s : s + step] = -dots
        return out


def open_retriever(dstore_dir: str, index_file: str, k: int, nprobe: int, exact: bool,
                   metric: Optional[str] = None) -> Retriever:
    dstore = Datastore.open(dstore_dir)
    index_path = index_file if os.path.isabs(index_file) else os.path.join(dstore_dir, index_file)
    index, meta = load_index(index_path, dstore)
    if metric is not None and metric != meta["metric"]:
        raise DatastoreError(
            f"index {index_path} was built for '{meta['metric']}' similarity, not '{metric}'; "
            f"pass --knn-sim {meta['metric']} or rebuild with --metric {metric}"
        )
    set_nprobe(index, nprobe)
    return Retriever(dstore, index, meta["metric"], k, exact)
