#!/usr/bin/env python
"""Domain adaptation by swapping the datastore (the paper's Table 4) on a folder of raw text documents.

An LM trained on Wikipedia scores held-out books with no datastore, with a datastore built from other books,
with its own Wikipedia training datastore, and with both at once; λ and T are tuned on valid by knnlm-sweep
and applied to test. make domain runs it; writes OUT/{metrics.json,report.md,ppl_vs_lmbda.png}, and the text,
binarized data, datastores, retrieval logs and stage logs to --work (not committed).
"""
import argparse
import os
import shutil
import sys

import numpy as np

from pipeline import BIN, KNN_TASK, PKG, ROOT, add_run_settings, cli, eval_lm, eval_numbers, read_json, run, versions, write_json

PAPER = {"base_test": 34.84, "books_dstore_test": 20.47, "lmbda": 0.65, "in_domain_lmbda": 0.25,
         "source": "Khandelwal et al. 2020, Table 4 (WIKI-3B LM evaluated on BOOKS; datastore from BOOKS), and §4 "
                   "(λ 0.65 for the domain-adaptation datastore vs 0.25 in domain)"}


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
    p.add_argument("--reuse", action="store_true", help="skip stages whose outputs exist in --work")
    p.add_argument("--render-only", action="store_true", help="rewrite OUT/report.md from OUT/metrics.json")
    return p


def have(path, reuse):
    return reuse and os.path.exists(path)


def heldout_prefix(text_dir, split, max_tokens, dict_path):
    """The split's text to evaluate: all of it, or its first whole paragraphs holding ≥ max_tokens tokens.

    Writes TEXT/SPLIT.eval.tokens when cut; returns {path, paragraphs, tokens, oov, oov_rate, cut}.
    """
    sys.path.insert(0, ROOT)
    from knnlm_fairseq.core.textprep import count_oov, load_dict_words

    path = os.path.join(text_dir, f"{split}.tokens")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    n_all = sum(len(line.split()) for line in lines)
    if max_tokens and n_all > max_tokens:
        kept, n = [], 0
        for line in lines:  # whole paragraphs, from the start of the held-out book(s)
            kept.append(line)
            n += len(line.split())
            if n >= max_tokens:
                break
        lines, path = kept, os.path.join(text_dir, f"{split}.eval.tokens")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    n, oov, _ = count_oov(lines, load_dict_words(dict_path))
    return {"path": path, "paragraphs": len(lines), "tokens": n, "oov": oov, "oov_rate": round(oov / max(n, 1), 5),
            "cut": n < n_all, "tokens_in_part": n_all}


def dump_and_index(name, data_bin, dstore, a, dev, logs, stages):
    """Dump data_bin's train split into dstore and index it, unless already there."""
    dump = eval_lm(data_bin, a.checkpoint, "train", a.dump_tokens_per_sample, a.dump_context_window, a.max_tokens,
                   dev) + KNN_TASK + ["--save-dstore", "--dstore-dir", dstore]
    index = [f"{BIN}/knnlm-build-index", dstore, "--factory", a.factory, "--train-size", a.train_size,
             "--no-progress-bar"]
    if not os.path.exists(os.path.join(dstore, "manifest.json")):
        shutil.rmtree(dstore, ignore_errors=True)
        run(f"dump_{name}", dump, logs, stages)
    else:  # an earlier run's: its own wall time is in the manifest (peak RSS was not recorded)
        stages[f"dump_{name}"] = reused(dump, read_json(os.path.join(dstore, "manifest.json"))["dump_seconds"])
    if not os.path.exists(os.path.join(dstore, "index.faiss")):
        run(f"index_{name}", index, logs, stages)
    else:
        meta = read_json(os.path.join(dstore, "index.faiss.json"))
        stages[f"index_{name}"] = reused(index, meta.get("train_s", 0) + meta.get("add_s", 0))


