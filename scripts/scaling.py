#!/usr/bin/env python
"""Retrieval vs training on WikiText-2: the shape of the kNN-LM paper's Table 3 and Figure 2 on a 2-core CPU.

Table 3: a model trained on 10% of train plus a datastore over 100% of train, against the model trained on 100%.
Figure 2: perplexity (and the best λ) as the datastore grows over 10%, 25%, 50%, 100% of train.
Train subsets are whole articles, binarized with the shipped dictionary so every model and datastore share ids.
Writes OUT/{metrics.json,report.md,ppl_vs_dstore_size.png}; subsets, checkpoints, datastores, indexes, retrieval
logs and stage logs go to --work (not committed). The report template is scaling_report.py.
"""
import argparse
import json
import os

from scaling_report import FULL, PAPER, plot, render

from knnlm_fairseq.core.durable import read_json, write_json_atomic
from knnlm_fairseq.core.retrieval_log import truncate_log
from knnlm_fairseq.core.subsets import article_subset, leading_articles, read_articles, subset_rows, write_articles
from knnlm_fairseq.core.writer import slice_datastore
from knnlm_fairseq.experiments import commands as C
from knnlm_fairseq.experiments.report import machine, publish, versions
from knnlm_fairseq.experiments.settings import add_run_settings, cli, ints, window
from knnlm_fairseq.experiments.stages import Stages

SPLITS = ("valid", "test")
PREFIX_CHECK_PPL = 0.05  # a log cut to a prefix must give eval-lm's base perplexity on that prefix, to this much


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--raw", required=True, help="WikiText-2 text: wiki.{train,valid,test}.tokens")
    p.add_argument("--data-bin", required=True, help="WikiText-2 binarized with the shipped dictionary")
    p.add_argument("--checkpoint", required=True, help="the 100%% model (the shipped wt2-small)")
    p.add_argument("--dict", required=True, help="the shipped dict.txt: every subset is binarized with it")
    p.add_argument("--full-dstore", required=True, help="the 100%% model's datastore over 100%% of train, indexed")
    p.add_argument("--full-logs", required=True, help="its retrieval logs: DIR with retrieval-valid, retrieval-test")
    p.add_argument("--out", required=True, help="report directory (committed)")
    p.add_argument("--work", required=True, help="subsets, checkpoints, datastores, logs (not committed)")
    p.add_argument("--fractions", type=ints, default=[10, 25, 50],
                   help="train subsets in percent; the first one trains the small model")
    p.add_argument("--eval-fraction", type=float, default=1.0,
                   help="evaluate a prefix of whole articles of valid and test holding this fraction of tokens")
    p.add_argument("--small-dstores", type=ints, default=[10, 100],
                   help="datastores for the 10%% model, in percent of train (each dumped with it)")
    p.add_argument("--small-checkpoint", help="use this 10%% model instead of training one")
    p.add_argument("--seed", type=int, default=1, help="article order of the subsets")
    p.add_argument("--parts", default="table,figure", help="table: the 10%% model rows; figure: datastore sizes")
    p.add_argument("--figure-splits", type=lambda t: t.split(","), default=["valid", "test"],
                   help="splits for the datastore-size curve ('valid' alone halves its cost)")
    add_run_settings(p, knn_temp=10.0, temps=[1.0, 3.0, 10.0, 30.0])
    p.add_argument("--note", default="", help="a paragraph for the report: the machine, what was cut and why")
    p.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of every stage (0: library default)")
    p.add_argument("--reuse", action="store_true", help="keep what an earlier run of the same stages left in --work")
    return p


