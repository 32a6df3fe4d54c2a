"""knnlm-flags: every flag of `--task knn_eval`, its default and help, from the task's own dataclass.

fairseq-eval-lm's `-h` hides task flags, so this is the reference (`knnlm-flags`, or `--markdown` for the table of
docs/options.md, which tests/test_options_doc.py checks against this same list).
"""
import argparse
import dataclasses
import enum
import os
import sys
import typing
from typing import List, Tuple

from fairseq.tasks.language_modeling import LanguageModelingConfig

from .knn_eval import KnnEvalConfig

INHERITED = {f.name for f in dataclasses.fields(LanguageModelingConfig)}
NOT_FLAGS = {"checkpoint_path"}  # interpolated from common_eval.path, never given on the command line


def _choices(kind) -> List[str]:
    for k in typing.get_args(kind) or (kind,):
        if isinstance(k, type) and issubclass(k, enum.Enum):
            return [str(c.value) for c in k]
    return []


def _default(value) -> str:
    if value is False or value is None or value == "":
        return "off" if value is False else "—"
    return str(value.value if isinstance(value, enum.Enum) else value)


def task_flags() -> List[Tuple[str, str, str]]:
    """(flag with its choices, default, help) of each flag knn_eval adds to language_modeling, in declaration order."""
    rows = []
    for f in dataclasses.fields(KnnEvalConfig):
        if f.name in INHERITED or f.name in NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        choices = _choices(f.type)
        rows.append((f"{flag} {'|'.join(choices)}" if choices else flag, _default(f.default),
                     f.metadata.get("help", "")))
    return rows


def markdown_rows() -> List[str]:
    """The first three cells of each docs/options.md row (the fourth, the test that proves it, is the docs')."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a pipe inside a cell ends it in Markdown tables

    return [f"| `{cell(flag)}` | {cell(default)} | {cell(text)} |" for flag, default, text in task_flags()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="knnlm-flags", description=__doc__)
    p.add_argument("--markdown", action="store_true", help="print docs/options.md's table rows (without the tests)")
    p.add_argument("--user-dir", action="store_true",
                   help="print the plugin's absolute directory, for --user-dir from any working directory "
                        "(a relative --user-dir knnlm_fairseq works only in the checkout)")
    a = p.parse_args(argv)
    if a.user_dir:
        print(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return 0
    if a.markdown:
        print("\n".join(markdown_rows()))
        return 0
    for flag, default, text in task_flags():
        print(f"{flag}  (default: {default})\n    {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
