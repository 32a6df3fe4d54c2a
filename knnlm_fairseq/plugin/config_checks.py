"""Refusing flag combinations of the knn_eval task before anything runs: one line naming the fix."""
import os

from ..core.datastore import MANIFEST
from ..core.errors import KnnlmError


def plugin_at_work(a) -> bool:
    """Whether the run dumps, retrieves or caches (else knn_eval is stock language_modeling)."""
    return bool(a.knnlm or a.save_dstore or a.cache_size)


def check_config(a) -> None:
    if a.tokens_per_sample <= 0:
        # fairseq-eval-lm subtracts --context-window from --tokens-per-sample before the task exists; at 0 or below
        # fairseq ends in a ZeroDivisionError (or a negative-size ValueError) deep inside its block splitter
        raise KnnlmError(f"--context-window must be smaller than --tokens-per-sample (each block scores "
                         f"tokens-per-sample minus context-window new tokens; these leave {a.tokens_per_sample}); "
                         f"pass a smaller --context-window, e.g. the paper's --tokens-per-sample 3072 "
                         f"--context-window 2560")
    if plugin_at_work(a) and a.checkpoint_path and os.pathsep in a.checkpoint_path:
        # fairseq-eval-lm 0.12 would look for one file named "a.pt:b.pt" and fail with a traceback
        raise KnnlmError(f"--path names {len(a.checkpoint_path.split(os.pathsep))} checkpoints; kNN-LM scores with "
                         f"exactly one (fairseq-eval-lm does not ensemble): pass one checkpoint")
    if a.knnlm and a.save_dstore:
        raise KnnlmError("--knnlm and --save-dstore are separate runs; pass one of them")
    if (a.knnlm or a.save_dstore) and not a.dstore_dir:
        raise KnnlmError("--knnlm and --save-dstore need --dstore-dir DIR")
    if a.knnlm and not 0.0 <= a.lmbda < 1.0:
        # at λ=1 a target no neighbour predicts has probability 0, and eval-lm silently drops -inf scores
        raise KnnlmError(f"--lmbda must be in [0, 1), got {a.lmbda}: at 1 unretrieved targets get probability 0")
    if a.save_retrieval and not a.knnlm:
        raise KnnlmError("--save-retrieval records what --knnlm retrieves; add --knnlm")
    if a.knnlm and a.knn_temp <= 0:
        raise KnnlmError(f"--knn-temp must be > 0, got {a.knn_temp}")
    if a.cache_size < 0 or a.cache_theta <= 0 or not 0.0 <= a.cache_lmbda < 1.0:
        raise KnnlmError(f"need --cache-size >= 0, --cache-theta > 0 and --cache-lmbda in [0, 1); got "
                         f"{a.cache_size}, {a.cache_theta}, {a.cache_lmbda}")
    if a.save_cache and (a.knnlm or not a.cache_size):
        raise KnnlmError("--save-cache records the cache in a base-LM pass: pass --cache-size N and no --knnlm "
                         "(knnlm-sweep --cache-logs combines it with a retrieval log)")
    if a.eval_tokens < 0:
        raise KnnlmError(f"--eval-tokens must be >= 0 (0: the whole split), got {a.eval_tokens}")
    if a.eval_tokens and a.save_dstore:
        # a datastore over part of a split is made by binarizing that part: its manifest then says what it holds
        raise KnnlmError("--eval-tokens evaluates a prefix; to dump part of a text, binarize that part and dump it")
    if a.save_dstore and os.path.exists(os.path.join(a.dstore_dir, MANIFEST)):
        raise KnnlmError(f"{a.dstore_dir} already holds a datastore; pass a new --dstore-dir")


def check_data(a) -> None:
    """Before fairseq reads the dictionary: a --data directory without dict.txt would end in a traceback."""
    first = str(a.data).split(os.pathsep)[0]
    if not os.path.isfile(os.path.join(first, "dict.txt")):
        raise KnnlmError(f"{first} holds no dict.txt: pass the directory fairseq-preprocess wrote (its --destdir) "
                         f"as the data argument")
