"""WikiText by article (core/subsets.py): articles never cut, subsets close to the asked fraction, deterministic and
nested, leading prefixes by count, by tokens and by fraction, and a datastore's rows of a subset."""
import os

import numpy as np
import pytest

from clis import WT2_RAW
from knnlm_fairseq.core import subsets as S

WT2_TRAIN = os.path.join(WT2_RAW, "wiki.train.tokens")


def wiki(n_articles, rng):
    """WikiText-shaped lines: titled articles with sections, blank lines between paragraphs."""
    lines = [" \n"]
    for a in range(n_articles):
        lines += [f" = Article {a} = \n", " \n"]
        for s in range(rng.integers(1, 4)):
            lines += [f" = = Section {a}.{s} = = \n", " \n"]
            lines += [" ".join(f"w{a}_{j}" for j in range(rng.integers(5, 80))) + " \n", " \n"]
    return lines


def test_split_articles_keeps_sections_inside_and_loses_no_line():
    lines = wiki(7, np.random.default_rng(0))
    arts = S.split_articles(lines)
    assert len(arts) == 7
    assert sum(arts, []) == lines  # the opening blank line joins the first article
    assert all(S.TITLE.match(a[1 if i == 0 else 0].rstrip("\n")) for i, a in enumerate(arts))
    assert all(" = = Section" not in a[0] for a in arts)
    assert S.split_articles([" a b \n", " c \n"]) == [[" a b \n", " c \n"]]  # no title: one article


def test_subset_never_cuts_an_article_is_close_deterministic_and_nested(tmp_path):
    lines = wiki(200, np.random.default_rng(1))
    arts = S.split_articles(lines)
    biggest = max(S.n_tokens(a) for a in arts) / sum(S.n_tokens(a) for a in arts)
    chosen = {}
    for frac in (0.1, 0.25, 0.5):
        keep = S.article_subset(arts, frac, seed=3)
        info = S.write_articles(arts, keep, str(tmp_path / f"s{frac}.tokens"))
        sub = S.read_articles(str(tmp_path / f"s{frac}.tokens"))
        # whole articles only: every article of the subset is an article of the source, in file order
        idx = [arts.index(a) for a in sub]
        assert idx == keep == sorted(idx) and len(idx) == info["articles"]
        assert info["tokens"] == sum(S.n_tokens(arts[i]) for i in keep) and info["articles_total"] == 200
        assert abs(info["fraction"] - frac) <= biggest / 2 + 1e-4
        assert S.article_subset(arts, frac, seed=3) == idx  # deterministic
        chosen[frac] = set(idx)
    assert chosen[0.1] <= chosen[0.25] <= chosen[0.5]  # one seeded order: a larger datastore only adds entries
    assert S.article_subset(arts, 0.25, seed=4) != sorted(chosen[0.25])


def test_subset_rows_are_the_subsets_tokens_in_a_full_dump():
    lines = wiki(30, np.random.default_rng(2))
    arts = S.split_articles(lines)
    vocab = {}

    def ids(ls):  # what fairseq-preprocess makes of lines: words then </s> per line
        return [vocab.setdefault(w, len(vocab)) for line in ls for w in line.split() + ["</s>"]]

    stream = np.array(ids(lines))  # (n,): row i of a dump over the file is token i
    keep = S.article_subset(arts, 0.3, seed=1)
    rows = S.subset_rows(arts, keep)
    assert np.array_equal(stream[rows], ids([line for i in keep for line in arts[i]]))


def test_leading_articles_by_fraction_count_and_tokens():
    arts = [[" = A = \n"] + [" x \n"] * 9, [" = B = \n"] + [" x \n"] * 9, [" = C = \n"] + [" x \n"] * 19]
    assert S.leading_articles(arts, fraction=0.25) == [0]
    assert S.leading_articles(arts, fraction=0.5) == [0, 1]
    assert S.leading_articles(arts, fraction=0.01) == [0]  # never empty
    assert S.leading_articles(arts, count=2) == [0, 1]
    # a token budget keeps whole articles until it is reached: one token over the first article's needs a second
    first = S.n_tokens(arts[0])
    assert S.leading_articles(arts, min_tokens=first) == [0]
    assert S.leading_articles(arts, min_tokens=first + 1) == [0, 1]
    with pytest.raises(AssertionError):
        S.leading_articles(arts, count=1, fraction=0.5)


@pytest.mark.skipif(not os.path.exists(WT2_TRAIN), reason="needs ../shared/data/wikitext-2")
def test_wikitext2_train_subsets_are_close_to_the_target():
    arts = S.read_articles(WT2_TRAIN)
    assert len(arts) == 629 and S.n_tokens(sum(arts, [])) == 2_088_628  # the binarized train's length
    for frac in (0.1, 0.25, 0.5):
        keep = S.article_subset(arts, frac)
        got = sum(S.n_tokens(arts[i]) for i in keep) / 2_088_628
        assert abs(got - frac) < 0.01, (frac, got)
