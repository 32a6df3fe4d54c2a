"""What fairseq's CLIs need from us beyond registrations: legacy checkpoints under torch's safe loader, one-line
errors, and the `numpy.compat.long` alias fairseq 0.12.3 still reads (numpy_compat.py). `activate()` runs when
fairseq imports the plugin's tasks/ or models/ (--user-dir), never when a console script or a test imports the core.
"""


def activate() -> None:
    """Idempotent: allow the data-only classes of legacy fairseq checkpoints, print our errors as one line, give
    numpy >= 2 back the `np.compat.long` that fairseq 0.12.3 reads."""
    from . import numpy_compat
    from .checkpoints import allow_legacy_checkpoints
    from .errors import install_excepthook

    numpy_compat.install()
    allow_legacy_checkpoints()
    install_excepthook()
