"""Every row of docs/bad-inputs.md through the real command, as a subprocess: a non-zero exit, the refusal as the
last line of stderr (`knnlm_fairseq: error: ...` under fairseq-eval-lm, `knnlm-x: error: ...` for our scripts),
no perplexity, no traceback, and every file that was there before left byte for byte as it was.

One tiny world (a knnlm_tiny model trained 20 updates, two dumps of its valid split, two Flat indexes); the
refused runs go two at a time. Rows that tests/test_e2e_cli.py, test_bad_inputs.py, test_index.py,
test_resume_cli.py and test_multiworker_cli.py already run through the CLI are not repeated here."""
import errno
import hashlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import clis
from clis import USER_DIR, assert_refused, parallel, random_lines, tiny_lm

pytestmark = pytest.mark.slow

TPS, CW = 64, 16
FSIZE_KIB = 16  # the "disk" of the full-disk case: keys.npy may not grow past 16 KiB (255 rows of 32 fp16)


def run(name: str, *args, **kw):
    """One thread per process: CLIs run two at a time on 2 shared cores."""
    return clis.run_cli(name, *args, env=clis.ONE_THREAD, **kw)


def tree_sha256(*dirs) -> dict:
    """sha256 of every file under dirs (what a refused run must leave alone)."""
    out = {}
    for d in dirs:
        for base, _, files in os.walk(d):
            for f in files:
                p = os.path.join(base, f)
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def eval_lm(w, *flags, data=None, path=None, check: bool = False, fsize_kib: int = 0):
    return run("fairseq-eval-lm", data or w.data, "--path", path or w.ckpt, "--user-dir", USER_DIR, "--task",
               "knn_eval", "--gen-subset", "valid", "--tokens-per-sample", TPS, "--context-window", CW,
               "--max-tokens", 128, "--cpu", "--no-progress-bar", *flags, check=check, fsize_kib=fsize_kib)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    rng = np.random.default_rng(0)
    random_lines(root / "train.txt", rng, 300, 60)
    random_lines(root / "valid.txt", rng, 50, 60)
    tiny_lm(root, root / "valid.txt", max_update=20)  # root/bin, root/ckpt/checkpoint_last.pt
    w = SimpleNamespace(root=root, data=root / "bin", ckpt=root / "ckpt" / "checkpoint_last.pt",
                        dstore=root / "dstore", other_keys=root / "dstore-block-f32", data_other_dict=root / "bin-swapped")
    # the same words in another order: same size (the checkpoint loads), other token ids
    lines = open(w.data / "dict.txt").read().splitlines(keepends=True)
    (root / "swapped-dict.txt").write_text("".join([lines[1], lines[0]] + lines[2:]))
    parallel(
        lambda: eval_lm(w, "--save-dstore", "--dstore-dir", w.dstore, check=True),
        # another key type and key dtype: a complete datastore that does not belong with w.dstore
        lambda: eval_lm(w, "--save-dstore", "--dstore-dir", w.other_keys, "--knn-keytype", "last_block_output",
                        "--dstore-key-dtype", "float32", check=True),
        lambda: run("fairseq-preprocess", "--only-source", "--srcdict", root / "swapped-dict.txt", "--validpref",
                    root / "valid.txt", "--destdir", w.data_other_dict, "--workers", "1"),
    )
    parallel(lambda: run("knnlm-build-index", w.dstore, "--factory", "Flat", "--threads", 1, "--no-progress-bar"),
             lambda: run("knnlm-build-index", w.dstore, "--factory", "Flat", "--metric", "ip", "--output", "ip.faiss",
                         "--threads", 1, "--no-progress-bar"))
    w.count = json.loads((w.dstore / "manifest.json").read_text())["count"]
    assert w.count > 2 * FSIZE_KIB * 1024 // 64  # the full-disk case stops the dump well before its end
    return w


def copy_dstore(w, name: str, skip=()) -> str:
    d = w.root / name
    shutil.copytree(w.dstore, d, ignore=lambda _, names: [n for n in names if n in skip])
    return str(d)


