"""Benchmark results: who measured what, where the rows go, and the goals computed from them.

Rows are written as they finish (benchmarks/conftest.py): with FLEXIKERN_BENCH_ROWS=<file.jsonl>
every finished benchmark appends one JSON line to that file, flushed at once, so that a stage
killed by a timeout keeps every row it finished. The lines (`append_jsonl`):

    {"type": "metadata", "metadata": {device, torch, triton, cuda, flexikern git sha, ...}}
    {"type": "row", "file": "test_bench_e2e.py", "name": "test_bench_e2e[static-batch32]",
     "group": "...", "median_s": ..., "q1_s": ..., "q3_s": ..., "min_s": ..., "max_s": ...,
     "rounds": ..., "iterations": ..., "timer": "...", "extra_info": {...}}
    {"type": "skip", "file": "...", "name": "...", "reason": "..."}
    {"type": "fail", "file": "...", "name": "...", "when": "call", "reason": "the error's first line"}

A metadata line comes first from every process that appends to a file (once per file and process).
Times are seconds per iteration of the timed function (pytest-benchmark's figures); extra_info's
`seconds_per_call` is per op call where one iteration holds several (a replayed CUDA graph).
`load_results` reads these .jsonl files and pytest-benchmark's own --benchmark-json files alike.
Results live under `benchmarks/results/<device>/`, `<device>` being `device_slug()` ("cpu" without
CUDA). `goals(rows)` turns the end-to-end rows into the ratios the project promises (README numbers
come from here, never from memory); CPU smoke rows never count towards a goal.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROWS_ENV = "FLEXIKERN_BENCH_ROWS"
TARGET_STEPS = 250   # DiT's sampling: 250 DDPM steps
REFERENCE_BATCH = 32  # the batch of the speed-up and GEMM goals
# The FlexiDiT rows at <= 0.6 FLOPs (test_bench_e2e.py's providers): the eager ones count against
# the eager reference, all of them (compiled included) against the compiled one.
EAGER_FLEXI = ("flexi_0.6", "flexi_0.6+packed", "flexi_0.6+graphs")
FLEXI = EAGER_FLEXI + ("flexi_0.6+compile", "flexi_0.6+compile+graphs")

# The targets: name -> (description, threshold).
GOALS = {
    "speedup_vs_reference": ("FlexiDiT at <= 0.6 relative FLOPs (best of eager, packed, graphs) vs the "
                             "plain-PyTorch DiT, images/s, batch 32", 2.5),
    "speedup_vs_compiled_reference": ("FlexiDiT at <= 0.6 relative FLOPs (best of every flexi_0.6 row, compiled "
                                      "ones included) vs the plain DiT under torch.compile, images/s, batch 32",
                                      2.5),
    "fraction_of_gemm": ("FlexiDiT static p=2 model TFLOP/s (best of eager, graphs), batch 32 / bf16 GEMM "
                         "TFLOP/s measured in the same run", 0.55),
    "graphs_step_latency_cut": ("static FlexiDiT seconds per step, eager / CUDA graphs, batch 1", 1.5),
}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_slug(name: str | None = None) -> str:
    """A folder name for a device: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", (name or device_name()).lower()).strip("-") or "unknown"


def _git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata() -> dict[str, Any]:
    """Device and versions: the key every stored result is filed under."""
    import flexikern
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info: dict[str, Any] = {
        "device": device_name(), "device_slug": device_slug(), "torch": torch.__version__,
        "triton": triton_version, "cuda": torch.version.cuda, "flexikern": flexikern.__version__,
        "flexikern_git": _git_sha(), "python": platform.python_version(), "cpu": platform.processor()
        or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    l2_cache_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    return info


# --- writing rows as they finish -----------------------------------------------------------------

_META_WRITTEN: set[str] = set()   # files this process has written its metadata line to


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record to a .jsonl file, this process's metadata line first; flushed at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    key = str(path.resolve())
    if key not in _META_WRITTEN:
        lines.append({"type": "metadata", "metadata": metadata()})
        _META_WRITTEN.add(key)
    lines.append(record)
    text = "".join(json.dumps(line, default=str) + "\n" for line in lines)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def benchmark_record(fixture: Any, file: str) -> dict[str, Any] | None:
    """The row of a finished pytest-benchmark fixture (None when it timed nothing)."""
    meta = getattr(fixture, "stats", None)
    if not meta:
        return None
    stats = meta.stats
    timer = meta.options.get("timer") if isinstance(getattr(meta, "options", None), dict) else None
    return {"type": "row", "file": file, "name": meta.name, "group": meta.group,
            "median_s": stats.median, "q1_s": stats.q1, "q3_s": stats.q3, "min_s": stats.min,
            "max_s": stats.max, "rounds": stats.rounds, "iterations": meta.iterations,
            "timer": getattr(timer, "__name__", None) if timer is not None else None,
            "extra_info": dict(fixture.extra_info)}


# --- reading them back --------------------------------------------------------------------------


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)     # one dict per row: stats + extra_info, flat
    meta: dict = field(default_factory=dict)           # the first metadata found
    skips: list[dict] = field(default_factory=list)    # {"name", "file", "reason"}
    failures: list[dict] = field(default_factory=list)  # {"name", "file", "reason"}
    problems: list[str] = field(default_factory=list)  # unreadable files or lines (skipped)


