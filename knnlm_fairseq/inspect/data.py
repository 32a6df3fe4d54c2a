"""What knnlm-inspect shows, computed from a retrieval log: per scored token p_LM, p_kNN, the interpolated p and
the gain, and its nearest neighbours with the text each came from (render() in html.py draws it).

The numbers are eval-lm's: p_kNN from the log's k nearest at temperature T (the same neighbours and distances
`fairseq-eval-lm --knnlm` used), p = λ·p_kNN + (1-λ)·p_LM where a neighbour was found, else p_LM.
"""
import math
from typing import Dict, List, Optional

import numpy as np
import torch

from ..core.contexts import SourceText
from ..core.knn import knn_scores


def token_scores(log, kind: str, k: int, temp: float, lmbda: float, rows: slice, with_weights: bool = False,
                 chunk: int = 16384) -> Dict[str, np.ndarray]:
    """p_LM, p_kNN, p and the gain (log p - log p_LM, nats) of the log's tokens in `rows`, chunk by chunk (a whole
    split's neighbours never sit in memory at once); with_weights: also each token's normalized neighbour weights
    (n, k), nearest first."""
    start, stop = rows.indices(log.count)[:2]
    parts = []
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        d = torch.from_numpy(np.array(getattr(log, f"dist_{kind}")[s:e, :k]))  # (c, k)
        vals = np.asarray(log.vals[s:e, :k])
        target = np.asarray(log.target[s:e])
        weights = knn_scores(d, temp).exp().double().numpy()  # (c, k), 0 where missing
        p_knn = (weights * (vals == target[:, None])).sum(1)
        p_lm = np.exp(np.asarray(log.lm_lp[s:e], dtype=np.float64))
        found = np.isfinite(d.numpy()).any(1)
        p = np.where(found, lmbda * p_knn + (1 - lmbda) * p_lm, p_lm)
        parts.append({"target": target, "p_lm": p_lm, "p_knn": p_knn, "p": p, "found": found,
                      **({"weights": weights} if with_weights else {})})
    out = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    with np.errstate(divide="ignore"):
        out["gain"] = np.log(out["p"]) - np.log(out["p_lm"])
    return out


def build(log, symbols: List[str], source: Optional[SourceText], kind: str, k: int, temp: float, lmbda: float,
          first: Optional[int] = None, shown: int = 8, left: int = 12, right: int = 4, meta: Dict = None) -> Dict:
    """The data contract of html.render: columns per token, each token's `shown` nearest neighbours with their
    contexts (none when `source` is None), and one vocabulary of the words used."""
    n = log.count if not first else min(first, log.count)
    s = token_scores(log, kind, k, temp, lmbda, slice(0, n), with_weights=True)
    # the `shown` nearest by the distances p_kNN uses (faiss orders by its own, approximate ones)
    all_d = np.asarray(getattr(log, f"dist_{kind}")[:n, :k])  # (n, k)
    order = np.argsort(all_d, axis=1, kind="stable")[:, :shown]  # (n, shown)
    ids = np.take_along_axis(np.asarray(log.ids[:n, :k]), order, 1)
    dists = np.take_along_axis(all_d, order, 1)
    vals = np.take_along_axis(np.asarray(log.vals[:n, :k]), order, 1)
    s["weights"] = np.take_along_axis(s["weights"], order, 1)
    vocab: Dict[int, int] = {}

    def word(i: int) -> int:
        return vocab.setdefault(int(i), len(vocab))

    nbs = []
    for t in range(n):
        row_nbs = []
        for j in range(shown):
            if ids[t, j] < 0 or not math.isfinite(dists[t, j]):
                break
            ctx, at = source.context(int(ids[t, j]), left, right) if source is not None else ([], 0)
            row_nbs.append([int(ids[t, j]), round(float(dists[t, j]), 4), round(float(s["weights"][t, j]), 6),
                            word(vals[t, j]), [word(c) for c in ctx], at])
        nbs.append(row_nbs)
    tokens = {"w": [word(w) for w in s["target"]], "lm": _round(s["p_lm"]), "knn": _round(s["p_knn"]),
              "p": _round(s["p"]), "gain": _round(s["gain"]), "nb": nbs}
    words = [None] * len(vocab)
    for i, j in vocab.items():
        words[j] = symbols[i]
    return {"meta": dict(meta or {}, k=k, lmbda=lmbda, knn_temp=temp, knn_dist=kind, neighbours_shown=shown),
            "summary": {"tokens": n, "base_ppl": math.exp(-np.log(s["p_lm"]).mean()),
                        "knnlm_ppl": math.exp(-np.log(s["p"]).mean())},
            "vocab": words, "tokens": tokens}


def _round(x: np.ndarray, digits: int = 6) -> List[float]:
    """Six significant digits: what a reader can see, and a file a tenth of the size of full floats."""
    return [float(f"{v:.{digits}g}") for v in x.tolist()]


def terminal(data: Dict, top: int = 20) -> str:
    """The tokens with the largest gains and losses, each with its best neighbour's context: a text view."""
    vocab, tok = data["vocab"], data["tokens"]
    order = np.argsort(tok["gain"])
    lines = [f"{data['summary']['tokens']:,} tokens: base ppl {data['summary']['base_ppl']:.2f}, kNN-LM "
             f"{data['summary']['knnlm_ppl']:.2f}"]
    for title, picks in (("largest gains", order[::-1][:top]), ("largest losses", order[:top])):
        lines.append(f"-- {title} (token index, word, p_LM -> p, gain in nats; best neighbour's text)")
        for i in picks:
            nb = tok["nb"][i][0] if tok["nb"][i] else None
            ctx = ""
            if nb is not None and nb[4]:
                ctx = " ".join(f"[{vocab[c]}]" if j == nb[5] else vocab[c] for j, c in enumerate(nb[4]))
            lines.append(f"{i:>7} {vocab[tok['w'][i]]:<15} {tok['lm'][i]:.4f} -> {tok['p'][i]:.4f} "
                         f"{tok['gain'][i]:+.3f}   {ctx}")
    return "\n".join(lines)
