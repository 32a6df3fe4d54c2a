"""The dump under fairseq's own distributed engine (2 CPU workers, gloo) and as separate --num-shards jobs:
the shards read as one are the single-worker datastore row for row, and kNN-LM evaluation is identical."""
import json
import os
import socket
import subprocess

import numpy as np
import pytest

from clis import BIN, ONE_THREAD, USER_DIR, loss_and_ppl, random_lines, run_cli, tiny_lm

pytestmark = pytest.mark.slow  # starts fairseq CLIs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiworker")
    rng = np.random.default_rng(0)
    random_lines(tmp / "train.txt", rng, 400, 60)
    random_lines(tmp / "valid.txt", rng, 60, 60)
    tiny_lm(tmp, tmp / "valid.txt", max_update=5)
    return tmp


def eval_lm(tmp, *extra):
    return [os.path.join(BIN, "fairseq-eval-lm"), str(tmp / "bin"), "--path", str(tmp / "ckpt" / "checkpoint_last.pt"),
            "--user-dir", USER_DIR, "--task", "knn_eval", "--gen-subset", "train", "--tokens-per-sample", "48",
            "--context-window", "16", "--max-tokens", "240", "--cpu", "--no-progress-bar", *[str(e) for e in extra]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def rows(path):
    from knnlm_fairseq.core.datastore import Datastore

    store = Datastore.open(str(path))
    return np.asarray(store.keys[:]), np.asarray(store.vals[:]), store


@pytest.fixture(scope="module")
def single(setup):
    run_cli(*eval_lm(setup, "--save-dstore", "--dstore-dir", setup / "single"), env=ONE_THREAD)
    return rows(setup / "single")


def test_two_gloo_workers_write_shards_that_read_as_the_single_dump(setup, single):
    """As README documents: one process per rank, --distributed-no-spawn (fairseq spawns one per GPU)."""
    out = setup / "gloo"
    port = free_port()
    procs = [subprocess.Popen(eval_lm(setup, "--save-dstore", "--dstore-dir", out, "--distributed-world-size", 2,
                                      "--distributed-rank", rank, "--distributed-backend", "gloo",
                                      "--distributed-init-method", f"tcp://localhost:{port}", "--distributed-no-spawn"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, **ONE_THREAD))
             for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    m = json.loads((out / "manifest.json").read_text())
    assert [s["path"] for s in m["shards"]] == ["shard-00000-of-00002", "shard-00001-of-00002"]
    parts = [json.loads((out / s["path"] / "manifest.json").read_text()) for s in m["shards"]]
    assert [p["shard"] for p in parts] == [{"id": 0, "of": 2}, {"id": 1, "of": 2}]
    assert all(p["count"] > 0 for p in parts)
    keys, vals, store = rows(out)
    ref_keys, ref_vals, ref = single
    # the multiset of (key, value) pairs is the single-worker one; in fact the very rows in the same order
    assert sorted(map(bytes, np.c_[keys.view(np.uint16), vals])) == sorted(map(bytes, np.c_[ref_keys.view(np.uint16), ref_vals]))
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_array_equal(vals, ref_vals)
    assert store.count == ref.count


def test_separate_shard_jobs_assemble_and_evaluate_identically(setup, single):
    out = setup / "jobs"
    for shard in (1, 0):  # any order: the last one to finish writes the datastore's manifest
        run_cli(*eval_lm(setup, "--save-dstore", "--dstore-dir", out, "--num-shards", 2, "--shard-id", shard),
                env=ONE_THREAD)
        assert (out / "manifest.json").exists() == (shard == 0)
    keys, vals, _ = rows(out)
    np.testing.assert_array_equal(keys, single[0])
    np.testing.assert_array_equal(vals, single[1])
    ppl = []
    for d in (setup / "single", out):
        run_cli("knnlm-build-index", d, "--factory", "Flat", "--no-progress-bar")
        proc = run_cli(*eval_lm(setup, "--knnlm", "--dstore-dir", d, "--k", 32, "--lmbda", 0.5, "--knn-temp", 3),
                       env=ONE_THREAD)
        ppl.append(loss_and_ppl(proc.output))
    assert ppl[0] == ppl[1]


def test_sharded_evaluation_is_refused(setup, single):
    proc = run_cli(*eval_lm(setup, "--knnlm", "--dstore-dir", setup / "single", "--num-shards", 2, "--shard-id", 0),
                   check=False)
    assert proc.returncode != 0 and "Perplexity" not in proc.output
    assert "knnlm_fairseq: error: " in proc.stderr and "evaluate in one process" in proc.stderr
