"""Evaluation flags that could parse and never reach the code, each proven through the real CLIs by an effect a
numpy oracle predicts: --knn-dist, --probe, --knn-temp, --knn-keytype, --dstore-key-dtype and --knn-sim.

One tiny model and one train-split datastore (plus one float32 dump of another key type) serve every test;
valid is scored against them. The oracle replays the checkpoint in-process (test_alignment_cli.replay) and, for
IVF-PQ indexes, asks faiss itself for the neighbour rows and approximate distances.

Plumbing broken once by hand in this branch (each alone, then reverted), and the tests that failed:
  --knn-dist          tasks/knn_eval.py:172 exact=True and :230 KnnMixer(..., "exact", ...) whatever the flag ->
                      test_knn_dist_exact_and_approx_on_ivfpq[approx], test_probe_sets_nprobe[1, 8] (approx runs)
  --probe             tasks/knn_eval.py:172 open_retriever(..., a.k, 32, ...) whatever the flag ->
                      test_probe_sets_nprobe[1]
  --knn-temp          tasks/knn_eval.py:230 KnnMixer(a.lmbda, 1.0, ...) -> every oracle comparison, among them
                      test_knn_temp_moves_perplexity_as_predicted
  --knn-keytype       tasks/knn_eval.py:227 KnnSearch(self.retriever, "last_ffn_input", ...) at evaluation ->
                      test_knn_keytype_at_evaluation (the refusal alone still passed: it reads the flag elsewhere)
  --dstore-key-dtype  tasks/knn_eval.py:263 DatastoreWriter(..., key_dtype="float16") -> test_dstore_key_dtype_float32
                      (and the keytype test's float32 comparison)
  --knn-sim           tasks/knn_eval.py:173 metric=None whatever the flag -> test_inner_product_end_to_end (the
                      l2-on-an-ip-index run was not refused)
"""
import json
import math
import os
import re
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

import clis
from clis import USER_DIR, assert_refused, evaluated_tokens, loss_and_ppl, parallel, word_probs
from test_alignment_cli import distances, knnlm_oracle, load_model, mix, replay, split_stream, templated_lm

TPS, CW, BSZ = 32, 16, 4
K, LMBDA = 8, 0.5
TEMPS = (0.5, 5.0)  # two temperatures far enough apart to move perplexity well beyond the printed precision
IP_TEMP = 20.0  # dot products of layer-normed 32-dim states span tens
NLIST = 8  # IVF8,PQ4x4: 4-bit codes train in a blink; probing 1 of 8 lists misses neighbours


def run_cli(name: str, *args, check: bool = True):
    return clis.run_cli(name, *args, check=check, env=clis.ONE_THREAD)


