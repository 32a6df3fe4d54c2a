"""knnlm-inspect end to end on a tiny model: the probabilities it shows are fairseq-eval-lm --knnlm
--output-word-probs's for the same settings, each neighbour's context is the datastore's own text, a page made from
a real log works in Chromium, and a datastore whose text changed is refused in one line."""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest

import clis
from clis import USER_DIR, run_cli
from test_inspect_html import browser, load, span  # noqa: F401  (the viewer's own browser fixture and helpers)

pytestmark = pytest.mark.slow

TPS, CW, K, LMBDA, TEMP = 64, 16, 16, 0.4, 2.0


def corpus(path, seed, n):
    """Templated lines: the next word depends on the previous two, so neighbours carry information."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.integers(30), rng.integers(20)
            f.write(f"the w{a} v{b} w{(a * 3 + b) % 30} of w{(a + b) % 30} .\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    corpus(tmp / "train.txt", 0, 400)
    corpus(tmp / "valid.txt", 1, 60)
    clis.tiny_lm(str(tmp), str(tmp / "valid.txt"), max_update=60)
    ckpt, data, dstore = tmp / "ckpt" / "checkpoint_last.pt", tmp / "bin", tmp / "dstore"
    common = [data, "--path", ckpt, "--user-dir", USER_DIR, "--task", "knn_eval", "--tokens-per-sample", TPS,
              "--context-window", CW, "--max-tokens", 1024, "--cpu", "--no-progress-bar"]
    run_cli("fairseq-eval-lm", *common, "--gen-subset", "train", "--save-dstore", "--dstore-dir", dstore,
            env=clis.ONE_THREAD)
    run_cli("knnlm-build-index", dstore, "--factory", "Flat", "--no-progress-bar", "--threads", "1")
    knn = ["--knnlm", "--dstore-dir", dstore, "--k", K, "--lmbda", LMBDA, "--knn-temp", TEMP]
    evald = run_cli("fairseq-eval-lm", *common, "--gen-subset", "valid", *knn, "--save-retrieval", tmp / "log",
                    "--output-word-probs", env=clis.ONE_THREAD)
    return tmp, ckpt, data, dstore, evald.output


def word_probs(output):
    """eval-lm's --output-word-probs lines in sample order: [(word, natural-log probability)]."""
    samples = {}
    for line in output.splitlines():
        m = re.search(r"fairseq_cli\.eval_lm\D*?(\d+) (\S+ \[.*)$", line)
        if m:
            samples[int(m.group(1))] = re.findall(r"(\S+) \[(-?[0-9.]+|-?inf)\]", m.group(2))
    return [(w, float(lp)) for i in sorted(samples) for w, lp in samples[i]]


def inspect(tmp, dstore, data, *flags, check=True):
    return run_cli("knnlm-inspect", "--data", data, "--dstore-dir", dstore, "--k", K, "--lmbda", LMBDA,
                   "--knn-temp", TEMP, "--knn-dist", "exact", "--tokens-per-sample", TPS, "--context-window", CW,
                   "--out", tmp / "page.html", "--json", tmp / "page.json", *flags, check=check, env=clis.ONE_THREAD)


def test_shown_probabilities_are_eval_lms(world):
    tmp, _, data, dstore, output = world
    inspect(tmp, dstore, data, "--log", tmp / "log")
    page = json.loads((tmp / "page.json").read_text())
    printed = word_probs(output)
    assert [page["vocab"][w] for w in page["tokens"]["w"]] == [w for w, _ in printed]
    shown = np.log(np.array(page["tokens"]["p"]))
    np.testing.assert_allclose(shown, [lp for _, lp in printed], atol=2e-5)  # printed to 6 decimals
    assert page["summary"]["knnlm_ppl"] == pytest.approx(math.exp(-np.mean([lp for _, lp in printed])), rel=1e-5)


