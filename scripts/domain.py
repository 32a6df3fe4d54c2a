#!/usr/bin/env python
"""Domain adaptation by swapping the datastore (the paper's Table 4) on a folder of raw text documents.

An LM trained on Wikipedia scores held-out books with no datastore, with a datastore built from other books,
with its own Wikipedia training datastore, and with both at once; λ and T are tuned on valid by knnlm-sweep
and applied to test. make domain runs it; writes OUT/{metrics.json,report.md,ppl_vs_lmbda.png}, and the text,
binarized data, datastores, retrieval logs and stage logs to --work (not committed). The report template is domain_report.py.
"""
import argparse
import json
import os

from domain_report import PAPER, SPLITS, plot_lmbda, render
from knnlm_fairseq.core.durable import read_json, write_json_atomic
from knnlm_fairseq.core.textprep import count_oov, leading_paragraphs, load_dict_words
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import (machine, publish, render_to,
                                               versions)
from knnlm_fairseq.experiments.settings import add_run_settings, cli, window, with_eval_settings_in_grids
from knnlm_fairseq.experiments.stages import Stages




def get_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--books-dir", required=True, help="folder of .txt documents (the new domain)")
    p.add_argument("--checkpoint", required=True, help="the LM trained on the old domain (WikiText-2)")
    p.add_argument("--dict", help="its dict.txt (default: next to the checkpoint)")
    p.add_argument("--wiki-dstore", default="dstore/wikitext2/dstore",
                   help="the LM's training-data datastore, indexed (dumped and indexed here if missing)")
    p.add_argument("--wiki-data-bin", default="data-bin/wikitext-2", help="binarized training data, only to dump it")
    p.add_argument("--out", required=True, help="report directory (committed)")
    p.add_argument("--work", required=True, help="text, data-bin, datastores, retrieval logs, stage logs")
    p.add_argument("--valid-docs", nargs="+", default=[], help="documents held out for valid (tuning)")
    p.add_argument("--test-docs", nargs="+", default=[], help="documents held out for test")
    p.add_argument("--valid-frac", type=float, default=0.1, help="without --valid-docs: fraction of documents")
    p.add_argument("--test-frac", type=float, default=0.1, help="without --test-docs: fraction of documents")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--heldout-tokens", type=int, default=0,
                   help="evaluate only the first whole paragraphs of valid and test holding this many tokens "
                        "(0: all): kNN-LM evaluation runs ~150-500 tokens/s on 2 shared CPU cores")
    add_run_settings(p, knn_temp=10.0, temps=[1.0, 3.0, 10.0, 30.0, 100.0])  # T 100: a best 30 is interior
    p.add_argument("--no-both", action="store_true", help="skip the books+wiki datastore (knnlm-merge-dstore)")
    p.add_argument("--reuse", action="store_true", help="keep what an earlier run of the same stages left in --work")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT/report.md from OUT/metrics.json")
    return p


