#!/usr/bin/env python
"""Retrieval vs training on WikiText-2: the shape of the kNN-LM paper's Table 3 and Figure 2 on a 2-core CPU.

Table 3: a model trained on 10% of train plus a datastore over 100% of train, against the model trained on 100%.
Figure 2: perplexity (and the best λ) as the datastore grows over 10%, 25%, 50%, 100% of train.
Train subsets are whole articles, binarized with the shipped dictionary so every model and datastore share ids.
Writes OUT/{metrics.json,report.md,ppl_vs_dstore_size.png}; subsets, checkpoints, datastores, indexes, retrieval
logs and stage logs go to --work (not committed).
"""
import argparse
import json
import os
import random
import re
import shutil
from typing import Dict, List, Sequence

import numpy as np

from pipeline import BIN, KNN_TASK, PKG, ROOT, add_run_settings, cli, eval_lm, eval_numbers, read_json, run, versions, write_json

# ` = Title = ` starts an article; ` = = Section = = ` (a second "=") does not.
_TITLE = re.compile(r"^ = [^=].* = $")


def split_articles(lines: Sequence[str]) -> List[List[str]]:
    """Lines -> articles, each from its title line up to the next title; lines before the first title join it."""
    articles: List[List[str]] = []
    lead: List[str] = []
    for line in lines:
        if _TITLE.match(line.rstrip("\n")):
            articles.append(lead + [line])
            lead = []
        elif articles:
            articles[-1].append(line)
        else:
            lead.append(line)
    if lead:  # no title at all: one article
        articles.append(lead)
    return articles


def n_tokens(lines: Sequence[str]) -> int:
    """Tokens fairseq-preprocess makes of these lines: the words plus one </s> per line (blank lines included)."""
    return sum(len(line.split()) + 1 for line in lines)


def article_subset(articles: Sequence[Sequence[str]], fraction: float, seed: int = 1) -> List[int]:
    """Indexes (in file order) of whole articles holding about `fraction` of the tokens.

    Articles are taken in one seeded random order until the total is closest to the target, so subsets with the
    same seed are nested (10% within 25% within 50%): a larger datastore only adds entries.
    """
    assert 0 < fraction <= 1, "fraction must be in (0, 1]"
    sizes = [n_tokens(a) for a in articles]
    target = fraction * sum(sizes)
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= target or abs(total + sizes[i] - target) > abs(total - target):
            break
        chosen.append(i)
        total += sizes[i]
    return sorted(chosen)


