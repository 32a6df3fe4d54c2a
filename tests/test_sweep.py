"""The offline sweep against a float64 numpy oracle of each token's interpolated probability."""
import json

import numpy as np
import pytest

from clis import run_cli
from knnlm_fairseq.core import retrieval_log as rl, sweep as sw


N, K, V, DIM = 300, 16, 40, 4
META = {"split": "valid", "nprobe": 8, "index_file": "index.faiss",
        "dstore": {"path": "/d", "fingerprint": "f" * 64, "count": 10**6}, "checkpoint": {"path": "/c", "sha256": "c" * 64}}


def write_log(path, seed=0, missing_rows=()):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, V, N)
    lm_lp = np.log(rng.uniform(0.001, 0.5, N))
    vals = rng.integers(0, V, (N, K))
    hit = rng.random((N, K)) < 0.3
    vals[hit] = np.broadcast_to(target[:, None], (N, K))[hit]  # targets among the neighbours, with repeats
    d = np.sort(rng.uniform(0, 50, (N, K)), axis=1)
    exact = d + rng.normal(0, 0.5, (N, K))
    for r in missing_rows:
        d[r], exact[r] = np.inf, np.inf
    w = rl.RetrievalLogWriter(str(path), K, META, dim=DIM)
    for s in range(0, N, 77):  # several appends
        sl = slice(s, s + 77)
        ids = np.where(np.isfinite(d[sl]), rng.integers(0, 10**6, d[sl].shape), -1)  # rows are not read by the sweep
        w.add(target=target[sl], lm_lp=lm_lp[sl], ids=ids, vals=vals[sl], dist_approx=d[sl], dist_exact=exact[sl],
              query=rng.normal(size=(len(ids), DIM)), lm_entropy=-lm_lp[sl], lm_max_lp=lm_lp[sl] / 2,
              block_start=np.arange(s, s + len(ids)) % 50 == 0)
    w.close()
    return target, lm_lp, vals, {"approx": d, "exact": exact}


def oracle_ppl(target, lm_lp, vals, dist, k, temp, lmbda):
    total = 0.0
    for t, lm, v, d in zip(target, lm_lp.astype(np.float64), vals[:, :k], dist[:, :k].astype(np.float64)):
        if not np.isfinite(d).any():
            total += lm  # no neighbour: the LM alone
            continue
        w = np.exp(-(d - d.min()) / temp)
        p_knn = w[v == t].sum() / w.sum()
        total += np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lm))
    return float(np.exp(-total / len(target)))


@pytest.fixture
def log(tmp_path):
    arrays = write_log(tmp_path / "log", missing_rows=(5, 17))
    return rl.RetrievalLog(str(tmp_path / "log")), arrays


def test_every_grid_point_matches_the_oracle(log):
    lg, (target, lm_lp, vals, dists) = log
    lmbdas, ks, temps = [0.0, 0.3, 0.9], [1, 4, K], [0.5, 3.0]
    res = sw.sweep(lg, lmbdas, ks, temps, chunk=50)  # chunks that do not divide N
    assert res["n_tokens"] == N
    np.testing.assert_allclose(res["base_ppl"], np.exp(-lm_lp.astype(np.float64).mean()), rtol=1e-6)
    for kind in ("approx", "exact"):
        for i, k in enumerate(ks):
            for j, t in enumerate(temps):
                for m, lam in enumerate(lmbdas):
                    want = oracle_ppl(target, lm_lp, vals, dists[kind], k, t, lam)
                    np.testing.assert_allclose(res["ppl"][kind][i, j, m], want, rtol=1e-5)


def test_lambda_zero_is_the_lm(log):
    lg, _ = log
    res = sw.sweep(lg, [0.0], [K], [1.0])
    np.testing.assert_allclose(res["ppl"]["exact"][0, 0, 0], res["base_ppl"], rtol=1e-9)


def test_best_and_lookup_agree(log):
    lg, _ = log
    res = sw.sweep(lg, [0.0, 0.2, 0.5], [2, K], [1.0, 5.0])
    b = sw.best(res, "exact")
    assert b["ppl"] == pytest.approx(float(res["ppl"]["exact"].min()))
    assert sw.lookup(res, "exact", b["k"], b["temp"], b["lmbda"]) == pytest.approx(b["ppl"])
    fixed = sw.best(res, "exact", k=2, temp=5.0)
    assert (fixed["k"], fixed["temp"]) == (2, 5.0)


@pytest.mark.parametrize("bad", [dict(lmbdas=[1.0]), dict(ks=[K + 1]), dict(temps=[0.0])])
def test_bad_grids_refused(log, bad):
    lg, _ = log
    grid = dict(lmbdas=[0.1], ks=[K], temps=[1.0]) | bad
    with pytest.raises(ValueError):
        sw.sweep(lg, grid["lmbdas"], grid["ks"], grid["temps"])


