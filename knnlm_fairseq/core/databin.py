"""Reading a fairseq-preprocess split (DATA/SPLIT.bin + .idx, the mmap format) as one token stream, without fairseq.

A datastore dumped over a split holds one row per scored token, in text order; the tokens around row i are the
text the entry came from. knnlm-inspect shows them, after checking that the split is the bytes the dump read.
"""
import os
import struct
from typing import List

import numpy as np

from .durable import sha256_file
from .errors import KnnlmError

_MAGIC = b"MMIDIDX\x00\x00"
# fairseq.data.indexed_dataset's dtype codes
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.double, 8: np.uint16}
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # what fairseq's Dictionary puts before the words of dict.txt


def split_paths(data: str, split: str):
    return os.path.join(data, f"{split}.bin"), os.path.join(data, f"{split}.idx")


def token_stream(data: str, split: str) -> np.ndarray:
    """Every token of the split in order (each line's words, then </s>), memory-mapped: (n,) int."""
    bin_path, idx_path = split_paths(data, split)
    if not (os.path.exists(bin_path) and os.path.exists(idx_path)):
        raise KnnlmError(f"no binarized split '{split}' in {data} ({os.path.basename(bin_path)}/.idx); binarize it "
                         f"with fairseq-preprocess")
    with open(idx_path, "rb") as f:
        if f.read(9) != _MAGIC or struct.unpack("<Q", f.read(8))[0] != 1:
            raise KnnlmError(f"{idx_path} is not a fairseq mmap index; binarize with fairseq-preprocess (the default "
                             f"--dataset-impl mmap)")
        dtype = _DTYPES[struct.unpack("<B", f.read(1))[0]]
    return np.memmap(bin_path, dtype=dtype, mode="r")


def split_sha256(data: str, split: str) -> str:
    """Identity of a binarized split: the sha256 of its token file."""
    return sha256_file(split_paths(data, split)[0])


def read_symbols(dict_path: str) -> List[str]:
    """fairseq's Dictionary symbols in id order: the four specials, then dict.txt's words."""
    words = []
    with open(dict_path, encoding="utf-8") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            if fields[-1] == "#fairseq:overwrite":
                fields = fields[:-1]
            if len(fields) >= 2:
                words.append(" ".join(fields[:-1]))  # "word count": the count is the last field
    return SPECIALS + words
