"""An experiment's stages: timed subprocesses whose reuse is decided by the files the package commits last.

A stage's output is finished when its commit file exists: a datastore's manifest.json, an index's sidecar
(index.faiss.json), a retrieval or cache log's meta.json, a sweep's JSON, or (for a stage whose only output is
what it prints) the stage log, renamed into place only when the command succeeds. Beside the commit file a
record (COMMIT.stage.json) keeps the command that made it, what its inputs were (the content of the commit
files it read, the size and time of other files), its wall time and its own peak RSS (os.wait4).

With reuse on, a stage is skipped when its commit file exists and its record names the same command and the
same inputs; a stage whose command or inputs changed (an upstream stage was made again) is made again from
scratch. An output made outside any experiment (no record) is adopted only when its commit file describes what
the command would make (Command.expect), and refused otherwise. Each decision is printed; reused stages are
marked in the metrics.
"""
import hashlib
import json
import os
import shutil
import subprocess
import time
from typing import Callable, Dict, Optional

from ..core.durable import write_json_atomic
from .commands import Command

RECORD = ".stage.json"
PROGRESS = "knnlm_fairseq.components.progress"  # the logger of the eval passes' progress lines


class StageFailed(RuntimeError):
    pass


def record_path(commit: str) -> str:
    return commit + RECORD


