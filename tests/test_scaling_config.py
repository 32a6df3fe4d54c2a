"""make scaling: the 10% model's config composes under the real fairseq-hydra-train and differs from wt2_small only
where it says why (the train subsets themselves: tests/test_subsets.py)."""
import os

import pytest
import yaml

from clis import ROOT, USER_DIR, run_cli

pytestmark = pytest.mark.slow  # starts fairseq CLIs

CONFIG = os.path.join(ROOT, "config")


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