def write_articles(articles, keep, path: str):
    """Write the articles numbered in `keep`, in that order, to path; return (their tokens, all articles' tokens)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for i in keep:
            f.writelines(articles[i])
    return sum(n_tokens(articles[i]) for i in keep), sum(n_tokens(a) for a in articles)


def write_subset(src: str, dest: str, fraction: float, seed: int = 1) -> Dict:
    """Write the article subset of src to dest; return its article and token counts."""
    with open(src) as f:
        articles = split_articles(f.readlines())
    keep = article_subset(articles, fraction, seed)
    kept, total = write_articles(articles, keep, dest)
    return {"fraction_asked": fraction, "articles": len(keep), "articles_total": len(articles), "tokens": kept,
            "tokens_total": total, "fraction": round(kept / total, 4)}


def load_stages(work: str) -> Dict:
    """Stage timings of earlier runs in this work dir, so a --reuse run still reports what each stage cost."""
    path = os.path.join(work, "stages.json")
    return read_json(path) if os.path.exists(path) else {}


def stage(name: str, cmd: List, work: str, stages: Dict, done: str = None, reuse: bool = False) -> str:
    """Run a stage unless --reuse and its output `done` exists; persist timings in WORK/stages.json."""
    if reuse and done and os.path.exists(done) and name in stages:
        print(f"(reusing {name}: {done})", flush=True)
        return open(os.path.join(work, "logs", f"{name}.log")).read()
    text = run(name, cmd, os.path.join(work, "logs"), stages)
    merged = dict(load_stages(work), **{name: stages[name]})  # another run of this script may share WORK
    write_json(os.path.join(work, "stages.json"), merged)
    return text


def prepare(a, stages: Dict) -> Dict:
    """Article subsets of train, each binarized with the shipped dictionary (valid and test unchanged)."""
    subsets = {}
    for pct in a.fractions:
        name = f"train{pct}"
        txt = os.path.join(a.work, "text", f"{name}.tokens")
        info = write_subset(os.path.join(a.raw, "wiki.train.tokens"), txt, pct / 100, a.seed)
        dest = os.path.join(a.work, "bin", name)
        done = os.path.join(dest, "train.bin")
        if not (a.reuse and os.path.exists(done)):
            shutil.rmtree(dest, ignore_errors=True)
        stage(f"preprocess_{name}", [f"{BIN}/fairseq-preprocess", "--only-source", "--srcdict", a.dict,
                                     "--trainpref", txt, "--validpref", os.path.join(a.raw, "wiki.valid.tokens"),
                                     "--testpref", os.path.join(a.raw, "wiki.test.tokens"), "--destdir", dest,
                                     "--workers", 2], a.work, stages, done, a.reuse)
        subsets[pct] = dict(info, data_bin=dest)
    return subsets


def train_small(a, data_bin: str, stages: Dict) -> str:
    """The 10% model: config/wt2_small_10pct.yaml under the stock fairseq-hydra-train; returns checkpoint_best."""
    save = os.path.join(a.work, "checkpoints", "wt2-small-10pct")
    best = os.path.join(save, "checkpoint_best.pt")
    if a.small_checkpoint:
        return a.small_checkpoint
    if not (a.reuse and os.path.exists(best)):
        shutil.rmtree(save, ignore_errors=True)
    stage("train_10pct", ["nice", "-n", "10", f"{BIN}/fairseq-hydra-train", "--config-dir",
                          os.path.join(ROOT, "config"), "--config-name", "wt2_small_10pct",
                          f"task.data={os.path.abspath(data_bin)}", f"common.user_dir={PKG}",
                          f"checkpoint.save_dir={os.path.abspath(save)}",
                          f"hydra.run.dir={os.path.abspath(os.path.join(a.work, 'hydra'))}"],
          a.work, stages, best, a.reuse)
    return best


def subset_rows(articles: Sequence[Sequence[str]], keep: Sequence[int]) -> np.ndarray:
    """Rows of a datastore dumped over the whole file that belong to the kept articles (row i = token i)."""
    starts = np.cumsum([0] + [n_tokens(a) for a in articles])  # (A + 1,) token offset of each article
    return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep])  # (kept tokens,)


def prefix_articles(articles: Sequence[Sequence[str]], fraction: float) -> List[int]:
    """The first whole articles holding closest to `fraction` of the tokens (at least one)."""
    sizes = [n_tokens(a) for a in articles]
    target, total, keep = fraction * sum(sizes), 0, []
    for i, s in enumerate(sizes):
        if keep and abs(total + s - target) > abs(total - target):
            break
        keep.append(i)
        total += s
    return keep


# manifest fields the writer computes itself; everything else (checkpoint, dictionary, context sizes) is provenance
_COMPUTED = ("format_version", "count", "dim", "key_dtype", "val_dtype", "vocab_size", "files", "sha256",
             "fingerprint", "dump_seconds", "resumed_after_rows")


def slice_datastore(src: str, dest: str, rows: np.ndarray, note: Dict, chunk: int = 1 << 16) -> Dict:
    """A datastore of some rows of src (same model, same keys): the datastore over a subset of the dumped text.

    Row i of a --save-dstore dump over train is train token i, so the rows of whole articles are exactly the
    entries a dump of those articles would hold, each key computed with its context in the full text.
    """
    from knnlm_fairseq.core.datastore import Datastore
    from knnlm_fairseq.core.writer import DatastoreWriter

    ds = Datastore.open(src)
    meta = {k: v for k, v in ds.manifest.items() if k not in _COMPUTED}
    meta["sliced_from"] = dict(note, path=os.path.abspath(src), fingerprint=ds.fingerprint, count=ds.count)
    shutil.rmtree(dest, ignore_errors=True)
    w = DatastoreWriter(dest, ds.dim, ds.manifest["vocab_size"], meta, key_dtype=ds.manifest["key_dtype"])
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]  # (c,) sorted row ids
        w.add(np.asarray(ds.keys[r]), np.asarray(ds.vals[r]))  # (c, dim), (c,)
    return w.close()


def truncate_log(src: str, dest: str, n: int) -> None:
    """The first n rows of a retrieval log: the same scores an evaluation of the first n tokens would log.

    With --context-window the blocks of a prefix are the blocks of the full split, so each token keeps its context.
    """
    from knnlm_fairseq.core.retrieval_log import ARRAYS, META, RetrievalLog

    log = RetrievalLog(src)
    assert n <= log.count, f"{src} holds {log.count} rows, fewer than {n}"
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for name in ARRAYS:
        np.save(os.path.join(dest, f"{name}.npy"), np.ascontiguousarray(getattr(log, name)[:n]))
    write_json(os.path.join(dest, META), dict(log.meta, count=n, truncated_from=os.path.abspath(src)))


def eval_data(a, stages: Dict) -> Dict:
    """Valid and test as evaluated: the full splits, or (--eval-fraction < 1) a prefix of whole articles."""
    if a.eval_fraction >= 1:
        return {"data_bin": a.data_bin, "fraction": 1.0}
    info, prefs = {"fraction_asked": a.eval_fraction}, []
    for split in ("valid", "test"):
        with open(os.path.join(a.raw, f"wiki.{split}.tokens")) as f:
            articles = split_articles(f.readlines())
        keep = prefix_articles(articles, a.eval_fraction)
        txt = os.path.join(a.work, "text", f"{split}_prefix.tokens")
        tokens, total = write_articles(articles, keep, txt)
        info[split] = {"articles": len(keep), "articles_total": len(articles), "tokens": tokens,
                       "tokens_total": total, "fraction": round(tokens / total, 4)}
        prefs += [f"--{split}pref", txt]
    dest = os.path.join(a.work, "bin", f"eval_prefix{a.tag}")
    done = os.path.join(dest, "test.bin")
    if not (a.reuse and os.path.exists(done)):
        shutil.rmtree(dest, ignore_errors=True)
    stage(f"preprocess_eval_prefix{a.tag}", [f"{BIN}/fairseq-preprocess", "--only-source", "--srcdict", a.dict] + prefs +
          ["--destdir", dest, "--workers", 2], a.work, stages, done, a.reuse)
    return dict(info, data_bin=dest)


def build_index(a, dstore: str, stages: Dict, name: str) -> Dict:
    index = os.path.join(dstore, "index.faiss")
    stage(f"index_{name}", [f"{BIN}/knnlm-build-index", dstore, "--factory", a.factory, "--train-size",
                            a.train_size, "--no-progress-bar"], a.work, stages, index, a.reuse)
    return read_json(index + ".json")


def evaluate(a, data: str, ckpt: str, split: str, stages: Dict, name: str, dstore: str = None) -> Dict:
    """Base LM (dstore None) or kNN-LM with a retrieval log at WORK/retrieval/NAME+TAG; returns eval-lm's numbers."""
    name += a.tag  # the evaluated prefix: runs on another prefix are other stages
    cmd = ["nice", "-n", "10"] + eval_lm(data, ckpt, split, a.eval_tokens_per_sample, a.eval_context_window,
                                         a.max_tokens, a.device.split())
    if dstore is None:  # stock task; --user-dir registers knnlm_wt2_small, the 10% model's arch
        return eval_numbers(stage(name, cmd + ["--user-dir", PKG], a.work, stages,
                                  os.path.join(a.work, "logs", f"{name}.log"), a.reuse))
    rlog = os.path.join(a.work, "retrieval", name)
    if not (a.reuse and os.path.exists(os.path.join(rlog, "meta.json"))):
        shutil.rmtree(rlog, ignore_errors=True)
    return eval_numbers(stage(name, cmd + KNN_TASK + [
        "--knnlm", "--dstore-dir", dstore, "--k", a.k, "--lmbda", a.lmbda, "--knn-temp", a.knn_temp, "--probe",
        a.probe, "--knn-dist", "exact", "--save-retrieval", rlog], a.work, stages,
        os.path.join(rlog, "meta.json"), a.reuse))


