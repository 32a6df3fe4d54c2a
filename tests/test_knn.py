"""knn.py against a float64 numpy oracle of p_kNN(w) ∝ Σ_{j: v_j = w} exp(-d_j / T), and interpolation."""
import numpy as np
import pytest
import torch

from knnlm_fairseq.core import knn


# ---- oracle -------------------------------------------------------------------------------------
def _lse(x: np.ndarray) -> float:
    m = x.max(initial=-np.inf)
    return float(m + np.log(np.exp(x - m).sum())) if np.isfinite(m) else -np.inf


def oracle_word_log_probs(dists: np.ndarray, vals: np.ndarray, temp: float):
    """Per row, {word: log p_kNN(word)} in float64, grouping equal values; missing (non-finite) neighbours skipped."""
    rows = []
    for d, v in zip(dists.astype(np.float64), vals):
        ok = np.isfinite(d)
        logits = -d[ok] / temp
        total = _lse(logits)
        rows.append({int(w): _lse(logits[v[ok] == w]) - total for w in np.unique(v[ok])})
    return rows


def oracle_dense(dists, vals, vocab_size, temp):
    out = np.full((len(dists), vocab_size), -np.inf)
    for i, row in enumerate(oracle_word_log_probs(dists, vals, temp)):
        for w, lp in row.items():
            out[i, w] = lp
    return out


# ---- data ---------------------------------------------------------------------------------------
N, K, V = 64, 16, 40  # small vocabulary: many rows repeat a value among their k neighbours


def make_neighbours(seed: int = 0, n: int = N, k: int = K, vocab: int = V):
    rng = np.random.default_rng(seed)
    dists = rng.uniform(0.0, 30.0, size=(n, k)).astype(np.float32)  # (n, k)
    vals = rng.integers(0, vocab, size=(n, k))  # (n, k)
    dists[rng.random((n, k)) < 0.2] = np.inf  # neighbours faiss did not find
    dists[[3, 17]] = np.inf  # rows where nothing was found
    # row 5: a missing neighbour whose (clamped) value is also a found neighbour's must not add mass
    dists[5] = np.inf
    dists[5, [0, 1, 4]] = [1.0, 2.0, 3.0]
    vals[5, :5] = [7, 7, 7, 9, 8]
    return dists, vals


