"""One-line errors under the stock CLIs: a DatastoreError reaching the top prints its message, not a traceback."""
import sys

from .datastore import DatastoreError


def _hook(kind, err, tb, _previous=sys.excepthook):
    if issubclass(kind, DatastoreError):
        print(f"knnlm_fairseq: error: {err}", file=sys.stderr)
        return
    _previous(kind, err, tb)


def install_excepthook() -> None:
    """fairseq-eval-lm exits 1 through the hook; the message names the problem and the fix."""
    if sys.excepthook is not _hook:
        sys.excepthook = _hook