def _flat(record: dict) -> dict:
    row = {k: v for k, v in record.items() if k not in ("type", "extra_info")}
    return {**row, **(record.get("extra_info") or {})}


def _read_jsonl(path: Path, out: Results) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:   # e.g. the last line of a process killed mid-write
            out.problems.append(f"{path.name}:{number}: not JSON, skipped")
            continue
        kind = record.get("type") if isinstance(record, dict) else None
        if kind == "metadata":
            out.meta = out.meta or dict(record.get("metadata") or {})
        elif kind == "row" and "median_s" in record:
            out.rows.append(_flat(record))
        elif kind in ("skip", "fail"):
            (out.skips if kind == "skip" else out.failures).append(
                {k: record.get(k) for k in ("name", "file", "reason")})
        else:
            out.problems.append(f"{path.name}:{number}: unknown record, skipped")


def _read_benchmark_json(path: Path, out: Results) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        out.problems.append(f"{path.name}: not JSON, skipped")
        return
    if not isinstance(data, dict) or "benchmarks" not in data:
        return   # another kind of JSON in the folder
    out.meta = out.meta or dict(data.get("machine_info", {}).get("flexikern", {}))
    for b in data["benchmarks"]:
        stats = b.get("stats", {})
        out.rows.append({"name": b.get("name"), "group": b.get("group"), "median_s": stats.get("median"),
                         "q1_s": stats.get("q1"), "q3_s": stats.get("q3"), "min_s": stats.get("min"),
                         "max_s": stats.get("max"), "rounds": stats.get("rounds"),
                         "iterations": stats.get("iterations"), **(b.get("extra_info") or {})})


def load_results(paths: list[str | Path]) -> Results:
    """Rows, metadata and skips from .jsonl row files, pytest-benchmark JSON files, or folders of both."""
    files: list[Path] = []
    out = Results()
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.jsonl")) + sorted(p.glob("*.json"))
        elif p.exists():
            files.append(p)
        else:
            out.problems.append(f"{p}: no such file")
    for f in files:
        (_read_jsonl if f.suffix == ".jsonl" else _read_benchmark_json)(f, out)
    return out


def load_rows(paths: list[str | Path]) -> tuple[list[dict], dict]:
    """Benchmark rows and the first metadata found (see `load_results`)."""
    results = load_results(paths)
    return results.rows, results.meta


# --- goals ----------------------------------------------------------------------------------------


def _e2e(rows: list[dict], batch: int, *providers: str) -> list[dict]:
    return [r for r in rows if r.get("suite") == "e2e" and not r.get("smoke") and r.get("batch") == batch
            and r.get("provider") in providers]


def _best(rows: list[dict], key: str) -> dict | None:
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    return max(rows, key=lambda r: r[key]) if rows else None


def goals(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Each goal: its value (None when the rows that define it are missing), target, status, detail.

    Only GPU rows count (CPU rows are `smoke`). Missing rows give status "n/a", never an error.
    """
    out: dict[str, dict[str, Any]] = {}
    smoke_only = any(r.get("smoke") for r in rows) and not any(
        r.get("suite") == "e2e" and not r.get("smoke") for r in rows)
    missing = "CPU smoke rows only" if smoke_only else "rows missing"

    def put(name: str, value: float | None, detail: str) -> None:
        description, target = GOALS[name]
        status = "n/a" if value is None else ("met" if value >= target else "missed")
        out[name] = dict(description=description, value=value, target=target, status=status,
                         detail=detail if value is not None else f"{missing}: {detail}")

    batch = REFERENCE_BATCH
    for name, baseline, providers in (("speedup_vs_reference", "reference", EAGER_FLEXI),
                                      ("speedup_vs_compiled_reference", "reference+compile", FLEXI)):
        reference = _best(_e2e(rows, batch, baseline), "images_per_s")
        flexi = _best(_e2e(rows, batch, *providers), "images_per_s")
        put(name, flexi["images_per_s"] / reference["images_per_s"] if reference and flexi else None,
            f"batch {batch}: {flexi['provider']} / {baseline}" if reference and flexi
            else f"needs {baseline} and flexi_0.6* rows at batch {batch}")

    static = _best(_e2e(rows, batch, "static", "static+graphs"), "fraction_of_gemm")
    put("fraction_of_gemm", static["fraction_of_gemm"] if static else None,
        f"batch {batch}: {static['provider']}, {static.get('model_tflop_s', 0):.1f} / "
        f"{static.get('gemm_tflop_s', 0):.1f} TFLOP/s" if static else f"needs a static row at batch {batch}")

    eager, graphed = _e2e(rows, 1, "static"), _e2e(rows, 1, "static+graphs")
    ok = bool(eager and graphed and eager[0].get("seconds_per_step") and graphed[0].get("seconds_per_step"))
    put("graphs_step_latency_cut",
        eager[0]["seconds_per_step"] / graphed[0]["seconds_per_step"] if ok else None,
        "batch 1: static / static+graphs" if ok else "needs static and static+graphs rows at batch 1")
    return out


if __name__ == "__main__":   # python benchmarks/_results.py FILES...: the goals as JSON
    print(json.dumps(goals(load_results(sys.argv[1:]).rows), indent=2))