def build_index(dstore: str, *flags):
    return run_cli("knnlm-build-index", dstore, "--threads", "1", "--no-progress-bar", *flags)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flags")
    data, ckpt = templated_lm(root)
    w = SimpleNamespace(root=root, data=data, ckpt=ckpt, main=str(root / "dstore"), other=str(root / "dstore-other"),
                        half=str(root / "dstore-fp16"), record=str(root / "retrieval-valid"),
                        gated=str(root / "gated.json"), stats=str(root / "stats.json"))
    dump = ("--gen-subset", "train", "--save-dstore", "--dstore-dir")

    def main():
        proc = eval_lm(w, *dump, w.main)
        for flags in (("--factory", "Flat"), ("--factory", f"IVF{NLIST},PQ4x4", "--output", "ivfpq.faiss"),
                      ("--factory", "Flat", "--metric", "ip", "--output", "ip.faiss")):
            build_index(w.main, *flags)
        return proc

    def other():  # the two non-default dump flags in one dump: each has its own test
        proc = eval_lm(w, *dump, w.other, "--knn-keytype", "second_last_block_output", "--dstore-key-dtype", "float32")
        build_index(w.other, "--factory", "Flat")
        return proc

    def half():  # the model in half precision (--fp16 runs on a CPU too): fp16 states through the dump
        return eval_lm(w, *dump, w.half, "--fp16")

    w.dump_main, w.dump_other, w.dump_half = parallel(main, other, half)

    def knn(dstore, *extra, temp=TEMPS[0]):
        return lambda: eval_lm(w, "--knnlm", "--dstore-dir", dstore, "--k", K, "--lmbda", LMBDA, "--knn-temp", temp,
                               "--knn-threads", 1, "--output-word-probs", *extra, check=False)

    ivf = ("--index-file", "ivfpq.faiss")
    calls = {
        "temp0": knn(w.main), "temp1": knn(w.main, temp=TEMPS[1]),
        "ivf_exact": knn(w.main, *ivf, "--probe", NLIST, "--knn-dist", "exact"),
        "ivf_approx": knn(w.main, *ivf, "--probe", NLIST, "--knn-dist", "approx"),
        "ivf_probe1": knn(w.main, *ivf, "--probe", 1, "--knn-dist", "approx"),
        "ip": knn(w.main, "--index-file", "ip.faiss", "--knn-sim", "ip", temp=IP_TEMP),
        "ip_as_l2": knn(w.main, "--index-file", "ip.faiss", "--knn-sim", "l2"),
        "other": knn(w.other, "--knn-keytype", "second_last_block_output"),
        "other_as_default": knn(w.other),
        "record": knn(w.main, *ivf, "--probe", NLIST, "--save-retrieval", w.record),  # for knnlm-sweep
        "eval_tokens": knn(w.main, "--eval-tokens", 20),  # blocks score 16 new tokens each, 4 blocks a batch
        "threads2": knn(w.main, "--knn-threads", 2),  # the last --knn-threads wins (OMP_NUM_THREADS=1 here)
        "fp16": knn(w.main, "--fp16"),  # half-precision queries through search and mix
        "knn_gpu": knn(w.main, "--knn-gpu"),  # faiss-cpu here: refused, never silently searched on the CPU
    }
    w.runs = dict(zip(calls, parallel(*calls.values())))
    # a gated, approximate-distance point written by the sweep from the recorded valid pass, then run live
    w.sweep = run_cli("knnlm-sweep", w.record, "--lmbdas", "0,0.25,0.5,0.75", "--temps", "0.5,5", "--kinds", "approx",
            "--gates", "max_lp", "--buckets", 4, "--write-settings", w.gated, "--max-ppl-increase", 2)
    later = {"gated": lambda: eval_lm(w, "--knnlm", "--dstore-dir", w.main, "--knn-settings", w.gated, "--knn-stats",
                                      w.stats, "--knn-threads", 1, check=False),
             "in_memory": knn(w.main, "--dstore-in-memory")}
    w.runs.update(zip(later, parallel(*later.values())))

    model, task = load_model(w.ckpt)
    w.train = split_stream(data, "train", task.dictionary)
    w.valid = split_stream(data, "valid", task.dictionary)
    w.train_keys, _ = replay(model, w.train, TPS, CW)
    w.valid_keys, w.valid_lm = replay(model, w.valid, TPS, CW)
    w.train_other, _ = replay(model, w.train, TPS, CW, "second_last_block_output")
    w.valid_other, _ = replay(model, w.valid, TPS, CW, "second_last_block_output")
    return w


def eval_lm(w, *flags, check: bool = True):
    split = () if "--gen-subset" in flags else ("--gen-subset", "valid")
    return run_cli("fairseq-eval-lm", w.data, "--path", w.ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
                   *split, "--tokens-per-sample", TPS, "--context-window", CW, "--batch-size", BSZ, "--cpu",
                   "--no-progress-bar", *flags, check=check)


def printed(proc):
    """Word log-probs and base-2 loss of a run that must have succeeded."""
    assert proc.returncode == 0, proc.output[-3000:]
    _, lp, _ = word_probs(proc.output)
    return lp, loss_and_ppl(proc.output)[0]


