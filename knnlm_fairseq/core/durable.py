"""Files that survive a crash: atomic JSON, fsync, streamed .npy arrays, checksums, a full disk as one line.

Every writer in the project commits the same way: data first (fsynced), then a small JSON record written to
a temporary name, fsynced and renamed over the old one. A reader that finds the record can trust what it names.
"""
import errno
import hashlib
import json
import os
from typing import BinaryIO, Dict, Optional, Tuple

import numpy as np

from .errors import KnnlmError

# .npy header room reserved up front: rows stream in before the final shape is known
NPY_HEADER_BYTES = 128
_BLOCK = 1 << 24  # 16 MiB reads: large enough for sequential disk speed, small enough to keep RAM flat


def hash_stream(f: BinaryIO, h=None, limit: Optional[int] = None):
    """Feed a file's bytes from its current position (at most `limit` of them) into a hash; returns the hash."""
    h = hashlib.sha256() if h is None else h
    left = limit
    while left is None or left > 0:
        block = f.read(_BLOCK if left is None else min(left, _BLOCK))
        if not block:
            break
        h.update(block)
        if left is not None:
            left -= len(block)
    return h


def sha256_file(path: str, skip: int = 0) -> str:
    """sha256 of a file's bytes after the first `skip` (e.g. an .npy header)."""
    with open(path, "rb") as f:
        f.seek(skip)
        return hash_stream(f).hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text_atomic(path: str, text: str) -> None:
    """write_json_atomic's commit for a file whose text the caller formats (e.g. JSON laid out its own way)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_json(path: str, what: str) -> Dict:
    """A committed JSON record, or a one-line error naming the file (`what`: how to make it again)."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise KnnlmError(f"{path} is not valid JSON ({e}); {what}") from None


def _npy_header(dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    body = repr(d).encode("latin1")
    prefix = np.lib.format.MAGIC_PREFIX + bytes([1, 0])
    pad = NPY_HEADER_BYTES - len(prefix) - 2 - len(body) - 1
    assert pad >= 0, "npy header does not fit the reserved bytes"
    body = body + b" " * pad + b"\n"
    return prefix + len(body).to_bytes(2, "little") + body


class StreamingNpy:
    """Appends rows to a .npy file whose header is written when the row count is known.

    resume_rows: reopen a file whose first rows are known good, drop anything after them and re-hash them.
    """

    def __init__(self, path: str, dtype: np.dtype, row_shape: Tuple[int, ...], resume_rows: Optional[int] = None):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), tuple(row_shape)
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.sha = hashlib.sha256()
        if resume_rows is None:
            self.rows = 0
            self.f = open(path, "wb")
            self.f.write(b"\0" * NPY_HEADER_BYTES)
            return
        good = NPY_HEADER_BYTES + resume_rows * self.row_bytes
        if not os.path.exists(path) or os.path.getsize(path) < good:
            raise KnnlmError(f"{path} is shorter than its progress record says; the unfinished dump is damaged, "
                             f"delete {os.path.dirname(path)} and dump again")
        self.f = open(path, "r+b")
        self.f.truncate(good)  # rows after the last commit may be partial: they are written again
        self.f.seek(NPY_HEADER_BYTES)
        hash_stream(self.f, self.sha, limit=good - NPY_HEADER_BYTES)
        self.rows = resume_rows

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        assert arr.shape[1:] == self.row_shape, f"row shape {arr.shape[1:]} != {self.row_shape}"
        buf = arr.tobytes()
        self.f.write(buf)
        self.sha.update(buf)
        self.rows += arr.shape[0]

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.sync()
        self.f.seek(0)
        self.f.write(_npy_header(self.dtype, (self.rows,) + self.row_shape))
        self.sync()
        self.f.close()


class disk_errors:
    """Turns a full disk into a one-line error that says what survived: `resume` names how to continue."""

    def __init__(self, path: str, resume: str):
        self.path, self.resume = path, resume

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise KnnlmError(f"no space left writing {self.path} ({err.strerror}); free disk space and "
                             f"{self.resume}") from None
        return False
