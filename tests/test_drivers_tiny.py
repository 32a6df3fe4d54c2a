"""Every report driver on a tiny WikiText-shaped slice and knnlm_tiny: make wikitext2's reproduce.py, then the
reports that stand on its work directory (cache, scaling, domain) and keytypes, each with its real flags, each
rendering its report.md from its metrics.json. Tiny sizes, real stages: minutes on 2 cores."""
import json
import os
import subprocess
import sys

import pytest

from clis import ONE_THREAD, ROOT, SHARED, WT2_RAW, run_cli, tiny_lm, wt2_head

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(WT2_RAW), reason="needs ../shared/data/wikitext-2")]
WINDOW = ["--dump-tokens-per-sample", 64, "--dump-context-window", 16, "--eval-tokens-per-sample", 64,
          "--eval-context-window", 32, "--max-tokens", 1024]
RETRIEVAL = ["--train-size", 500, "--probe", 2, "--k", 8, "--lmbda", 0.25, "--knn-temp", 1, "--temps", 1,
             "--lmbdas", "0,0.25,0.5"]


def driver(script, *flags):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *map(str, flags)],
                          capture_output=True, text=True, env=dict(os.environ, **ONE_THREAD))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def wt2(tmp_path_factory):
    """WikiText-2's first lines, knnlm_tiny trained on them, and make wikitext2's work directory over them."""
    tmp = tmp_path_factory.mktemp("drivers")
    raw = tmp / "raw"
    wt2_head(raw, train=400, valid=80, test=80)
    (tmp / "train.txt").write_text((raw / "wiki.train.tokens").read_text())
    tiny_lm(str(tmp), str(raw / "wiki.valid.tokens"), max_update=5)
    run_cli("fairseq-preprocess", "--only-source", "--srcdict", tmp / "bin" / "dict.txt", "--trainpref",
            raw / "wiki.train.tokens", "--validpref", raw / "wiki.valid.tokens", "--testpref", raw / "wiki.test.tokens",
            "--destdir", tmp / "data", "--workers", "1")
    ckpt, work = tmp / "ckpt" / "checkpoint_last.pt", tmp / "wikitext2"
    driver("reproduce.py", "--data-bin", tmp / "data", "--checkpoint", ckpt, "--out", tmp / "out" / "wikitext2",
           "--work", work, "--factory", "IVF2,Flat", *RETRIEVAL, *WINDOW)
    return tmp, raw, ckpt, work


def metrics(tmp, name):
    m = json.loads((tmp / "out" / name / "metrics.json").read_text())
    assert (tmp / "out" / name / "report.md").read_text().startswith("# ")
    return m


def test_cache_report_on_make_wikitext2s_logs(wt2):
    tmp, _, ckpt, work = wt2
    driver("cache_report.py", "--data-bin", tmp / "data", "--checkpoint", ckpt, "--knn-work", work, "--out",
           tmp / "out" / "cache", "--work", tmp / "cache", "--cache-size", 32, "--thetas", "0.1,1", "--mus", "0,0.2",
           "--lmbdas", "0,0.25", "--eval-tokens-per-sample", 64, "--eval-context-window", 32, "--max-tokens", 1024)
    m = metrics(tmp, "cache")
    assert m["valid"]["base_ppl"] == pytest.approx(metrics(tmp, "wikitext2")["valid"]["base_ppl"], abs=0.01)


def test_scaling_slices_and_truncates_make_wikitext2s_datastore_and_logs(wt2):
    tmp, raw, ckpt, work = wt2
    driver("scaling.py", "--raw", raw, "--data-bin", tmp / "data", "--checkpoint", ckpt, "--dict", tmp / "bin" / "dict.txt",
           "--full-dstore", work / "dstore", "--full-logs", work, "--out", tmp / "out" / "scaling", "--work",
           tmp / "scaling", "--fractions", 50, "--eval-fraction", 0.5, "--small-dstores", 100, "--small-checkpoint",
           ckpt, "--figure-splits", "valid", "--factory", "IVF2,Flat", *RETRIEVAL, *WINDOW)
    m = metrics(tmp, "scaling")
    assert m["figure"]["50"]["dstore_tokens"] == m["subsets"]["50"]["tokens"]  # the slice: the subset's rows
    assert 0 < m["eval_data"]["valid"]["tokens"] < m["eval_data"]["valid"]["tokens_total"]
    assert m["table"]["100"]["dstore_tokens"] == m["figure"]["100"]["dstore_tokens"]


