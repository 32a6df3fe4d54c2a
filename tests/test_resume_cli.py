"""SIGKILL the real `fairseq-eval-lm --save-dstore` at seeded random points; re-running the same command
resumes and the datastore is byte-identical to an uninterrupted dump."""
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from clis import BIN, USER_DIR, random_lines, tiny_lm

pytestmark = pytest.mark.slow  # starts fairseq CLIs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    random_lines(tmp / "train.txt", np.random.default_rng(0), 1500, 80)
    tiny_lm(tmp, tmp / "train.txt", max_update=5)
    return tmp


def dump_cmd(tmp, dstore):
    # many small batches, each committed (--dstore-commit-seconds 0), so kills land between and inside commits
    return [os.path.join(BIN, "fairseq-eval-lm"), str(tmp / "bin"), "--path", str(tmp / "ckpt" / "checkpoint_last.pt"),
            "--user-dir", USER_DIR, "--task", "knn_eval", "--save-dstore", "--dstore-dir", str(dstore),
            "--gen-subset", "valid", "--tokens-per-sample", "48", "--context-window", "16", "--max-tokens", "96",
            "--cpu", "--dstore-commit-seconds", "0", "--no-progress-bar"]


def rows_on_disk(dstore):
    try:
        with open(dstore / "progress.json") as f:
            return json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        return 0


def test_sigkill_anywhere_then_resume_is_byte_identical(setup):
    tmp = setup
    ref = tmp / "ref"
    subprocess.run(dump_cmd(tmp, ref), check=True, capture_output=True)
    total = json.loads((ref / "manifest.json").read_text())["count"]
    rng = np.random.default_rng(1234)
    dstore = tmp / "killed"
    targets = sorted(rng.integers(1, int(total * 0.8), size=3))  # kill once past each of these row counts
    kills = 0
    for target in targets:
        proc = subprocess.Popen(dump_cmd(tmp, dstore), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and rows_on_disk(dstore) < target and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.005))  # land anywhere: inside a write, an fsync or a rename
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (dstore / "manifest.json").exists():
            break  # this run outpaced its kill and finished (a later target may already be passed)
    assert kills >= 1, "the dump finished before any kill: make the corpus larger"
    if not (dstore / "manifest.json").exists():
        out = subprocess.run(dump_cmd(tmp, dstore), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((dstore / "manifest.json").read_text())
    assert m["count"] == total and m["resumed_after_rows"] > 0
    for name in ("keys.npy", "vals.npy"):
        assert (dstore / name).read_bytes() == (ref / name).read_bytes(), name
    assert m["fingerprint"] == json.loads((ref / "manifest.json").read_text())["fingerprint"]
    assert not (dstore / "progress.json").exists()


def test_resume_with_other_settings_is_refused(setup):
    tmp = setup
    for attempt in range(3):  # a kill that lands after the last commit leaves a finished dump: try again
        dstore = tmp / f"other{attempt}"
        proc = subprocess.Popen(dump_cmd(tmp, dstore), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and rows_on_disk(dstore) < 50 and time.time() < deadline:
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        if not (dstore / "manifest.json").exists():
            break
    assert not (dstore / "manifest.json").exists(), "three dumps finished before their kill"
    cmd = dump_cmd(tmp, dstore)
    cmd[cmd.index("--context-window") + 1] = "8"
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0
    assert "unfinished dump made with other settings" in out.stderr
    assert not (dstore / "manifest.json").exists()


def test_index_build_killed_anywhere_resumes_to_the_same_bytes(tmp_path):
    from knnlm_fairseq.core import writer

    rng = np.random.default_rng(7)
    n, dim = 12_000, 16
    w = writer.DatastoreWriter(str(tmp_path / "d"), dim, 100, {"key_type": "t", "checkpoint": {"sha256": "x"},
                                                         "dictionary": {"sha256": "y", "size": 100}})
    w.add(rng.normal(size=(n, dim)).astype(np.float32), rng.integers(0, 100, n))
    w.close()

    def cmd(out):
        return [os.path.join(BIN, "knnlm-build-index"), str(tmp_path / "d"), "--factory", "IVF16,PQ4x4",
                "--train-size", "4000", "--add-chunk", "40", "--checkpoint-seconds", "0", "--threads", "1",
                "--no-progress-bar", "--output", out]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd("ref.faiss"), check=True, capture_output=True, env=env)
    partial = tmp_path / "d" / "idx.faiss.partial.json"

    def added():
        try:
            return json.loads(partial.read_text())["added"]
        except (OSError, ValueError, KeyError):
            return -1

    kills = 0
    for target in sorted(np.random.default_rng(99).integers(0, int(n * 0.8), size=3)):
        proc = subprocess.Popen(cmd("idx.faiss"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while proc.poll() is None and added() < target and time.time() < deadline:
            time.sleep(0.002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if (tmp_path / "d" / "idx.faiss").exists():
            break
    assert kills >= 1
    assert added() > 0  # there was something to resume from
    if not (tmp_path / "d" / "idx.faiss").exists():
        out = subprocess.run(cmd("idx.faiss"), capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "resuming" in out.stderr, [line for line in out.stderr.splitlines() if "partial" in line or "resum" in line]
    assert (tmp_path / "d" / "idx.faiss").read_bytes() == (tmp_path / "d" / "ref.faiss").read_bytes()
    assert not [f for f in os.listdir(tmp_path / "d") if ".partial" in f]
