#!/usr/bin/env python
"""make demo: WikiText-2 + a fairseq LM checkpoint -> train datastore -> index -> base vs kNN-LM on valid.

Every stage is a stock fairseq CLI (or knnlm-build-index) in a subprocess; this script only times
them, parses their reported numbers, prints a table and writes results/demo/metrics.json.
"""
import argparse
import os
import re

from pipeline import BIN, KNN_TASK, PKG, cli, eval_lm, eval_numbers, read_json, run, write_json


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
    logs, stages = os.path.join(a.out, "logs"), {}
    common = (a.data_bin, a.checkpoint)
    window = (a.tokens_per_sample, a.context_window, a.max_tokens, ["--cpu"])
    print("settings: " + ", ".join(f"{k}={v}" for k, v in vars(a).items()), flush=True)

    if os.path.exists(os.path.join(a.dstore_dir, "manifest.json")):
        print(f"reusing the datastore in {a.dstore_dir} (delete it to dump again)")
    else:
        run("dump", eval_lm(*common, a.dstore_split, *window) + KNN_TASK + ["--save-dstore", "--dstore-dir",
                                                                            a.dstore_dir], logs, stages)
    manifest = read_json(os.path.join(a.dstore_dir, "manifest.json"))
    index_file = "index." + re.sub(r"[^A-Za-z0-9]+", "_", a.factory) + ".faiss"
    if os.path.exists(os.path.join(a.dstore_dir, index_file)):
        print(f"reusing the index {index_file}")
    else:
        run("index", [f"{BIN}/knnlm-build-index", a.dstore_dir, "--factory", a.factory, "--train-size", a.train_size,
                      "--output", index_file, "--no-progress-bar"], logs, stages)
    index_meta = read_json(os.path.join(a.dstore_dir, index_file + ".json"))
    base = eval_numbers(run("eval_base", eval_lm(*common, a.eval_split, *window) + ["--user-dir", PKG], logs, stages))
    knnlm = eval_numbers(run("eval_knnlm", eval_lm(*common, a.eval_split, *window) + KNN_TASK + [
        "--knnlm", "--dstore-dir", a.dstore_dir, "--index-file", index_file, "--k", a.k, "--lmbda", a.lmbda,
        "--knn-temp", a.knn_temp, "--probe", a.probe, "--knn-dist", a.knn_dist], logs, stages))

    metrics = {
        "split": a.eval_split, "base_ppl": base["ppl"], "knnlm_ppl": knnlm["ppl"], "n_tokens": base["tokens"],
        "dstore_n": manifest["count"], "dstore_split": manifest["split"], "dstore_dim": manifest["dim"],
        "index_factory": index_meta["factory_used"], "k": a.k, "lmbda": a.lmbda, "knn_temp": a.knn_temp,
        "nprobe": a.probe, "knn_dist": a.knn_dist,
        "seconds": {name: s["seconds"] for name, s in stages.items()},
        "peak_rss_mb": {name: s["peak_rss_mb"] for name, s in stages.items()},
        "tokens_per_s": {"base": base["tok_s"], "knnlm": knnlm["tok_s"]},
        "settings": vars(a),
    }
    write_json(os.path.join(a.out, "metrics.json"), metrics)
    print(f"\n{a.eval_split} perplexity, datastore: {manifest['count']:,} {manifest['split']} tokens, "
          f"index {index_meta['factory_used']}")
    print(f"{'model':<48} {'ppl':>9} {'tokens/s':>10}")
    print(f"{'base LM':<48} {base['ppl']:>9.2f} {base['tok_s']:>10.1f}")
    name = f"kNN-LM (k={a.k}, λ={a.lmbda}, T={a.knn_temp}, {a.knn_dist})"
    print(f"{name:<48} {knnlm['ppl']:>9.2f} {knnlm['tok_s']:>10.1f}")
    print(f"kNN-LM speed: {knnlm['tok_s'] / base['tok_s']:.2f}x the base LM")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["seconds"].items()))
    print(f"wrote {os.path.join(a.out, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    cli(main)
