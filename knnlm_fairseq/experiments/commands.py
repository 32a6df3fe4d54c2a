"""Command lines of the pipeline's CLIs (stock fairseq and ours), and the numbers parsed from what they print.

Each builder returns a Command: the argv, the file the CLI writes last when it succeeds (its commit point, which
decides reuse in stages.py) and the outputs to remove before running it again. Nothing here imports fairseq:
the CLIs run as subprocesses.
"""
import os
import re
import sys
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence

BIN = os.path.dirname(sys.executable)
PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the --user-dir: knnlm_fairseq/
ROOT = os.path.dirname(PKG)
KNN_TASK = ["--user-dir", PKG, "--task", "knn_eval"]
INDEX_FILE = "index.faiss"  # knnlm-build-index's default, beside INDEX_FILE.json (its sidecar, the commit point)

_PPL = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
_EVALUATED = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s")
_VALID = re.compile(r"epoch (\d+) \| valid on 'valid' subset \| loss [0-9.]+ \| (?:nll_loss [0-9.]+ \| )?ppl ([0-9.]+)"
                    r".*?num_updates (\d+)")
_TRAIN_WPS = re.compile(r"epoch (\d+) \| loss [0-9.]+ \|.*?\| wps ([0-9.]+)")
_STOP_HOURS = re.compile(r"stop_time_hours'?: ([0-9.]+)")  # in the logged config, and in the message when it stops


@dataclass(frozen=True)
class Command:
    argv: List[str]
    commit: Optional[str] = None  # written last on success; None: the stage's own log is the commit point
    outputs: Sequence[str] = ()  # removed before the command runs (again)
    expect: Dict = field(default_factory=dict)  # fields the commit JSON must hold for an output made elsewhere
    inputs: Sequence[str] = ()  # files it reads: when one changes (an upstream stage made again), so does the output
    fresh: bool = False  # start from nothing even after an interruption (default: the CLI resumes what it left)

    def __post_init__(self):
        object.__setattr__(self, "argv", [str(a) for a in self.argv])

    def reading(self, *paths: str) -> "Command":
        """The same command, with more input files."""
        return replace(self, inputs=[*self.inputs, *paths])

    def nice(self, level: int = 10) -> "Command":
        """The same command at a lower CPU priority (long evaluations on a machine others share)."""
        return replace(self, argv=["nice", "-n", str(level)] + self.argv)

    def printable(self) -> str:
        """The command as a reader would type it: our venv's bin/ and the checkout's root left out."""
        return " ".join(a.replace(BIN + os.sep, "").replace(ROOT + os.sep, "") for a in self.argv)

    def identity(self) -> str:
        """What decides the output: the printable command without a priority prefix."""
        return self.printable().removeprefix(" ".join(self.argv[:3]) + " " if self.argv[0] == "nice" else "")


def joined(values) -> str:
    return ",".join(map(str, values))


def eval_lm(data: str, ckpt: str, split: str, tps: int, ctx: int, max_tokens: int, device: Sequence[str],
            extra: Sequence[str] = ()) -> List[str]:
    """fairseq-eval-lm over one split with the run's block size, context window and device flags."""
    return [f"{BIN}/fairseq-eval-lm", data, "--path", ckpt, "--gen-subset", split, "--tokens-per-sample", tps,
            "--context-window", ctx, "--max-tokens", max_tokens, "--no-progress-bar", "--log-interval", 1000,
            *device, *extra]


def window_inputs(data: str, ckpt: str, split: str, *_) -> List[str]:
    """What an eval-lm run reads: the checkpoint and the binarized split."""
    return [ckpt, os.path.join(data, f"{split}.bin")]


def base_eval(*window, **kw) -> Command:
    # the stock task; --user-dir only so legacy (2019) checkpoints load under torch >= 2.6 and our archs register
    return Command(eval_lm(*window, **kw) + ["--user-dir", PKG], inputs=window_inputs(*window))


def dstore_inputs(dstore: str, index_file: Optional[str] = None) -> List[str]:
    return [os.path.join(dstore, "manifest.json"), os.path.join(dstore, (index_file or INDEX_FILE) + ".json")]


