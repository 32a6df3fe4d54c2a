"""Installing the plugin leaves stock fairseq generation working, and refuses kNN-LM generation in one line.

fairseq 0.12.3 reads `np.compat.long`, which numpy 2 removed: knnlm_fairseq/plugin/numpy_compat.py adds back that
one alias, through the `.pth` that `make install` writes (runs without --user-dir) and through plugin.activate()
(--user-dir runs, checked here with the .pth out of the way: `python -S`). knn_eval's build_generator refuses
--knnlm / --save-dstore / --cache-size under any generator, before it could log `kNN-LM: N entries` as if active.

One tiny world: the shipped WikiText-2 checkpoint (no training), a few short lines binarized with its dictionary, a
datastore dumped from them with a Flat index; the runs go two at a time.
"""
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import threading
from types import SimpleNamespace

import pytest

from clis import BIN, ONE_THREAD, USER_DIR, WT2_CKPT, assert_refused, parallel, run_cli
from knnlm_fairseq.plugin import numpy_compat

pytestmark = pytest.mark.slow  # starts fairseq CLIs

MODEL_DIR = os.path.dirname(WT2_CKPT)  # checkpoint.pt and its dict.txt
LINES = ["the meaning of life is", "in the beginning of the season , the team played well .",
         "he was born in the city of London .", "the film was released in the United States ."]  # no <unk>
GEN = ("--cpu", "--beam", "1", "--max-len-a", "1", "--max-len-b", "4")  # an LM's length counts its prompt
REFUSAL = r"^knnlm_fairseq: error: kNN-LM generation is not supported yet; score text with fairseq-eval-lm --knnlm, "


def run(name, *args, check=False):
    return run_cli(name, *args, check=check, env=ONE_THREAD)


def interactive(w, *flags, data=MODEL_DIR):
    return run("fairseq-interactive", data, "--path", WT2_CKPT, "--input", w.prompts, *GEN, *flags)


def without_pth(w, *flags):
    """fairseq-interactive in an interpreter that processed no .pth file (`python -S`, site-packages appended to the
    path; site.sethelper() because fairseq's configs.py reads the `help` builtin that site defines): numpy has no
    alias until --user-dir imports the plugin."""
    script = (f"import sys, site; site.sethelper(); sys.path.append({sysconfig.get_path('purelib')!r}); "
              f"import numpy; assert not hasattr(numpy, 'compat'), 'a .pth ran'; "
              f"sys.argv = ['fairseq-interactive'] + {[str(a) for a in flags]!r}; "
              f"from fairseq_cli.interactive import cli_main; cli_main()")
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=w.root,
                          env=dict(os.environ, **ONE_THREAD))
    proc.output = proc.stdout + proc.stderr
    return proc


HUB = textwrap.dedent("""
    import json, logging, sys
    from argparse import Namespace
    logging.basicConfig(level=logging.INFO)  # fairseq's loggers, so that a `kNN-LM:` line would show
    import numpy
    out = {"numpy_compat_before_fairseq": hasattr(numpy, "compat")}
    from fairseq.models.transformer_lm import TransformerLanguageModel
    lm = TransformerLanguageModel.from_pretrained(MODEL_DIR, "checkpoint.pt", data_name_or_path=MODEL_DIR)
    lm.eval()
    out["score"] = lm.score(PROMPT)["positional_scores"].tolist()
    out["sample"] = lm.sample(PROMPT, beam=1, max_len_b=12)
    # the hub around a knn_eval task, as a script builds it from a fairseq-interactive command line
    from fairseq import checkpoint_utils, hub_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    utils.import_user_module(Namespace(user_dir=USER_DIR))
    out["refused"] = {}
    for name, flags in FLAGS.items():
        args = options.parse_args_and_arch(options.get_interactive_generation_parser(),
                                           [DATA, "--path", CKPT, "--user-dir", USER_DIR, "--task", "knn_eval", "--cpu",
                                            *flags])
        cfg = convert_namespace_to_omegaconf(args)
        task = tasks.setup_task(cfg.task)
        models, _ = checkpoint_utils.load_model_ensemble([CKPT], task=task)
        hub = hub_utils.GeneratorHubInterface(cfg, task, models)
        for call in ("sample", "score"):
            try:
                getattr(hub, call)(PROMPT, beam=1)
                out["refused"][f"{name}.{call}"] = None
            except Exception as e:
                out["refused"][f"{name}.{call}"] = type(e).__name__ + ": " + str(e)
    print("RESULT " + json.dumps(out))
""")


