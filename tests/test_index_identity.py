"""An index's identity follows what was tuned on it, and nothing a later stage trusts is overwritten silently.

knnlm-build-index records the index file's sha256 in its sidecar; a retrieval log (--save-retrieval) records it,
knnlm-sweep --write-settings carries it into the settings, and fairseq-eval-lm --knn-settings refuses the settings
on any other index (one rebuilt in place with --force included). knnlm-build-index, knnlm-sweep --write-settings
and knnlm-prepare-text refuse to replace what is there without --force.

One tiny world (a knnlm_tiny model trained 4 updates, a dump of its train split, a Flat index, a recorded valid
pass and its settings); the CLI runs go two at a time."""
import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

import clis
from clis import USER_DIR, assert_refused, loss_and_ppl, parallel, random_lines, tiny_lm

TPS, CW = 64, 16
KNN = ("--k", 8, "--lmbda", 0.25, "--knn-temp", 3, "--knn-threads", 1)


def run(name: str, *args, **kw):
    return clis.run_cli(name, *args, env=clis.ONE_THREAD, **kw)


def build_index(dstore, *flags, check: bool = True):
    return run("knnlm-build-index", dstore, "--threads", 1, "--no-progress-bar", *flags, check=check)


def eval_lm(w, split: str, *flags, check: bool = False):
    return run("fairseq-eval-lm", w.data, "--path", w.ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
               "--gen-subset", split, "--tokens-per-sample", TPS, "--context-window", CW, "--max-tokens", 128, "--cpu",
               "--no-progress-bar", *flags, check=check)


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    rng = np.random.default_rng(0)
    random_lines(root / "train.txt", rng, 300, 60)
    random_lines(root / "valid.txt", rng, 50, 60)
    tiny_lm(root, root / "valid.txt", max_update=4)  # root/bin, root/ckpt/checkpoint_last.pt (quality: irrelevant)
    w = SimpleNamespace(root=root, data=root / "bin", ckpt=root / "ckpt" / "checkpoint_last.pt", dstore=root / "dstore",
                        log=root / "retrieval-valid", tuned=root / "tuned.json", rebuilt=root / "dstore-rebuilt")
    eval_lm(w, "train", "--save-dstore", "--dstore-dir", w.dstore, check=True)
    w.index = w.dstore / "index.faiss"
    build_index(w.dstore, "--factory", "Flat")
    w.index_sha256 = sha256(w.index)
    eval_lm(w, "valid", "--knnlm", "--dstore-dir", w.dstore, *KNN, "--save-retrieval", w.log, check=True)
    w.sweep = run("knnlm-sweep", w.log, "--lmbdas", "0,0.25", "--ks", "4,8", "--temps", "1,3",
                  "--write-settings", w.tuned)
    # the same datastore, its index rebuilt in place with another factory (a copy: the original stays for the
    # runs that use it, side by side)
    shutil.copytree(w.dstore, w.rebuilt)
    w.force = build_index(w.rebuilt, "--factory", "IVF4,Flat", "--force")
    w.stats = {name: root / f"stats-{name}.json" for name in ("same", "rebuilt")}
    settings = ("--knnlm", "--dstore-dir")
    w.same, w.refused = parallel(
        lambda: eval_lm(w, "valid", *settings, w.dstore, "--knn-settings", w.tuned, "--knn-stats", w.stats["same"]),
        lambda: eval_lm(w, "valid", *settings, w.rebuilt, "--knn-settings", w.tuned, "--knn-stats",
                        w.stats["rebuilt"], "--save-retrieval", root / "never-log"))
    return w


@pytest.mark.slow
def test_the_sidecar_records_the_index_files_sha256(world):
    sidecar = json.loads((world.dstore / "index.faiss.json").read_text())
    assert sidecar["index_sha256"] == world.index_sha256 == sha256(world.index)


@pytest.mark.slow
def test_build_index_refuses_an_existing_index_and_leaves_its_bytes(world):
    before = {p: sha256(p) for p in (world.index, world.dstore / "index.faiss.json")}
    proc = build_index(world.dstore, "--factory", "IVF4,Flat", check=False)  # another factory: other bytes
    assert_refused(proc, r"dstore/index\.faiss already holds an index \(Flat, [0-9,]+ keys\): .*pass --force to "
                         r"replace it .*or --output NEW_NAME", prog="knnlm-build-index")
    assert {p: sha256(p) for p in before} == before
    assert not [f for f in os.listdir(world.dstore) if ".partial" in f or ".tmp" in f]


