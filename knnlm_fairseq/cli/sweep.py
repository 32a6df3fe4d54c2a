"""knnlm-sweep: tune λ, k and T offline from retrieval logs (fairseq-eval-lm --knnlm --save-retrieval DIR).

Tunes on the first log (valid) and applies the tuned settings to the others (test), as the paper does.
"""
import argparse
import json
import sys

import numpy as np

from ..datastore import DatastoreError
from ..retrieval_log import RetrievalLog
from ..sweep import KINDS, best, lookup, sweep


def floats(text: str):
    return [float(x) for x in text.split(",")]


def ints(text: str):
    return [int(x) for x in text.split(",")]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-sweep", description=__doc__)
    p.add_argument("tune", help="retrieval log to tune on (e.g. valid)")
    p.add_argument("apply", nargs="*", help="retrieval logs to report with the tuned settings (e.g. test)")
    p.add_argument("--lmbdas", type=floats, default=[round(0.05 * i, 2) for i in range(19)],
                   help="comma-separated λ grid in [0, 1) (default 0.0,0.05,...,0.9)")
    p.add_argument("--ks", type=ints, default=None, help="comma-separated k grid (default powers of 2 from 8 to the log's k)")
    p.add_argument("--temps", type=floats, default=[1.0], help="comma-separated temperature grid (default 1)")
    p.add_argument("--kinds", default=",".join(KINDS), help="distances to sweep: approx, exact or both")
    p.add_argument("--output", help="write the grids and the tuned settings as JSON here")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        logs = [RetrievalLog(p) for p in [args.tune] + args.apply]
        ks = args.ks or [k for k in (2**i for i in range(3, 21)) if k <= logs[0].k]
        kinds = args.kinds.split(",")
        results = [sweep(log, args.lmbdas, ks, args.temps, kinds) for log in logs]
    except (DatastoreError, ValueError) as e:
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
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
