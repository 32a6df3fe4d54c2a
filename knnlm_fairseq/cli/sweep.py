"""knnlm-sweep: tune λ, k and T offline from retrieval logs (fairseq-eval-lm --knnlm --save-retrieval DIR).

Tunes on the first log (valid) and applies the tuned settings to the others (test), as the paper does.
"""
import argparse
import json
import os
import sys

import numpy as np

from ..core.errors import KnnlmError

KINDS = ("approx", "exact")  # core.sweep's; not imported here so that --help starts without torch


def floats(text: str):
    return [float(x) for x in text.split(",")]


def ints(text: str):
    return [int(x) for x in text.split(",")]


DEFAULT_MAX_PPL_INCREASE = 0.5  # percent: what the fast preset gives up on WikiText-2 (results/bench)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-sweep", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows each default
    p.add_argument("tune", help="retrieval log to tune on (e.g. valid)")
    p.add_argument("apply", nargs="*", help="retrieval logs to report with the tuned settings (e.g. test)")
    p.add_argument("--lmbdas", type=floats, default=[round(0.05 * i, 2) for i in range(19)],
                   help="comma-separated λ grid in [0, 1) (default 0.0,0.05,...,0.9)")
    p.add_argument("--ks", type=ints, default=None, help="comma-separated k grid (default powers of 2 from 8 to the log's k)")
    p.add_argument("--temps", type=floats, default=[1.0], help="comma-separated temperature grid (default 1)")
    p.add_argument("--kinds", default=",".join(KINDS), help="distances to sweep: approx, exact or both")
    p.add_argument("--cache-logs", nargs="+", default=[],
                   help="continuous-cache logs (fairseq-eval-lm --cache-size N --save-cache DIR), one per retrieval log "
                        "in the same order: also tune the cache weight and θ, alone and on top of kNN-LM")
    p.add_argument("--mus", type=floats, default=[0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4],
                   help="comma-separated cache weight grid in [0, 1)")
    p.add_argument("--cache-kind", default="exact", help="kNN distances combined with the cache: approx or exact")
    p.add_argument("--output", help="write the grids and the tuned settings as JSON here")
    p.add_argument("--gates", default="",
                   help="adaptive retrieval: comma-separated LM-confidence signals (entropy, max_lp) to tune a "
                        "per-token λ on, by buckets of the signal; buckets whose λ is 0 skip the search")
    p.add_argument("--buckets", type=int, default=10, help="buckets of each gate signal (quantiles of the tune log)")
    p.add_argument("--pointers", default="",
                   help="pointer reuse (RetoMaton): comma-separated minimum counts of surviving pointers to simulate on "
                        "the tune log at its tuned approx/exact setting (reads the datastore's keys)")
    p.add_argument("--pointer-tokens", type=int, default=20000, help="tokens of the tune log the simulation replays")
    p.add_argument("--write-settings", metavar="FILE",
                   help="write the cheapest tuned settings within --max-ppl-increase for fairseq-eval-lm --knn-settings "
                        "(they name the datastore, checkpoint and index of the tune log; an existing FILE is refused "
                        "without --force)")
    p.add_argument("--force", action="store_true", help="with --write-settings: replace an existing FILE")
    p.add_argument("--max-ppl-increase", type=float, default=DEFAULT_MAX_PPL_INCREASE,
                   help="with --write-settings: the largest perplexity increase on the tune log, in percent of the "
                        "best paper-faithful setting (exact distances, the log's k), that buys fewer searches")
    return p


