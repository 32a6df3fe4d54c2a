"""Datastore rows -> the text they came from (core/contexts.py, core/databin.py) against the raw text itself, and
the refusals that keep a context from the wrong text off the screen."""
import os
import shutil

import numpy as np
import pytest

from clis import run_cli
from knnlm_fairseq.core.contexts import SourceText
from knnlm_fairseq.core.databin import read_symbols, split_sha256, token_stream
from knnlm_fairseq.core.datastore import Datastore
from knnlm_fairseq.core.errors import KnnlmError
from knnlm_fairseq.core.shards import merge
from knnlm_fairseq.core.writer import DatastoreWriter

pytestmark = pytest.mark.slow  # fairseq-preprocess


def corpus(seed: int, n: int):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{rng.integers(40)}" for _ in range(rng.integers(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctx")
    for name, seed in (("a", 0), ("b", 1)):
        (root / f"{name}.txt").write_text("\n".join(corpus(seed, 30)) + "\n")
    run_cli("fairseq-preprocess", "--only-source", "--trainpref", root / "a.txt", "--validpref", root / "b.txt",
            "--destdir", root / "bin", "--workers", "1")
    return root


def words_of(path):
    """Our own replay of the binarized stream: each line's words, then </s>."""
    return [w for line in open(path) for w in line.split() + ["</s>"]]


def dump_like(texts, split: str, name: str, sha: bool = True) -> str:
    """A datastore whose rows are the split's tokens in order (what --save-dstore writes), with random keys."""
    data = str(texts / "bin")
    stream = np.asarray(token_stream(data, split))
    w = DatastoreWriter(str(texts / name), 4, len(read_symbols(os.path.join(data, "dict.txt"))),
                        {"key_type": "last_ffn_input", "split": split, "data": data,
                         "data_sha256": split_sha256(data, split) if sha else None,
                         "checkpoint": {"sha256": "c"}, "dictionary": {"sha256": "d", "size": 0}})
    w.add(np.random.default_rng(0).normal(size=(len(stream), 4)), stream)
    w.close()
    return str(texts / name)


def test_every_context_is_the_source_text(texts):
    path = dump_like(texts, "train", "dtrain")
    symbols = read_symbols(str(texts / "bin" / "dict.txt"))
    raw = words_of(texts / "a.txt")
    src = SourceText(Datastore.open(path))
    assert len(raw) == Datastore.open(path).count
    for row in (0, 1, 7, len(raw) // 2, len(raw) - 1):
        ctx, at = src.context(row, 5, 3)
        assert [symbols[i] for i in ctx] == raw[max(0, row - 5) : row + 4]  # the raw text around the entry
        assert symbols[ctx[at]] == raw[row]  # the entry's value is the word it predicted, at the stated place


def test_merged_datastores_find_each_parts_text(texts):
    a, b = dump_like(texts, "train", "ma"), dump_like(texts, "valid", "mb")
    merge(str(texts / "merged"), [a, b])
    src = SourceText(Datastore.open(str(texts / "merged")))
    symbols = read_symbols(str(texts / "bin" / "dict.txt"))
    raw_a, raw_b = words_of(texts / "a.txt"), words_of(texts / "b.txt")
    ctx, at = src.context(len(raw_a) + 3, 2, 2)  # row 3 of the second part: valid's token 3
    assert [symbols[i] for i in ctx] == raw_b[1:6] and at == 2
    ctx, at = src.context(len(raw_a) - 1, 2, 2)  # the first part's last row: its text ends there
    assert [symbols[i] for i in ctx] == raw_a[-3:] and at == 2


def test_changed_or_moved_text_is_refused(texts, tmp_path):
    shutil.copytree(texts / "bin", tmp_path / "bin")
    moved = dict(texts=tmp_path)
    path = dump_like(moved["texts"], "train", "d")
    binfile = tmp_path / "bin" / "train.bin"
    data = bytearray(binfile.read_bytes())
    data[-4:] = data[:4]  # another token at the end: same size
    binfile.write_bytes(bytes(data))
    with pytest.raises(KnnlmError, match="changed since datastore .* was dumped from it"):
        SourceText(Datastore.open(path))
    os.remove(binfile)
    with pytest.raises(KnnlmError, match="which is gone"):
        SourceText(Datastore.open(path))


def test_without_a_recorded_sha_the_values_must_be_the_text(texts, tmp_path):
    """Older manifests carry no sha256: the text is still checked token by token against the values."""
    shutil.copytree(texts / "bin", tmp_path / "bin")
    path = dump_like(tmp_path, "train", "d", sha=False)
    SourceText(Datastore.open(path))  # the same text: fine
    shutil.copy(tmp_path / "bin" / "valid.bin", tmp_path / "bin" / "train.bin")
    shutil.copy(tmp_path / "bin" / "valid.idx", tmp_path / "bin" / "train.idx")
    with pytest.raises(KnnlmError, match="is not the text datastore .* was dumped from"):
        SourceText(Datastore.open(path))
