"""Searching a datastore: load an index with its checks, and return each query's k nearest entries.

Distances are "smaller is closer" everywhere: squared L2, or the negated inner product.
"""
import os
import time
import warnings
from dataclasses import dataclass, fields
from typing import Dict, Optional, Tuple

import faiss
import numpy as np
import torch

from .datastore import Datastore
from .durable import read_json
from .errors import KnnlmError
from .index import index_digest, index_meta_path


@dataclass
class Neighbours:
    """The k nearest datastore entries of N queries, nearest first (faiss's order).

    ids (N, k) int64: datastore rows, -1 where the index returned fewer than k (e.g. empty IVF lists)
    values (N, k) int64: the token that followed each entry (0 where missing)
    approx (N, k) float32: the index's distances (inf where missing)
    exact (N, k) float32 or None: recomputed from the stored keys (inf where missing), when asked for
    """

    ids: torch.Tensor
    values: torch.Tensor
    approx: torch.Tensor
    exact: Optional[torch.Tensor] = None

    @property
    def found(self) -> torch.Tensor:
        return self.ids >= 0  # (N, k)

    def dists(self, kind: str) -> torch.Tensor:
        """'exact' or 'approx' distances, (N, k)."""
        d = self.exact if kind == "exact" else self.approx
        assert d is not None, f"{kind} distances were not computed for these neighbours"
        return d

    def map(self, fn) -> "Neighbours":
        """The same neighbours with `fn` applied to every tensor (a row selection, a device move)."""
        return Neighbours(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                             for f in fields(self)})

    def __len__(self) -> int:
        return self.ids.size(0)


def load_index(index_path: str, dstore: Datastore) -> Tuple[faiss.Index, Dict]:
    """Load an index and refuse it unless it was built over exactly this datastore."""
    mpath = index_meta_path(index_path)
    if not os.path.exists(index_path) or not os.path.exists(mpath):
        raise KnnlmError(f"no index at {index_path} (with {os.path.basename(mpath)}); run knnlm-build-index first")
    meta = read_json(mpath, f"rebuild it with knnlm-build-index {dstore.path}")
    if meta["dstore"]["fingerprint"] != dstore.fingerprint or meta["ntotal"] != dstore.count:
        raise KnnlmError(
            f"index {index_path} was built for another datastore ({meta['ntotal']:,} keys from "
            f"{meta['dstore']['path']}); rebuild it with knnlm-build-index {dstore.path}"
        )
    if meta.get("index_digest") != index_digest(index_path):
        raise KnnlmError(f"{index_path} is not the index its sidecar {os.path.basename(mpath)} describes (copied "
                         f"or rebuilt separately); rebuild it with knnlm-build-index {dstore.path}")
    try:
        index = faiss.read_index(index_path)
    except RuntimeError as e:
        raise KnnlmError(f"{index_path} is not a readable faiss index ({str(e).splitlines()[-1]}); rebuild it") from None
    if index.ntotal != dstore.count or index.d != dstore.dim:
        raise KnnlmError(f"index {index_path} holds {index.ntotal} x {index.d}, not the datastore's shape; rebuild it")
    return index, meta


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # not an IVF index: nothing to probe


