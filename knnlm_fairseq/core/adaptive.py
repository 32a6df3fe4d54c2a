"""Tuning adaptive retrieval offline: a per-token λ by buckets of an LM-confidence signal, and the
perplexity-vs-searches frontier of skipping whole buckets (no LM pass, no search).

Each token's interpolated log-prob depends only on its own λ, so the total log-likelihood is a sum over
buckets and each bucket's λ is tuned on its own: λ_b = argmax over the grid of Σ_{t in b} log p_t(λ). A bucket
whose λ is 0 needs no search. Turning buckets off in order of least gain per token traces the frontier; the
fast settings are its cheapest point within a perplexity budget. The live gate (components/gates.py)
buckets with the same rule: bucket = number of edges <= signal.
"""
import math
from typing import Dict, List, Sequence

import numpy as np

from .errors import KnnlmError
from .sweep import mix_knn


def check_gate(signal: str, edges: Sequence[float], lmbdas: Sequence[float]) -> None:
    """A gate's definition, refused in one line when unusable (the live gate and knnlm-inspect both check it)."""
    from .signals import SIGNALS

    if signal not in SIGNALS:
        raise KnnlmError(f"unknown gate signal '{signal}'; choose from {', '.join(SIGNALS)}")
    if len(lmbdas) != len(edges) + 1:
        raise KnnlmError(f"{len(edges)} gate bucket edges need {len(edges) + 1} λ values, got {len(lmbdas)}")
    if list(edges) != sorted(edges):
        raise KnnlmError(f"gate bucket edges must increase, got {list(edges)}")
    if any(not 0.0 <= lam < 1.0 for lam in lmbdas):
        raise KnnlmError(f"every gate bucket's λ must be in [0, 1), got {list(lmbdas)}")


def bucket_edges(signal: np.ndarray, n_buckets: int) -> List[float]:
    """Quantile edges that cut `signal` into n_buckets groups of about equal size (fewer if values repeat)."""
    qs = np.quantile(signal, np.linspace(0, 1, n_buckets + 1)[1:-1])
    return sorted({float(q) for q in qs})


def bucket_of(signal: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bucket index of each value: how many edges are <= it (torch.bucketize(..., right=True) in the gate)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float32), signal.astype(np.float32), side="right")


def bucket_loglik(lm: np.ndarray, knn: np.ndarray, found: np.ndarray, buckets: np.ndarray, n_buckets: int,
                  lmbdas: Sequence[float]) -> np.ndarray:
    """Σ log p over the tokens of each bucket at each λ of the grid: (n_buckets, len(lmbdas)) float64."""
    out = np.zeros((n_buckets, len(lmbdas)))
    for j, lam in enumerate(lmbdas):
        out[:, j] = np.bincount(buckets, weights=mix_knn(lm, knn, found, lam), minlength=n_buckets)
    return out


def tune_buckets(loglik: np.ndarray, counts: np.ndarray, lmbdas: Sequence[float]) -> Dict:
    """λ per bucket, and the frontier of turning buckets off (λ=0, no search) least useful first.

    loglik (B, L) from bucket_loglik; counts (B,) tokens per bucket; lmbdas must include 0. Returns the tuned
    λs, and frontier points (searched fraction, perplexity, λs) from every bucket on to every bucket off.
    """
    assert 0.0 in lmbdas, "the λ grid must include 0 (no retrieval)"
    zero = list(lmbdas).index(0.0)
    n = int(counts.sum())
    best = loglik.argmax(1)  # (B,)
    tuned = [float(lmbdas[j]) for j in best]
    gain = loglik[np.arange(len(best)), best] - loglik[:, zero]  # (B,) nats gained by retrieving in the bucket
    on = np.array([lam > 0 for lam in tuned])
    order = sorted(np.flatnonzero(on), key=lambda b: gain[b] / max(counts[b], 1))  # least gain per token first
    frontier = []
    lams = list(tuned)
    for step in range(len(order) + 1):
        if step:
            lams[order[step - 1]] = 0.0
        total = sum(loglik[b, list(lmbdas).index(lam)] for b, lam in enumerate(lams))
        searched = sum(int(counts[b]) for b, lam in enumerate(lams) if lam > 0)
        frontier.append({"searched": searched / n, "ppl": math.exp(-total / n), "lmbdas": list(lams)})
    return {"lmbdas": tuned, "frontier": frontier}


def gate_sweep(lm: np.ndarray, knn: np.ndarray, found: np.ndarray, signal: np.ndarray, n_buckets: int,
               lmbdas: Sequence[float]) -> Dict:
    """Tune a gate on one log's per-token log-probs (from sweep.token_log_probs) and one signal."""
    edges = bucket_edges(signal, n_buckets)
    buckets = bucket_of(signal, edges)
    counts = np.bincount(buckets, minlength=len(edges) + 1)
    tuned = tune_buckets(bucket_loglik(lm, knn, found, buckets, len(edges) + 1, lmbdas), counts, lmbdas)
    return dict(tuned, edges=edges, counts=counts.tolist())


