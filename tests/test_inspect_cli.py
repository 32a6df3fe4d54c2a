"""knnlm-inspect end to end on a tiny model: the probabilities it shows are fairseq-eval-lm --knnlm
--output-word-probs's for the same settings (and, with --knn-settings, for a tuned gated file), each neighbour's
context is the datastore's own text, a page made from a real log works in Chromium, a datastore whose text changed
is refused in one line, and the --top list says what happened (the neighbour that carried each gain, gains and
losses by sign, the ln(1-λ) ties counted, readable small probabilities), checked against our own read of the log."""
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


def test_a_pass_over_the_first_tokens(world):
    tmp, ckpt, data, dstore, output = world
    proc = inspect(tmp, dstore, data, "--path", ckpt, "--first-tokens", 100, "--top", 5)
    page = json.loads((tmp / "page.json").read_text())
    printed = word_probs(output)
    n = len(page["tokens"]["w"])
    assert n == 100  # the first blocks that reach 100 tokens, shown up to 100
    np.testing.assert_allclose(np.log(page["tokens"]["p"]), [lp for _, lp in printed[:n]], atol=2e-5)
    assert "largest gains" in proc.stdout and "largest losses" in proc.stdout


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


# ---- the terminal list (--top) and --knn-settings (issue 20, item 4) -------------------------------------------
ROW = re.compile(r"^\s*(\d+) (\S+)\s+(\S+) -> (\S+)\s+([+-]\d+\.\d+)\s+(.*)$")
HIT = re.compile(r"^#(\d+)/(\d+) w=(\S+)(?: \(not among the \d+ shown\))?\s+(.*)$")


def listed(stdout):
    """The rows under `-- largest gains` and `-- largest losses`: {section: [(index, p_LM, p, gain, rest)]}."""
    out, section = {"gains": [], "losses": []}, None
    for line in stdout.splitlines():
        if line.startswith("-- "):
            section = next((s for s in out if line.startswith(f"-- largest {s}")), None)
        elif section and ROW.match(line):
            i, _, lm, p, gain, rest = ROW.match(line).groups()
            out[section].append((int(i), lm, p, float(gain), rest))
    return out


def log_arrays(log, k=K):
    """Our own read of the log: targets, the k neighbours' values and rows and exact distances, p_LM."""
    a = {name: np.load(log / f"{name}.npy") for name in ("target", "vals", "ids", "dist_exact", "lm_lp")}
    return a["target"], a["vals"][:, :k], a["ids"][:, :k], a["dist_exact"][:, :k].astype(np.float64), a["lm_lp"]


def replay_context(raw, row, left=12, right=4):
    return " ".join(f"[{w}]" if j == row else w for j, w in enumerate(raw) if row - left <= j <= row + right)


@pytest.fixture(scope="module")
def top(world):
    """One `--top 10 --neighbours 3` run over the recorded log: its stdout and page."""
    tmp, _, data, dstore, _ = world
    proc = inspect(tmp, dstore, data, "--log", tmp / "log", "--top", 10, "--neighbours", 3)
    return proc.stdout, json.loads((tmp / "page.json").read_text())


def test_a_gain_names_the_heaviest_neighbour_whose_value_is_the_word(world, top):
    """(a) Each listed gain shows the nearest neighbour whose value IS the target (rank, weight, the datastore's
    text around it), not the nearest neighbour. Oracle: the log's exact distances and values, and train.txt."""
    tmp = world[0]
    target, vals, ids, dist, _ = log_arrays(tmp / "log")
    raw = [w for line in open(tmp / "train.txt") for w in line.split() + ["</s>"]]
    rows = listed(top[0])["gains"]
    assert len(rows) == 10
    nearest_is_other = 0
    for i, _, _, _, rest in rows:
        w = np.exp(-(dist[i] - dist[i].min()) / TEMP)
        w /= w.sum()
        hits = np.flatnonzero(vals[i] == target[i])
        j = hits[np.argmin(dist[i][hits])]  # the heaviest carrier: the nearest among those with the target's value
        m = HIT.match(rest)
        assert m, rest
        assert int(m.group(1)) == 1 + int(np.sum(dist[i] < dist[i][j])) and int(m.group(2)) == K
        assert float(m.group(3)) == pytest.approx(w[j], rel=5e-3)
        assert m.group(4) == replay_context(raw, int(ids[i][j]))
        nearest_is_other += vals[i][np.argmin(dist[i])] != target[i]
    assert nearest_is_other  # the nearest neighbour's text would have been the wrong one for some


