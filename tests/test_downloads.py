"""`make wikitext103`'s downloads and preflight through the real Makefile and curl, from a local HTTP server
(tests/httpd.py) serving a WikiText-103-shaped zip and a checkpoint tarball: fallback to the next URL, a refused
corrupted archive, resumed transfers, the checkpoint's recorded/pinned sha256, the preflight's checks and plan."""
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
import zipfile

import pytest

from clis import BIN, ROOT
from httpd import Site

pytestmark = pytest.mark.slow  # runs make targets

ZIP, CKPT = "/mirror/wikitext-103-v1.zip", "/ckpt/adaptive_lm_wiki103.v2.tar.bz2"
DEAD, CORRUPT, FLAKY = "/dead/wikitext-103-v1.zip", "/corrupt/wikitext-103-v1.zip", "/flaky/wikitext-103-v1.zip"
SKIP_HEAVY = ["WT103_REQUIRE_GPU=0", "WT103_NEED_GB=0", "WT103_NEED_DATA_GB=0", "WT103_NEED_RAM_GB=0"]


def wikitext_like(rng: random.Random, articles: int) -> str:
    words = [f"w{i}" for i in range(3000)]
    out = []
    for a in range(articles):
        out.append(f" \n = Article {a} = \n \n")
        out += [" ".join(rng.choices(words, k=rng.randint(40, 120))) + " . \n" for _ in range(rng.randint(3, 8))]
    return "".join(out)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def site():
    rng = random.Random(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # stored: ~0.7 MB, big enough to cut mid-transfer
        for split, n in (("train", 120), ("valid", 10), ("test", 10)):
            z.writestr(f"wikitext-103/wiki.{split}.tokens", wikitext_like(rng, n))
    zip_bytes = buf.getvalue()
    corrupt = bytearray(zip_bytes)
    corrupt[len(corrupt) // 2] ^= 0xFF  # one flipped byte: what a bad mirror or a broken disk gives
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as t:  # fairseq's layout: adaptive_lm_wiki103.v2/{model.pt,dict.txt}
        for name, data in (("model.pt", b"not a real model"), ("dict.txt", b"w0 10\nw1 5\n")):
            info = tarfile.TarInfo(f"adaptive_lm_wiki103.v2/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with Site({ZIP: zip_bytes, CORRUPT: bytes(corrupt), FLAKY: zip_bytes, CKPT: buf.getvalue()}) as s:
        yield s


@pytest.fixture
def paths(tmp_path, site):
    site.requests.clear()
    return {"WT103_DATA": tmp_path / "data" / "wikitext-103", "WT103_BIN": tmp_path / "bin",
            "WT103_CKPT_DIR": tmp_path / "ckpt", "WT103_OUT": tmp_path / "out", "WT103_WORK": tmp_path / "dstore"}


def make(target, paths, *variables):
    cmd = ["make", "--no-print-directory", "-C", ROOT, target, f"BIN={BIN}"]
    cmd += [f"{k}={v}" for k, v in paths.items()] + list(variables)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    proc.output = proc.stdout + proc.stderr
    return proc


def urls(site, *routes):
    return " ".join(site.url(r) for r in routes)


def zip_md5(site):
    return md5(site.files[ZIP])


def status(output: str, check: str) -> str:
    """The preflight's verdict (ok, FAIL, --, skip) on the row named check."""
    rows = [line.split(maxsplit=2) for line in output.splitlines() if line.startswith("  ")]
    return next(r[0] for r in rows if len(r) > 1 and r[1] == check)


def test_dead_primary_falls_back_to_the_mirror(site, paths):
    proc = make("wikitext103-data", paths, f"WT103_URLS={urls(site, DEAD, ZIP)}", f"WT103_MD5={zip_md5(site)}")
    assert proc.returncode == 0, proc.output
    assert f"{site.url(DEAD)} failed (curl exit 22, HTTP 404); trying the next URL" in proc.output
    assert [(m, p) for m, p, _ in site.requests] == [("GET", DEAD), ("GET", ZIP)]  # in the order of WT103_URLS
    data = paths["WT103_DATA"]
    with zipfile.ZipFile(io.BytesIO(site.files[ZIP])) as z:
        assert (data / "wiki.train.tokens").read_bytes() == z.read("wikitext-103/wiki.train.tokens")
    manifest = json.loads((data / "download.json").read_text())
    assert manifest["url"] == site.url(ZIP) and manifest["md5"] == zip_md5(site)
    assert manifest["verified"] == {"md5": "WT103_MD5"} and manifest["bytes"] == len(site.files[ZIP])
    assert manifest["sha256"] == hashlib.sha256(site.files[ZIP]).hexdigest()


def test_corrupted_archive_is_refused_and_nothing_downstream_runs(site, paths):
    # the whole target: the preflight passes (the corrupted copy answers HEAD), the download is refused
    proc = make("wikitext103", paths, *SKIP_HEAVY, f"WT103_URLS={urls(site, CORRUPT)}", f"WT103_MD5={zip_md5(site)}",
                f"WT103_CKPT_URLS={urls(site, CKPT)}")
    assert proc.returncode != 0
    assert "wikitext103-check: all checks passed" in proc.output
    errors = [line for line in proc.output.splitlines() if line.startswith("fetch: error:")]
    assert errors == [f"fetch: error: wikitext-103-v1.zip has md5 {md5(site.files[CORRUPT])}, expected {zip_md5(site)} "
                      f"(WT103_MD5); fix WT103_URLS (a mirror serving other bytes) or WT103_MD5; the download from "
                      f"{site.url(CORRUPT)} was deleted"]
    zip_path = paths["WT103_DATA"].parent / "wikitext-103-v1.zip"
    assert not zip_path.exists() and not os.path.exists(f"{zip_path}.part")  # nothing left to resume onto
    assert not (paths["WT103_DATA"] / "wiki.train.tokens").exists()  # not unzipped
    for later in ("WT103_BIN", "WT103_CKPT_DIR", "WT103_OUT", "WT103_WORK"):  # no binarizing, no checkpoint, no run
        assert not paths[later].exists(), later
    assert [p for m, p, _ in site.requests if m == "GET"] == [CORRUPT]


def test_interrupted_download_resumes(site, paths):
    site.cut_after[FLAKY] = 200_000  # the first GET ends after 200,000 bytes
    proc = make("wikitext103-data", paths, f"WT103_URLS={urls(site, FLAKY)}", f"WT103_MD5={zip_md5(site)}")
    assert proc.returncode == 0, proc.output
    assert "stopped at 200,000 bytes" in proc.output
    assert site.gets(FLAKY) == [None, "bytes=200000-"]  # the second request continued, not restarted
    assert (paths["WT103_DATA"].parent / "wikitext-103-v1.zip").read_bytes() == site.files[ZIP]
    assert json.loads((paths["WT103_DATA"] / "download.json").read_text())["tried"][-1]["resumed_from"] == 200_000


def test_a_part_left_by_an_earlier_run_is_resumed(site, paths):
    # make was killed mid-download: the next make continues the .part instead of starting from zero
    part = paths["WT103_DATA"].parent / "wikitext-103-v1.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(site.files[ZIP][:300_000])
    proc = make("wikitext103-data", paths, f"WT103_URLS={urls(site, ZIP)}", f"WT103_MD5={zip_md5(site)}")
    assert proc.returncode == 0, proc.output
    assert site.gets(ZIP) == ["bytes=300000-"]
    assert (paths["WT103_DATA"].parent / "wikitext-103-v1.zip").read_bytes() == site.files[ZIP]


def test_checkpoint_sha256_is_recorded_then_pinned(site, paths, tmp_path):
    sha = hashlib.sha256(site.files[CKPT]).hexdigest()
    proc = make("wikitext103-model", paths, f"WT103_CKPT_URLS={urls(site, DEAD, CKPT)}")
    assert proc.returncode == 0, proc.output
    ckpt = paths["WT103_CKPT_DIR"]
    manifest = json.loads((ckpt / "download.json").read_text())
    assert manifest["sha256"] == sha and manifest["url"] == site.url(CKPT) and manifest["verified"] == {}
    assert f"sha256 {sha} (recorded, not verified: set WT103_CKPT_SHA256 to pin it)" in proc.output
    assert (ckpt / "model.pt").read_bytes() == b"not a real model" and (ckpt / "dict.txt").exists()
    assert not (ckpt / "model.tar.bz2").exists()

    wrong = dict(paths, WT103_CKPT_DIR=tmp_path / "ckpt-wrong")
    proc = make("wikitext103-model", wrong, f"WT103_CKPT_URLS={urls(site, CKPT)}", f"WT103_CKPT_SHA256={'0' * 64}")
    assert proc.returncode != 0
    assert [line for line in proc.output.splitlines() if line.startswith("fetch: error:")] == [
        f"fetch: error: model.tar.bz2 has sha256 {sha}, expected {'0' * 64} (WT103_CKPT_SHA256); fix WT103_CKPT_URLS "
        f"(a mirror serving other bytes) or WT103_CKPT_SHA256; the download from {site.url(CKPT)} was deleted"]
    assert not (tmp_path / "ckpt-wrong" / "model.pt").exists()

    pinned = dict(paths, WT103_CKPT_DIR=tmp_path / "ckpt-pinned")
    proc = make("wikitext103-model", pinned, f"WT103_CKPT_URLS={urls(site, CKPT)}", f"WT103_CKPT_SHA256={sha}")
    assert proc.returncode == 0, proc.output
    assert json.loads((tmp_path / "ckpt-pinned" / "download.json").read_text())["verified"] == {
        "sha256": "WT103_CKPT_SHA256"}


def test_preflight_checks_sources_and_prints_the_plan(site, paths):
    proc = make("wikitext103-check", paths, *SKIP_HEAVY, f"WT103_URLS={urls(site, DEAD, ZIP)}",
                f"WT103_CKPT_URLS={urls(site, CKPT)}")
    assert proc.returncode == 0, proc.output
    assert f"{site.url(DEAD)}: HTTP 404" in proc.output and f"{site.url(ZIP)}: HTTP 200" in proc.output
    assert status(proc.output, "WT103_URLS[0]") == "--" and status(proc.output, "WT103_URLS[1]") == "ok"
    assert "downloads from WT103_URLS[1], the first of its 2 URLs that answers" in proc.output
    for stage in ("download", "binarize", "dump", "index", "evaluate", "sweep"):
        assert f"\n  {stage} " in proc.output
    assert "211.8 GB" in proc.output and "4-6 GPU hours + 2-3 CPU hours (index), about 233 GB of disk" in proc.output
    assert {m for m, _, _ in site.requests} == {"HEAD"}  # the preflight downloads nothing
    assert not paths["WT103_DATA"].parent.exists()  # and writes nothing


def test_preflight_refuses_dead_sources_small_disk_and_ram_before_downloading(site, paths):
    proc = make("wikitext103", paths, "WT103_REQUIRE_GPU=0", "WT103_NEED_GB=1000000000", "WT103_NEED_RAM_GB=1000000",
                f"WT103_URLS={urls(site, DEAD)}", f"WT103_CKPT_URLS={urls(site, CKPT)}")
    assert proc.returncode != 0
    assert status(proc.output, "WT103_URLS") == "FAIL" and status(proc.output, "disk") == "FAIL"
    assert status(proc.output, "RAM") == "FAIL" and status(proc.output, "WT103_CKPT_URLS") == "ok"
    assert "none of its 1 URLs answers; set WT103_URLS to a live mirror" in proc.output
    assert "needs 1000000000 GB" in proc.output and "(WT103_NEED_GB)" in proc.output
    assert "needs 1000000 GB (WT103_NEED_RAM_GB)" in proc.output
    assert "wikitext103-check: FAIL: WT103_URLS, disk, RAM;" in proc.output
    assert "\n  dump " in proc.output  # the plan is printed on failure too
    assert not any(m == "GET" for m, _, _ in site.requests) and not paths["WT103_DATA"].parent.exists()


def test_preflight_gpu_checks_match_this_machine(site, paths):
    import faiss
    import torch

    proc = make("wikitext103-check", paths, *SKIP_HEAVY[1:], "WT103_NEED_GPU_GB=0", f"WT103_URLS={urls(site, ZIP)}",
                f"WT103_CKPT_URLS={urls(site, CKPT)}")
    cuda_ok, faiss_ok = torch.cuda.is_available(), faiss.get_num_gpus() > 0
    assert status(proc.output, "CUDA") == ("ok" if cuda_ok else "FAIL")
    assert status(proc.output, "faiss-gpu") == ("ok" if faiss_ok else "FAIL")
    assert (proc.returncode == 0) == (cuda_ok and faiss_ok), proc.output
    if not cuda_ok:  # CI: the failure names the way out
        assert "WT103_REQUIRE_GPU=0" in proc.output


def test_all_urls_dead_is_one_line_naming_the_variable(site, tmp_path):
    out = tmp_path / "x.zip"
    proc = subprocess.run([f"{BIN}/python", os.path.join(ROOT, "scripts", "fetch.py"), str(out), site.url(DEAD),
                           site.url("/also-dead.zip"), "--md5", "0" * 32, "--checksum-var", "WT103_MD5", "--urls-var",
                           "WT103_URLS"], capture_output=True, text=True)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("fetch: error: no URL in WT103_URLS served x.zip")
    assert errors[0].endswith("set WT103_URLS to a live mirror")
    assert not out.exists() and not os.path.exists(f"{out}.part")
