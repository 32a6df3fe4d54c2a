#!/usr/bin/env python
"""make demo: WikiText-2 + a fairseq LM checkpoint -> train datastore -> index -> base vs kNN-LM on valid.

Every stage is a stock fairseq CLI (or knnlm-build-index) in a subprocess; this script only times
them, parses their reported numbers, prints a table and writes results/demo/metrics.json.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

BIN = os.path.dirname(sys.executable)
PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "knnlm_fairseq")
PPL = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
EVALUATED = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s")


def run(cmd, log_path):
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    seconds = time.time() - t0
    text = open(log_path).read()
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        sys.exit(f"stage failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    return text, seconds


def eval_numbers(text):
    m, e = PPL.findall(text)[-1], EVALUATED.findall(text)[-1]
    return {"loss_base2": float(m[0]), "ppl": float(m[1]), "tokens": int(e[0].replace(",", "")),
            "eval_seconds": float(e[1])}


def main(argv=None):
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
    p.add_argument("--knn-temp", type=float, default=1.0)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--knn-dist", default="exact", choices=["exact", "approx"])
    p.add_argument("--cpu", action="store_true", default=True)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    common = [args.data_bin, "--path", args.checkpoint, "--tokens-per-sample", str(args.tokens_per_sample),
              "--context-window", str(args.context_window), "--max-tokens", str(args.max_tokens),
              "--no-progress-bar", "--log-interval", "100"] + (["--cpu"] if args.cpu else [])
    knn = ["--user-dir", PKG, "--task", "knn_eval"]
    seconds, settings = {}, {k: v for k, v in vars(args).items() if k not in ("out",)}
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), flush=True)

    manifest_path = os.path.join(args.dstore_dir, "manifest.json")
    if os.path.exists(manifest_path):
        print(f"reusing the datastore in {args.dstore_dir}")
        dump = None
    else:
        text, seconds["dump"] = run([f"{BIN}/fairseq-eval-lm"] + common + knn + [
            "--gen-subset", args.dstore_split, "--save-dstore", "--dstore-dir", args.dstore_dir],
            os.path.join(args.out, "dump.log"))
        dump = eval_numbers(text)
    manifest = json.load(open(manifest_path))

    index_file = "index." + re.sub(r"[^A-Za-z0-9]+", "_", args.factory) + ".faiss"
    if os.path.exists(os.path.join(args.dstore_dir, index_file)):
        print(f"reusing the index {index_file}")
    else:
        _, seconds["index"] = run([f"{BIN}/knnlm-build-index", args.dstore_dir, "--factory", args.factory,
                                   "--train-size", str(args.train_size), "--output", index_file,
                                   "--no-progress-bar"], os.path.join(args.out, "index.log"))
    index_meta = json.load(open(os.path.join(args.dstore_dir, index_file + ".json")))

    text, seconds["eval_base"] = run([f"{BIN}/fairseq-eval-lm"] + common + ["--gen-subset", args.eval_split],
                                     os.path.join(args.out, "eval_base.log"))
    base = eval_numbers(text)
    text, seconds["eval_knnlm"] = run([f"{BIN}/fairseq-eval-lm"] + common + knn + [
        "--gen-subset", args.eval_split, "--knnlm", "--dstore-dir", args.dstore_dir, "--index-file", index_file,
        "--k", str(args.k), "--lmbda", str(args.lmbda), "--knn-temp", str(args.knn_temp),
        "--probe", str(args.probe), "--knn-dist", args.knn_dist], os.path.join(args.out, "eval_knnlm.log"))
    knnlm = eval_numbers(text)

    metrics = {
        "split": args.eval_split,
        "base_ppl": base["ppl"],
        "knnlm_ppl": knnlm["ppl"],
        "n_tokens": base["tokens"],
        "dstore_n": manifest["count"],
        "dstore_split": manifest["split"],
        "dstore_dim": manifest["dim"],
        "index_factory": index_meta["factory_used"],
        "k": args.k,
        "lmbda": args.lmbda,
        "knn_temp": args.knn_temp,
        "nprobe": args.probe,
        "knn_dist": args.knn_dist,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "tokens_per_s": {"base": round(base["tokens"] / base["eval_seconds"], 1),
                         "knnlm": round(knnlm["tokens"] / knnlm["eval_seconds"], 1)},
        "settings": settings,
    }
    if dump is not None:
        metrics["tokens_per_s"]["dump"] = round(dump["tokens"] / dump["eval_seconds"], 1)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")

    rows = [("base LM", base["ppl"], metrics["tokens_per_s"]["base"]),
            (f"kNN-LM (k={args.k}, λ={args.lmbda}, {args.knn_dist})", knnlm["ppl"], metrics["tokens_per_s"]["knnlm"])]
    print(f"\n{args.eval_split} perplexity, datastore: {manifest['count']:,} {manifest['split']} tokens, "
          f"index {index_meta['factory_used']}")
    print(f"{'model':<40} {'ppl':>9} {'tokens/s':>10}")
    for name, ppl, tps in rows:
        print(f"{name:<40} {ppl:>9.2f} {tps:>10.1f}")
    print(f"kNN-LM speed: {metrics['tokens_per_s']['knnlm'] / metrics['tokens_per_s']['base']:.2f}x the base LM")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["seconds"].items()))
    print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
