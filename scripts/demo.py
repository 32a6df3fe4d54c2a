#!/usr/bin/env python
"""make demo: WikiText-2 + a fairseq LM checkpoint -> train datastore -> index -> base vs kNN-LM on valid.

Every stage is a stock fairseq CLI (or knnlm-build-index) in a subprocess; the datastore and index are kept
for the next run (a stage whose command changed is made again). Writes OUT/metrics.json and OUT/report.md.
"""
import argparse
import os
import re

from knnlm_fairseq.core.durable import read_json
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import prose, publish, stage_rows, table, versions
from knnlm_fairseq.experiments.settings import cli
from knnlm_fairseq.experiments.stages import Stages


def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-bin", required=True, help="fairseq-preprocess output with the checkpoint's dictionary")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="results/demo")
    p.add_argument("--dstore-dir", default="dstore/wikitext-2-train")
    p.add_argument("--dstore-split", default="train")
    p.add_argument("--eval-split", default="valid")
    p.add_argument("--tokens-per-sample", type=int, default=512)
    p.add_argument("--context-window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--factory", default="IVF1024,PQ32")
    p.add_argument("--train-size", type=int, default=200_000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    # this small CPU model's keys sit farther apart than the paper's: T=10 (tuned by make wikitext2) helps, T=1 hurts
    p.add_argument("--knn-temp", type=float, default=10.0)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--knn-dist", default="exact", choices=["exact", "approx"])
    return p


def main(argv=None):
    a = get_parser().parse_args(argv)
    stages = Stages(a.out, reuse=True)  # the datastore and index outlive the demo: delete them to make them again
    print("settings: " + ", ".join(f"{k}={v}" for k, v in vars(a).items()), flush=True)

    def window(split):
        return a.data_bin, a.checkpoint, split, a.tokens_per_sample, a.context_window, a.max_tokens, ["--cpu"]

    stages.run("dump", C.dump(*window(a.dstore_split), dstore=a.dstore_dir))
    index_file = "index." + re.sub(r"[^A-Za-z0-9]+", "_", a.factory) + ".faiss"
    stages.run("index", C.build_index(a.dstore_dir, a.factory, a.train_size, output=index_file))
    manifest = read_json(os.path.join(a.dstore_dir, "manifest.json"), "dump it again")
    index_meta = read_json(os.path.join(a.dstore_dir, index_file + ".json"), "build the index again")
    base = C.eval_numbers(stages.run("eval_base", C.base_eval(*window(a.eval_split))))
    knnlm = C.eval_numbers(stages.run("eval_knnlm", C.knn_eval(
        *window(a.eval_split), dstore=a.dstore_dir, index_file=index_file, k=a.k, lmbda=a.lmbda, temp=a.knn_temp,
        probe=a.probe, dist=a.knn_dist)))
    metrics = {
        "split": a.eval_split, "base_ppl": base["ppl"], "knnlm_ppl": knnlm["ppl"], "n_tokens": base["tokens"],
        "dstore_n": manifest["count"], "dstore_split": manifest["split"], "dstore_dim": manifest["dim"],
        "index_factory": index_meta["factory_used"], "k": a.k, "lmbda": a.lmbda, "knn_temp": a.knn_temp,
        "nprobe": a.probe, "knn_dist": a.knn_dist,
        "seconds": {name: s["seconds"] for name, s in stages.done.items()},
        "peak_rss_mb": {name: s["peak_rss_mb"] for name, s in stages.done.items()},
        "tokens_per_s": {"base": base["tok_s"], "knnlm": knnlm["tok_s"]},
        "speed_ratio": round(knnlm["tok_s"] / base["tok_s"], 2),
        "stages": stages.done, "settings": vars(a), "versions": versions(),
    }
    publish(a.out, metrics, render)
    return 0


def render(m):
    return "\n".join([
        prose("# kNN-LM demo: {split} perplexity", split=m["split"]), "",
        prose("Datastore: {n:,} `{split}` keys of dim {dim}; index `{factory}`.", n=m["dstore_n"],
              split=m["dstore_split"], dim=m["dstore_dim"], factory=m["index_factory"]), "",
        table(["model", "perplexity", "tokens/s"], [
            ["base LM", f"{m['base_ppl']:.2f}", m["tokens_per_s"]["base"]],
            [f"kNN-LM (k={m['k']}, λ={m['lmbda']}, T={m['knn_temp']}, {m['knn_dist']} distances)",
             f"{m['knnlm_ppl']:.2f}", m["tokens_per_s"]["knnlm"]]]), "",
        prose("kNN-LM runs at {r}× the base LM's speed.", r=m["speed_ratio"]), "",
        table(["stage", "seconds", "peak RSS (MB)", "command"], stage_rows(m["stages"])), "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""])


if __name__ == "__main__":
    cli(main)
