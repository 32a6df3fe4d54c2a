"""WikiText-style tokenization, Gutenberg cleanup, splitting by document, OOV counts, and knnlm-prepare-text."""
import json
import os
import re
import subprocess
import sys

import pytest

from knnlm_fairseq.core.textprep import (KnnlmError, WikiTextTokenizer, count_oov, leading_paragraphs, load_dict_words,
                                         prepare, read_document, split_documents, strip_gutenberg, tokenize_document)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
WT2_TRAIN = os.path.join(SHARED, "data", "wikitext-2", "wiki.train.tokens")
BOOKS = os.path.join(SHARED, "data", "gutenberg-books")


@pytest.fixture(scope="module")
def tok():
    return WikiTextTokenizer()


@pytest.mark.parametrize("raw, expected", [
    # wiki.train.tokens: "A ship reported a pressure of 1 @,@ 000 @.@ 7 millibars ( 29 @.@ 55 inHg ) ."
    ("A ship reported a pressure of 1,000.7 millibars (29.55 inHg).",
     "A ship reported a pressure of 1 @,@ 000 @.@ 7 millibars ( 29 @.@ 55 inHg ) ."),
    ("a well-known 1,000.5-mile road", "a well @-@ known 1 @,@ 000 @.@ 5 @-@ mile road"),
    ("I don't know the company's plans.", "I don 't know the company 's plans ."),
    ("'and what is the use of a book,' thought Alice", "' and what is the use of a book , ' thought Alice"),
    ('"Yes," said he--and _The Times_ agreed.', '" Yes , " said he — and The Times agreed .'),
    ("Mr. Hood paid 3.5% (U.S.A.)", "Mr. Hood paid 3 @.@ 5 % ( U.S.A. )"),
])
def test_wikitext_conventions(tok, raw, expected):
    assert tok(raw) == expected


def _detokenize(line: str) -> str:
    """A raw form of a WikiText line (undo @x@ splits and spaces before punctuation)."""
    s = line.strip().replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = re.sub(r" ([,.;:)%])", r"\1", s).replace("( ", "(")
    return re.sub(r" ('s|'re|'ve|'m|'ll|'d|n't)\b", r"\1", s)


@pytest.mark.skipif(not os.path.exists(WT2_TRAIN), reason="needs ../shared/data/wikitext-2")
def test_reproduces_real_wikitext_lines(tok):
    """Real train lines with @,@ @.@ @-@ (no <unk>, quotes or other symbols), detokenized, come back identical."""
    picked = []
    with open(WT2_TRAIN, encoding="utf-8") as f:
        for line in f:
            body = line.strip()
            if (re.search("@[,.-]@", body) and "<unk>" not in body and not body.startswith("=")
                    and re.fullmatch(r"[A-Za-z0-9 ,.();:@'-]+", body) and " ' " not in body and " '" not in body):
                picked.append(body)
            if len(picked) == 300:
                break
    assert len(picked) == 300
    for mark in ("@,@", "@.@", "@-@"):
        assert sum(mark in p for p in picked) >= 30, mark
    same = sum(tok(_detokenize(p)) == p for p in picked)
    assert same >= 295, f"only {same}/300 real WikiText lines reproduced"


def test_gutenberg_boilerplate_and_encodings(tmp_path):
    body = "First paragraph\nwraps here.\n\nSecond one mentions the End of the world.\n"
    text = ("The Project Gutenberg EBook of X\nlicence blah\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n" +
            body * 3 + "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n")
    assert strip_gutenberg(text) == body * 3
    assert strip_gutenberg(body) == body  # no markers: unchanged
    early_end = "End of Project Gutenberg's X\n" + body * 5  # a marker in the first half is text, not a footer
    assert strip_gutenberg(early_end) == early_end
    assert strip_gutenberg("[Moby Dick by Herman Melville 1851]\n\nCall me Ishmael.\n") == "\nCall me Ishmael.\n"
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"Caf\xe9 one\r\nline two\r\n\r\nnext\r\n")  # Latin-1 byte and CRLF line ends
    assert read_document(str(crlf)) == "Café one\nline two\n\nnext\n"
    assert tokenize_document(read_document(str(crlf))) == ["Café one line two", "next"]


@pytest.mark.skipif(not os.path.isdir(BOOKS), reason="needs ../shared/data/gutenberg-books")
def test_real_books_cleanup():
    ball = read_document(os.path.join(BOOKS, "chesterton-ball.txt"))
    assert "Bruneti\u00e8re" in ball and "\r" not in read_document(os.path.join(BOOKS, "melville-moby_dick.txt"))
    kept = strip_gutenberg(ball)
    assert "PROJECT GUTENBERG" not in kept.upper() and "[The Ball and The Cross" not in kept
    assert kept.rstrip().endswith("pattern of a cross.") and len(kept) > 0.9 * len(ball) - 20000


def _folder(tmp_path, n_docs=6):
    src = tmp_path / "docs"
    src.mkdir(parents=True)
    for i in range(n_docs):  # every document has its own marker word so its lines can be traced
        paras = [f"doc{i}marker paragraph {j} says 1,000.5 well-known things." for j in range(3)]
        (src / f"d{i}.txt").write_text("\n\n".join(paras) + "\n")
    (src / "SOURCE.txt").write_text("where these came from\n")
    return src