@pytest.mark.slow
def test_force_rebuilds_in_place(world):
    assert world.force.returncode == 0, world.force.output[-2000:]
    sidecar = json.loads((world.rebuilt / "index.faiss.json").read_text())
    assert sidecar["factory_used"].startswith("IVF") and sidecar["index_sha256"] == sha256(world.rebuilt / "index.faiss")
    assert sidecar["index_sha256"] != world.index_sha256


@pytest.mark.slow
def test_the_log_and_the_settings_carry_the_index_digest(world):
    meta = json.loads((world.log / "meta.json").read_text())
    assert meta["index"]["id"] == f"sha256:{world.index_sha256}"
    assert meta["index"]["path"] == str(world.index) and meta["index"]["factory"] == "Flat"
    tuned = json.loads(world.tuned.read_text())["tuned_for"]
    assert tuned["index_id"] == f"sha256:{world.index_sha256}" and tuned["index_factory"] == "Flat"
    assert tuned["index_path"] == str(world.index)
    assert "warning" not in world.sweep.stderr


@pytest.mark.slow
def test_settings_run_on_the_index_they_were_tuned_on(world):
    assert world.same.returncode == 0, world.same.output[-3000:]
    assert np.isfinite(loss_and_ppl(world.same.output)[1]) and world.stats["same"].exists()


@pytest.mark.slow
def test_settings_are_refused_on_a_rebuilt_index(world):
    """One line naming the problem and both fixes; no perplexity, no stats, no retrieval log."""
    assert_refused(world.refused, r"--knn-settings .*tuned\.json was tuned on another index \(Flat, sha256 "
                                  + world.index_sha256[:12] + r"\) than .*dstore-rebuilt/index\.faiss \(IVF\d+,Flat, "
                                  r"sha256 [0-9a-f]{12}\), rebuilt or replaced since; re-run the recording pass "
                                  r"\(fairseq-eval-lm --knnlm --save-retrieval\) on .* and knnlm-sweep --write-settings, "
                                  r"or pass the index the settings were tuned on")
    assert not world.stats["rebuilt"].exists() and not (world.root / "never-log").exists()


@pytest.mark.slow
def test_write_settings_refuses_an_existing_file_and_force_replaces_it(world):
    before = world.tuned.read_bytes()
    grid = ("--lmbdas", "0,0.5", "--ks", "8", "--temps", "1")
    proc = run("knnlm-sweep", world.log, *grid, "--write-settings", world.tuned, check=False)
    assert_refused(proc, r"tuned\.json already exists \(settings fairseq-eval-lm --knn-settings reads\); pass --force "
                         r"to replace it, or another --write-settings FILE", prog="knnlm-sweep")
    assert proc.stdout == "" and world.tuned.read_bytes() == before
    other = world.root / "tuned-again.json"
    shutil.copy(world.tuned, other)
    run("knnlm-sweep", world.log, *grid, "--write-settings", other, "--force")
    again = json.loads(other.read_text())
    assert again["tuned_for"]["index_id"] == f"sha256:{world.index_sha256}" and other.read_bytes() != before
    assert not [f for f in os.listdir(world.root) if ".tmp." in f]  # written through the atomic commit


