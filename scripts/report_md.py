"""metrics.json -> report.md: the numbers, the commands that produced them, timings and versions."""


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(m, splits):
    st, sp, ds, ix = m["settings"], m["speed"], m["dstore"], m["index"]
    lines = [f"# {m['title']}", "",
             f"Datastore: {ds['n']:,} `{ds['key_type']}` keys of dim {ds['dim']} from `{ds['split']}` "
             f"(blocks of {ds['tokens_per_sample']} tokens, context window {ds['context_window']}). "
             f"Index: `{ix['factory']}` (asked `{ix['factory_asked']}`), nprobe {ix['nprobe']}, k {st['k']}.", "",
             "## Perplexity", "",
             f"λ and T are tuned on {splits[0]} at k={st['k']} by `knnlm-sweep` (offline, from one retrieval pass) "
             f"and applied unchanged to {splits[1]}.", ""]
    rows = []
    for split in splits:
        r = m[split]
        rows.append([split, f"{r['n_tokens']:,}", f"{r['base_ppl']:.2f}",
                     f"{r['knnlm_ppl_approx']:.2f} (λ={r['best_lmbda_approx']}, T={r['best_temp_approx']})",
                     f"{r['knnlm_ppl_exact']:.2f} (λ={r['best_lmbda']}, T={r['best_temp']})",
                     f"{r['knnlm_ppl_exact'] / r['base_ppl'] - 1:+.1%}"])
    lines += [_table(["split", "tokens", "base LM", "kNN-LM, approx distances", "kNN-LM, exact distances",
                      "exact vs base"], rows), ""]
    lines += ["Cross-check: `fairseq-eval-lm --knnlm` at the run's fixed settings "
              f"(λ={st['eval_lmbda']}, T={st['eval_knn_temp']}, exact) against the sweep's value there: " +
              ", ".join(f"{s} {m[s]['eval_lm_knnlm_ppl_exact']:.2f} vs {m[s]['sweep_at_eval_settings_exact']:.2f}"
                        for s in splits) + ".", ""]
    if "paper" in m:
        p = m["paper"]
        lines += [f"## Against the paper (tolerance ±{p['tolerance']} ppl)", "", p.get("source", ""), "",
                  _table(["split", "number", "paper", "ours", "diff", ""],
                         [[r["split"], r["key"], r["paper"], f"{r['ours']:.2f}", f"{r['diff']:+.2f}",
                           "PASS" if r["pass"] else "FAIL"] for r in p["rows"]]), ""]
    if m.get("downloads"):
        lines += ["## Sources", "", _table(["file", "from", "bytes", "sha256", "checksum"], [
            [f"`{d['file']}`", d["url"], f"{d['bytes']:,}", f"`{d['sha256']}`",
             ", ".join(f"{k} verified ({v})" for k, v in d["verified"].items()) or "recorded, not pinned"]
            for d in m["downloads"]]), ""]
    lines += ["## Plots", ""] + [f"![{f}]({f})" for f in m["plots"]] + [""]
    lines += ["## Speed and memory", "",
              f"Base LM {sp['base_tok_s']:,} tokens/s; kNN-LM {sp['knnlm_approx_tok_s']:,} tokens/s with approximate "
              f"distances ({sp['approx_ratio']:.2f}× the base) and {sp['knnlm_exact_tok_s']:,} tokens/s with exact "
              f"distances ({sp['exact_ratio']:.2f}×; {sp['note']}). Dump {sp['dump_tok_s']:,} tokens/s. "
              f"Index train {ix['train_s']:.1f} s, add {ix['add_s']:.1f} s.", "",
              _table(["stage", "seconds", "peak RSS (MB)", "command"],
                     [[n, s["seconds"], s["peak_rss_mb"] or "—", f"`{s['command']}`"] for n, s in m["stages"].items()]), "",
              "## Versions", "", ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""]
    return "\n".join(lines)
