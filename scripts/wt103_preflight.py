#!/usr/bin/env python
"""wt103_preflight.py: what `make wikitext103` needs, checked before anything heavy starts, and what it will take.

Checks, one row each (ok / FAIL / skip, with the variable to change): every download source answers a HEAD
request (a list passes when one of its URLs does), the free disk of each filesystem the run writes to, the
RAM, the tools the recipe calls, a CUDA device with enough memory and a faiss built with GPU support. Then
the plan: stages, estimated hours and disk. Exits 1 if any check failed. `make wikitext103-check` runs it.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict

from knnlm_fairseq.core.retrieval_log import bytes_per_token

# one retrieval log per split (both distance kinds in it): WikiText-103 valid + test tokens, k=1024, 1024-d queries
EVAL_TOKENS = 217_646 + 245_569
LOG_BYTES = bytes_per_token(1024, 1024)
# The README's capacity plan for WikiText-103 (103M entries of 1024-d fp16 keys = 2 KiB each, IVF4096,PQ64):
# (stage, what it does, estimated time, disk it adds in GB)
PLAN = [
    ("download", "wikitext-103-v1.zip (181 MB, 0.54 GB unzipped), adaptive_lm_wiki103.v2 (247M parameters)",
     "< 0.5 h, network", 3.0),
    ("binarize", "fairseq-preprocess with the checkpoint's dictionary, 8 workers", "~0.5 h CPU", 0.5),
    ("dump", "one forward pass over train: 103M keys (1024-d fp16) and values, 1536 scored tokens per 3072 block",
     "2-4 GPU h", 211.8),
    ("index", "IVF4096,PQ64 trained on 1M sampled keys, 103M added (--gpu)", "~2 h CPU, less on GPU", 7.4),
    ("evaluate", f"base and kNN-LM (k=1024, exact distances) on valid and test; retrieval logs "
                 f"{LOG_BYTES / 1024:.1f} KiB/token", "1-2 GPU h", round(EVAL_TOKENS * LOG_BYTES / 1e9, 1)),
    ("sweep", "lambda and T tuned offline on valid, applied to test", "< 0.2 h CPU", 0.0),
]
PLAN_TOTAL = f"4-6 GPU hours + 2-3 CPU hours (index), about {sum(p[3] for p in PLAN):.0f} GB of disk"


def fmt_gb(x: float) -> str:
    return f"{x:.0f}" if x == int(x) else f"{x:g}"


class Checks:
    def __init__(self):
        self.rows = []

    def add(self, status: str, what: str, detail: str) -> None:
        self.rows.append((status, what, detail))
        print(f"  {status:<5} {what:<26} {detail}", flush=True)

    @property
    def failed(self):
        return [what for status, what, _ in self.rows if status == "FAIL"]


def head(url: str, timeout: int) -> tuple:
    """(answers, detail) for one URL: HEAD with redirects followed; a 1-byte GET where HEAD is not allowed."""
    proc = subprocess.run(["curl", "-sSIL", "--max-time", str(timeout), url], capture_output=True, text=True)
    if proc.returncode != 0:
        err = [re.sub(r"^curl: \(\d+\) ", "", line) for line in proc.stderr.strip().splitlines()]
        return False, f"no answer (curl exit {proc.returncode}" + (f": {err[-1]})" if err else ")")
    codes = re.findall(r"^HTTP/\S+ (\d{3})", proc.stdout, flags=re.M)
    sizes = re.findall(r"^content-length:\s*(\d+)", proc.stdout, flags=re.M | re.I)
    n = int(sizes[-1]) if sizes else None
    size = "" if n is None else f", {n / 1e6:,.1f} MB" if n >= 100_000 else f", {n:,} bytes"
    if not codes:  # file:// and other schemes without a status line: curl's exit 0 means the file is there
        return True, f"answers{size}"
    code = int(codes[-1])
    if code in (405, 501):  # some servers refuse HEAD but serve GET
        get = subprocess.run(["curl", "-sS", "-r", "0-0", "-o", os.devnull, "-w", "%{http_code}", "--max-time",
                              str(timeout), url], capture_output=True, text=True)
        code = int(get.stdout.strip() or 0)
    return 200 <= code < 300, f"HTTP {code}" + (size if 200 <= code < 300 else "")


def check_sources(checks: Checks, sources, timeout: int) -> None:
    for var, present, *urls in sources:
        if os.path.exists(present):
            checks.add("ok", var, f"not needed: {present} is already here")
            continue
        answers = []
        for url in urls:
            ok, detail = head(url, timeout)
            answers.append(ok)
            checks.add("ok" if ok else "--", f"  {var}[{len(answers) - 1}]", f"{url}: {detail}")
        if any(answers):
            checks.add("ok", var, f"downloads from {var}[{answers.index(True)}], the first of its {len(urls)} URLs that answers")
        else:
            checks.add("FAIL", var, f"none of its {len(urls)} URLs answers; set {var} to a live mirror")


def existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_disk(checks: Checks, disks) -> None:
    """Directories on one filesystem share its free space: each filesystem must hold the largest need among them."""
    by_fs = defaultdict(list)
    for path, gb, var in disks:
        by_fs[os.stat(existing_ancestor(path)).st_dev].append((path, float(gb), var))
    for entries in by_fs.values():
        path, need, var = max(entries, key=lambda e: e[1])
        free = shutil.disk_usage(existing_ancestor(path)).free / 1e9
        names = ", ".join(sorted({p for p, _, _ in entries}))
        if free >= need:
            checks.add("ok", "disk", f"{names}: {free:,.0f} GB free, needs {fmt_gb(need)} GB")
        else:
            checks.add("FAIL", "disk", f"{names}: {free:,.0f} GB free but the run needs {fmt_gb(need)} GB; free space or "
                                       f"point the WT103_WORK/_DATA/_BIN/_CKPT_DIR variables at a bigger disk ({var})")


def ram_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemTotal:\s+(\d+) kB", f.read()).group(1)) * 1024 / 1e9
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def check_gpu(checks: Checks, need_gb: float) -> None:
    try:
        import torch
    except ImportError as e:
        checks.add("FAIL", "CUDA", f"torch does not import ({e}); run make install")
        return
    if not torch.cuda.is_available():
        checks.add("FAIL", "CUDA", f"no CUDA device visible to torch {torch.__version__}; run on a GPU machine with a "
                                   "CUDA build of torch (TORCH=...), or WT103_REQUIRE_GPU=0 to run on CPU (days)")
    else:
        props = torch.cuda.get_device_properties(0)
        gb = props.total_memory / 1e9
        status = "ok" if gb >= need_gb else "FAIL"
        checks.add(status, "CUDA", f"{torch.cuda.device_count()} device(s), cuda:0 {props.name} with {gb:.0f} GB, needs "
                                   f"{fmt_gb(need_gb)} GB" + ("" if status == "ok" else " (WT103_NEED_GPU_GB)"))
    try:
        import faiss
    except ImportError as e:
        checks.add("FAIL", "faiss-gpu", f"faiss does not import ({e}); make install FAISS=faiss-gpu")
        return
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n > 0:
        checks.add("ok", "faiss-gpu", f"faiss {faiss.__version__} sees {n} GPU(s)")
    else:
        checks.add("FAIL", "faiss-gpu", f"faiss {faiss.__version__} has no GPU support (the index is built with --gpu); "
                                        "make install FAISS=faiss-gpu")


def print_plan() -> None:
    print("\nplan (estimates from the capacity plan; see docs/wikitext103.md):")
    print(f"  {'stage':<9} {'time':<22} {'disk':>8}  what")
    for stage, what, hours, gb in PLAN:
        print(f"  {stage:<9} {hours:<22} {gb:>6.1f} GB  {what}")
    print(f"  total: {PLAN_TOTAL}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", nargs="+", action="append", default=[], metavar="VAR PRESENT URL",
                   help="a download: the variable listing its URLs, the file whose presence means it is done, the URLs")
    p.add_argument("--disk", nargs=3, action="append", default=[], metavar=("DIR", "GB", "VAR"),
                   help="DIR's filesystem must have GB free (VAR sets GB)")
    p.add_argument("--ram-gb", type=float, default=0, help="physical memory needed (0: not checked)")
    p.add_argument("--gpu-gb", type=float, default=32, help="memory of the first CUDA device needed")
    p.add_argument("--no-gpu", action="store_true", help="skip the CUDA and faiss-gpu checks")
    p.add_argument("--tools", default="curl,unzip,tar,bzip2", help="commands the recipe calls")
    p.add_argument("--timeout", type=int, default=20, help="seconds per URL")
    a = p.parse_args(argv)
    bad = [s for s in a.source if len(s) < 3]
    assert not bad, f"--source needs VAR PRESENT URL [URL ...], got {bad}"

    checks = Checks()
    print("wikitext103 preflight:")
    missing = [t for t in a.tools.split(",") if t and not shutil.which(t)]
    checks.add("FAIL" if missing else "ok", "tools", f"missing: {', '.join(missing)}; install them" if missing
               else a.tools.replace(",", ", "))
    check_sources(checks, a.source, a.timeout)
    check_disk(checks, a.disk)
    if a.ram_gb > 0:
        have = ram_gb()
        checks.add("ok" if have >= a.ram_gb else "FAIL", "RAM",
                   f"{have:.0f} GB, needs {fmt_gb(a.ram_gb)} GB" + ("" if have >= a.ram_gb else " (WT103_NEED_RAM_GB)"))
    else:
        checks.add("skip", "RAM", "WT103_NEED_RAM_GB=0")
    if a.no_gpu:
        checks.add("skip", "CUDA, faiss-gpu", "WT103_REQUIRE_GPU=0")
    else:
        check_gpu(checks, a.gpu_gb)
    print_plan()
    if checks.failed:
        print(f"wikitext103-check: FAIL: {', '.join(checks.failed)}; fix the rows marked FAIL above "
              "(each names the variable to change)", file=sys.stderr)
        return 1
    print("wikitext103-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
