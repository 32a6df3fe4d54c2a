"""kNN-LM as a fairseq --user-dir plugin: architectures, the knn_eval task, checkpoint loading."""
from . import checkpoints, models, tasks  # noqa: F401  (imported for their registrations)
