"""A 2019-style checkpoint (model args as an argparse.Namespace, numpy scalars in its state) loads
under torch 2.13's safe unpickler once the plugin is imported, and scores exactly like the original."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from clis import USER_DIR, WT2_CKPT, binarize_wt2_slice, loss_and_ppl, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.path.exists(WT2_CKPT), reason="../shared/models/wt2-small is not present")]

GROUPS_FLAT = ("common", "common_eval", "distributed_training", "dataset", "optimization", "checkpoint")
GROUPS_NAMED = {"task": "task", "model": "arch", "criterion": "criterion", "optimizer": "optimizer",
                "lr_scheduler": "lr_scheduler"}


def make_legacy(src: str, dst: str) -> None:
    """Rewrite a fairseq >= 0.10 checkpoint the way fairseq 0.9 stored it: flat args, no cfg."""
    state = torch.load(src, map_location="cpu", weights_only=False)
    cfg = state.pop("cfg")
    args = argparse.Namespace()
    for group in GROUPS_FLAT:
        for k, v in (cfg.get(group) or {}).items():
            if k != "_name":
                setattr(args, k, v)
    for group, name_attr in GROUPS_NAMED.items():
        node = cfg.get(group) or {}
        for k, v in node.items():
            if k != "_name":
                setattr(args, k, v)
        if node.get("_name"):
            setattr(args, name_attr, node["_name"])
    state["args"] = args
    # old training loops left numpy scalars behind
    state["extra_state"] = dict(state.get("extra_state") or {}, best=np.float64(5.25), val_loss=np.float32(5.3))
    torch.save(state, dst)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    data = binarize_wt2_slice(str(root / "wt2"), train_lines=40, valid_lines=60)
    path = str(root / "legacy.pt")
    make_legacy(WT2_CKPT, path)
    return data, path


def test_is_really_legacy(legacy):
    _, path = legacy
    # a fresh interpreter: this process may already hold the plugin's allow-list
    probe = subprocess.run([sys.executable, "-c", "import sys, torch.serialization as s; "
                            "print(s.get_unsafe_globals_in_checkpoint(sys.argv[1]))", path],
                           capture_output=True, text=True, check=True)
    assert "argparse.Namespace" in probe.stdout
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert "cfg" not in state and isinstance(state["args"], argparse.Namespace)


def test_stock_fairseq_refuses_it_under_safe_loading(legacy):
    data, path = legacy
    proc = run_cli("fairseq-eval-lm", data, "--path", path, "--gen-subset", "valid", "--cpu", check=False)
    assert proc.returncode != 0 and "weights_only" in proc.output


def test_plugin_loads_it_and_scores_like_the_original(legacy):
    data, path = legacy
    common = [data, "--gen-subset", "valid", "--tokens-per-sample", "512", "--context-window", "128", "--cpu"]
    new = run_cli("fairseq-eval-lm", *common, "--path", WT2_CKPT)
    old = run_cli("fairseq-eval-lm", *common, "--path", path, "--user-dir", USER_DIR)
    assert loss_and_ppl(old.output) == loss_and_ppl(new.output)


def test_safe_loading_stays_on(tmp_path):
    """The allow-list admits data-only classes, not arbitrary code."""
    from knnlm_fairseq.plugin.checkpoints import allow_legacy_checkpoints

    allow_legacy_checkpoints()

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": os.system}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, map_location="cpu")
