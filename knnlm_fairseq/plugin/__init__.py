"""What fairseq's CLIs need from us beyond registrations: legacy checkpoints under torch's safe loader, and
one-line errors. `activate()` runs when fairseq imports the plugin's tasks/ or models/ (--user-dir), never when
a console script or a test imports the core.
"""


def activate() -> None:
    """Idempotent: allow the data-only classes of legacy fairseq checkpoints, print our errors as one line."""
    from .checkpoints import allow_legacy_checkpoints
    from .errors import install_excepthook

    allow_legacy_checkpoints()
    install_excepthook()
