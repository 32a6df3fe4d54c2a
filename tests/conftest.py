"""Suite-wide rules.

A skipped test is a failed test: CI must run every test or say loudly why it could not (most often
`../shared` is missing: the data and the shipped checkpoint the project's README uses). Set
KNNLM_ALLOW_SKIPS=1 to let skips stay skips on a machine without `../shared`.
"""
import os
import subprocess

import pytest

ALLOW_SKIPS = os.environ.get("KNNLM_ALLOW_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not ALLOW_SKIPS and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} would have been skipped ({reason}); tests never skip here "
                           "(KNNLM_ALLOW_SKIPS=1 lets them, outside CI)")


# ---- `slow` tells the truth: a test not marked slow cannot start a CLI ----------------------------------------
# (`make test-unit` runs `-m "not slow"` in under a minute; fairseq's start-up alone costs seconds per process)
CLI_PREFIXES = ("fairseq-",)  # our knnlm-* scripts start in ~0.2 s: unit tests may run them
CLI_NAMES = {"make", "chromium", "chromedriver"}  # make runs fairseq pipelines
_current = {"slow": True}
_popen_init = subprocess.Popen.__init__


def _guarded_popen_init(self, args, *a, **kw):
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    name = os.path.basename(str(argv[0])) if argv else ""
    if not _current["slow"] and (name.startswith(CLI_PREFIXES) or name in CLI_NAMES):
        raise AssertionError(f"a test not marked slow started {name}: mark it @pytest.mark.slow "
                             "(make test-unit must stay fast)")
    _popen_init(self, args, *a, **kw)


subprocess.Popen.__init__ = _guarded_popen_init


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _current["slow"] = item.get_closest_marker("slow") is not None


# ---- two workers (make test runs pytest-xdist -n 2 --dist loadfile): the longest files start first --------------
# (measured with --durations on 2026-12-04, 482 tests; a long file collected last would leave one core idle at the end)
LONGEST_FIRST = ["test_drivers_tiny.py", "test_refusals_cli.py", "test_readme.py", "test_flags_cli.py", "test_e2e_cli.py",
                 "test_wikitext103_standin.py", "test_inspect_cli.py", "test_wt2_shipped.py", "test_configs.py",
                 "test_resume_cli.py", "test_keytypes_cli.py", "test_cache_cli.py", "test_multiworker_cli.py",
                 "test_torch_search.py", "test_combinations_cli.py", "test_experiment_e2e.py", "test_index_identity.py",
                 "test_stock_generation.py", "test_legacy_checkpoint.py", "test_cache_oracle_cli.py",
                 "test_alignment_cli.py", "test_adaptive_oracle_cli.py", "test_scaling_config.py", "test_bad_inputs.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within a file
