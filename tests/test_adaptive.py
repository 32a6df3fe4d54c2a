"""Adaptive retrieval tuned offline (core/adaptive.py), applied live by the gate (components/gates.py), and
the settings file that carries it to fairseq-eval-lm (core/settings.py)."""
import itertools
import json
import math
from argparse import Namespace
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from knnlm_fairseq.components.gates import SignalGate
from knnlm_fairseq.core import adaptive, signals
from knnlm_fairseq.core.errors import KnnlmError
from knnlm_fairseq.core.settings import FORMAT, apply_settings, check_settings_target, read_settings

LMBDAS = [0.0, 0.1, 0.3, 0.6]


def tokens(n=400, seed=0):
    """Per-token LM and kNN log-probs where kNN helps only when the LM is unsure (high signal)."""
    rng = np.random.default_rng(seed)
    signal = rng.uniform(0, 5, n)
    lm = np.log(rng.uniform(0.01, 0.9, n))
    knn = np.where(signal > 2.5, np.log(rng.uniform(0.3, 1.0, n)), np.log(rng.uniform(1e-4, 0.05, n)))
    found = rng.random(n) > 0.05
    return lm, knn, found, signal


def loglik(lm, knn, found, lam):
    mix = np.log(lam * np.exp(knn) + (1 - lam) * np.exp(lm))
    return np.where(found & (lam > 0), mix, lm)


def test_bucket_lambdas_are_the_brute_force_optimum():
    lm, knn, found, signal = tokens()
    tuned = adaptive.gate_sweep(lm, knn, found, signal, 3, LMBDAS)
    buckets = adaptive.bucket_of(signal, tuned["edges"])
    best, best_combo = -np.inf, None
    for combo in itertools.product(LMBDAS, repeat=len(tuned["edges"]) + 1):  # every assignment of λ to buckets
        total = loglik(lm, knn, found, np.asarray(combo)[buckets]).sum()
        if total > best:
            best, best_combo = total, combo
    assert tuned["lmbdas"] == list(best_combo)
    assert tuned["frontier"][0]["ppl"] == pytest.approx(math.exp(-best / len(lm)), rel=1e-12)
    assert tuned["lmbdas"][0] == 0.0 and tuned["lmbdas"][-1] > 0  # kNN pays only where the LM is unsure


def test_frontier_goes_from_tuned_to_the_lm():
    lm, knn, found, signal = tokens(seed=1)
    tuned = adaptive.gate_sweep(lm, knn, found, signal, 8, LMBDAS)
    fr = tuned["frontier"]
    searched = [p["searched"] for p in fr]
    assert searched == sorted(searched, reverse=True) and searched[-1] == 0.0
    assert fr[-1]["ppl"] == pytest.approx(math.exp(-lm.mean()), rel=1e-12)  # nothing searched: the LM
    assert [p["ppl"] for p in fr] == sorted(p["ppl"] for p in fr)  # each bucket turned off costs perplexity
    for p in fr:  # each point's numbers are what applying its λs gives
        again = adaptive.apply_gate(lm, knn, found, signal, tuned["edges"], p["lmbdas"])
        assert again["ppl"] == pytest.approx(p["ppl"], rel=1e-9)
        assert again["searched"] == pytest.approx(p["searched"], abs=1e-12)


