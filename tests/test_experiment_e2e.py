"""A report driver end to end on a tiny corpus and knnlm_tiny (scripts/demo.py, as make demo runs it): every stage
runs and is recorded, a second run reuses every stage, a changed index setting makes again exactly the index and
the stage that reads it, and report.md is the rendering of metrics.json. (scripts/reproduce.py runs end to end in
tests/test_wikitext103_standin.py.)"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clis import ONE_THREAD, ROOT, random_lines, tiny_lm

pytestmark = pytest.mark.slow  # starts fairseq CLIs: about 30 s on 2 idle cores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiment")
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("valid", 12)):
        random_lines(tmp / f"{split}.txt", rng, n, vocab=40)
    tiny_lm(str(tmp), str(tmp / "valid.txt"), max_update=5)
    return tmp


def demo(tmp, *flags):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--data-bin", tmp / "bin", "--checkpoint",
           tmp / "ckpt" / "checkpoint_last.pt", "--out", tmp / "out", "--dstore-dir", tmp / "dstore", "--factory",
           "IVF2,Flat", "--probe", 2, "--k", 8, "--tokens-per-sample", 64, "--context-window", 16, "--max-tokens", 1024,
           *flags]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / "out" / "metrics.json").read_text()), proc.stdout


def reused(m):
    return {name for name, s in m["stages"].items() if s["reused"]}


def test_stages_run_are_reused_and_made_again_after_a_change(tiny):
    first, _ = demo(tiny, "--train-size", 500)
    assert set(first["stages"]) == {"dump", "index", "eval_base", "eval_knnlm"} and not reused(first)
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 0 for s in first["stages"].values())
    assert first["n_tokens"] > 100 and first["base_ppl"] > 1 and first["knnlm_ppl"] > 1
    assert first["dstore_n"] > 1000 and first["index_factory"] == "IVF2,Flat"
    manifest = json.loads((tiny / "dstore" / "manifest.json").read_text())
    assert manifest["decoder_layers"] == 2  # knnlm_tiny's: the datastore names the model's depth for reports
    spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "scripts", "demo.py"))
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    assert (tiny / "out" / "report.md").read_text() == driver.render(first)

    again, said = demo(tiny, "--train-size", 500)
    assert reused(again) == set(again["stages"]) and "$ " not in said  # nothing ran
    assert (again["base_ppl"], again["knnlm_ppl"]) == (first["base_ppl"], first["knnlm_ppl"])
    assert again["stages"]["dump"]["seconds"] == first["stages"]["dump"]["seconds"]  # the run that made it
    assert "(reused) `fairseq-eval-lm" in (tiny / "out" / "report.md").read_text()

    # another index command: the index is made again, and so the kNN evaluation whose input it is (same command)
    changed, said = demo(tiny, "--train-size", 400)
    assert reused(changed) == {"dump", "eval_base"}
    assert "eval_knnlm: " in said and "made with other inputs" in said
    assert changed["base_ppl"] == first["base_ppl"]