def keytype_flags(keytype: Optional[str]) -> List[str]:
    return [] if keytype is None else ["--knn-keytype", keytype]


def dump(*window, dstore: str, keytype: Optional[str] = None, **kw) -> Command:
    """--save-dstore over the window's split: the datastore's manifest.json is written last."""
    data, _, split, tps, ctx = window[:5]
    expect = {"split": split, "tokens_per_sample": tps, "context_window": ctx}
    if keytype is not None:
        expect["key_type"] = keytype
    return Command(eval_lm(*window, **kw) + KNN_TASK + keytype_flags(keytype) + ["--save-dstore", "--dstore-dir", dstore],
                   commit=os.path.join(dstore, "manifest.json"), outputs=[dstore], expect=expect,
                   inputs=window_inputs(*window))


def knn_eval(*window, dstore: str, k: int, lmbda: float, temp: float, probe: int, dist: str = "exact",
             retrieval_log: Optional[str] = None, index_file: Optional[str] = None, keytype: Optional[str] = None,
             **kw) -> Command:
    """kNN-LM evaluation; with retrieval_log, every token's neighbours are recorded (meta.json is written last)."""
    argv = eval_lm(*window, **kw) + KNN_TASK + keytype_flags(keytype) + ["--knnlm", "--dstore-dir", dstore]
    argv += [] if index_file is None else ["--index-file", index_file]
    argv += ["--k", k, "--lmbda", lmbda, "--knn-temp", temp, "--probe", probe, "--knn-dist", dist]
    inputs = window_inputs(*window) + dstore_inputs(dstore, index_file)
    if retrieval_log is None:
        return Command(argv, inputs=inputs)
    return Command(argv + ["--save-retrieval", retrieval_log], commit=os.path.join(retrieval_log, "meta.json"),
                   outputs=[retrieval_log], expect={"k": k, "nprobe": probe, "split": window[2]}, inputs=inputs)


def cache_eval(*window, cache_log: str, size: int, thetas: str, **kw) -> Command:
    """A base-LM pass recording the continuous cache's log-probs for every θ (meta.json is written last)."""
    return Command(eval_lm(*window, **kw) + KNN_TASK + ["--cache-size", size, "--cache-lmbda", 0, "--save-cache",
                                                        cache_log, "--cache-thetas", thetas],
                   commit=os.path.join(cache_log, "meta.json"), outputs=[cache_log], expect={"cache_size": size},
                   inputs=window_inputs(*window))


def build_index(dstore: str, factory: str, train_size: int, output: Optional[str] = None,
                extra: Sequence[str] = ()) -> Command:
    """knnlm-build-index; its sidecar OUTPUT.json names the datastore and is written after the index. No --force:
    a stage removes its outputs before making them again (stages.py), and an unfinished build resumes."""
    index = os.path.join(dstore, output or INDEX_FILE)
    argv = [f"{BIN}/knnlm-build-index", dstore, "--factory", factory, "--train-size", train_size]
    argv += ([] if output is None else ["--output", output]) + ["--no-progress-bar", *extra]
    return Command(argv, commit=index + ".json", outputs=[index, index + ".json"], expect={"factory": factory},
                   inputs=[os.path.join(dstore, "manifest.json")])


def sweep(logs: Sequence[str], output: str, lmbdas, ks, temps, extra: Sequence[str] = (),
          cache_logs: Sequence[str] = ()) -> Command:
    """knnlm-sweep: tune on the first log, apply to the rest (with cache logs: the cache too); the JSON output is
    its commit point."""
    cache = ["--cache-logs", *cache_logs] if cache_logs else []
    extra = [str(x) for x in extra]
    # --write-settings FILE (in extra): the stage remakes it on purpose (knnlm-sweep refuses an existing FILE
    # without --force, and FILE is written before the commit point, so an interrupted run may leave one behind)
    settings = [extra[extra.index("--write-settings") + 1]] if "--write-settings" in extra else []
    force = ["--force"] if settings else []
    return Command([f"{BIN}/knnlm-sweep", *logs, "--lmbdas", joined(lmbdas), "--ks", joined(ks), "--temps",
                    joined(temps), *extra, *force, *cache, "--output", output], commit=output,
                   outputs=[output, *settings],
                   expect={"settings.ks": [int(k) for k in ks], "settings.temps": [float(t) for t in temps],
                           "settings.lmbdas": [float(x) for x in lmbdas]},
                   inputs=[os.path.join(log, "meta.json") for log in [*logs, *cache_logs]])


