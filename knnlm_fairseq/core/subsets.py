"""WikiText by article: split a token file into articles, pick subsets or leading prefixes, find their rows.

A subset of whole articles never cuts a document in two, so a datastore over it holds whole documents, and
the rows of a datastore dumped over the whole file that belong to those articles are the rows a dump of the
subset would hold (row i of a dump is token i of the file). Pure Python and numpy: tested in milliseconds.
"""
import os
import random
import re
from typing import Dict, List, Optional, Sequence

import numpy as np

# " = Title = " starts an article; " = = Section = = " (a second "=") does not
TITLE = re.compile(r"^ = [^=].* = $")


def split_articles(lines: Sequence[str]) -> List[List[str]]:
    """Lines -> articles, each from its title line up to the next title; lines before the first title join it."""
    articles: List[List[str]] = []
    lead: List[str] = []
    for line in lines:
        if TITLE.match(line.rstrip("\n")):
            articles.append(lead + [line])
            lead = []
        elif articles:
            articles[-1].append(line)
        else:
            lead.append(line)  # WikiText files open with a blank line
    if lead:  # no title at all: one article
        articles.append(lead)
    return articles


def read_articles(path: str) -> List[List[str]]:
    with open(path, encoding="utf-8") as f:
        return split_articles(f.readlines())


def n_tokens(lines: Sequence[str]) -> int:
    """Tokens fairseq-preprocess makes of these lines: the words plus one </s> per line (blank lines included)."""
    return sum(len(line.split()) + 1 for line in lines)


def article_subset(articles: Sequence[Sequence[str]], fraction: float, seed: int = 1) -> List[int]:
    """Indexes (in file order) of whole articles holding about `fraction` of the tokens.

    Articles are taken in one seeded random order until the total is closest to the target, so subsets with the
    same seed are nested (10% within 25% within 50%): a larger datastore only adds entries.
    """
    assert 0 < fraction <= 1, "fraction must be in (0, 1]"
    sizes = [n_tokens(a) for a in articles]
    target = fraction * sum(sizes)
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= target or abs(total + sizes[i] - target) > abs(total - target):
            break
        chosen.append(i)
        total += sizes[i]
    return sorted(chosen)


def leading_articles(articles: Sequence[Sequence[str]], count: Optional[int] = None, min_tokens: Optional[int] = None,
                     fraction: Optional[float] = None) -> List[int]:
    """Indexes of the first whole articles: `count` of them, as many as reach `min_tokens`, or (`fraction`) the
    number whose tokens come closest to that fraction of the file's (at least one)."""
    assert [count, min_tokens, fraction].count(None) == 2, "give one of count, min_tokens, fraction"
    sizes = [n_tokens(a) for a in articles]
    target = None if fraction is None else fraction * sum(sizes)
    keep, total = [], 0
    for i, size in enumerate(sizes):
        if count is not None and len(keep) >= count or min_tokens is not None and total >= min_tokens:
            break
        if target is not None and keep and abs(total + size - target) > abs(total - target):
            break
        keep.append(i)
        total += size
    return keep


def write_articles(articles: Sequence[Sequence[str]], keep: Sequence[int], path: str) -> Dict:
    """Write the articles numbered in `keep`, in that order, to path; return what was kept of the whole."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lines = [line for i in keep for line in articles[i]]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    tokens, total = n_tokens(lines), sum(n_tokens(a) for a in articles)
    return {"articles": len(keep), "articles_total": len(articles), "lines": len(lines), "tokens": tokens,
            "tokens_total": total, "fraction": round(tokens / total, 4)}


def subset_rows(articles: Sequence[Sequence[str]], keep: Sequence[int]) -> np.ndarray:
    """Rows of a datastore dumped over the whole file that belong to the kept articles (row i = token i)."""
    starts = np.cumsum([0] + [n_tokens(a) for a in articles])  # (A + 1,) token offset of each article
    return np.concatenate([np.arange(starts[i], starts[i + 1]) for i in keep])  # (kept tokens,)
