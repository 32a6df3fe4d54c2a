"""make scaling: the 10% model's config composes under the real fairseq-hydra-train and differs from wt2_small only
where it says why; train subsets are whole articles, close to the asked fraction, deterministic and nested."""
import os
import sys

import numpy as np
import pytest
import yaml

from clis import ROOT, SHARED, USER_DIR, run_cli

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import scaling  # noqa: E402

CONFIG = os.path.join(ROOT, "config")
WT2_TRAIN = os.path.join(SHARED, "data", "wikitext-2", "wiki.train.tokens")


def compose(name, *overrides):
    """The job config fairseq-hydra-train would run (hydra's --cfg job prints it and exits)."""
    out = run_cli("fairseq-hydra-train", "--config-dir", CONFIG, "--config-name", name, "task.data=/nowhere",
                  f"common.user_dir={USER_DIR}", *overrides, "--cfg", "job").stdout
    return yaml.safe_load(out[out.index("_name") - 2 if out.startswith("#") else 0:])


def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# what the 10% config changes, each for a reason its yaml comment gives
DEVIATIONS = {
    "common.log_interval": 25,
    "checkpoint.save_dir": "checkpoints/wt2-small-10pct",
    "dataset.max_tokens": 4096,
    "dataset.max_valid_steps": 10,
    "optimization.max_epoch": 10,
    "optimization.stop_time_hours": 0.35,
    "lr_scheduler.warmup_updates": 100,
    "model.dropout": 0.3,
}


@pytest.fixture(scope="module")
def configs():
    return flatten(compose("wt2_small")), flatten(compose("wt2_small_10pct"))


def test_10pct_config_is_wt2_small_with_commented_deviations(configs):
    small, tenth = configs
    assert tenth["model._name"] == "knnlm_wt2_small"  # same architecture, so the same dictionary and key size
    for key, value in DEVIATIONS.items():
        assert tenth[key] == pytest.approx(value) if isinstance(value, float) else tenth[key] == value, key
    differ = {k for k in set(small) | set(tenth) if small.get(k) != tenth.get(k)}
    # max_tokens_valid follows max_tokens by interpolation; everything else must be listed above
    assert differ - {"dataset.max_tokens_valid"} == set(DEVIATIONS)
    for key in ("task.tokens_per_sample", "optimization.lr", "optimization.clip_norm", "optimizer.adam_betas",
                "optimizer.weight_decay", "criterion._name", "distributed_training.ddp_backend", "common.seed",
                "model.attention_dropout", "model.activation_dropout", "lr_scheduler._name"):
        assert tenth[key] == small[key], key
    # each deviation's yaml line (or the comment block right above it) says why
    lines = open(os.path.join(CONFIG, "wt2_small_10pct.yaml")).read().splitlines()
    for key in DEVIATIONS:
        leaf = key.split(".")[-1]
        i = next(n for n, line in enumerate(lines) if line.strip().startswith(f"{leaf}:"))
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"{key} has no comment giving its reason"


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
    arts = scaling.split_articles(lines)
    assert len(arts) == 7
    assert sum(arts, []) == lines
    assert all(scaling._TITLE.match(a[1 if i == 0 else 0].rstrip("\n")) for i, a in enumerate(arts))
    assert all(" = = Section" not in a[0] for a in arts)


def test_subset_never_cuts_an_article_is_close_deterministic_and_nested(tmp_path):
    lines = wiki(200, np.random.default_rng(1))
    src = tmp_path / "train.tokens"
    src.write_text("".join(lines))
    arts = scaling.split_articles(lines)
    biggest = max(scaling.n_tokens(a) for a in arts) / sum(scaling.n_tokens(a) for a in arts)
    chosen = {}
    for frac in (0.1, 0.25, 0.5):
        info = scaling.write_subset(str(src), str(tmp_path / f"s{frac}.tokens"), frac, seed=3)
        sub = scaling.split_articles(open(tmp_path / f"s{frac}.tokens").readlines())
        # whole articles only: every article of the subset is an article of the source, in file order
        idx = [arts.index(a) for a in sub]
        assert idx == sorted(idx) and len(idx) == info["articles"]
        assert abs(info["fraction"] - frac) <= biggest / 2 + 1e-9
        assert scaling.article_subset(arts, frac, seed=3) == idx  # deterministic
        chosen[frac] = set(idx)
    assert chosen[0.1] <= chosen[0.25] <= chosen[0.5]  # one seeded order: a larger datastore only adds entries
    assert scaling.article_subset(arts, 0.25, seed=4) != sorted(chosen[0.25])


def test_subset_rows_are_the_subsets_tokens_in_a_full_dump():
    lines = wiki(30, np.random.default_rng(2))
    arts = scaling.split_articles(lines)
    vocab = {}

    def ids(ls):  # what fairseq-preprocess makes of lines: words then </s> per line
        return [vocab.setdefault(w, len(vocab)) for line in ls for w in line.split() + ["</s>"]]

    stream = np.array(ids(lines))  # (n,): row i of a dump over the file is token i
    keep = scaling.article_subset(arts, 0.3, seed=1)
    rows = scaling.subset_rows(arts, keep)
    assert np.array_equal(stream[rows], ids([line for i in keep for line in arts[i]]))


def test_prefix_articles_takes_the_first_whole_articles():
    arts = [[" = A = \n"] + [" x \n"] * 9, [" = B = \n"] + [" x \n"] * 9, [" = C = \n"] + [" x \n"] * 19]
    assert scaling.prefix_articles(arts, 0.25) == [0]
    assert scaling.prefix_articles(arts, 0.5) == [0, 1]
    assert scaling.prefix_articles(arts, 0.01) == [0]  # never empty


@pytest.mark.skipif(not os.path.exists(WT2_TRAIN), reason="needs ../shared/data/wikitext-2")
def test_wikitext2_train_subsets_are_close_to_the_target():
    arts = scaling.split_articles(open(WT2_TRAIN).readlines())
    assert len(arts) == 629 and scaling.n_tokens(sum(arts, [])) == 2_088_628  # the binarized train's length
    for frac in (0.1, 0.25, 0.5):
        keep = scaling.article_subset(arts, frac)
        got = sum(scaling.n_tokens(arts[i]) for i in keep) / 2_088_628
        assert abs(got - frac) < 0.01, (frac, got)


def test_slice_datastore_keeps_rows_and_provenance(tmp_path):
    from knnlm_fairseq.core.datastore import Datastore
    from knnlm_fairseq.core.writer import DatastoreWriter

    rng = np.random.default_rng(0)
    keys, vals = rng.standard_normal((500, 8)).astype(np.float16), rng.integers(0, 50, 500)
    w = DatastoreWriter(str(tmp_path / "full"), 8, 50, {"key_type": "last_ffn_input", "split": "train",
                                                        "checkpoint": {"sha256": "abc", "path": "m.pt"}})
    w.add(keys, vals)
    w.close()
    rows = np.r_[10:50, 300:420]
    scaling.slice_datastore(str(tmp_path / "full"), str(tmp_path / "part"), rows, {"subset_percent": 10}, chunk=64)
    part = Datastore.open(str(tmp_path / "part"))
    part.verify()
    assert np.array_equal(part.keys, keys[rows]) and np.array_equal(part.vals, vals[rows])
    assert part.manifest["checkpoint"]["sha256"] == "abc"  # eval-lm's compatibility check still applies
    assert part.manifest["sliced_from"]["count"] == 500 and part.count == len(rows)