def test_split_by_document_never_by_line(tmp_path):
    names = [f"d{i}" for i in range(10)]
    s = split_documents(names, valid_frac=0.2, test_frac=0.1, seed=3)
    assert sorted(s["dstore"] + s["valid"] + s["test"]) == sorted(names)
    assert (len(s["valid"]), len(s["test"]), len(s["dstore"])) == (2, 1, 7)
    assert s == split_documents(names, valid_frac=0.2, test_frac=0.1, seed=3)  # seeded
    assert split_documents(names, ["d4.txt"], ["d0"])["test"] == ["d0"]
    with pytest.raises(KnnlmError, match="both"):
        split_documents(names, ["d1"], ["d1"])
    with pytest.raises(KnnlmError, match="dstore part would hold no documents"):
        split_documents(["a", "b"], ["a"], ["b"])

    src = _folder(tmp_path)
    d = tmp_path / "dict.txt"
    d.write_text("paragraph 5\nsays 5\n1 3\n")
    info = prepare(str(src), str(d), str(tmp_path / "out"), ["d1"], ["d2", "d3"])
    assert "SOURCE" not in info["documents"]
    for part, docs in (("valid", ["d1"]), ("test", ["d2", "d3"]), ("dstore", ["d0", "d4", "d5"])):
        lines = (tmp_path / "out" / f"{part}.tokens").read_text().splitlines()
        owners = [re.search(r"doc(\d)marker", line).group(1) for line in lines]
        assert owners == [n[1] for n in docs for _ in range(3)]  # whole documents, in order, nothing else
        assert info["parts"][part]["documents"] == docs


def test_oov_counting(tmp_path):
    d = tmp_path / "dict.txt"
    d.write_text("the 10\n, 5\ncat 2\n<unk> 1\nmadeupword 1 #fairseq:overwrite\n")
    vocab = load_dict_words(str(d))
    assert vocab == {"the", ",", "cat", "<unk>", "madeupword"}
    n, oov, missing = count_oov(["the cat , the dog", "a dog"], vocab)
    assert (n, oov, dict(missing)) == (7, 3, {"dog": 2, "a": 1})


def _cli(*args):
    cmd = [sys.executable, "-m", "knnlm_fairseq.cli.prepare_text", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_end_to_end(tmp_path):
    src = _folder(tmp_path)
    d = tmp_path / "dict.txt"
    d.write_text("paragraph 5\nsays 5\nthings 2\n. 2\n")
    out = tmp_path / "out"
    rc, stdout, stderr = _cli(src, "--dict", d, "--out", out, "--valid-docs", "d1.txt", "--test-docs", "d2,d3")
    assert rc == 0, stderr
    assert stdout.strip().count("\n") == 0 and "dstore 3 docs" in stdout and "test 2 docs" in stdout
    prep = json.loads((out / "prep.json").read_text())
    v = prep["parts"]["valid"]
    # 3 paragraphs × 14 tokens: "doc1marker paragraph J says 1 @,@ 000 @.@ 5 well @-@ known things ."
    assert (v["documents"], v["paragraphs"], v["tokens"]) == (["d1"], 3, 42)
    assert v["oov"] == 42 - 3 * 4 and v["oov_rate"] == round(30 / 42, 5)
    assert (out / "test.tokens").read_text().splitlines()[0] == \
        "doc2marker paragraph 0 says 1 @,@ 000 @.@ 5 well @-@ known things ."



def test_cli_one_line_errors(tmp_path, capsys):
    """Bad inputs: exit 2, one line naming the problem, no traceback (in-process: each subprocess costs ~10 s)."""
    from knnlm_fairseq.cli.prepare_text import main

    src = _folder(tmp_path)
    d = tmp_path / "dict.txt"
    d.write_text("paragraph 5\n")
    out = tmp_path / "out"
    blank = _folder(tmp_path / "b")
    (blank / "d5.txt").write_text("\n\n   \n")
    empty = tmp_path / "empty"
    (empty / "SOURCE.txt").parent.mkdir()
    (empty / "SOURCE.txt").write_text("metadata only\n")
    for args, message in [
        ((empty, "--dict", d, "--out", out), "holds no .txt files"),
        ((tmp_path / "nodir", "--dict", d, "--out", out), "is not a directory"),
        ((src, "--dict", d, "--out", out, "--valid-docs", "nosuchbook"), "--valid-docs names 'nosuchbook'"),
        ((src, "--dict", d, "--out", out, "--valid-docs", "d0,d1,d2", "--test-docs", "d3", "d4", "d5"),
         "dstore part would hold no documents"),
        ((src, "--dict", tmp_path / "missing.txt", "--out", out), "dictionary"),
        ((blank, "--dict", d, "--out", out, "--valid-docs", "d1", "--test-docs", "d5"), "test part (d5) holds no text"),
    ]:
        rc = main([str(a) for a in args])
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("knnlm-prepare-text: error: ") and message in lines[0], lines
        assert captured.out == "" and not out.exists()


def test_leading_paragraphs_stop_at_the_first_whole_paragraph_past_the_budget():
    lines = ["a b c", "d e", "f g h i", "j"]
    assert leading_paragraphs(lines, 4) == lines[:2]  # 5 tokens: the paragraph that crosses 4 is kept
    assert leading_paragraphs(lines, 5) == lines[:2]
    assert leading_paragraphs(lines, 6) == lines[:3]
    assert leading_paragraphs(lines, 0) == lines == leading_paragraphs(lines, 100)
