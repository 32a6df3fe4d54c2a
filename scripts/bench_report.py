"""make bench's report: rendered from metrics.json alone (see bench.py)."""
import os

from knnlm_fairseq.experiments.report import dash, line_panels, prose, stage_rows, table

NAMES = {"base": "base LM", "paper_exact": "kNN-LM, paper recipe (exact distances)",
         "paper_approx": "kNN-LM, paper index, approximate distances", "fast": "kNN-LM, fast settings (tuned on {tune})"}


def ratio(m, name, split):
    """Time of a row over the base LM's on the same split and tokens: > 1 is slower."""
    return m["runs"][f"base_{split}"]["tok_s"] / m["runs"][f"{name}_{split}"]["tok_s"]


def searched(run):
    s = (run.get("stats") or {}).get("components", {}).get("KnnSearch")
    return None if s is None else s["searched"] / max(s["rows"], 1)


def split_of_time(run):
    """Seconds in the LM forward, its softmax, the search (faiss, exact distances), the gate and the mix; other:
    the rest of eval-lm's timed loop (tokens / tokens/s)."""
    st = run["stats"]
    c = st["components"]
    search = c.get("KnnSearch", {})
    gate = c.get("SignalGate", {}).get("seconds")  # None: no gate in this run (shown as —, not as 0.0)
    return [st["seconds"]["lm_forward"], st["seconds"]["lm_softmax"], search.get("faiss_seconds", 0.0),
            search.get("exact_seconds", 0.0), gate,
            c.get("KnnMixer", {}).get("seconds", 0.0), run["tokens"] / run["tok_s"] - st["seconds"]["lm_forward"]
            - st["seconds"]["lm_softmax"] - search.get("seconds", 0.0) - (gate or 0.0)
            - c.get("KnnMixer", {}).get("seconds", 0.0)]


def render(m):
    tune, test = m["splits"][0], m["splits"][-1]
    name = {k: v.format(tune=tune) for k, v in NAMES.items()}
    rows = []
    for r in m["rows"]:
        run = m["runs"][f"{r}_{tune}"]
        frac = searched(run)
        rows.append([name[r]] + [f"{m['runs'][f'{r}_{s}']['ppl']:.2f}" for s in m["splits"]] + [
            f"{run['tok_s']:,.0f}", f"{ratio(m, r, tune):.2f}×", "—" if frac is None else f"{frac:.1%}",
            f"{run['peak_rss_mb']:,.0f}"])
    split_rows = [[name[r]] + [dash(x, "{:.1f}") for x in split_of_time(m["runs"][f"{r}_{tune}"])]
                  for r in m["rows"] if r != "base"]
    chosen = m["tuned"]
    lines = [
        "# kNN-LM speed: base LM and kNN-LM timed side by side", "",
        prose("One run on this machine ({cores} cores, {cpu}), the same {tok} tokens of each split for every row; "
              "tokens/s is fairseq-eval-lm's (model time, data loading excluded), the ratio is each row's time over "
              "the base LM's on {tune}.", cores=m["machine"]["cpus"], cpu=m["machine"]["cpu_model"],
              tok=", ".join(f"{m['runs'][f'base_{s}']['tokens']:,} {s}" for s in m["splits"]), tune=tune), "",
        table(["configuration"] + [f"{s} ppl" for s in m["splits"]] + [f"{tune} tokens/s", "time vs base",
                                                                      "tokens that searched", "peak RSS (MB)"], rows),
        "",
        prose("The fast settings, chosen by `knnlm-sweep` on the {tune} log of the fast index ({f}, nprobe {p}): "
              "{summary}. Test uses the same file unchanged (`fairseq-eval-lm --knn-settings`).", tune=tune,
              f=m["index"]["fast"]["factory_used"], p=m["settings"]["fast_probe"], summary=chosen["summary"]), "",
        prose("Against the paper recipe on {test}: {fp:.2f} vs {pp:.2f} ({d:+.2%}) at {r:.2f}× the base LM's time "
              "(paper recipe: {pr:.2f}×).", test=test, fp=m["runs"][f"fast_{test}"]["ppl"],
              pp=m["runs"][f"paper_exact_{test}"]["ppl"],
              d=m["runs"][f"fast_{test}"]["ppl"] / m["runs"][f"paper_exact_{test}"]["ppl"] - 1,
              r=ratio(m, "fast", test), pr=ratio(m, "paper_exact", test)), "",
        "## Where the time goes", "",
        prose("Seconds on {tune}, from `--knn-stats`: the LM's forward and softmax are the base LM's own work; the "
              "rest is retrieval (faiss search, exact distances from the stored keys, the gate's signal, the "
              "interpolation) and eval-lm's own bookkeeping.", tune=tune), "",
        table(["configuration", "LM forward", "LM softmax", "faiss search", "exact distances", "gate", "mix",
               "other"], split_rows), "",
        "## The frontier", "",
        "![frontier](frontier.png)", "",
        prose("Left: perplexity against speed for each row. Right: the sweep's frontier on {tune} for the chosen "
              "distance kind and k (each point skips the search on more of the tokens whose bucket gains least).",
              tune=tune), "",
        *pointer_section(m),
        "## Stages", "",
        table(["stage", "seconds", "peak RSS (MB)", "command"], stage_rows(m["stages"])), "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
    ]
    return "\n".join(lines)


def plot(m, out):
    tune = m["splits"][0]
    speed = [{"x": [m["runs"][f"{r}_{tune}"]["tok_s"]], "y": [m["runs"][f"{r}_{tune}"]["ppl"]], "fmt": "o",
              "label": NAMES[r].format(tune=tune)} for r in m["rows"]]
    frontier = [{"x": [p["searched"] for p in f["points"]], "y": [p["ppl"] for p in f["points"]], "fmt": "-o",
                 "label": f"gate: {f['gate']}"} for f in m["sweep"]["frontiers"]]
    panels = [{"title": f"{tune}: perplexity vs tokens/s", "xlabel": "tokens/s", "lines": speed},
              {"title": f"{tune}: sweep frontier", "xlabel": "fraction of tokens that search", "lines": frontier,
               "hline": (m["sweep"]["chosen"]["reference"]["ppl"], "best exact setting")}]
    return [line_panels(os.path.join(out, "frontier.png"), "kNN-LM: perplexity vs cost", panels)]


def pointer_section(m):
    """Pointer reuse (RetoMaton) as knnlm-sweep --pointers simulated it on the tune log's first tokens."""
    rows = m["sweep"].get("pointers") or []
    if not rows:
        return []
    tune = m["splits"][0]
    tokens = min(m["settings"]["pointer_tokens"], m["sweep"]["n_tokens"])
    table_rows = [[r["kind"], "no reuse (every token searches)" if r["min_pointers"] is None else str(r["min_pointers"]),
                   f"{r['searched']:.1%}", f"{r['ppl']:.2f}"] for r in rows]
    return ["## Pointer reuse (simulated)", "",
            prose("Pointer reuse follows the neighbours that predicted the previous token one position on and "
                  "searches only when fewer than a minimum of them survive; replayed by `knnlm-sweep --pointers` "
                  "on the first {tok:,} tokens of the {tune} log, at each distance kind's tuned k, T and λ.",
                  tok=tokens, tune=tune), "",
            table(["distances", "minimum pointers", "tokens that searched", f"{tune} ppl"], table_rows), ""]
