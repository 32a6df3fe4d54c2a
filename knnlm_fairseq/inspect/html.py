"""One self-contained static HTML page per inspected split: no network, no build step, opens from file://.

render(data) -> str, where data is

    meta     {"title", "split", "dstore", "k", "lmbda", "knn_temp", "knn_dist", "checkpoint", "neighbours_shown"}
    summary  {"tokens", "base_ppl", "knnlm_ppl"}
    vocab    [word, ...]  every word used below, referenced by index
    tokens   column arrays, one entry per scored token in text order:
             w     vocab index of the token ("</s>" ends a line)
             lm, knn, p   p_LM(w), p_kNN(w) and the interpolated p(w)
             gain  log p - log p_LM in nats (> 0: kNN helped)
             nb    per token its top neighbours [[row, dist, weight, value, [ctx ids], at], ...] where
                   ctx[at] == value (an empty ctx means the datastore's text was not available)

The data is embedded once as JSON; viewer.js builds one page of token spans at a time and a neighbour panel only
for the token hovered or clicked, so a 20k-token split opens in about a second.
"""
import html
import json
import math
import string
from pathlib import Path

PAGE_SIZE = 2000  # token spans alive at once: 2k build in milliseconds, 100k would stall the first paint
TOP = 10  # entries in each of the "largest gains" and "largest losses" lists
META = ("title", "split", "dstore", "k", "lmbda", "knn_temp", "knn_dist", "checkpoint", "neighbours_shown")
SUMMARY = ("tokens", "base_ppl", "knnlm_ppl")
COLUMNS = ("w", "lm", "knn", "p", "gain", "nb")
SETTINGS = (  # (meta key, label) in the order the header shows them; other meta keys follow under their own name
    ("split", "split"), ("dstore", "datastore"), ("checkpoint", "checkpoint"), ("k", "k"), ("lmbda", "λ"),
    ("knn_temp", "T"), ("knn_dist", "distances"), ("neighbours_shown", "neighbours shown"))
# candidate ends of the colour scale in nats: round numbers close enough that rounding up wastes few shades
NICE = tuple(round(m * 10.0**e, 6) for e in range(-2, 2) for m in (1, 1.5, 2, 3, 4, 5, 6, 8)) + (100.0,)
HERE = Path(__file__).parent

