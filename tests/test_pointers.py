"""Pointer reuse simulated from a log (core/pointers.py) against a hand replay on a tiny datastore."""
import math

import numpy as np
import pytest

from knnlm_fairseq.core import pointers
from knnlm_fairseq.core.datastore import Datastore
from knnlm_fairseq.core.retrieval_log import RetrievalLog, RetrievalLogWriter
from knnlm_fairseq.core.writer import DatastoreWriter

K, DIM, N = 4, 3, 40


@pytest.fixture
def world(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(N, DIM)).astype(np.float32)
    vals = np.array([i % 5 for i in range(N)])  # a stream whose continuations repeat every 5 tokens
    w = DatastoreWriter(str(tmp_path / "d"), DIM, 10, {"key_type": "x", "checkpoint": {"sha256": "c"},
                                                       "dictionary": {"sha256": "d", "size": 10}})
    w.add(keys, vals)
    w.close()
    d = Datastore.open(str(tmp_path / "d"))
    # three tokens: 1, 2, 3. Token 0's neighbours are rows 1, 6, 11 (value 1 = its target) and row 2 (value 2)
    targets = np.array([1, 2, 3])
    ids = np.array([[1, 6, 11, 2], [2, 7, 3, 12], [3, 8, 13, 4]])  # what a search returns at each token
    dists = np.array([[1.0, 2.0, 3.0, 4.0]] * 3)
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    log = RetrievalLogWriter(str(tmp_path / "log"), K, {"dstore": {"path": d.path}}, dim=DIM)
    log.add(target=targets, lm_lp=np.log([0.1, 0.2, 0.3]), ids=ids, vals=vals[ids], dist_approx=dists,
            dist_exact=dists, query=queries, lm_entropy=np.zeros(3), lm_max_lp=np.zeros(3),
            block_start=np.array([True, False, False]))
    log.close()
    return d, RetrievalLog(str(tmp_path / "log")), keys, vals, queries


def mix(lm_lp, dists, vals, target, temp, lmbda):
    w = np.exp(-(dists - dists.min()) / temp)
    p_knn = w[vals == target].sum() / w.sum()
    return math.log(lmbda * p_knn + (1 - lmbda) * math.exp(lm_lp))


def test_no_reuse_is_the_plain_log(world):
    d, log, *_ = world
    r = pointers.simulate(log, d, "exact", K, 2.0, 0.5, min_pointers=10**9)
    vals = np.asarray(log.vals)
    want = [mix(log.lm_lp[t], np.asarray(log.dist_exact[t]), vals[t], log.target[t], 2.0, 0.5) for t in range(3)]
    assert r["searched"] == 1.0 and r["ppl"] == pytest.approx(math.exp(-np.mean(want)), rel=1e-6)


def test_reused_pointers_are_the_successors_that_predicted_the_token(world):
    d, log, keys, vals, queries = world
    r = pointers.simulate(log, d, "exact", K, 2.0, 0.5, min_pointers=3)
    # token 1: token 0's neighbours with value 1 (rows 1, 6, 11) point on to rows 2, 7, 12 -> 3 pointers, reused
    # token 2: token 1's neighbours (rows 2, 7, 12, all value 2 = its target) point on to 3, 8, 13 -> reused
    want = [mix(log.lm_lp[0], np.asarray(log.dist_exact[0]), vals[np.asarray(log.ids[0])], 1, 2.0, 0.5)]
    for t, rows in ((1, [2, 7, 12]), (2, [3, 8, 13])):
        dist = ((keys[rows] - queries[t]) ** 2).sum(1)  # exact distances from the stored keys
        want.append(mix(log.lm_lp[t], dist, vals[rows], log.target[t], 2.0, 0.5))
    assert r["searched"] == pytest.approx(1 / 3)
    assert r["ppl"] == pytest.approx(math.exp(-np.mean(want)), rel=1e-5)
    assert pointers.simulate(log, d, "exact", K, 2.0, 0.5, min_pointers=4)["searched"] == 1.0  # too few survive
