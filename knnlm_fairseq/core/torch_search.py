"""Exact k-NN search in torch over the datastore's keys (--knn-backend torch): GPUs without faiss-gpu.

`TorchFlatIndex` answers `search(x, k) -> (D, I)` as faiss's IndexFlatL2 / IndexFlatIP over the same keys would:
squared L2 distances ascending (or inner products descending), int64 row ids, -1 and -FLT_MAX/FLT_MAX padding
where fewer than k rows exist. So a `Retriever` (retriever.py) searches it like a faiss index, and its exact
gather (distances recomputed from the stored keys) still applies unchanged.

How it searches: the keys are held on one or more devices as float16 (the datastore's own type), float32, or
int8 with a per-dimension scale (symmetric: scale = max|x| / 127 per dim; distances are those of the dequantized
keys, 1 byte a dim). Each device holds a contiguous row range. Per query batch and key chunk of `chunk_rows`
rows, the distances are one float32 matmul, |q|^2 + |x|^2 - 2 q.x with |x|^2 precomputed once in float32 (faiss's
formula), or -q.x for inner products; each chunk's k best merge into the running k best, and the devices' k best
merge at the end. Memory beyond the keys stays at query_batch x (chunk_rows + 2k) floats per device.

Ties: among equal distances the smaller row id wins (faiss's L2 heaps do the same, so L2 ids equal faiss's even
on duplicate keys; faiss's inner-product heaps may keep other members of a tie).
"""
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import KnnlmError

logger = logging.getLogger(__name__)

KEY_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}
METRICS = ("l2", "ip")
FLT_MAX = float(np.finfo(np.float32).max)  # faiss's distance where a result slot is empty


def resolve_devices(device: str) -> List[torch.device]:
    """auto: every visible GPU, else the CPU; cpu; cuda: every visible GPU; cuda:N: that GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return [torch.device("cpu")]
    if device == "cuda" or device.startswith("cuda:"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KnnlmError(f"--knn-device {device} needs a visible GPU, and torch {torch.__version__} sees none; "
                             f"pass --knn-device cpu (or auto)")
        if device == "cuda":
            return [torch.device("cuda", i) for i in range(count)]
        dev = torch.device(device)
        if dev.index >= count:
            raise KnnlmError(f"--knn-device {device}: only {count} GPU(s) visible; pass cuda:0 .. cuda:{count - 1}")
        return [dev]
    raise KnnlmError(f"unknown search device '{device}'; pass auto, cpu, cuda or cuda:N")


def index_metric(index_path: str, dstore) -> str:
    """The metric of the index at index_path, read from its sidecar and checked as load_index checks it (built over
    this datastore, and the sidecar of this very file), without reading the index itself: the torch backend
    searches the datastore's keys, and the index names the metric and the identity logs and settings record."""
    from .durable import read_json
    from .index import index_identity, index_meta_path  # faiss: imported only where an index is checked

    ident = index_identity(index_path)  # exists, and the sidecar belongs to the file
    meta = read_json(index_meta_path(index_path), f"rebuild it with knnlm-build-index {dstore.path}")
    if meta["dstore"]["fingerprint"] != dstore.fingerprint or meta["ntotal"] != dstore.count:
        raise KnnlmError(f"index {index_path} was built for another datastore ({meta['ntotal']:,} keys from "
                         f"{meta['dstore']['path']}); rebuild it with knnlm-build-index {dstore.path}")
    return ident["metric"]