def preprocess(dict_path: str, destdir: str, workers: int = 2, **prefs: str) -> Command:
    """fairseq-preprocess --only-source with a fixed dictionary; prefs: trainpref=..., validpref=..., testpref=..."""
    argv, texts = [f"{BIN}/fairseq-preprocess", "--only-source", "--srcdict", dict_path], [dict_path]
    for name in ("trainpref", "validpref", "testpref"):
        argv += [] if prefs.get(name) is None else [f"--{name}", prefs[name]]
        texts += [] if prefs.get(name) is None else [prefs[name]]
    return Command(argv + ["--destdir", destdir, "--workers", workers], outputs=[destdir], inputs=texts)


def hydra_train(config: str, data: str, save_dir: str, run_dir: str) -> Command:
    """fairseq-hydra-train with one of config/'s recipes; the stage log (written on success) is the commit."""
    return Command([f"{BIN}/fairseq-hydra-train", "--config-dir", os.path.join(ROOT, "config"), "--config-name",
                    config, f"task.data={os.path.abspath(data)}", f"common.user_dir={PKG}",
                    f"checkpoint.save_dir={os.path.abspath(save_dir)}", f"hydra.run.dir={os.path.abspath(run_dir)}"],
                   outputs=[save_dir], inputs=[os.path.join(data, "train.bin"), os.path.join(ROOT, "config", f"{config}.yaml")],
                   fresh=True)  # fairseq-train would resume from checkpoint_last.pt: another model than a full run


def prepare_text(src: str, dict_path: str, out: str, flags: Sequence[str] = ()) -> Command:
    return Command([f"{BIN}/knnlm-prepare-text", src, "--dict", dict_path, "--out", out, *flags],
                   commit=os.path.join(out, "prep.json"), outputs=[out])


def merge_dstore(dest: str, parts: Sequence[str]) -> Command:
    return Command([f"{BIN}/knnlm-merge-dstore", dest, *parts], commit=os.path.join(dest, "manifest.json"),
                   outputs=[dest], inputs=[os.path.join(p, "manifest.json") for p in parts])


def in_process(description: Sequence, commit: str, outputs: Sequence[str] = (), inputs: Sequence[str] = ()) -> Command:
    """A step a driver runs itself (Stages.call): `description` stands for its command line."""
    return Command(["(in process)", *description], commit=commit, outputs=outputs or [commit], inputs=inputs)


def eval_numbers(text: str) -> Dict:
    """Perplexity, tokens and tokens/s from fairseq-eval-lm's output."""
    loss, ppl = _PPL.findall(text)[-1]
    tokens, secs = _EVALUATED.findall(text)[-1]
    tokens = int(tokens.replace(",", ""))
    return {"loss_base2": float(loss), "ppl": float(ppl), "tokens": tokens,
            "tok_s": round(tokens / max(float(secs), 1e-9), 1)}


def training_curve(log: str) -> Dict:
    """fairseq-train's per-epoch validation perplexity (on its validation batches) and training words/s, and
    whether its wall-clock cap (stop_time_hours) ended it."""
    wps = {int(e): float(w) for e, w in _TRAIN_WPS.findall(log)}
    hours = _STOP_HOURS.findall(log)
    return {"epochs": [{"epoch": int(e), "valid_ppl": float(p), "num_updates": int(u), "train_wps": wps.get(int(e))}
                       for e, p, u in _VALID.findall(log)],
            "stopped_by_time": "Stopping training due to cumulative_training_time" in log,
            "stop_time_hours": float(hours[-1]) if hours else None}
