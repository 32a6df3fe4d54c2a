from .. import plugin
from . import transformer_lm_archs  # noqa: F401  (registers architectures)

plugin.activate()  # fairseq loads checkpoints right after importing --user-dir plugins