def run_sweep(a, name: str, logs: List[str], stages: Dict) -> Dict:
    """knnlm-sweep: tune (T, λ) on the first log (valid) at k = --k, apply to the rest (test)."""
    out = os.path.join(a.work, "sweeps", f"{name}{a.tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    same = os.path.exists(out) and [r["path"] for r in read_json(out)["logs"]] == logs  # e.g. test added since
    stage(f"sweep_{name}{a.tag}", [f"{BIN}/knnlm-sweep"] + logs + [
        "--lmbdas", ",".join(map(str, a.lmbdas)), "--ks", str(a.k), "--temps", ",".join(map(str, a.temps)),
        "--output", out], a.work, stages, out, a.reuse and same)
    return read_json(out)


def summarize(sweep: Dict, k: int, ref_temp: float = None) -> Dict:
    """Valid-tuned (T, λ) at k and the perplexities it gives on every log; best λ at a fixed T as well."""
    s = sweep["settings"]
    out = {"tuned": {}, "logs": []}
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



_VALID = re.compile(r"epoch (\d+) \| valid on 'valid' subset \| loss [0-9.]+ \| nll_loss [0-9.]+ \| ppl ([0-9.]+)"
                    r".*?num_updates (\d+)")
_VALID_NO_NLL = re.compile(r"epoch (\d+) \| valid on 'valid' subset \| loss [0-9.]+ \| ppl ([0-9.]+).*?num_updates (\d+)")
_TRAIN_WPS = re.compile(r"epoch (\d+) \| loss [0-9.]+ \|.*?\| wps ([0-9.]+)")


def training_curve(log: str) -> Dict:
    """fairseq-train's per-epoch validation perplexity (on its validation batches) and training words/s."""
    found = _VALID.findall(log) or _VALID_NO_NLL.findall(log)
    wps = {int(e): float(w) for e, w in _TRAIN_WPS.findall(log)}
    return {"epochs": [{"epoch": int(e), "valid_ppl": float(p), "num_updates": int(u), "train_wps": wps.get(int(e))}
                       for e, p, u in found],
            "stopped_by_time": "Stopping training due to cumulative_training_time" in log}


def claims(m: Dict) -> List[Dict]:
    """Each claim of the paper's Table 3 / Figure 2, and whether these numbers show the same effect."""
    out = []
    t, fig = m.get("table", {}), m["figure"]

    def ppl(rows: Dict, split: str) -> float:
        return next(r["knnlm_ppl_exact"] for r in rows["logs"] if r["split"] == split)

    rows = {k: v for k, v in t.items() if isinstance(k, int)}  # the 10% model's datastores, by percent
    for split in ("valid", "test"):
        full = m["base_full_model"][split]["ppl"]
        claim = (f"Table 3 ({split}): a model trained on 10% of the data plus a datastore over 100% beats the model "
                 f"trained on 100%")
        if 100 in rows:
            out.append({"claim": claim, "ours": f"{ppl(rows[100], split):.2f} vs {full:.2f}",
                        "holds": ppl(rows[100], split) < full})
        else:
            out.append({"claim": claim, "ours": "not run (see the note on compute)", "holds": None})
    if t:
        for split in ("valid", "test"):
            chain = [t["base"][split]["ppl"]] + [ppl(rows[k], split) for k in sorted(rows)]
            out.append({"claim": f"Table 3 context ({split}): for the 10% model, retrieval helps, and a larger "
                                 f"datastore helps more (alone > " + " > ".join(f"{k}% datastore" for k in sorted(rows))
                                 + ")",
                        "ours": " > ".join(f"{v:.2f}" for v in chain),
                        "holds": all(x > y for x, y in zip(chain, chain[1:])) if len(chain) > 1 else None})
    sizes = sorted(fig, key=lambda k: fig[k]["dstore_tokens"])
    for split in ("valid", "test"):
        vals = [ppl(fig[k], split) for k in sizes if any(r["split"] == split for r in fig[k]["logs"])]
        if len(vals) == len(sizes):
            out.append({"claim": f"Figure 2a ({split}): perplexity falls monotonically as the datastore grows",
                        "ours": " > ".join(f"{v:.2f}" for v in vals),
                        "holds": all(x > y for x, y in zip(vals, vals[1:]))})
    for key, what in (("fixed_temp", "at the fixed T"), ("tuned", "tuned jointly with T")):
        lams = [(fig[k]["fixed_temp"] if key == "fixed_temp" else fig[k]["tuned"]["exact"])["lmbda"] for k in sizes]
        out.append({"claim": f"Figure 2b: the best λ ({what}) grows with the datastore",
                    "ours": " ≤ ".join(f"{x:g}" for x in lams),
                    "holds": all(x <= y for x, y in zip(lams, lams[1:])) and lams[-1] > lams[0]})
    return out


def plot(m: Dict, path: str) -> str:
    """Perplexity (valid-tuned T, λ) and the best λ against datastore size, the paper's Figure 2 (a) and (b)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_rows, t = m["figure"], m.get("table", {})
    curves = [("100% model", fig_rows, m["base_full_model"], "C0")]
    if t:
        rows = {k: v for k, v in t.items() if isinstance(k, int)}
        if rows:
            curves.append(("10% model", rows, t["base"], "C3"))
    f, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows, base, color in curves:
        keys = sorted(rows, key=lambda k: rows[k]["dstore_tokens"])
        x = [rows[k]["dstore_tokens"] for k in keys]
        for split, style in (("valid", "-o"), ("test", ":s")):
            y = [next((r["knnlm_ppl_exact"] for r in rows[k]["logs"] if r["split"] == split), None) for k in keys]
            if None in y:
                continue
            ax.plot(x, y, style, color=color, label=f"{label} + datastore ({split})")
            ax.axhline(base[split]["ppl"], color=color, ls="--" if split == "valid" else ":", lw=0.8,
                       label=f"{label} alone ({split})")
        bx.plot(x, [rows[k]["tuned"]["exact"]["lmbda"] for k in keys], "-o", color=color,
                label=f"{label}: λ tuned with T")
        bx.plot(x, [rows[k]["fixed_temp"]["lmbda"] for k in keys], "--^", color=color,
                label=f"{label}: λ at T={rows[keys[0]]['fixed_temp']['temp']:g}")
    for axis in (ax, bx):
        axis.set_xscale("log")
        axis.set_xlabel("datastore size (tokens of WikiText-2 train)")
        axis.grid(alpha=0.3)
    ax.set_yscale("log")  # the undertrained 10% model sits far above the 100% model
    ax.set_ylabel("perplexity (valid-tuned λ, T; k=1024; log scale)")
    ax.set_title("(a) perplexity vs datastore size")
    bx.set_ylabel("best λ on valid")
    bx.set_title("(b) best λ vs datastore size")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    f.tight_layout()
    f.savefig(path, dpi=120)
    plt.close(f)
    return os.path.basename(path)


def render(m: Dict) -> str:
    """report.md: the rows, the curve, each claim with a verdict, then how it was run."""
    ev, t, fig, st = m["eval_data"], m.get("table", {}), m["figure"], m["settings"]
    L = [f"# {m['title']}", "",
         "Generated by `make scaling` (scripts/scaling.py). The paper (Khandelwal et al. 2020, Table 3 and Figure 2) "
         "trains on 100M vs 3B tokens of Wikipedia; here the same question is asked at WikiText-2 scale: a model "
         "trained on 10% of WikiText-2 train (whole articles) against the shipped model trained on 100%, and "
         "datastores over 10/25/50/100% of train. Same architecture, same dictionary, same datastore keys "
         "(`last_ffn_input`), index and k as `make wikitext2`. λ and T are tuned on valid (knnlm-sweep, exact "
         "distances, k fixed) and applied unchanged to test.", ""]
    if ev.get("fraction", 1.0) < 1 or "valid" in ev:
        L += [f"**Evaluated on a fixed prefix of whole articles**, to fit the CPU budget: valid "
              f"{ev['valid']['tokens']:,} of {ev['valid']['tokens_total']:,} tokens ({ev['valid']['articles']} of "
              f"{ev['valid']['articles_total']} articles), test {ev['test']['tokens']:,} of "
              f"{ev['test']['tokens_total']:,} tokens ({ev['test']['articles']} of {ev['test']['articles_total']} "
              f"articles). Perplexities are therefore not the full-split numbers of results/wikitext2 (there: "
              f"base valid 182.32, test 169.81); every row below is on the same prefix.", ""]
    if st.get("note"):
        L += ["## Compute, and what was cut", "", st["note"], ""]
    if st["figure_splits"] == ["valid"]:
        L += ["The datastore-size curve (Figure 2) was run on valid only, to fit the time budget.", ""]
    L += ["## Table 3 shape: retrieval vs training", "",
          "| model trained on | datastore | valid ppl | test ppl | λ | T |", "|---|---|---:|---:|---:|---:|"]

    def row_of(r: Dict, split: str) -> str:
        v = next((x["knnlm_ppl_exact"] for x in r["logs"] if x["split"] == split), None)
        return "—" if v is None else f"{v:.2f}"

    full_tok = m["subsets"][st["fractions"][0]]["tokens_total"]
    bf = m["base_full_model"]
    if t:
        tb = t["base"]
        L.append(f"| 10% ({m['subsets'][st['fractions'][0]]['tokens']:,} tokens) | — | {tb['valid']['ppl']:.2f} | "
                 f"{tb['test']['ppl']:.2f} | | |")
        for pct in sorted(k for k in t if isinstance(k, int)):
            r = t[pct]
            L.append(f"| 10% | {pct}% of train ({r['dstore_tokens']:,}) | {row_of(r, 'valid')} | {row_of(r, 'test')} | "
                     f"{r['tuned']['exact']['lmbda']:g} | {r['tuned']['exact']['temp']:g} |")
    L.append(f"| 100% ({full_tok:,} tokens) | — | {bf['valid']['ppl']:.2f} | {bf['test']['ppl']:.2f} | | |")
    r = fig[100]
    L += [f"| 100% | 100% of train ({r['dstore_tokens']:,}) | {row_of(r, 'valid')} | {row_of(r, 'test')} | "
          f"{r['tuned']['exact']['lmbda']:g} | {r['tuned']['exact']['temp']:g} |", ""]
    if t:
        L += ["The 10% model's datastores are dumped with the 10% model (its own keys): over its own training "
              "subset, and over all of train.", ""]
    L += ["## Figure 2 shape: datastore size (the 100% model)", "",
          f"![perplexity and best λ vs datastore size]({m.get('plot', 'ppl_vs_dstore_size.png')})", "",
          f"| datastore | entries | valid ppl | test ppl | best λ (with T) | T | best λ at T={fig[100]['fixed_temp']['temp']:g} "
          f"| valid ppl there |", "|---|---:|---:|---:|---:|---:|---:|---:|",
          f"| none | 0 | {bf['valid']['ppl']:.2f} | {bf['test']['ppl']:.2f} | | | | |"]
    for pct in sorted(fig, key=lambda k: fig[k]["dstore_tokens"]):
        r = fig[pct]
        L.append(f"| {pct}% of train | {r['dstore_tokens']:,} | {row_of(r, 'valid')} | {row_of(r, 'test')} | "
                 f"{r['tuned']['exact']['lmbda']:g} | {r['tuned']['exact']['temp']:g} | {r['fixed_temp']['lmbda']:g} | "
                 f"{r['fixed_temp']['ppl']:.2f} |")
    L += ["", "Subsets are nested (one seeded article order, cut at 10/25/50%), so each larger datastore only adds "
          "entries. The sub-datastores are rows of the 100% datastore (dstore/wikitext2), each indexed with the same "
          "factory and training-sample size (indexes used: "
          + ", ".join(sorted({fig[k]["index"] for k in fig})) + "). The paper varies the datastore for its model "
          "trained on the smaller corpus; here it is varied for the 100% model, whose sub-datastores need no new "
          "dump (the 10% model's points are in the plot where they were run).", "",
          "## The paper's claims, at this scale", "", "| claim | ours | same effect? |", "|---|---|---|"]
    for c in m["claims"]:
        verdict = "not run" if c["holds"] is None else "yes" if c["holds"] else "**no**"
        L.append(f"| {c['claim']} | {c['ours']} | {verdict} |")
    L += ["", "## Subsets", "", "| subset | articles | tokens | fraction of train tokens |", "|---|---:|---:|---:|"]
    for pct, s in m["subsets"].items():
        L.append(f"| {pct}% | {s['articles']} of {s['articles_total']} | {s['tokens']:,} | {s['fraction']:.4f} |")
    if t and t.get("training", {}).get("epochs"):
        tr = t["training"]
        L += ["", "## The 10% model's training (config/wt2_small_10pct.yaml)", "",
              "fairseq-train's validation perplexity (its first validation batches, `max_valid_steps`; no context window):", "",
              "| epoch | updates | valid ppl | train words/s |", "|---:|---:|---:|---:|"]
        for e in tr["epochs"]:
            L.append(f"| {e['epoch']} | {e['num_updates']} | {e['valid_ppl']:.1f} | {e['train_wps'] or ''} |")
        if tr["stopped_by_time"]:
            L.append("\nStopped by `stop_time_hours` (the 25-minute cap) before max_epoch; checkpoint_best is the "
                     "best epoch reached.")
    L += ["", "## Stages", "", "Wall seconds of each stage (1-minute load average at its end: > 2 means other work "
          "shared the 2 cores). `(reused)` stages ran in an earlier invocation of the same work directory.", "",
          "| stage | seconds | load | command |", "|---|---:|---:|---|"]
    for name, s in m["stages"].items():
        L.append(f"| {name} | {s['seconds']} | {s.get('load_avg_1m', '')} | `{s['command']}` |")
    L += ["", "Sub-datastores (slices) and truncated retrieval logs are written in-process by scripts/scaling.py "
          "(seconds). The 100% model's datastore, index and retrieval logs are reused from `make wikitext2` "
          "(dstore/wikitext2); on a prefix its logs are cut to the prefix's rows, which is exact because with "
          "`--context-window` a prefix is scored in the same blocks (the check: the cut log's base perplexity "
          "equals fairseq-eval-lm's on the prefix, asserted to 0.05).", "",
          "## Versions", "", "```", json.dumps(m["versions"]), "```", ""]
    return "\n".join(L)



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
    p.add_argument("--fractions", type=lambda t: [int(x) for x in t.split(",")], default=[10, 25, 50],
                   help="train subsets in percent; the first one trains the small model")
    p.add_argument("--eval-fraction", type=float, default=1.0,
                   help="evaluate a prefix of whole articles of valid and test holding this fraction of tokens")
    p.add_argument("--small-dstores", type=lambda t: [int(x) for x in t.split(",") if x], default=[10, 100],
                   help="datastores for the 10%% model, in percent of train (each dumped with it)")
    p.add_argument("--small-checkpoint", help="use this 10%% model instead of training one")
    p.add_argument("--seed", type=int, default=1, help="article order of the subsets")
    p.add_argument("--parts", default="table,figure", help="table: the 10%% model rows; figure: datastore sizes")
    p.add_argument("--figure-splits", type=lambda t: t.split(","), default=["valid", "test"],
                   help="splits for the datastore-size curve ('valid' alone halves its cost)")
    add_run_settings(p, knn_temp=10.0, temps=[1.0, 3.0, 10.0, 30.0])
    p.add_argument("--note", default="", help="a paragraph for the report: the machine, what was cut and why")
    p.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of every stage (0: library default)")
    p.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist in --work")
    return p


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    parts = a.parts.split(",")
    a.tag = "" if a.eval_fraction >= 1 else f"_p{round(a.eval_fraction * 100)}"
    if a.threads:  # one thread per process wastes less on a CPU other jobs oversubscribe (OpenMP barriers)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(a.threads)
    stages = load_stages(a.work)
    print(f"settings: {vars(a)}", flush=True)
    subsets = prepare(a, stages)
    ev = eval_data(a, stages)
    data, splits = ev["data_bin"], ["valid", "test"]
    with open(os.path.join(a.raw, "wiki.train.tokens")) as f:
        articles = split_articles(f.readlines())
    rows = {pct: subset_rows(articles, article_subset(articles, pct / 100, a.seed)) for pct in a.fractions}
    for pct, r in rows.items():
        assert len(r) == subsets[pct]["tokens"], "datastore rows and binarized subset disagree"
    results = {"figure": {}, "table": {}}
    ddir = os.path.join(a.work, "dstore")

    # the 100% model over the full datastore: its retrieval logs, cut to the evaluated prefix
    full_logs = []
    for split in splits:
        src = os.path.join(a.full_logs, f"retrieval-{split}")
        if a.eval_fraction < 1:
            dest = os.path.join(a.work, "retrieval", f"full_model_dstore100_{split}{a.tag}")
            if not (a.reuse and os.path.exists(os.path.join(dest, "meta.json"))):
                truncate_log(src, dest, ev[split]["tokens"])
            src = dest
        full_logs.append(src)
    base_full = {s: evaluate(a, data, a.checkpoint, s, stages, f"base_full_model_{s}") for s in splits}
    sw = summarize(run_sweep(a, "full_model_dstore100", full_logs, stages), a.k)
    ref_temp = sw["tuned"]["exact"]["temp"]
    sw = summarize(read_json(os.path.join(a.work, "sweeps", f"full_model_dstore100{a.tag}.json")), a.k, ref_temp)
    for s, row in zip(splits, sw["logs"]):  # the cut log must score the prefix as eval-lm does
        assert abs(row["base_ppl"] - base_full[s]["ppl"]) < 0.05, \
            f"{s}: truncated log base ppl {row['base_ppl']} != eval-lm on the prefix {base_full[s]['ppl']}"
    full_index = read_json(os.path.join(a.full_dstore, "index.faiss.json"))
    results["figure"][100] = dict(sw, dstore_tokens=full_index["ntotal"], index=full_index["factory_used"])

    if "table" in parts:  # Table 3: the 10% model, alone and with datastores over 10% and 100% of train
        small = a.fractions[0]
        ckpt = train_small(a, subsets[small]["data_bin"], stages)
        base_small = {s: evaluate(a, data, ckpt, s, stages, f"base_small_model_{s}") for s in splits}
        for pct in a.small_dstores:  # its own keys: each datastore is dumped with the 10% model
            dstore = os.path.join(ddir, f"small_model_{pct}")
            if not (a.reuse and os.path.exists(os.path.join(dstore, "manifest.json"))):
                shutil.rmtree(dstore, ignore_errors=True)
            train_bin = a.data_bin if pct == 100 else subsets[pct]["data_bin"]
            stage(f"dump_small_model_{pct}", ["nice", "-n", "10"] + eval_lm(
                train_bin, ckpt, "train", a.dump_tokens_per_sample, a.dump_context_window, a.max_tokens,
                a.device.split()) + KNN_TASK + ["--save-dstore", "--dstore-dir", dstore], a.work, stages,
                os.path.join(dstore, "manifest.json"), a.reuse)
            meta = build_index(a, dstore, stages, f"small_model_{pct}")
            logs = []
            for s in splits:
                evaluate(a, data, ckpt, s, stages, f"small_model_dstore{pct}_{s}", dstore)
                logs.append(os.path.join(a.work, "retrieval", f"small_model_dstore{pct}_{s}{a.tag}"))
            results["table"][pct] = dict(summarize(run_sweep(a, f"small_model_dstore{pct}", logs, stages), a.k,
                                                   ref_temp), dstore_tokens=meta["ntotal"], index=meta["factory_used"])
        results["table"]["base"] = {s: base_small[s] for s in splits}
        results["table"]["checkpoint"] = os.path.relpath(ckpt, ROOT)
        train_log = os.path.join(a.work, "logs", "train_10pct.log")
        results["table"]["training"] = training_curve(open(train_log).read()) if os.path.exists(train_log) else {}

    if "figure" in parts:  # Figure 2: the 100% model, datastores over growing article subsets
        for pct in a.fractions:
            dest = os.path.join(ddir, f"full_model_{pct}")
            if not (a.reuse and os.path.exists(os.path.join(dest, "manifest.json"))):
                slice_datastore(a.full_dstore, dest, rows[pct], {"subset_percent": pct, "seed": a.seed})
            meta = build_index(a, dest, stages, f"full_model_{pct}")
            logs = []
            for s in a.figure_splits:
                evaluate(a, data, a.checkpoint, s, stages, f"full_model_dstore{pct}_{s}", dest)
                logs.append(os.path.join(a.work, "retrieval", f"full_model_dstore{pct}_{s}{a.tag}"))
            results["figure"][pct] = dict(summarize(run_sweep(a, f"full_model_dstore{pct}", logs, stages), a.k,
                                                    ref_temp), dstore_tokens=meta["ntotal"], index=meta["factory_used"])

    metrics = {"title": "Retrieval vs training on WikiText-2 (the kNN-LM paper's Table 3 and Figure 2, shape only)",
               "subsets": {pct: {k: v for k, v in info.items() if k != "data_bin"} for pct, info in subsets.items()},
               "eval_data": ev, "base_full_model": base_full, **results,
               "stages": load_stages(a.work), "versions": versions(),
               "settings": {k: v for k, v in vars(a).items()}}
    metrics["claims"] = claims(metrics)
    os.makedirs(a.out, exist_ok=True)
    metrics["plot"] = plot(metrics, os.path.join(a.out, "ppl_vs_dstore_size.png"))
    write_json(os.path.join(a.out, "metrics.json"), metrics)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(render(metrics))
    print(open(os.path.join(a.out, "report.md")).read())
    return 0


if __name__ == "__main__":
    cli(main)
