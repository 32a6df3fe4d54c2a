"""What knnlm-inspect shows, computed from a retrieval log: per scored token p_LM, p_kNN, the interpolated p and
the gain, its nearest neighbours with the text each came from (render() in html.py draws it), and the nearest
neighbour whose value is the token (the heaviest that carried it). docs/inspect.md describes the JSON.

The numbers are eval-lm's: p_kNN from the log's k nearest at temperature T (the same neighbours and distances
`fairseq-eval-lm --knnlm` used), p = λ·p_kNN + (1-λ)·p_LM where a neighbour was found, else p_LM. With a gate
(--knn-settings tuned one) λ is per token: its bucket's, by the LM-confidence signal the log recorded.
"""
import math
from typing import Dict, List, Optional, Union

import numpy as np
import torch

from ..core.adaptive import bucket_of
from ..core.contexts import SourceText
from ..core.knn import knn_scores


def token_scores(log, kind: str, k: int, temp: float, lmbda: Union[float, np.ndarray], rows: slice,
                 with_weights: bool = False, chunk: int = 16384) -> Dict[str, np.ndarray]:
    """p_LM, p_kNN, p and the gain (log p - log p_LM, nats) of the log's tokens in `rows`, chunk by chunk (a whole
    split's neighbours never sit in memory at once); lmbda: one λ, or one per row of the log (a gate's);
    with_weights: also each token's normalized neighbour weights (n, k) in the log's order."""
    start, stop = rows.indices(log.count)[:2]
    parts = []
    for s in range(start, stop, chunk):
        e = min(s + chunk, stop)
        d = torch.from_numpy(np.array(getattr(log, f"dist_{kind}")[s:e, :k]))  # (c, k)
        vals = np.asarray(log.vals[s:e, :k])
        target = np.asarray(log.target[s:e])
        lam = np.broadcast_to(np.asarray(lmbda, dtype=np.float64)[s:e] if np.ndim(lmbda) else float(lmbda),
                              target.shape)
        weights = knn_scores(d, temp).exp().double().numpy()  # (c, k), 0 where missing
        p_knn = (weights * (vals == target[:, None])).sum(1)
        p_lm = np.exp(np.asarray(log.lm_lp[s:e], dtype=np.float64))
        found = np.isfinite(d.numpy()).any(1)
        p = np.where(found & (lam > 0), lam * p_knn + (1 - lam) * p_lm, p_lm)
        parts.append({"target": target, "p_lm": p_lm, "p_knn": p_knn, "p": p, "found": found, "lmbda": lam,
                      **({"weights": weights} if with_weights else {})})
    out = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    with np.errstate(divide="ignore"):
        out["gain"] = np.log(out["p"]) - np.log(out["p_lm"])
    return out


def gate_lmbdas(log, gate: Dict, n: int) -> np.ndarray:
    """Each of the first n tokens' λ under a gate {signal, edges, lmbdas}: its bucket's, by the signal the log
    recorded (the bucket rule of the live gate, core/adaptive.bucket_of)."""
    signal = np.asarray(getattr(log, f"lm_{gate['signal']}")[:n])
    return np.asarray(gate["lmbdas"], dtype=np.float64)[bucket_of(signal, gate["edges"])]


def build(log, symbols: List[str], source: Optional[SourceText], kind: str, k: int, temp: float, lmbda: float,
          first: Optional[int] = None, shown: int = 8, left: int = 12, right: int = 4, meta: Dict = None,
          gate: Optional[Dict] = None) -> Dict:
    """The data contract of html.render: columns per token, each token's `shown` nearest neighbours with their
    contexts (none when `source` is None), and one vocabulary of the words used. gate: a per-token λ by bucket
    ({signal, edges, lmbdas}, as --knn-settings gives it) instead of `lmbda`."""
    n = log.count if not first else min(first, log.count)
    lam = gate_lmbdas(log, gate, n) if gate else lmbda
    s = token_scores(log, kind, k, temp, lam, slice(0, n), with_weights=True)
    # the `shown` nearest by the distances p_kNN uses (faiss orders by its own, approximate ones)
    all_d = np.asarray(getattr(log, f"dist_{kind}")[:n, :k])  # (n, k)
    all_ids, all_vals = np.asarray(log.ids[:n, :k]), np.asarray(log.vals[:n, :k])
    order = np.argsort(all_d, axis=1, kind="stable")[:, :shown]  # (n, shown)
    ids, dists, vals, weights = (np.take_along_axis(x, order, 1) for x in (all_ids, all_d, all_vals, s["weights"]))
    # the nearest neighbour whose value is the token (the heaviest that carried it) and its rank in that order
    carries = (all_ids >= 0) & np.isfinite(all_d) & (all_vals == s["target"][:, None])  # (n, k)
    col = np.where(carries, all_d, np.inf).argmin(1)  # (n,); the first of equals, as the stable sort
    at_col = all_d[np.arange(n), col][:, None]
    rank = ((all_d < at_col) | ((all_d == at_col) & (np.arange(all_d.shape[1]) < col[:, None]))).sum(1)
    vocab: Dict[int, int] = {}

    def word(i: int) -> int:
        return vocab.setdefault(int(i), len(vocab))

    def entry(row: int, dist: float, weight: float, value: int) -> List:
        ctx, at = source.context(row, left, right) if source is not None else ([], 0)
        return [row, round(float(dist), 4), round(float(weight), 6), word(value), [word(c) for c in ctx], at]

    nbs, hits = [], []
    for t in range(n):
        row_nbs = []
        for j in range(shown):
            if ids[t, j] < 0 or not math.isfinite(dists[t, j]):
                break
            row_nbs.append(entry(int(ids[t, j]), dists[t, j], weights[t, j], vals[t, j]))
        nbs.append(row_nbs)
        c = col[t]
        hit = None
        if carries[t, c]:
            e = row_nbs[rank[t]] if rank[t] < len(row_nbs) else entry(int(all_ids[t, c]), all_d[t, c],
                                                                      s["weights"][t, c], all_vals[t, c])
            hit = [int(rank[t])] + e[:3] + e[4:]
        hits.append(hit)
    tokens = {"w": [word(w) for w in s["target"]], "lm": _round(s["p_lm"]), "knn": _round(s["p_knn"]),
              "p": _round(s["p"]), "gain": _round(s["gain"]), "lmbda": _round(s["lmbda"]), "nb": nbs, "hit": hits}
    words = [None] * len(vocab)
    for i, j in vocab.items():
        words[j] = symbols[i]
    return {"meta": dict(meta or {}, k=k, lmbda=lmbda, knn_temp=temp, knn_dist=kind, neighbours_shown=shown,
                         **({"gate": gate} if gate else {})),
            "summary": {"tokens": n, "base_ppl": math.exp(-np.log(s["p_lm"]).mean()),
                        "knnlm_ppl": math.exp(-np.log(s["p"]).mean())},
            "vocab": words, "tokens": tokens}