def truncated_keys(w):
    d = copy_dstore(w, "truncated")
    with open(os.path.join(d, "keys.npy"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 64)  # the last row of 32 fp16
    return ("--knnlm", "--dstore-dir", d)


def keys_of_another_dump(w):
    d = copy_dstore(w, "foreign-keys")
    shutil.copy(w.other_keys / "keys.npy", d)  # as many rows, float32
    return ("--knnlm", "--dstore-dir", d)


def index_swapped_under_its_sidecar(w):
    d = copy_dstore(w, "swapped-index")
    shutil.copy(os.path.join(d, "ip.faiss"), os.path.join(d, "index.faiss"))  # same keys, other metric
    return (*KNN, "--dstore-dir", d)


def merged_then_replaced(w):
    """Two copies merged with knnlm-merge-dstore (exit 0), then one replaced by another complete datastore."""
    a, b = copy_dstore(w, "part-a"), copy_dstore(w, "part-b")
    run("knnlm-merge-dstore", w.root / "merged", a, b)
    shutil.rmtree(b)
    shutil.copytree(w.other_keys, b)
    return ("--knnlm", "--dstore-dir", w.root / "merged")


def merged_then_moved(w):
    a, b = copy_dstore(w, "part-c"), copy_dstore(w, "part-d")
    run("knnlm-merge-dstore", w.root / "merged-moved", a, b)
    os.rename(b, b + "-moved")
    return ("--knnlm", "--dstore-dir", w.root / "merged-moved")


def scaled_checkpoint(w, factor: float) -> str:
    """The checkpoint with the last block's FFN layer norm scaled: last_ffn_input keys of magnitude ~factor."""
    state = torch.load(w.ckpt, map_location="cpu", weights_only=False)
    for p in ("weight", "bias"):
        state["model"][f"decoder.layers.1.final_layer_norm.{p}"] *= factor
    path = str(w.root / "scaled.pt")
    torch.save(state, path)
    return path


def dev_full_keys(w):
    """A dump whose keys file is /dev/full: every write of it fails with ENOSPC, as on a full disk."""
    d = w.root / "dump-dev-full"
    d.mkdir()
    os.symlink("/dev/full", d / "keys.npy")
    return ("--save-dstore", "--dstore-dir", d)


def settings_of(w, name: str, index_sidecar=None):
    """A --knn-settings file tuned for w.dstore and this checkpoint; index_sidecar: the index it names (None: none,
    as a file written before knnlm-sweep recorded the index)."""
    m = json.loads((w.dstore / "manifest.json").read_text())
    tuned = {"dstore_fingerprint": m["fingerprint"], "checkpoint_sha256": m["checkpoint"]["sha256"]}
    if index_sidecar is not None:
        side = json.loads((w.dstore / index_sidecar).read_text())
        tuned.update(index_id=f"sha256:{side['index_sha256']}", index_factory=side["factory_used"])
    path = w.root / name
    path.write_text(json.dumps({"format": "knnlm-settings/1", "tuned_for": tuned, "knnlm": {
        "index_file": "index.faiss", "k": 8, "lmbda": 0.25, "knn_temp": 3.0, "knn_dist": "exact"}}))
    return ("--knnlm", "--dstore-dir", w.dstore, "--knn-settings", path)


KNN = ("--knnlm", "--k", 8, "--lmbda", 0.25, "--knn-temp", 3)
GRID = r"need --cache-size >= 0, --cache-theta > 0 and --cache-lmbda in \[0, 1\); got "

# name -> (flags of fairseq-eval-lm, or a callable world -> flags; the message on its last line)
EVAL_LM = {
    # flag combinations (plugin/config_checks.py), refused before the model is loaded
    "knnlm_with_save_dstore": (lambda w: ("--knnlm", "--save-dstore", "--dstore-dir", w.root / "never"),
                               r"--knnlm and --save-dstore are separate runs; pass one of them"),
    "knnlm_without_dstore_dir": (("--knnlm",), r"--knnlm and --save-dstore need --dstore-dir DIR"),
    "save_dstore_without_dstore_dir": (("--save-dstore",), r"--knnlm and --save-dstore need --dstore-dir DIR"),
    "save_retrieval_without_knnlm": (lambda w: ("--save-retrieval", w.root / "never-log"),
                                     r"--save-retrieval records what --knnlm retrieves; add --knnlm"),
    "two_checkpoints": (lambda w: ("--path", f"{w.ckpt}{os.pathsep}{w.ckpt}", "--knnlm", "--dstore-dir", w.dstore),
                        r"--path names 2 checkpoints; kNN-LM scores with exactly one"),
    "cache_size_negative": (("--cache-size", -1), GRID + r"-1, 0\.03, 0\.2"),
    "cache_theta_zero": (("--cache-size", 8, "--cache-theta", 0), GRID + r"8, 0\.0, 0\.2"),
    "cache_lmbda_one": (("--cache-size", 8, "--cache-lmbda", 1), GRID + r"8, 0\.03, 1\.0"),
    "eval_tokens_negative": (("--eval-tokens", -5), r"--eval-tokens must be >= 0 \(0: the whole split\), got -5"),
    "eval_tokens_with_save_dstore": (lambda w: ("--eval-tokens", 100, "--save-dstore", "--dstore-dir",
                                                w.root / "never"),
                                     r"--eval-tokens evaluates a prefix; to dump part of a text, binarize that part"),
    # the files the flags name
    "data_without_dictionary": (lambda w: ("--data", w.root / "not-a-data-bin"),
                                r"not-a-data-bin holds no dict\.txt: pass the directory fairseq-preprocess wrote"),
    "missing_index": (lambda w: (*KNN, "--dstore-dir", w.dstore, "--index-file", "missing.faiss"),
                      r"no index at .*/dstore/missing\.faiss \(with missing\.faiss\.json\); run knnlm-build-index"),
    "other_dictionary": (lambda w: (*KNN, "--dstore-dir", w.dstore, "--data", w.data_other_dict),
                         r"dstore was dumped with another dictionary \(\d+ symbols\); binarize the data with the "
                         r"checkpoint's dict\.txt \(--srcdict\) and dump again"),
    "knn_sim_ip_on_an_l2_index": (lambda w: (*KNN, "--dstore-dir", w.dstore, "--knn-sim", "ip"),
                                  r"index .*index\.faiss was built for 'l2' similarity, not 'ip'; pass --knn-sim l2 "
                                  r"or rebuild with --metric ip"),
    "knn_sim_l2_on_an_ip_index": (lambda w: (*KNN, "--dstore-dir", w.dstore, "--index-file", "ip.faiss", "--knn-sim",
                                             "l2"),
                                  r"index .*ip\.faiss was built for 'ip' similarity, not 'l2'; pass --knn-sim ip"),
    "index_swapped_under_its_sidecar": (index_swapped_under_its_sidecar,
                                        r"swapped-index/index\.faiss is not the index its sidecar index\.faiss\.json "
                                        r"describes \(copied or rebuilt separately\); rebuild it with knnlm-build-index"),
    # settings tuned on another index than the one searched (as after knnlm-build-index --force), or on none known
    "settings_tuned_on_another_index": (
        lambda w: settings_of(w, "tuned-on-ip.json", "ip.faiss.json"),
        r"--knn-settings .*tuned-on-ip\.json was tuned on another index \(Flat, sha256 [0-9a-f]{12}\) than "
        r".*dstore/index\.faiss \(Flat, sha256 [0-9a-f]{12}\), rebuilt or replaced since; re-run the recording pass "
        r"\(fairseq-eval-lm --knnlm --save-retrieval\) on .* and knnlm-sweep --write-settings, or pass the index the "
        r"settings were tuned on"),
    "settings_without_index_digest": (
        lambda w: settings_of(w, "tuned-before-digests.json"),
        r"--knn-settings .*tuned-before-digests\.json does not record which index it was tuned on \(written before "
        r"knnlm-sweep recorded one, or from a log without it\); re-run the recording pass \(fairseq-eval-lm --knnlm "
        r"--save-retrieval\) on .*dstore/index\.faiss and knnlm-sweep --write-settings"),
    "other_key_type": (lambda w: (*KNN, "--dstore-dir", w.dstore, "--knn-keytype", "last_block_output"),
                       r"holds 'last_ffn_input' keys but 'last_block_output' was asked; pass --knn-keytype "
                       r"last_ffn_input or dump again"),
    # a truncated .npy no longer holds what its own header says: numpy cannot map it
    "truncated_keys": (truncated_keys, r"truncated/keys\.npy is unreadable \(mmap length is greater than file size\); "
                                       r"the datastore is damaged, dump it again"),
    "keys_of_another_dump": (keys_of_another_dump, r"keys\.npy holds float32\[\d+, 32\] but the manifest says "
                                                   r"float16\[\d+, 32\]; the file is truncated or from another dump, dump it again"),
    "missing_manifest": (lambda w: (*KNN, "--dstore-dir", copy_dstore(w, "unfinished", skip=("manifest.json",))),
                         r"unfinished has no manifest\.json: the dump did not finish .*; run the dump again"),
    "merged_shard_replaced": (merged_then_replaced,
                              r"shard .*part-b is not the datastore .*merged/manifest\.json was made from \(changed "
                              r"or replaced since\); merge the shards again"),
    "merged_shard_moved": (merged_then_moved, r"datastore directory .*part-d does not exist"),
    # at dump time
    "nan_keys": (lambda w: ("--save-dstore", "--dstore-dir", w.root / "dump-nan", "--path", scaled_checkpoint(w, 1e6)),
                 r"key row 0 is inf/NaN as float16 \(activation magnitude [0-9.e+]+\); dump again with "
                 r"--dstore-key-dtype float32"),
    "full_disk_enospc": (dev_full_keys, r"no space left writing .*dump-dev-full \(No space left on device\); free "
                                        r"disk space and re-run the same command: the dump resumes from its last "
                                        r"commit \(0 rows\)"),
}


def _flags(spec, w):
    flags = spec(w) if callable(spec) else spec
    if "--path" in flags or "--data" in flags:  # these replace the world's own
        flags = list(flags)
        kw = {}
        for opt in ("--path", "--data"):
            if opt in flags:
                i = flags.index(opt)
                kw[opt[2:]] = flags[i + 1]
                del flags[i:i + 2]
        return tuple(flags), kw
    return tuple(flags), {}


@pytest.fixture(scope="module")
def refused(world):
    """Every refused run, two at a time, with sha256s of every file of the world before and after."""
    w = world
    watched = (w.data, w.data_other_dict, w.root / "ckpt", w.dstore, w.other_keys)
    before = tree_sha256(*watched)
    cases = {name: _flags(spec, w) for name, (spec, _) in EVAL_LM.items()}
    calls = [lambda c=c: eval_lm(w, *c[0], **c[1]) for c in cases.values()]
    # the full disk of a real write: keys.npy may not pass FSIZE_KIB; commits after every batch
    full = w.root / "dump-full"
    calls.append(lambda: eval_lm(w, "--save-dstore", "--dstore-dir", full, "--dstore-commit-seconds", 0,
                                 fsize_kib=FSIZE_KIB))
    calls += [  # knnlm-merge-dstore: datastores that do not belong together, and an output that exists
        lambda: run("knnlm-merge-dstore", w.root / "merged-mixed", w.dstore, w.other_keys, check=False),
        lambda: run("knnlm-merge-dstore", w.dstore, w.other_keys, check=False),
    ]
    # outputs a later stage trusts, never replaced without --force: an index (another factory: other bytes), settings
    settings_there = w.root / "settings-there.json"
    settings_there.write_text('{"format": "knnlm-settings/1"}\n')
    calls += [
        lambda: run("knnlm-build-index", w.dstore, "--factory", "IVF4,Flat", "--threads", 1, "--no-progress-bar",
                    check=False),
        lambda: run("knnlm-sweep", w.root / "some-log", "--write-settings", settings_there, check=False),
    ]
    procs = parallel(*calls)
    names = list(cases) + ["full_disk_efbig", "merge_other_key_type", "merge_into_a_datastore",
                           "build_index_over_an_index", "sweep_over_settings"]
    return dict(zip(names, procs)), before, tree_sha256(*watched)


@pytest.mark.parametrize("name", list(EVAL_LM))
def test_eval_lm_refuses(refused, name):
    procs, _, _ = refused
    assert_refused(procs[name], EVAL_LM[name][1])


def test_refused_runs_left_every_file_alone(refused):
    _, before, after = refused
    assert len(before) >= 20 and after == before


def test_refused_flag_combinations_created_nothing(world, refused):
    """Refused before anything ran: neither the named datastore nor the retrieval log exists."""
    assert not os.path.exists(world.root / "never") and not os.path.exists(world.root / "never-log")


def test_dump_with_nan_keys_leaves_no_datastore(world, refused):
    d = world.root / "dump-nan"
    assert not (d / "manifest.json").exists() and not (d / "progress.json").exists()


def test_float32_keys_dump_what_float16_cannot(world, refused):
    """The NaN refusal's advice works: the same checkpoint dumps with --dstore-key-dtype float32."""
    d = world.root / "dump-f32"
    eval_lm(world, "--save-dstore", "--dstore-dir", d, "--dstore-key-dtype", "float32", check=True,
            path=world.root / "scaled.pt")
    keys = np.load(d / "keys.npy")
    assert keys.dtype == np.float32 and np.isfinite(keys).all() and np.abs(keys).max() > np.finfo(np.float16).max


def test_full_disk_is_one_line_and_the_same_command_resumes(world, refused):
    """EFBIG (ulimit -f) is refused like ENOSPC; re-running without the limit resumes from the rows the message
    names and ends byte-identical to the uninterrupted dump."""
    procs, _, _ = refused
    proc = procs["full_disk_efbig"]
    assert_refused(proc, r"no space left writing .*dump-full \(File too large\); free disk space and re-run the same "
                         r"command: the dump resumes from its last commit \(([0-9,]+) rows\)")
    rows = int(re.search(r"last commit \(([0-9,]+) rows\)", proc.stderr).group(1).replace(",", ""))
    full = world.root / "dump-full"
    assert 0 < rows < world.count
    assert json.loads((full / "progress.json").read_text())["rows"] == rows
    assert not (full / "manifest.json").exists()
    assert os.path.getsize(full / "keys.npy") <= FSIZE_KIB * 1024
    eval_lm(world, "--save-dstore", "--dstore-dir", full, "--dstore-commit-seconds", 0, check=True)
    m = json.loads((full / "manifest.json").read_text())
    assert m["resumed_after_rows"] == rows and m["count"] == world.count
    for name in ("keys.npy", "vals.npy"):
        assert (full / name).read_bytes() == (world.dstore / name).read_bytes(), name


def test_build_index_refuses_flipped_bytes(world):
    """One flipped byte in keys.npy: knnlm-build-index re-hashes the arrays and refuses before building."""
    d = world.root / "flipped"
    shutil.copytree(world.dstore, d, ignore=lambda _, names: [n for n in names if n.endswith((".faiss", ".json"))
                                                              and n != "manifest.json"])
    with open(d / "keys.npy", "r+b") as f:
        f.seek(-7, os.SEEK_END)
        byte = f.read(1)
        f.seek(-7, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    proc = run("knnlm-build-index", d, "--factory", "Flat", "--no-progress-bar", check=False)
    assert_refused(proc, r"flipped/keys\.npy does not match its checksum: the file is corrupted, dump it again",
                   prog="knnlm-build-index")
    assert not (d / "index.faiss").exists()
    run("knnlm-build-index", d, "--factory", "Flat", "--no-progress-bar", "--no-verify")  # the opt-out builds it


def test_merge_refuses_datastores_dumped_otherwise(world, refused):
    procs, _, _ = refused
    assert_refused(procs["merge_other_key_type"], r"dstore-block-f32 has key_type='last_block_output' but .*dstore has "
                                                  r"'last_ffn_input'; only datastores dumped alike can be merged",
                   prog="knnlm-merge-dstore")
    assert not os.path.exists(world.root / "merged-mixed")
    assert_refused(procs["merge_into_a_datastore"], r"dstore already holds a datastore; choose another output directory",
                   prog="knnlm-merge-dstore")


def test_build_index_refuses_to_replace_an_index(refused):
    """Without --force the index and its sidecar stay byte for byte (test_refused_runs_left_every_file_alone)."""
    procs, _, _ = refused
    assert_refused(procs["build_index_over_an_index"], r"dstore/index\.faiss already holds an index \(Flat, [0-9,]+ "
                                                       r"keys\): .*pass --force to replace it \(then record and tune "
                                                       r"again\), or --output NEW_NAME", prog="knnlm-build-index")


def test_sweep_refuses_to_replace_settings(world, refused):
    """Refused before any log is read; the file is left as it was."""
    procs, _, _ = refused
    assert_refused(procs["sweep_over_settings"], r"settings-there\.json already exists \(settings fairseq-eval-lm "
                                                 r"--knn-settings reads\); pass --force to replace it, or another "
                                                 r"--write-settings FILE", prog="knnlm-sweep")
    assert (world.root / "settings-there.json").read_text() == '{"format": "knnlm-settings/1"}\n'


def test_enospc_is_the_errno_of_dev_full():
    """The /dev/full case really is a full device (not some other failure that happens to be caught)."""
    with pytest.raises(OSError) as e, open("/dev/full", "wb", buffering=0) as f:
        f.write(b"x")
    assert e.value.errno == errno.ENOSPC


def test_docs_table_names_every_case_run_here():
    """docs/bad-inputs.md names each refusal this file runs, and names none it does not."""
    doc = open(os.path.join(os.path.dirname(USER_DIR), "docs", "bad-inputs.md")).read()
    named = set(re.findall(r"test_refusals_cli::test_eval_lm_refuses\[(\w+)\]", doc))
    assert named == set(EVAL_LM)
    for name in re.findall(r"test_refusals_cli::(test_\w+)", doc):
        assert name in globals(), name
