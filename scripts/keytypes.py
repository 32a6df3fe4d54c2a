#!/usr/bin/env python
"""Which representation makes the best key: the kNN-LM paper's Table 5 on a fixed WikiText-2 subset.

For every key type (`--knn-keytype`): dump a train datastore, build an index, evaluate valid once with
`--save-retrieval` (the log holds the LM's log-probs and both distance kinds), then `knnlm-sweep` tunes
λ and T on that same valid log. Valid is tuned and reported, like the paper's Table 5 (dev).

A full-train dump per key type does not fit a CPU budget, so every key type uses the same subset: the
first --train-articles fraction of train articles and a by-article prefix of valid of >= --valid-tokens.
Each key type's stages and numbers are kept in WORK/<key type>/result.json, so `--reuse` resumes.
Writes OUT/metrics.json, OUT/report.md and OUT/ppl_by_keytype.png.
"""
import argparse
import os
import re
import shutil
import sys

import numpy as np

from pipeline import BIN, KNN_TASK, add_run_settings, cli, eval_lm, eval_numbers, read_json, run, versions, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from knnlm_fairseq.core.keys import KEY_TYPES  # noqa: E402  (pure torch: no fairseq import)

# a WikiText article starts with a top-level heading " = Title = "; sections are " = = Section = = "
ARTICLE = re.compile(r"^ = [^=].* = $")
# the paper's Table 5 names for ours (WikiText-103 dev; its model is pre-norm like ours)
PAPER_NAMES = {
    "last_ffn_input": "FFN input after layer norm (the paper's best, its default)",
    "last_ffn_output": "FFN output (before the residual add)",
    "last_attn_input": "MHSA input after layer norm",
    "last_block_output": "final block output (before the decoder's last layer norm)",
}


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


# ---- the subset ---------------------------------------------------------------------------------
def articles(path):
    """Lines grouped by article (a heading line starts one); text before the first heading joins the first."""
    out, preface = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if ARTICLE.match(line.rstrip("\n")):
                out.append(preface + [line] if not out else [line])
            elif out:
                out[-1].append(line)
            else:
                preface.append(line)  # WikiText files open with a blank line
    return out or [preface]


def n_tokens(lines):
    """What fairseq-preprocess makes of the lines: the words of each plus one </s>, blank lines included."""
    return sum(len(line.split()) + 1 for line in lines)