def _round(x: np.ndarray, digits: int = 6) -> List[float]:
    """Six significant digits: what a reader can see, and a file a tenth of the size of full floats."""
    return [float(f"{v:.{digits}g}") for v in x.tolist()]


COLUMNS = "index, word, p_LM -> p, gain in nats; the nearest neighbour whose value is the word: rank/k, weight, text"


def terminal(data: Dict, top: int = 20) -> str:
    """A text view: the `top` largest gains (gain > 0) and losses (gain < 0), each with the neighbour that carried
    the word. Losses of exactly ln(1-λ) (no retrieved neighbour predicts the word: p = (1-λ)·p_LM) are counted in
    one line instead of listed, and the losses listed are the others."""
    tok = data["tokens"]
    gain, knn = np.asarray(tok["gain"], dtype=np.float64), np.asarray(tok["knn"], dtype=np.float64)
    lam = np.asarray(tok["lmbda"], dtype=np.float64)
    tie = (knn == 0) & (gain < 0)
    gains = [int(i) for i in np.argsort(-gain, kind="stable") if gain[i] > 0]
    losses = [int(i) for i in np.argsort(gain, kind="stable") if gain[i] < 0 and not tie[i]]
    lines = [f"{data['summary']['tokens']:,} tokens: base ppl {data['summary']['base_ppl']:.2f}, kNN-LM "
             f"{data['summary']['knnlm_ppl']:.2f}"]
    if gains:
        lines.append(f"-- largest gains: {min(top, len(gains))} of {len(gains):,} tokens with gain > 0 ({COLUMNS})")
        lines += [_row(data, i) for i in gains[:top]]
    else:
        lines.append("-- no token gained (gain > 0)")
    if tie.any():
        at = sorted(set(lam[tie].tolist()), reverse=True)
        why = "no retrieved neighbour predicts them, so p = (1-λ)·p_LM; not listed below"
        if len(at) == 1:
            lines.append(f"-- {int(tie.sum()):,} tokens lose exactly ln(1-λ) = {math.log1p(-at[0]):.3f} nats "
                         f"(λ {at[0]:g}): {why}")
        else:
            each = ", ".join(f"{int((tie & (lam == x)).sum()):,} at λ {x:g} ({math.log1p(-x):.3f})" for x in at)
            lines.append(f"-- {int(tie.sum()):,} tokens lose exactly ln(1-λ) at their λ ({each}): {why}")
    if losses:
        beyond = " beyond those ties" if tie.any() else ""
        lines.append(f"-- largest losses{beyond}: {min(top, len(losses))} of {len(losses):,} tokens with gain < 0 "
                     f"({COLUMNS})")
        lines += [_row(data, i) for i in losses[:top]]
    else:
        lines.append("-- no other token lost: every loss is one of those ties" if tie.any() else
                     "-- no token lost (gain < 0)")
    return "\n".join(lines)


def _row(data: Dict, i: int) -> str:
    vocab, tok, meta = data["vocab"], data["tokens"], data["meta"]
    hit = tok["hit"][i]
    if hit is None:
        carrier = "no retrieved neighbour predicts it"
    else:
        rank, _, _, weight, ctx, at = hit
        beyond = f" (not among the {meta['neighbours_shown']} shown)" if rank >= meta["neighbours_shown"] else ""
        text = " ".join(f"[{vocab[c]}]" if j == at else vocab[c] for j, c in enumerate(ctx)) or "(text not available)"
        carrier = f"#{rank + 1}/{meta['k']} w={weight:.3g}{beyond}  {text}"
    return (f"{i:>7} {vocab[tok['w'][i]]:<15} {tok['lm'][i]:>9.3g} -> {tok['p'][i]:<9.3g} {tok['gain'][i]:+.3f}   "
            f"{carrier}")
