"""--knn-keytype through the real CLIs on a generated corpus: every key type dumps its own, self-describing
keys; evaluation refuses a datastore of another key type; and one key type is checked against the model
itself (the second-to-last block's output is what the last block receives), read by a forward hook here."""
import json
import os
import re
from itertools import combinations
from types import SimpleNamespace

import numpy as np
import pytest

import clis
from clis import USER_DIR, evaluated_tokens, parallel

from knnlm_fairseq.core.keys import KEY_TYPES

pytestmark = pytest.mark.slow  # starts fairseq CLIs

TPS = 128  # with --context-window 0 the whole valid split (< 128 tokens) is one block: easy to replay in-process
DIM = 32  # knnlm_tiny's width: every key type lies in the residual width


def run_cli(name: str, *args, check: bool = True):
    return clis.run_cli(name, *args, check=check, env=clis.ONE_THREAD)  # two runs at a time on 2 cores


def corpus(seed: int, n_lines: int):
    """Templated sentences over ~100 words, so the tiny model has something to learn in one epoch."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"the n{n} v{v} n{(3 * n + v) % 60} ." for n, v in rng.integers((60, 30), size=(3, 2)))
            for _ in range(n_lines)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("keytypes")
    for split, seed, n in (("train", 0, 300), ("valid", 1, 6)):
        (root / f"{split}.txt").write_text("\n".join(corpus(seed, n)) + "\n")
    data = root / "bin"
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt", "--validpref",
            root / "valid.txt", "--destdir", data, "--workers", "1")
    run_cli("fairseq-train", data, "--user-dir", USER_DIR, "--task", "language_modeling", "--arch", "knnlm_tiny",
            "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "2048", "--tokens-per-sample", TPS,
            "--max-epoch", "1", "--save-dir", root / "ckpt", "--no-epoch-checkpoints", "--disable-validation",
            "--num-workers", "0", "--seed", "1", "--cpu", "--no-progress-bar")
    w = SimpleNamespace(root=root, data=data, ckpt=str(root / "ckpt" / "checkpoint_last.pt"),
                        dstore={kt: str(root / f"dstore-{kt}") for kt in KEY_TYPES})
    w.dumps = dict(zip(KEY_TYPES, parallel(*[
        lambda kt=kt: eval_lm(w, "--knn-keytype", kt, "--save-dstore", "--dstore-dir", w.dstore[kt])
        for kt in KEY_TYPES])))
    run_cli("knnlm-build-index", w.dstore["last_ffn_input"], "--factory", "Flat", "--threads", "1",
            "--no-progress-bar")
    knn = ("--knnlm", "--dstore-dir", w.dstore["last_ffn_input"], "--k", "8")
    w.matching, w.mismatched = parallel(
        lambda: eval_lm(w, *knn, "--knn-keytype", "last_ffn_input"),
        lambda: eval_lm(w, *knn, "--knn-keytype", "second_last_block_output", check=False))
    return w


def eval_lm(w, *flags, check: bool = True):
    return run_cli("fairseq-eval-lm", w.data, "--path", w.ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
                   "--gen-subset", "valid", "--tokens-per-sample", TPS, "--context-window", 0, "--max-tokens", 4096,
                   "--cpu", "--no-progress-bar", *flags, check=check)


def manifest(w, kt):
    return json.load(open(os.path.join(w.dstore[kt], "manifest.json")))


def keys(w, kt):
    return np.load(os.path.join(w.dstore[kt], "keys.npy")).astype(np.float32)  # (n, DIM)


@pytest.mark.parametrize("kt", list(KEY_TYPES))
def test_manifest_records_key_type_and_dim(world, kt):
    m = manifest(world, kt)
    n = evaluated_tokens(world.dumps[kt].output)
    assert (m["key_type"], m["dim"], m["count"]) == (kt, DIM, n)
    k = keys(world, kt)
    assert k.shape == (n, DIM) and np.isfinite(k).all() and np.abs(k).max() > 0


def test_every_key_type_gives_other_keys_for_the_same_targets(world):
    vals = {kt: np.load(os.path.join(world.dstore[kt], "vals.npy")) for kt in KEY_TYPES}
    for kt in KEY_TYPES:
        np.testing.assert_array_equal(vals[kt], vals["last_ffn_input"])
    for a, b in combinations(KEY_TYPES, 2):
        assert not np.allclose(keys(world, a), keys(world, b), atol=1e-2), (a, b)


def test_evaluation_with_another_key_type_is_refused(world):
    assert "Perplexity" in world.matching.output  # the same datastore and index serve the key type they hold
    proc = world.mismatched
    assert proc.returncode != 0 and "Perplexity" not in proc.output and "Traceback" not in proc.output
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert re.match(r"knnlm_fairseq: error: .*holds 'last_ffn_input' keys but 'second_last_block_output' was "
                    r"asked; pass --knn-keytype last_ffn_input", last), last


def test_second_last_block_output_is_the_last_blocks_input(world):
    """Replay the one block eval-lm scored through the checkpoint, hooking the last block's input."""
    import torch
    from fairseq import checkpoint_utils, utils

    utils.import_user_module(SimpleNamespace(user_dir=USER_DIR))  # registers the archs; safe-loads the checkpoint
    import knnlm_fairseq.models  # noqa: F401  (fairseq skips it when the package was imported plainly first)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task([world.ckpt])
    model = models[0].eval()
    targets = torch.from_numpy(np.load(os.path.join(world.dstore["last_ffn_input"], "vals.npy")).astype(np.int64))
    assert len(targets) < TPS  # one block: its source is </s> followed by the targets shifted right
    source = torch.cat([torch.tensor([2]), targets[:-1]])[None]  # (1, n)
    seen = []
    handle = model.decoder.layers[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(source)
    finally:
        handle.remove()
    received = seen[0][:, 0].numpy()  # (n, 1, C) time-first -> (n, C)
    dumped = keys(world, "second_last_block_output")
    np.testing.assert_allclose(dumped, received, rtol=2e-3, atol=2e-3)  # stored as float16
    # and it is not what any other point of the network gives
    assert not np.allclose(keys(world, "last_block_output"), received, atol=2e-2)