def apply_gate(lm: np.ndarray, knn: np.ndarray, found: np.ndarray, signal: np.ndarray, edges: Sequence[float],
               bucket_lmbdas: Sequence[float]) -> Dict:
    """Perplexity and searched fraction of fixed gate settings on another log (e.g. test)."""
    lam = np.asarray(bucket_lmbdas)[bucket_of(signal, edges)]  # (n,)
    total = 0.0
    for value in np.unique(lam):
        sel = lam == value
        total += float(mix_knn(lm[sel], knn[sel], found[sel], float(value)).sum())
    return {"ppl": math.exp(-total / len(lm)), "searched": float((lam > 0).mean())}


def adaptive_sweep(logs, tune_result: Dict, kinds: Sequence[str], gates: Sequence[str], n_buckets: int,
                   lmbdas: Sequence[float]) -> Dict:
    """For each distance kind and k of the sweep (at that k's best T), and each gate signal: tune the gate on
    the first log and apply it to the others. logs: RetrievalLog; tune_result: sweep.sweep() of the first log."""
    from .sweep import token_log_probs

    lmbdas = sorted(set(lmbdas) | {0.0})
    rows = []
    for kind in kinds:
        ppl = tune_result["ppl"][kind]  # (k, T, λ)
        for i, k in enumerate(tune_result["ks"]):
            j = int(np.unravel_index(np.argmin(ppl[i]), ppl[i].shape)[0])
            temp = tune_result["temps"][j]
            per_log = [token_log_probs(log, kind, k, temp) for log in logs]
            for gate in gates:
                if not hasattr(logs[0], f"lm_{gate}"):
                    raise ValueError(f"unknown gate signal '{gate}'; use entropy or max_lp")
                signal = np.asarray(getattr(logs[0], f"lm_{gate}"))
                tuned = gate_sweep(*per_log[0], signal, n_buckets, lmbdas)
                applied = [apply_gate(*lp, np.asarray(getattr(log, f"lm_{gate}")), tuned["edges"], point["lmbdas"])
                           for log, lp in zip(logs[1:], per_log[1:]) for point in tuned["frontier"]]
                per_point = len(tuned["frontier"])
                for p, point in enumerate(tuned["frontier"]):
                    point["applied"] = [applied[li * per_point + p] for li in range(len(logs) - 1)]
                rows.append(dict(tuned, kind=kind, k=k, temp=temp, gate=gate))
    return {"lmbdas": lmbdas, "buckets": n_buckets, "rows": rows}


def choose(adaptive: Dict, tune_result: Dict, max_increase_pct: float) -> Dict:
    """The cheapest setting within the budget: ppl on the tune log at most (1 + pct/100) x the best exact
    setting at the log's k. Cheapest: fewest searches, then approximate distances (no key gather), then smaller
    k. Candidates: every gate frontier point, and every plain (kind, k) at its best T and λ (all tokens search)."""
    from .sweep import best

    k_max = max(tune_result["ks"])
    reference = best(tune_result, "exact" if "exact" in tune_result["ppl"] else next(iter(tune_result["ppl"])),
                     k=k_max)
    budget = reference["ppl"] * (1 + max_increase_pct / 100)
    candidates = []
    for kind in tune_result["ppl"]:
        for k in tune_result["ks"]:
            b = best(tune_result, kind, k=k)
            candidates.append({"kind": kind, "k": k, "temp": b["temp"], "lmbda": b["lmbda"], "gate": None,
                               "searched": 1.0, "ppl": b["ppl"]})
    for row in adaptive["rows"]:
        for point in row["frontier"]:
            candidates.append({"kind": row["kind"], "k": row["k"], "temp": row["temp"], "lmbda": None,
                               "gate": {"signal": row["gate"], "edges": row["edges"], "lmbdas": point["lmbdas"]},
                               "searched": point["searched"], "ppl": point["ppl"]})
    within = [c for c in candidates if c["ppl"] <= budget]
    chosen = min(within, key=lambda c: (round(c["searched"], 4), c["kind"] != "approx", c["k"]))
    chosen = dict(chosen, reference=reference, budget=budget, max_increase_pct=max_increase_pct)
    how = f"gate {chosen['gate']['signal']}" if chosen["gate"] else f"λ={chosen['lmbda']}"
    chosen["summary"] = (f"{chosen['kind']} distances, k={chosen['k']}, T={chosen['temp']}, {how}: searches "
                         f"{chosen['searched']:.1%} of tokens, tune-log ppl {chosen['ppl']:.2f} (best exact at "
                         f"k={k_max}: {reference['ppl']:.2f}, budget {budget:.2f})")
    return chosen
