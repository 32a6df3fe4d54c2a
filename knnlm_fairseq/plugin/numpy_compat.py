"""`numpy.compat.long` for fairseq 0.12.3 under numpy >= 2: the one alias fairseq reads that numpy 2 removed.

ve-fairseq 0.12.3 reads `np.compat.long` (numpy 1.x: `long = int`) in TokenBlockDataset(break_mode="eos") and
LanguagePairDataset, so every stock fairseq-interactive run, the hub's `.score()`/`.sample()` and any
`--sample-break-mode eos` run end in `AttributeError: module 'numpy' has no attribute 'compat'`. `add_alias` gives
numpy a `compat` namespace holding `long = int` and nothing else, and only where numpy has no `compat` of its own
(numpy 1.x is left alone; `import numpy.compat` still fails). Idempotent, numpy only, standard library only.

Two ways in: `plugin.activate()` (fairseq --user-dir runs), and the one-line `knnlm_fairseq_numpy_compat.pth` that
`make install` writes into the venv's site-packages (`python -m knnlm_fairseq.plugin.numpy_compat`) for runs
without --user-dir. At every start of the venv's Python that line loads this file by path, without importing the
knnlm_fairseq package (fairseq's --user-dir loader registers the plugin's tasks and models only when it imports
the package itself), and calls `install()`, which imports nothing: the alias comes right after the first
`import numpy`, so a process that never imports numpy pays nothing.
"""
import importlib.util
import sys
import types

PTH = "knnlm_fairseq_numpy_compat.pth"
PTH_LINE = ('import importlib.util as u; s = u.find_spec("knnlm_fairseq"); s = s and u.spec_from_file_location('
            '"knnlm_fairseq_numpy_compat", s.submodule_search_locations[0] + "/plugin/numpy_compat.py"); '
            'm = s and u.module_from_spec(s); m and (s.loader.exec_module(m) or m.install())')


def add_alias(numpy) -> None:
    if "compat" in vars(numpy) or importlib.util.find_spec("numpy.compat") is not None:
        return
    compat = types.ModuleType("numpy.compat", "knnlm_fairseq's alias for fairseq 0.12.3: long = int, as in numpy 1.x")
    compat.long = int
    numpy.compat = compat


class _AfterNumpy:
    """A one-shot meta path finder (not importlib.abc's: 10 ms more at every start): finds numpy's spec the usual
    way and runs add_alias right after numpy's own import code."""

    def find_spec(self, name, path=None, target=None):
        if name != "numpy":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            loader, exec_module = spec.loader, spec.loader.exec_module

            def exec_then_alias(module):
                del loader.exec_module  # back to the loader's own method
                exec_module(module)
                add_alias(module)

            loader.exec_module = exec_then_alias
        return spec


def install() -> None:
    """Idempotent: the alias now if numpy is imported, else right after numpy's import."""
    if "numpy" in sys.modules:
        add_alias(sys.modules["numpy"])
    elif not any(type(f).__name__ == "_AfterNumpy" for f in sys.meta_path):  # by name: the .pth loads its own copy
        sys.meta_path.insert(0, _AfterNumpy())


if __name__ == "__main__":  # make install: write the .pth into this interpreter's site-packages
    import os
    import sysconfig

    path = os.path.join(sysconfig.get_path("purelib"), PTH)
    with open(path, "w") as f:
        f.write(PTH_LINE + "\n")
    print(f"wrote {path}")
