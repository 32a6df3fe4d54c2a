"""knnlm-prepare-text: a folder of raw .txt documents -> WikiText-style dstore/valid/test token files.

Each .txt file is one document and goes whole to one part (datastore, valid or test). Writes
OUT/{dstore,valid,test}.tokens (one paragraph per line) and OUT/prep.json (documents, tokens and the OOV rate
of each part against --dict), ready for `fairseq-preprocess --only-source --srcdict DICT`.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

from ..core.durable import write_text_atomic
from ..core.errors import KnnlmError
from ..core.textprep import METADATA_NAMES, PARTS, prepare


def names(text: str):
    return [n for n in text.split(",") if n]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-prepare-text", description=__doc__)
    p.add_argument("src_dir", help="folder of .txt files, one document each (Project Gutenberg boilerplate is stripped)")
    p.add_argument("--dict", required=True, help="the checkpoint's dict.txt: OOV rates are counted against it")
    p.add_argument("--out", required=True, help="output folder (one that holds a finished preparation, OUT/prep.json, "
                                                "is refused without --force)")
    p.add_argument("--force", action="store_true", help="replace the prepared text already in --out")
    p.add_argument("--valid-docs", nargs="+", type=names, default=[],
                   help="documents for valid (file names, with or without .txt; space or comma separated)")
    p.add_argument("--test-docs", nargs="+", type=names, default=[], help="documents for test")
    p.add_argument("--valid-frac", type=float, default=0.1,
                   help="without --valid-docs: this fraction of the documents (at least one) goes to valid")
    p.add_argument("--test-frac", type=float, default=0.1, help="without --test-docs: the same for test")
    p.add_argument("--seed", type=int, default=1, help="seed of the shuffle that draws documents by fraction")
    p.add_argument("--exclude", type=names, default=list(METADATA_NAMES),
                   help="comma-separated file names that are not documents (default: %(default)s; '' for none)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    flat = lambda groups: [n for g in groups for n in g]  # noqa: E731  (nargs="+" of comma lists)
    try:
        done = os.path.join(args.out, "prep.json")  # written last: the preparation's commit point
        if os.path.exists(done) and not args.force:
            raise KnnlmError(f"{args.out} already holds prepared text ({done}), which fairseq-preprocess and later "
                             f"stages read; pass --force to replace it, or another --out")
        replacing = os.path.exists(done)  # --force: prepared beside the old text, swapped in once all of it is checked
        staging = tempfile.mkdtemp(prefix=".prep-", dir=args.out) if replacing else args.out
        try:
            info = prepare(args.src_dir, args.dict, staging, flat(args.valid_docs), flat(args.test_docs),
                           args.valid_frac, args.test_frac, args.seed, args.exclude)
            if replacing:
                os.remove(done)  # uncommitted while the parts are swapped
                for part in PARTS:
                    os.replace(os.path.join(staging, f"{part}.tokens"), os.path.join(args.out, f"{part}.tokens"))
        finally:
            if replacing:
                shutil.rmtree(staging, ignore_errors=True)
    except (KnnlmError, OSError) as e:
        print(f"knnlm-prepare-text: error: {e}", file=sys.stderr)
        return 2
    write_text_atomic(os.path.join(args.out, "prep.json"), json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    parts = info["parts"]
    print(f"{args.out}: " + "; ".join(
        f"{p} {len(parts[p]['documents'])} docs {parts[p]['tokens']:,} tokens OOV {parts[p]['oov_rate']:.2%}"
        for p in PARTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