def test_short_text_lists_only_gains_as_gains_and_losses_as_losses(world):
    """(b) 14 tokens and --top 20: a token with gain <= 0 is never a 'gain', one with gain >= 0 never a 'loss'."""
    tmp, ckpt, data, dstore, _ = world
    proc = inspect(tmp, dstore, data, "--path", ckpt, "--text", "the w3 v4 w13 of w7 .\n\nthe w3 v4 w13 of w7 .")
    page = json.loads((tmp / "page.json").read_text())
    assert [page["vocab"][w] for w in page["tokens"]["w"]] == "the w3 v4 w13 of w7 . </s>".split() * 2
    rows = listed(proc.stdout)
    gains = page["tokens"]["gain"]
    assert [i for i, *_ in rows["gains"]] == sorted((i for i, g in enumerate(gains) if g > 0), key=lambda i: -gains[i])
    assert all(gains[i] < 0 for i, *_ in rows["losses"]) and all(g > 0 for *_, g, _ in rows["gains"])


def test_losses_say_how_many_tie_at_log_one_minus_lambda_and_list_the_others(world, top):
    """(c) Tokens no retrieved neighbour predicts lose exactly ln(1-λ): counted in one line, not listed; the listed
    losses are the largest of the others. Oracle: our own float64 kNN-LM over the log."""
    tmp = world[0]
    target, vals, _, dist, lm_lp = log_arrays(tmp / "log")
    w = np.exp(-(dist - dist.min(1, keepdims=True)) / TEMP)
    p_knn = (w * (vals == target[:, None])).sum(1) / w.sum(1)
    gain = np.log(LMBDA * p_knn + (1 - LMBDA) * np.exp(lm_lp.astype(np.float64))) - lm_lp
    tie = ~(vals == target[:, None]).any(1)
    tie_lines = [line for line in top[0].splitlines() if "lose exactly" in line]
    assert len(tie_lines) == 1 and tie.sum() > 20, top[0]
    assert re.search(rf"\b{tie.sum()} tokens lose exactly ln\(1-λ\) = {math.log(1 - LMBDA):.3f}", tie_lines[0])
    losses = [i for i, *_ in listed(top[0])["losses"]]
    assert len(losses) == 10 and not tie[losses].any()
    others = np.flatnonzero(~tie & (gain < 0))
    assert gain[losses].max() <= np.sort(gain[others])[9] + 1e-5 and np.all(np.diff(gain[losses]) >= -1e-5)


def test_all_ties_are_said_and_tiny_probabilities_are_readable():
    """(c, d) on a hand-made page: when every loss is a tie none is listed; p_LM 3.2e-7 does not print 0.0000."""
    from knnlm_fairseq.inspect.data import terminal

    lam = 0.25
    tie = math.log(1 - lam)
    page = {"summary": {"tokens": 3, "base_ppl": 9.0, "knnlm_ppl": 8.0}, "vocab": ["a", "b"],
            "meta": {"k": 4, "lmbda": lam, "neighbours_shown": 1},
            "tokens": {"w": [0, 1, 1], "lm": [3.2e-7, 0.5, 0.25], "knn": [0.9, 0.0, 0.0], "lmbda": [lam] * 3,
                       "p": [0.225, 0.375, 0.1875], "gain": [13.46, tie, tie], "nb": [[], [], []],
                       "hit": [[0, 7, 1.0, 0.9, [], 0], None, None]}}
    out = terminal(page, 20)
    assert "3.2e-07 -> 0.225" in out and "0.0000" not in out
    assert re.search(r"\b2 tokens lose exactly ln\(1-λ\) = -0\.288", out) and not listed(out)["losses"], out


def test_printed_probabilities_keep_three_significant_digits(top):
    """(d) p_LM and p as printed are the page's to three significant digits (0.00221 is not printed 0.0022)."""
    stdout, page = top
    rows = [r for rs in listed(stdout).values() for r in rs]
    assert rows and min(page["tokens"]["lm"][i] for i, *_ in rows) < 0.01
    for i, lm, p, _, _ in rows:
        for text, value in ((lm, page["tokens"]["lm"][i]), (p, page["tokens"]["p"][i])):
            assert abs(float(text) - value) <= 0.5 * 10 ** (math.floor(math.log10(value)) - 2), (text, value)


def inspect_tuned(tmp, dstore, data, out, *flags, check=True):
    return run_cli("knnlm-inspect", "--data", data, "--dstore-dir", dstore, "--tokens-per-sample", TPS,
                   "--context-window", CW, "--out", out / "page.html", "--json", out / "page.json", *flags,
                   check=check, env=clis.ONE_THREAD)