def cache_sweep(args, logs, tune_result) -> dict:
    """base, +cache, +kNN, +kNN+cache per log: (θ, μ) tuned on the first log for the cache alone, and (λ, θ, μ) at
    the first log's tuned k and T for kNN + cache."""
    from ..core.retrieval_log import CACHE_ARRAYS, RetrievalLog
    from ..core.sweep import best, mix_knn, sweep_cache, token_log_probs

    if len(args.cache_logs) != len(logs):
        raise ValueError(f"{len(args.cache_logs)} cache logs for {len(logs)} retrieval logs: pass one per log, in order")
    kind = args.cache_kind
    knn = best(tune_result, kind)
    grids = []  # per log: {"cache": (nθ, M), "knn_cache": (L, nθ, M)}
    for log, cpath in zip(logs, args.cache_logs):
        clog = RetrievalLog(cpath, arrays=CACHE_ARRAYS)
        lm, knn_lp, found = token_log_probs(log, kind, knn["k"], knn["temp"])
        grids.append({
            "cache": sweep_cache(clog, lm, log.target, args.mus)["ppl"],
            "knn_cache": np.stack([sweep_cache(clog, mix_knn(lm, knn_lp, found, lam), log.target, args.mus)["ppl"]
                                   for lam in args.lmbdas]),
            "thetas": clog.meta["thetas"],
        })
    thetas = grids[0]["thetas"]
    c_i = np.unravel_index(np.argmin(grids[0]["cache"]), grids[0]["cache"].shape)  # (θ, μ)
    kc_i = np.unravel_index(np.argmin(grids[0]["knn_cache"]), grids[0]["knn_cache"].shape)  # (λ, θ, μ)
    tuned = {"cache": {"theta": thetas[c_i[0]], "mu": args.mus[c_i[1]]},
             "knn": knn,
             "knn_cache": {"kind": kind, "k": knn["k"], "temp": knn["temp"], "lmbda": args.lmbdas[kc_i[0]],
                           "theta": thetas[kc_i[1]], "mu": args.mus[kc_i[2]]}}
    rows = []
    for log, g in zip(logs, grids):
        rows.append({"path": log.path, "split": log.meta.get("split"),
                     "cache": float(g["cache"][c_i]), "knn_cache": float(g["knn_cache"][kc_i]),
                     "cache_grid": np.round(g["cache"], 4).tolist(),
                     "knn_cache_grid_at_tuned_lmbda": np.round(g["knn_cache"][kc_i[0]], 4).tolist()})
    print(f"cache tuned on {args.cache_logs[0]}: θ={tuned['cache']['theta']} μ={tuned['cache']['mu']}; with kNN "
          f"({kind}, k={knn['k']}, T={knn['temp']}): λ={tuned['knn_cache']['lmbda']} θ={tuned['knn_cache']['theta']} "
          f"μ={tuned['knn_cache']['mu']}")
    for r in rows:
        print(f"{r['path']}: +cache {r['cache']:.2f}, +kNN+cache {r['knn_cache']:.2f}")
    return {"mus": args.mus, "thetas": thetas, "lmbdas": args.lmbdas, "tuned": tuned, "logs": rows}