class Retriever:
    """k nearest datastore entries for a batch of queries, with the index's and (optionally) exact distances."""

    @property
    def threads(self) -> int:
        """faiss's OpenMP threads for the searches (what --knn-threads set, else faiss's default)."""
        return faiss.omp_get_max_threads()

    def __init__(self, dstore: Datastore, index: faiss.Index, metric: str, k: int, exact: bool = True,
                 chunk_floats: int = 1 << 22):
        if k < 1:
            raise KnnlmError(f"k must be >= 1, got {k}")
        if k > dstore.count:
            raise KnnlmError(f"k={k} exceeds the datastore's {dstore.count:,} entries; pass a smaller --k")
        self.dstore, self.index, self.metric, self.k, self.exact = dstore, index, metric, k, exact
        # torch views of the memmaps: index_select gathers rows in parallel, unlike numpy fancy indexing
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only memmap: we never write through these
            self.key_parts = [torch.from_numpy(np.asarray(k)) for k in dstore.key_parts]  # [(n_p, dim) float16]
            self.vals = torch.from_numpy(np.concatenate([np.asarray(v) for v in dstore.val_parts])).long()  # (n,)
        self.offsets = torch.from_numpy(dstore.offsets)  # (P + 1,) first row of each shard
        self.chunk_floats = chunk_floats  # floats per exact-distance chunk: 16 MB stays in cache
        self.seconds = {"faiss": 0.0, "exact": 0.0}  # where search time goes, for --knn-stats

    def search(self, queries: torch.Tensor, exact: Optional[bool] = None) -> Neighbours:
        """queries (N, dim) -> their Neighbours, on the CPU. exact: also recompute distances from the stored
        keys (default: this retriever's setting; a retrieval log asks for both kinds)."""
        q = queries.detach().float().cpu().contiguous()  # (N, dim)
        t0 = time.perf_counter()
        D, I = self.index.search(q.numpy(), self.k)  # one faiss call for the whole batch
        t1 = time.perf_counter()
        self.seconds["faiss"] += t1 - t0
        ids = torch.from_numpy(I)  # (N, k)
        missing = ids < 0
        vals = self.vals.index_select(0, ids.clamp_min(0).view(-1)).view(ids.shape).masked_fill_(missing, 0)
        approx = torch.from_numpy(D)
        if self.metric == "ip":
            approx = -approx
        approx = approx.masked_fill(missing, float("inf"))
        nb = Neighbours(ids=ids, values=vals, approx=approx)
        if self.exact if exact is None else exact:
            nb.exact = self.exact_dists(q, ids.clamp_min(0)).masked_fill_(missing, float("inf"))
            self.seconds["exact"] += time.perf_counter() - t1
        return nb

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
                   metric: Optional[str] = None, in_memory: bool = False, gpu: bool = False,
                   threads: int = 0, backend: str = "faiss", device: str = "auto",
                   key_dtype: str = "float16") -> Retriever:
    """The retriever of --knnlm. in_memory: keys read into RAM (no page faults on exact distances); gpu: search
    a GPU copy of the index (faiss-gpu); threads: faiss OpenMP threads (0: leave faiss's default).

    backend 'torch' (--knn-backend torch): an exact search over the datastore's keys held on `device` as `key_dtype`
    (core/torch_search.py), the neighbours of a Flat index; the index itself is not read, only its checked sidecar,
    which names the metric (and the identity retrieval logs and --knn-settings record). nprobe does not apply."""
    if backend not in ("faiss", "torch"):
        raise KnnlmError(f"unknown search backend '{backend}'; pass --knn-backend faiss or torch")
    if backend == "faiss" and (device != "auto" or key_dtype != "float16"):
        raise KnnlmError("--knn-device and --knn-torch-dtype set the torch search; add --knn-backend torch or drop them")
    if backend == "torch" and gpu:
        raise KnnlmError("--knn-gpu moves a faiss index to the GPU; --knn-backend torch searches on --knn-device "
                         "(cuda: every visible GPU): drop --knn-gpu")
    if threads:
        faiss.omp_set_num_threads(threads)
    dstore = Datastore.open(dstore_dir, in_memory=in_memory)
    index_path = index_file if os.path.isabs(index_file) else os.path.join(dstore_dir, index_file)
    if backend == "torch":
        from .torch_search import TorchFlatIndex, index_metric

        index, meta = None, {"metric": index_metric(index_path, dstore)}
    else:
        index, meta = load_index(index_path, dstore)
    if metric is not None and metric != meta["metric"]:
        raise KnnlmError(
            f"index {index_path} was built for '{meta['metric']}' similarity, not '{metric}'; "
            f"pass --knn-sim {meta['metric']} or rebuild with --metric {metric}"
        )
    if backend == "torch":
        index = TorchFlatIndex(dstore.key_parts, meta["metric"], device=device, key_dtype=key_dtype)
        return Retriever(dstore, index, meta["metric"], k, exact)
    set_nprobe(index, nprobe)
    if gpu:
        index = to_gpu(index, nprobe)
    return Retriever(dstore, index, meta["metric"], k, exact)


def to_gpu(index: faiss.Index, nprobe: int) -> faiss.Index:
    """A copy of the index on GPU 0 (fp16 lookup tables, as the paper's code); refuses without faiss-gpu."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise KnnlmError("--knn-gpu needs faiss-gpu and a visible GPU; install with `make install FAISS=faiss-gpu` "
                         "or drop --knn-gpu")
    co = faiss.GpuClonerOptions()
    co.useFloat16 = True
    res = faiss.StandardGpuResources()
    gpu = faiss.index_cpu_to_gpu(res, 0, index, co)
    gpu.resources = res  # the index does not own its resources: keep them alive as long as it lives
    if "IVF" in type(gpu).__name__:
        faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", nprobe)
    return gpu
