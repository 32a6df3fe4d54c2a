"""knnlm-inspect: see what kNN-LM retrieves, token by token: p_LM, p_kNN, p and the gain, and each token's nearest
datastore entries with the text they came from, as one static HTML page (and JSON, and a terminal list).

The numbers come from a retrieval log: give one (--log, no LM pass), or let this run `fairseq-eval-lm --knnlm
--save-retrieval` once over --split (optionally only its first tokens) or over raw --text, tokenized the way
knnlm-prepare-text does and binarized with the data's dictionary.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

BIN = os.path.dirname(sys.executable)
PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--knn-temp", type=float, default=10.0)
    p.add_argument("--knn-dist", choices=["exact", "approx"], default="exact")
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--index-file", default="index.faiss")
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


def main(argv=None) -> int:
    a = get_parser().parse_args(argv)
    from ..core.contexts import SourceText
    from ..core.databin import read_symbols
    from ..core.datastore import Datastore, dictionary_sha256
    from ..core.errors import KnnlmError
    from ..core.retrieval_log import RetrievalLog
    from ..inspect.data import build, terminal
    from ..inspect.html import render

    try:
        symbols = read_symbols(os.path.join(a.data, "dict.txt"))
        dstore = Datastore.open(a.dstore_dir)
        if dictionary_sha256(symbols) != dstore.manifest["dictionary"]["sha256"]:
            raise KnnlmError(f"{a.data}/dict.txt is not the dictionary datastore {a.dstore_dir} was dumped with; "
                             f"pass the --data binarized with the checkpoint's dict.txt")
        source = SourceText(dstore)
        with tempfile.TemporaryDirectory(prefix="knnlm-inspect-") as work:
            if a.log is None and not a.path:
                raise KnnlmError("scoring needs the checkpoint: pass --path, or --log with a retrieval log")
            data = binarize_text(a.text, os.path.join(a.data, "dict.txt"), work) if a.text else a.data
            if a.text:
                a.split = "valid"
            log = RetrievalLog(a.log or record(a, data, work))
            if log.meta["dstore"]["fingerprint"] != dstore.fingerprint:
                raise KnnlmError(f"the log {log.path} retrieved from another datastore ({log.meta['dstore']['path']}); "
                                 f"pass its --dstore-dir, or record a log with this one")
            if a.k > log.k:
                raise KnnlmError(f"--k {a.k} exceeds the log's k={log.k}; pass a smaller --k or record again")
            page = build(log, symbols, source, a.knn_dist, a.k, a.knn_temp, a.lmbda,
                         first=a.first_tokens or None, shown=a.neighbours,
                         meta={"title": f"kNN-LM on {'your text' if a.text else a.split}", "split": log.meta.get("split"),
                               "dstore": os.path.abspath(a.dstore_dir), "checkpoint": log.meta["checkpoint"]["path"]})
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
