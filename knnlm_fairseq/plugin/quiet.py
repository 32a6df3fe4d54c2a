"""Quiet what drowns the plugin's few useful lines under the stock CLIs, and nothing of fairseq's own logging.

An eval-lm run printed ~45 lines before its first useful one: faiss's loader trying each instruction set at INFO and
DEBUG (its `ModuleNotFoundError ... avx512` reads like an error and is not one), Hydra's deprecation warnings from
fairseq 0.12's use of its 1.0 API, Hydra's DEBUG job lines, and two torch UserWarnings fairseq triggers on every
CPU run. Each is silenced by its exact message or logger; `LOGLEVEL=DEBUG` (fairseq's own switch) keeps them all.
"""
import logging
import os
import warnings

# (message regex) of warnings fairseq 0.12.3 triggers in Hydra 1.3 and torch 2.x, none actionable by a user
MESSAGES = (
    r"hydra\.experimental\.(initialize|compose)\(\) is no longer experimental",
    r"\s*The version_base parameter is not specified",
    r"In '.*': Usage of deprecated keyword in package header",
    r"\s*'.*' is validated against ConfigStore schema with the same name",
    r"\s*The strict flag in the compose API is deprecated",
    r"'pin_memory' argument is set as true but no accelerator is found",
    r"Support for mismatched key_padding_mask and attn_mask is deprecated",
)
LOGGERS = ("faiss.loader", "hydra")  # INFO/DEBUG chatter at import and config composition


def quiet() -> None:
    """Idempotent. Called where fairseq imports the plugin (--user-dir), never on a plain import of the package."""
    if os.environ.get("LOGLEVEL", "").upper() == "DEBUG":
        return
    for message in MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
