#!/usr/bin/env python
"""Time --knn-backend torch's exact search (core/torch_search.py) on a GPU, against faiss-cpu's IndexFlatL2.

Builds N random clustered float16 keys of DIM dimensions on the device, then times one search of QUERIES queries
for k neighbours (one query batch by default) with the keys held as float16 and as int8, and reports the recall@k
of int8 (and, on CUDA, of TF32 matmuls, a faster but inexact variant) against the exact float16 answer. For
comparison, faiss-cpu's IndexFlatL2 searches the first --faiss-subset keys (200,000) with --faiss-queries of the
queries; its time is extrapolated linearly to N keys and QUERIES queries (a flat search's cost is linear in both),
and the JSON says so. Its ids are checked against the torch search over the same subset. Writes --out (JSON) with
the numbers, the device's name and the versions.

    python scripts/gpu_torch_search_bench.py                                # the H200 run: 2M x 1024, k 1024
    python scripts/gpu_torch_search_bench.py --device cpu --n 20000 --dim 64  # a dry run anywhere
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from knnlm_fairseq.core.torch_search import TorchFlatIndex  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2_000_000, help="keys")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=4096, help="queries per timed search")
    p.add_argument("--device", default="cuda", help="cuda (every visible GPU), cuda:N, or cpu")
    p.add_argument("--chunk-rows", type=int, default=0, help="key rows per matmul (0: the index's default)")
    p.add_argument("--query-batch", type=int, default=0, help="queries per matmul (0: all of --queries)")
    p.add_argument("--repeats", type=int, default=3, help="timed searches after one warm-up (the median is reported)")
    p.add_argument("--faiss-subset", type=int, default=200_000, help="keys faiss-cpu searches (extrapolated to --n)")
    p.add_argument("--faiss-queries", type=int, default=1024, help="queries faiss-cpu searches (extrapolated)")
    p.add_argument("--clusters", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="gpu_torch_search_bench.json")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clustered(n: int, centers: torch.Tensor, gen: torch.Generator, dtype, block: int = 1 << 16) -> torch.Tensor:
    """(n, dim) keys around the centers, made block by block on the centers' device (no float32 copy of all)."""
    out = torch.empty(n, centers.size(1), dtype=dtype, device=centers.device)
    for s in range(0, n, block):
        e = min(s + block, n)
        pick = torch.randint(len(centers), (e - s,), generator=gen, device=centers.device)
        noise = torch.randn(e - s, centers.size(1), generator=gen, device=centers.device)
        out[s:e] = (centers[pick] + noise).to(dtype)
    return out


def timed_search(index: TorchFlatIndex, q: torch.Tensor, k: int, repeats: int, device: torch.device):
    """(median seconds of search_tensors, its result, median seconds of the numpy search() the Retriever calls)."""
    index.search_tensors(q[: min(len(q), 256)], k)  # warm-up: kernels, allocator
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = index.search_tensors(q, k)
        sync(device)
        times.append(time.perf_counter() - t0)
    q_np = q.cpu().numpy()
    np_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        index.search(q_np, k)
        np_times.append(time.perf_counter() - t0)
    return float(np.median(times)), out, float(np.median(np_times))


def recall(ids: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over queries of |ids ∩ truth| / k."""
    a, b = ids.cpu().numpy(), truth.cpu().numpy()
    return float(np.mean([len(np.intersect1d(x, y, assume_unique=True)) / len(y) for x, y in zip(a, b)]))


def faiss_flat(keys: torch.Tensor, q: torch.Tensor, k: int, a, device) -> dict:
    """faiss-cpu IndexFlatL2 over the first --faiss-subset keys, timed and extrapolated; its ids against ours."""
    try:
        import faiss
    except ImportError as e:
        return {"skipped": f"faiss is not importable here ({e}); install faiss-cpu to compare"}
    m, nq = min(a.faiss_subset, a.n), min(a.faiss_queries, a.queries)
    sub = keys[:m].float().cpu().numpy()
    qs = q[:nq].cpu().numpy()
    index = faiss.IndexFlatL2(a.dim)
    index.add(sub)
    index.search(qs[:16], min(k, m))  # warm-up
    t0 = time.perf_counter()
    D, I = index.search(qs, min(k, m))
    secs = time.perf_counter() - t0
    ours = TorchFlatIndex([keys[:m]], "l2", device=a.device, chunk_rows=a.chunk_rows or None, query_batch=nq)
    Dt, It = ours.search(qs, min(k, m))
    full = secs * (a.n / m) * (a.queries / nq)
    return {"faiss_version": faiss.__version__, "threads": faiss.omp_get_max_threads(), "subset_keys": m,
            "queries": nq, "k": min(k, m), "seconds": secs,
            "extrapolated_seconds_per_search": full, "extrapolated_queries_per_s": a.queries / full,
            "note": f"measured on {m:,} of the {a.n:,} keys and {nq:,} of the {a.queries:,} queries, extrapolated "
                    f"linearly in keys and queries (a flat search's cost is linear in both)",
            "same_ids_as_torch_float16": float((It == I).mean()),
            "max_distance_difference": float(np.abs(Dt - D).max()), "max_distance": float(np.abs(D).max())}


def main(argv=None):
    a = get_parser().parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device(a.device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    centers = torch.randn(a.clusters, a.dim, generator=gen, device=device) * 2
    t0 = time.perf_counter()
    keys = clustered(a.n, centers, gen, torch.float16)
    q = clustered(a.queries, centers, gen, torch.float32)
    sync(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "device_arg": a.device, "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
              "torch": torch.__version__, "args": vars(a), "make_keys_seconds": time.perf_counter() - t0,
              "torch_search": {}}
    truth = None
    variants = [("float16", "float16", False), ("int8", "int8", False)]
    if device.type == "cuda":
        variants.append(("float16_tf32", "float16", True))  # inexact: recall reported
    for name, dtype, tf32 in variants:
        t0 = time.perf_counter()
        index = TorchFlatIndex([keys], "l2", device=a.device, key_dtype=dtype, chunk_rows=a.chunk_rows or None,
                               query_batch=a.query_batch or a.queries)
        sync(device)
        build = time.perf_counter() - t0
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            secs, (D, I), np_secs = timed_search(index, q, a.k, a.repeats, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        if truth is None:
            truth = I
        row = {"key_dtype": dtype, "tf32": tf32, "load_seconds": build, "chunk_rows": index.chunk_rows,
               "query_batch": index.query_batch,
               "key_bytes": sum(s.keys.numel() * s.keys.element_size() for s in index.shards),
               "seconds_per_search": secs, "queries_per_s": a.queries / secs,
               "ms_per_query_batch": 1000 * secs * index.query_batch / a.queries,
               "seconds_per_search_numpy_io": np_secs, "recall_at_k_vs_float16": recall(I, truth)}
        if device.type == "cuda":
            row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        report["torch_search"][name] = row
        print(f"{name}: {secs:.3f} s per {a.queries} queries ({a.queries / secs:,.0f} queries/s), recall@{a.k} "
              f"{row['recall_at_k_vs_float16']:.4f}", flush=True)
        del index
    report["faiss_cpu_flat"] = faiss_flat(keys, q, a.k, a, device)
    print(json.dumps(report["faiss_cpu_flat"], indent=1), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
