"""knnlm-inspect: see what kNN-LM retrieves, token by token: p_LM, p_kNN, p and the gain, and each token's nearest
datastore entries with the text they came from, as one static HTML page (and JSON, and a terminal list).

The numbers come from a retrieval log: give one (--log, no LM pass), or let this run `fairseq-eval-lm --knnlm
--save-retrieval` once over --split (optionally only its first tokens) or over raw --text, tokenized the way
knnlm-prepare-text does and binarized with the data's dictionary.

--knn-settings FILE (knnlm-sweep --write-settings) sets k, λ (or a gate's per-token λ), T, distances, probes and the
index as fairseq-eval-lm --knn-settings does, so the numbers are that run's; a flag given that contradicts the file
is refused, and so is a file tuned for another datastore, checkpoint or index. docs/inspect.md describes the output.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from ..core.errors import KnnlmError

BIN = os.path.dirname(sys.executable)
PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the flags a settings file sets, with inspect's defaults (T differs from eval-lm's 1.0: see _GivenOnly)
DEFAULTS = {"k": 1024, "lmbda": 0.25, "knn_temp": 10.0, "knn_dist": "exact", "probe": 32, "index_file": "index.faiss"}
FLAGS = (("k", int, "neighbours"), ("lmbda", float, "λ"), ("knn_temp", float, "temperature T"),
         ("knn_dist", str, "exact or approx distances"), ("probe", int, "IVF lists visited"),
         ("index_file", str, "the index in --dstore-dir"))
GATE = ("knn_gate_signal", "knn_gate_edges", "knn_gate_lmbdas")  # set only by --knn-settings


@dataclass
class _GivenOnly:
    """core/settings.apply_settings' config class for inspect: no flag has a default, so a flag left out (None) takes
    the file's value and any flag given must equal it. eval-lm lets a flag equal to its own default pass (it cannot
    tell it from one left out); inspect's parser can, and its defaults differ from eval-lm's (T 10 vs 1.0)."""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-inspect", description=__doc__)
    p.add_argument("--data", required=True, help="fairseq-preprocess output (its dict.txt names the words)")
    p.add_argument("--dstore-dir", required=True, help="the datastore (its entries' contexts come from its manifest)")
    p.add_argument("--path", help="checkpoint, for the LM pass (not needed with --log)")
    p.add_argument("--split", default="valid", help="split of --data to score")
    p.add_argument("--first-tokens", type=int, default=0, help="show only the first blocks up to N tokens")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="raw text to score instead of --split (WikiText tokenization, --data's dictionary)")
    src.add_argument("--log", help="a retrieval log (fairseq-eval-lm --knnlm --save-retrieval DIR): no LM pass")
    p.add_argument("--knn-settings", metavar="FILE", help="settings written by knnlm-sweep --write-settings: k, λ "
                   "or a gate, T, distances, probes, index, as fairseq-eval-lm --knn-settings uses them")
    for name, kind, what in FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=kind, choices=["exact", "approx"] if name == "knn_dist"
                       else None, help=f"{what} (default {DEFAULTS[name]}; --knn-settings sets it)")
    p.add_argument("--tokens-per-sample", type=int, default=512)
    p.add_argument("--context-window", type=int, default=256)
    p.add_argument("--device", default="--cpu", help="device flags for the LM pass, e.g. '--cpu' or '--fp16'")
    p.add_argument("--neighbours", type=int, default=8, help="neighbours shown per token")
    p.add_argument("--out", required=True, help="the HTML page")
    p.add_argument("--json", help="also write the page's data as JSON here")
    p.add_argument("--top", type=int, default=20, help="print the tokens with the largest gains and losses (0: none)")
    return p


def binarize_text(text: str, dict_path: str, work: str) -> str:
    """Raw text -> WikiText tokens (knnlm-prepare-text's tokenizer) -> WORK/bin/valid.{bin,idx}."""
    from ..core.textprep import tokenize_document

    raw = os.path.join(work, "text.tokens")
    with open(raw, "w", encoding="utf-8") as f:
        f.write("\n".join(tokenize_document(text)) + "\n")
    out = os.path.join(work, "bin")
    run([f"{BIN}/fairseq-preprocess", "--only-source", "--srcdict", dict_path, "--validpref", raw, "--destdir", out,
         "--workers", "1"])
    return out


def run(cmd) -> None:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        last = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-1:]
        raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {last[0] if last else 'exit ' + str(proc.returncode)}")


def record(a, data: str, work: str) -> str:
    """One eval-lm pass with --save-retrieval over the split (or its first tokens); returns the log directory."""
    log = os.path.join(work, "log")
    cmd = [f"{BIN}/fairseq-eval-lm", data, "--path", a.path, "--user-dir", PKG, "--task", "knn_eval",
           "--gen-subset", a.split, "--tokens-per-sample", a.tokens_per_sample, "--context-window", a.context_window,
           "--no-progress-bar", "--knnlm", "--dstore-dir", a.dstore_dir, "--index-file", a.index_file,
           "--k", a.k, "--lmbda", a.lmbda, "--knn-temp", a.knn_temp, "--probe", a.probe, "--knn-dist", a.knn_dist,
           "--save-retrieval", log, *a.device.split()]
    run(cmd + (["--eval-tokens", a.first_tokens] if a.first_tokens else []))
    return log


