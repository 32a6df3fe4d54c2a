"""The report of scripts/keytypes.py, from its metrics alone."""
import os

import numpy as np

from knnlm_fairseq.experiments.report import grid_text, plt, prose, save, stage_rows, table

# the paper's Table 5 names for ours (WikiText-103 dev; its model is pre-norm like ours)
PAPER_NAMES = {
    "last_ffn_input": "FFN input after layer norm (the paper's best, its default)",
    "last_ffn_output": "FFN output (before the residual add)",
    "last_attn_input": "MHSA input after layer norm",
    "last_block_output": "final block output (before the decoder's last layer norm)",
}
PAPER = {"lm_layers": 16, "lm_dim": 1024, "base_dev": 17.96, "knnlm_dev": 16.06,
         "tie_ppl": 0.2}  # our valid subset's resolution: closer key types are called a tie


def ranking_sentence(m):
    """Does our ranking agree with the paper's two claims? Both checked on exact distances."""
    ppl = {r["key_type"]: r["exact"]["ppl"] for r in m["keytypes"]}
    best, claims = min(ppl, key=ppl.get), []
    if "last_ffn_input" in ppl and best == "last_ffn_input":
        claims.append(prose("FFN input after layer norm is the best key, as in the paper ({p:.2f})", p=ppl[best]))
    elif "last_ffn_input" in ppl:
        gap, tie = ppl["last_ffn_input"] - ppl[best], m["paper"]["tie_ppl"]
        claims.append(prose("FFN input after layer norm is not the best key (the paper: best): `{best}` is, by {gap:.2f} "
                            "ppl ({b:.2f} vs {f:.2f}; {how})", best=best, gap=gap, b=ppl[best], f=ppl["last_ffn_input"],
                            how=f"under {tie} ppl: a tie at this subset's resolution" if gap < tie else "a clear margin"))
    pairs = [(n, "second_" + n) for n in ppl if n.startswith("last_") and "second_" + n in ppl]
    if pairs:
        wins = [n for n, s in pairs if ppl[n] < ppl[s]]
        claims.append(f"the final layer beats the second-to-last for {len(wins)} of {len(pairs)} representations"
                      + (" (as in the paper)" if len(wins) == len(pairs) else " (the paper: final layer better; ours is "
                         f"not for {', '.join('`' + n + '`' for n, _ in pairs if n not in wins)})"))
    return "; ".join(claims) + "."


