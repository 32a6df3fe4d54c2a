"""Where kNN-LM's gain comes from: per-token gains grouped by how often the target occurs in the datastore's text
and by a coarse kind of word (the paper's claim: the largest gains are on rare patterns, e.g. names and facts).
"""
import math
import re
from typing import Dict, List, Sequence

import numpy as np

FREQ_EDGES = (10, 100, 1_000, 10_000)  # bucket b holds targets seen <= FREQ_EDGES[b] times in the datastore's text
_NUMBER = re.compile(r"\d")
_SENTENCE_END = {".", "!", "?", "</s>", "=", '"', ":", ";"}


def freq_labels(edges: Sequence[int] = FREQ_EDGES) -> List[str]:
    return [f"≤ {edges[0]:,}"] + [f"{lo + 1:,}–{hi:,}" for lo, hi in zip(edges, edges[1:])] + [f"> {edges[-1]:,}"]


def freq_bucket(counts: np.ndarray, targets: np.ndarray, edges: Sequence[int] = FREQ_EDGES) -> np.ndarray:
    """Bucket of each target by its count in the datastore (counts: (V,) occurrences of each token id)."""
    return np.searchsorted(np.asarray(edges), counts[targets], side="left")


def word_kind(words: Sequence[str]) -> np.ndarray:
    """'number' (any digit), 'name' (capitalized, not after a sentence end), 'punctuation', 'other' per token;
    a heuristic that needs no tagger: WikiText keeps case, so capitals inside sentences are mostly names."""
    out = []
    prev = "</s>"
    for w in words:
        if _NUMBER.search(w):
            out.append("number")
        elif w[:1].isupper() and prev not in _SENTENCE_END:
            out.append("name")
        elif not any(ch.isalnum() for ch in w):
            out.append("punctuation")
        else:
            out.append("other")
        prev = w
    return np.asarray(out)


def by_group(p_lm: np.ndarray, p: np.ndarray, groups: np.ndarray, names: Sequence) -> List[Dict]:
    """Per group: tokens, LM and kNN-LM perplexity, total gain in nats and its share of the whole gain."""
    gain = np.log(p) - np.log(p_lm)
    total = float(gain.sum())
    rows = []
    for g in names:
        sel = groups == g
        n = int(sel.sum())
        if not n:
            rows.append({"group": g, "tokens": 0, "lm_ppl": None, "knnlm_ppl": None, "gain_nats": 0.0,
                         "gain_share": 0.0, "gain_per_token": None})
            continue
        rows.append({"group": g, "tokens": n, "lm_ppl": math.exp(-np.log(p_lm[sel]).mean()),
                     "knnlm_ppl": math.exp(-np.log(p[sel]).mean()), "gain_nats": float(gain[sel].sum()),
                     "gain_share": float(gain[sel].sum()) / total if total else 0.0,
                     "gain_per_token": float(gain[sel].mean())})
    return rows
