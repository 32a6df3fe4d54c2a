#!/usr/bin/env python
"""The paper's Table 1 rows with a continuous cache: base, +cache, +kNN, +kNN+cache on valid and test.

Runs one base-LM pass per split that records the cache (fairseq-eval-lm --cache-size N --save-cache DIR), then
knnlm-sweep combines those logs with `make wikitext2`'s retrieval logs (same splits, same eval settings):
cache weight μ and θ tuned on valid alone and on top of kNN-LM (λ re-tuned with them), applied to test.
Writes OUT/metrics.json, OUT/report.md and OUT/ppl_vs_cache_weight.png.
"""
import argparse
import os
import sys

import numpy as np

from knnlm_fairseq.core.durable import read_json
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import line_panels, prose, publish, stage_rows, table, versions
from knnlm_fairseq.experiments.settings import cli, floats
from knnlm_fairseq.experiments.stages import Stages

PAPER = {"knnlm_test": 16.12, "knnlm_cache_test": 15.79, "source": "Khandelwal et al. 2020, Table 1 (WikiText-103)"}


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
    knn_sweep = read_json(os.path.join(a.knn_work, "sweep.json"), "run make wikitext2 again")
    k, temps = knn_sweep["settings"]["ks"][-1], knn_sweep["settings"]["temps"]
    stages, evals = Stages(a.work, a.reuse), {}
    clogs = [os.path.join(a.work, f"cache-{s}") for s in splits]
    for split, clog in zip(splits, clogs):
        ev = (a.data_bin, a.checkpoint, split, a.eval_tokens_per_sample, a.eval_context_window, a.max_tokens,
              a.device.split())
        evals[split] = C.eval_numbers(stages.run(f"cache_log_{split}", C.cache_eval(
            *ev, cache_log=clog, size=a.cache_size, thetas=a.thetas)))
    out_json = os.path.join(a.work, "sweep.json")
    stages.run("sweep", C.sweep(rlogs, out_json, floats(a.lmbdas), [k], temps, extra=["--kinds", "exact", "--mus", a.mus],
                                cache_logs=clogs))
    sw = read_json(out_json, "run the sweep again")
    c = sw["cache"]
    metrics = {"settings": vars(a) | {"k": k, "kind": "exact"}, "tuned": c["tuned"], "stages": stages.done,
               "versions": versions(), "paper": PAPER}
    for split, row, crow in zip(splits, sw["logs"], c["logs"]):
        metrics[split] = {"n_tokens": row["n_tokens"], "base_ppl": round(row["base_ppl"], 2),
                          "cache_ppl": round(crow["cache"], 2), "knnlm_ppl": round(row["tuned"]["exact"], 2),
                          "knnlm_cache_ppl": round(crow["knn_cache"], 2), "cache_pass_tok_s": evals[split]["tok_s"]}
    metrics["plots"] = [plot(c, splits, a.out)]
    publish(a.out, metrics, render)
    return 0


def plot(c, splits, out_dir):
    mus, thetas, t = c["mus"], c["thetas"], c["tuned"]
    t_c, t_kc = thetas.index(t["cache"]["theta"]), thetas.index(t["knn_cache"]["theta"])
    panels = [{"title": split, "xlabel": "cache weight μ", "lines": [
        {"x": mus, "y": np.array(row["cache_grid"])[t_c], "label": f"LM + cache (θ={thetas[t_c]})"},
        {"x": mus, "y": np.array(row["knn_cache_grid_at_tuned_lmbda"])[t_kc], "fmt": "-s",
         "label": f"kNN-LM + cache (λ={t['knn_cache']['lmbda']}, θ={thetas[t_kc]})"}]} for row, split in zip(c["logs"], splits)]
    return line_panels(os.path.join(out_dir, "ppl_vs_cache_weight.png"), "perplexity vs cache weight (θ, λ tuned on valid)",
                       panels)


def render(m):
    t, st, p, splits = m["tuned"], m["settings"], m["paper"], ["valid", "test"]
    kc, v, te = t["knn_cache"], m["valid"], m["test"]
    helps = all(m[s]["cache_ppl"] < m[s]["base_ppl"] for s in splits)
    adds = all(m[s]["knnlm_cache_ppl"] < m[s]["knnlm_ppl"] for s in splits)
    return "\n".join([
        "# Continuous cache on WikiText-2 (this CPU)", "",
        prose("The continuous cache of Grave et al. (2017) over the last {size} positions of the block being scored "
              "(context window included; states: the last block's output), interpolated as p = (1 − μ)·p_kNN-LM + "
              "μ·p_cache. The kNN-LM rows reuse `make wikitext2`'s datastore and retrieval logs (exact distances, "
              "k={k}). Everything is tuned on valid by `knnlm-sweep --cache-logs` and applied unchanged to test.",
              size=st["cache_size"], k=st["k"]), "",
        table(["split", "tokens", "base LM", "+ cache", "+ kNN", "+ kNN + cache"],
              [[s, f"{m[s]['n_tokens']:,}"] + [f"{m[s][x]:.2f}" for x in ("base_ppl", "cache_ppl", "knnlm_ppl",
                                                                            "knnlm_cache_ppl")] for s in splits]), "",
        prose("Tuned on valid: cache alone θ={ct}, μ={cm}; kNN-LM alone λ={kl}, T={kt}; kNN-LM + cache λ={l}, T={T}, "
              "θ={th}, μ={mu}.", ct=t["cache"]["theta"], cm=t["cache"]["mu"], kl=t["knn"]["lmbda"], kt=t["knn"]["temp"],
              l=kc["lmbda"], T=kc["temp"], th=kc["theta"], mu=kc["mu"]), "",
        "## Against the paper", "",
        prose("The paper (WikiText-103, Table 1): the cache improves on kNN-LM, {a} → {b} test perplexity, so the two "
              "are complementary: kNN retrieves from the training set, the cache from the local document.",
              a=p["knnlm_test"], b=p["knnlm_cache_test"]), "",
        prose("- Cache alone lowers perplexity on both splits: **{yes}** (valid {vb:.2f} → {vc:.2f}, test {tb:.2f} → "
              "{tc:.2f}).", yes="yes" if helps else "no", vb=v["base_ppl"], vc=v["cache_ppl"], tb=te["base_ppl"],
              tc=te["cache_ppl"]),
        prose("- Cache on top of kNN-LM lowers it further (complementary): **{yes}** (valid {vb:.2f} → {vc:.2f}, test "
              "{tb:.2f} → {tc:.2f}).", yes="yes" if adds else "no", vb=v["knnlm_ppl"], vc=v["knnlm_cache_ppl"],
              tb=te["knnlm_ppl"], tc=te["knnlm_cache_ppl"]), "",
        "![ppl_vs_cache_weight.png](ppl_vs_cache_weight.png)", "", "## Commands and cost", "",
        table(["stage", "seconds", "peak RSS (MB)", "command"], stage_rows(m["stages"])), "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""])


if __name__ == "__main__":
    cli(main)