class Scaling:
    """The experiment's stages; every path lives under --work."""

    def __init__(self, a):
        self.a, self.stages = a, Stages(a.work, a.reuse)
        self.tag = "" if a.eval_fraction >= 1 else f"_p{round(a.eval_fraction * 100)}"

    def path(self, *parts):
        return os.path.join(self.a.work, *parts)

    def text(self, name, write, src, how):
        """An in-process text step: write(info_path) writes TEXT/NAME.tokens from src and, last, TEXT/NAME.json."""
        commit = self.path("text", f"{name}.json")
        self.stages.call(name, C.in_process([f"write {name} from", src, how], commit, [commit, commit[:-5] + ".tokens"],
                                            [src]), lambda: write(commit))
        return read_json(commit, "write it again")

    def subsets(self):
        """Article subsets of train, each binarized with the shipped dictionary (valid and test unchanged)."""
        a, src, out = self.a, os.path.join(self.a.raw, "wiki.train.tokens"), {}
        for pct in a.fractions:
            def write(commit, pct=pct):
                arts = read_articles(src)
                info = write_articles(arts, article_subset(arts, pct / 100, a.seed), commit[:-5] + ".tokens")
                write_json_atomic(commit, dict(info, fraction_asked=pct / 100))
            info = self.text(f"train{pct}", write, src, f"(articles in seed {a.seed} order, {pct}% of tokens)")
            dest = self.path("bin", f"train{pct}")
            raw = {f"{s}pref": os.path.join(a.raw, f"wiki.{s}.tokens") for s in SPLITS}
            self.stages.run(f"preprocess_train{pct}", C.preprocess(a.dict, dest, trainpref=self.path(
                "text", f"train{pct}.tokens"), **raw))
            out[str(pct)] = dict(info, data_bin=dest)
        return out

    def eval_data(self):
        """Valid and test as evaluated: the full splits, or (--eval-fraction < 1) a prefix of whole articles."""
        a = self.a
        if a.eval_fraction >= 1:
            return {"data_bin": a.data_bin, "fraction": 1.0}
        info = {"fraction_asked": a.eval_fraction}
        for split in SPLITS:
            src = os.path.join(a.raw, f"wiki.{split}.tokens")

            def write(commit, src=src):
                arts = read_articles(src)
                write_json_atomic(commit, write_articles(arts, leading_articles(arts, fraction=a.eval_fraction),
                                                         commit[:-5] + ".tokens"))
            info[split] = self.text(f"{split}_prefix{self.tag}", write, src, f"(leading articles, {a.eval_fraction} of tokens)")
        dest = self.path("bin", f"eval_prefix{self.tag}")
        self.stages.run(f"preprocess_eval_prefix{self.tag}", C.preprocess(a.dict, dest, **{
            f"{s}pref": self.path("text", f"{s}_prefix{self.tag}.tokens") for s in SPLITS}))
        return dict(info, data_bin=dest)

    def evaluate(self, data, ckpt, split, name, dstore=None):
        """Base LM (dstore None) or kNN-LM with a retrieval log at WORK/retrieval/NAME+TAG; eval-lm's numbers."""
        a, name = self.a, name + self.tag  # runs on another prefix are other stages
        if dstore is None:  # stock task; --user-dir registers knnlm_wt2_small, the 10% model's arch
            return C.eval_numbers(self.stages.run(name, C.base_eval(*window(a, data, ckpt, split)).nice()))
        return C.eval_numbers(self.stages.run(name, C.knn_eval(
            *window(a, data, ckpt, split), dstore=dstore, k=a.k, lmbda=a.lmbda, temp=a.knn_temp, probe=a.probe,
            retrieval_log=self.path("retrieval", name)).nice()))

    def sweep(self, name, logs):
        """knnlm-sweep: tune (T, λ) on the first log (valid) at k = --k, apply to the rest (test)."""
        out = self.path("sweeps", f"{name}{self.tag}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.stages.run(f"sweep_{name}{self.tag}", C.sweep(logs, out, self.a.lmbdas, [self.a.k], self.a.temps))
        return read_json(out, "sweep again")

    def datastore_row(self, data, ckpt, model, pct, dstore, splits, ref_temp):
        """Index MODEL's datastore over PCT% of train, evaluate on `splits`, sweep: a row of the table or figure."""
        self.stages.run(f"index_{model}_{pct}", C.build_index(dstore, self.a.factory, self.a.train_size))
        meta = read_json(os.path.join(dstore, C.INDEX_FILE + ".json"), "index again")
        for s in splits:
            self.evaluate(data, ckpt, s, f"{model}_dstore{pct}_{s}", dstore)
        logs = [self.path("retrieval", f"{model}_dstore{pct}_{s}{self.tag}") for s in splits]
        return dict(summarize(self.sweep(f"{model}_dstore{pct}", logs), self.a.k, ref_temp),
                    dstore_tokens=meta["ntotal"], index=meta["factory_used"])


def summarize(sweep, k, ref_temp=None):
    """Valid-tuned (T, λ) at k and the perplexities it gives on every log; best λ at a fixed T as well."""
    s, out = sweep["settings"], {"tuned": {}, "logs": []}
    for kind in s["kinds"]:
        t = sweep["tuned"][kind]
        assert t["k"] == k, "the sweep was run on one k"
        out["tuned"][kind] = {"temp": t["temp"], "lmbda": t["lmbda"]}
    if ref_temp is not None:  # the λ trend without the confound of T changing with the datastore
        grid = sweep["logs"][0]["ppl"]["exact"][s["ks"].index(k)][s["temps"].index(ref_temp)]  # (L,)
        m = min(range(len(grid)), key=grid.__getitem__)
        out["fixed_temp"] = {"temp": ref_temp, "lmbda": s["lmbdas"][m], "ppl": round(grid[m], 2)}
    for row in sweep["logs"]:
        out["logs"].append({"split": row["split"], "n_tokens": row["n_tokens"], "base_ppl": round(row["base_ppl"], 2),
                            **{f"knnlm_ppl_{kind}": round(v, 2) for kind, v in row["tuned"].items()}})
    return out


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    if a.threads:  # one thread per process wastes less on a CPU other jobs oversubscribe (OpenMP barriers)
        os.environ.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    print(f"settings: {vars(a)}", flush=True)
    x, parts = Scaling(a), a.parts.split(",")
    subsets, ev = x.subsets(), x.eval_data()
    data, fig, table = ev["data_bin"], {}, {}
    # the 100% model over the full datastore: make wikitext2's retrieval logs, cut to the evaluated prefix
    logs = [os.path.join(a.full_logs, f"retrieval-{s}") for s in SPLITS]
    if a.eval_fraction < 1:
        cut = [x.path("retrieval", f"full_model_dstore{FULL}_{s}{x.tag}") for s in SPLITS]
        for s, src, dest in zip(SPLITS, logs, cut):
            x.stages.call(f"truncate_{s}{x.tag}", C.in_process(["truncate_log", src, dest, ev[s]["tokens"]], os.path.join(
                dest, "meta.json"), [dest], [os.path.join(src, "meta.json")]), lambda s=s, src=src, dest=dest:
                truncate_log(src, dest, ev[s]["tokens"]))
        logs = cut
    base_full = {s: x.evaluate(data, a.checkpoint, s, f"base_full_model_{s}") for s in SPLITS}
    full_sweep = x.sweep(f"full_model_dstore{FULL}", logs)
    ref_temp = full_sweep["tuned"]["exact"]["temp"]  # the other rows' best λ is also read at this T
    sw = summarize(full_sweep, a.k, ref_temp)
    for s, row in zip(SPLITS, sw["logs"]):  # the cut log must score the prefix as eval-lm does
        assert abs(row["base_ppl"] - base_full[s]["ppl"]) < PREFIX_CHECK_PPL, \
            f"{s}: truncated log base ppl {row['base_ppl']} != eval-lm on the prefix {base_full[s]['ppl']}"
    full_index = read_json(os.path.join(a.full_dstore, C.INDEX_FILE + ".json"), "run make wikitext2")
    fig[str(FULL)] = dict(sw, dstore_tokens=full_index["ntotal"], index=full_index["factory_used"])
    if "table" in parts:  # Table 3: the 10% model, alone and with datastores over 10% and 100% of train
        small = str(a.fractions[0])
        ckpt = a.small_checkpoint or os.path.join(a.work, "checkpoints", "wt2-small-10pct", "checkpoint_best.pt")
        if not a.small_checkpoint:
            x.stages.run("train_10pct", C.hydra_train("wt2_small_10pct", subsets[small]["data_bin"], os.path.dirname(ckpt),
                                                      x.path("hydra")).nice())
        base_small = {s: x.evaluate(data, ckpt, s, f"base_small_model_{s}") for s in SPLITS}
        for pct in a.small_dstores:  # its own keys: each datastore is dumped with the 10% model
            dstore = x.path("dstore", f"small_model_{pct}")
            train_bin = a.data_bin if pct == FULL else subsets[str(pct)]["data_bin"]
            x.stages.run(f"dump_small_model_{pct}", C.dump(*window(a, train_bin, ckpt, "train", dump=True),
                                                           dstore=dstore).nice())
            table[str(pct)] = x.datastore_row(data, ckpt, "small_model", pct, dstore, SPLITS, ref_temp)
        train_log = x.stages.log_path("train_10pct")
        table.update(base=base_small, checkpoint=os.path.relpath(ckpt, C.ROOT),
                     training=C.training_curve(open(train_log).read()) if os.path.exists(train_log) else {})
    if "figure" in parts:  # Figure 2: the 100% model, datastores over growing article subsets (rows of the full one)
        arts = read_articles(os.path.join(a.raw, "wiki.train.tokens"))
        for pct in a.fractions:
            dest = x.path("dstore", f"full_model_{pct}")
            x.stages.call(f"slice_full_model_{pct}", C.in_process(
                ["slice_datastore", a.full_dstore, dest, f"rows of train{pct}"], os.path.join(dest, "manifest.json"),
                [dest], [os.path.join(a.full_dstore, "manifest.json"), x.path("text", f"train{pct}.json")]),
                lambda pct=pct, dest=dest: slice_datastore(a.full_dstore, dest, subset_rows(
                    arts, article_subset(arts, pct / 100, a.seed)), {"subset_percent": pct, "seed": a.seed}))
            fig[str(pct)] = x.datastore_row(data, a.checkpoint, "full_model", pct, dest, a.figure_splits, ref_temp)
    wt2 = os.path.join(C.ROOT, "results", "wikitext2", "metrics.json")  # the full splits' numbers, for contrast
    metrics = {"title": "Retrieval vs training on WikiText-2 (the kNN-LM paper's Table 3 and Figure 2, shape only)",
               "subsets": {p: {k: v for k, v in s.items() if k != "data_bin"} for p, s in subsets.items()},
               "eval_data": ev, "base_full_model": base_full, "figure": fig, "table": table, "paper": PAPER,
               "full_split_base": {s: json.load(open(wt2))[s]["base_ppl"] for s in SPLITS} if os.path.exists(wt2) else {},
               "prefix_check_ppl": PREFIX_CHECK_PPL, "stages": x.stages.done, "machine": machine(),
               "versions": versions(), "settings": vars(a) | {"tag": x.tag}}
    metrics["plot"] = plot(metrics, os.path.join(a.out, "ppl_vs_dstore_size.png"))
    publish(a.out, metrics, render)
    return 0


if __name__ == "__main__":
    cli(main)