def input_digest(path: str) -> str:
    """A commit file by its content and its record's (a stage made again has a new record, even where its commit
    file reads the same); anything else (checkpoints, binarized data) by size and modification time."""
    if not os.path.exists(path):
        return "missing"
    if not (path.endswith(".json") or path.endswith(".log")):
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for p in (path, record_path(path)):
        if os.path.exists(p):
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def _read(path: str) -> Optional[Dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _field(obj, dotted: str):
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _remove(paths) -> None:
    for p in paths:
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _text(path: Optional[str]) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()


class Stages:
    """The stages of one experiment, run in order; `done` holds each stage's record, as reports show them."""

    def __init__(self, work: str, reuse: bool, echo: Callable[[str], None] = print):
        self.work, self.reuse, self.echo = work, reuse, echo
        self.logs = os.path.join(work, "logs")
        self.done: Dict[str, Dict] = {}

    def log_path(self, name: str) -> str:
        return os.path.join(self.logs, f"{name}.log")

    def run(self, name: str, cmd: Command, reuse: Optional[bool] = None, keep: bool = False) -> str:
        """Run cmd in a subprocess (or reuse what an earlier run of it made); returns the stage's log text.

        keep: an output that exists belongs to another experiment (make wikitext2's datastore): it is used whatever
        command made it, once its commit file shows it is what cmd makes, and never made again or overwritten."""
        commit = cmd.commit or self.log_path(name)
        inputs = {p: input_digest(p) for p in cmd.inputs}
        if keep and cmd.commit and os.path.exists(commit):
            self._check_expected(name, cmd, commit)
            rec = _read(record_path(commit)) or {"command": cmd.printable(), "seconds": None, "peak_rss_mb": None}
            self.echo(f"(keeping {name}: {commit})")
            self.done[name] = dict(rec, reused=True)
            return _text(rec.get("log"))
        if self._reused(name, cmd, commit, inputs, reuse):
            return _text(self.done[name].get("log"))
        self._clear(cmd, commit, reuse)
        self.echo(f"$ {cmd.printable()}")
        os.makedirs(self.logs, exist_ok=True)
        log, t0 = self.log_path(name), time.time()
        with open(log + ".tmp", "w") as out:
            proc = subprocess.Popen(cmd.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:  # to the log; progress lines also to the console, so long stages show life
                out.write(line)
                if PROGRESS in line:
                    self.echo(f"  [{name}] {line.split(PROGRESS, 1)[1].lstrip(':| ').strip()}")
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
        seconds, code, text = time.time() - t0, os.waitstatus_to_exitcode(status), _text(log + ".tmp")
        if code != 0:
            _remove([commit] if cmd.commit else [])  # whatever a failed command wrote is not finished
            os.replace(log + ".tmp", log + ".failed")
            tail = "\n".join(text.strip().splitlines()[-5:])
            raise StageFailed(f"stage {name} failed (exit {code}); log: {log}.failed\n{tail}")
        os.replace(log + ".tmp", log)  # the commit point of a stage that has none of its own
        if not os.path.exists(commit):
            raise StageFailed(f"stage {name} exited 0 but wrote no {commit}; log: {log}")
        self._record(name, cmd, commit, inputs, seconds, round(usage.ru_maxrss / 1024, 1), log)
        return text

    def call(self, name: str, cmd: Command, fn: Callable[[], object], reuse: Optional[bool] = None) -> None:
        """An in-process step (writing a text subset, slicing a datastore) under the same rule; cmd.argv describes
        it and cmd.commit is the file fn writes last."""
        inputs = {p: input_digest(p) for p in cmd.inputs}
        if self._reused(name, cmd, cmd.commit, inputs, reuse):
            return
        self._clear(cmd, cmd.commit, reuse)
        self.echo(cmd.printable())
        t0 = time.time()
        fn()
        if not os.path.exists(cmd.commit):
            raise StageFailed(f"step {name} finished but wrote no {cmd.commit}")
        self._record(name, cmd, cmd.commit, inputs, time.time() - t0, None, None)

    def _clear(self, cmd: Command, commit: str, reuse: Optional[bool]) -> None:
        """Before running: remove a finished output that was made otherwise, or everything on a fresh run; an
        unfinished one (no commit file) is left for the command to resume (dumps and index builds do)."""
        if cmd.fresh or os.path.exists(commit) or not (self.reuse if reuse is None else reuse):
            _remove([*cmd.outputs, commit])
        _remove([record_path(commit)])

    def _record(self, name, cmd: Command, commit: str, inputs: Dict, seconds: float, peak_rss_mb, log) -> None:
        rec = {"command": cmd.printable(), "identity": cmd.identity(), "inputs": inputs, "seconds": round(seconds, 1),
               "peak_rss_mb": peak_rss_mb,
               "load_avg_1m": round(os.getloadavg()[0], 2),  # above the core count: other work shared the CPU
               "log": log and os.path.abspath(log)}
        write_json_atomic(record_path(commit), rec)
        self.done[name] = dict(rec, reused=False)

    def _check_expected(self, name: str, cmd: Command, commit: str) -> None:
        made = _read(commit) or {}
        wrong = [f"{k} {_field(made, k)!r}, not {v!r}" for k, v in cmd.expect.items() if _field(made, k) != v]
        if wrong:
            raise StageFailed(f"stage {name}: {commit} was made outside this experiment with other settings "
                              f"({'; '.join(wrong)}); delete it or point the experiment elsewhere")

    def _reused(self, name: str, cmd: Command, commit: str, inputs: Dict, reuse: Optional[bool]) -> bool:
        """Whether an earlier run made exactly this (its record then joins `done`); False: make it now."""
        if not ((self.reuse if reuse is None else reuse) and os.path.exists(commit)):
            return False
        rec = _read(record_path(commit))
        if rec is None and cmd.commit:  # made outside any experiment: adopted if it is what this stage makes
            self._check_expected(name, cmd, commit)
            self.echo(f"(adopting {name}: {commit}, made outside this experiment; delete it to make it again)")
            rec = {"command": cmd.printable(), "identity": cmd.identity(), "inputs": inputs, "seconds": None,
                   "peak_rss_mb": None, "adopted": True}
            write_json_atomic(record_path(commit), rec)
        elif rec is None:
            return False  # a log without a record: an interrupted run's
        elif (rec.get("identity"), rec.get("inputs")) != (cmd.identity(), inputs):
            what = "command" if rec.get("identity") != cmd.identity() else "inputs"
            self.echo(f"({name}: {commit} was made with other {what}; making it again)")
            return False
        elif rec.get("log") and not os.path.exists(rec["log"]):
            self.echo(f"({name}: its log {rec['log']} is gone; making it again)")
            return False
        else:
            self.echo(f"(reusing {name}: {commit})")
        self.done[name] = dict(rec, reused=True)
        return True
