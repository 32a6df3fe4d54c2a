"""The report of scripts/scaling.py, from its metrics alone: the paper's claims, the tables, the plot."""
import json
import os

from knnlm_fairseq.experiments.report import plt, prose, save, table

FULL = 100  # percent of train: the full datastore, and the shipped model's training data
PAPER = {"small_train_tokens": 1e8, "train_tokens": 3e9}  # Table 3: WIKI-100M vs WIKI-3B


def percents(rows):
    """The datastore rows of a table or figure dict (keyed by percent of train), smallest datastore first."""
    return sorted((k for k in rows if k.isdigit()), key=lambda k: rows[k]["dstore_tokens"])


def ppl(row, split):
    return next((r["knnlm_ppl_exact"] for r in row["logs"] if r["split"] == split), None)


def claims(m):
    """Each claim of the paper's Table 3 / Figure 2, and whether these numbers show the same effect."""
    t, fig, small = m.get("table", {}), m["figure"], str(m["settings"]["fractions"][0])
    full, rows, out = percents(fig)[-1], percents(t), []
    for split in ("valid", "test"):
        base = m["base_full_model"][split]["ppl"]
        claim = f"Table 3 ({split}): a model trained on {small}% of the data plus a datastore over {full}% beats the " \
                f"model trained on {full}%"
        out.append({"claim": claim, "ours": f"{ppl(t[full], split):.2f} vs {base:.2f}", "holds": ppl(t[full], split) < base}
                   if full in t else {"claim": claim, "ours": "not run (see the note on compute)", "holds": None})
    for split in ("valid", "test") if t else ():
        chain = [t["base"][split]["ppl"]] + [ppl(t[k], split) for k in rows]
        out.append({"claim": f"Table 3 context ({split}): for the {small}% model, retrieval helps, and a larger datastore "
                             "helps more (alone > " + " > ".join(f"{k}% datastore" for k in rows) + ")",
                    "ours": " > ".join(f"{v:.2f}" for v in chain),
                    "holds": all(x > y for x, y in zip(chain, chain[1:])) if len(chain) > 1 else None})
    sizes = percents(fig)
    for split in ("valid", "test"):
        vals = [ppl(fig[k], split) for k in sizes]
        if None not in vals:
            out.append({"claim": f"Figure 2a ({split}): perplexity falls monotonically as the datastore grows",
                        "ours": " > ".join(f"{v:.2f}" for v in vals), "holds": all(x > y for x, y in zip(vals, vals[1:]))})
    for key, what in (("fixed_temp", "at the fixed T"), ("tuned", "tuned jointly with T")):
        lams = [(fig[k]["fixed_temp"] if key == "fixed_temp" else fig[k]["tuned"]["exact"])["lmbda"] for k in sizes]
        out.append({"claim": f"Figure 2b: the best λ ({what}) grows with the datastore", "ours": " ≤ ".join(
            f"{x:g}" for x in lams), "holds": all(x <= y for x, y in zip(lams, lams[1:])) and lams[-1] > lams[0]})
    return out


def plot(m, path):
    """Perplexity (valid-tuned T, λ) and the best λ against datastore size, the paper's Figure 2 (a) and (b)."""
    t, small = m.get("table", {}), m["settings"]["fractions"][0]
    curves = [(f"{percents(m['figure'])[-1]}% model", m["figure"], m["base_full_model"], "C0")]
    if percents(t):
        curves.append((f"{small}% model", t, t["base"], "C3"))
    f, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rows, base, color in curves:
        keys = percents(rows)
        x = [rows[k]["dstore_tokens"] for k in keys]
        for split, style in (("valid", "-o"), ("test", ":s")):
            y = [ppl(rows[k], split) for k in keys]
            if None not in y:
                ax.plot(x, y, style, color=color, label=f"{label} + datastore ({split})")
                ax.axhline(base[split]["ppl"], color=color, ls="--" if split == "valid" else ":", lw=0.8,
                           label=f"{label} alone ({split})")
        bx.plot(x, [rows[k]["tuned"]["exact"]["lmbda"] for k in keys], "-o", color=color, label=f"{label}: λ tuned with T")
        bx.plot(x, [rows[k]["fixed_temp"]["lmbda"] for k in keys], "--^", color=color,
                label=f"{label}: λ at T={rows[keys[0]]['fixed_temp']['temp']:g}")
    for axis in (ax, bx):
        axis.set(xscale="log", xlabel="datastore size (tokens of WikiText-2 train)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    ax.set(yscale="log", ylabel=f"perplexity (valid-tuned λ, T; k={m['settings']['k']}; log scale)",  # 10% model: far above
           title="(a) perplexity vs datastore size")
    bx.set(ylabel="best λ on valid", title="(b) best λ vs datastore size")
    return save(f, path, dpi=120)


