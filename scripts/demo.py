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
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast",
                   help="fast: a 4-bit fast-scan index, 8 probes, faiss's distances; paper: the paper's recipe "
                        "(8-bit PQ, 32 probes, exact distances); the flags below override either")
    p.add_argument("--factory")
    p.add_argument("--train-size", type=int, default=200_000)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float)
    # this small CPU model's keys sit farther apart than the paper's: T=10 (tuned by make wikitext2) helps, T=1 hurts
    p.add_argument("--knn-temp", type=float, default=10.0)
    p.add_argument("--probe", type=int)
    p.add_argument("--knn-dist", choices=["exact", "approx"])
    p.add_argument("--knn-mix", choices=["full", "target"], help="interpolate every word, or only the target")
    p.add_argument("--eval-tokens", type=int, default=0, help="evaluate only the split's first blocks (0: all)")
    return p


# λ for each distance kind as make wikitext2's sweep tuned it on valid (results/wikitext2): 0.3 approx, 0.25 exact
PRESETS = {
    "fast": dict(factory="IVF1024,PQ64x4fs", probe=8, knn_dist="approx", lmbda=0.3, knn_mix="target"),
    "paper": dict(factory="IVF1024,PQ32", probe=32, knn_dist="exact", lmbda=0.25, knn_mix="full"),
}


def with_preset(a):
    for name, value in PRESETS[a.preset].items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    return a


def main(argv=None):
    a = with_preset(get_parser().parse_args(argv))
    stages = Stages(a.out, reuse=True)  # the datastore and index outlive the demo: delete them to make them again
    print("settings: " + ", ".join(f"{k}={v}" for k, v in vars(a).items()), flush=True)

    def window(split, limit=False):
        device = ["--cpu"] + (["--eval-tokens", str(a.eval_tokens)] if limit and a.eval_tokens else [])
        return a.data_bin, a.checkpoint, split, a.tokens_per_sample, a.context_window, a.max_tokens, device

    stages.run("dump", C.dump(*window(a.dstore_split), dstore=a.dstore_dir))
    index_file = "index." + re.sub(r"[^A-Za-z0-9]+", "_", a.factory) + ".faiss"
    stages.run("index", C.build_index(a.dstore_dir, a.factory, a.train_size, output=index_file))
    manifest = read_json(os.path.join(a.dstore_dir, "manifest.json"), "dump it again")
    index_meta = read_json(os.path.join(a.dstore_dir, index_file + ".json"), "build the index again")
    base = C.eval_numbers(stages.run("eval_base", C.Command(C.eval_lm(*window(a.eval_split, True)) + C.KNN_TASK)))
    knnlm = C.eval_numbers(stages.run("eval_knnlm", C.knn_eval(
        *window(a.eval_split, True), dstore=a.dstore_dir, index_file=index_file, k=a.k, lmbda=a.lmbda, temp=a.knn_temp,
        probe=a.probe, dist=a.knn_dist, extra=["--knn-mix", a.knn_mix])))
    metrics = {
        "split": a.eval_split, "base_ppl": base["ppl"], "knnlm_ppl": knnlm["ppl"], "n_tokens": base["tokens"],
        "dstore_n": manifest["count"], "dstore_split": manifest["split"], "dstore_dim": manifest["dim"],
        "index_factory": index_meta["factory_used"], "k": a.k, "lmbda": a.lmbda, "knn_temp": a.knn_temp,
        "nprobe": a.probe, "knn_dist": a.knn_dist, "preset": a.preset,
        "seconds": {name: s["seconds"] for name, s in stages.done.items()},
        "peak_rss_mb": {name: s["peak_rss_mb"] for name, s in stages.done.items()},
        "tokens_per_s": {"base": base["tok_s"], "knnlm": knnlm["tok_s"]},
        "time_ratio": round(base["tok_s"] / knnlm["tok_s"], 2),  # kNN-LM's time over the base LM's
        "stages": stages.done, "settings": vars(a), "versions": versions(),
    }
    publish(a.out, metrics, render)
    return 0


def render(m):
    return "\n".join([
        prose("# kNN-LM demo: {split} perplexity", split=m["split"]), "",
        prose("Datastore: {n:,} `{split}` keys of dim {dim}; index `{factory}`, nprobe {probe} (the `{preset}` "
              "preset; `make demo DEMO_ARGS=--preset=paper` runs the paper's recipe).", n=m["dstore_n"],
              split=m["dstore_split"], dim=m["dstore_dim"], factory=m["index_factory"], probe=m["nprobe"],
              preset=m.get("preset", "paper")), "",
        table(["model", "perplexity", "tokens/s"], [
            ["base LM", f"{m['base_ppl']:.2f}", m["tokens_per_s"]["base"]],
            [f"kNN-LM (k={m['k']}, λ={m['lmbda']}, T={m['knn_temp']}, {m['knn_dist']} distances)",
             f"{m['knnlm_ppl']:.2f}", m["tokens_per_s"]["knnlm"]]]), "",
        prose("kNN-LM takes {r}× the base LM's time.", r=m["time_ratio"]), "",
        table(["stage", "seconds", "peak RSS (MB)", "command"], stage_rows(m["stages"])), "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""])


if __name__ == "__main__":
    cli(main)