def assert_matches(proc, expected, tol: float = 1e-4):
    """Every printed word log-prob (6 decimals) and the loss (4 decimals) as the oracle's."""
    lp, loss = printed(proc)
    assert len(lp) == len(expected) == evaluated_tokens(proc.output)
    err = np.abs(lp - expected)
    assert err.max() < tol, (err.max(), int(np.argmax(err)))
    assert abs(loss + expected.mean() / np.log(2)) < 2e-4, (loss, -expected.mean() / np.log(2))


def ivf_search(w, nprobe: int):
    """The IVF-PQ index's own neighbours of the replayed valid queries: rows (n, K) and approximate distances."""
    faiss.omp_set_num_threads(1)
    index = faiss.read_index(os.path.join(w.main, "ivfpq.faiss"))
    faiss.extract_index_ivf(index).nprobe = nprobe
    dists, ids = index.search(np.ascontiguousarray(w.valid_keys, dtype=np.float32), K)
    assert (ids >= 0).all()
    return ids, dists


def stored_keys(w, dstore=None):
    return np.load(os.path.join(dstore or w.main, "keys.npy"))


# ---- --knn-dist and --probe on an IVF-PQ index ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dist", ["exact", "approx"])
def test_knn_dist_exact_and_approx_on_ivfpq(world, dist):
    """Same neighbours (the index's), p_kNN from recomputed or from the index's quantized distances."""
    meta = json.load(open(os.path.join(world.main, "ivfpq.faiss.json")))
    assert meta["factory_used"] == f"IVF{NLIST},PQ4x4"
    ids, approx = ivf_search(world, NLIST)
    exact = np.take_along_axis(distances(world.valid_keys, stored_keys(world)), ids, 1)
    oracles = {"exact": mix(exact, world.train[ids], world.valid, world.valid_lm, TEMPS[0], LMBDA),
               "approx": mix(approx, world.train[ids], world.valid, world.valid_lm, TEMPS[0], LMBDA)}
    assert np.abs(oracles["exact"] - oracles["approx"]).max() > 0.1  # PQ's distances are far from exact ones
    proc = world.runs[f"ivf_{dist}"]
    assert f"{dist} distances" in proc.output
    assert_matches(proc, oracles[dist])


@pytest.mark.slow
@pytest.mark.parametrize("nprobe", [1, NLIST])
def test_probe_sets_nprobe(world, nprobe):
    """One list probed finds other neighbours than all lists, and the run says which nprobe it used."""
    run = world.runs["ivf_probe1" if nprobe == 1 else "ivf_approx"]
    assert f"nprobe={nprobe}," in run.output
    expected = {n: mix(d, world.train[ids], world.valid, world.valid_lm, TEMPS[0], LMBDA)
                for n, (ids, d) in ((n, ivf_search(world, n)) for n in (1, NLIST))}
    assert np.abs(expected[1] - expected[NLIST]).max() > 0.1  # recall differs: one list misses neighbours
    assert_matches(run, expected[nprobe])


# ---- --knn-temp on a Flat index with exact distances -------------------------------------------------
@pytest.mark.slow
def test_knn_temp_moves_perplexity_as_predicted(world):
    keys = stored_keys(world)
    expected = [knnlm_oracle(world.valid_keys, keys, world.train, world.valid, world.valid_lm, K, t, LMBDA)
                for t in TEMPS]
    assert abs(expected[0].mean() - expected[1].mean()) / np.log(2) > 0.01  # the loss moves 50x its precision
    for t, name, exp in zip(TEMPS, ("temp0", "temp1"), expected):
        assert f"T={t}," in world.runs[name].output
        assert_matches(world.runs[name], exp)
    assert printed(world.runs["temp0"])[1] != printed(world.runs["temp1"])[1]


