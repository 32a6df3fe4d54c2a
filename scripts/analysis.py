#!/usr/bin/env python
"""make analysis: does kNN-LM help most on rare patterns, as the paper says? Per-token gains on valid grouped by
the target's frequency in the datastore's text and by kind of word, and the largest gains and losses with their
neighbours. Reads make wikitext2's valid retrieval log (records it when missing); writes OUT/metrics.json,
OUT/report.md and OUT/*.png.
"""
import argparse
import os

import numpy as np

from knnlm_fairseq.core.contexts import SourceText
from knnlm_fairseq.core.databin import read_symbols
from knnlm_fairseq.core.datastore import Datastore
from knnlm_fairseq.core.retrieval_log import RetrievalLog
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import publish, versions
from knnlm_fairseq.experiments.settings import add_run_settings, cli, window
from knnlm_fairseq.experiments.stages import Stages
from knnlm_fairseq.inspect.analysis import FREQ_EDGES, by_group, freq_bucket, freq_labels, word_kind
from knnlm_fairseq.inspect.data import token_scores
from analysis_report import plot, render

KINDS = ("name", "number", "other", "punctuation")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-bin", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dstore", required=True, help="make wikitext2's datastore (kept as it is; dumped if missing)")
    p.add_argument("--log", required=True, help="make wikitext2's valid retrieval log (recorded if missing)")
    p.add_argument("--out", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--knn-dist", default="exact", choices=["exact", "approx"])
    p.add_argument("--examples", type=int, default=10, help="largest gains and losses shown, each")
    add_run_settings(p, lmbda=0.25, knn_temp=10.0)
    return p


def main(argv=None):
    a = get_parser().parse_args(argv)
    stages = Stages(a.work, reuse=True)
    stages.run("dump", C.dump(*window(a, a.data_bin, a.checkpoint, "train", dump=True), dstore=a.dstore), keep=True)
    stages.run("index", C.build_index(a.dstore, a.factory, a.train_size), keep=True)
    stages.run("record", C.knn_eval(*window(a, a.data_bin, a.checkpoint, a.split), dstore=a.dstore, k=a.k,
                                    lmbda=a.lmbda, temp=a.knn_temp, probe=a.probe, dist="exact",
                                    retrieval_log=a.log), keep=True)
    log, dstore = RetrievalLog(a.log), Datastore.open(a.dstore)
    symbols = read_symbols(os.path.join(a.data_bin, "dict.txt"))
    s = dict(token_scores(log, a.knn_dist, a.k, a.knn_temp, a.lmbda, slice(0, log.count)), temp=a.knn_temp,
             lmbda=a.lmbda)
    counts = np.bincount(np.asarray(dstore.vals), minlength=len(symbols))  # each word's count in the datastore
    words = [symbols[t] for t in s["target"]]
    freq = by_group(s["p_lm"], s["p"], freq_bucket(counts, s["target"]), range(len(FREQ_EDGES) + 1))
    for row, label in zip(freq, freq_labels()):
        row["group"] = label
    kinds = by_group(s["p_lm"], s["p"], word_kind(words), KINDS)
    order = np.argsort(s["gain"])
    picks = {"gains": order[::-1][: a.examples].tolist(), "losses": order[: a.examples].tolist()}
    source = SourceText(dstore)
    examples = {name: [example(log, s, i, source, symbols, words, a.knn_dist) for i in idx]
                for name, idx in picks.items()}
    metrics = {"split": a.split, "tokens": log.count, "dstore": {"count": dstore.count, "split": dstore.manifest["split"]},
               "settings": {"k": a.k, "lmbda": a.lmbda, "knn_temp": a.knn_temp, "knn_dist": a.knn_dist},
               "base_ppl": float(np.exp(-np.log(s["p_lm"]).mean())), "knnlm_ppl": float(np.exp(-np.log(s["p"]).mean())),
               "freq_edges": list(FREQ_EDGES), "by_frequency": freq, "by_kind": kinds, "examples": examples,
               "stages": stages.done, "versions": versions()}
    metrics["plots"] = plot(metrics, a.out)
    publish(a.out, metrics, render)
    return 0


def example(log, s, i: int, source, symbols, words, kind: str, shown: int = 3, left: int = 12):
    """Token i with the words before it and its nearest neighbours' contexts (the value in brackets), as text."""
    weights = token_scores(log, kind, log.k, s["temp"], s["lmbda"], slice(i, i + 1), with_weights=True)["weights"][0]
    dists = np.asarray(getattr(log, f"dist_{kind}")[i])
    nbs = []
    for j in np.argsort(dists, kind="stable")[:shown]:  # nearest by the distances p_kNN uses
        row = int(log.ids[i, j])
        if row < 0:
            break
        ctx, at = source.context(row, left, 3)
        nbs.append({"value": symbols[int(log.vals[i, j])], "dist": float(dists[j]),
                    "weight": float(weights[j]),
                    "context": " ".join(f"[{symbols[c]}]" if n == at else symbols[c] for n, c in enumerate(ctx))})
    return {"index": i, "word": words[i], "before": " ".join(words[max(0, i - left) : i]),
            "p_lm": float(s["p_lm"][i]), "p_knn": float(s["p_knn"][i]), "p": float(s["p"][i]),
            "gain": float(s["gain"][i]), "neighbours": nbs}


if __name__ == "__main__":
    cli(main)
