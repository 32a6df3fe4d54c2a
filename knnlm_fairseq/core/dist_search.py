"""Sharded search on torch.distributed: each rank holds one shard of a datastore and its index, and every rank
searches its shard for all ranks' queries, so one model can use an index larger than one machine's RAM or GPU.

The collective contract. Each `search` call is one round of collectives and every rank of the group takes part
in every round, but ranks need not call `search` equally often: a rank that has no more queries calls
`finish()`, which keeps serving the others' rounds (with no queries of its own) until every rank has called
`finish()`; then all return together. So call `search` any number of times (an empty batch is fine), then
`finish()` once on every rank, and run no other collective on the group in between (two sharded searches on one
group: run the first to its finish() before the second starts, or give each its own group). A round:
  1. all_gather of (number of queries, active, k, exact, search number, metric, dim) per rank: a refusal
     (different k, metrics or dims, a wrong query shape, ranks in different searches) is raised on every rank
     at once; when no rank is active (all in finish) or no rank has a query, the round ends here;
  2. all_gather of the queries, padded to the largest batch (sizes from step 1);
  3. each rank searches its shard for all the queries and adds its first global row to the ids;
  4. all_to_all_single: each shard's top-k (ids, values, distances) for a rank's queries go to that rank only;
  5. each rank merges the shards' lists for its own queries (`merge_topk`).
Gloo tensors stay on the CPU; under NCCL they travel through the rank's current GPU. Traffic per round: every
rank receives all queries (total x dim floats) and world x n x k candidates (24 bytes each with exact distances).
A rank that fails inside a round (not a refusal, which all ranks raise together) leaves the others waiting in
the collective until the group's timeout.

Exact distances and values: each rank recomputes the exact distances of its own shard's candidates from its own
keys, and looks their values up there, before the merge; no rank reads another shard's keys or values. The merge
orders candidates by the index's distances, as one index over the whole datastore would (`merge_on="approx"`),
and carries the exact distances along; `merge_on="exact"` re-ranks the shards' candidates by exact distance
instead. With exact (Flat) shard indexes both equal one Flat index over the whole datastore.
"""
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .datastore import MANIFEST, Datastore
from .durable import read_json
from .errors import KnnlmError
from .retriever import Neighbours, Retriever, open_retriever

METRICS = ("l2", "ip")  # l2: smaller is closer; ip: larger is closer (faiss's raw inner products)
_CHANNELS = [0]  # sharded searches made in this process, in order: the same number on every rank (see _Rounds)


