"""Running pipeline stages (stock fairseq CLIs and ours) as timed subprocesses, for demo and reports.

Each stage's wall time and peak RSS are its own (os.wait4 on that child); logs go to files and
numbers are parsed from what the CLIs print.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Dict, List

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "knnlm_fairseq")
KNN_TASK = ["--user-dir", PKG, "--task", "knn_eval"]
_PPL = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
_EVALUATED = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s")


class StageFailed(RuntimeError):
    pass


def run(name: str, cmd: List[str], log_dir: str, stages: Dict) -> str:
    """Run cmd, log to log_dir/name.log, record {seconds, peak_rss_mb, command} in stages[name]; return output."""
    cmd = [str(c) for c in cmd]
    printable = " ".join(shlex.quote(c.replace(BIN + os.sep, "").replace(ROOT + os.sep, "")) for c in cmd)
    print(f"$ {printable}", flush=True)
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{name}.log")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - t0
    text = open(log_path).read()
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise StageFailed(f"stage {name} failed (exit {proc.returncode}); log: {log_path}\n{tail}")
    stages[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
                    "load_avg_1m": round(os.getloadavg()[0], 2),  # > cores: other work shared the CPU
                    "command": printable}
    return text


def floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",")]


def add_run_settings(p, **defaults) -> None:
    """The dump / index / evaluation / sweep settings every report driver shares; `defaults` overrides by dest."""
    d = dict(dump_tokens_per_sample=512, dump_context_window=128, eval_tokens_per_sample=512,
             eval_context_window=256, max_tokens=8192, factory="IVF1024,PQ32", train_size=200_000, probe=32, k=1024,
             lmbda=0.25, knn_temp=1.0, lmbdas=[round(0.05 * i, 2) for i in range(19)], temps=[1.0], device="--cpu")
    d.update(defaults)
    for name in ("dump_tokens_per_sample", "dump_context_window", "eval_tokens_per_sample", "eval_context_window",
                 "max_tokens", "train_size", "probe", "k"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    p.add_argument("--factory", default=d["factory"])
    p.add_argument("--lmbda", type=float, default=d["lmbda"], help="λ of the eval-lm runs (the sweep tunes it)")
    p.add_argument("--knn-temp", type=float, default=d["knn_temp"], help="T of the eval-lm runs (the sweep tunes it)")
    p.add_argument("--lmbdas", type=floats, default=d["lmbdas"], help="λ grid of the offline sweep")
    p.add_argument("--temps", type=floats, default=d["temps"], help="T grid of the offline sweep")
    p.add_argument("--device", default=d["device"], help="device flags for fairseq-eval-lm, e.g. '--cpu' or '--fp16'")


def cli(main) -> None:
    """Run a report driver: a failed stage ends it with that stage's one-paragraph message."""
    try:
        sys.exit(main())
    except StageFailed as e:
        sys.exit(str(e))


def eval_numbers(text: str) -> Dict:
    """Perplexity, tokens and tokens/s from fairseq-eval-lm's output."""
    loss, ppl = _PPL.findall(text)[-1]
    tokens, secs = _EVALUATED.findall(text)[-1]
    tokens = int(tokens.replace(",", ""))
    return {"loss_base2": float(loss), "ppl": float(ppl), "tokens": tokens,
            "tok_s": round(tokens / max(float(secs), 1e-9), 1)}


def eval_lm(data: str, ckpt: str, split: str, tps: int, ctx: int, max_tokens: int, device: List[str]) -> List[str]:
    return [f"{BIN}/fairseq-eval-lm", data, "--path", ckpt, "--gen-subset", split, "--tokens-per-sample", tps,
            "--context-window", ctx, "--max-tokens", max_tokens, "--no-progress-bar", "--log-interval", 1000] + device


def read_json(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def versions() -> Dict:
    import faiss
    import fairseq
    import numpy
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "fairseq": fairseq.__version__,
            "faiss": faiss.__version__, "numpy": numpy.__version__}