@pytest.fixture(scope="module")
def tuned(world):
    """A gated settings file for this world's datastore, checkpoint and index, by hand from the log's meta: k 8 of
    the log's 16, T 1.5, λ by entropy bucket with both edges ON a token's entropy (the bucket rule at an edge) and
    one bucket at λ 0 (no search). Run with it, side by side: eval-lm --output-word-probs, and inspect's own
    recording pass over the first 100 tokens (into tmp/recorded)."""
    tmp, ckpt, data, dstore, _ = world
    meta = json.loads((tmp / "log" / "meta.json").read_text())
    ent = np.sort(np.load(tmp / "log" / "lm_entropy.npy"))
    edges = [float(ent[160]), float(ent[320])]
    settings = {"format": "knnlm-settings/1",
                "tuned_for": {"dstore_fingerprint": meta["dstore"]["fingerprint"], "dstore_path": str(dstore),
                              "checkpoint_sha256": meta["checkpoint"]["sha256"], "checkpoint_path": str(ckpt),
                              "index_id": meta["index"]["id"], "index_factory": "Flat"},
                "knnlm": {"index_file": "index.faiss", "k": 8, "lmbda": 0.6, "knn_temp": 1.5, "knn_dist": "exact",
                          "probe": 32, "knn_gate_signal": "entropy", "knn_gate_edges": ",".join(map(repr, edges)),
                          "knn_gate_lmbdas": "0.6,0.0,0.25"}}
    path = tmp / "tuned.json"
    path.write_text(json.dumps(settings))
    (tmp / "recorded").mkdir()
    evald, _ = clis.parallel(
        lambda: run_cli("fairseq-eval-lm", data, "--path", ckpt, "--user-dir", USER_DIR, "--task", "knn_eval",
                        "--tokens-per-sample", TPS, "--context-window", CW, "--max-tokens", 1024, "--cpu",
                        "--no-progress-bar", "--gen-subset", "valid", "--knnlm", "--dstore-dir", dstore,
                        "--knn-settings", path, "--output-word-probs", env=clis.ONE_THREAD),
        lambda: inspect_tuned(tmp, dstore, data, tmp / "recorded", "--path", ckpt, "--first-tokens", 100,
                              "--knn-settings", path))
    return path, settings, edges, evald.output


def test_knn_settings_show_eval_lms_numbers_with_the_gates_lambda(world, tuned, tmp_path):
    """(e) --knn-settings: each token's p is what fairseq-eval-lm --knn-settings prints (its bucket's λ, k and T from
    the file), from the log and from inspect's own recording pass; a flag that agrees with the file is accepted."""
    tmp, _, data, dstore, _ = world
    path, settings, edges, output = tuned
    printed = np.array([lp for _, lp in word_probs(output)])
    inspect_tuned(tmp, dstore, data, tmp_path, "--log", tmp / "log", "--knn-settings", path, "--k", 8,
                  "--knn-dist", "exact")
    ent = np.load(tmp / "log" / "lm_entropy.npy")
    lam = np.array([0.6, 0.0, 0.25])[(ent[:, None] >= np.array(edges, dtype=np.float32)).sum(1)]
    assert len(set(lam)) == 3 and (ent == np.float32(edges[0])).any()
    for out, n in ((tmp_path, len(printed)), (tmp / "recorded", 100)):
        page = json.loads((out / "page.json").read_text())
        assert page["meta"]["k"] == 8 and page["meta"]["knn_temp"] == 1.5 and len(page["tokens"]["p"]) == n
        np.testing.assert_allclose(page["tokens"]["lmbda"], lam[:n])
        np.testing.assert_allclose(np.log(page["tokens"]["p"]), printed[:n], atol=2e-5)


def test_knn_settings_refuse_a_contradicting_flag_and_another_target(world, tuned, tmp_path):
    """(e) One line each: a flag that contradicts the file (even inspect's own default, --knn-temp 10), settings tuned
    with another checkpoint or on another index, and a log that searched another index than the settings'."""
    tmp, _, data, dstore, _ = world
    path, settings, _, _ = tuned
    other_ckpt = json.loads(json.dumps(settings))
    other_ckpt["tuned_for"]["checkpoint_sha256"] = "0" * 64
    other_index = json.loads(json.dumps(settings))
    other_index["tuned_for"]["index_id"] = "sha256:" + "0" * 64
    for name, s in (("ckpt.json", other_ckpt), ("index.json", other_index)):
        (tmp_path / name).write_text(json.dumps(s))
    shutil.copytree(tmp / "log", tmp_path / "log")
    meta = json.loads((tmp_path / "log" / "meta.json").read_text())
    meta["index"]["id"] = "sha256:" + "1" * 64
    (tmp_path / "log" / "meta.json").write_text(json.dumps(meta))
    log = tmp / "log"
    cases = [((log, path, "--knn-temp", 10), r"--knn-temp 10.0 contradicts 1.5 in --knn-settings"),
             ((log, tmp_path / "ckpt.json"), r"tuned with another checkpoint"),
             ((log, tmp_path / "index.json"), r"tuned on another index"),
             ((tmp_path / "log", path), r"searched another index than .* tuned on")]
    procs = clis.parallel(*[lambda f=f: inspect_tuned(tmp, dstore, data, tmp_path, "--log", f[0], "--knn-settings",
                                                      *f[1:], check=False) for f, _ in cases])
    for proc, (_, message) in zip(procs, cases):
        assert proc.returncode == 2 and not (tmp_path / "page.html").exists(), proc.output[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(rf"knnlm-inspect: error: .*{message}", lines[0]), proc.stderr
