"""The report of scripts/domain.py, from its metrics alone, and its plot."""
import os

import numpy as np

from knnlm_fairseq.experiments.report import grid_text, line_panels, prose, stage_rows, table

SPLITS = ("valid", "test")
PAPER = {"base_test": 34.84, "books_dstore_test": 20.47, "lmbda": 0.65, "in_domain_lmbda": 0.25, "lm_layers": 16,
         "lm_train_tokens": 3e9, "dstore_tokens": 1e8,
         "source": "Khandelwal et al. 2020, Table 4 (WIKI-3B LM evaluated on BOOKS; datastore from BOOKS), and §4 "
                   "(λ 0.65 for the domain-adaptation datastore vs 0.25 in domain)"}
LABEL = {"books": "+ Books datastore", "wiki": "+ WikiText-2 datastore", "both": "+ both datastores"}


def split_reason(m):
    """Why these held-out documents: the justification of the default choice, or how they were drawn."""
    p, docs = m["prep"], m.get("documents", {})
    if not (p["valid"]["documents"] == ["chesterton-thursday"] and p["test"]["documents"] == ["chesterton-brown"]):
        return ("Split by whole document, never by line; held-out documents as listed (named with --valid-docs/"
                "--test-docs, or drawn by fraction with a seeded shuffle).")
    return prose(
        "Split by whole book, never by line. Valid and test are two Chesterton novels (*The Man Who Was Thursday*, "
        "*The Wisdom of Father Brown*), so λ is tuned on text of the same kind as the test text, and both are large "
        "({v:.0f}k and {t:.0f}k tokens) so that noise does not decide the result (*Alice*, {alice:.0f}k tokens, would "
        "be a noisy test set; *Moby Dick* would take {moby:.0%} of the datastore away). The datastore keeps the "
        "other three books (Melville, Carroll and one Chesterton): the same domain (19th/early-20th-century fiction, "
        "one book by the test author), none of the test text.", v=p["valid"]["tokens"] / 1e3,
        t=p["test"]["tokens"] / 1e3, alice=docs["carroll-alice"] / 1e3,
        moby=docs["melville-moby_dick"] / p["dstore"]["tokens"])


def heldout_note(m):
    h, v = m["heldout"], m["results"]["valid"]
    if not any(x["cut"] for x in h.values()):
        return "Valid and test are evaluated whole."
    speeds = sorted(v[n]["tok_s"] for n in LABEL if n in v)
    return prose(
        "**Shrunk to fit the CPU budget:** only the first whole paragraphs of each held-out part are evaluated "
        "(`--heldout-tokens {n}`): {parts}. Every row scores exactly these tokens, so rows compare like for like. "
        "kNN-LM evaluation ran at {lo:,.0f}–{hi:,.0f} tokens/s on {cpus} CPU cores shared with other jobs, too slow "
        "for the whole books ({whole:.0f}k tokens × {n_ds} datastores) in this run's time; `make domain "
        "DOMAIN_HELDOUT=0` evaluates them whole.", n=m["settings"]["heldout_tokens"], lo=speeds[0], hi=speeds[-1],
        parts="; ".join(f"{s} {x['tokens']:,} of {x['tokens_in_part']:,} tokens ({x['paragraphs']:,} paragraphs, OOV "
                        f"{x['oov_rate']:.2%})" for s, x in h.items()), cpus=m["machine"]["cpus"],
        whole=sum(x["tokens_in_part"] for x in h.values()) / 1e3, n_ds=len(m["datastores"]))


