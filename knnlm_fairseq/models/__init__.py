from . import transformer_lm_archs  # noqa: F401  (registers architectures)