def _select(keys: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k best candidates per row, (n, k): smallest key first, ties by global id, missing (-1) last."""
    key = np.where(ids < 0, np.inf, keys)
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    return np.lexsort((tie, key), axis=1)[:, :k]


def merge_topk(dists: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int,
               metric: str = "l2") -> Tuple[np.ndarray, np.ndarray]:
    """Exact global top-k of per-shard top-k lists: dists[s], ids[s] (n, k_s) -> D (n, k) float32, I (n, k) int64.

    Distances as faiss returns them: "l2" smaller is closer, "ip" larger is closer (pass "l2" for distances
    already negated, as Neighbours holds them). ids are global rows; -1 marks a missing neighbour (whatever its
    distance). Ties go to the smaller id. Missing neighbours come last: id -1, distance inf (l2) or -inf (ip).
    """
    if metric not in METRICS:
        raise KnnlmError(f"unknown metric '{metric}'; use one of {list(METRICS)}")
    if k < 1 or not len(dists) or len(dists) != len(ids):
        raise KnnlmError(f"merge_topk needs k >= 1 (got {k}) and one ids array per distance array")
    n = len(dists[0])
    d = np.concatenate([np.asarray(x, dtype=np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
                        for x in dists], axis=1)  # (n, K)
    i = np.concatenate([np.asarray(x, dtype=np.int64).reshape(n, -1) if n else np.zeros((0, 0), np.int64)
                        for x in ids], axis=1)  # (n, K)
    if d.shape != i.shape:
        raise KnnlmError(f"distances {d.shape} and ids {i.shape} of the shards differ in shape")
    worst = -np.inf if metric == "ip" else np.inf
    if d.shape[1] < k:  # fewer candidates than k in all: pad with missing ones
        d = np.pad(d, ((0, 0), (0, k - d.shape[1])), constant_values=worst)
        i = np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1)
    pos = _select(-d if metric == "ip" else d, i, k)  # (n, k)
    D, I = np.take_along_axis(d, pos, 1), np.take_along_axis(i, pos, 1)
    missing = I < 0
    return np.where(missing, worst, D).astype(np.float32), np.where(missing, -1, I)


class _Rounds:
    """The collectives of one sharded search on one process group (the contract is in the module's docstring).

    local(queries (N, dim) float32, k, exact) -> (ints (N, k, a) int64, floats (N, k, b) float32): this shard's
    results for every rank's queries, global ids in ints[..., 0]; a and b must not depend on the rank.
    """

    def __init__(self, dim: int, metric: str, local: Callable, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise KnnlmError("sharded search needs torch.distributed initialized (fairseq's distributed engine: "
                             "--distributed-world-size, or torch.distributed.init_process_group)")
        self.dim, self.metric, self.local, self.group = dim, METRICS.index(metric), local, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.finished, self.seconds = False, 0.0
        _CHANNELS[0] += 1  # every rank makes its sharded searches in the same order: a round of one search that
        self.channel = _CHANNELS[0]  # meets another's (the contract broken) is refused, never answered wrongly

    def _gather(self, t: torch.Tensor) -> List[torch.Tensor]:
        t = t.to(self.device).contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        t0 = time.perf_counter()
        dist.all_gather(out, t, group=self.group)
        self.seconds += time.perf_counter() - t0
        return [o.cpu() for o in out]

    def round(self, q: Optional[torch.Tensor], k: int = 0, exact: bool = False):
        """q (n, dim) float32, or None to serve only. -> (per shard [(ints, floats) of this rank's rows], exact),
        or None when every rank has finished."""
        if self.finished:
            raise KnnlmError("sharded search after finish(): finish() must be each rank's last call")
        bad = q is not None and (q.dim() != 2 or q.size(1) != self.dim)
        n = -1 if bad else 0 if q is None else len(q)  # -1: this rank's queries are wrong, every rank refuses
        head = torch.tensor([n, q is not None, k, exact, self.channel, self.metric, self.dim], dtype=torch.int64)
        head = torch.stack(self._gather(head))  # (world, 7); every rank sees the same, so all refuse together
        if bad:
            raise KnnlmError(f"queries of shape {tuple(q.shape)}, expected (n, {self.dim})")
        if bool((head[:, 0] < 0).any()):
            raise KnnlmError(f"rank {int((head[:, 0] < 0).nonzero()[0])} searched with queries of a wrong shape")
        if len(set(head[:, 4].tolist())) != 1:
            raise KnnlmError(f"the ranks are in rounds of different sharded searches (numbers {head[:, 4].tolist()}): "
                             f"run each search to its finish() on every rank before the next one starts")
        for col, what in ((5, "metrics"), (6, "key dims")):
            if len(set(head[:, col].tolist())) != 1:
                raise KnnlmError(f"the ranks' shard indexes differ in {what} ({head[:, col].tolist()}); build every "
                                 f"shard's index alike (knnlm-build-index SHARD_DIR --metric ...)")
        active = head[:, 1] == 1
        if not bool(active.any()):
            return None
        ks = sorted(set(head[active, 2].tolist()))
        if len(ks) != 1:
            raise KnnlmError(f"ranks searched with different k {ks}; every rank must search with the same k")
        k, exact, sizes = ks[0], bool(head[:, 3].any()), head[:, 0].tolist()
        if sum(sizes) == 0:
            return [], exact
        padded = torch.zeros(max(sizes), self.dim)
        if n:
            padded[:n] = q
        queries = torch.cat([p[:s] for p, s in zip(self._gather(padded), sizes)])  # (total, dim)
        ints, floats = self.local(queries, k, exact)
        return list(zip(self._to_owners(ints, sizes), self._to_owners(floats, sizes))), exact

    def _to_owners(self, t: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
        """Each rank's rows of this shard's results (total, ...) go to that rank: -> this rank's rows from every
        shard, [world x (n, ...)]. Each rank receives only its own rows (world * n, not world * total)."""
        n = sizes[self.rank]
        t = t.to(self.device).contiguous()
        out = t.new_empty((self.world * n,) + tuple(t.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(out, t, output_split_sizes=[n] * self.world, input_split_sizes=sizes, group=self.group)
        self.seconds += time.perf_counter() - t0
        out = out.cpu()
        return [out[s * n : (s + 1) * n] for s in range(self.world)]

    def finish(self) -> None:
        """Serve the other ranks' rounds until every rank has called finish()."""
        while self.round(None) is not None:
            pass
        self.finished = True


class ShardedSearch:
    """A faiss-index-like view of a datastore sharded across a process group: search(x, k) -> (D, I) as faiss
    returns them (global row ids, -1 for missing; raw distances), over this rank's index of rows
    [offset, offset + index.ntotal) and the other ranks' shards."""

    def __init__(self, index, offset: int, ntotal: int, metric: str, group=None):
        if metric not in METRICS:
            raise KnnlmError(f"unknown metric '{metric}'; use one of {list(METRICS)}")
        self.index, self.offset, self.ntotal, self.d, self.metric = index, offset, ntotal, index.d, metric
        self.rounds = _Rounds(index.d, metric, self._local, group)

    def _local(self, q: torch.Tensor, k: int, exact: bool):
        D, I = self.index.search(q.numpy(), k)  # (N, k); faiss pads with -1 past its ntotal
        I = np.where(I >= 0, I + self.offset, -1)
        return torch.from_numpy(I)[..., None], torch.from_numpy(D)[..., None]

    def search(self, x: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise KnnlmError(f"k must be >= 1, got {k}")
        q = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        shards, _ = self.rounds.round(q, k)
        if not shards:  # no rank had a query
            return np.full((len(q), k), -np.inf if self.metric == "ip" else np.inf, np.float32), np.full((len(q), k), -1)
        return merge_topk([f[..., 0].numpy() for _, f in shards], [i[..., 0].numpy() for i, _ in shards], k,
                          self.metric)

    def finish(self) -> None:
        self.rounds.finish()


class ShardedRetriever:
    """The Retriever interface (search(queries, exact) -> Neighbours; k, metric, exact, dstore, seconds, threads)
    over a datastore sharded across a process group. This rank holds `local`, a Retriever over rows
    [offset, offset + local.dstore.count); values and exact distances come from the shard that found them.
    dstore: the whole datastore's manifest (count, fingerprint, compatibility checks); only this shard's rows are
    readable through it."""

    def __init__(self, local: Retriever, offset: int, dstore: Datastore, k: int, group=None,
                 merge_on: str = "approx"):
        if merge_on not in ("approx", "exact"):
            raise KnnlmError(f"merge_on must be 'approx' or 'exact', got '{merge_on}'")
        if not 1 <= k <= dstore.count:
            raise KnnlmError(f"k={k} must be in [1, {dstore.count:,}] (the datastore's entries); pass another --k")
        self.local, self.offset, self.dstore, self.k, self.merge_on = local, offset, dstore, k, merge_on
        self.metric, self.exact = local.metric, local.exact
        self.rounds = _Rounds(local.dstore.dim, local.metric, self._local, group)

    @property
    def threads(self) -> int:
        return self.local.threads

    @property
    def seconds(self):
        return dict(self.local.seconds, exchange=self.rounds.seconds)

    def _local(self, q: torch.Tensor, k: int, exact: bool):
        nb = self.local.search(q, exact=exact)  # (N, k_local), k_local = min(k, shard rows)
        pad = k - nb.ids.size(1)
        ids = torch.where(nb.ids >= 0, nb.ids + self.offset, -1)
        ints = torch.nn.functional.pad(torch.stack([ids, nb.values], -1), (0, 0, 0, pad), value=-1)
        floats = torch.stack([nb.approx] + ([nb.exact] if exact else []), -1)
        floats = torch.nn.functional.pad(floats, (0, 0, 0, pad), value=float("inf"))
        return ints, floats

    def search(self, queries: torch.Tensor, exact: Optional[bool] = None) -> Neighbours:
        """queries (N, dim) -> their Neighbours over the whole datastore, on the CPU (one round; see the module)."""
        exact = (self.exact if exact is None else exact) or self.merge_on == "exact"
        q = queries.detach().float().cpu().contiguous()
        shards, _ = self.rounds.round(q, self.k, exact)
        n, k = len(q), self.k
        if not shards:
            inf = torch.full((n, k), float("inf"))
            return Neighbours(ids=torch.full((n, k), -1, dtype=torch.long), values=torch.zeros(n, k, dtype=torch.long),
                              approx=inf, exact=inf.clone() if exact else None)
        ints = torch.cat([a for a, _ in shards], 1)  # (n, S*k, 2): global id, value
        floats = torch.cat([b for _, b in shards], 1)  # (n, S*k, 1 or 2): approx[, exact]
        key = floats[..., 1 if self.merge_on == "exact" else 0]
        pos = torch.from_numpy(_select(key.numpy(), ints[..., 0].numpy(), k))  # (n, k)
        ids = ints[..., 0].gather(1, pos)
        values = ints[..., 1].gather(1, pos).masked_fill_(ids < 0, 0)  # a missing neighbour's value is 0
        dists = [floats[..., j].gather(1, pos).masked_fill_(ids < 0, float("inf")) for j in range(floats.size(-1))]
        return Neighbours(ids=ids, values=values, approx=dists[0], exact=dists[1] if exact else None)

    def finish(self) -> None:
        """Serve the other ranks until every rank has called finish(): each rank's last call (see the module)."""
        self.rounds.finish()


def open_sharded_search(dstore_dir: str, rank: int, world_size: int, index_file: str = "index.faiss",
                        k: int = 1024, nprobe: int = 32, exact: bool = True, metric: Optional[str] = None,
                        in_memory: bool = False, gpu: bool = False, threads: int = 0, group=None,
                        merge_on: str = "approx", **search_options) -> ShardedRetriever:
    """Shard `rank` of the sharded datastore dstore_dir (a multi-worker dump's shard-XXXXX-of-YYYYY, or a merged
    datastore), searched with its own index (index_file, relative to the shard directory unless absolute; built
    by `knnlm-build-index SHARD_DIR`) as part of the whole. Reads only the top manifest and this shard's files.
    search_options: passed on to open_retriever for the shard (e.g. another search backend)."""
    mpath = os.path.join(dstore_dir, MANIFEST)
    if not os.path.exists(mpath):
        raise KnnlmError(f"{dstore_dir} has no {MANIFEST}: not a finished datastore; dump or merge it first")
    manifest = read_json(mpath, "merge the shards again")
    shards = manifest.get("shards") or []
    if len(shards) != world_size:
        raise KnnlmError(f"{dstore_dir} has {len(shards)} shards but {world_size} ranks search it; run one rank per "
                         f"shard (--distributed-world-size {len(shards)})")
    if not 0 <= rank < world_size:
        raise KnnlmError(f"rank {rank} is outside the {world_size} ranks")
    if dist.is_initialized() and (dist.get_world_size(group), dist.get_rank(group)) != (world_size, rank):
        raise KnnlmError(f"this process is rank {dist.get_rank(group)} of {dist.get_world_size(group)}, not rank "
                         f"{rank} of {world_size}")
    shard = shards[rank]
    path = os.path.normpath(os.path.join(dstore_dir, shard["path"]))
    local = open_retriever(path, index_file, min(k, int(shard["count"])), nprobe, exact, metric=metric,
                           in_memory=in_memory, gpu=gpu, threads=threads, **search_options)
    if local.dstore.count != shard["count"] or local.dstore.fingerprint != shard["fingerprint"]:
        raise KnnlmError(f"shard {path} is not the datastore {mpath} was made from (changed or replaced since); "
                         f"merge the shards again")
    whole = Datastore(dstore_dir, manifest, None, None, parts=[local.dstore])
    offset = sum(int(s["count"]) for s in shards[:rank])
    return ShardedRetriever(local, offset, whole, k, group=group, merge_on=merge_on)
