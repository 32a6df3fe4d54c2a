"""Loading fairseq checkpoints under torch's safe (weights_only) unpickler, and naming them by hash.

torch >= 2.6 refuses any class not on its allow-list. Checkpoints written by fairseq before 0.10
(the published 2019 WikiText-103 models among them) pickle an argparse.Namespace of model args,
and older training loops left numpy scalars in optimizer/extra state. We allow exactly those
data-only classes; safe loading itself stays on, so a checkpoint that pickles code still fails.
"""
import argparse
import os
from typing import Dict

import numpy as np
import torch

from ..core.durable import sha256_file

_multiarray = np._core.multiarray  # numpy >= 2 (setup.py requires it); 1.x pickles name numpy.core, mapped below
_scalar = _multiarray.scalar
_reconstruct = _multiarray._reconstruct
LEGACY_SAFE_GLOBALS = [
    argparse.Namespace,
    np.ndarray,
    np.dtype,
    _scalar,
    _reconstruct,
    # pickles from numpy 1.x name the same functions under numpy.core
    (_scalar, "numpy.core.multiarray.scalar"),
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    *(type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)),
]


def allow_legacy_checkpoints() -> None:
    torch.serialization.add_safe_globals(LEGACY_SAFE_GLOBALS)


def checkpoint_identity(path: str) -> Dict:
    """Path, size and sha256 of a checkpoint file: what a datastore records about its model."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "sha256": sha256_file(path)}

