"""knnlm-build-index: a FAISS index over a datastore, from any index factory string."""
import argparse
import logging
import os
import sys

from ..core.datastore import Datastore
from ..core.errors import KnnlmError
from ..core.index import DEFAULT_FACTORY, METRICS, build_index, check_output_free


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="knnlm-build-index", description=__doc__)
    p.add_argument("dstore_dir", help="datastore directory written by fairseq-eval-lm --save-dstore")
    p.add_argument("--factory", default=DEFAULT_FACTORY,
                   help="faiss index factory string, e.g. 'IVF4096,PQ64' (the paper's; IVF lists are scaled "
                        "down for small datastores) or 'Flat' for exact search (default: %(default)s)")
    p.add_argument("--metric", choices=sorted(METRICS), default="l2", help="squared L2 or inner product")
    p.add_argument("--train-size", type=int, default=1_000_000, help="keys sampled to train the index")
    p.add_argument("--add-chunk", type=int, default=1_000_000, help="keys read and added per step")
    p.add_argument("--seed", type=int, default=1, help="training sample seed")
    p.add_argument("--output", default="index.faiss", help="index file, relative to the datastore directory")
    p.add_argument("--force", action="store_true",
                   help="replace an index already at --output (retrieval logs and --knn-settings tuned on it are then "
                        "refused: record and tune again); without it an existing index is never overwritten")
    p.add_argument("--gpu", action="store_true", help="train and add on all visible GPUs (faiss-gpu)")
    p.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: all cores)")
    p.add_argument("--checkpoint-seconds", type=float, default=600.0,
                   help="save the keys added so far this often; re-running the same command after a crash resumes")
    p.add_argument("--ondisk", action="store_true",
                   help="IVF lists in INDEX.ivfdata, memory-mapped when searching (faiss OnDiskInvertedLists): for "
                        "datastores whose index does not fit in RAM; keep the .ivfdata file next to the index")
    p.add_argument("--no-verify", action="store_true",
                   help="skip re-hashing the key and value files against the manifest before building (reads every "
                        "byte once: seconds for millions of keys, minutes for WikiText-103's)")
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    import faiss

    faiss.omp_set_num_threads(args.threads or os.cpu_count())
    out = args.output if os.path.isabs(args.output) else os.path.join(args.dstore_dir, args.output)
    try:
        if args.gpu and (not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1):
            raise KnnlmError("--gpu needs faiss-gpu and a visible GPU (this faiss has no GPU support); install with "
                             "`make install FAISS=faiss-gpu`, or drop --gpu to build on the CPU")
        dstore = Datastore.open(args.dstore_dir)
        if not args.force:
            check_output_free(out)
        if not args.no_verify:  # an index over flipped bytes would serve wrong neighbours without a sign
            logging.getLogger("knnlm-build-index").info("checking the datastore's sha256 (--no-verify skips it)")
            dstore.verify()
        build_index(dstore, out, factory=args.factory, metric=args.metric, train_size=args.train_size,
                    add_chunk=args.add_chunk, seed=args.seed, use_gpu=args.gpu,
                    progress=not args.no_progress_bar, checkpoint_seconds=args.checkpoint_seconds,
                    ondisk=args.ondisk)
    except KnnlmError as e:
        print(f"knnlm-build-index: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
