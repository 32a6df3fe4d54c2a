"""Raw text -> WikiText-style tokens, split by document, with OOV counts against a fairseq dictionary.

A model trained on WikiText only scores text tokenized the way WikiText was (Moses, then numbers and hyphens
split into `@,@`, `@.@`, `@-@`), so a new domain (e.g. Project Gutenberg books) is tokenized the same way here.
Held-out parts are whole documents: a book split by lines would put its own sentences, names and phrasing in
the datastore and the test set at once, which is exactly what domain adaptation must not measure.
Imports only sacremoses and numpy (no fairseq), so it is tested in milliseconds.
"""
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from sacremoses import MosesTokenizer

from .errors import KnnlmError

PARTS = ("dstore", "valid", "test")
METADATA_NAMES = ("SOURCE", "README", "LICENSE")  # notes that ship beside corpora (e.g. ../shared's SOURCE.txt)

# Project Gutenberg boilerplate. Modern etexts put the licence before "*** START OF ..." and after
# "*** END OF ..."; older ones (and NLTK's copies) end with "End of Project Gutenberg's ..." and the "small print".
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|^\s*\*END\*THE SMALL PRINT", re.I | re.M)
_PG_END = re.compile(r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|^\s*End of (the |this )?Project Gutenberg"
                     r"|^\s*\*END THE SMALL PRINT", re.I | re.M)
_NLTK_TITLE = re.compile(r"\A\s*\[[^\]\n]+\][ \t]*\n")  # NLTK's "[Moby Dick by Herman Melville 1851]" first line

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_DIGIT_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DASHES = re.compile(r"-{2,}")  # typewriter em dash ("--"); WikiText has the real "—"
_WS = re.compile(r"\s+")


def read_document(path: str) -> str:
    """A text file as str with '\\n' line ends: UTF-8 when it decodes, else cp1252/Latin-1 (old Gutenberg files)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:  # cp1252 leaves 5 bytes undefined; Latin-1 maps every byte
            text = raw.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/footer boilerplate where its markers are found; other text is unchanged.

    Markers are only honoured in the outer halves of the file, so a novel quoting them is not cut in the middle.
    """
    half = len(text) // 2
    starts = [m for m in _PG_START.finditer(text) if m.start() < half]
    if starts:
        nl = text.find("\n", starts[-1].start())
        text = "" if nl < 0 else text[nl + 1:]
        half = len(text) // 2
    ends = [m for m in _PG_END.finditer(text) if m.start() >= half]
    if ends:
        text = text[:ends[0].start()]
    return _NLTK_TITLE.sub("", text, count=1)


def paragraphs(text: str) -> List[str]:
    """Blank-line separated paragraphs, each joined into one line (Gutenberg wraps lines at ~70 characters)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = _WS.sub(" ", block).strip()
        if para:
            out.append(para)
    return out


class WikiTextTokenizer:
    """Moses (English, no escaping, `@-@` hyphens) plus WikiText's `@,@` / `@.@` inside numbers."""

    def __init__(self):
        self.moses = MosesTokenizer(lang="en")

    def __call__(self, text: str) -> str:
        text = _DASHES.sub(" — ", text.replace("_", " "))  # "_italics_" markers are not words
        text = _WS.sub(" ", text).strip()
        lead = ""
        if text.startswith("'"):  # Moses splits an opening quote only after a non-letter; a paragraph start has none
            lead, text = "' ", text[1:].lstrip()
        tokens = self.moses.tokenize(text, escape=False, aggressive_dash_splits=True, return_str=True)
        tokens = _DIGIT_POINT.sub(" @.@ ", _DIGIT_COMMA.sub(" @,@ ", tokens))
        return _WS.sub(" ", lead + tokens).strip()


def tokenize_document(text: str, tokenizer: Optional[WikiTextTokenizer] = None) -> List[str]:
    """Raw document -> tokenized paragraphs (one string of space-separated tokens each)."""
    tok = tokenizer or WikiTextTokenizer()
    return [t for t in (tok(p) for p in paragraphs(strip_gutenberg(text))) if t]


def list_documents(src_dir: str, exclude: Sequence[str] = METADATA_NAMES) -> Dict[str, str]:
    """{name: path} of the .txt files in src_dir (sorted; name = file name without .txt), minus `exclude` names."""
    if not os.path.isdir(src_dir):
        raise KnnlmError(f"{src_dir} is not a directory")
    skip = {n[:-4] if n.endswith(".txt") else n for n in exclude}
    docs = {f[:-4]: os.path.join(src_dir, f) for f in sorted(os.listdir(src_dir))
            if f.endswith(".txt") and f[:-4] not in skip and os.path.isfile(os.path.join(src_dir, f))}
    if not docs:
        raise KnnlmError(f"{src_dir} holds no .txt files (each .txt file is one document)")
    return docs