def _rows(parts: Sequence, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the row concatenation of `parts` (numpy arrays, memmaps or tensors), as one tensor."""
    out, start = [], 0
    for p in parts:
        a, b = max(lo - start, 0), min(hi - start, len(p))
        if a < b:
            piece = p[a:b]
            out.append(piece if isinstance(piece, torch.Tensor) else torch.from_numpy(np.array(piece)))
        start += len(p)
    return out[0] if len(out) == 1 else torch.cat(out)


def select(d: torch.Tensor, ids: Optional[torch.Tensor], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (distance, id) pairs of each row of d (B, m), unordered; ids (B, m), or None: column index.
    topk picks arbitrarily among ties at the k-th value; rows where it had to choose are redone in (d, id) order."""
    if d.size(1) <= k:
        cols = torch.arange(d.size(1), device=d.device).expand_as(d)
        return d, cols if ids is None else ids
    vals, pos = d.topk(k, dim=1, largest=False, sorted=False)  # (B, k)
    out = pos if ids is None else ids.gather(1, pos)
    t = vals.max(1, keepdim=True).values  # (B, 1) the k-th smallest distance
    short = (d == t).sum(1) > (vals == t).sum(1)  # (B,) ties at the boundary left out: topk chose among them
    if bool(short.any()):
        rows = short.nonzero().squeeze(1)
        sub_d = d[rows]
        sub_i = torch.arange(d.size(1), device=d.device).expand_as(sub_d) if ids is None else ids[rows]
        vals[rows], out[rows] = lexsort(sub_d, sub_i, k)
    return vals, out


def lexsort(d: torch.Tensor, ids: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row in (distance, id) order: d, ids (B, m) -> (B, min(k, m)) each, sorted."""
    by_id = ids.argsort(dim=1)
    d, ids = d.gather(1, by_id), ids.gather(1, by_id)
    order = d.argsort(dim=1, stable=True)[:, :k]  # stable: equal distances stay in id order
    return d.gather(1, order), ids.gather(1, order)


class _Shard:
    """Rows [lo, hi) of the keys on one device: stored keys (n, dim), |x|^2 (n,) float32, the int8 scale (dim,)."""

    def __init__(self, device: torch.device, lo: int, hi: int, keys: torch.Tensor, norms: torch.Tensor,
                 scale: Optional[torch.Tensor]):
        self.device, self.lo, self.hi, self.keys, self.norms, self.scale = device, lo, hi, keys, norms, scale


class TorchFlatIndex:
    """Exact k-NN over keys held as torch tensors: faiss IndexFlatL2 / IndexFlatIP's search, on GPUs or the CPU.

    parts: the keys as row blocks (the datastore's key_parts: memmaps, arrays or tensors), read block by block.
    metric 'l2' or 'ip'; device: see resolve_devices, or a list of devices; key_dtype float16, float32 or int8.
    chunk_rows: key rows per distance matmul (default 65,536 on GPUs, 16,384 on the CPU); query_batch: queries
    per matmul. Memory beyond the keys: query_batch x (chunk_rows + 2k) float32 per device.
    """

    is_trained = True

    def __init__(self, parts: Sequence, metric: str = "l2", device: Union[str, Sequence] = "auto",
                 key_dtype: str = "float16", chunk_rows: Optional[int] = None, query_batch: int = 2048,
                 load_rows: int = 1 << 16):
        if metric not in METRICS:
            raise KnnlmError(f"unknown metric '{metric}'; pass one of {', '.join(METRICS)}")
        if key_dtype not in KEY_DTYPES:
            raise KnnlmError(f"unknown key dtype '{key_dtype}' for the torch search; pass one of {', '.join(KEY_DTYPES)}")
        parts = list(parts)
        self.ntotal, self.d = sum(len(p) for p in parts), int(parts[0].shape[1])
        self.metric, self.key_dtype, self.nprobe = metric, key_dtype, 0  # nprobe: exact search, nothing to probe
        self.metric_type = 1 if metric == "l2" else 0  # faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT
        devices = resolve_devices(device) if isinstance(device, str) else [torch.device(d) for d in device]
        self.devices = devices
        self.chunk_rows = chunk_rows or (1 << 16 if devices[0].type == "cuda" else 1 << 14)
        self.query_batch = query_batch
        if self.chunk_rows < 1 or query_batch < 1:
            raise KnnlmError(f"chunk_rows and query_batch must be >= 1, got {self.chunk_rows} and {query_batch}")
        scale = self._int8_scale(parts, load_rows) if key_dtype == "int8" else None  # (dim,) float32 on devices[0]
        bounds = np.linspace(0, self.ntotal, len(devices) + 1).round().astype(int)
        self.shards = [self._load(parts, dev, int(lo), int(hi), scale, load_rows)
                       for dev, lo, hi in zip(devices, bounds[:-1], bounds[1:]) if hi > lo]
        self._pool = ThreadPoolExecutor(len(self.shards)) if len(self.shards) > 1 else None
        held = sum(s.keys.numel() * s.keys.element_size() for s in self.shards)
        logger.info(f"torch search: {self.ntotal:,} keys x {self.d} as {key_dtype} ({held / 2**30:.2f} GiB) on "
                    f"{', '.join(str(d) for d in devices)}, {metric}, exact, chunks of {self.chunk_rows:,} rows")

    def _int8_scale(self, parts, load_rows: int) -> torch.Tensor:
        """Per-dimension max|x| / 127 over every key (1 where a dimension is all zeros)."""
        top = torch.zeros(self.d, device=self.devices[0])
        for lo in range(0, self.ntotal, load_rows):
            block = _rows(parts, lo, min(lo + load_rows, self.ntotal)).to(self.devices[0]).float()
            top = torch.maximum(top, block.abs().amax(0))
        scale = top / 127
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def _load(self, parts, dev: torch.device, lo: int, hi: int, scale, load_rows: int) -> _Shard:
        keys = torch.empty(hi - lo, self.d, dtype=KEY_DTYPES[self.key_dtype], device=dev)
        norms = torch.empty(hi - lo, dtype=torch.float32, device=dev)
        scale = None if scale is None else scale.to(dev)
        for s in range(lo, hi, load_rows):
            e = min(s + load_rows, hi)
            x = _rows(parts, s, e).to(dev).float()  # (c, dim)
            if scale is not None:
                stored = torch.round(x / scale).clamp_(-127, 127)
                dequantized = stored * scale
            else:
                stored = x.to(keys.dtype)
                dequantized = stored.float()
            keys[s - lo : e - lo] = stored.to(keys.dtype)
            norms[s - lo : e - lo] = dequantized.square().sum(1)
        return _Shard(dev, lo, hi, keys, norms, scale)

    def search(self, x: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        """faiss's search: x (n, d) float32 -> D (n, k) float32 (squared L2, or inner product), I (n, k) int64."""
        D, I = self.search_tensors(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), k)
        return D.cpu().numpy(), I.cpu().numpy()

    def search_tensors(self, q: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """search() on tensors: q (n, d) on any device -> D (n, k) float32, I (n, k) int64 on the first device."""
        if q.dim() != 2 or q.size(1) != self.d:
            raise KnnlmError(f"queries of shape {tuple(q.shape)} for keys of dim {self.d}; pass (n, {self.d}) queries")
        if k < 1:
            raise KnnlmError(f"k must be >= 1, got {k}")
        kk = min(k, self.ntotal)
        first = self.devices[0]
        D = torch.full((q.size(0), k), FLT_MAX if self.metric == "l2" else -FLT_MAX, device=first)
        I = torch.full((q.size(0), k), -1, dtype=torch.long, device=first)
        for b in range(0, q.size(0), self.query_batch):
            qb = q[b : b + self.query_batch].float()
            if self._pool is None:
                found = [self._search_shard(self.shards[0], qb, kk)]
            else:
                found = list(self._pool.map(lambda s: self._search_shard(s, qb, kk), self.shards))
            d = torch.cat([f[0].to(first) for f in found], 1)
            i = torch.cat([f[1].to(first) for f in found], 1)
            d, i = lexsort(*select(d, i, kk), kk)  # (B, kk) nearest first, ties by id
            D[b : b + len(qb), :kk] = d if self.metric == "l2" else -d
            I[b : b + len(qb), :kk] = i
        return D, I

    def _search_shard(self, sh: _Shard, qb: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The k best (distance, global id) of one device's rows, unordered; distances smaller-is-closer."""
        q = qb.to(sh.device)  # (B, d) float32
        qs = q if sh.scale is None else q * sh.scale  # int8: q . (x_int * scale) == (q * scale) . x_int
        qn = q.square().sum(1, keepdim=True)  # (B, 1)
        best_d = best_i = None
        for s in range(0, sh.hi - sh.lo, self.chunk_rows):
            x = sh.keys[s : s + self.chunk_rows].float()  # (c, d)
            dots = qs @ x.T  # (B, c)
            if self.metric == "l2":
                dist = (qn + sh.norms[s : s + self.chunk_rows]).sub_(dots, alpha=2).clamp_min_(0)  # as faiss's BLAS path
            else:
                dist = dots.neg_()
            cd, ci = select(dist, None, k)
            ci = ci + (sh.lo + s)
            if best_d is None:
                best_d, best_i = cd, ci
            else:
                best_d, best_i = select(torch.cat([best_d, cd], 1), torch.cat([best_i, ci], 1), k)
        return best_d, best_i
