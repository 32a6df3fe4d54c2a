"""--knn-settings FILE: the kNN-LM settings knnlm-sweep tuned on valid, applied to an evaluation run.

The file names what it was tuned for (datastore fingerprint, checkpoint sha256, the index's identity from its
sidecar, see core/index.py); evaluation refuses it for another datastore, model or index (an index rebuilt in
place with knnlm-build-index --force is another index). A file that names no index (written before knnlm-sweep
recorded one) is refused too, with how to write it again: nothing says which index it was tuned on. A flag given
on the command line that contradicts the file is refused rather than one of them silently winning.
"""
import json
import os
from dataclasses import MISSING, fields
from typing import Dict, Optional

from .errors import KnnlmError

FORMAT = "knnlm-settings/1"
# task flags a settings file may set (the file's "knnlm" object, by flag name with underscores)
TUNABLE = ("index_file", "k", "lmbda", "knn_temp", "knn_dist", "probe", "knn_gate_signal", "knn_gate_edges",
           "knn_gate_lmbdas")


def read_settings(path: str) -> Dict:
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise KnnlmError(f"--knn-settings {path} is not a readable settings file ({e}); write it with "
                         f"knnlm-sweep --write-settings") from None
    if settings.get("format") != FORMAT or not isinstance(settings.get("knnlm"), dict):
        raise KnnlmError(f"--knn-settings {path} is not a {FORMAT} file; write it with knnlm-sweep --write-settings")
    unknown = sorted(set(settings["knnlm"]) - set(TUNABLE))
    if unknown:
        raise KnnlmError(f"--knn-settings {path} sets {unknown}, which it may not; write it with knnlm-sweep")
    return settings


def apply_settings(args, config_class, path: str) -> Dict:
    """Set args from the file's tuned values; refuse a flag set on the command line to something else."""
    settings = read_settings(path)
    defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
    for name, value in settings["knnlm"].items():
        given = getattr(args, name)
        given = None if given is None else type(value)(given) if value is not None else given
        if given != value and given != defaults.get(name):
            flag = "--" + name.replace("_", "-")
            raise KnnlmError(f"{flag} {getattr(args, name)} contradicts {value} in --knn-settings {path}; drop the "
                             f"flag, or tune again")
        setattr(args, name, value)
    return settings


def _short(index_id: Optional[str]) -> str:
    kind, _, digest = (index_id or "").partition(":")
    return f"{kind} {digest[:12]}" if digest else "none"


def check_settings_target(settings: Dict, path: str, dstore_fingerprint: str, checkpoint_sha256: str,
                          index_path: Optional[str] = None) -> None:
    """Refuse settings tuned for another datastore, checkpoint or (when index_path is given: evaluation always gives
    it) another index than the one at index_path. The index check costs one stat and 2 MiB read (core/index.py)."""
    tuned = settings.get("tuned_for", {})
    if tuned.get("dstore_fingerprint") != dstore_fingerprint:
        raise KnnlmError(f"--knn-settings {path} was tuned for another datastore ({tuned.get('dstore_path')}); "
                         f"tune again with knnlm-sweep on a log of this one")
    if tuned.get("checkpoint_sha256") != checkpoint_sha256:
        raise KnnlmError(f"--knn-settings {path} was tuned with another checkpoint ({tuned.get('checkpoint_path')}); "
                         f"tune again with knnlm-sweep on a log of this model")
    if index_path is None:
        return
    from .index import index_identity  # index.py imports faiss: only when an index is checked

    here = index_identity(index_path)
    again = (f"re-run the recording pass (fairseq-eval-lm --knnlm --save-retrieval) on {index_path} and knnlm-sweep "
             f"--write-settings")
    if not tuned.get("index_id"):
        raise KnnlmError(f"--knn-settings {path} does not record which index it was tuned on (written before "
                         f"knnlm-sweep recorded one, or from a log without it); {again}")
    if tuned["index_id"] != here["id"]:
        raise KnnlmError(f"--knn-settings {path} was tuned on another index ({tuned.get('index_factory')}, "
                         f"{_short(tuned['index_id'])}) than {index_path} ({here['factory']}, {_short(here['id'])}), "
                         f"rebuilt or replaced since; {again}, or pass the index the settings were tuned on")


def settings_file(log, chosen: Dict) -> Dict:
    """The --knn-settings JSON for a setting chosen on a retrieval log (what it was tuned for, and the flags)."""
    meta = log.meta
    index = meta.get("index") or {}  # a log recorded before the index's identity was: no index_id (eval refuses)
    gate = chosen.get("gate")
    knnlm = {"index_file": meta.get("index_file", "index.faiss"), "k": chosen["k"], "knn_temp": chosen["temp"],
             "knn_dist": chosen["kind"], "probe": meta.get("nprobe", 32),
             "lmbda": chosen["lmbda"] if chosen["lmbda"] is not None else max(gate["lmbdas"]),
             "knn_gate_signal": gate["signal"] if gate else None,
             "knn_gate_edges": ",".join(repr(e) for e in gate["edges"]) if gate else "",
             "knn_gate_lmbdas": ",".join(repr(x) for x in gate["lmbdas"]) if gate else ""}
    return {
        "format": FORMAT,
        "tuned_for": {"dstore_fingerprint": meta["dstore"]["fingerprint"], "dstore_path": meta["dstore"]["path"],
                      "checkpoint_sha256": meta["checkpoint"]["sha256"], "checkpoint_path": meta["checkpoint"]["path"],
                      "index_id": index.get("id"), "index_path": index.get("path"), "index_factory": index.get("factory"),
                      "log": os.path.abspath(log.path), "split": meta.get("split"), "tokens": log.count},
        "tuned_ppl": chosen["ppl"], "searched": chosen["searched"], "summary": chosen["summary"],
        "knnlm": knnlm,
    }