def _resolve(names: Sequence[str], docs: Iterable[str], flag: str) -> List[str]:
    docs = list(docs)
    out = []
    for n in names:
        key = n[:-4] if n.endswith(".txt") else n
        if key not in docs:
            raise KnnlmError(f"{flag} names '{n}', which is not a document here (documents: {', '.join(docs)})")
        if key not in out:
            out.append(key)
    return out


def split_documents(names: Sequence[str], valid_docs: Sequence[str] = (), test_docs: Sequence[str] = (),
                    valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 1) -> Dict[str, List[str]]:
    """Assign whole documents to dstore/valid/test.

    Named documents go where they are named; a part with no names gets round(frac · n_docs) documents (at least one
    when frac > 0) drawn with a seeded shuffle from the unnamed ones; the rest is the datastore.
    """
    names = list(names)
    valid = _resolve(valid_docs, names, "--valid-docs")
    test = _resolve(test_docs, names, "--test-docs")
    both = sorted(set(valid) & set(test))
    if both:
        raise KnnlmError(f"{', '.join(both)} named in both --valid-docs and --test-docs; a document goes to one part")
    free = [n for n in names if n not in valid and n not in test]
    order = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]

    def draw(frac: float) -> List[str]:
        n = 0 if frac <= 0 else max(1, int(round(frac * len(names))))
        picked = order[:n]
        del order[:n]
        return sorted(picked)

    if not valid:
        valid = draw(valid_frac)
    if not test:
        test = draw(test_frac)
    split = {"dstore": [n for n in names if n not in valid and n not in test], "valid": valid, "test": test}
    for part in PARTS:
        if not split[part]:
            raise KnnlmError(f"the {part} part would hold no documents ({len(names)} documents, "
                            f"valid {valid or '-'}, test {test or '-'}); name fewer held-out documents or add more")
    return split


def load_dict_words(path: str) -> set:
    """The words of a fairseq dict.txt ("word count" per line; fairseq's specials are added by fairseq itself)."""
    if not os.path.isfile(path):
        raise KnnlmError(f"dictionary {path} does not exist")
    words = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                words.add(line.rsplit(" ", 2)[0] if line.endswith("#fairseq:overwrite") else line.rsplit(" ", 1)[0])
    return words


def count_oov(lines: Iterable[str], vocab: set) -> Tuple[int, int, Counter]:
    """(tokens, tokens not in vocab, Counter of those words); tokens exclude the </s> fairseq adds per line."""
    n = oov = 0
    missing = Counter()
    for line in lines:
        for w in line.split():
            n += 1
            if w not in vocab:
                oov += 1
                missing[w] += 1
    return n, oov, missing


def leading_paragraphs(lines: Sequence[str], max_tokens: int) -> List[str]:
    """The first whole lines (paragraphs) holding at least max_tokens tokens; all of them if 0 or fewer exist."""
    kept, n = [], 0
    for line in lines:
        if max_tokens and n >= max_tokens:
            break
        kept.append(line)
        n += len(line.split())
    return kept


def prepare(src_dir: str, dict_path: str, out_dir: str, valid_docs: Sequence[str] = (), test_docs: Sequence[str] = (),
            valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 1,
            exclude: Sequence[str] = METADATA_NAMES) -> Dict:
    """Tokenize every document, write OUT/{dstore,valid,test}.tokens and return prep.json's content."""
    docs = list_documents(src_dir, exclude)
    vocab = load_dict_words(dict_path)
    split = split_documents(list(docs), valid_docs, test_docs, valid_frac, test_frac, seed)
    tok = WikiTextTokenizer()
    info = {"src_dir": os.path.abspath(src_dir), "dict": os.path.abspath(dict_path), "dict_words": len(vocab),
            "excluded": list(exclude), "seed": seed, "valid_frac": valid_frac, "test_frac": test_frac,
            "parts": {}, "documents": {}}
    texts = {}
    for part in PARTS:  # everything is checked before any file is written: a refused run leaves no partial output
        lines: List[str] = []
        for name in split[part]:
            raw = read_document(docs[name])
            doc_lines = tokenize_document(raw, tok)
            n, oov, _ = count_oov(doc_lines, vocab)
            info["documents"][name] = {"part": part, "raw_chars": len(raw), "paragraphs": len(doc_lines),
                                       "tokens": n, "oov": oov}
            lines += doc_lines
        n, oov, missing = count_oov(lines, vocab)
        if n == 0:
            raise KnnlmError(f"the {part} part ({', '.join(split[part])}) holds no text after tokenization")
        texts[part] = lines
        info["parts"][part] = {"documents": split[part], "paragraphs": len(lines), "tokens": n, "oov": oov,
                               "oov_rate": round(oov / n, 5), "top_oov": missing.most_common(15)}
    os.makedirs(out_dir, exist_ok=True)
    for part, lines in texts.items():
        with open(os.path.join(out_dir, f"{part}.tokens"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    return info