def settings_and_defaults(a):
    """Apply --knn-settings (refusing a contradicting flag), then inspect's defaults; returns the settings and the
    gate ({signal, edges, lmbdas}) or None."""
    from ..core.settings import apply_settings

    for name in GATE:
        setattr(a, name, None)
    settings = apply_settings(a, _GivenOnly, a.knn_settings) if a.knn_settings else None
    for name, value in DEFAULTS.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if not a.knn_gate_signal:
        return settings, None
    try:
        return settings, {"signal": str(a.knn_gate_signal), "edges": floats(a.knn_gate_edges),
                          "lmbdas": floats(a.knn_gate_lmbdas)}
    except ValueError as e:
        raise KnnlmError(f"--knn-settings {a.knn_settings}: the gate's edges or λs are not numbers ({e})") from None


def check_gate(a, gate) -> None:
    """The gate's own checks, as the live gate makes them (core/adaptive.check_gate)."""
    from ..core.adaptive import check_gate as check

    try:
        check(**gate)
    except KnnlmError as e:
        raise KnnlmError(f"--knn-settings {a.knn_settings}: {e}") from None


def floats(text) -> list:
    return [float(x) for x in str(text or "").split(",") if x.strip()]


def check_log_target(a, settings, log) -> None:
    """The log's neighbours are the ones eval-lm would find with the settings: the same index, and (IVF) probes."""
    searched, tuned = log.meta.get("index") or {}, settings["tuned_for"]
    if searched.get("id") != tuned.get("index_id"):
        raise KnnlmError(f"the log {log.path} searched another index than the one --knn-settings {a.knn_settings} was "
                         f"tuned on; record a log on that index (drop --log, pass --path)")
    if "IVF" in str(searched.get("factory", "")) and log.meta.get("nprobe") != a.probe:
        raise KnnlmError(f"the log {log.path} searched with --probe {log.meta.get('nprobe')}, --knn-settings "
                         f"{a.knn_settings} with {a.probe}; record a log with it (drop --log, pass --path)")


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    from ..core.contexts import SourceText
    from ..core.databin import read_symbols
    from ..core.datastore import Datastore, dictionary_sha256
    from ..core.durable import sha256_file
    from ..core.index import resolve_index_path
    from ..core.retrieval_log import RetrievalLog
    from ..core.settings import check_settings_target
    from ..inspect.html import render

    try:
        settings, gate = settings_and_defaults(a)
        symbols = read_symbols(os.path.join(a.data, "dict.txt"))
        dstore = Datastore.open(a.dstore_dir)
        if dictionary_sha256(symbols) != dstore.manifest["dictionary"]["sha256"]:
            raise KnnlmError(f"{a.data}/dict.txt is not the dictionary datastore {a.dstore_dir} was dumped with; "
                             f"pass the --data binarized with the checkpoint's dict.txt")
        source = SourceText(dstore)
        with tempfile.TemporaryDirectory(prefix="knnlm-inspect-") as work:
            if a.log is None and not a.path:
                raise KnnlmError("scoring needs the checkpoint: pass --path, or --log with a retrieval log")
            index = resolve_index_path(a.dstore_dir, a.index_file)
            if settings is not None and a.log is None:  # before the LM pass
                check_settings_target(settings, a.knn_settings, dstore.fingerprint, sha256_file(a.path),
                                      index_path=index)
                if gate:
                    check_gate(a, gate)
            data = binarize_text(a.text, os.path.join(a.data, "dict.txt"), work) if a.text else a.data
            if a.text:
                a.split = "valid"
            log = RetrievalLog(a.log or record(a, data, work))
            if log.meta["dstore"]["fingerprint"] != dstore.fingerprint:
                raise KnnlmError(f"the log {log.path} retrieved from another datastore ({log.meta['dstore']['path']}); "
                                 f"pass its --dstore-dir, or record a log with this one")
            if settings is not None:
                check_settings_target(settings, a.knn_settings, dstore.fingerprint, log.meta["checkpoint"]["sha256"],
                                      index_path=index)
                check_log_target(a, settings, log)
            if gate:
                check_gate(a, gate)
            if a.k > log.k:
                where = f"--knn-settings {a.knn_settings}'s k" if settings else "--k"
                raise KnnlmError(f"{where} {a.k} exceeds the log's k={log.k}; pass a smaller --k or record again")
            from ..inspect.data import build, terminal  # torch: after every refusal that needs none

            page = build(log, symbols, source, a.knn_dist, a.k, a.knn_temp, a.lmbda,
                         first=a.first_tokens or None, shown=a.neighbours, gate=gate,
                         meta={"title": f"kNN-LM on {'your text' if a.text else a.split}", "split": log.meta.get("split"),
                               "dstore": os.path.abspath(a.dstore_dir), "checkpoint": log.meta["checkpoint"]["path"],
                               **({"knn_settings": os.path.abspath(a.knn_settings)} if settings else {})})
    except (KnnlmError, RuntimeError, OSError) as e:
        print(f"knnlm-inspect: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(render(page))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(page, f, ensure_ascii=False)
    if a.top:
        print(terminal(page, a.top))
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
