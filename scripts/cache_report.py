#!/usr/bin/env python
"""The paper's Table 1 rows with a continuous cache: base, +cache, +kNN, +kNN+cache on valid and test.

Runs one base-LM pass per split that records the cache (fairseq-eval-lm --cache-size N --save-cache DIR), then
knnlm-sweep combines those logs with `make wikitext2`'s retrieval logs (same splits, same eval settings):
cache weight μ and θ tuned on valid alone and on top of kNN-LM (λ re-tuned with them), applied to test.
Writes OUT/metrics.json, OUT/report.md and OUT/ppl_vs_cache_weight.png.
"""
import argparse
import os
import shutil
import sys

import numpy as np

from pipeline import BIN, KNN_TASK, cli, eval_lm, eval_numbers, read_json, run, versions, write_json
from plots import plt


def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-bin", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--knn-work", required=True, help="make wikitext2's work dir (retrieval-valid, retrieval-test)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--cache-size", type=int, default=512, help="cached positions (all earlier ones of a 512-token block)")
    p.add_argument("--thetas", default="0.01,0.03,0.1,0.3,1")
    p.add_argument("--mus", default="0,0.02,0.05,0.1,0.15,0.2,0.25,0.3,0.4")
    p.add_argument("--lmbdas", default=",".join(str(round(0.05 * i, 2)) for i in range(13)))
    p.add_argument("--eval-tokens-per-sample", type=int, default=512)
    p.add_argument("--eval-context-window", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--device", default="--cpu")
    p.add_argument("--reuse", action="store_true", help="keep cache logs already in --work")
    return p


def main(argv=None):
    a = get_parser().parse_args(argv)
    splits = ["valid", "test"]
    rlogs = [os.path.join(a.knn_work, f"retrieval-{s}") for s in splits]
    missing = [r for r in rlogs if not os.path.exists(os.path.join(r, "meta.json"))]
    if missing:
        sys.exit(f"no retrieval log at {missing[0]}: run `make wikitext2` first (its kNN runs record them)")
    knn_sweep = read_json(os.path.join(a.knn_work, "sweep.json"))
    k, temps = knn_sweep["settings"]["ks"][-1], knn_sweep["settings"]["temps"]
    logs, stages, evals = os.path.join(a.work, "logs"), {}, {}
    for split in splits:
        clog = os.path.join(a.work, f"cache-{split}")
        if a.reuse and os.path.exists(os.path.join(clog, "meta.json")):
            stages[f"cache_log_{split}"] = {"seconds": None, "peak_rss_mb": None,
                                            "command": f"(reused {clog}: an earlier run of the same pass)"}
            continue
        shutil.rmtree(clog, ignore_errors=True)
        ev = (a.data_bin, a.checkpoint, split, a.eval_tokens_per_sample, a.eval_context_window, a.max_tokens,
              a.device.split())
        evals[split] = eval_numbers(run(f"cache_log_{split}", eval_lm(*ev) + KNN_TASK + [
            "--cache-size", a.cache_size, "--cache-lmbda", 0, "--save-cache", clog, "--cache-thetas", a.thetas],
            logs, stages))
    out_json = os.path.join(a.work, "sweep.json")
    run("sweep", [f"{BIN}/knnlm-sweep", *rlogs, "--ks", k, "--temps", ",".join(map(str, temps)),
                  "--lmbdas", a.lmbdas, "--kinds", "exact", "--cache-logs",
                  *[os.path.join(a.work, f"cache-{s}") for s in splits], "--mus", a.mus, "--output", out_json],
        logs, stages)
    sw = read_json(out_json)
    c = sw["cache"]
    metrics = {"settings": vars(a) | {"k": k, "kind": "exact"}, "tuned": c["tuned"], "stages": stages,
               "versions": versions()}
    for split, row, crow in zip(splits, sw["logs"], c["logs"]):
        metrics[split] = {"n_tokens": row["n_tokens"], "base_ppl": round(row["base_ppl"], 2),
                          "cache_ppl": round(crow["cache"], 2), "knnlm_ppl": round(row["tuned"]["exact"], 2),
                          "knnlm_cache_ppl": round(crow["knn_cache"], 2)}
        if split in evals:
            metrics[split]["cache_pass_tok_s"] = evals[split]["tok_s"]
    os.makedirs(a.out, exist_ok=True)
    metrics["plots"] = [plot(c, splits, a.out)]
    write_json(os.path.join(a.out, "metrics.json"), metrics)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(render(metrics, splits))
    print(open(os.path.join(a.out, "report.md")).read())
    return 0


def plot(c, splits, out_dir):
    mus, thetas = c["mus"], c["thetas"]
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    t_c, t_kc = thetas.index(c["tuned"]["cache"]["theta"]), thetas.index(c["tuned"]["knn_cache"]["theta"])
    for ax, row, split in zip(axes[0], c["logs"], splits):
        ax.plot(mus, np.array(row["cache_grid"])[t_c], "-o", ms=3, label=f"LM + cache (θ={thetas[t_c]})")
        ax.plot(mus, np.array(row["knn_cache_grid_at_tuned_lmbda"])[t_kc], "-s", ms=3,
                label=f"kNN-LM + cache (λ={c['tuned']['knn_cache']['lmbda']}, θ={thetas[t_kc]})")
        ax.set(title=split, xlabel="cache weight μ", ylabel="perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("perplexity vs cache weight (θ, λ tuned on valid)", fontsize=10)
    fig.tight_layout()
    name = "ppl_vs_cache_weight.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def render(m, splits):
    t = m["tuned"]
    lines = [
        "# Continuous cache on WikiText-2 (this CPU)", "",
        f"The continuous cache of Grave et al. (2017) over the last {m['settings']['cache_size']} positions of the "
        f"block being scored (context window included; states: the last block's output), interpolated as "
        f"p = (1 − μ)·p_kNN-LM + μ·p_cache. The kNN-LM rows reuse `make wikitext2`'s datastore and retrieval logs "
        f"(exact distances, k={m['settings']['k']}). Everything is tuned on valid by `knnlm-sweep --cache-logs` "
        f"and applied unchanged to test.", "",
        "| split | tokens | base LM | + cache | + kNN | + kNN + cache |", "|---|---|---|---|---|---|",
    ]
    for s in splits:
        r = m[s]
        lines.append(f"| {s} | {r['n_tokens']:,} | {r['base_ppl']:.2f} | {r['cache_ppl']:.2f} | {r['knnlm_ppl']:.2f} | "
                     f"{r['knnlm_cache_ppl']:.2f} |")
    kc = t["knn_cache"]
    lines += ["", f"Tuned on valid: cache alone θ={t['cache']['theta']}, μ={t['cache']['mu']}; kNN-LM alone "
                  f"λ={t['knn']['lmbda']}, T={t['knn']['temp']}; kNN-LM + cache λ={kc['lmbda']}, T={kc['temp']}, "
                  f"θ={kc['theta']}, μ={kc['mu']}.", ""]
    v, te = m["valid"], m["test"]
    helps = all(m[s]["cache_ppl"] < m[s]["base_ppl"] for s in splits)
    adds = all(m[s]["knnlm_cache_ppl"] < m[s]["knnlm_ppl"] for s in splits)
    lines += ["## Against the paper", "",
              "The paper (WikiText-103, Table 1): the cache improves on kNN-LM, 16.12 → 15.79 test perplexity, so "
              "the two are complementary: kNN retrieves from the training set, the cache from the local document.", "",
              f"- Cache alone lowers perplexity on both splits: **{'yes' if helps else 'no'}** (valid "
              f"{v['base_ppl']:.2f} → {v['cache_ppl']:.2f}, test {te['base_ppl']:.2f} → {te['cache_ppl']:.2f}).",
              f"- Cache on top of kNN-LM lowers it further (complementary): **{'yes' if adds else 'no'}** (valid "
              f"{v['knnlm_ppl']:.2f} → {v['knnlm_cache_ppl']:.2f}, test {te['knnlm_ppl']:.2f} → "
              f"{te['knnlm_cache_ppl']:.2f}).", "",
              "![ppl_vs_cache_weight.png](ppl_vs_cache_weight.png)", "", "## Commands and cost", "",
              "| stage | seconds | peak RSS (MB) | command |", "|---|---|---|---|"]
    for name, st in m["stages"].items():
        lines.append(f"| {name} | {st['seconds']} | {st['peak_rss_mb']} | `{st['command']}` |")
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli(main)
