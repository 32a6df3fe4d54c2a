"""Components of the evaluation hot path (see base.py for the interface). Pure torch over the core: no fairseq."""
from .base import Batch, Component, Pipeline, Step  # noqa: F401