def test_live_gate_buckets_like_the_offline_tuning():
    """At, just below and just above every edge, the gate's λ is the offline bucket's λ."""
    edges = [-2.0, -1.0, -0.5]
    lmbdas = [0.0, 0.1, 0.2, 0.3]
    values = torch.tensor([-3.0, -2.0, -1.5, -1.0, -0.75, -0.5, 0.0], dtype=torch.float32)
    values = torch.cat([values, torch.nextafter(values, torch.tensor(-np.inf)), torch.nextafter(values,
                                                                                                torch.tensor(np.inf))])
    lp = torch.full((len(values), 4), -50.0)
    lp[:, 0] = values  # the largest log-prob of each row is its value: the max_lp signal
    gate = SignalGate("max_lp", edges, lmbdas)

    @dataclass
    class FakeStep:
        lp: torch.Tensor
        rows: torch.Tensor
        search: torch.Tensor
        lmbda: torch.Tensor = None
        signal_cols: int = None

    step = FakeStep(lp, torch.arange(len(values)), torch.ones(len(values), dtype=torch.bool))
    gate.on_scores(step)
    want = np.asarray(lmbdas)[adaptive.bucket_of(signals.max_log_prob(lp, step.rows).numpy(), edges)]
    np.testing.assert_array_equal(step.lmbda.numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(step.search.numpy(), want > 0)
    assert gate.close()["skipped"] == int((want == 0).sum())


def test_entropy_signal_against_numpy():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    logits[2, :10] = -float("inf")  # words of probability 0 add nothing
    lp = torch.log_softmax(logits, -1)
    p = lp.double().exp().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        want = -np.where(p > 0, p * np.log(p), 0).sum(1)
    np.testing.assert_allclose(signals.entropy(lp, torch.arange(5)).numpy(), want, rtol=1e-5)


# ---- the settings file ---------------------------------------------------------------------------------
@dataclass
class Config:  # the fields of KnnEvalConfig that a settings file may set, with their defaults
    index_file: str = "index.faiss"
    k: int = 1024
    lmbda: float = 0.25
    knn_temp: float = 1.0
    knn_dist: str = "exact"
    probe: int = 32
    knn_gate_signal: str = None
    knn_gate_edges: str = ""
    knn_gate_lmbdas: str = ""


def settings(tmp_path, **knnlm):
    body = {"format": FORMAT, "tuned_for": {"dstore_fingerprint": "f" * 64, "checkpoint_sha256": "c" * 64},
            "knnlm": dict({"k": 256, "lmbda": 0.3, "knn_temp": 10.0, "knn_dist": "approx"}, **knnlm)}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(body))
    return str(path)


def test_settings_apply_over_defaults(tmp_path):
    path = settings(tmp_path, knn_gate_signal="entropy", knn_gate_edges="1.5,3.0", knn_gate_lmbdas="0.0,0.2,0.4")
    args = Namespace(**vars(Config()))
    apply_settings(args, Config, path)
    assert (args.k, args.lmbda, args.knn_temp, args.knn_dist) == (256, 0.3, 10.0, "approx")
    assert (args.knn_gate_signal, args.knn_gate_edges, args.knn_gate_lmbdas) == ("entropy", "1.5,3.0", "0.0,0.2,0.4")
    assert args.probe == 32  # not in the file: unchanged


def test_a_contradicting_flag_is_refused(tmp_path):
    path = settings(tmp_path)
    args = Namespace(**dict(vars(Config()), lmbda=0.5))
    with pytest.raises(KnnlmError, match=r"--lmbda 0.5 contradicts 0.3 in --knn-settings"):
        apply_settings(args, Config, path)
    args = Namespace(**dict(vars(Config()), lmbda=0.3))  # the same value given twice is fine
    apply_settings(args, Config, path)


def test_settings_for_another_datastore_or_model_are_refused(tmp_path):
    s = read_settings(settings(tmp_path))
    check_settings_target(s, "t.json", "f" * 64, "c" * 64)
    with pytest.raises(KnnlmError, match="tuned for another datastore"):
        check_settings_target(s, "t.json", "e" * 64, "c" * 64)
    with pytest.raises(KnnlmError, match="tuned with another checkpoint"):
        check_settings_target(s, "t.json", "f" * 64, "d" * 64)


@pytest.mark.parametrize("body, message", [
    ("not json", "not a readable settings file"),
    (json.dumps({"format": "other"}), "is not a knnlm-settings/1 file"),
    (json.dumps({"format": FORMAT, "knnlm": {"cache_size": 5}}), r"sets \['cache_size'\], which it may not"),
])
def test_bad_settings_files_are_refused(tmp_path, body, message):
    (tmp_path / "s.json").write_text(body)
    with pytest.raises(KnnlmError, match=message):
        read_settings(str(tmp_path / "s.json"))


def test_signals_read_only_what_an_adaptive_softmax_fills_for_every_row():
    """fairseq's adaptive softmax computes a tail cluster only for rows whose target is in it (zeros elsewhere):
    over the head columns the signals are the same whichever cluster the target was in."""
    torch.manual_seed(0)
    head, vocab = 6, 20
    full = torch.log_softmax(torch.randn(4, vocab), -1)
    filled = full.clone()
    filled[:2, head:] = 0.0  # rows 0-1: target in the head, so no tail was computed
    rows = torch.arange(4)
    for name, fn in signals.SIGNALS.items():
        a, b = fn(full, rows, head), fn(filled, rows, head)
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert not torch.equal(fn(full, rows), fn(filled, rows)), name  # over all columns the zeros would leak
    p = full[:, :head].double().exp()
    rest = 1 - p.sum(-1)
    want = -(p * p.log()).sum(-1) - rest * rest.log()  # the head words, and the tail's mass as one outcome
    torch.testing.assert_close(signals.entropy(full, rows, head).double(), want, rtol=1e-5, atol=1e-5)