def test_every_neighbour_context_is_the_datastores_text(world):
    tmp, _, data, dstore, _ = world
    inspect(tmp, dstore, data, "--log", tmp / "log", "--neighbours", "5")
    page = json.loads((tmp / "page.json").read_text())
    raw = [w for line in open(tmp / "train.txt") for w in line.split() + ["</s>"]]  # our own replay of train
    vocab = page["vocab"]
    checked = 0
    for nbs in page["tokens"]["nb"]:
        for row, _, weight, value, ctx, at in nbs:
            assert vocab[ctx[at]] == vocab[value] == raw[row]  # the entry's value, at the stated place
            assert [vocab[c] for c in ctx] == raw[row - at : row - at + len(ctx)]  # and the text around it
            checked += 1
    assert checked > 1000 and all(len(nbs) == 5 for nbs in page["tokens"]["nb"])
    # the nearest by the distances p_kNN uses (exact here), not faiss's order: heaviest first
    assert all(np.all(np.diff([nb[1] for nb in nbs]) >= 0) for nbs in page["tokens"]["nb"])


def test_a_pass_over_the_first_tokens_and_over_raw_text(world):
    tmp, ckpt, data, dstore, output = world
    proc = inspect(tmp, dstore, data, "--path", ckpt, "--first-tokens", 100, "--top", 5)
    page = json.loads((tmp / "page.json").read_text())
    printed = word_probs(output)
    n = len(page["tokens"]["w"])
    assert n == 100  # the first blocks that reach 100 tokens, shown up to 100
    np.testing.assert_allclose(np.log(page["tokens"]["p"]), [lp for _, lp in printed[:n]], atol=2e-5)
    assert "largest gains" in proc.stdout and "largest losses" in proc.stdout
    inspect(tmp, dstore, data, "--path", ckpt, "--text", "the w3 v4 w13 of w7 .\n\nthe w3 v4 w13 of w7 .")
    page = json.loads((tmp / "page.json").read_text())
    assert [page["vocab"][w] for w in page["tokens"]["w"]] == "the w3 v4 w13 of w7 . </s>".split() * 2


def test_the_page_shows_a_tokens_neighbours_in_chromium(world, browser, tmp_path):  # noqa: F811
    tmp, _, data, dstore, _ = world
    inspect(tmp, dstore, data, "--log", tmp / "log", "--neighbours", "4")
    page = json.loads((tmp / "page.json").read_text())
    load(browser, tmp / "page.html")
    span(browser, 7).click()
    rows = browser.find_elements("css selector", "#panel tr.nb")
    assert len(rows) == len(page["tokens"]["nb"][7]) == 4
    want = [page["vocab"][nb[3]] for nb in page["tokens"]["nb"][7]]
    assert [r.find_element("css selector", "td.val").text for r in rows] == want
    browser.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("KNNLM_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "page.png", os.path.join(os.environ["KNNLM_SCREENSHOT_DIR"], "inspect-cli.png"))


def test_changed_text_is_refused_in_one_line(world, tmp_path):
    tmp, _, data, dstore, _ = world
    shutil.copytree(data, tmp_path / "bin")
    shutil.copytree(dstore, tmp_path / "dstore")
    manifest = json.loads((tmp_path / "dstore" / "manifest.json").read_text())
    manifest["data"] = str(tmp_path / "bin")  # the datastore now reads its text from the copy, which we change
    (tmp_path / "dstore" / "manifest.json").write_text(json.dumps(manifest))
    raw = bytearray((tmp_path / "bin" / "train.bin").read_bytes())
    raw[8:12], raw[12:16] = raw[12:16], raw[8:12]
    (tmp_path / "bin" / "train.bin").write_bytes(bytes(raw))
    proc = inspect(tmp_path, tmp_path / "dstore", data, "--log", tmp / "log", check=False)
    assert proc.returncode == 2 and not (tmp_path / "page.html").exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"knnlm-inspect: error: .*train.bin changed since datastore .* was dumped", last), last
    assert math.isfinite(manifest["count"])