def heldout(text_dir, split, max_tokens, dict_path):
    """The split's text to evaluate (all of it, or its first whole paragraphs holding >= max_tokens tokens) written
    to TEXT/SPLIT.eval.tokens, and what it holds in TEXT/SPLIT.eval.json (written last)."""
    with open(os.path.join(text_dir, f"{split}.tokens"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = leading_paragraphs(lines, max_tokens)
    with open(os.path.join(text_dir, f"{split}.eval.tokens"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in kept)
    n, oov, _ = count_oov(kept, load_dict_words(dict_path))
    write_json_atomic(os.path.join(text_dir, f"{split}.eval.json"), {
        "paragraphs": len(kept), "tokens": n, "oov": oov, "oov_rate": round(oov / max(n, 1), 5),
        "cut": len(kept) < len(lines), "tokens_in_part": sum(len(line.split()) for line in lines)})


def main(argv=None):
    a = with_eval_settings_in_grids(get_parser().parse_args(argv))
    if a.render_only:
        render_to(a.out, render)
        return 0
    a.dict = a.dict or os.path.join(os.path.dirname(a.checkpoint), "dict.txt")
    text, data, books = (os.path.join(a.work, d) for d in ("text", "data-bin", "books"))
    stages = Stages(a.work, a.reuse)
    print(f"settings: {vars(a)}", flush=True)
    # 1. text -> WikiText-style tokens, whole documents per part; 2. binarize the held-out prefixes with the LM's dict
    held = (["--valid-docs", *a.valid_docs] if a.valid_docs else []) + (["--test-docs", *a.test_docs] if a.test_docs else [])
    stages.run("prepare", C.prepare_text(a.books_dir, a.dict, text, [*held, "--valid-frac", a.valid_frac, "--test-frac",
                                                                     a.test_frac, "--seed", a.seed]))
    for split in SPLITS:
        stages.call(f"heldout_{split}", C.in_process(
            ["first paragraphs of", f"{text}/{split}.tokens", "holding", a.heldout_tokens, "tokens"],
            os.path.join(text, f"{split}.eval.json"), [os.path.join(text, f"{split}.eval.tokens")],
            [os.path.join(text, "prep.json")]), lambda s=split: heldout(text, s, a.heldout_tokens, a.dict))
    stages.run("preprocess", C.preprocess(a.dict, data, trainpref=os.path.join(text, "dstore.tokens"),
                                          **{f"{s}pref": os.path.join(text, f"{s}.eval.tokens") for s in SPLITS}))
    # 3. the Books datastore (the dstore part is fairseq's "train" split), the Wiki one (kept if there), both merged
    dstores = {"books": books, "wiki": a.wiki_dstore}
    for name, data_bin in (("books", data), ("wiki", a.wiki_data_bin)):
        keep = name == "wiki"  # make wikitext2's datastore and index: made here only if missing, never replaced
        stages.run(f"dump_{name}", C.dump(*window(a, data_bin, a.checkpoint, "train", dump=True), dstore=dstores[name]),
                   keep=keep)
        stages.run(f"index_{name}", C.build_index(dstores[name], a.factory, a.train_size), keep=keep)
    if not a.no_both:
        dstores["both"] = os.path.join(a.work, "both")
        stages.run("merge", C.merge_dstore(dstores["both"], [books, a.wiki_dstore]))
        stages.run("index_both", C.build_index(dstores["both"], a.factory, a.train_size))
    # 4. base LM, then each datastore with a retrieval log per split; 5. tune λ, T on valid, apply to test
    evals = {f"base_{s}": C.eval_numbers(stages.run(f"base_{s}", C.base_eval(*window(a, data, a.checkpoint, s))))
             for s in SPLITS}
    sweeps = {}
    for name, dstore in dstores.items():
        logs = [os.path.join(a.work, f"retrieval-{name}-{s}") for s in SPLITS]
        for s, log in zip(SPLITS, logs):
            evals[f"knnlm_{name}_{s}"] = C.eval_numbers(stages.run(f"knnlm_{name}_{s}", C.knn_eval(
                *window(a, data, a.checkpoint, s), dstore=dstore, k=a.k, lmbda=a.lmbda, temp=a.knn_temp, probe=a.probe,
                retrieval_log=log)))
        out = os.path.join(a.work, f"sweep-{name}.json")
        stages.run(f"sweep_{name}", C.sweep(logs, out, a.lmbdas, [a.k], a.temps))
        sweeps[name] = read_json(out, "run the sweep again")
    metrics = collect(a, read_json(os.path.join(text, "prep.json"), "prepare the text again"), evals, sweeps, dstores)
    metrics["stages"] = stages.done
    metrics["heldout"] = {s: read_json(os.path.join(text, f"{s}.eval.json"), "cut again") for s in SPLITS}
    metrics["plots"] = [plot_lmbda(sweeps, a.out)]
    publish(a.out, metrics, render)
    return 0


def collect(a, prep, evals, sweeps, dstores):
    m = {"title": "Domain adaptation by swapping the datastore (WikiText-2 LM on books)", "paper": PAPER,
         "prep": {p: {k: v for k, v in d.items() if k != "top_oov"} | {"top_oov": d["top_oov"][:8]}
                  for p, d in prep["parts"].items()},
         "documents": {n: d["tokens"] for n, d in prep["documents"].items()}, "datastores": {}, "results": {},
         "note": None}
    for name, d in dstores.items():
        man, idx = read_json(os.path.join(d, "manifest.json"), "dump again"), read_json(
            os.path.join(d, C.INDEX_FILE + ".json"), "index again")
        m["datastores"][name] = {"path": os.path.relpath(os.path.abspath(d), C.ROOT), "n": man["count"],
                                 "index": idx.get("factory_used", idx.get("factory"))}
    m["model"] = {"layers": read_json(os.path.join(a.wiki_dstore, "manifest.json"), "").get("decoder_layers"),
                  "dim": read_json(os.path.join(a.wiki_dstore, "manifest.json"), "")["dim"]}
    for i, split in enumerate(SPLITS):
        base = evals[f"base_{split}"]
        row = {"tokens": base["tokens"], "base": base["ppl"], "base_tok_s": base["tok_s"]}
        for name, sw in sweeps.items():
            row[name] = {kind: {"ppl": round(sw["logs"][i]["tuned"][kind], 2), "lmbda": sw["tuned"][kind]["lmbda"],
                                "temp": sw["tuned"][kind]["temp"]} for kind in ("exact", "approx")}
            row[name].update(eval_lm_fixed=evals[f"knnlm_{name}_{split}"]["ppl"], tok_s=evals[f"knnlm_{name}_{split}"]["tok_s"])
            assert round(sw["logs"][i]["base_ppl"], 1) == round(base["ppl"], 1), (name, split, "base ppl differs")
        m["results"][split] = row
    t = m["results"]["test"]
    m["effect"] = {"books_beats_wiki_on_test": t["books"]["exact"]["ppl"] < t["wiki"]["exact"]["ppl"],
                   "books_lmbda_larger": t["books"]["exact"]["lmbda"] > t["wiki"]["exact"]["lmbda"],
                   "books_gain_test": round(1 - t["books"]["exact"]["ppl"] / t["base"], 6),
                   "wiki_gain_test": round(1 - t["wiki"]["exact"]["ppl"] / t["base"], 6),
                   "paper_gain_test": round(1 - PAPER["books_dstore_test"] / PAPER["base_test"], 4)}
    wt2 = os.path.join(C.ROOT, "results", "wikitext2", "metrics.json")
    if os.path.exists(wt2):  # the same LM and Wiki datastore in domain, for the λ contrast
        w = json.load(open(wt2))["test"]
        m["in_domain_wikitext2_test"] = {"base": w["base_ppl"], "knnlm_exact": w["knnlm_ppl_exact"],
                                         "lmbda": w["best_lmbda"], "temp": w["best_temp"]}
    m["settings"], m["machine"], m["versions"] = dict(vars(a)), machine(), versions("sacremoses")
    return m


if __name__ == "__main__":
    cli(main)
