from .. import plugin
from . import knn_eval  # noqa: F401  (registers the knn_eval task)

plugin.activate()