@pytest.fixture(scope="module")
def neighbours():
    dists, vals = make_neighbours()
    # the data exercises what it claims to: duplicates among found neighbours, partial and empty rows
    found = np.isfinite(dists)
    assert any(len(np.unique(v[f])) < f.sum() for v, f in zip(vals, found))
    assert (~found.any(1)).sum() == 2 and (found.any(1) & ~found.all(1)).sum() > 30
    return dists, vals


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---- neighbour distributions --------------------------------------------------------------------
@pytest.mark.parametrize("temp", [0.3, 1.0, 10.0])
def test_knn_log_probs_match_oracle(neighbours, temp):
    dists, vals = neighbours
    got = knn.knn_log_probs(_t(dists), _t(vals), V, temp)
    assert got.shape == (N, V) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), oracle_dense(dists, vals, V, temp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temp", [0.3, 1.0, 10.0])
def test_neighbor_log_probs_match_oracle(neighbours, temp):
    """Each neighbour carries its word's total: neighbours sharing a value share one number."""
    dists, vals = neighbours
    got = knn.neighbor_log_probs(_t(dists), _t(vals), temp)
    want = np.take_along_axis(oracle_dense(dists, vals, V, temp), vals, axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # row 5 by hand: word 7 found at d=1, 2 (plus a missing neighbour), word 8 at d=3, word 9 only missing
    w1, w2, w3 = np.exp(-np.array([1.0, 2.0, 3.0]) / temp)
    assert got[5, 0] == got[5, 1] == got[5, 2]
    np.testing.assert_allclose(float(got[5, 0]), np.log((w1 + w2) / (w1 + w2 + w3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(got[5, 4]), np.log(w3 / (w1 + w2 + w3)), rtol=1e-5, atol=1e-6)
    assert got[5, 3] == float("-inf")


def test_neighbor_log_probs_never_touch_the_vocabulary():
    """Token ids near 2**40: a dense (N, V) tensor would not fit, the per-neighbour result still matches."""
    dists, small = make_neighbours(seed=1)
    ids = np.random.default_rng(1).choice(2**40, size=V, replace=False)
    vals = ids[small]  # same duplicate structure, huge ids
    got = knn.neighbor_log_probs(_t(dists), _t(vals), 2.0)
    oracle = oracle_word_log_probs(dists, vals, 2.0)
    want = np.array([[row.get(int(w), -np.inf) for w in v] for row, v in zip(oracle, vals)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_knn_target_log_probs_match_oracle(neighbours):
    dists, vals = neighbours
    rng = np.random.default_rng(2)
    target = np.where(rng.random(N) < 0.5, vals[np.arange(N), rng.integers(0, K, N)], rng.integers(0, V, N))
    got = knn.knn_target_log_probs(_t(dists), _t(vals), _t(target), 1.5)
    want = oracle_dense(dists, vals, V, 1.5)[np.arange(N), target]
    assert np.isfinite(want).sum() > N // 3 and np.isinf(want).sum() > 5  # hits and misses both tested
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    # the same numbers as reading the target column of the dense distribution
    dense = knn.knn_log_probs(_t(dists), _t(vals), V, 1.5)
    np.testing.assert_allclose(got.numpy(), dense[torch.arange(N), _t(target)].numpy(), rtol=1e-6, atol=1e-6)


def test_knn_distribution_is_normalized(neighbours):
    dists, vals = neighbours
    lp = knn.knn_log_probs(_t(dists), _t(vals), V, 1.0)
    found = np.isfinite(dists).any(1)
    np.testing.assert_allclose(torch.logsumexp(lp, -1)[found].numpy(), 0.0, atol=1e-5)
    assert torch.isneginf(lp[~found]).all()  # nothing found: no mass anywhere, and no NaN
    assert not torch.isnan(lp).any()


def test_single_word_gets_probability_one():
    dists = torch.tensor([[0.5, 3.0, 9.0, float("inf")]])
    vals = torch.tensor([[4, 4, 4, 1]])
    lp = knn.knn_log_probs(dists, vals, 6, 1.0)
    assert abs(float(lp[0, 4])) < 1e-6 and torch.isneginf(lp[0, [0, 1, 2, 3, 5]]).all()


def test_temperature_and_distance_scale_are_one_knob():
    """exp(-d/T): scaling distances and temperature together changes nothing; a larger T flattens."""
    dists, vals = make_neighbours(seed=3)
    a = knn.knn_log_probs(_t(dists), _t(vals), V, 2.0)
    b = knn.knn_log_probs(_t(dists * 4), _t(vals), V, 8.0)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    ent = [-(lp.exp() * lp.nan_to_num(neginf=0.0)).sum(-1) for lp in
           (knn.knn_log_probs(_t(dists), _t(vals), V, t) for t in (0.5, 50.0))]
    found = np.isfinite(dists).any(1)
    assert (ent[1][found] >= ent[0][found] - 1e-5).all() and (ent[1][found] > ent[0][found] + 1e-3).any()


def _far_neighbours(base: float, rows: int = 8):
    rng = np.random.default_rng(4)
    dists = (base + rng.uniform(0, 5, size=(rows, K))).astype(np.float32)  # (rows, K)
    dists[0, 0] = 0.0  # a huge spread too: exp(-(d - d_min)) underflows for the far neighbours
    return dists, rng.integers(0, V, size=(rows, K))


def test_large_distances_stay_finite():
    """exp(-1e4) underflows in any float: log-space results stay finite, normalized and NaN-free."""
    dists, vals = _far_neighbours(1e4)
    lp = knn.knn_log_probs(_t(dists), _t(vals), V, 1.0)
    present = torch.zeros(len(dists), V, dtype=torch.bool).scatter_(1, _t(vals), True)
    assert torch.isfinite(lp[present]).all() and torch.isneginf(lp[~present]).all()
    # finite and normalized far from the origin (the precise check is test_large_distances_precise)
    np.testing.assert_allclose(torch.logsumexp(lp, -1).numpy(), 0.0, atol=1e-3)
    np.testing.assert_allclose(lp.numpy(), oracle_dense(dists, vals, V, 1.0), rtol=1e-5, atol=1e-3)
    tgt = knn.knn_target_log_probs(_t(dists), _t(vals), _t(vals[:, -1]), 1.0)
    assert torch.isfinite(tgt).all()
    assert torch.isfinite(knn.interpolate_full(torch.full((len(dists), V), -np.log(V)), _t(dists), _t(vals), 0.5)).all()


@pytest.mark.parametrize("base", [1e4, 1e6])
def test_large_distances_precise(base):
    dists, vals = _far_neighbours(base)
    lp = knn.knn_log_probs(_t(dists), _t(vals), V, 1.0)
    np.testing.assert_allclose(torch.logsumexp(lp, -1).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(lp.numpy(), oracle_dense(dists, vals, V, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_nonpositive_temperature_refused(neighbours, temp):
    dists, vals = neighbours
    for fn in (lambda: knn.knn_log_probs(_t(dists), _t(vals), V, temp),
               lambda: knn.neighbor_log_probs(_t(dists), _t(vals), temp),
               lambda: knn.knn_target_log_probs(_t(dists), _t(vals), _t(vals[:, 0]), temp),
               lambda: knn.interpolate_full(torch.zeros(N, V), _t(dists), _t(vals), 0.5, temp)):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            fn()


# ---- interpolation ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_and_knn(neighbours):
    dists, vals = neighbours
    lm = torch.log_softmax(torch.from_numpy(np.random.default_rng(5).normal(0, 3, (N, V))).float(), -1)
    return lm, knn.knn_log_probs(_t(dists), _t(vals), V, 1.0)


def test_interpolate_endpoints_are_exact(lm_and_knn):
    lm, kn = lm_and_knn
    assert torch.equal(knn.interpolate(lm, kn, 0.0), lm)
    assert torch.equal(knn.interpolate(lm, kn, 1.0), kn)


@pytest.mark.parametrize("lmbda", [0.01, 0.25, 0.5, 0.9])
def test_interpolate_matches_probability_space(lm_and_knn, lmbda):
    lm, kn = lm_and_knn
    want = np.log(lmbda * np.exp(kn.double().numpy()) + (1 - lmbda) * np.exp(lm.double().numpy()))
    np.testing.assert_allclose(knn.interpolate(lm, kn, lmbda).numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lmbda", [-0.1, 1.0001, float("nan")])
def test_lambda_outside_unit_interval_refused(lm_and_knn, neighbours, lmbda):
    lm, kn = lm_and_knn
    dists, vals = neighbours
    with pytest.raises(ValueError, match="lmbda must be in"):
        knn.interpolate(lm, kn, lmbda)
    with pytest.raises(ValueError, match="lmbda must be in"):
        knn.interpolate_full(lm, _t(dists), _t(vals), lmbda)


@pytest.mark.parametrize("lmbda", [0.0, 0.25, 0.75, 1.0])
def test_interpolate_full_equals_dense(lm_and_knn, neighbours, lmbda):
    lm, _ = lm_and_knn
    dists, vals = neighbours
    lm_before = lm.clone()
    got = knn.interpolate_full(lm, _t(dists), _t(vals), lmbda, temp=2.0)
    want = knn.interpolate(lm, knn.knn_log_probs(_t(dists), _t(vals), V, 2.0), lmbda)
    assert torch.equal(lm, lm_before)  # the caller's LM log-probs are not written through
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
    found = np.isfinite(dists).any(1) if lmbda > 0 else np.ones(N, bool)
    np.testing.assert_allclose(got.double().exp().sum(-1)[found].numpy(), 1.0, atol=1e-5)
    if lmbda == 0.0:
        assert torch.equal(got, lm)


@pytest.mark.parametrize("per_row", [False, True])
def test_mix_rows_in_place_equals_interpolate_full(lm_and_knn, neighbours, per_row):
    """The hot path's in-place mix on a non-contiguous set of rows, in small chunks: each mixed row equals
    interpolate_full; every other row is left bit for bit."""
    lm, _ = lm_and_knn
    dists, vals = neighbours
    rows = torch.tensor([r for r in range(N) if np.isfinite(dists[r]).any() and r % 7 != 3])  # gaps, runs
    lmbda = torch.from_numpy(np.random.default_rng(2).uniform(0, 1, len(rows))).float() if per_row else 0.3
    lmbda = torch.where(torch.arange(len(rows)) % 5 == 0, 0.0, lmbda) if per_row else lmbda  # some λ=0 rows
    out = lm.clone()
    knn.mix_rows(out, rows, _t(dists)[rows], _t(vals)[rows], lmbda, temp=2.0, chunk=5)
    for i, r in enumerate(rows.tolist()):
        lam = float(lmbda[i]) if per_row else lmbda
        want = knn.interpolate_full(lm[r : r + 1].clone(), _t(dists)[r : r + 1], _t(vals)[r : r + 1], lam, 2.0)
        np.testing.assert_allclose(out[r].numpy(), want[0].numpy(), rtol=1e-5, atol=1e-5)
        if lam == 0.0:
            assert torch.equal(out[r], lm[r])
    rest = torch.ones(N, dtype=torch.bool)
    rest[rows] = False
    assert torch.equal(out[rest], lm[rest])
