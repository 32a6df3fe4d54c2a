"""Reports: metrics.json written and read back, report.md rendered from it alone, markdown tables, plots.

Every number a report shows comes from its metrics: `publish` renders from the metrics as read back from
metrics.json, and `prose` refuses a template whose own text holds a number (references such as "Table 3" or
"et al. 2020" are names, not numbers). tests/test_reports.py re-renders the committed reports from their
metrics and changes every digit of the metrics to check that every number in the report follows.
"""
import json
import logging
import os
import platform
import re
import string
from importlib import metadata
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines
logging.getLogger("matplotlib").setLevel(logging.WARNING)
import matplotlib.pyplot as plt  # noqa: E402

METRICS, REPORT = "metrics.json", "report.md"
# a number: not part of a name (WikiText-2, IVF1024, wt2_small, v0.12), optionally signed, thousands with commas
NUMBER = re.compile(r"(?<![\w.\-/])[-−+]?\d+(?:,\d\d\d)*(?:\.\d+)?")
# digits that are not measurements: the paper's tables and figures, citations' years, ordinals, (1 − w) in a
# mixture, make variables set in a command (`make domain DOMAIN_HELDOUT=0`)
REFERENCE = re.compile(r"\b(?:Table|Figure|§) ?\d+[a-z]?|\bet al\.?,? \(?(?:19|20)\d\d\)?|\bICLR (?:19|20)\d\d"
                       r"|\b\d+(?:st|nd|rd|th)\b|\(1 − |\b[A-Z]+_[A-Z_]+=\d+\b")


def numbers(text: str) -> List[str]:
    """The numbers of a text, references left out."""
    return NUMBER.findall(REFERENCE.sub(" ", text))


def prose(template: str, *args, **values) -> str:
    """A paragraph from a str.format template whose own text holds no number: every number is a value."""
    literal = "".join(part for part, *_ in string.Formatter().parse(template))
    typed = numbers(literal)
    assert not typed, f"numbers typed into a report template (put them in the metrics): {typed} in {template!r}"
    return template.format(*args, **values)


def table(header: Sequence[str], rows: Sequence[Sequence], align: Optional[str] = None) -> str:
    """A markdown table; align: one character per column, 'l' or 'r' (default: none given, markdown's left)."""
    rule = "|" + "".join({"l": "---|", "r": "---:|"}[c] for c in align) if align else "|" + "---|" * len(header)
    lines = ["| " + " | ".join(map(str, r)) + " |" for r in [header, *rows]]
    return "\n".join([lines[0], rule] + [re.sub(r"\|  (?=\|)", "| ", line) for line in lines[1:]])  # empty: "| |"


def grid_text(values: Sequence[float], run: int = 4) -> str:
    """A grid as a reader writes it: an arithmetic run of `run` or more values as "a, a + step, …, b"."""
    v, out, i = list(values), [], 0

    def emit(x):
        if not out or out[-1] != f"{x:g}":
            out.append(f"{x:g}")

    while i < len(v):
        j = i + 1
        while j + 1 < len(v) and abs((v[j + 1] - v[j]) - (v[i + 1] - v[i])) < 1e-9:
            j += 1
        if j < len(v) and j - i + 1 >= run:
            emit(v[i])
            out += [f"{v[i + 1]:g}", "…", f"{v[j]:g}"]
            i = j
        else:
            emit(v[i])
            i += 1
    return ", ".join(out)


def machine() -> Dict:
    """What the stage times were measured on: CPU cores and model (/proc/cpuinfo's first 'model name')."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model}


def dash(value, fmt: str = "{}") -> str:
    """A cell: the value formatted, or — where there is none (a stage reused without its timing)."""
    return "—" if value is None else fmt.format(value)


def stage_rows(stages: Dict[str, Dict], columns: Sequence[str] = ("seconds", "peak_rss_mb")) -> List[List]:
    """[name, the columns..., `command`] per stage; a reused stage's command says so."""
    return [[name] + [dash(s.get(c)) for c in columns]
            + [("(reused) " if s.get("reused") else "") + f"`{s['command']}`"] for name, s in stages.items()]


def write_metrics(out: str, metrics: Dict) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, METRICS)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return path


def read_metrics(out: str) -> Dict:
    with open(os.path.join(out, METRICS)) as f:
        return json.load(f)


def render_to(out: str, render: Callable[[Dict], str]) -> str:
    """report.md from metrics.json alone (what every driver's --render-only and publish do)."""
    text = render(read_metrics(out))
    with open(os.path.join(out, REPORT), "w") as f:
        f.write(text)
    return text


def publish(out: str, metrics: Dict, render: Callable[[Dict], str]) -> str:
    """Write metrics.json, then render report.md from what was written (never from in-memory values)."""
    write_metrics(out, metrics)
    text = render_to(out, render)
    print(text, flush=True)
    return text


def versions(*extra: str) -> Dict[str, str]:
    """Versions of Python and the libraries the stages ran with, from the installed distributions."""
    dists = metadata.packages_distributions()
    out = {"python": platform.python_version()}
    for module in ("torch", "fairseq", "faiss", "numpy", *extra):
        try:
            out[module] = metadata.version(dists.get(module, [module])[0])
        except metadata.PackageNotFoundError:
            out[module] = "not installed"
    return out


def line_panels(path: str, title: str, panels: Sequence[Dict], width: float = 5, fontsize: int = 10) -> str:
    """One panel per dict: {title, xlabel, lines: [{x, y, fmt, label, ...plot kwargs}], hline: (y, label),
    marks: [(x, y)], xscale: (scale, base)}; all sharing `title`. Writes path (PNG); returns its file name."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        for line in p["lines"]:
            line = dict(line)
            ax.plot(line.pop("x"), line.pop("y"), line.pop("fmt", "-o"), **{"ms": 3, **line})
        for x, y in p.get("marks", []):
            ax.plot([x], [y], "k*", ms=9)
        if p.get("hline") is not None:
            ax.axhline(p["hline"][0], color="gray", lw=1, label=p["hline"][1])
        ax.set(title=p["title"], xlabel=p["xlabel"], ylabel=p.get("ylabel", "perplexity"))
        if p.get("xscale"):
            ax.set_xscale(p["xscale"][0], base=p["xscale"][1])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=fontsize)
    return save(fig, path)


def save(fig, path: str, dpi: int = 110) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return os.path.basename(path)