def write_prefix(src, dst, n_articles=None, min_tokens=None):
    """Write whole leading articles of src to dst: n_articles of them, or as many as reach min_tokens."""
    arts, kept = articles(src), []
    for art in arts:
        if (n_articles is not None and len(kept) >= n_articles) or \
                (min_tokens is not None and n_tokens([x for a in kept for x in a]) >= min_tokens):
            break
        kept.append(art)
    lines = [x for a in kept for x in a]
    with open(dst, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return {"source": os.path.abspath(src), "articles": len(kept), "articles_total": len(arts),
            "lines": len(lines), "tokens": n_tokens(lines)}


def make_subset(a, logs, stages):
    """Text prefixes of train and valid, binarized with the checkpoint's dictionary so ids match the model."""
    raw, data = os.path.join(a.work, "raw"), os.path.join(a.work, "data-bin")
    info_path = os.path.join(a.work, "subset.json")
    if a.reuse and os.path.exists(info_path) and os.path.exists(os.path.join(data, "valid.bin")):
        return data, read_json(info_path)
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(raw, exist_ok=True)
    n_train = len(articles(os.path.join(a.raw_dir, "wiki.train.tokens")))
    info = {"train": write_prefix(os.path.join(a.raw_dir, "wiki.train.tokens"), os.path.join(raw, "train.txt"),
                                  n_articles=int(a.train_articles * n_train)),
            "valid": write_prefix(os.path.join(a.raw_dir, "wiki.valid.tokens"), os.path.join(raw, "valid.txt"),
                                  min_tokens=a.valid_tokens)}
    run("preprocess", [f"{BIN}/fairseq-preprocess", "--only-source", "--srcdict", a.dict,
                       "--trainpref", os.path.join(raw, "train.txt"), "--validpref", os.path.join(raw, "valid.txt"),
                       "--destdir", data, "--workers", "2"], logs, stages)
    info["preprocess"] = stages["preprocess"]
    write_json(info_path, info)
    return data, info


# ---- one key type ---------------------------------------------------------------------------------
def run_keytype(a, kt, data):
    """Dump, index, one valid pass with a retrieval log, sweep. Returns (and stores) the key type's result.

    With --reuse a finished key type is kept; if only the λ/T grid changed, just the (offline) sweep runs again.
    """
    work = os.path.join(a.work, kt)
    result_path, sweep_json = os.path.join(work, "result.json"), os.path.join(work, "sweep.json")
    logs, dstore, rlog = (os.path.join(work, x) for x in ("logs", "dstore", "retrieval-valid"))
    sweep_cmd = [f"{BIN}/knnlm-sweep", rlog, "--lmbdas", ",".join(map(str, a.lmbdas)), "--ks", str(a.k),
                 "--temps", ",".join(map(str, a.temps)), "--output", sweep_json]
    if a.reuse and os.path.exists(result_path):
        old = read_json(result_path)
        s = read_json(sweep_json)["settings"]
        if (s["lmbdas"], s["temps"], s["ks"]) == (a.lmbdas, a.temps, [a.k]):
            print(f"{kt}: reusing {result_path}", flush=True)
            return old
        print(f"{kt}: reusing the retrieval log, sweeping the new λ/T grid", flush=True)
        stages = old["stages"]
        run("sweep", sweep_cmd, logs, stages)
        return summarize(a, kt, work, stages, {"ppl": old["eval_lm_ppl_exact"], "tok_s": old["eval_lm_tok_s"]})
    shutil.rmtree(work, ignore_errors=True)
    stages, device = {}, a.device.split()
    key = ["--knn-keytype", kt]  # the same flag for the dump and the evaluation
    run("dump", eval_lm(data, a.checkpoint, "train", a.dump_tokens_per_sample, a.dump_context_window, a.max_tokens,
                        device) + KNN_TASK + key + ["--save-dstore", "--dstore-dir", dstore], logs, stages)
    run("index", [f"{BIN}/knnlm-build-index", dstore, "--factory", a.factory, "--train-size", a.train_size,
                  "--no-progress-bar"], logs, stages)
    ev = eval_numbers(run("knnlm_valid", eval_lm(
        data, a.checkpoint, "valid", a.eval_tokens_per_sample, a.eval_context_window, a.max_tokens, device)
        + KNN_TASK + key + ["--knnlm", "--dstore-dir", dstore, "--k", a.k, "--lmbda", a.lmbda, "--knn-temp",
                            a.knn_temp, "--probe", a.probe, "--knn-dist", "exact", "--save-retrieval", rlog],
        logs, stages))
    run("sweep", sweep_cmd, logs, stages)
    return summarize(a, kt, work, stages, ev)


def summarize(a, kt, work, stages, ev):
    """The key type's row from its manifest, index sidecar and sweep; written to WORK/<key type>/result.json."""
    sweep = read_json(os.path.join(work, "sweep.json"))
    manifest = read_json(os.path.join(work, "dstore", "manifest.json"))
    index_meta = read_json(os.path.join(work, "dstore", "index.faiss.json"))
    row, s = sweep["logs"][0], sweep["settings"]
    grid = {kind: np.array(row["ppl"][kind])[0] for kind in ("exact", "approx")}  # (T, L) at the one k
    res = {"key_type": kt, "dim": manifest["dim"], "n_keys": manifest["count"], "manifest_key_type": manifest["key_type"],
           "index": index_meta["factory_used"], "base_ppl": round(row["base_ppl"], 2), "n_tokens": row["n_tokens"],
           "eval_lm_ppl_exact": ev["ppl"], "eval_lm_tok_s": ev["tok_s"],
           "sweep_at_eval_settings_exact": round(float(grid["exact"][s["temps"].index(a.knn_temp),
                                                                     s["lmbdas"].index(a.lmbda)]), 2),
           "temps": s["temps"], "lmbdas": s["lmbdas"],
           "grid": {kind: np.round(g, 3).tolist() for kind, g in grid.items()},  # (T, λ), to re-tune or plot
           "stages": stages, "seconds": round(sum(st["seconds"] for st in stages.values()), 1)}
    for kind in ("exact", "approx"):
        b = sweep["tuned"][kind]
        res[kind] = {"ppl": round(b["ppl"], 2), "lmbda": b["lmbda"], "temp": b["temp"],
                     "at_grid_edge": b["temp"] == max(s["temps"]) or b["lmbda"] == max(s["lmbdas"])}
    write_json(os.path.join(work, "result.json"), res)
    return res


# ---- report -----------------------------------------------------------------------------------------
def ranking_sentence(rows):
    """Does our ranking agree with the paper's two claims? Both checked on exact distances."""
    ppl = {r["key_type"]: r["exact"]["ppl"] for r in rows}
    best = min(ppl, key=ppl.get)
    claims = []
    if "last_ffn_input" in ppl:
        if best == "last_ffn_input":
            claims.append(f"FFN input after layer norm is the best key, as in the paper ({ppl[best]:.2f})")
        else:
            gap = ppl["last_ffn_input"] - ppl[best]
            claims.append(f"FFN input after layer norm is not the best key (the paper: best): `{best}` is, by "
                          f"{gap:.2f} ppl ({ppl[best]:.2f} vs {ppl['last_ffn_input']:.2f}; "
                          + ("under 0.2 ppl: a tie at this subset's resolution)" if gap < 0.2 else "a clear margin)"))
    pairs = [(n, "second_" + n) for n in ppl if n.startswith("last_") and "second_" + n in ppl]
    if pairs:
        wins = [n for n, s in pairs if ppl[n] < ppl[s]]
        claims.append(f"the final layer beats the second-to-last for {len(wins)} of {len(pairs)} representations"
                      + (" (as in the paper)" if len(wins) == len(pairs) else
                         f" (the paper: final layer better; ours is not for "
                         f"{', '.join('`' + n + '`' for n, _ in pairs if n not in wins)})"))
    return "; ".join(claims) + "."


def plot(rows, base, out_dir):
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    names = [r["key_type"] for r in rows]
    x = np.arange(len(rows))
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
    ax.set_ylabel("valid perplexity (subset)")
    ax.set_title("kNN-LM valid perplexity by key type (WikiText-2 subset)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    name = "ppl_by_keytype.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def tuned(b):
    """λ, T of a tuned setting; † where it is the grid's largest T or λ (the optimum may lie beyond)."""
    return f"{b['lmbda']}, {b['temp']:g}" + (" †" if b.get("at_grid_edge") else "")


def table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def settings_line(st, factory_used):
    scaled = f" (scaled to `{factory_used}` for this size)" if factory_used != st["factory"] else ""
    temps = ", ".join(f"{t:g}" for t in st["temps"])
    return (f"Dump `--tokens-per-sample {st['dump_tokens_per_sample']} --context-window {st['dump_context_window']}`, "
            f"index `{st['factory']}`{scaled} trained on {st['train_size']:,} sampled keys, nprobe {st['probe']}, "
            f"evaluation `--tokens-per-sample {st['eval_tokens_per_sample']} --context-window "
            f"{st['eval_context_window']}`, k {st['k']}, λ ∈ {{0, 0.01, …, 0.1, 0.15, …, 0.9}}, T ∈ {{{temps}}}.")


def render(m):
    st, sub, rows = m["settings"], m["subset"], m["keytypes"]
    base = m["base_ppl"]
    lines = [f"# {m['title']}", "",
             "The kNN-LM paper's Table 5 asks which representation of the context makes the best key. Here every "
             "key type the plugin supports (`--knn-keytype`) gets its own datastore, index and valid pass with the "
             f"shipped 4 × 256 pre-norm checkpoint; λ and T are tuned by `knnlm-sweep` on valid at k={st['k']} and "
             "valid is reported (the paper's Table 5 also reports dev).", "",
             f"**Subset (the same for every key type).** Datastore: the first {sub['train']['articles']} of "
             f"{sub['train']['articles_total']} train articles ({st['train_articles']:.0%}), "
             f"{sub['train']['tokens']:,} tokens. Evaluation: the first {sub['valid']['articles']} of "
             f"{sub['valid']['articles_total']} valid articles, {sub['valid']['tokens']:,} tokens (of 217,646). "
             "Both binarized with the checkpoint's dictionary. A full-train dump and a full valid pass for each of 8 "
             "key types would take about 3 hours on this 2-core CPU (results/wikitext2: 16 min per dump, 7 min per "
             "valid pass), so the numbers compare with each other, not with results/wikitext2's full datastore.", "",
             settings_line(st, rows[0]["index"]),
             "", "## Valid perplexity by key type", "",
             f"Base LM (no datastore) on this valid prefix: **{base:.2f}**.", ""]
    best = min(r["exact"]["ppl"] for r in rows)
    lines += [table(["key type", "dim", "keys", "exact distances", "λ, T (exact)", "approx distances", "λ, T (approx)",
                     "exact vs base"],
                    [[f"`{r['key_type']}`", r["dim"], f"{r['n_keys']:,}",
                      ("**{:.2f}**" if r["exact"]["ppl"] == best else "{:.2f}").format(r["exact"]["ppl"]),
                      tuned(r["exact"]), f"{r['approx']['ppl']:.2f}", tuned(r["approx"]),
                      f"{r['exact']['ppl'] / base - 1:+.1%}"] for r in rows]), "",
              *(["† tuned at the edge of the grid (largest T or λ): the optimum may lie beyond it.", ""]
                if any(r[k].get("at_grid_edge") for r in rows for k in ("exact", "approx")) else []),
              f"**Against the paper.** {m['ranking']}", "",
              "The paper (WikiText-103 dev, 16-layer 1024-d model; no datastore 17.96, its default key 16.06) finds the "
              "final layer's FFN input after layer norm the best key and the final layer better than the "
              "second-to-last. Our key names map to its rows as: " +
              "; ".join(f"`{k}` = {v}" for k, v in PAPER_NAMES.items()) +
              "; `second_last_*` are the same points one block lower.", "",
              f"![ppl by key type]({m['plot']})", "",
              "Cross-check, each key type's `fairseq-eval-lm --knnlm` run at fixed λ="
              f"{st['lmbda']}, T={st['knn_temp']:g} (exact) against the sweep's value there: " +
              ", ".join(f"{r['key_type']} {r['eval_lm_ppl_exact']:.2f} vs {r['sweep_at_eval_settings_exact']:.2f}"
                        for r in rows) + ".", "",
              "## Runs", "",
              f"Whole report: {m['total_seconds'] / 60:.1f} min of stages "
              f"({'some reused from an earlier run; times are those of the run that made them' if m['reused'] else 'all run now'}).",
              "", table(["key type", "stage", "seconds", "peak RSS (MB)", "command"],
                        [["—", "preprocess", sub["preprocess"]["seconds"], sub["preprocess"]["peak_rss_mb"],
                          f"`{sub['preprocess']['command']}`"]] +
                        [[r["key_type"], n, s["seconds"], s["peak_rss_mb"], f"`{s['command']}`"]
                         for r in rows for n, s in r["stages"].items()]), "",
              "## Versions", "", ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    return "\n".join(lines)


def main(argv=None):
    a = get_parser().parse_args(argv)
    a.dict = a.dict or os.path.join(os.path.dirname(a.checkpoint), "dict.txt")
    a.keytypes = a.keytypes.split(",")
    for kt in a.keytypes:
        if kt not in KEY_TYPES:
            sys.exit(f"keytypes.py: error: unknown key type '{kt}'; choose from {', '.join(KEY_TYPES)}")
    for name, value, grid in (("--lmbda", a.lmbda, a.lmbdas), ("--knn-temp", a.knn_temp, a.temps)):
        if value not in grid:
            grid.append(value)
            grid.sort()
    print(f"settings: {vars(a)}", flush=True)
    reused = a.reuse and os.path.exists(os.path.join(a.work, "subset.json"))
    data, subset = make_subset(a, os.path.join(a.work, "logs"), {})
    rows = []
    for kt in a.keytypes:
        reused |= a.reuse and os.path.exists(os.path.join(a.work, kt, "result.json"))
        rows.append(run_keytype(a, kt, data))
        r = rows[-1]
        print(f"{kt}: dim {r['dim']}, {r['n_keys']:,} keys, base {r['base_ppl']:.2f}, exact {r['exact']['ppl']:.2f} "
              f"(λ {r['exact']['lmbda']}, T {r['exact']['temp']}), approx {r['approx']['ppl']:.2f}, "
              f"{r['seconds']:.0f} s", flush=True)
    bases = {r["base_ppl"] for r in rows}
    assert len(bases) == 1, f"the base LM differs between key types' passes: {bases}"
    os.makedirs(a.out, exist_ok=True)
    m = {"title": "kNN-LM key types on WikiText-2 (the paper's Table 5, CPU subset)",
         "base_ppl": bases.pop(), "subset": subset, "keytypes": rows, "ranking": ranking_sentence(rows),
         "best_exact": min(rows, key=lambda r: r["exact"]["ppl"])["key_type"],
         "best_approx": min(rows, key=lambda r: r["approx"]["ppl"])["key_type"],
         "total_seconds": round(subset["preprocess"]["seconds"] + sum(r["seconds"] for r in rows), 1),
         "reused": bool(reused), "settings": {k: v for k, v in vars(a).items() if k != "keytypes"},
         "versions": versions()}
    m["plot"] = plot(rows, m["base_ppl"], a.out)
    write_json(os.path.join(a.out, "metrics.json"), m)
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write(render(m))
    print(open(os.path.join(a.out, "report.md")).read())
    return 0


if __name__ == "__main__":
    cli(main)