# ---- --knn-keytype at evaluation ---------------------------------------------------------------------
@pytest.mark.slow
def test_knn_keytype_at_evaluation(world):
    """A datastore of another key type: its keys are that state, the matching flag scores as the oracle over
    those states, and the default key type is refused."""
    m = json.load(open(os.path.join(world.other, "manifest.json")))
    assert m["key_type"] == "second_last_block_output" and m["count"] == len(world.train)
    keys = stored_keys(world, world.other)
    np.testing.assert_allclose(keys, world.train_other, rtol=1e-4, atol=1e-4)
    assert not np.allclose(keys, stored_keys(world), atol=1e-1)  # another point of the network
    expected = knnlm_oracle(world.valid_other, keys, world.train, world.valid, world.valid_lm, K, TEMPS[0], LMBDA)
    assert_matches(world.runs["other"], expected, tol=5e-4)  # unnormalized states: larger float32 distance error
    assert_refused(world.runs["other_as_default"],
                   r"holds 'second_last_block_output' keys but 'last_ffn_input' was asked; "
                   r"pass --knn-keytype second_last_block_output")


# ---- --dstore-key-dtype ------------------------------------------------------------------------------
@pytest.mark.slow
def test_dstore_key_dtype_float32(world):
    keys = stored_keys(world, world.other)
    m = json.load(open(os.path.join(world.other, "manifest.json")))
    assert keys.dtype == np.float32 and m["key_dtype"] == "float32" and m["count"] == len(world.train)
    assert stored_keys(world).dtype == np.float16  # the default
    # batched vs one-block forwards: float32 rounding only; fp16 storage would be off 10x more
    err = np.abs(keys - world.train_other).max()
    assert err < np.abs(world.train_other.astype(np.float16) - world.train_other).max() / 10, err
    np.testing.assert_array_equal(np.load(os.path.join(world.other, "vals.npy")), world.train)


# ---- inner product -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_inner_product_end_to_end(world):
    """An index built with --metric ip, evaluated with --knn-sim ip: p_kNN ∝ exp(q·k / T) over the k largest
    dot products; asking for L2 on it is refused."""
    meta = json.load(open(os.path.join(world.main, "ip.faiss.json")))
    assert meta["metric"] == "ip" and meta["factory_used"] == "Flat"
    keys = stored_keys(world)
    expected = knnlm_oracle(world.valid_keys, keys, world.train, world.valid, world.valid_lm, K, IP_TEMP, LMBDA,
                            sim="ip")
    l2 = knnlm_oracle(world.valid_keys, keys, world.train, world.valid, world.valid_lm, K, IP_TEMP, LMBDA)
    assert np.abs(expected - l2).max() > 0.1  # the two similarities disagree on this data
    assert ", ip, exact distances" in world.runs["ip"].output
    assert_matches(world.runs["ip"], expected)
    assert_refused(world.runs["ip_as_l2"], r"was built for 'ip' similarity, not 'l2'; pass --knn-sim ip")


# ---- --fp16 and the GPU flags, on a CPU ---------------------------------------------------------------
@pytest.mark.slow
def test_fp16_through_dump_search_and_mix(world):
    """A half-precision model's states are dumped, searched and mixed: the keys are the fp32 run's to fp16 rounding
    (and not identical: the model really ran in half), the word probabilities the fp32 run's to 2e-2."""
    half, full = stored_keys(world, world.half).astype(np.float32), stored_keys(world).astype(np.float32)
    assert half.shape == full.shape and half.dtype == np.float32
    np.testing.assert_array_equal(np.load(os.path.join(world.half, "vals.npy")), np.load(os.path.join(world.main, "vals.npy")))
    assert 0 < np.abs(half - full).max() < 2e-2
    lp16, loss16 = printed(world.runs["fp16"])
    lp32, loss32 = printed(world.runs["temp0"])
    assert len(lp16) == len(lp32) and np.abs(lp16 - lp32).max() < 2e-2
    assert abs(loss16 - loss32) < 1e-2


@pytest.mark.slow
def test_knn_gpu_without_faiss_gpu_is_refused(world):
    assert_refused(world.runs["knn_gpu"], r"--knn-gpu needs faiss-gpu and a visible GPU")


