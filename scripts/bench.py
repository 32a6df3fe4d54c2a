#!/usr/bin/env python
"""make bench: the base LM and each kNN-LM configuration timed side by side in one run, on the same splits.

The fast configuration is tuned on valid only: one recording pass over valid with the fast index, then
`knnlm-sweep --gates ... --write-settings` picks the cheapest setting within a perplexity budget, and every
evaluation below runs `fairseq-eval-lm --knn-settings` with that file, unchanged on test. Writes OUT/metrics.json,
OUT/report.md and OUT/frontier.png; datastore, indexes, logs and per-run statistics go to --work.
"""
import argparse
import os
import re

from knnlm_fairseq.core.durable import read_json
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import machine, publish, versions
from knnlm_fairseq.experiments.settings import add_run_settings, cli, window
from knnlm_fairseq.experiments.stages import Stages
from bench_report import plot, render


def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-bin", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dstore", required=True, help="the datastore (make wikitext2's is kept as it is; else dumped)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--tokens", type=int, default=0, help="evaluate only each split's first blocks up to this many "
                                                         "tokens (0: whole splits)")
    p.add_argument("--splits", default="valid,test", help="tune split first; settings are tuned on it only")
    add_run_settings(p, lmbda=0.25, knn_temp=10.0)
    p.add_argument("--approx-lmbda", type=float, default=0.3, help="λ of the paper-index approximate-distance row")
    p.add_argument("--fast-factory", default="IVF1024,PQ64x4fs",
                   help="the fast configuration's index (4-bit fast-scan PQ: SIMD list scans)")
    p.add_argument("--fast-probe", type=int, default=8)
    p.add_argument("--fast-k", type=int, default=1024, help="k recorded for the sweep (it tunes smaller k too)")
    p.add_argument("--gates", default="entropy,max_lp")
    p.add_argument("--buckets", type=int, default=10)
    p.add_argument("--max-ppl-increase", type=float, default=0.5,
                   help="the sweep's budget on the tune split, percent over the best exact setting of the fast log")
    p.add_argument("--pointers", default="128,256,512",
                   help="pointer reuse (RetoMaton) simulated on the tune log: minimum surviving pointers ('' skips)")
    p.add_argument("--pointer-tokens", type=int, default=20000, help="tune-log tokens the pointer simulation replays")
    p.add_argument("--threads", type=int, default=0, help="faiss search threads (0: faiss's default)")
    return p


def main(argv=None):
    a = get_parser().parse_args(argv)
    splits = a.splits.split(",")
    stages = Stages(a.work, reuse=True)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in vars(a).items()), flush=True)
    limit = ["--eval-tokens", a.tokens] if a.tokens else []

    stages.run("dump", C.dump(*window(a, a.data_bin, a.checkpoint, "train", dump=True), dstore=a.dstore), keep=True)
    stages.run("index_paper", C.build_index(a.dstore, a.factory, a.train_size), keep=True)
    fast_index = "index." + re.sub(r"[^A-Za-z0-9]+", "_", a.fast_factory) + ".faiss"
    stages.run("index_fast", C.build_index(a.dstore, a.fast_factory, a.train_size, output=fast_index))

    # the fast settings, tuned on the tune split only
    tune_log = os.path.join(a.work, f"retrieval-fast-{splits[0]}")
    stages.run("record_fast", C.knn_eval(*window(a, a.data_bin, a.checkpoint, splits[0]), dstore=a.dstore,
                                         index_file=fast_index, k=a.fast_k, lmbda=a.lmbda, temp=a.knn_temp,
                                         probe=a.fast_probe, dist="exact", retrieval_log=tune_log,
                                         extra=[*limit, "--knn-threads", a.threads]))
    tuned = os.path.join(a.work, "tuned.json")
    sweep = os.path.join(a.work, "sweep-fast.json")
    stages.run("tune_fast", C.sweep([tune_log], sweep, a.lmbdas, [k for k in (64, 128, 256, 512, 1024) if k <= a.fast_k] or [a.fast_k],
                                    a.temps, extra=["--gates", a.gates, "--buckets", a.buckets, "--write-settings",
                                                    tuned, "--max-ppl-increase", a.max_ppl_increase,
                                                    *(["--pointers", a.pointers, "--pointer-tokens", a.pointer_tokens]
                                                      if a.pointers else [])]))

    rows = {
        "base": [],
        "paper_exact": knn_flags(a, None, a.lmbda, a.probe, "exact"),
        "paper_approx": knn_flags(a, None, a.approx_lmbda, a.probe, "approx"),
        "fast": ["--knnlm", "--dstore-dir", a.dstore, "--knn-settings", tuned, "--knn-mix", "target"],
    }
    runs = {}
    for split in splits:
        for name, flags in rows.items():
            stats = os.path.join(a.work, "stats", f"{name}-{split}.json")
            os.makedirs(os.path.dirname(stats), exist_ok=True)
            extra = [*limit, *(["--knn-stats", stats, "--knn-threads", a.threads] if flags else [])]
            cmd = C.Command(C.eval_lm(*window(a, a.data_bin, a.checkpoint, split)) + C.KNN_TASK + flags + extra)
            out = stages.run(f"{name}_{split}", cmd, reuse=False)  # timings are this run's, never an old run's
            runs[f"{name}_{split}"] = dict(C.eval_numbers(out), wall_s=stages.done[f"{name}_{split}"]["seconds"],
                                           peak_rss_mb=stages.done[f"{name}_{split}"]["peak_rss_mb"],
                                           stats=read_json(stats, "run the bench again") if flags else None)
    metrics = {"splits": splits, "tokens_limit": a.tokens, "rows": list(rows), "runs": runs,
               "tuned": read_json(tuned, "tune again"), "sweep": summary_of(read_json(sweep, "tune again")),
               "index": {name: read_json(os.path.join(a.dstore, f + ".json"), "build it again")
                         for name, f in (("paper", C.INDEX_FILE), ("fast", fast_index))},
               "stages": stages.done, "settings": vars(a), "machine": machine(), "versions": versions()}
    metrics["plots"] = plot(metrics, a.out)
    publish(a.out, metrics, render)
    return 0


def knn_flags(a, index_file, lmbda, probe, dist):
    flags = ["--knnlm", "--dstore-dir", a.dstore, "--k", a.k, "--lmbda", lmbda, "--knn-temp", a.knn_temp,
             "--probe", probe, "--knn-dist", dist]
    return flags + ([] if index_file is None else ["--index-file", index_file])


def summary_of(sweep):
    """What the report shows of the sweep: the chosen setting and each gate's frontier at the chosen (kind, k)."""
    chosen = sweep["chosen"]
    frontiers = [{"gate": r["gate"], "points": [{"searched": p["searched"], "ppl": p["ppl"]} for p in r["frontier"]]}
                 for r in sweep.get("adaptive", {}).get("rows", []) if (r["kind"], r["k"]) == (chosen["kind"],
                                                                                                chosen["k"])]
    return {"chosen": chosen, "frontiers": frontiers, "n_tokens": sweep["logs"][0]["n_tokens"],
            "base_ppl": sweep["logs"][0]["base_ppl"], "pointers": sweep.get("pointers", [])}


if __name__ == "__main__":
    cli(main)
