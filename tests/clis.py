"""Running the real CLIs (stock fairseq and ours) in subprocesses, and reading what they report."""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BIN = os.path.dirname(sys.executable)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(ROOT, "knnlm_fairseq")
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
WT2_RAW = os.path.join(SHARED, "data", "wikitext-2")
WT2_CKPT = os.path.join(SHARED, "models", "wt2-small", "checkpoint.pt")

_LOSS = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
_EVALUATED = re.compile(r"Evaluated ([0-9,]+) tokens")


def run_cli(name: str, *args, check: bool = True, env=None, cwd=None, fsize_kib: int = 0) -> subprocess.CompletedProcess:
    """A console script of the venv. fsize_kib: run it under `ulimit -f` (a write past it fails with EFBIG:
    Python ignores SIGXFSZ, so the process sees the error instead of being killed)."""
    cmd = [os.path.join(BIN, name)] + [str(a) for a in args]
    if fsize_kib:
        cmd = ["bash", "-c", f'ulimit -f {fsize_kib} && exec "$0" "$@"'] + cmd
    full_env = dict(os.environ, **(env or {}))
    full_env["PATH"] = BIN + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd)
    proc.output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.output[-4000:]}")
    return proc


def parallel(*calls):
    """Independent CLI runs two at a time: most of each is a single-threaded Python start-up."""
    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda c: c(), calls))


_WORD_LINE = re.compile(r"fairseq_cli\.eval_lm\D*?(\d+) (\S+ \[.*)$")
_WORD = re.compile(r"(\S+) \[(-?[0-9.]+|-?inf)\]")


def word_probs(output: str):
    """--output-word-probs lines, in sample order: (words, natural-log probabilities, the same as printed)."""
    samples = {}
    for line in output.splitlines():
        m = _WORD_LINE.search(line)
        if m:
            samples[int(m.group(1))] = _WORD.findall(m.group(2))
    pairs = [p for i in sorted(samples) for p in samples[i]]
    return [w for w, _ in pairs], np.array([float(lp) for _, lp in pairs]), [lp for _, lp in pairs]


def assert_refused(proc, message: str, prog: str = "knnlm_fairseq") -> None:
    """Nonzero exit, no perplexity, no traceback: the last stderr line is `PROG: error: ` and matches message."""
    assert proc.returncode != 0, proc.output[-3000:]
    assert "Loss (base 2)" not in proc.output and "Perplexity" not in proc.output, proc.output[-3000:]
    assert "Traceback" not in proc.output, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(f"{prog}: error: ") and re.search(message, last), last


def loss_and_ppl(output: str):
    loss, ppl = _LOSS.findall(output)[-1]
    return float(loss), float(ppl)


def evaluated_tokens(output: str) -> int:
    return int(_EVALUATED.findall(output)[-1].replace(",", ""))


def wt2_head(dest, **lines: int) -> None:
    """DEST/wiki.SPLIT.tokens: the first lines of WikiText-2's splits, e.g. wt2_head(dir, train=300, valid=60)."""
    os.makedirs(dest, exist_ok=True)
    for split, n in lines.items():
        with open(os.path.join(WT2_RAW, f"wiki.{split}.tokens")) as f, \
                open(os.path.join(dest, f"wiki.{split}.tokens"), "w") as out:
            out.writelines(line for _, line in zip(range(n), f))


def binarize_wt2_slice(dest: str, train_lines: int, valid_lines: int) -> str:
    """The first lines of WikiText-2 train/valid, binarized with the shipped checkpoint's dictionary."""
    os.makedirs(dest, exist_ok=True)
    for split, n in (("train", train_lines), ("valid", valid_lines)):
        with open(os.path.join(WT2_RAW, f"wiki.{split}.tokens")) as f, open(os.path.join(dest, f"{split}.txt"), "w") as o:
            for i, line in enumerate(f):
                if i >= n:
                    break
                o.write(line)
    bin_dir = os.path.join(dest, "bin")
    run_cli("fairseq-preprocess", "--only-source", "--srcdict", os.path.join(os.path.dirname(WT2_CKPT), "dict.txt"),
            "--trainpref", os.path.join(dest, "train.txt"), "--validpref", os.path.join(dest, "valid.txt"),
            "--destdir", bin_dir, "--workers", "1")
    return bin_dir


# one thread per process: tests run CLIs two at a time on 2 cores, and oversubscribed torch/faiss pools spin-wait
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def random_lines(path, rng, n: int, vocab: int, lo: int = 5, hi: int = 25) -> None:
    """n lines of lo..hi random words w0..w{vocab-1}: a corpus with nothing to learn but word frequencies."""
    words = [f"w{i}" for i in range(vocab)]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(" ".join(rng.choice(words, size=rng.integers(lo, hi))) + "\n")


def tiny_lm(tmp, valid_txt, max_update: int) -> None:
    """Binarize tmp/train.txt (+ valid_txt) into tmp/bin and train knnlm_tiny into tmp/ckpt/checkpoint_last.pt."""
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", os.path.join(tmp, "train.txt"), "--validpref",
            valid_txt, "--destdir", os.path.join(tmp, "bin"), "--workers", "1")
    run_cli("fairseq-train", os.path.join(tmp, "bin"), "--user-dir", USER_DIR, "--task", "language_modeling",
            "--arch", "knnlm_tiny", "--optimizer", "adam", "--lr", "0.005", "--max-tokens", "1024",
            "--tokens-per-sample", "64", "--max-update", max_update, "--save-dir", os.path.join(tmp, "ckpt"),
            "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--disable-validation", env=ONE_THREAD)