PAGE = string.Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
$css</style>
</head>
<body>
<header>
<h1 id="title">$title</h1>
<p class="summary">$summary</p>
<p class="settings">$settings</p>
$legend
</header>
<main>
<section id="text" aria-label="the passage">
<nav class="pager">
<button type="button" data-go="first" title="first page">«</button>
<button type="button" data-go="prev" title="previous page">‹</button>
<span id="page-label"></span>
<button type="button" data-go="next" title="next page">›</button>
<button type="button" data-go="last" title="last page">»</button>
<label>go to token <input id="goto" type="number" min="0" max="$last" placeholder="#"></label>
</nav>
<div id="passage"></div>
</section>
<aside>
<div id="panel"><p class="hint">Hover a token to see its neighbours; click to pin it
(<kbd>Esc</kbd> unpins, <kbd>←</kbd> <kbd>→</kbd> step through tokens).</p></div>
<div id="extremes">
<h2>Largest gains</h2><ol id="top-gains"></ol>
<h2>Largest losses</h2><ol id="top-losses"></ol>
</div>
</aside>
</main>
<script type="application/json" id="knnlm-config">$config</script>
<script type="application/json" id="knnlm-data">$data</script>
<script>
$js</script>
</body>
</html>
""")


def render(data: dict, page_size: int = PAGE_SIZE) -> str:
    """The complete HTML document for one inspection `data` (see the module docstring); deterministic."""
    check(data)
    assert page_size > 0, "page_size must be positive"
    meta, summary, gains = data["meta"], data["summary"], data["tokens"]["gain"]
    scale = colour_scale(gains)
    config = {"pageSize": page_size, "scale": scale, "top": TOP}
    js = (HERE / "viewer.js").read_text(encoding="utf-8")
    css = (HERE / "viewer.css").read_text(encoding="utf-8")
    assert "</script" not in js.lower() and "</style" not in css.lower(), "viewer assets must not close their element"
    return PAGE.substitute(
        title=html.escape(str(meta["title"])),
        summary=_summary(summary, gains),
        settings=_settings(meta),
        legend=_legend(scale),
        last=max(len(gains) - 1, 0),
        config=script_json(config),
        data=script_json(data),
        css=css,
        js=js,
    )


def check(data: dict) -> None:
    """Raise ValueError naming the first way `data` breaks the contract (what would otherwise be a blank page)."""
    for part, keys in (("meta", META), ("summary", SUMMARY), ("tokens", COLUMNS)):
        missing = [k for k in keys if k not in data.get(part, {})]
        if missing:
            raise ValueError(f"inspect data: {part} lacks {missing}")
    if not isinstance(data.get("vocab"), list):
        raise ValueError("inspect data: vocab must be a list of words")
    tokens, size = data["tokens"], len(data["vocab"])
    lengths = {c: len(tokens[c]) for c in COLUMNS}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inspect data: the token columns differ in length: {lengths}")
    if tokens["w"] and not 0 <= min(tokens["w"]) <= max(tokens["w"]) < size:
        raise ValueError(f"inspect data: a token id is outside the vocab (size {size})")
    for i, neighbours in enumerate(tokens["nb"]):
        for nb in neighbours:
            if len(nb) != 6:
                raise ValueError(f"inspect data: token {i}: a neighbour is [row, dist, weight, value, ctx, at], "
                                 f"got {nb!r}")
            value, ctx, at = nb[3], nb[4], nb[5]
            if not 0 <= value < size or (ctx and not 0 <= min(ctx) <= max(ctx) < size):
                raise ValueError(f"inspect data: token {i}: neighbour {nb!r} has an id outside the vocab ({size})")
            if ctx and not (0 <= at < len(ctx) and ctx[at] == value):
                raise ValueError(f"inspect data: token {i}: neighbour row {nb[0]}: ctx[at] must be its value "
                                 f"{value}, got at={at} in a context of {len(ctx)}")


def script_json(obj) -> str:
    """JSON that is safe as the text of a <script> element: no "<" (so no "</script" or "<!--"), ">" or "&"."""
    try:
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError as e:  # NaN or inf: JSON.parse would refuse the whole page
        raise ValueError(f"inspect data: a number is NaN or infinite ({e})") from None
    # these characters occur only inside JSON strings, where \\u escapes mean the same text
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def colour_scale(gains) -> tuple:
    """(hurt, helped): the |gain| in nats that gets the darkest shade on each side, the 95th percentile of that
    side rounded up to a NICE value. One per side: a loss is at most -log(1 - lmbda), a gain is unbounded."""
    return tuple(_nice_p95([abs(g) for g in gains if sign * g > 0]) for sign in (-1, 1))


def _nice_p95(mags) -> float:
    if not mags:
        return 1.0
    p95 = sorted(mags)[max(0, math.ceil(0.95 * len(mags)) - 1)]  # nearest rank
    return next((n for n in NICE if n >= p95), NICE[-1])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return value if isinstance(value, str) else json.dumps(value)


def _item(label: str, ident: str, value: str, tag: str = "b") -> str:
    return f'<span class="item">{html.escape(label)} <{tag} id="{html.escape(ident)}">{html.escape(value)}</{tag}></span>'


def _summary(summary: dict, gains) -> str:
    base, knn = summary["base_ppl"], summary["knnlm_ppl"]
    change = f"{100 * (knn / base - 1):+.2f}%" if base else "n/a"
    items = [_item("tokens", "s-tokens", str(summary["tokens"]))]
    if len(gains) != summary["tokens"]:
        items.append(_item("shown", "s-shown", str(len(gains))))
    items += [
        _item("base LM ppl", "s-base", f"{base:.2f}"),
        _item("kNN-LM ppl", "s-knn", f"{knn:.2f}"),
        _item("change", "s-change", change),
        _item("kNN helped", "s-helped", str(sum(g > 0 for g in gains))),
        _item("hurt", "s-hurt", str(sum(g < 0 for g in gains))),
    ]
    return " ".join(items)


def _settings(meta: dict) -> str:
    known = dict(SETTINGS)
    pairs = [(k, label) for k, label in SETTINGS] + [(k, k) for k in meta if k not in known and k != "title"]
    return " ".join(_item(label, f"m-{key}", _fmt(meta[key]), "code") for key, label in pairs)


def _legend(scale: tuple) -> str:
    """Eleven swatches, hurt to helped: shade n of 5 covers |gain| in ((n-1)/5, n/5] of its side's scale."""

    def cell(sign: str, n: int) -> str:
        step = scale[sign == "pos"] / 5
        span = f"{(n - 1) * step:.3g} to {n * step:.3g}" if n < 5 else f"above {(n - 1) * step:.3g}"
        return f'<i class="{sign} l{n}" title="{"kNN hurt" if sign == "neg" else "kNN helped"}: |gain| {span} nats"></i>'

    cells = [cell("neg", n) for n in range(5, 0, -1)] + ['<i class="zero" title="gain 0"></i>']
    cells += [cell("pos", n) for n in range(1, 6)]
    return (f'<p class="legend" id="legend"><span>kNN hurt <span class="num" id="scale-neg">−{scale[0]:g}</span>'
            f'</span> <span class="swatches">{"".join(cells)}</span> <span><span class="num" id="scale-pos">'
            f'+{scale[1]:g}</span> kNN helped</span> <small>gain = log p − log p<sub>LM</sub> in nats; each side '
            f'darkest beyond 4/5 of its end (the 95th percentile of that side)</small></p>')