def test_prepare_text_refuses_a_prepared_folder(tmp_path):
    """The refusal through the console script; the runs that write, in-process (each start pays sacremoses)."""
    from knnlm_fairseq.cli.prepare_text import main

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"d{i}.txt").write_text(f"doc{i} says things .\n\nanother paragraph {i} .\n")
    (tmp_path / "dict.txt").write_text("says 5\nthings 2\n. 2\n")
    out = tmp_path / "out"
    args = [str(src), "--dict", str(tmp_path / "dict.txt"), "--out", str(out)]
    assert main(args + ["--valid-docs", "d1", "--test-docs", "d2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run("knnlm-prepare-text", *args, "--valid-docs", "d2", "--test-docs", "d1", check=False)
    assert_refused(proc, r"out already holds prepared text \(.*out/prep\.json\), which fairseq-preprocess and later "
                         r"stages read; pass --force to replace it, or another --out", prog="knnlm-prepare-text")
    assert proc.stdout == "" and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(args + ["--valid-docs", "nosuchdoc", "--force"]) == 2  # --force refused on its input: nothing moved
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(args + ["--valid-docs", "d2", "--test-docs", "d1", "--force"]) == 0
    assert json.loads((out / "prep.json").read_text())["parts"]["valid"]["documents"] == ["d2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before) and (out / "valid.tokens").read_bytes() != \
        before["valid.tokens"]


def test_check_settings_target_names_the_index(tmp_path):
    """In-process, on a Flat index over random keys: the same index passes; another one, a rebuilt one, or settings
    naming none are refused; a sidecar from before index_sha256 names its index by the cheap digest."""
    from knnlm_fairseq.core import index as ix, writer
    from knnlm_fairseq.core.datastore import Datastore
    from knnlm_fairseq.core.errors import KnnlmError
    from knnlm_fairseq.core.settings import check_settings_target

    rng = np.random.default_rng(0)
    w = writer.DatastoreWriter(str(tmp_path / "d"), 8, 50, {"key_type": "t", "checkpoint": {"sha256": "c" * 64},
                                                            "dictionary": {"sha256": "y", "size": 50}})
    w.add(rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 50, 300))
    w.close()
    store = Datastore.open(str(tmp_path / "d"))
    path = str(tmp_path / "d" / "index.faiss")
    ix.build_index(store, path, factory="Flat", progress=False)
    here = ix.index_identity(path)
    assert here["id"] == f"sha256:{sha256(path)}" and here["factory"] == "Flat" and here["ntotal"] == 300

    def settings(index_id):
        return {"tuned_for": {"dstore_fingerprint": store.fingerprint, "checkpoint_sha256": "c" * 64,
                              "index_id": index_id, "index_factory": "Flat"}}

    check_settings_target(settings(here["id"]), "t.json", store.fingerprint, "c" * 64, index_path=path)
    with pytest.raises(KnnlmError, match=r"does not record which index it was tuned on .*re-run the recording pass"):
        check_settings_target(settings(None), "t.json", store.fingerprint, "c" * 64, index_path=path)
    with pytest.raises(KnnlmError, match=r"already holds an index \(Flat, 300 keys\).*--force.*--output NEW_NAME"):
        ix.check_output_free(path)
    ix.build_index(store, path, factory="IVF2,Flat", progress=False)  # rebuilt in place (the library replaces)
    with pytest.raises(KnnlmError, match=r"tuned on another index \(Flat, sha256 [0-9a-f]{12}\) than .*index\.faiss "
                                         r"\(IVF2,Flat, sha256 [0-9a-f]{12}\), rebuilt or replaced since"):
        check_settings_target(settings(here["id"]), "t.json", store.fingerprint, "c" * 64, index_path=path)
    # a sidecar written before index_sha256 was: its cheap digest names the index
    sidecar = json.loads(open(path + ".json").read())
    del sidecar["index_sha256"]
    open(path + ".json", "w").write(json.dumps(sidecar))
    assert ix.index_identity(path)["id"] == f"edges:{sidecar['index_digest']}"
    # an unfinished build's index file (beside its partial record) is left to resume; without one it is an index
    os.remove(path + ".json")
    open(path + ".partial.json", "w").write("{}")
    ix.check_output_free(path)
    os.remove(path + ".partial.json")
    with pytest.raises(KnnlmError, match="already holds an index"):
        ix.check_output_free(path)


def test_experiment_sweeps_remake_their_settings_on_purpose():
    """A stage removes its outputs before making them again: the settings file is one of them, and --force lets
    a run interrupted after writing it (before its commit point) run again."""
    from knnlm_fairseq.experiments import commands as C

    cmd = C.sweep(["v"], "s.json", [0.0], [8], [1.0], extra=["--write-settings", "t.json"])
    assert "--force" in cmd.argv and list(cmd.outputs) == ["s.json", "t.json"]
    plain = C.sweep(["v"], "s.json", [0.0], [8], [1.0])
    assert "--force" not in plain.argv and list(plain.outputs) == ["s.json"]
