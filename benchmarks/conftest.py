"""Benchmark set-up: import paths, CPU threads, rows written as they finish, `late` benchmarks last.

* `tests/` (the independent reference DiT) and this folder (_timing, _results) go on sys.path.
* FLEXIKERN_BENCH_ROWS=<file.jsonl>: every finished benchmark appends its row (every skipped or
  failed one its reason) to that file at once (format: benchmarks/_results.py), so a run killed by a
  timeout keeps what it finished; pytest-benchmark's --benchmark-json, written only at the end
  of the session, still works and carries `_results.metadata()` in its machine_info.
* `@pytest.mark.late`: benchmarks whose first call compiles for tens of seconds (FlexAttention)
  run after all the others, so that a time limit costs them only.
"""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# reference_dit.py (the independent plain-PyTorch DiT) lives in tests/; _results.py beside this file.
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)
if not torch.cuda.is_available():
    # Toy CPU sizes on a shared machine: one thread gives steadier medians than contended two.
    torch.set_num_threads(1)

from _results import ROWS_ENV, append_jsonl, benchmark_record, metadata  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "late: run after every other benchmark (a slow first compile)")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("late") is not None)   # stable: order kept


def pytest_benchmark_update_machine_info(config, machine_info):
    """File every result under its device and versions (torch, triton, CUDA, flexikern git sha)."""
    machine_info["flexikern"] = metadata()


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    report = outcome.get_result()
    file = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
    if report.when == "call" and report.passed:
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        record = benchmark_record(fixture, file) if fixture is not None else None
        if record is not None:
            append_jsonl(path, record)
    elif report.skipped and report.when in ("setup", "call") and "benchmark" in item.fixturenames:
        append_jsonl(path, {"type": "skip", "file": file, "name": item.name, "reason": _skip_reason(report)})
    elif report.failed:
        text = report.longreprtext.splitlines()
        errors = [line[1:].strip() for line in text if line.startswith("E ")]   # pytest's error lines
        reason = errors[0] if errors else (text[-1] if text else "")
        append_jsonl(path, {"type": "fail", "file": file, "name": item.name, "when": report.when,
                            "reason": reason[:300]})