def hub(w):
    flags = {"knnlm": ["--knnlm", "--dstore-dir", str(w.dstore), "--k", "4"],
             "save_dstore": ["--save-dstore", "--dstore-dir", str(w.root / "hub-dstore")], "cache": ["--cache-size", "8"]}
    consts = dict(MODEL_DIR=MODEL_DIR, CKPT=WT2_CKPT, DATA=str(w.data), USER_DIR=USER_DIR, PROMPT=LINES[0], FLAGS=flags)
    script = "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + HUB
    proc = subprocess.run([os.path.join(BIN, "python"), "-c", script], capture_output=True, text=True, cwd=w.root,
                          env=dict(os.environ, **ONE_THREAD))
    proc.output = proc.stdout + proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    proc.result = json.loads(line[-1][len("RESULT "):]) if line else None
    return proc


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock-generation")
    w = SimpleNamespace(root=root, data=root / "bin", dstore=root / "dstore", prompts=root / "prompts.txt")
    (root / "valid.txt").write_text("\n".join(LINES) + "\n")
    w.prompts.write_text(LINES[0] + "\n")
    binarized = threading.Event()

    def generation():
        w.stock = interactive(w, "--task", "language_modeling")
        w.user_dir = interactive(w, "--user-dir", USER_DIR, "--task", "language_modeling")
        w.no_pth = without_pth(w, MODEL_DIR, "--path", WT2_CKPT, "--input", w.prompts, "--user-dir", USER_DIR,
                               "--task", "language_modeling", *GEN)
        assert binarized.wait(300)
        # fairseq 0.12 drops a last batch smaller than --required-batch-size-multiple (default 8)
        w.generate = run("fairseq-generate", w.data, "--path", WT2_CKPT, "--task", "language_modeling", "--gen-subset",
                         "valid", "--sample-break-mode", "eos", "--batch-size", 4, "--required-batch-size-multiple", 1,
                         *GEN)

    def knn():
        try:
            run("fairseq-preprocess", "--only-source", "--srcdict", os.path.join(MODEL_DIR, "dict.txt"), "--validpref",
                w.root / "valid.txt", "--destdir", w.data, "--workers", "1", check=True)
        finally:
            binarized.set()
        run("fairseq-eval-lm", w.data, "--path", WT2_CKPT, "--user-dir", USER_DIR, "--task", "knn_eval",
            "--save-dstore", "--dstore-dir", w.dstore, "--gen-subset", "valid", "--tokens-per-sample", 64,
            "--max-tokens", 512, "--cpu", "--no-progress-bar", check=True)
        run("knnlm-build-index", w.dstore, "--factory", "Flat", "--threads", 1, "--no-progress-bar", check=True)
        w.refused = interactive(w, "--user-dir", USER_DIR, "--task", "knn_eval", "--knnlm", "--dstore-dir", w.dstore,
                                "--k", "4", data=w.data)
        w.hub = hub(w)

    parallel(generation, knn)
    return w


def hypotheses(proc):
    return [line.split("\t")[2] for line in proc.stdout.splitlines() if line.startswith("H-")]


def test_make_install_wrote_the_pth():
    path = os.path.join(sysconfig.get_path("purelib"), numpy_compat.PTH)
    assert os.path.isfile(path) and open(path).read().strip() == numpy_compat.PTH_LINE, \
        f"{path} is missing or stale: run make install (or {BIN}/python -m knnlm_fairseq.plugin.numpy_compat)"


def test_the_alias_is_numpy_1s_and_only_that():
    import numpy as np

    numpy_compat.install()
    numpy_compat.install()
    assert np.compat.long is int and [n for n in vars(np.compat) if not n.startswith("__")] == ["long"]
    assert sum(type(f).__name__ == "_AfterNumpy" for f in sys.meta_path) == 0  # numpy imported: no finder left
    with pytest.raises(ImportError):
        import numpy.compat  # noqa: F401  (an alias, not numpy 1's module)


@pytest.mark.parametrize("run_name", ["stock", "user_dir", "no_pth"])
def test_interactive_generates_with_the_stock_task(w, run_name):
    """Without --user-dir (the .pth), with it, and with it but no .pth (plugin.activate()): the prompt continues."""
    proc = getattr(w, run_name)
    assert proc.returncode == 0 and "np.compat" not in proc.output, proc.output[-3000:]
    (hyp,) = hypotheses(proc)
    assert hyp.startswith(LINES[0]) and len(hyp.split()) > len(LINES[0].split()), hyp


def test_generate_continues_each_line_of_a_binarized_split(w):
    """fairseq-generate runs language_modeling (its inference_step takes each sample as the prefix); the split in
    lines (--sample-break-mode eos) is what reads np.compat."""
    assert w.generate.returncode == 0, w.generate.output[-3000:]
    hyps = hypotheses(w.generate)
    assert len(hyps) == len(LINES) and all(any(h.startswith(line) for line in LINES) for h in hyps), hyps
    assert sum(len(h.split()) for h in hyps) > sum(len(line.split()) for line in LINES), hyps


def test_hub_scores_and_samples_and_refuses_knn_generation(w):
    r = w.hub.result
    assert w.hub.returncode == 0 and r is not None, w.hub.output[-3000:]
    assert r["numpy_compat_before_fairseq"]  # the .pth: no plugin imported yet
    assert len(r["score"]) == len(LINES[0].split()) and all(s < 0 for s in r["score"])  # every token after the first, eos
    assert r["sample"].startswith(LINES[0]) and len(r["sample"].split()) > len(LINES[0].split()), r["sample"]
    flag = {"knnlm": "--knnlm", "save_dstore": "--save-dstore", "cache": "--cache-size N"}
    assert set(r["refused"]) == {f"{k}.{c}" for k in flag for c in ("sample", "score")}
    for key, err in r["refused"].items():
        f = flag[key.split(".")[0]]
        assert err == (f"KnnlmError: kNN-LM generation is not supported yet; score text with fairseq-eval-lm {f}, or "
                       f"drop {f} to generate with the base LM"), (key, err)
    assert "kNN-LM:" not in w.hub.output and not (w.root / "hub-dstore").exists()


def test_interactive_refuses_knnlm_in_one_line(w):
    """Refused after the datastore's checks, before any generation and without logging it as active."""
    assert_refused(w.refused, REFUSAL + r"or drop --knnlm to generate with the base LM$")
    assert "kNN-LM:" not in w.refused.output and not hypotheses(w.refused), w.refused.output[-3000:]
