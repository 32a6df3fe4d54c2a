"""docs/options.md lists every flag of --task knn_eval as its dataclass declares it (knnlm-flags --markdown), each
with the test that fails when the flag is silently ignored; the tests it names exist."""
import os
import re

from clis import ROOT

DOC = os.path.join(ROOT, "docs", "options.md")
ROW = re.compile(r"^(\| `--.*?` \| .*? \| .*? \|) (.*) \|$")


def doc_rows():
    rows = [ROW.match(line) for line in open(DOC).read().splitlines() if line.startswith("| `--")]
    assert all(rows), "a flag row of docs/options.md is not `| flag | default | meaning | proven by |`"
    return [(m.group(1), m.group(2)) for m in rows]


def test_the_table_is_the_task_flags():
    from knnlm_fairseq.tasks.flags import markdown_rows

    assert [cells for cells, _ in doc_rows()] == markdown_rows(), (
        "docs/options.md's table differs from the task: regenerate its first three columns with knnlm-flags --markdown")


def test_every_flag_names_a_test_that_exists():
    for cells, proof in doc_rows():
        names = re.findall(r"`tests/(test_\w+\.py)::(test_\w+)`", proof)
        assert names, f"{cells.split('`')[1]} names no test that fails when it is ignored"
        for path, name in names:
            source = open(os.path.join(ROOT, "tests", path)).read()
            assert re.search(rf"^def {name}\(", source, re.M), f"tests/{path} has no {name}"


def test_knnlm_flags_prints_an_absolute_user_dir():
    """Outside the checkout `--user-dir knnlm_fairseq` ends in fairseq's bare FileNotFoundError: the README's
    `--user-dir $(knnlm-flags --user-dir)` works from anywhere."""
    from clis import run_cli

    out = run_cli("knnlm-flags", "--user-dir", cwd="/").stdout.strip()
    assert os.path.isabs(out) and os.path.isfile(os.path.join(out, "tasks", "knn_eval.py"))