def reused(cmd, seconds):
    printable = " ".join(str(c).replace(BIN + os.sep, "") for c in cmd)
    return {"seconds": None if seconds is None else round(seconds, 1), "peak_rss_mb": None,
            "command": f"(reused, an earlier run of) {printable}"}


def tuned_row(sweep, i, kind):
    """The sweep's tuned (valid) settings applied to log i: {ppl, lmbda, temp}."""
    t = sweep["tuned"][kind]
    return {"ppl": round(sweep["logs"][i]["tuned"][kind], 2), "lmbda": t["lmbda"], "temp": t["temp"]}


def main(argv=None):
    a = get_parser().parse_args(argv)
    if a.render_only:
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(render(read_json(os.path.join(a.out, "metrics.json"))))
        return 0
    a.dict = a.dict or os.path.join(os.path.dirname(a.checkpoint), "dict.txt")
    if a.lmbda not in a.lmbdas:
        a.lmbdas = sorted(a.lmbdas + [a.lmbda])
    if a.knn_temp not in a.temps:
        a.temps = sorted(a.temps + [a.knn_temp])
    logs, text, data = (os.path.join(a.work, d) for d in ("logs", "text", "data-bin"))
    books = os.path.join(a.work, "books")
    dev, stages, splits = a.device.split(), {}, ("valid", "test")
    print(f"settings: {vars(a)}", flush=True)

    # 1. text -> WikiText-style tokens, whole documents per part; 2. binarize with the LM's dictionary
    held = (["--valid-docs"] + a.valid_docs if a.valid_docs else []) + (
        ["--test-docs"] + a.test_docs if a.test_docs else [])
    prepare = [f"{BIN}/knnlm-prepare-text", a.books_dir, "--dict", a.dict, "--out", text, *held,
               "--valid-frac", a.valid_frac, "--test-frac", a.test_frac, "--seed", a.seed]
    if not have(os.path.join(text, "prep.json"), a.reuse):
        run("prepare", prepare, logs, stages)
    else:
        stages["prepare"] = reused(prepare, None)
    prep = read_json(os.path.join(text, "prep.json"))
    heldout = {split: heldout_prefix(text, split, a.heldout_tokens, a.dict) for split in splits}
    preprocess = [f"{BIN}/fairseq-preprocess", "--only-source", "--srcdict", a.dict,
                  "--trainpref", os.path.join(text, "dstore.tokens"),
                  "--validpref", heldout["valid"]["path"], "--testpref", heldout["test"]["path"],
                  "--destdir", data, "--workers", 2]
    if not have(os.path.join(data, "test.bin"), a.reuse):
        shutil.rmtree(data, ignore_errors=True)
        run("preprocess", preprocess, logs, stages)
    else:
        stages["preprocess"] = reused(preprocess, None)
    # 3. the Books datastore (the dstore part is fairseq's "train" split) and its index; the Wiki one if missing
    if not a.reuse:
        shutil.rmtree(books, ignore_errors=True)
    dump_and_index("books", data, books, a, dev, logs, stages)
    dump_and_index("wiki", a.wiki_data_bin, a.wiki_dstore, a, dev, logs, stages)
    dstores = {"books": books, "wiki": a.wiki_dstore}
    both_note = None
    if not a.no_both:
        if os.path.exists(f"{BIN}/knnlm-merge-dstore"):
            both = os.path.join(a.work, "both")
            merge = [f"{BIN}/knnlm-merge-dstore", both, books, a.wiki_dstore]
            index = [f"{BIN}/knnlm-build-index", both, "--factory", a.factory, "--train-size", a.train_size,
                     "--no-progress-bar"]
            if not have(os.path.join(both, "index.faiss"), a.reuse):
                shutil.rmtree(both, ignore_errors=True)
                run("merge", merge, logs, stages)
                run("index_both", index, logs, stages)
            else:
                meta = read_json(os.path.join(both, "index.faiss.json"))
                stages["merge"] = reused(merge, None)
                stages["index_both"] = reused(index, meta.get("train_s", 0) + meta.get("add_s", 0))
            dstores["both"] = both
        else:
            both_note = "knnlm-merge-dstore is not installed: the books+wiki row was skipped"
            print(both_note, flush=True)

    # 4. base LM, then each datastore with a retrieval log per split; 5. tune λ, T on valid, apply to test
    evals = {}
    for split in splits:
        ev = eval_lm(data, a.checkpoint, split, a.eval_tokens_per_sample, a.eval_context_window, a.max_tokens, dev)
        evals[f"base_{split}"] = eval_numbers(run(f"base_{split}", ev + ["--user-dir", PKG], logs, stages))
    sweeps = {}
    cached_path = os.path.join(a.work, "evals.json")  # eval-lm numbers of retrieval logs kept by --reuse
    cached = read_json(cached_path) if have(cached_path, a.reuse) else {}
    for name, dstore in dstores.items():
        for split in splits:
            rlog = os.path.join(a.work, f"retrieval-{name}-{split}")
            ev = eval_lm(data, a.checkpoint, split, a.eval_tokens_per_sample, a.eval_context_window, a.max_tokens, dev)
            key = f"knnlm_{name}_{split}"
            if have(os.path.join(rlog, "meta.json"), a.reuse) and key in cached:
                evals[key] = cached[key]
                if key in cached.get("stages", {}):  # the earlier run's own timing of this retrieval pass
                    old = cached["stages"][key]
                    stages[key] = dict(old, command="(reused, an earlier run of) " + old["command"])
                continue
            shutil.rmtree(rlog, ignore_errors=True)
            evals[f"knnlm_{name}_{split}"] = eval_numbers(run(f"knnlm_{name}_{split}", ev + KNN_TASK + [
                "--knnlm", "--dstore-dir", dstore, "--k", a.k, "--lmbda", a.lmbda, "--knn-temp", a.knn_temp,
                "--probe", a.probe, "--knn-dist", "exact", "--save-retrieval", rlog], logs, stages))
            cached = cached | evals
            cached.setdefault("stages", {})[key] = stages[key]
            write_json(cached_path, cached)
        out = os.path.join(a.work, f"sweep-{name}.json")
        run(f"sweep_{name}", [f"{BIN}/knnlm-sweep"] + [os.path.join(a.work, f"retrieval-{name}-{s}") for s in splits] + [
            "--lmbdas", ",".join(map(str, a.lmbdas)), "--ks", a.k, "--temps", ",".join(map(str, a.temps)),
            "--output", out], logs, stages)
        sweeps[name] = read_json(out)

    metrics = collect(a, prep, evals, sweeps, dstores, stages, both_note)
    metrics["heldout"] = {k: {x: y for x, y in v.items() if x != "path"} for k, v in heldout.items()}
    os.makedirs(a.out, exist_ok=True)
    metrics["plots"] = [plot_lmbda(sweeps, splits, a.out)]
    write_json(os.path.join(a.out, "metrics.json"), metrics)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(render(metrics))
    print(open(os.path.join(a.out, "report.md")).read())
    return 0