def test_domain_on_two_books(wt2, tmp_path):
    tmp, _, ckpt, work = wt2
    books = tmp_path / "books"
    books.mkdir()
    for name in ("carroll-alice", "chesterton-ball", "chesterton-brown"):
        with open(os.path.join(SHARED, "data", "gutenberg-books", f"{name}.txt")) as f:
            (books / f"{name}.txt").write_text("".join(line for _, line in zip(range(400), f)))
    driver("domain.py", "--books-dir", books, "--checkpoint", ckpt, "--dict", tmp / "bin" / "dict.txt", "--wiki-dstore",
           work / "dstore", "--wiki-data-bin", tmp / "data", "--out", tmp / "out" / "domain", "--work", tmp / "domain",
           "--valid-docs", "chesterton-ball", "--test-docs", "chesterton-brown", "--heldout-tokens", 800,
           "--factory", "IVF2,Flat", *RETRIEVAL, *WINDOW)
    m = metrics(tmp, "domain")
    assert m["stages"]["dump_wiki"]["reused"]  # make wikitext2's datastore, never made again here
    assert set(m["datastores"]) == {"books", "wiki", "both"} and m["model"]["layers"] == 2


def test_keytypes_on_two_key_types(wt2):
    tmp, raw, ckpt, _ = wt2
    driver("keytypes.py", "--raw-dir", raw, "--checkpoint", ckpt, "--dict", tmp / "bin" / "dict.txt", "--out",
           tmp / "out" / "keytypes", "--work", tmp / "keytypes", "--keytypes", "last_ffn_input,second_last_ffn_input",
           "--train-articles", 0.5, "--valid-tokens", 2000, "--factory", "IVF2,Flat", *RETRIEVAL, *WINDOW)
    m = metrics(tmp, "keytypes")
    assert [r["key_type"] for r in m["keytypes"]] == ["last_ffn_input", "second_last_ffn_input"]
    assert m["subset"]["valid"]["tokens"] >= 2000 and m["model"] == {"layers": 2, "dim": 32}


def test_bench_times_every_row_side_by_side(wt2):
    tmp, _, ckpt, _ = wt2
    driver("bench.py", "--data-bin", tmp / "data", "--checkpoint", ckpt, "--dstore", tmp / "bench-dstore", "--out",
           tmp / "out" / "bench", "--work", tmp / "bench", "--tokens", 600, "--factory", "IVF2,Flat",
           "--fast-factory", "IVF2,PQ8x4fs", "--fast-probe", 1, "--fast-k", 8, "--buckets", 3, "--pointers", "2,4",
           "--pointer-tokens", 300, *RETRIEVAL, *WINDOW)
    m = metrics(tmp, "bench")
    rows = ["base", "paper_exact", "paper_approx", "fast"]
    assert m["rows"] == rows
    for split in ("valid", "test"):
        runs = [m["runs"][f"{r}_{split}"] for r in rows]
        # the same tokens for every row: whole batches from the start of the split until 600 are scored
        assert len({r["tokens"] for r in runs}) == 1 and 600 <= runs[0]["tokens"] < 3000
        assert all(r["tok_s"] > 0 and r["peak_rss_mb"] > 0 for r in runs)
        assert runs[0]["stats"] is None and all(r["stats"]["components"]["KnnSearch"]["rows"] > 0 for r in runs[1:])
    # the fast row runs exactly what the sweep wrote, tuned on valid only
    assert m["tuned"]["tuned_for"]["split"] == "valid" and m["tuned"]["knnlm"]["k"] <= 8
    assert [p["min_pointers"] for p in m["sweep"]["pointers"] if p["kind"] == "exact"] == [None, 2, 4]
    report = (tmp / "out" / "bench" / "report.md").read_text()
    assert "## Where the time goes" in report and "## Pointer reuse (simulated)" in report
    assert (tmp / "out" / "bench" / "frontier.png").stat().st_size > 10_000