def plot(rows, base, out_dir):
    x, names = np.arange(len(rows)), [r["key_type"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    for off, kind, color in ((-0.2, "exact", "tab:blue"), (0.2, "approx", "tab:orange")):
        vals = [r[kind]["ppl"] for r in rows]
        ax.bar(x + off, vals, 0.4, color=color, label=f"kNN-LM, {kind} distances (λ, T tuned)")
        for xi, v in zip(x + off, vals):
            ax.text(xi, v + 0.3, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(base, color="gray", lw=1, ls="--", label=f"base LM {base:.2f}")
    lo = min(min(r["exact"]["ppl"], r["approx"]["ppl"]) for r in rows)
    ax.set_ylim(lo - 0.15 * (base - lo) - 1, base + 0.3 * (base - lo) + 1)  # room for the legend above the base
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="valid perplexity (subset)", title="kNN-LM valid perplexity by key type (WikiText-2 subset)")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, os.path.join(out_dir, "ppl_by_keytype.png"))


def tuned(b):
    """λ, T of a tuned setting; † where it is the grid's largest T or λ (the optimum may lie beyond)."""
    return f"{b['lmbda']}, {b['temp']:g}" + (" †" if b.get("at_grid_edge") else "")


def render(m):
    st, sub, rows, base, pa, full = m["settings"], m["subset"], m["keytypes"], m["base_ppl"], m["paper"], m["full_run"]
    best = min(r["exact"]["ppl"] for r in rows)
    scaled = f" (scaled to `{rows[0]['index']}` for this size)" if rows[0]["index"] != st["factory"] else ""
    return "\n".join([f"# {m['title']}", "", prose(
        "The kNN-LM paper's Table 5 asks which representation of the context makes the best key. Here every key type "
        "the plugin supports (`--knn-keytype`) gets its own datastore, index and valid pass with the shipped {layers} × "
        "{dim} pre-norm checkpoint; λ and T are tuned by `knnlm-sweep` on valid at k={k} and valid is reported (the "
        "paper's Table 5 also reports dev).", layers=m["model"]["layers"], dim=m["model"]["dim"], k=st["k"]), "", prose(
        "**Subset (the same for every key type).** Datastore: the first {ta} of {tt} train articles ({frac:.0%}), "
        "{tn:,} tokens. Evaluation: the first {va} of {vt} valid articles, {vn:,} tokens (of {vtotal:,}). Both binarized "
        "with the checkpoint's dictionary. A full-train dump and a full valid pass for each of {n} key types would take "
        "about {hours:.0f} hours on this {cpus}-core CPU (results/wikitext2: {dump:.0f} min per dump, {valid:.0f} min per "
        "valid pass), so the numbers compare with each other, not with results/wikitext2's full datastore.",
        ta=sub["train"]["articles"], tt=sub["train"]["articles_total"], frac=st["train_articles"], tn=sub["train"]["tokens"],
        va=sub["valid"]["articles"], vt=sub["valid"]["articles_total"], vn=sub["valid"]["tokens"],
        vtotal=sub["valid"]["tokens_total"], n=len(rows), hours=len(rows) * (full["dump_s"] + full["valid_pass_s"]) / 3600,
        cpus=m["machine"]["cpus"], dump=full["dump_s"] / 60, valid=full["valid_pass_s"] / 60), "", prose(
        "Dump `--tokens-per-sample {dt} --context-window {dc}`, index `{f}`{scaled} trained on {ts:,} sampled keys, "
        "nprobe {probe}, evaluation `--tokens-per-sample {et} --context-window {ec}`, k {k}, λ ∈ {{{lmbdas}}}, T ∈ "
        "{{{temps}}}.", dt=st["dump_tokens_per_sample"], dc=st["dump_context_window"], f=st["factory"], scaled=scaled,
        ts=st["train_size"], probe=st["probe"], et=st["eval_tokens_per_sample"], ec=st["eval_context_window"], k=st["k"],
        lmbdas=grid_text(st["lmbdas"]), temps=grid_text(st["temps"])),
        "", "## Valid perplexity by key type", "",
        prose("Base LM (no datastore) on this valid prefix: **{b:.2f}**.", b=base), "",
        table(["key type", "dim", "keys", "exact distances", "λ, T (exact)", "approx distances", "λ, T (approx)",
               "exact vs base"],
              [[f"`{r['key_type']}`", r["dim"], f"{r['n_keys']:,}",
                ("**{:.2f}**" if r["exact"]["ppl"] == best else "{:.2f}").format(r["exact"]["ppl"]), tuned(r["exact"]),
                f"{r['approx']['ppl']:.2f}", tuned(r["approx"]), f"{r['exact']['ppl'] / base - 1:+.1%}"] for r in rows]), "",
        *(["† tuned at the edge of the grid (largest T or λ): the optimum may lie beyond it.", ""]
          if any(r[k].get("at_grid_edge") for r in rows for k in ("exact", "approx")) else []),
        f"**Against the paper.** {ranking_sentence(m)}", "", prose(
            "The paper (WikiText-103 dev, {pl}-layer {pd}-d model; no datastore {pb}, its default key {pk}) finds the "
            "final layer's FFN input after layer norm the best key and the final layer better than the second-to-last. "
            "Our key names map to its rows as: {names}; `second_last_*` are the same points one block lower.",
            pl=pa["lm_layers"], pd=pa["lm_dim"], pb=pa["base_dev"], pk=pa["knnlm_dev"],
            names="; ".join(f"`{k}` = {v}" for k, v in PAPER_NAMES.items())), "",
        f"![ppl by key type]({m['plot']})", "", prose(
            "Cross-check, each key type's `fairseq-eval-lm --knnlm` run at fixed λ={l}, T={t:g} (exact) against the "
            "sweep's value there: {pairs}.", l=st["lmbda"], t=st["knn_temp"], pairs=", ".join(
                f"{r['key_type']} {r['eval_lm_ppl_exact']:.2f} vs {r['sweep_at_eval_settings_exact']:.2f}" for r in rows)),
        "", "## Runs", "", prose("Whole report: {mins:.1f} min of stages ({how}).", mins=m["total_seconds"] / 60, how=(
            "some reused from an earlier run; times are those of the run that made them" if m["reused"] else "all run now")),
        "", table(["key type", "stage", "seconds", "peak RSS (MB)", "command"],
                  [["—", *row] for row in stage_rows({"preprocess": sub["preprocess"]})]
                  + [[r["key_type"], *row] for r in rows for row in stage_rows(r["stages"])]), "",
        "## Versions", "", ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""])