def collect(a, prep, evals, sweeps, dstores, stages, both_note):
    import sacremoses

    m = {"title": "Domain adaptation by swapping the datastore (WikiText-2 LM on books)",
         "paper": PAPER, "prep": {p: {k: v for k, v in d.items() if k != "top_oov"} | {"top_oov": d["top_oov"][:8]}
                                  for p, d in prep["parts"].items()},
         "datastores": {}, "results": {}, "note": both_note}
    for name, d in dstores.items():
        man = read_json(os.path.join(d, "manifest.json"))
        idx = read_json(os.path.join(d, "index.faiss.json"))
        m["datastores"][name] = {"path": os.path.relpath(os.path.abspath(d), ROOT), "n": man["count"],
                                 "index": idx.get("factory_used", idx.get("factory"))}
    for i, split in enumerate(("valid", "test")):
        base = evals[f"base_{split}"]
        row = {"tokens": base["tokens"], "base": base["ppl"], "base_tok_s": base["tok_s"]}
        for name, sw in sweeps.items():
            row[name] = {"exact": tuned_row(sw, i, "exact"), "approx": tuned_row(sw, i, "approx"),
                         "eval_lm_fixed": evals[f"knnlm_{name}_{split}"]["ppl"],
                         "tok_s": evals[f"knnlm_{name}_{split}"]["tok_s"]}
            assert round(sw["logs"][i]["base_ppl"], 1) == round(base["ppl"], 1), (name, split, "base ppl differs")
        m["results"][split] = row
    t = m["results"]["test"]
    m["effect"] = {"books_beats_wiki_on_test": t["books"]["exact"]["ppl"] < t["wiki"]["exact"]["ppl"],
                   "books_lmbda_larger": t["books"]["exact"]["lmbda"] > t["wiki"]["exact"]["lmbda"],
                   "books_gain_test": round(1 - t["books"]["exact"]["ppl"] / t["base"], 6),
                   "wiki_gain_test": round(1 - t["wiki"]["exact"]["ppl"] / t["base"], 6),
                   "paper_gain_test": round(1 - PAPER["books_dstore_test"] / PAPER["base_test"], 4)}
    wt2 = os.path.join(ROOT, "results", "wikitext2", "metrics.json")
    if os.path.exists(wt2):  # the same LM and Wiki datastore in domain, for the λ contrast
        w = read_json(wt2)["test"]
        m["in_domain_wikitext2_test"] = {"base": w["base_ppl"], "knnlm_exact": w["knnlm_ppl_exact"],
                                         "lmbda": w["best_lmbda"], "temp": w["best_temp"]}
    m["stages"] = stages
    m["settings"] = {k: v for k, v in vars(a).items()}
    m["versions"] = versions() | {"sacremoses": sacremoses.__version__}
    return m


