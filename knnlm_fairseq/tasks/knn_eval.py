"""knn_eval: language modeling whose models dump a datastore (--save-dstore) or score as kNN-LM (--knnlm).

Both run under stock fairseq-eval-lm, so keys are computed with exactly the blocks and context
window that evaluation scores, and every scored target lands in the datastore once.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fairseq import __version__ as fairseq_version
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from ..checkpoints import checkpoint_identity
from ..datastore import Datastore, DatastoreError, DatastoreWriter, assemble_shards, dictionary_sha256
from ..errors import install_excepthook
from ..index import open_retriever
from ..retrieval_log import CACHE_ARRAYS, RetrievalLogWriter
from ..shards import shard_name, shard_range
from ..keys import KEY_TYPES, key_dim
from ..models.knnlm import KnnLM

logger = logging.getLogger(__name__)
install_excepthook()


@dataclass
class KnnEvalConfig(LanguageModelingConfig):
    knnlm: bool = field(default=False, metadata={"help": "interpolate the LM with kNN retrieval from --dstore-dir"})
    save_dstore: bool = field(
        default=False, metadata={"help": "write a datastore of (key, next token) for every scored token to --dstore-dir"}
    )
    dstore_dir: Optional[str] = field(default=None, metadata={"help": "datastore directory"})
    index_file: str = field(
        default="index.faiss", metadata={"help": "faiss index, relative to --dstore-dir unless absolute"}
    )
    k: int = field(default=1024, metadata={"help": "neighbours retrieved per token"})
    lmbda: float = field(default=0.25, metadata={"help": "weight of p_kNN in the interpolation"})
    knn_temp: float = field(default=1.0, metadata={"help": "temperature T in p_kNN ∝ exp(-d/T)"})
    probe: int = field(default=32, metadata={"help": "IVF lists visited per query (faiss nprobe)"})
    knn_sim: Optional[ChoiceEnum(["l2", "ip"])] = field(
        default=None, metadata={"help": "similarity: squared L2 or inner product (default: the index's own)"}
    )
    knn_dist: ChoiceEnum(["exact", "approx"]) = field(
        default="exact",
        metadata={"help": "exact: recompute distances from the stored keys (paper: 16.06 vs 16.5 ppl); approx: faiss's"},
    )
    knn_keytype: ChoiceEnum(list(KEY_TYPES)) = field(
        default="last_ffn_input", metadata={"help": "decoder activation used as key and query"}
    )
    dstore_key_dtype: ChoiceEnum(["float16", "float32"]) = field(
        default="float16", metadata={"help": "storage type of dumped keys"}
    )
    dstore_commit_seconds: float = field(
        default=30.0,
        metadata={"help": "fsync the dump and record its progress this often; a killed dump re-run with the same "
                          "command resumes from the last record"},
    )
    save_retrieval: Optional[str] = field(
        default=None,
        metadata={"help": "with --knnlm: also write every token's LM log-prob, neighbours and distances (approx "
                          "and exact) to this directory, for knnlm-sweep"},
    )
    cache_size: int = field(
        default=0,
        metadata={"help": "continuous cache (Grave et al. 2017): the last N positions of the block being scored, "
                          "context window included, as a local datastore; 0: off"},
    )
    # defaults tuned on WikiText-2 valid for the shipped model (results/cache); θ scales with the states' norms
    cache_theta: float = field(default=0.03, metadata={"help": "θ in p_cache(w) ∝ Σ exp(θ · h_t · h_i)"})
    cache_lmbda: float = field(
        default=0.2, metadata={"help": "weight of the cache: p = (1 - w) · p_kNN-LM + w · p_cache"}
    )
    cache_keytype: ChoiceEnum(list(KEY_TYPES)) = field(
        default="last_block_output",
        metadata={"help": "cached states h (default: the last block's output, what the softmax sees in pre-norm "
                          "models without a final norm)"},
    )
    save_cache: Optional[str] = field(
        default=None,
        metadata={"help": "with --cache-size and without --knnlm: write every token's LM log-prob and cache log-prob "
                          "for each θ of --cache-thetas to this directory, for knnlm-sweep --cache-logs"},
    )
    cache_thetas: str = field(default="0.01,0.03,0.1,0.3,1", metadata={"help": "θ grid of --save-cache"})
    # owned by other groups: where the model came from (datastore provenance and checks)
    checkpoint_path: Optional[str] = II("common_eval.path")


@register_task("knn_eval", dataclass=KnnEvalConfig)
class KnnEvalTask(LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        if args.knnlm and args.save_dstore:
            raise DatastoreError("--knnlm and --save-dstore are separate runs; pass one of them")
        if (args.knnlm or args.save_dstore) and not args.dstore_dir:
            raise DatastoreError("--knnlm and --save-dstore need --dstore-dir DIR")
        if args.knnlm and not 0.0 <= args.lmbda < 1.0:
            # at λ=1 a target no neighbour predicts has probability 0, and eval-lm silently drops -inf scores
            raise DatastoreError(f"--lmbda must be in [0, 1), got {args.lmbda}: at 1 unretrieved targets get "
                                 f"probability 0")
        if args.save_retrieval and not args.knnlm:
            raise DatastoreError("--save-retrieval records what --knnlm retrieves; add --knnlm")
        if args.knnlm and args.knn_temp <= 0:
            raise DatastoreError(f"--knn-temp must be > 0, got {args.knn_temp}")
        if args.cache_size < 0 or args.cache_theta <= 0 or not 0.0 <= args.cache_lmbda < 1.0:
            raise DatastoreError(f"need --cache-size >= 0, --cache-theta > 0 and --cache-lmbda in [0, 1); got "
                                 f"{args.cache_size}, {args.cache_theta}, {args.cache_lmbda}")
        if args.save_cache and (args.knnlm or not args.cache_size):
            raise DatastoreError("--save-cache records the cache in a base-LM pass: pass --cache-size N and no --knnlm "
                                 "(knnlm-sweep --cache-logs combines it with a retrieval log)")
        if args.save_dstore and os.path.exists(os.path.join(args.dstore_dir, "manifest.json")):
            raise DatastoreError(f"{args.dstore_dir} already holds a datastore; pass a new --dstore-dir")
        self.knn_models = []
        self.num_shards = 1

    def _checkpoint(self):
        path = self.args.checkpoint_path
        if path is None or os.pathsep in path:
            raise DatastoreError("kNN-LM works with exactly one checkpoint in --path")
        return checkpoint_identity(path)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        # fairseq cannot memory-map an empty .bin and fails with a traceback far from the cause
        for data_path in self.args.data.split(os.pathsep):
            path = os.path.join(data_path, f"{split}.bin")
            if os.path.exists(path) and os.path.getsize(path) == 0:
                raise DatastoreError(f"split '{split}' is empty ({path} holds no tokens); check --gen-subset and the data")
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if not (self.args.knnlm or self.args.save_dstore or self.args.cache_size):
            return model
        key_type = str(self.args.knn_keytype)
        retriever = None
        if self.args.knnlm:
            retriever = open_retriever(
                self.args.dstore_dir, self.args.index_file, self.args.k, self.args.probe,
                exact=self.args.knn_dist == "exact", metric=None if self.args.knn_sim is None else str(self.args.knn_sim),
            )
            retriever.dstore.check_compatible(
                checkpoint_sha256=self._checkpoint()["sha256"],
                dictionary_sha256=dictionary_sha256(self.dictionary.symbols),
                key_type=key_type,
                dim=key_dim(model.decoder, key_type),
            )
            logger.info(
                f"kNN-LM: {retriever.dstore.count:,} entries, k={self.args.k}, lmbda={self.args.lmbda}, "
                f"T={self.args.knn_temp}, nprobe={self.args.probe}, {retriever.metric}, {self.args.knn_dist} distances"
            )
        wrapped = KnnLM(model, key_type, self.dictionary.pad(), len(self.dictionary), retriever,
                        self.args.lmbda, self.args.knn_temp)
        if self.args.cache_size:
            wrapped.enable_cache(str(self.args.cache_keytype), self.args.cache_size, self.args.cache_theta,
                                 self.args.cache_lmbda)
        self.knn_models.append(wrapped)
        return wrapped

    def eval_lm_dataloader(self, dataset, *args, context_window: int = 0, num_shards: int = 1, shard_id: int = 0,
                           **kwargs):
        # fairseq deals batches out round-robin, but the context window is carried from the previous batch of the
        # same process: shard i would see shard i-1's text as context. Every worker walks all batches instead
        # (collating is cheap) and scores a contiguous run, so shards in id order are the single-worker dump.
        itr = super().eval_lm_dataloader(dataset, *args, context_window=context_window, **kwargs)
        if num_shards > 1:
            if not self.args.save_dstore:
                raise DatastoreError(f"fairseq-eval-lm reports each of the {num_shards} workers' perplexity "
                                     f"separately; evaluate in one process (shard only --save-dstore)")
            itr = _BatchRange(itr, *shard_range(len(itr), shard_id, num_shards))
        if self.args.save_dstore:
            self._start_dump(self._split_of(dataset), context_window, num_shards, shard_id)
            writer = self.knn_models[0].writer
            if writer.skip:
                itr = _SkipWritten(itr, writer, self.dictionary.pad())
        if self.args.save_retrieval:
            self._start_retrieval_log(dataset)
        if self.args.save_cache:
            self._start_cache_log(dataset, context_window)
        return _ThenFinish(itr, self._finish)

    def _start_cache_log(self, dataset, context_window: int) -> None:
        model = self.knn_models[0]
        model.cache_thetas = [float(x) for x in str(self.args.cache_thetas).split(",")]
        model.cache_recorder = RetrievalLogWriter(self.args.save_cache, len(model.cache_thetas), {
            "split": self._split_of(dataset), "thetas": model.cache_thetas, "cache_size": self.args.cache_size,
            "cache_keytype": str(self.args.cache_keytype), "context_window": context_window,
            "checkpoint": self._checkpoint(),
        }, arrays=CACHE_ARRAYS, flag="--save-cache")

    def _start_dump(self, split: Optional[str], context_window: int, num_shards: int = 1, shard_id: int = 0) -> None:
        import torch

        if len(self.knn_models) != 1:
            raise DatastoreError("--save-dstore dumps exactly one model; pass one checkpoint in --path")
        model = self.knn_models[0]
        self.num_shards = num_shards
        path = self.args.dstore_dir if num_shards == 1 else os.path.join(self.args.dstore_dir,
                                                                         shard_name(shard_id, num_shards))
        meta = {
            "key_type": str(self.args.knn_keytype),
            "split": split,
            "data": os.path.abspath(self.args.data),
            "context_window": context_window,
            # fairseq-eval-lm subtracts the context window from --tokens-per-sample before the task sees it
            "tokens_per_sample": self.args.tokens_per_sample + context_window,
            "scored_tokens_per_block": self.args.tokens_per_sample,
            "sample_break_mode": str(self.args.sample_break_mode),
            "checkpoint": self._checkpoint(),
            "dictionary": {"size": len(self.dictionary), "sha256": dictionary_sha256(self.dictionary.symbols)},
            "versions": {"fairseq": fairseq_version, "torch": torch.__version__},
        }
        if num_shards > 1:
            meta["shard"] = {"id": shard_id, "of": num_shards}
        model.writer = DatastoreWriter(
            path, key_dim(model.decoder, str(self.args.knn_keytype)), len(self.dictionary), meta,
            key_dtype=str(self.args.dstore_key_dtype), commit_seconds=self.args.dstore_commit_seconds,
        )

    def _split_of(self, dataset) -> Optional[str]:
        return next((name for name, ds in self.datasets.items() if ds is dataset), None)

    def _start_retrieval_log(self, dataset) -> None:
        model = self.knn_models[0]
        r = model.retriever
        model.recorder = RetrievalLogWriter(self.args.save_retrieval, r.k, {
            "split": self._split_of(dataset), "metric": r.metric, "nprobe": self.args.probe,
            "dstore": {"path": os.path.abspath(r.dstore.path), "count": r.dstore.count,
                       "fingerprint": r.dstore.fingerprint},
            "index_file": self.args.index_file, "checkpoint": self._checkpoint(),
        })

    def _finish(self) -> None:
        for model in self.knn_models:
            if model.recorder is not None:
                model.recorder.close()
                model.recorder = None
            if model.cache_recorder is not None:
                model.cache_recorder.close()
                model.cache_recorder = None
            if model.writer is not None:
                model.writer.close()
                model.writer = None
                if self.num_shards > 1:
                    assemble_shards(self.args.dstore_dir, self.num_shards)
            if model.knn_queries:
                logger.info(
                    f"kNN retrieval: {model.knn_queries:,} queries in {model.knn_seconds:.1f}s "
                    f"({model.knn_queries / max(model.knn_seconds, 1e-9):,.0f} queries/s)"
                )


class _SkipWritten:
    """A resumed dump: drops batches whose scored tokens are all on disk already (the model never sees them)."""

    def __init__(self, itr, writer, pad: int):
        self.itr, self.writer, self.pad, self.skipped, self.logged = itr, writer, pad, 0, False

    def __len__(self):
        return len(self.itr)

    @property
    def n(self):
        return self.itr.n

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            sample = next(self.itr)
            scored = int(sample["target"].ne(self.pad).sum()) if sample else 0
            if 0 < scored <= self.writer.skip:
                self.writer.skip -= scored
                self.skipped += 1
                continue
            if self.skipped and not self.logged:
                logger.info(f"resumed: skipped {self.skipped} batches already in the datastore; the perplexity "
                            f"printed below covers only the rest")
                self.logged = True
            return sample


class _BatchRange:
    """Batches [start, stop) of an epoch iterator; the ones before are still drawn (and collated), never scored."""

    def __init__(self, itr, start: int, stop: int):
        self.itr, self.start, self.stop, self.pos = itr, start, stop, 0

    def __len__(self):
        return self.stop - self.start

    @property
    def n(self):
        return max(self.pos - self.start, 0)

    def __iter__(self):
        return self

    def __next__(self):
        while self.pos < self.start:
            next(self.itr)
            self.pos += 1
        if self.pos >= self.stop:
            raise StopIteration
        self.pos += 1
        return next(self.itr)


class _ThenFinish:
    """Delegates to an epoch iterator and calls `on_end` once it is exhausted (never on an error)."""

    def __init__(self, itr, on_end):
        self.itr, self.on_end, self.done = itr, on_end, False

    def __len__(self):
        return len(self.itr)

    @property
    def n(self):
        return self.itr.n

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.itr)
        except StopIteration:
            if not self.done:
                self.done = True
                self.on_end()
            raise


__all__ = ["KnnEvalConfig", "KnnEvalTask", "Datastore"]