def test_unfinished_log_refused(tmp_path):
    w = rl.RetrievalLogWriter(str(tmp_path / "x"), K, {}, dim=DIM)
    w.add(target=np.zeros(2), lm_lp=np.zeros(2), ids=np.zeros((2, K)), vals=np.zeros((2, K)), dist_approx=np.zeros((2, K)),
          dist_exact=np.zeros((2, K)), query=np.zeros((2, DIM)), lm_entropy=np.zeros(2), lm_max_lp=np.zeros(2),
          block_start=np.zeros(2, bool))
    with pytest.raises(ValueError, match="not a finished retrieval log"):
        rl.RetrievalLog(str(tmp_path / "x"))


def test_cli_tunes_on_first_log_and_applies_to_second(tmp_path):
    write_log(tmp_path / "valid", seed=1)
    target, lm_lp, vals, dists = write_log(tmp_path / "test", seed=2)
    out = tmp_path / "sweep.json"
    run_cli("knnlm-sweep", tmp_path / "valid", tmp_path / "test", "--lmbdas", "0,0.25,0.5", "--ks", "4,16",
            "--temps", "1,10", "--output", out)
    res = json.loads(out.read_text())
    tuned = res["tuned"]["exact"]
    assert res["logs"][1]["tuned"]["exact"] == pytest.approx(
        oracle_ppl(target, lm_lp, vals, dists["exact"], tuned["k"], tuned["temp"], tuned["lmbda"]), rel=1e-5)
    bad = run_cli("knnlm-sweep", tmp_path / "nope", check=False)
    assert bad.returncode == 2 and "not a finished retrieval log" in bad.stderr


def test_cli_writes_settings_that_eval_lm_accepts(tmp_path):
    """--gates tunes a per-token λ on valid; --write-settings picks the cheapest point within the budget and
    writes a file naming the datastore and checkpoint of the log, with flags the task's settings reader takes."""
    from knnlm_fairseq.core.settings import read_settings

    write_log(tmp_path / "valid", seed=1)
    write_log(tmp_path / "test", seed=2)
    out, tuned = tmp_path / "sweep.json", tmp_path / "tuned.json"
    run_cli("knnlm-sweep", tmp_path / "valid", tmp_path / "test", "--lmbdas", "0,0.25,0.5", "--ks", "4,16",
            "--temps", "1,10", "--gates", "entropy,max_lp", "--buckets", "4", "--output", out,
            "--write-settings", tuned, "--max-ppl-increase", "2")
    res = json.loads(out.read_text())
    chosen = res["chosen"]
    assert chosen["ppl"] <= chosen["budget"] == pytest.approx(chosen["reference"]["ppl"] * 1.02)
    assert len(res["adaptive"]["rows"]) == 2 * 2 * 2  # kinds x ks x gates
    for row in res["adaptive"]["rows"]:  # every frontier point was applied to the test log too
        assert all(len(p["applied"]) == 1 for p in row["frontier"])
    s = read_settings(str(tuned))
    assert s["tuned_for"]["dstore_fingerprint"] == "f" * 64 and s["tuned_for"]["checkpoint_sha256"] == "c" * 64
    assert s["knnlm"]["k"] == chosen["k"] and s["knnlm"]["knn_dist"] == chosen["kind"]
    assert s["knnlm"]["probe"] == 8 and s["searched"] == chosen["searched"]


def test_truncated_log_is_the_first_rows_committed_by_the_writer(tmp_path):
    """The first n rows of a retrieval log (an evaluation of a prefix) as a log of its own, meta.json written last
    by RetrievalLogWriter; its sweep is the oracle's on those rows."""
    target, lm_lp, vals, dist = write_log(tmp_path / "log", missing_rows=(5,))
    meta = rl.truncate_log(str(tmp_path / "log"), str(tmp_path / "cut"), 120, chunk=50)
    cut, full = rl.RetrievalLog(str(tmp_path / "cut")), rl.RetrievalLog(str(tmp_path / "log"))
    assert cut.meta == meta and (cut.count, cut.k, meta["split"]) == (120, K, "valid")
    assert meta["truncated_from"] == str(tmp_path / "log")
    for name in rl.ARRAYS:
        np.testing.assert_array_equal(getattr(cut, name), getattr(full, name)[:120])
    res = sw.sweep(cut, [0.25], [8], [3.0], ["exact"])
    want = oracle_ppl(target[:120], lm_lp[:120], vals[:120], dist["exact"][:120], 8, 3.0, 0.25)
    assert sw.lookup(res, "exact", 8, 3.0, 0.25) == pytest.approx(want, rel=1e-4)
    with pytest.raises(rl.KnnlmError, match="fewer than the 301 asked"):
        rl.truncate_log(str(tmp_path / "log"), str(tmp_path / "more"), N + 1)
    with pytest.raises(rl.KnnlmError, match="already holds a log"):
        rl.truncate_log(str(tmp_path / "log"), str(tmp_path / "cut"), 10)
