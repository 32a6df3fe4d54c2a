"""Every committed report is its driver's rendering of its committed metrics.json, and every number in it comes
from those metrics: with every digit of the metrics changed, every number of the report changes (except counts of
rows, which the digits do not change)."""
import difflib
from collections import Counter
import importlib.util
import os
import re

import pytest

from clis import ROOT
from knnlm_fairseq.experiments.report import NUMBER, REFERENCE, read_metrics

# report directory -> the script holding its render(metrics)
RENDERERS = {"wikitext2": "reproduce.py", "cache": "cache_report.py", "domain": "domain_report.py",
             "keytypes": "keytypes_report.py", "scaling": "scaling_report.py", "analysis": "analysis_report.py",
             "bench": "bench_report.py"}
# numbers that are counts of what the metrics list (key types, datastores), not values the metrics hold
COUNTS = {"wikitext2": [], "cache": [], "domain": ["3"], "keytypes": ["8", "4", "4"], "scaling": [], "analysis": [],
          # ratios of a quantity to itself, which no digit map changes: the base LM's time over its own, and
          # searches over scored rows for the three kNN-LM rows (every token searched)
          "bench": ["1.00", "100.0", "100.0", "100.0"]}


def renderer(name):
    path = os.path.join(ROOT, "scripts", RENDERERS[name])
    spec = importlib.util.spec_from_file_location(f"report_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render


def shift_digits(obj, a: int = 1, b: int = 1):
    """Every digit d of every number, string and key -> (a·d + b) mod 10, consistently (equal values stay equal)."""
    def shift(text: str) -> str:
        return re.sub(r"\d", lambda d: str((a * int(d.group()) + b) % 10), text)
    if isinstance(obj, dict):
        return {shift(k): shift_digits(v, a, b) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shift_digits(v, a, b) for v in obj]
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, (int, float)):
        return type(obj)(shift(repr(obj)))
    return shift(obj)


def placed_numbers(text: str):
    """(the text between numbers, the numbers): numbers[i] follows pieces[i]."""
    parts = NUMBER.split(REFERENCE.sub(lambda m: "#" * len(m.group()), text))
    found = NUMBER.findall(REFERENCE.sub(lambda m: "#" * len(m.group()), text))
    return parts, found


def unchanged_numbers(a: str, b: str):
    """Numbers standing at the same place in two renderings of one template, and equal."""
    (pa, na), (pb, nb) = placed_numbers(a), placed_numbers(b)
    same = []
    for tag, i1, i2, j1, _ in difflib.SequenceMatcher(None, pa, pb, autojunk=False).get_opcodes():
        if tag == "equal":
            same += [na[i] for i, j in zip(range(i1, i2), range(j1, j1 + i2 - i1)) if i < len(na) and na[i] == nb[j]]
    return same


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_committed_report_is_rendered_from_its_metrics(name):
    out = os.path.join(ROOT, "results", name)
    assert renderer(name)(read_metrics(out)) == open(os.path.join(out, "report.md")).read(), \
        f"results/{name}/report.md is not what its metrics render; re-render it"


@pytest.mark.parametrize("name", sorted(RENDERERS))
def test_every_number_of_a_report_comes_from_its_metrics(name):
    render, m = renderer(name), read_metrics(os.path.join(ROOT, "results", name))
    before = render(m)
    # two digit maps (d + 1, 3d + 1): a computed number may survive one by chance (a difference, a rounding)
    kept = [Counter(unchanged_numbers(before, render(shift_digits(m, a, 1)))) for a in (1, 3)]
    typed = (kept[0] & kept[1]) - Counter(COUNTS[name])
    assert not typed, f"numbers typed into the report: {sorted(typed.elements())}"


def test_a_typed_number_is_caught():
    assert unchanged_numbers("ppl 12.5 on 3 cores", "ppl 23.6 on 3 cores") == ["3"]
