from .. import plugin
from ..plugin.quiet import quiet

quiet()  # before knn_eval imports faiss, whose loader logs every instruction set it tries
from . import knn_eval  # noqa: E402,F401  (registers the knn_eval task)

plugin.activate()
