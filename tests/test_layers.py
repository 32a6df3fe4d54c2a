"""The layers go one way: core/ (torch, numpy, faiss) <- components/ (core + torch) <- tasks/, models/,
plugin/ (fairseq); inspect/ (the static HTML viewer) is the standard library and core only. Console
scripts, the experiment framework (experiments/: it runs fairseq only as subprocesses) and the core import
without fairseq, hydra or omegaconf, and importing them changes no process-wide state
(sys.excepthook, torch's safe globals)."""
import ast
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "knnlm_fairseq")
THIRD_PARTY = {
    "core": {"numpy", "torch", "faiss", "tqdm", "sacremoses"},  # tqdm: index building's progress bar
    "components": {"torch"},
    "cli": {"numpy", "torch", "faiss", "tqdm"},
    "inspect": {"numpy", "torch"},  # html.py itself is the standard library only
    "experiments": {"numpy", "matplotlib"},  # stages, command lines, reports: never torch, faiss or fairseq
}
# what each layer may import from the package (relative or absolute), besides itself
INSIDE = {"core": set(), "components": {"core"}, "cli": {"core", "inspect"}, "inspect": {"core"},
          "experiments": {"core"}}
FAIRSEQ_FREE = ("core", "components", "cli", "inspect", "experiments")


def modules(layer: str):
    return sorted(m.name for m in pkgutil.iter_modules([os.path.join(PKG, layer)]))


def imports(path: str):
    """(top-level third-party names, package layers) imported anywhere in the file, lazily or not."""
    tree = ast.parse(open(path).read())
    tops, layers = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: .x (same layer) or ..x (another layer of the package)
                if node.level >= 2:
                    layers.add((node.module or "").split(".")[0] or "<package>")
                continue
            names = [node.module]
        else:
            continue
        for n in names:
            top = n.split(".")[0]
            if top == "knnlm_fairseq":
                layers.add(n.split(".")[1] if "." in n else "<package>")
            elif top not in sys.stdlib_module_names:
                tops.add(top)
    return tops, layers


@pytest.mark.parametrize("layer", FAIRSEQ_FREE)
def test_layer_imports_only_what_it_may(layer):
    assert modules(layer), f"no modules found in {layer}/"
    for name in modules(layer):
        tops, layers = imports(os.path.join(PKG, layer, f"{name}.py"))
        assert tops <= THIRD_PARTY[layer], f"{layer}/{name}.py imports {tops - THIRD_PARTY[layer]}"
        assert layers <= INSIDE[layer], f"{layer}/{name}.py imports package layers {layers - INSIDE[layer]}"


def test_fairseq_free_modules_import_with_fairseq_blocked():
    """A fresh interpreter where importing fairseq, hydra or omegaconf raises: every core, components, cli,
    inspect and experiments module imports, the core computes, and no process-wide state changed."""
    names = [f"knnlm_fairseq.{layer}.{m}" for layer in FAIRSEQ_FREE for m in modules(layer)]
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("fairseq", "fairseq_cli", "hydra", "omegaconf"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import torch
        hook, safe = sys.excepthook, list(torch.serialization.get_safe_globals())
        for name in {names!r}:
            importlib.import_module(name)
        from knnlm_fairseq.core import knn
        lp = knn.knn_log_probs(torch.tensor([[1.0, 2.0]]), torch.tensor([[0, 1]]), 3)
        assert abs(float(lp.exp().sum()) - 1) < 1e-6
        assert sys.excepthook is hook, "importing changed sys.excepthook"
        assert list(torch.serialization.get_safe_globals()) == safe, "importing changed torch's safe globals"
        print("fairseq-free ok", len({names!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "fairseq-free ok" in proc.stdout, proc.stdout + proc.stderr


def test_plugin_activation_is_where_fairseq_loads_it():
    """The side effects happen when fairseq imports the plugin's tasks/ or models/, and only then."""
    script = textwrap.dedent("""
        import sys, torch
        hook = sys.excepthook
        import knnlm_fairseq.core.datastore, knnlm_fairseq.cli.sweep
        assert sys.excepthook is hook
        import knnlm_fairseq.models
        assert sys.excepthook is not hook
        import argparse
        assert argparse.Namespace in torch.serialization.get_safe_globals()
        print("activated")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and "activated" in proc.stdout, proc.stdout + proc.stderr
