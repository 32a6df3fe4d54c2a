#!/usr/bin/env python
"""Which representation makes the best key: the kNN-LM paper's Table 5 on a fixed WikiText-2 subset.

For every key type (`--knn-keytype`): dump a train datastore, build an index, evaluate valid once with
`--save-retrieval` (the log holds the LM's log-probs and both distance kinds), then `knnlm-sweep` tunes
λ and T on that same valid log. Valid is tuned and reported, like the paper's Table 5 (dev).

A full-train dump per key type does not fit a CPU budget, so every key type uses the same subset: the
first --train-articles fraction of train articles and a by-article prefix of valid of >= --valid-tokens.
Each key type's stages live in WORK/<key type>/, so `--reuse` resumes (a changed λ/T grid reruns only the sweep).
Writes OUT/metrics.json, OUT/report.md and OUT/ppl_by_keytype.png (the report template: keytypes_report.py).
"""
import argparse
import json
import os
import sys

import numpy as np
from keytypes_report import PAPER, plot, ranking_sentence, render

from knnlm_fairseq.core.durable import read_json, write_json_atomic
from knnlm_fairseq.core.keys import KEY_TYPES
from knnlm_fairseq.core.subsets import leading_articles, read_articles, write_articles
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import machine, publish, versions
from knnlm_fairseq.experiments.settings import add_run_settings, cli, window, with_eval_settings_in_grids
from knnlm_fairseq.experiments.stages import Stages


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw-dir", required=True, help="WikiText-2 text: wiki.train.tokens, wiki.valid.tokens")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dict", help="the checkpoint's dictionary (default: dict.txt beside it)")
    p.add_argument("--out", required=True, help="report directory (committed)")
    p.add_argument("--work", required=True, help="subset, datastores, indexes, retrieval logs, logs (not committed)")
    p.add_argument("--keytypes", default=",".join(KEY_TYPES), help="comma-separated, in report order")
    p.add_argument("--train-articles", type=float, default=0.05, help="fraction of train articles (a prefix)")
    p.add_argument("--valid-tokens", type=int, default=15_000, help="valid prefix: whole articles up to >= this")
    add_run_settings(p, train_size=50_000, knn_temp=10.0, temps=[1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
                     lmbdas=[i / 100 for i in range(10)] + [round(0.05 * i, 2) for i in range(2, 19)])
    p.add_argument("--reuse", action="store_true", help="keep the subset and every key type already finished")
    return p


def write_subset(a, raw):
    """Leading whole articles of train and valid as text; RAW/subset.json (written last) says what they hold."""
    info = {}
    for split in ("train", "valid"):
        src = os.path.join(a.raw_dir, f"wiki.{split}.tokens")
        arts = read_articles(src)
        keep = leading_articles(arts, count=int(a.train_articles * len(arts))) if split == "train" else \
            leading_articles(arts, min_tokens=a.valid_tokens)
        info[split] = dict(write_articles(arts, keep, os.path.join(raw, f"{split}.txt")), source=os.path.abspath(src))
    write_json_atomic(os.path.join(raw, "subset.json"), info)


def run_keytype(a, kt, data):
    """Dump, index, one valid pass with a retrieval log, sweep: the key type's row of the table."""
    work = os.path.join(a.work, kt)
    dstore, rlog, sweep_json = (os.path.join(work, x) for x in ("dstore", "retrieval-valid", "sweep.json"))
    stages = Stages(work, a.reuse)
    stages.run("dump", C.dump(*window(a, data, a.checkpoint, "train", dump=True), dstore=dstore, keytype=kt))
    stages.run("index", C.build_index(dstore, a.factory, a.train_size))
    ev = C.eval_numbers(stages.run("knnlm_valid", C.knn_eval(
        *window(a, data, a.checkpoint, "valid"), dstore=dstore, k=a.k, lmbda=a.lmbda, temp=a.knn_temp, probe=a.probe,
        retrieval_log=rlog, keytype=kt)))
    stages.run("sweep", C.sweep([rlog], sweep_json, a.lmbdas, [a.k], a.temps))
    sweep, manifest = read_json(sweep_json, "sweep again"), read_json(os.path.join(dstore, "manifest.json"), "dump again")
    row, s = sweep["logs"][0], sweep["settings"]
    grid = {kind: np.array(row["ppl"][kind])[0] for kind in ("exact", "approx")}  # (T, L) at the one k
    res = {"key_type": kt, "dim": manifest["dim"], "n_keys": manifest["count"], "manifest_key_type": manifest["key_type"],
           "decoder_layers": manifest.get("decoder_layers"),
           "index": read_json(os.path.join(dstore, C.INDEX_FILE + ".json"), "index again")["factory_used"],
           "base_ppl": round(row["base_ppl"], 2), "n_tokens": row["n_tokens"], "eval_lm_ppl_exact": ev["ppl"],
           "eval_lm_tok_s": ev["tok_s"], "sweep_at_eval_settings_exact": round(float(
               grid["exact"][s["temps"].index(a.knn_temp), s["lmbdas"].index(a.lmbda)]), 2),
           "temps": s["temps"], "lmbdas": s["lmbdas"],
           "grid": {kind: np.round(g, 3).tolist() for kind, g in grid.items()},  # (T, λ), to re-tune or plot
           "stages": stages.done, "seconds": round(sum(st["seconds"] or 0 for st in stages.done.values()), 1)}
    for kind in ("exact", "approx"):
        b = sweep["tuned"][kind]
        res[kind] = {"ppl": round(b["ppl"], 2), "lmbda": b["lmbda"], "temp": b["temp"],
                     "at_grid_edge": b["temp"] == max(s["temps"]) or b["lmbda"] == max(s["lmbdas"])}
    return res


def main(argv=None):
    a = with_eval_settings_in_grids(get_parser().parse_args(argv))
    a.dict = a.dict or os.path.join(os.path.dirname(a.checkpoint), "dict.txt")
    a.keytypes = a.keytypes.split(",")
    unknown = [kt for kt in a.keytypes if kt not in KEY_TYPES]
    if unknown:
        sys.exit(f"keytypes.py: error: unknown key type '{unknown[0]}'; choose from {', '.join(KEY_TYPES)}")
    print(f"settings: {vars(a)}", flush=True)
    raw, data, stages = os.path.join(a.work, "raw"), os.path.join(a.work, "data-bin"), Stages(a.work, a.reuse)
    texts = [os.path.join(a.raw_dir, f"wiki.{s}.tokens") for s in ("train", "valid")]
    stages.call("subset", C.in_process(["leading articles: train", a.train_articles, "valid >=", a.valid_tokens, *texts],
                                       os.path.join(raw, "subset.json"), [raw], texts), lambda: write_subset(a, raw))
    stages.run("preprocess", C.preprocess(a.dict, data, trainpref=os.path.join(raw, "train.txt"),
                                          validpref=os.path.join(raw, "valid.txt")))
    subset = read_json(os.path.join(raw, "subset.json"), "cut the subset again") | {"preprocess": stages.done["preprocess"]}
    rows = []
    for kt in a.keytypes:
        rows.append(run_keytype(a, kt, data))
        r = rows[-1]
        print(f"{kt}: dim {r['dim']}, {r['n_keys']:,} keys, base {r['base_ppl']:.2f}, exact {r['exact']['ppl']:.2f} "
              f"(λ {r['exact']['lmbda']}, T {r['exact']['temp']}), approx {r['approx']['ppl']:.2f}", flush=True)
    bases = {r["base_ppl"] for r in rows}
    assert len(bases) == 1, f"the base LM differs between key types' passes: {bases}"
    wt2 = os.path.join(C.ROOT, "results", "wikitext2", "metrics.json")  # what full-size runs cost on this machine
    full = json.load(open(wt2))["stages"] if os.path.exists(wt2) else {}
    m = {"title": "kNN-LM key types on WikiText-2 (the paper's Table 5, CPU subset)", "base_ppl": bases.pop(),
         "subset": subset, "keytypes": rows, "paper": PAPER, "machine": machine(),
         "model": {"layers": rows[0]["decoder_layers"], "dim": rows[0]["dim"]},
         "full_run": {"dump_s": full.get("dump", {}).get("seconds"),
                      "valid_pass_s": full.get("knnlm_exact_valid", {}).get("seconds")},
         "best_exact": min(rows, key=lambda r: r["exact"]["ppl"])["key_type"],
         "best_approx": min(rows, key=lambda r: r["approx"]["ppl"])["key_type"],
         "total_seconds": round(sum(s["seconds"] or 0 for s in stages.done.values()) + sum(r["seconds"] for r in rows), 1),
         "reused": any(s["reused"] for r in [{"stages": stages.done}, *rows] for s in r["stages"].values()),
         "settings": {k: v for k, v in vars(a).items() if k != "keytypes"}, "versions": versions()}
    m["ranking"] = ranking_sentence(m)
    m["plot"] = plot(rows, m["base_ppl"], a.out)
    publish(a.out, m, render)
    return 0


if __name__ == "__main__":
    cli(main)
