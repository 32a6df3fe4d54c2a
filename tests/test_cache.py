"""Continuous cache math against a brute-force numpy oracle, and the no-leakage property: nothing at or after the
predicted position (its target included) changes that position's cache distribution."""
import numpy as np
import pytest
import torch

from knnlm_fairseq.core import cache, knn

PAD, V = 1, 12


def block(seed=0, B=3, T=20, C=5):
    rng = np.random.default_rng(seed)
    states = torch.from_numpy(rng.standard_normal((B, T, C)).astype(np.float32))  # (B, T, C)
    tokens = torch.from_numpy(rng.integers(4, V, size=(B, T)))  # (B, T)
    tokens[1, -4:] = PAD  # a block with trailing padding, as eval-lm's last block has
    return states, tokens


def oracle(states, tokens, b, t, size, theta):
    """p_cache over the vocabulary for the query (b, t) by direct summation; None when nothing is cached."""
    h = states.numpy().astype(np.float64)
    tok = tokens.numpy()
    p = np.zeros(V)
    for i in range(max(0, t - size), t):
        if tok[b, i] != PAD and tok[b, i + 1] != PAD:
            p[tok[b, i + 1]] += np.exp(theta * h[b, t] @ h[b, i])
    return None if p.sum() == 0 else p / p.sum()


@pytest.mark.parametrize("size, theta", [(1, 1.0), (4, 0.3), (50, 2.0)])
def test_target_log_probs_and_full_mix_match_the_oracle(size, theta):
    states, tokens = block()
    B, T, _ = states.shape
    rows = torch.arange(B * T)
    sims, vals, ok = cache.cache_neighbours(cache.similarities(states), tokens, PAD, rows, size)
    target = torch.from_numpy(np.random.default_rng(1).integers(4, V, size=B * T))
    lp = cache.cache_target_log_probs(sims, vals, ok, target, [theta])[:, 0]
    lm = torch.log_softmax(torch.randn(B * T, V, dtype=torch.float64), -1)
    mixed = knn.interpolate_full(lm.clone(), cache.cache_dists(sims, ok), vals, 0.3, 1.0 / theta)
    for r in range(B * T):
        b, t = divmod(r, T)
        p = oracle(states, tokens, b, t, size, theta)
        assert ok[r].any().item() == (p is not None)
        if p is None:
            assert lp[r] == float("-inf")
            continue
        np.testing.assert_allclose(lp[r].exp().item(), p[target[r]], rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(mixed[r].exp().numpy(), 0.7 * lm[r].exp().numpy() + 0.3 * p, rtol=1e-5, atol=1e-12)


def test_cache_never_sees_the_target_or_the_future():
    states, tokens = block(seed=3)
    B, T, _ = states.shape
    rng = np.random.default_rng(7)
    for b in range(B):
        for t in range(T - 1):
            # replace everything after position t: states, and tokens from t+1 on (tokens[t+1] is t's target)
            s2, k2 = states.clone(), tokens.clone()
            s2[b, t + 1 :] = torch.from_numpy(rng.standard_normal(s2[b, t + 1 :].shape).astype(np.float32)) * 5
            k2[b, t + 1 :] = torch.from_numpy(rng.integers(4, V, size=T - t - 1))
            row = torch.tensor([b * T + t])
            before = cache.cache_neighbours(cache.similarities(states), tokens, PAD, row, T)
            after = cache.cache_neighbours(cache.similarities(s2), k2, PAD, row, T)
            ok = before[2]
            assert torch.equal(ok, after[2])
            torch.testing.assert_close(before[0][ok], after[0][ok], rtol=0, atol=0)
            assert torch.equal(before[1][ok], after[1][ok])


def test_target_not_cached_has_zero_cache_probability():
    states, tokens = block(seed=5)
    T = tokens.size(1)
    rows = torch.arange(T)  # block 0
    sims, vals, ok = cache.cache_neighbours(cache.similarities(states), tokens, PAD, rows, T)
    unseen = torch.full((T,), V + 3)  # an id that no position holds
    lp = cache.cache_target_log_probs(sims, vals, ok, unseen, [0.5, 1.0])
    assert torch.isneginf(lp).all()