# ---- --knn-settings with a gate, --knn-stats, --dstore-in-memory -----------------------------------------
@pytest.mark.slow
def test_gated_settings_search_the_fraction_and_score_what_the_sweep_predicted(world):
    """knnlm-sweep --write-settings picked a gated point with faiss's distances on the recorded valid pass; eval-lm
    with that file searches exactly that fraction of tokens (--knn-stats) and prints the sweep's perplexity. Fails
    if the gate is not built (every token searched), or the file's knn_dist is ignored (exact distances score
    another number), or --knn-stats is not written."""
    tuned = json.load(open(world.gated))
    assert tuned["knnlm"]["knn_gate_signal"] == "max_lp" and tuned["knnlm"]["knn_dist"] == "approx"
    assert 0 < tuned["searched"] < 1  # a point that skips some searches, not all
    stats = json.load(open(world.stats))["components"]
    search = stats["KnnSearch"]
    assert search["rows"] == evaluated_tokens(world.runs["gated"].output)
    assert search["searched"] / search["rows"] == pytest.approx(tuned["searched"], abs=0.5 / search["rows"])
    assert stats["SignalGate"]["skipped"] == search["rows"] - search["searched"]
    loss = loss_and_ppl(world.runs["gated"].output)[0]
    assert abs(loss - math.log2(tuned["tuned_ppl"])) < 2e-4, (loss, math.log2(tuned["tuned_ppl"]))


@pytest.mark.slow
def test_dstore_in_memory_reads_the_keys_into_ram(world):
    """The same numbers as memory-mapped keys, and the run says the keys were read into RAM (the datastore reports
    what it holds, not what was asked)."""
    assert "keys in RAM" in world.runs["in_memory"].output
    assert "keys memory-mapped" in world.runs["temp0"].output
    assert printed(world.runs["in_memory"])[1] == printed(world.runs["temp0"])[1]
    np.testing.assert_array_equal(printed(world.runs["in_memory"])[0], printed(world.runs["temp0"])[0])


@pytest.mark.slow
def test_eval_tokens_cuts_at_the_block_that_reaches_it(world):
    """--eval-tokens 20 with blocks of 16 scored tokens, 4 blocks a batch: 2 blocks (32 tokens), not the whole first
    batch (64), and their word probabilities are the full run's first 32."""
    lp, _ = printed(world.runs["eval_tokens"])
    assert evaluated_tokens(world.runs["eval_tokens"].output) == len(lp) == 2 * (TPS - CW)
    np.testing.assert_array_equal(lp, printed(world.runs["temp0"])[0][: len(lp)])


@pytest.mark.slow
def test_the_plugin_quiets_what_drowns_its_lines(world):
    """No faiss loader chatter (its 'ModuleNotFoundError ... avx512' reads like an error), no Hydra deprecation
    warnings or DEBUG lines, none of the two torch UserWarnings fairseq triggers on a CPU: the run's own lines stay."""
    out = world.runs["temp0"].output
    for noise in ("faiss.loader", "swigfaiss", "hydra", "version_base", "UserWarning", "pin_memory"):
        assert noise not in out, noise
    assert "kNN-LM: " in out and "Loss (base 2)" in out


@pytest.mark.slow
def test_knn_threads_sets_faiss_threads(world):
    """faiss's default here is 1 (OMP_NUM_THREADS=1): --knn-threads 2 reaches faiss, and changes no number."""
    assert "1 search threads" in world.runs["temp0"].output and "2 search threads" in world.runs["threads2"].output
    np.testing.assert_array_equal(printed(world.runs["threads2"])[0], printed(world.runs["temp0"])[0])


@pytest.mark.slow
def test_the_recording_pass_says_it_is_untuned_and_gives_the_base(world):
    """The first kNN number a user sees is an untuned one: the run says so, with the base LM's perplexity on the same
    tokens (the oracle's), and the sweep says why it wrote the point it wrote."""
    out = world.runs["record"].output
    base = float(re.search(r"UNTUNED settings .*base LM perplexity on these tokens ([0-9.]+)", out).group(1))
    assert base == pytest.approx(math.exp(-world.valid_lm.mean()), abs=0.006)
    assert "why this point: the fewest searches" in world.sweep.output
    assert "--max-ppl-increase 2% (default 0.5%)" in world.sweep.output
