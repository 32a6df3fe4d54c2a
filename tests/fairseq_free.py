"""Load knn.py, datastore.py and index.py without running knnlm_fairseq/__init__.py (which imports fairseq).

The three files are imported as submodules of a synthetic package, `knnlm_core`, whose __path__ is the
knnlm_fairseq directory: their relative imports (`from .datastore import ...`) resolve inside it, and the
real package's __init__ never executes. Classes loaded this way are distinct from `knnlm_fairseq.*`'s
(e.g. two DatastoreError types), so unit tests use only this loader.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

PKG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "knnlm_fairseq")
ALIAS = "knnlm_core"
CORE = ("knn", "datastore", "index", "retrieval_log", "sweep", "shards", "cache")


def _package() -> types.ModuleType:
    pkg = sys.modules.get(ALIAS)
    if pkg is None:
        spec = importlib.machinery.ModuleSpec(ALIAS, None, is_package=True)
        spec.submodule_search_locations = [PKG_DIR]
        pkg = importlib.util.module_from_spec(spec)  # an empty package: no __init__ code runs
        pkg.__path__ = [PKG_DIR]
        sys.modules[ALIAS] = pkg
    return pkg


def load(name: str) -> types.ModuleType:
    """One of the fairseq-free core modules (CORE)."""
    assert name in CORE, f"{name} is not a fairseq-free core module; use one of {CORE}"
    _package()
    return importlib.import_module(f"{ALIAS}.{name}")