def plot_lmbda(sweeps, splits, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"books": "tab:red", "wiki": "tab:blue", "both": "tab:purple"}
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for i, (ax, split) in enumerate(zip(axes[0], splits)):
        for name, sw in sweeps.items():
            s, t = sw["settings"], sw["tuned"]["exact"]
            grid = np.array(sw["logs"][i]["ppl"]["exact"])  # (K, T, L)
            y = grid[s["ks"].index(t["k"]), s["temps"].index(t["temp"]), :]
            label = f"+{name} datastore{'s' if name == 'both' else ''} (T={t['temp']:g})"
            ax.plot(s["lmbdas"], y, "-o", ms=3, color=colors.get(name), label=label)
            ax.plot([t["lmbda"]], [y[s["lmbdas"].index(t["lmbda"])]], "k*", ms=9)
        ax.axhline(sw["logs"][i]["base_ppl"], color="gray", lw=1, label="base LM")
        ax.set(title=split, xlabel="λ", ylabel="perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("WikiText-2 LM on held-out books: perplexity vs λ (exact distances, k=1024; ★ = λ tuned on valid)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ppl_vs_lmbda.png"), dpi=110)
    plt.close(fig)
    return "ppl_vs_lmbda.png"


def _table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def heldout_note(m):
    h = m["heldout"]
    v = m["results"]["valid"]
    speeds = sorted(v[n]["tok_s"] for n in ("books", "wiki", "both") if n in v)
    speeds = [speeds[0], speeds[-1]]
    if not any(v["cut"] for v in h.values()):
        return "Valid and test are evaluated whole."
    return ("**Shrunk to fit the CPU budget:** only the first whole paragraphs of each held-out part are evaluated "
            "(`--heldout-tokens " + str(m["settings"]["heldout_tokens"]) + "`): " +
            "; ".join(f"{s} {v['tokens']:,} of {v['tokens_in_part']:,} tokens ({v['paragraphs']:,} paragraphs, "
                      f"OOV {v['oov_rate']:.2%})" for s, v in h.items()) +
            ". Every row scores exactly these tokens, so rows compare like for like. kNN-LM evaluation ran at "
            + "–".join(f"{x:,.0f}" for x in speeds) + " tokens/s on 2 CPU cores shared with other jobs, too slow for "
            "the whole books (158k tokens × 3 datastores) in this run's time; `make domain DOMAIN_HELDOUT=0` "
            "evaluates them whole.")


def split_reason(p):
    """Why these held-out documents: the justification of the default choice, or how they were drawn."""
    if p["valid"]["documents"] == ["chesterton-thursday"] and p["test"]["documents"] == ["chesterton-brown"]:
        return ("Split by whole book, never by line. Valid and test are two Chesterton novels (*The Man Who Was "
                "Thursday*, *The Wisdom of Father Brown*), so λ is tuned on text of the same kind as the test text, "
                "and both are large (70k and 87k tokens) so that noise does not decide the result (*Alice*, 35k "
                "tokens, would be a noisy test set; *Moby Dick* would take two thirds of the datastore away). The "
                "datastore keeps the other three books (Melville, Carroll and one Chesterton): the same domain "
                "(19th/early-20th-century fiction, one book by the test author), none of the test text.")
    return ("Split by whole document, never by line; held-out documents as listed (named with --valid-docs/"
            "--test-docs, or drawn by fraction with a seeded shuffle).")


def render(m):
    p, r, st, e = m["prep"], m["results"], m["settings"], m["effect"]
    t = r["test"]
    ds = m["datastores"]
    names = [n for n in ("books", "wiki", "both") if n in ds]
    label = {"books": "+ Books datastore", "wiki": "+ WikiText-2 datastore", "both": "+ both datastores"}
    lines = [f"# {m['title']}", "",
             "The WikiText-2 LM (`" + os.path.relpath(st["checkpoint"], ROOT) + "`) is evaluated on held-out "
             "books. Only the datastore changes between rows; λ and T are tuned on valid by `knnlm-sweep` (k "
             f"{st['k']}, exact distances, λ ∈ 0..0.9, T ∈ {{{', '.join(f'{x:g}' for x in st['temps'])}}}) and "
             "applied unchanged to test.", "",
             "## Data", "",
             _table(["part", "documents", "tokens", "paragraphs", "OOV (→ `<unk>`)"],
                    [[part, ", ".join(d["documents"]), f"{d['tokens']:,}", f"{d['paragraphs']:,}",
                      f"{d['oov']:,} ({d['oov_rate']:.2%})"] for part, d in p.items()]), "",
             split_reason(p) + " Tokenization is WikiText's (Moses, `@-@`/`@,@`/`@.@`; Gutenberg "
             "`--` → `—`, `_italics_` markers dropped, boilerplate stripped). OOV words are scored as `<unk>` "
             "exactly as in WikiText-2 (which has `<unk>` in its own text); the book OOV rate is "
             f"{p['test']['oov_rate']:.1%} on test (most common: "
             + ", ".join(f"{w} ×{c}" for w, c in p["test"]["top_oov"][:6]) + "), mostly character names.", "",
             heldout_note(m), "",
             "Datastores: " + "; ".join(f"{n} `{ds[n]['path']}` {ds[n]['n']:,} keys (`{ds[n]['index']}`)"
                                        for n in names) + ".", "",
             "## Perplexity", ""]
    rows = [["base LM (no datastore)", f"{r['valid']['base']:.2f}", f"{r['test']['base']:.2f}", "—", "—", "—"]]
    for n in names:
        x, v = r["test"][n], r["valid"][n]
        rows.append([label[n], f"{v['exact']['ppl']:.2f}", f"**{x['exact']['ppl']:.2f}**",
                     f"{x['exact']['ppl'] / r['test']['base'] - 1:+.1%}", f"{x['exact']['lmbda']} / {x['exact']['temp']:g}",
                     f"{x['approx']['ppl']:.2f} (λ {x['approx']['lmbda']})"])
    lines += [_table(["datastore", f"valid ({r['valid']['tokens']:,} tok)", f"test ({r['test']['tokens']:,} tok)",
                      "test vs base", "λ / T (tuned on valid)", "test, approx distances"], rows), ""]
    if m.get("note"):
        lines += [f"Note: {m['note']}.", ""]
    verdict = ("**yes**" if e["books_beats_wiki_on_test"] and e["books_lmbda_larger"] else
               "**partly**" if e["books_beats_wiki_on_test"] or e["books_lmbda_larger"] else "**no**")
    lines += [f"The paper's effect — {verdict}: the Books datastore "
              f"{'helps more than' if e['books_beats_wiki_on_test'] else 'does not help more than'} the Wiki datastore "
              f"on held-out books ({1 - t['books']['exact']['ppl'] / t['base']:.1%} vs "
              f"{1 - t['wiki']['exact']['ppl'] / t['base']:.1%} lower test perplexity; "
              f"paper {e['paper_gain_test']:.1%}: {m['paper']['base_test']} → {m['paper']['books_dstore_test']}), and "
              f"its best λ is {'larger' if e['books_lmbda_larger'] else 'not larger'} "
              f"({r['test']['books']['exact']['lmbda']} vs {r['test']['wiki']['exact']['lmbda']}; paper "
              f"{m['paper']['lmbda']} vs {m['paper']['in_domain_lmbda']} in domain).", ""]
    if "both" in r["test"]:
        b, k = r["test"]["both"]["exact"]["ppl"], r["test"]["books"]["exact"]["ppl"]
        lines += [f"Both datastores together (`knnlm-merge-dstore`, one index over the union): test {b:.2f} vs "
                  f"{k:.2f} with the Books datastore alone — "
                  + ("the Wikipedia keys add nothing once in-domain keys are there and slightly dilute the neighbours."
                     if b >= k else "a little better than Books alone.") , ""]
    if "in_domain_wikitext2_test" in m:
        w = m["in_domain_wikitext2_test"]
        lines += [f"In domain, for contrast (`results/wikitext2`): the same LM and WikiText-2 datastore on WikiText-2 "
                  f"test {w['base']:.2f} → {w['knnlm_exact']:.2f} with λ {w['lmbda']}, T {w['temp']:g}.", ""]
    lines += ["Perplexities of different test sets are not comparable to each other or to the paper's (a 4-layer "
              "256-d LM trained on 2M WikiText-2 tokens vs a 16-layer LM on 3B Wikipedia tokens; 0.39M datastore "
              "tokens vs 100M); the comparison is between rows.",
              "`eval_lm_fixed` in metrics.json is each eval-lm run's own perplexity at the fixed "
              f"λ {st['lmbda']}, T {st['knn_temp']:g} (the sweep reproduces it from the retrieval log).", "",
              "## Plot", "", f"![ppl vs λ]({m['plots'][0]})", "",
              "## Commands and timings", "",
              "`make domain` ran `scripts/domain.py`, which ran (2 CPU cores, shared):"
              + (" rows marked *reused* were kept from an earlier run of the same command (`--reuse`), with that "
                 "run's time (— where it was not recorded)."
                 if any("(reused" in v["command"] for v in m["stages"].values()) else ""), "",
              _table(["stage", "seconds", "peak RSS (MB)", "command"],
                     [[n, "—" if s["seconds"] is None else s["seconds"], s["peak_rss_mb"] or "—", f"`{s['command']}`"]
                      for n, s in m["stages"].items()]), "",
              "Speed (tokens/s, valid): base " + f"{r['valid']['base_tok_s']:,}; " +
              ", ".join(f"{n} {r['valid'][n]['tok_s']:,}" for n in names) +
              " (kNN runs also write the retrieval log).", "",
              "## Versions", "", ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    cli(main)
