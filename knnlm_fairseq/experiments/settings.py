"""The run settings every experiment shares (dump, index, evaluation, sweep), and how a driver starts and fails."""
import argparse
import sys
from typing import Callable, List

from .stages import StageFailed


def floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",")]


def ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def add_run_settings(p: argparse.ArgumentParser, **defaults) -> None:
    """--dump-*/--eval-* windows, index, retrieval and sweep grids; `defaults` overrides by dest."""
    d = dict(dump_tokens_per_sample=512, dump_context_window=128, eval_tokens_per_sample=512,
             eval_context_window=256, max_tokens=8192, factory="IVF1024,PQ32", train_size=200_000, probe=32, k=1024,
             lmbda=0.25, knn_temp=1.0, lmbdas=[round(0.05 * i, 2) for i in range(19)], temps=[1.0], device="--cpu")
    d.update(defaults)
    for name in ("dump_tokens_per_sample", "dump_context_window", "eval_tokens_per_sample", "eval_context_window",
                 "max_tokens", "train_size", "probe", "k"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name])
    p.add_argument("--factory", default=d["factory"])
    p.add_argument("--lmbda", type=float, default=d["lmbda"], help="λ of the eval-lm runs (the sweep tunes it)")
    p.add_argument("--knn-temp", type=float, default=d["knn_temp"], help="T of the eval-lm runs (the sweep tunes it)")
    p.add_argument("--lmbdas", type=floats, default=d["lmbdas"], help="λ grid of the offline sweep")
    p.add_argument("--temps", type=floats, default=d["temps"], help="T grid of the offline sweep")
    p.add_argument("--device", default=d["device"], help="device flags for fairseq-eval-lm, e.g. '--cpu' or '--fp16'")


def with_eval_settings_in_grids(a: argparse.Namespace) -> argparse.Namespace:
    """The eval-lm runs' λ and T join the sweep grids, so the sweep reproduces those runs (a cross-check)."""
    a.lmbdas = a.lmbdas if a.lmbda in a.lmbdas else sorted(a.lmbdas + [a.lmbda])
    a.temps = a.temps if a.knn_temp in a.temps else sorted(a.temps + [a.knn_temp])
    return a


def window(a: argparse.Namespace, data: str, ckpt: str, split: str, dump: bool = False) -> tuple:
    """The positional arguments of commands.eval_lm (and its builders) for one split."""
    tps, ctx = (a.dump_tokens_per_sample, a.dump_context_window) if dump else (a.eval_tokens_per_sample,
                                                                              a.eval_context_window)
    return data, ckpt, split, tps, ctx, a.max_tokens, a.device.split()


def cli(main: Callable[[], int]) -> None:
    """Run a driver: a failed stage ends it with that stage's one-paragraph message, not a traceback."""
    try:
        sys.exit(main())
    except StageFailed as e:
        sys.exit(str(e))
