"""make analysis's report: rendered from metrics.json alone (see analysis.py)."""
import os

from knnlm_fairseq.experiments.report import dash, line_panels, prose, stage_rows, table


def group_rows(rows):
    return [[r["group"], f"{r['tokens']:,}", dash(r["lm_ppl"], "{:.2f}"), dash(r["knnlm_ppl"], "{:.2f}"),
             dash(r["gain_per_token"], "{:+.4f}"), f"{r['gain_share']:.1%}"] for r in rows]


def verdict(m):
    """Whether the rarest targets gain most per token, and what share of the gain they carry, from the rows."""
    rows = [r for r in m["by_frequency"] if r["tokens"]]
    rare, common = rows[0], rows[-1]
    per_token = [r["gain_per_token"] for r in rows]
    falls = all(x >= y for x, y in zip(per_token, per_token[1:]))
    holds = rare["gain_per_token"] > common["gain_per_token"]
    names = {r["group"]: r for r in m["by_kind"]}
    return prose("Verdict: the paper's claim {holds} here. Per token, targets seen {rg} times in the datastore's text "
                 "gain {rpt:+.3f} nats against {cpt:+.3f} for those seen {cg} times{mono}; the rarest bucket holds "
                 "{rt:.1%} of the tokens and {rs:.1%} of the total gain. Names gain {npt:+.3f} nats per token "
                 "({ns:.1%} of the gain from {nt:.1%} of the tokens), numbers {mpt:+.3f}, other words {opt:+.3f}.",
                 holds="holds" if holds else "does not hold", rg=rare["group"], rpt=rare["gain_per_token"],
                 cpt=common["gain_per_token"], cg=common["group"],
                 mono=" (falling with frequency across every bucket)" if falls else " (not monotone across buckets)",
                 rt=rare["tokens"] / m["tokens"], rs=rare["gain_share"], npt=names["name"]["gain_per_token"],
                 ns=names["name"]["gain_share"], nt=names["name"]["tokens"] / m["tokens"],
                 mpt=names["number"]["gain_per_token"], opt=names["other"]["gain_per_token"])


def example_rows(examples):
    out = []
    for e in examples:
        best = e["neighbours"][0] if e["neighbours"] else None
        out.append([f"… {e['before']} **{e['word']}**", f"{e['p_lm']:.2g}", f"{e['p']:.2g}", f"{e['gain']:+.3f}",
                    dash(best and best["context"]), dash(best and f"{best['weight']:.3f}")])
    return out


def render(m):
    st = m["settings"]
    head = ["group", "tokens", "LM ppl", "kNN-LM ppl", "gain per token (nats)", "share of the gain"]
    ex_head = ["text (target in bold)", "p_LM", "p", "gain", "nearest neighbour's text (its value in brackets)",
               "its weight"]
    return "\n".join([
        "# Where kNN-LM helps: rare patterns?", "",
        prose("{split}: {n:,} tokens, datastore of {dn:,} `{ds}` entries; k={k}, λ={l}, T={t}, {kind} distances. "
              "Perplexity {b:.2f} → {kp:.2f}.", split=m["split"], n=m["tokens"], dn=m["dstore"]["count"],
              ds=m["dstore"]["split"], k=st["k"], l=st["lmbda"], t=st["knn_temp"], kind=st["knn_dist"],
              b=m["base_ppl"], kp=m["knnlm_ppl"]), "",
        verdict(m), "",
        "## By the target's frequency in the datastore's text", "",
        table(head, group_rows(m["by_frequency"])), "",
        "## By kind of word", "",
        "A heuristic without a tagger: a digit makes a number; a capital not after a sentence end makes a name.", "",
        table(head, group_rows(m["by_kind"])), "",
        "![gain by frequency](gain_by_frequency.png)", "",
        "## The largest gains", "", table(ex_head, example_rows(m["examples"]["gains"])), "",
        "## The largest losses", "", table(ex_head, example_rows(m["examples"]["losses"])), "",
        "## Stages", "", table(["stage", "seconds", "peak RSS (MB)", "command"], stage_rows(m["stages"])), "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), ""])


def plot(m, out):
    rows = [r for r in m["by_frequency"] if r["tokens"]]
    x = list(range(len(rows)))
    panels = [{"title": "perplexity by target frequency", "xlabel": "bucket: " + ", ".join(
                   f"{i}: {r['group']}" for i, r in zip(x, rows)), "lines": [
                   {"x": x, "y": [r["lm_ppl"] for r in rows], "fmt": "-o", "label": "LM"},
                   {"x": x, "y": [r["knnlm_ppl"] for r in rows], "fmt": "-s", "label": "kNN-LM"}]},
              {"title": "gain per token (nats)", "xlabel": "bucket", "ylabel": "nats", "lines": [
                   {"x": x, "y": [r["gain_per_token"] for r in rows], "fmt": "-o", "label": "gain per token"}]}]
    return [line_panels(os.path.join(out, "gain_by_frequency.png"), "kNN-LM gain by target frequency", panels,
                        width=6, fontsize=10)]