def render(m):
    """report.md: the rows, the curve, each claim with a verdict, then how it was run."""
    ev, t, fig, st, sub = m["eval_data"], m.get("table", {}), m["figure"], m["settings"], m["subsets"]
    small, full, fr = str(st["fractions"][0]), percents(fig)[-1], "/".join(map(str, st["fractions"]))
    bf, wt2 = m["base_full_model"], os.path.dirname(st["full_dstore"].rstrip("/"))

    def row(label, dstore, r, *extra):
        return [label, dstore, f"{ppl(r, 'valid'):.2f}" if ppl(r, "valid") else "—",
                f"{ppl(r, 'test'):.2f}" if ppl(r, "test") else "—", *extra]

    L = [f"# {m['title']}", "", prose(
        "Generated by `make scaling` (scripts/scaling.py). The paper (Khandelwal et al. 2020, Table 3 and Figure 2) "
        "trains on {ps:.0f}M vs {pt:.0f}B tokens of Wikipedia; here the same question is asked at WikiText-2 scale: a "
        "model trained on {small}% of WikiText-2 train (whole articles) against the shipped model trained on {full}%, "
        "and datastores over {fr}/{full}% of train. Same architecture, same dictionary, same datastore keys "
        "(`last_ffn_input`), index and k as `make wikitext2`. λ and T are tuned on valid (knnlm-sweep, exact distances, "
        "k fixed) and applied unchanged to test.", ps=m["paper"]["small_train_tokens"] / 1e6,
        pt=m["paper"]["train_tokens"] / 1e9, small=small, full=full, fr=fr), ""]
    if m.get("table_model_built") and not m["table_model_built"]["remeasured"]:
        b = m["table_model_built"]
        L += [prose("**The {small}% model's rows are not the same architecture.** Before commit b550852 "
                    "`config/wt2_small_10pct.yaml` named `knnlm_wt2_small` but fairseq-hydra-train built a {l} × {d} model "
                    "with an adaptive softmax and no adaptive input ({p:,} parameters) instead of the intended {il} × {id} "
                    "adaptive model ({ip:,}); known from {how}. Its rows below (and the Table 3 claims that use them) "
                    "compare a larger model trained on {small}% with the shipped one; they have not been re-measured "
                    "with the corrected config yet (`make scaling SCALING_EXTRA=` redoes them).",
                    small=small, l=b["decoder_layers"], d=b["decoder_embed_dim"], p=b["params"],
                    il=b["intended"]["decoder_layers"], id=b["intended"]["decoder_embed_dim"], ip=b["intended"]["params"],
                    how=b["how_known"]), ""]
    if "valid" in ev:
        L += [prose("**Evaluated on a fixed prefix of whole articles**, to fit the CPU budget: {parts}. Perplexities are "
                    "therefore not the full-split numbers of results/wikitext2 (there: base valid {bv}, test {bt}); every "
                    "row below is on the same prefix.", bv=m["full_split_base"]["valid"], bt=m["full_split_base"]["test"],
                    parts=", ".join(f"{s} {ev[s]['tokens']:,} of {ev[s]['tokens_total']:,} tokens ({ev[s]['articles']} "
                                    f"of {ev[s]['articles_total']} articles)" for s in ("valid", "test"))), ""]
    L += ["## Compute, and what was cut", "", st["note"], ""] if st.get("note") else []
    L += ["The datastore-size curve (Figure 2) was run on valid only, to fit the time budget.", ""] \
        if st["figure_splits"] == ["valid"] else []
    rows = []
    if t:
        rows.append([f"{small}% ({sub[small]['tokens']:,} tokens)", "—", f"{t['base']['valid']['ppl']:.2f}",
                     f"{t['base']['test']['ppl']:.2f}", "", ""])
        rows += [row(f"{small}%", f"{k}% of train ({t[k]['dstore_tokens']:,})", t[k], f"{t[k]['tuned']['exact']['lmbda']:g}",
                     f"{t[k]['tuned']['exact']['temp']:g}") for k in sorted(percents(t), key=int)]
    rows.append([f"{full}% ({sub[small]['tokens_total']:,} tokens)", "—", f"{bf['valid']['ppl']:.2f}",
                 f"{bf['test']['ppl']:.2f}", "", ""])
    rows.append(row(f"{full}%", f"{full}% of train ({fig[full]['dstore_tokens']:,})", fig[full],
                    f"{fig[full]['tuned']['exact']['lmbda']:g}", f"{fig[full]['tuned']['exact']['temp']:g}"))
    L += ["## Table 3 shape: retrieval vs training", "",
          table(["model trained on", "datastore", "valid ppl", "test ppl", "λ", "T"], rows, "llrrrr"), ""]
    L += [prose("The {s}% model's datastores are dumped with the {s}% model (its own keys): over its own training subset, "
                "and over all of train.", s=small), ""] if t else []
    fixed_t = fig[full]["fixed_temp"]["temp"]
    L += [prose("## Figure 2 shape: datastore size (the {full}% model)", full=full), "",
          f"![perplexity and best λ vs datastore size]({m.get('plot', 'ppl_vs_dstore_size.png')})", "",
          table(["datastore", "entries", "valid ppl", "test ppl", "best λ (with T)", "T", f"best λ at T={fixed_t:g}",
                 "valid ppl there"],
                [["none", "—", f"{bf['valid']['ppl']:.2f}", f"{bf['test']['ppl']:.2f}", "", "", "", ""]]
                + [row(f"{k}% of train", f"{fig[k]['dstore_tokens']:,}", fig[k], f"{fig[k]['tuned']['exact']['lmbda']:g}",
                       f"{fig[k]['tuned']['exact']['temp']:g}", f"{fig[k]['fixed_temp']['lmbda']:g}",
                       f"{fig[k]['fixed_temp']['ppl']:.2f}") for k in percents(fig)], "lrrrrrrr"), "",
          prose("Subsets are nested (one seeded article order, cut at {fr}%), so each larger datastore only adds entries. "
                "The sub-datastores are rows of the {full}% datastore ({wt2}), each indexed with the same factory and "
                "training-sample size (indexes used: {idx}). The paper varies the datastore for its model trained on the "
                "smaller corpus; here it is varied for the {full}% model, whose sub-datastores need no new dump (the "
                "{small}% model's points are in the plot where they were run).", fr=fr, full=full, wt2=wt2, small=small,
                idx=", ".join(sorted({fig[k]["index"] for k in fig}))), "",
          "## The paper's claims, at this scale", "",
          table(["claim", "ours", "same effect?"], [[c["claim"], c["ours"], "not run" if c["holds"] is None else "yes"
                                                     if c["holds"] else "**no**"] for c in claims(m)]), "",
          "## Subsets", "",
          table(["subset", "articles", "tokens", "fraction of train tokens"],
                [[f"{p}%", f"{s['articles']} of {s['articles_total']}", f"{s['tokens']:,}", f"{s['fraction']:.4f}"]
                 for p, s in sub.items()], "lrrr")]
    tr = t.get("training", {})
    if tr.get("epochs"):
        L += ["", prose("## The {s}% model's training (config/wt2_small_10pct.yaml)", s=small), "",
              "fairseq-train's validation perplexity (its first validation batches, `max_valid_steps`; no context window):",
              "", table(["epoch", "updates", "valid ppl", "train words/s"], [
                  [e["epoch"], e["num_updates"], f"{e['valid_ppl']:.1f}", e["train_wps"] or ""] for e in tr["epochs"]],
                  "rrrr")]
        L += ["", prose("Stopped by `stop_time_hours` (the {mins:.0f}-minute cap) before max_epoch; checkpoint_best is the "
                        "best epoch reached.", mins=tr["stop_time_hours"] * 60)] if tr["stopped_by_time"] else []
    cpus = m["machine"]["cpus"]
    L += ["", "## Stages", "", prose(
        "Wall seconds of each stage (the load average over the minute before it ended: above {c} means other work "
        "shared the {c} cores). `(reused)` stages ran in an earlier invocation of the same work directory.", c=cpus), "",
        table(["stage", "seconds", "load", "command"], [
            [n, s["seconds"], s.get("load_avg_1m", ""), ("(reused) " if s.get("reused") else "") + f"`{s['command']}`"]
            for n, s in m["stages"].items()], "lrrl"), "",
        prose("Sub-datastores (slices) and truncated retrieval logs are written in-process by scripts/scaling.py "
              "(seconds). The {full}% model's datastore, index and retrieval logs are reused from `make wikitext2` "
              "({wt2}); on a prefix its logs are cut to the prefix's rows, which is exact because with `--context-window` "
              "a prefix is scored in the same blocks (the check: the cut log's base perplexity equals fairseq-eval-lm's "
              "on the prefix, asserted to {tol}).", full=full, wt2=wt2, tol=m["prefix_check_ppl"]), "",
        "## Versions", "", "```", json.dumps(m["versions"]), "```", ""]
    return "\n".join(L)
