"""knnlm-merge-dstore: read several datastores as one (shards of a split dumped by separate jobs, or different
corpora for the same model), without copying a row.

Writes OUT/manifest.json naming the sources (paths relative to OUT) with their counts and fingerprints; build
an index over OUT with knnlm-build-index and evaluate with --dstore-dir OUT. The sources must stay in place.
"""
import argparse
import sys

from ..core.errors import KnnlmError
from ..core.shards import merge


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-merge-dstore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="new datastore directory (holds only a manifest)")
    p.add_argument("sources", nargs="+", help="complete datastores, in the row order wanted")
    p.add_argument("--same-dump", action="store_true",
                   help="the sources are parts of one split dumped alike (--num-shards/--shard-id jobs): also require "
                        "the same split, data, context window and tokens per sample")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        m = merge(args.out, args.sources, same_dump=args.same_dump)
    except KnnlmError as e:
        print(f"knnlm-merge-dstore: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {m['count']:,} entries of dim {m['dim']} from {len(m['shards'])} datastores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
