"""knn_eval: language modeling whose models dump a datastore (--save-dstore) or score as kNN-LM (--knnlm).

Both run under stock fairseq-eval-lm, so keys are computed with exactly the blocks and context window that
evaluation scores, and every scored target lands in the datastore once. The task validates its flags, opens
the retriever, and builds the evaluation pipeline (components/) for the split being evaluated.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq import __version__ as fairseq_version
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask
from omegaconf import II

from ..components.base import Component, Pipeline
from ..components.cache import CacheMixer
from ..components.dump import DumpWriter
from ..components.gates import SignalGate
from ..components.knn import KnnMixer, KnnSearch
from ..components.progress import Progress
from ..components.recorders import CacheRecorder, RetrievalRecorder
from ..core.databin import split_sha256
from ..core.datastore import dictionary_sha256
from ..core.durable import write_json_atomic
from ..core.errors import KnnlmError
from ..core.keys import KEY_TYPES, key_dim
from ..core.retrieval_log import CACHE_ARRAYS, RetrievalLogWriter
from ..core.retriever import open_retriever
from ..core.shards import assemble_shards, shard_name, shard_range
from ..core.writer import DatastoreWriter
from ..models.knnlm import KnnLM
from ..plugin.checkpoints import checkpoint_identity
from ..plugin.config_checks import check_config, check_data, plugin_at_work
from ..plugin.iterators import BatchRange, FirstTokens, InTextOrder, SkipWritten, ThenFinish
from ..core.settings import apply_settings, check_settings_target

logger = logging.getLogger(__name__)


def floats(text: str) -> List[float]:
    return [float(x) for x in str(text).split(",") if x.strip()]


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
    lmbda: float = field(default=0.25, metadata={"help": "weight λ of p_kNN in the interpolation, in [0, 1)"})
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
    # speed: settings tuned offline (knnlm-sweep --write-settings), adaptive retrieval, threads, statistics
    knn_settings: Optional[str] = field(
        default=None,
        metadata={"help": "JSON written by knnlm-sweep --write-settings: k, λ, T, distances, probes and the gate "
                          "tuned on valid; refused for another datastore, checkpoint or index, and a flag that "
                          "contradicts it is refused"},
    )
    knn_gate_signal: Optional[ChoiceEnum(["entropy", "max_lp"])] = field(
        default=None,
        metadata={"help": "adaptive retrieval: per-token λ from this signal of the LM's confidence, bucketed at "
                          "--knn-gate-edges; tokens whose bucket λ is 0 skip the search"},
    )
    knn_gate_edges: str = field(default="", metadata={"help": "comma-separated increasing bucket edges of the signal"})
    knn_gate_lmbdas: str = field(default="", metadata={"help": "comma-separated λ per bucket (one more than edges)"})
    knn_mix: ChoiceEnum(["full", "target"]) = field(
        default="full",
        metadata={"help": "full: interpolate every word of each scored row (a distribution); target: only the target, "
                          "all fairseq-eval-lm reads (same perplexity and word probabilities, as the paper's code)"},
    )
    knn_threads: int = field(default=0, metadata={"help": "faiss search threads (0: faiss's default, all cores)"})
    knn_gpu: bool = field(default=False, metadata={"help": "search a copy of the index on the GPU (faiss-gpu)"})
    knn_backend: ChoiceEnum(["faiss", "torch"]) = field(
        default="faiss",
        metadata={"help": "faiss: search --index-file with faiss; torch: exact search in torch over the datastore's keys "
                          "held on --knn-device, a Flat index's neighbours (for GPUs without faiss-gpu; the index is not "
                          "read, only its sidecar's metric; --probe does not apply)"},
    )
    knn_torch_dtype: ChoiceEnum(["float16", "int8"]) = field(
        default="float16",
        metadata={"help": "keys as --knn-backend torch holds them: float16 (exact distances, 2 bytes a dim) or int8 "
                          "with a per-dimension scale (1 byte a dim; distances of the dequantized keys)"},
    )
    knn_device: ChoiceEnum(["auto", "cpu", "cuda"]) = field(
        default="auto",
        metadata={"help": "where --knn-backend torch holds the keys and searches: auto (cuda when torch sees a GPU, "
                          "whatever --cpu says, which the task cannot see; else cpu), cpu, or cuda (every visible GPU, "
                          "rows split among them)"},
    )
    dstore_in_memory: bool = field(
        default=False, metadata={"help": "read the keys into RAM instead of memory-mapping them (exact distances)"}
    )
    eval_tokens: int = field(
        default=0,
        metadata={"help": "score only the split's first blocks, up to the one that reaches this many tokens (0: all); "
                          "each keeps the context window it has in the full split"},
    )
    knn_stats: Optional[str] = field(
        default=None, metadata={"help": "write where the evaluation's time went (LM, search, mixing) to this JSON file"}
    )
    # owned by other groups: where the model came from (datastore provenance and checks)
    checkpoint_path: Optional[str] = II("common_eval.path")



@register_task("knn_eval", dataclass=KnnEvalConfig)
class KnnEvalTask(LanguageModelingTask):
    @classmethod
    def setup_task(cls, args, **kwargs):
        check_data(args)
        return super().setup_task(args, **kwargs)

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self.settings = apply_settings(args, KnnEvalConfig, args.knn_settings) if args.knn_settings else None
        check_config(args)
        self.knn_models: List[KnnLM] = []
        self.retriever = None
        self.num_shards = 1

    def _checkpoint(self):
        path = self.args.checkpoint_path
        if path is None or os.pathsep in path:
            raise KnnlmError("kNN-LM works with exactly one checkpoint in --path")
        return checkpoint_identity(path)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        # fairseq cannot memory-map an empty .bin and fails with a traceback far from the cause
        for data_path in self.args.data.split(os.pathsep):
            path = os.path.join(data_path, f"{split}.bin")
            if os.path.exists(path) and os.path.getsize(path) == 0:
                raise KnnlmError(f"split '{split}' is empty ({path} holds no tokens); check --gen-subset and the data")
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        a = self.args
        if not (a.knnlm or a.save_dstore or a.cache_size):
            return model
        key_dim(model.decoder, str(a.knn_keytype))  # an unknown key type or a too shallow model fails here
        if a.knnlm and self.retriever is None:  # opened (and checked) before any data is read
            self.retriever = open_retriever(a.dstore_dir, a.index_file, a.k, a.probe, exact=a.knn_dist == "exact",
                                            metric=None if a.knn_sim is None else str(a.knn_sim),
                                            in_memory=a.dstore_in_memory, gpu=a.knn_gpu, threads=a.knn_threads,
                                            backend=str(a.knn_backend), device=str(a.knn_device),
                                            key_dtype=str(a.knn_torch_dtype))
            self.retriever.dstore.check_compatible(
                checkpoint_sha256=self._checkpoint()["sha256"],
                dictionary_sha256=dictionary_sha256(self.dictionary.symbols),
                key_type=str(a.knn_keytype), dim=key_dim(model.decoder, str(a.knn_keytype)))
            if self.settings is not None:
                check_settings_target(self.settings, a.knn_settings, self.retriever.dstore.fingerprint,
                                      self._checkpoint()["sha256"], index_path=os.path.join(a.dstore_dir, a.index_file))
        wrapped = KnnLM(model, Pipeline(model.decoder, [], self.dictionary.pad()))
        self.knn_models.append(wrapped)
        return wrapped

    def build_generator(self, models, args, *rest, **kwargs):
        # fairseq-generate, fairseq-interactive and the hub (generate/sample/score) all ask for a generator right after
        # loading the model and before any generation; kNN-LM's pipeline exists only under fairseq-eval-lm, so a
        # generator would silently run the base LM
        if plugin_at_work(self.args):
            a = self.args
            flags = " ".join(f for f, on in (("--knnlm", a.knnlm), ("--save-dstore", a.save_dstore),
                                             ("--cache-size N", a.cache_size)) if on)
            raise KnnlmError(f"kNN-LM generation is not supported yet; score text with fairseq-eval-lm {flags}, or drop "
                             f"{flags} to generate with the base LM")
        return super().build_generator(models, args, *rest, **kwargs)

    def eval_lm_dataloader(self, dataset, *args, context_window: int = 0, num_shards: int = 1, shard_id: int = 0,
                           **kwargs):
        # fairseq deals batches out round-robin, but the context window is carried from the previous batch of the
        # same process: shard i would see shard i-1's text as context. Every worker walks all batches instead
        # (collating is cheap) and scores a contiguous run, so shards in id order are the single-worker dump.
        ordered = InTextOrder(dataset) if context_window == 0 and plugin_at_work(self.args) else dataset
        itr = super().eval_lm_dataloader(ordered, *args, context_window=context_window, **kwargs)
        if num_shards > 1:
            if not self.args.save_dstore:
                raise KnnlmError(f"fairseq-eval-lm reports each of the {num_shards} workers' perplexity "
                                 f"separately; evaluate in one process (shard only --save-dstore)")
            itr = BatchRange(itr, *shard_range(len(itr), shard_id, num_shards))
        self.num_shards = num_shards
        if self.knn_models:
            if len(self.knn_models) != 1:
                raise KnnlmError("kNN-LM works with exactly one checkpoint in --path")
            model = self.knn_models[0]
            model.pipeline.remove()
            model.pipeline = Pipeline(model.decoder, self._components(dataset, context_window, shard_id),
                                      self.dictionary.pad())
            if self.retriever is not None:  # logged here, where kNN-LM really runs (never under a generator)
                a = self.args
                target_only = any(getattr(c, "target_only", False) for c in model.pipeline.components)
                mixing = "targets only" if target_only else "every word"  # as built, not as asked
                logger.info(f"kNN-LM: {self.retriever.dstore.count:,} entries, k={a.k}, lmbda={a.lmbda}, "
                            f"T={a.knn_temp}, nprobe={a.probe}, {self.retriever.metric}, {a.knn_dist} distances, "
                            f"keys {'in RAM' if self.retriever.dstore.keys_in_memory else 'memory-mapped'}, "
                            f"{self.retriever.threads} search threads, mixing {mixing}")
        if self.args.eval_tokens:
            itr = FirstTokens(itr, self.args.eval_tokens, self.dictionary.pad())
        if self.args.save_dstore and self._writer.skip:
            itr = SkipWritten(itr, self._writer, self.dictionary.pad())
        return ThenFinish(itr, self._finish)

    def _components(self, dataset, context_window: int, shard_id: int) -> List[Component]:
        """The evaluation pipeline for this split, in the order the components run."""
        a, split = self.args, self._split_of(dataset)
        key_type = str(a.knn_keytype)
        what = "dump" if a.save_dstore else "kNN-LM" if a.knnlm else "cache"
        # tokens of the split (all shards): the rate and the time left, not an exact count of scored rows
        total = min(a.eval_tokens or int(dataset.sizes.sum()), int(dataset.sizes.sum())) // max(self.num_shards, 1)
        out: List[Component] = [Progress(f"{what} {split}", total)]
        if a.save_dstore:
            self._writer = self._dump_writer(split, context_window, shard_id)
            out.append(DumpWriter(self._writer, key_type))
        if a.knnlm:
            if a.knn_gate_signal:
                out.append(SignalGate(str(a.knn_gate_signal), floats(a.knn_gate_edges), floats(a.knn_gate_lmbdas)))
            out.append(KnnSearch(self.retriever, key_type, both_distances=bool(a.save_retrieval)))
            if a.save_retrieval:
                out.append(RetrievalRecorder(self._retrieval_log(split), key_type))
            out.append(KnnMixer(a.lmbda, a.knn_temp, str(a.knn_dist), target_only=str(a.knn_mix) == "target"))
        if a.cache_size:
            out.append(CacheMixer(str(a.cache_keytype), a.cache_size, a.cache_theta, a.cache_lmbda))
            if a.save_cache:
                thetas = floats(a.cache_thetas)
                out.append(CacheRecorder(self._cache_log(split, context_window, thetas), thetas))
        return out

    def _dump_writer(self, split: Optional[str], context_window: int, shard_id: int) -> DatastoreWriter:
        import torch

        a = self.args
        path = a.dstore_dir if self.num_shards == 1 else os.path.join(a.dstore_dir, shard_name(shard_id,
                                                                                                self.num_shards))
        meta = {
            "key_type": str(a.knn_keytype),
            "split": split,
            "data": os.path.abspath(a.data),
            "context_window": context_window,
            # fairseq-eval-lm subtracts the context window from --tokens-per-sample before the task sees it
            "tokens_per_sample": a.tokens_per_sample + context_window,
            "scored_tokens_per_block": a.tokens_per_sample,
            "sample_break_mode": str(a.sample_break_mode),
            # the bytes the entries came from: knnlm-inspect shows their contexts only from this very split
            "data_sha256": split_sha256(a.data, split) if os.pathsep not in a.data else None,
            "checkpoint": self._checkpoint(),
            "decoder_layers": len(self.knn_models[0].decoder.layers),  # reports describe the model by it
            "dictionary": {"size": len(self.dictionary), "sha256": dictionary_sha256(self.dictionary.symbols)},
            "versions": {"fairseq": fairseq_version, "torch": torch.__version__},
        }
        if self.num_shards > 1:
            meta["shard"] = {"id": shard_id, "of": self.num_shards}
        return DatastoreWriter(path, key_dim(self.knn_models[0].decoder, str(a.knn_keytype)), len(self.dictionary),
                               meta, key_dtype=str(a.dstore_key_dtype), commit_seconds=a.dstore_commit_seconds)

    def _retrieval_log(self, split: Optional[str]) -> RetrievalLogWriter:
        from ..core.index import index_identity, resolve_index_path

        r, a = self.retriever, self.args
        return RetrievalLogWriter(a.save_retrieval, r.k, {
            "split": split, "metric": r.metric, "nprobe": a.probe,
            "dstore": {"path": os.path.abspath(r.dstore.path), "count": r.dstore.count,
                       "fingerprint": r.dstore.fingerprint},
            # the searched index's identity (its sidecar's build-time sha256): knnlm-sweep --write-settings carries
            # it into the settings, and --knn-settings refuses them on any other index
            "index_file": a.index_file, "index": index_identity(resolve_index_path(a.dstore_dir, a.index_file)),
            "checkpoint": self._checkpoint(),
        }, dim=r.dstore.dim)

    def _cache_log(self, split: Optional[str], context_window: int, thetas) -> RetrievalLogWriter:
        a = self.args
        return RetrievalLogWriter(a.save_cache, len(thetas), {
            "split": split, "thetas": thetas, "cache_size": a.cache_size, "cache_keytype": str(a.cache_keytype),
            "context_window": context_window, "checkpoint": self._checkpoint(),
        }, arrays=CACHE_ARRAYS, flag="--save-cache")

    def _split_of(self, dataset) -> Optional[str]:
        return next((name for name, ds in self.datasets.items() if ds is dataset), None)

    def _finish(self) -> None:
        for model in self.knn_models:
            stats = model.pipeline.close()
            model.pipeline.components = []
            if self.args.save_dstore and self.num_shards > 1:
                assemble_shards(self.args.dstore_dir, self.num_shards)
            recorded = stats.get("RetrievalRecorder")
            if recorded and recorded["base_ppl"] is not None:
                a = self.args
                logger.info(f"recorded {recorded['rows']:,} tokens for knnlm-sweep at UNTUNED settings (k={a.k}, "
                            f"lmbda={a.lmbda}, T={a.knn_temp}): the perplexity below is not kNN-LM's best; base LM "
                            f"perplexity on these tokens {recorded['base_ppl']:.2f}; tune with knnlm-sweep "
                            f"{recorded['path']} --write-settings FILE")
            search = stats.get("KnnSearch")
            if search and search["searched"]:
                logger.info(f"kNN retrieval: {search['searched']:,} queries in {search['seconds']:.1f}s "
                            f"({search['queries_per_s']:,} queries/s)")
            if self.args.knn_stats:
                write_json_atomic(self.args.knn_stats, {"seconds": {k: round(v, 3) for k, v in model.seconds.items()},
                                                        "components": stats})
