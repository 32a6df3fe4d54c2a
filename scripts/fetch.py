#!/usr/bin/env python
"""fetch.py OUT URL [URL ...] --md5 HEX | --sha256 HEX: download OUT from the first URL that serves it, verified.

Each URL is tried in order with `curl -fL -C -` into OUT.part: a transfer that stops part-way is resumed
from the bytes already on disk (the same URL again while each try adds bytes), a URL that gives nothing
(dead host, 403/404) moves on to the next. The finished file is hashed: a mismatch with the pinned
checksum deletes the part and stops with one line naming the Makefile variable to fix; a match is
renamed to OUT atomically and described in --manifest (url, bytes, md5, sha256, date). An empty
checksum records the hash without verifying it.
"""
import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys

PROG = "fetch"


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def hashes(path: str) -> dict:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time: the archives are up to 2 GB
            md5.update(block)
            sha256.update(block)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def curl(url: str, part: str, args) -> tuple:
    """One curl run appending to part; returns (exit code, HTTP status, curl's last error line)."""
    cmd = [args.curl, "-fL", "-C", "-", "--retry", str(args.retries), "--retry-delay", "2",
           "--connect-timeout", str(args.connect_timeout), "-w", "%{http_code}", "-o", part, url]
    tty = sys.stderr.isatty()  # a progress bar for a person watching; quiet (errors only) in logs and CI
    cmd[1:1] = ["--progress-bar"] if tty else ["-sS"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if tty else subprocess.PIPE, text=True)
    err = (proc.stderr or "").strip().splitlines()
    return proc.returncode, proc.stdout.strip()[-3:], re.sub(r"^curl: \(\d+\) ", "", err[-1]) if err else ""


def download(urls, part: str, args) -> tuple:
    """Fill part from the first URL that serves it; returns (url, tried) or (None, tried)."""
    tried = []
    for url in urls:
        resumes, restarted = 0, False
        while True:
            before = size(part)
            rc, status, err = curl(url, part, args)
            if rc == 0:
                tried.append({"url": url, "result": "ok", "resumed_from": before})
                return url, tried
            after = size(part)
            http = status not in ("", "000")
            why = f"curl exit {rc}" + (f", HTTP {status}" if http else f": {err}" if err else "")
            # 33: the server ignores Range; 416: the part is not shorter than the file (complete, or longer
            # when the file changed): either way the part cannot be continued
            if (rc == 33 or status == "416") and before and not restarted:
                log(f"{url} cannot resume {os.path.basename(part)} ({why}); starting it again from byte 0")
                os.remove(part)
                restarted = True
                continue
            if after > before and resumes < args.max_resumes:  # a dropped transfer that made progress
                resumes += 1
                log(f"transfer from {url} stopped at {after:,} bytes ({why}); resuming ({resumes}/{args.max_resumes})")
                continue
            tried.append({"url": url, "result": why})
            log(f"{url} failed ({why}); " + ("trying the next URL" if url != urls[-1] else "no more URLs"))
            break
    return None, tried


def write_json_atomic(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mismatch(name: str, got: dict, expected: dict, args) -> str:
    """The first pinned checksum that got does not match, as one line naming the variables to fix; '' if none."""
    for kind, want in expected.items():
        if want and got[kind] != want.lower():
            return (f"{name} has {kind} {got[kind]}, expected {want} ({args.checksum_var}); "
                    f"fix {args.urls_var} (a mirror serving other bytes) or {args.checksum_var}")
    return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the file to produce")
    p.add_argument("urls", nargs="+", help="where to download it from, tried in order")
    p.add_argument("--md5", default=None, help="pinned md5 of the file ('' = record only)")
    p.add_argument("--sha256", default=None, help="pinned sha256 of the file ('' = record only)")
    p.add_argument("--checksum-var", default="the checksum", help="the Makefile variable that pins the checksum")
    p.add_argument("--urls-var", default="the URL list", help="the Makefile variable that lists the URLs")
    p.add_argument("--manifest", help="JSON describing the download (url, bytes, md5, sha256, date)")
    p.add_argument("--retries", type=int, default=3, help="curl --retry: transient errors (timeouts, 5xx)")
    p.add_argument("--max-resumes", type=int, default=20, help="resumes per URL after a transfer that stopped part-way")
    p.add_argument("--connect-timeout", type=int, default=30)
    p.add_argument("--curl", default="curl")
    a = p.parse_args(argv)
    assert a.md5 is not None or a.sha256 is not None, "pass --md5 or --sha256 (empty to record only)"
    expected = {k: v for k, v in (("md5", a.md5), ("sha256", a.sha256)) if v is not None}
    name, part = os.path.basename(a.out), a.out + ".part"

    if os.path.exists(a.out):  # downloaded before: verify it again rather than trust it
        bad = mismatch(name, hashes(a.out), expected, a)
        if bad:
            log(f"error: {bad}, or delete {a.out} to download it again")
            return 1
        log(f"{a.out} is already here" + (" and verified" if any(expected.values()) else ""))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    got = hashes(part) if size(part) and any(expected.values()) else None
    if got and not mismatch(name, got, expected, a):
        # complete but not renamed (interrupted while hashing): hashing the part is faster than downloading it
        log(f"{part} is already complete")
        url, tried = None, [{"url": None, "result": "ok: completed by an earlier, interrupted run"}]
    else:
        if size(part):
            log(f"resuming {part} ({size(part):,} bytes already here)")
        url, tried = download(a.urls, part, a)
        if url is None:
            log(f"error: no URL in {a.urls_var} served {name} ({'; '.join(t['url'] + ': ' + t['result'] for t in tried)}); "
                f"check the network or set {a.urls_var} to a live mirror")
            return 1
        got = hashes(part)
    bad = mismatch(name, got, expected, a)
    if bad:
        os.remove(part)  # never resume onto bytes known to be wrong
        log(f"error: {bad}; the download from {url or 'an earlier run'} was deleted")
        return 1
    os.replace(part, a.out)  # same directory: atomic, so OUT is always a whole, verified file
    verified = [k for k, v in expected.items() if v]
    if a.manifest:
        write_json_atomic(a.manifest, {
            "file": name, "url": url, "bytes": size(a.out), **got,
            "verified": {k: a.checksum_var for k in verified}, "pinned": bool(verified),
            "downloaded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tried": tried})
    if verified:
        log(f"{a.out}: {size(a.out):,} bytes from {url}, {' and '.join(verified)} verified ({a.checksum_var})")
    else:
        log(f"{a.out}: {size(a.out):,} bytes from {url}, sha256 {got['sha256']} (recorded, not verified: "
            f"set {a.checksum_var} to pin it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