def render(m):
    p, r, st, e, pa, ds = m["prep"], m["results"], m["settings"], m["effect"], m["paper"], m["datastores"]
    t, names = r["test"], [n for n in LABEL if n in m["datastores"]]
    rows = [["base LM (no datastore)", f"{r['valid']['base']:.2f}", f"{t['base']:.2f}", "—", "—", "—"]]
    rows += [[LABEL[n], f"{r['valid'][n]['exact']['ppl']:.2f}", f"**{t[n]['exact']['ppl']:.2f}**",
              f"{t[n]['exact']['ppl'] / t['base'] - 1:+.1%}", f"{t[n]['exact']['lmbda']} / {t[n]['exact']['temp']:g}",
              f"{t[n]['approx']['ppl']:.2f} (λ {t[n]['approx']['lmbda']})"] for n in names]
    verdict = ("yes" if e["books_beats_wiki_on_test"] and e["books_lmbda_larger"] else
               "partly" if e["books_beats_wiki_on_test"] or e["books_lmbda_larger"] else "no")
    L = [f"# {m['title']}", "",
         prose("The WikiText-2 LM (`{ckpt}`) is evaluated on held-out books. Only the datastore changes between rows; "
               "λ and T are tuned on valid by `knnlm-sweep` (k {k}, exact distances, λ ∈ {l0:g}..{l1:g}, T ∈ {{{temps}}}) "
               "and applied unchanged to test.", ckpt=st["checkpoint"], k=st["k"], l0=min(st["lmbdas"]),
               l1=max(st["lmbdas"]), temps=grid_text(st["temps"])), "", "## Data", "",
         table(["part", "documents", "tokens", "paragraphs", "OOV (→ `<unk>`)"],
               [[part, ", ".join(d["documents"]), f"{d['tokens']:,}", f"{d['paragraphs']:,}",
                 f"{d['oov']:,} ({d['oov_rate']:.2%})"] for part, d in p.items()]), "",
         split_reason(m) + prose(
             " Tokenization is WikiText's (Moses, `@-@`/`@,@`/`@.@`; Gutenberg `--` → `—`, `_italics_` markers dropped, "
             "boilerplate stripped). OOV words are scored as `<unk>` exactly as in WikiText-2 (which has `<unk>` in its "
             "own text); the book OOV rate is {rate:.1%} on test (most common: {top}), mostly character names.",
             rate=p["test"]["oov_rate"], top=", ".join(f"{w} ×{c}" for w, c in p["test"]["top_oov"][:6])), "",
         heldout_note(m), "",
         "Datastores: " + "; ".join(f"{n} `{ds[n]['path']}` {ds[n]['n']:,} keys (`{ds[n]['index']}`)" for n in names)
         + ".", "", "## Perplexity", "",
         table(["datastore", f"valid ({r['valid']['tokens']:,} tok)", f"test ({t['tokens']:,} tok)", "test vs base",
                "λ / T (tuned on valid)", "test, approx distances"], rows), ""]
    L += [f"Note: {m['note']}.", ""] if m.get("note") else []
    L += [prose("The paper's effect — **{verdict}**: the Books datastore {helps} the Wiki datastore on held-out books "
                "({bg:.1%} vs {wg:.1%} lower test perplexity; paper {pg:.1%}: {pb} → {pk}), and its best λ is {larger} "
                "({bl} vs {wl}; paper {pl} vs {pil} in domain).", verdict=verdict,
                helps="helps more than" if e["books_beats_wiki_on_test"] else "does not help more than",
                bg=1 - t["books"]["exact"]["ppl"] / t["base"], wg=1 - t["wiki"]["exact"]["ppl"] / t["base"],
                pg=e["paper_gain_test"], pb=pa["base_test"], pk=pa["books_dstore_test"],
                larger="larger" if e["books_lmbda_larger"] else "not larger", bl=t["books"]["exact"]["lmbda"],
                wl=t["wiki"]["exact"]["lmbda"], pl=pa["lmbda"], pil=pa["in_domain_lmbda"]), ""]
    if "both" in t:
        b, k = t["both"]["exact"]["ppl"], t["books"]["exact"]["ppl"]
        L += [prose("Both datastores together (`knnlm-merge-dstore`, one index over the union): test {b:.2f} vs {k:.2f} "
                    "with the Books datastore alone — {what}", b=b, k=k, what="the Wikipedia keys add nothing once "
                    "in-domain keys are there and slightly dilute the neighbours." if b >= k else
                    "a little better than Books alone."), ""]
    if "in_domain_wikitext2_test" in m:
        w = m["in_domain_wikitext2_test"]
        L += [prose("In domain, for contrast (`results/wikitext2`): the same LM and WikiText-2 datastore on WikiText-2 "
                    "test {b:.2f} → {k:.2f} with λ {l}, T {t:g}.", b=w["base"], k=w["knnlm_exact"], l=w["lmbda"],
                    t=w["temp"]), ""]
    L += [prose("Perplexities of different test sets are not comparable to each other or to the paper's (a {layers}-layer "
                "{dim}-d LM trained on {wt:.0f}M WikiText-2 tokens vs a {pl}-layer LM on {pt:g}B Wikipedia tokens; "
                "{dt:.2f}M datastore tokens vs {pd:.0f}M); the comparison is between rows.", layers=m["model"]["layers"],
                dim=m["model"]["dim"], wt=ds["wiki"]["n"] / 1e6, pl=pa["lm_layers"], pt=pa["lm_train_tokens"] / 1e9,
                dt=p["dstore"]["tokens"] / 1e6, pd=pa["dstore_tokens"] / 1e6),
          prose("`eval_lm_fixed` in metrics.json is each eval-lm run's own perplexity at the fixed λ {l}, T {t:g} (the "
                "sweep reproduces it from the retrieval log).", l=st["lmbda"], t=st["knn_temp"]), "",
          "## Plot", "", f"![ppl vs λ]({m['plots'][0]})", "", "## Commands and timings", "",
          prose("`make domain` ran `scripts/domain.py`, which ran ({cpus} CPU cores, shared):", cpus=m["machine"]["cpus"])
          + (" rows marked *reused* were kept from an earlier run of the same command (`--reuse`), with that run's time "
             "(— where it was not recorded)." if any(x.get("reused") or "(reused" in x["command"]
                                                     for x in m["stages"].values()) else ""), "",
          table(["stage", "seconds", "peak RSS (MB)", "command"], stage_rows(m["stages"])), "",
          prose("Speed (tokens/s, valid): base {b:,}; {knn} (kNN runs also write the retrieval log).",
                b=r["valid"]["base_tok_s"], knn=", ".join(f"{n} {r['valid'][n]['tok_s']:,}" for n in names)), "",
          "## Versions", "", ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    return "\n".join(L)


def plot_lmbda(sweeps, out_dir):
    colors = {"books": "tab:red", "wiki": "tab:blue", "both": "tab:purple"}
    panels = []
    for i, split in enumerate(SPLITS):
        p = {"title": split, "xlabel": "λ", "lines": [], "marks": []}
        for name, sw in sweeps.items():
            s, t = sw["settings"], sw["tuned"]["exact"]
            y = np.array(sw["logs"][i]["ppl"]["exact"])[s["ks"].index(t["k"]), s["temps"].index(t["temp"]), :]  # (L,)
            p["lines"].append({"x": s["lmbdas"], "y": y, "color": colors.get(name),
                               "label": f"+{name} datastore{'s' if name == 'both' else ''} (T={t['temp']:g})"})
            p["marks"].append((t["lmbda"], y[s["lmbdas"].index(t["lmbda"])]))
            p["hline"] = (sw["logs"][i]["base_ppl"], "base LM")
        panels.append(p)
    k = next(iter(sweeps.values()))["tuned"]["exact"]["k"]
    return line_panels(os.path.join(out_dir, "ppl_vs_lmbda.png"), "WikiText-2 LM on held-out books: perplexity vs λ "
                       f"(exact distances, k={k}; ★ = λ tuned on valid)", panels, fontsize=9)
