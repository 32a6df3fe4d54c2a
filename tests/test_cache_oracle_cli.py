"""The continuous cache through fairseq-eval-lm, checked against an independent float64 replay of its definition.

p = (1-μ)·p_base + μ·p_cache, p_cache(w) ∝ Σ_{i in [t-N, t), x_{i+1} = w} exp(θ · h_t · h_i), where p_base is the LM
(or kNN-LM under --knnlm) and i runs over the positions of the window eval-lm feeds the model for the block being
scored: its context-window prefix included, its own target never (x_{i+1} for i < t is input already read). The
replay here loads the checkpoint in-process, re-cuts the valid split into eval-lm's blocks (test_alignment_cli's
windowing: block [s, e) of the targets reads inputs [max(0, s - CW), e)), runs one block per forward and reads the
states h from the model's own outputs: `inner_states` for a block's output (no hook at all) and a forward hook on
the last FFN's layer norm for last_ffn_input, neither of them the package's capture. Every printed word log-prob
(6 decimals) must match to 1e-4 and the printed base-2 loss to its 4 decimals, for
  - the cache alone with the default --cache-keytype (last_block_output; --knn-keytype keeps its own default,
    last_ffn_input, so a cache built on the kNN key would be other numbers),
  - --cache-keytype last_ffn_input with --knn-keytype second_last_block_output (again two different states),
  - the cache on top of --knnlm over a datastore dumped from train and searched with a Flat index, the kNN-LM
    part by brute force in numpy (test_alignment_cli.knnlm_oracle).
Each test also shows that its oracle tells the likely mistakes apart (the other key type, a window one position
longer or shorter), so that agreement is not a coincidence of a cache that does nothing.

Mutations seen to fail (each made by hand, run, then reverted); every one failed all three tests:
  (a) the cache built on the kNN key (tasks/knn_eval.py _components: CacheMixer(str(a.knn_keytype), ...)): max
      |error| 2.80 (default key type), 2.26 (--cache-keytype last_ffn_input), 3.26 (on top of --knnlm).
  (b) the query's own position cached, whose next token is its target (core/cache.py cache_neighbours:
      torch.arange(0, W) for arange(1, W + 1)): max |error| 6.0, 6.0, 6.7, median 0.9-1.9.
  (c) one position too many (torch.arange(1, W + 2)): max |error| 0.19, 0.086, 0.10.
  (d) the context-window prefix left out of the cache (cache_neighbours: ok &= torch.isin(bb * T + pos, rows)):
      max |error| 4.6, 4.4, 5.2.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from clis import evaluated_tokens, loss_and_ppl, parallel, word_probs
from test_alignment_cli import (BSZ, CW, EOS, K, LMBDA, TEMP, TPS, eval_lm, knnlm_oracle, load_model, replay,
                                run_cli, split_stream, templated_lm)

pytestmark = pytest.mark.slow  # starts fairseq CLIs

N, MU = 12, 0.3  # N < a block's TPS = 32 positions, so the cut at t - N falls inside the window (and in its prefix)
# θ · h_t · h_i spans a few units at these values (the states' norms differ by key type): neither uniform nor one-hot
THETA = {"last_block_output": 0.1, "last_ffn_input": 0.3}
LN2 = np.log(2)


# ---- the independent replay --------------------------------------------------------------------------
def windows(model, stream: np.ndarray):
    """eval-lm's blocks of `stream`, one forward each: [(p, s, e, {key type: (e - p, C) float64 states of every
    window position})]. Position j of the window reads input stream[p + j - 1] and predicts stream[p + j]."""
    import torch

    source = np.concatenate([[EOS], stream[:-1]])
    seen = []
    handle = model.decoder.layers[-1].final_layer_norm.register_forward_hook(lambda m, args, out: seen.append(out))
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(stream), TPS - CW):
                e, p = min(s + TPS - CW, len(stream)), max(0, s - CW)
                seen.clear()
                _, extra = model(torch.from_numpy(source[p:e])[None])
                inner = extra["inner_states"]  # the embeddings, then each layer's output, time-first (T, 1, C)
                states = {"last_block_output": inner[-1], "second_last_block_output": inner[-2],
                          "last_ffn_input": seen[0]}
                out.append((p, s, e, {k: v[:, 0].double().numpy() for k, v in states.items()}))
    finally:
        handle.remove()
    return out


def cache_oracle(blocks, stream, base_lp, key_type: str, theta: float, size: int = N, mu: float = MU):
    """log((1-μ)·p_base + μ·p_cache) of every target in order, float64; a target with nothing cached (the split's
    first) keeps p_base. By direct summation over the cached positions of each query."""
    out = []
    for p, s, e, states in blocks:
        h = states[key_type]  # (e - p, C)
        for t in range(s - p, e - p):  # window positions that are scored
            lo = max(0, t - size)
            if lo == t:
                out.append(None)
                continue
            logit = theta * (h[lo:t] @ h[t])  # (t - lo,)
            w = np.exp(logit - logit.max())
            nxt = stream[p + lo : p + t]  # the token that followed each cached position (position j predicts p + j)
            out.append(w[nxt == stream[p + t]].sum() / w.sum())
    base = np.asarray(base_lp, dtype=np.float64)
    assert len(out) == len(base) == len(stream)
    found = np.array([c is not None for c in out])
    p_cache = np.array([0.0 if c is None else c for c in out])
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log1p(-mu) + base, np.log(mu) + np.log(p_cache))
    return np.where(found, mixed, base)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_oracle")
    data, ckpt = templated_lm(root)
    w = SimpleNamespace(data=data, ckpt=ckpt, dstore=str(root / "dstore"))
    probs = ("--output-word-probs", "--cache-size", N, "--cache-lmbda", MU)

    def with_knnlm():  # dump train (keys: the default --knn-keytype, last_ffn_input), index it, score valid
        eval_lm(w, "train", "--save-dstore", "--dstore-dir", w.dstore)
        run_cli("knnlm-build-index", w.dstore, "--factory", "Flat", "--threads", "1", "--no-progress-bar")
        return eval_lm(w, "valid", *probs, "--cache-theta", THETA["last_block_output"], "--knnlm", "--dstore-dir",
                       w.dstore, "--k", K, "--lmbda", LMBDA, "--knn-temp", TEMP, "--knn-threads", "1")

    def cache_alone_then_replay():
        w.default = eval_lm(w, "valid", *probs, "--cache-theta", THETA["last_block_output"])
        w.ffn = eval_lm(w, "valid", *probs, "--cache-theta", THETA["last_ffn_input"], "--cache-keytype",
                        "last_ffn_input", "--knn-keytype", "second_last_block_output")
        model, task = load_model(ckpt)
        w.valid = split_stream(data, "valid", task.dictionary)
        w.train = split_stream(data, "train", task.dictionary)
        w.blocks = windows(model, w.valid)
        w.valid_keys, w.valid_lm = replay(model, w.valid, TPS, CW)  # kNN queries (last_ffn_input) and p_LM
        w.train_keys, _ = replay(model, w.train, TPS, CW)  # the datastore's keys

    w.knn, _ = parallel(with_knnlm, cache_alone_then_replay)
    # several blocks per batch and a partial last block, as in test_alignment_cli
    assert len(w.valid) % (TPS - CW) and len(w.valid) > 3 * BSZ * (TPS - CW), len(w.valid)
    return w


def check_printed(proc, expected: np.ndarray):
    """Every printed word log-prob (6 decimals) and the printed base-2 loss (4 decimals) against the oracle."""
    _, lp, _ = word_probs(proc.output)
    assert len(lp) == evaluated_tokens(proc.output) == len(expected)
    err = np.abs(lp - expected)
    worst, median, where = float(err.max()), float(np.median(err)), int(np.argmax(err))
    # measured: max 5e-6, median 4e-7 (float32 states, batched forwards, 6 printed decimals); a wrong cache: > 1e-2
    assert worst < 1e-4 and median < 1e-5, f"max |error| {worst:.3g} at token {where}, median {median:.3g}"
    loss, oracle_loss = loss_and_ppl(proc.output)[0], float(-expected.mean() / LN2)
    assert abs(loss - oracle_loss) <= 5e-5 + 1e-5, (loss, oracle_loss)  # half a printed unit, and some slack
    return lp


def far(lp, other) -> float:
    return float(np.abs(lp - other).max())


def test_cache_alone_default_keytype_is_the_replay(runs):
    """No --knnlm, no --cache-keytype: the cache holds the last block's output (the softmax's input before the
    final layer norm), the N positions before each query in its window."""
    key = "last_block_output"
    expected = cache_oracle(runs.blocks, runs.valid, runs.valid_lm, key, THETA[key])
    lp = check_printed(runs.default, expected)
    # the cache is at work, and the oracle would see the likely mistakes: the kNN key (last_ffn_input, the default
    # --knn-keytype), a window one position longer or shorter
    assert far(lp, runs.valid_lm) > 0.3
    assert far(lp, cache_oracle(runs.blocks, runs.valid, runs.valid_lm, "last_ffn_input", THETA[key])) > 1e-2
    for size in (N - 1, N + 1):
        assert far(lp, cache_oracle(runs.blocks, runs.valid, runs.valid_lm, key, THETA[key], size=size)) > 1e-2


def test_cache_keytype_flag_chooses_the_cached_states(runs):
    """--cache-keytype last_ffn_input with --knn-keytype second_last_block_output: the cache is built on the former."""
    key = "last_ffn_input"
    expected = cache_oracle(runs.blocks, runs.valid, runs.valid_lm, key, THETA[key])
    lp = check_printed(runs.ffn, expected)
    assert far(lp, runs.valid_lm) > 0.3
    for other in ("second_last_block_output", "last_block_output"):  # --knn-keytype's value; --cache-keytype's default
        assert far(lp, cache_oracle(runs.blocks, runs.valid, runs.valid_lm, other, THETA[key])) > 1e-2, other


def test_cache_on_top_of_knnlm_is_the_replay(runs):
    """--knnlm with the cache: p = (1-μ)·p_kNN-LM + μ·p_cache, p_kNN-LM by brute force over the replayed train keys
    (rounded to fp16 as stored) and the cache over the block's last_block_output states."""
    knnlm = knnlm_oracle(runs.valid_keys, runs.train_keys.astype(np.float16), runs.train, runs.valid, runs.valid_lm,
                         K, TEMP, LMBDA)
    key = "last_block_output"
    expected = cache_oracle(runs.blocks, runs.valid, knnlm, key, THETA[key])
    lp = check_printed(runs.knn, expected)
    assert f"kNN-LM: {len(runs.train):,} entries" in runs.knn.output
    # both parts matter: without the kNN part, or without the cache, the oracle is far from what was printed
    assert far(lp, cache_oracle(runs.blocks, runs.valid, runs.valid_lm, key, THETA[key])) > 0.1
    assert far(lp, knnlm) > 0.3