def pointer_sweep(args, log, tuned) -> list:
    """Searched fraction and perplexity of pointer reuse at each minimum, on the first --pointer-tokens tokens."""
    import tempfile

    from ..core.datastore import Datastore
    from ..core.pointers import simulate
    from ..core.retrieval_log import RetrievalLog, truncate_log

    dstore = Datastore.open(log.meta["dstore"]["path"], in_memory=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cut = log if args.pointer_tokens >= log.count else RetrievalLog(
            truncate_log(log.path, f"{tmp}/cut", args.pointer_tokens) and f"{tmp}/cut")
        for kind, b in tuned.items():
            for m in [10**9] + ints(args.pointers):  # first: no reuse, the reference
                r = simulate(cut, dstore, kind, b["k"], b["temp"], b["lmbda"], m)
                rows.append(dict(r, min_pointers=None if m == 10**9 else m))
                print(f"pointers {kind} min {rows[-1]['min_pointers']}: searched {r['searched']:.1%}, ppl {r['ppl']:.2f}")
    return rows


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if args.write_settings and os.path.exists(args.write_settings) and not args.force:  # before hours of sweeping
        print(f"knnlm-sweep: error: {args.write_settings} already exists (settings fairseq-eval-lm --knn-settings "
              f"reads); pass --force to replace it, or another --write-settings FILE", file=sys.stderr)
        return 2
    from ..core.durable import write_text_atomic
    from ..core.retrieval_log import RetrievalLog
    from ..core.sweep import best, lookup, sweep

    try:
        logs = [RetrievalLog(p) for p in [args.tune] + args.apply]
        ks = args.ks or [k for k in (2**i for i in range(3, 21)) if k <= logs[0].k]
        kinds = args.kinds.split(",")
        results = [sweep(log, args.lmbdas, ks, args.temps, kinds) for log in logs]
        cache = cache_sweep(args, logs, results[0]) if args.cache_logs else None
    except (KnnlmError, ValueError) as e:
        print(f"knnlm-sweep: error: {e}", file=sys.stderr)
        return 2
    out = {"settings": {"lmbdas": args.lmbdas, "ks": ks, "temps": args.temps, "kinds": kinds}, "logs": []}
    tuned = {kind: best(results[0], kind) for kind in kinds}
    print(f"tuned on {args.tune} ({results[0]['n_tokens']:,} tokens):")
    for kind, b in tuned.items():
        print(f"  {kind:6s} k={b['k']} T={b['temp']} λ={b['lmbda']}: ppl {b['ppl']:.2f}")
    for path, log, res in zip([args.tune] + args.apply, logs, results):
        row = {"path": path, "split": log.meta.get("split"), "n_tokens": res["n_tokens"], "base_ppl": res["base_ppl"],
               "tuned": {kind: lookup(res, kind, b["k"], b["temp"], b["lmbda"]) for kind, b in tuned.items()},
               "ppl": {kind: np.round(res["ppl"][kind], 4).tolist() for kind in kinds}}
        out["logs"].append(row)
        print(f"{path}: base {row['base_ppl']:.2f}, " + ", ".join(f"{k} {v:.2f}" for k, v in row["tuned"].items()))
    out["tuned"] = tuned
    if cache is not None:
        out["cache"] = cache
    if args.pointers:
        out["pointers"] = pointer_sweep(args, logs[0], tuned)
    if args.gates or args.write_settings:
        from ..core.adaptive import adaptive_sweep, choose
        from ..core.settings import settings_file

        try:
            out["adaptive"] = adaptive_sweep(logs, results[0], kinds, [g for g in args.gates.split(",") if g],
                                             args.buckets, args.lmbdas)
        except (KnnlmError, ValueError) as e:
            print(f"knnlm-sweep: error: {e}", file=sys.stderr)
            return 2
        if args.write_settings:
            chosen = choose(out["adaptive"], results[0], args.max_ppl_increase)
            out["chosen"] = chosen
            settings = settings_file(logs[0], chosen)
            write_text_atomic(args.write_settings, json.dumps(settings, indent=1) + "\n")  # the durable commit
            print(f"wrote {args.write_settings}: {chosen['summary']}")
            print(f"  why this point: the fewest searches (then the cheapest distances) whose tune-log perplexity is "
                  f"within --max-ppl-increase {args.max_ppl_increase:g}% (default {DEFAULT_MAX_PPL_INCREASE:g}%) of the "
                  f"best paper-faithful setting (exact distances at the log's k); pass --max-ppl-increase 0 for the "
                  f"best perplexity")
            if not settings["tuned_for"]["index_id"]:
                print(f"knnlm-sweep: warning: {args.tune} does not record the index it searched (recorded before "
                      f"logs did): fairseq-eval-lm --knn-settings will refuse {args.write_settings}; record the log "
                      f"again (fairseq-eval-lm --knnlm --save-retrieval) and sweep it", file=sys.stderr)
    if args.output:
        write_text_atomic(args.output, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
