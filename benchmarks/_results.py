"""Benchmark results: who measured what, where they go, and the goals computed from them.

Rows are pytest-benchmark's JSON (`--benchmark-json`); `metadata()` is added to its machine_info
(benchmarks/conftest.py) so every file says which device and versions produced it. Results live
under `benchmarks/results/<device>/`, `<device>` being `device_slug()` ("cpu" without CUDA).
`goals(rows)` turns the end-to-end rows into the ratios the project promises (README numbers come
from here, never from memory).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_STEPS = 250   # DiT's sampling: 250 DDPM steps

# The targets: (name, description, threshold).
GOALS = {
    "speedup_vs_reference": ("FlexiDiT 0.6 + kernels + graphs vs plain-PyTorch static DiT, images/s, "
                             "largest batch", 2.5),
    "graphs_step_latency_cut": ("static FlexiDiT eager / graphed seconds per step, batch 1", 1.5),
    "fraction_of_matmul": ("model TFLOP/s (static + graphs, largest batch) / bf16 GEMM TFLOP/s at "
                           "DiT-XL's MLP shape", 0.55),
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
                    multiprocessors=props.multi_processor_count)
    return info


def load_rows(paths: list[str | Path]) -> tuple[list[dict], dict]:
    """Benchmark rows and the first file's metadata from JSON files or folders of them."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    rows, meta = [], {}
    for f in files:
        data = json.loads(f.read_text())
        if "benchmarks" not in data:
            continue
        meta = meta or data.get("machine_info", {}).get("flexikern", {})
        for b in data["benchmarks"]:
            rows.append({"name": b["name"], "group": b.get("group"), "median_s": b["stats"]["median"],
                         "q1_s": b["stats"]["q1"], "q3_s": b["stats"]["q3"], "rounds": b["stats"]["rounds"],
                         **b.get("extra_info", {})})
    return rows, meta


def _e2e(rows: list[dict], provider: str, batch: int | None = None) -> dict | None:
    found = [r for r in rows if r.get("suite") == "e2e" and r.get("provider") == provider
             and (batch is None or r.get("batch") == batch)]
    return found[0] if found else None


def goals(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Each goal: its value (None when the rows that define it are missing), target and status."""
    batches = sorted({r["batch"] for r in rows if r.get("suite") == "e2e"})
    largest = batches[-1] if batches else None
    out: dict[str, dict[str, Any]] = {}

    def put(name, value, detail):
        description, target = GOALS[name]
        status = "n/a" if value is None else ("met" if value >= target else "missed")
        out[name] = dict(description=description, value=value, target=target, status=status, detail=detail)

    ref, fast = _e2e(rows, "reference", largest), _e2e(rows, "flexi_0.6+graphs", largest)
    fast_device = _e2e(rows, "flexi_0.6+graphs+device_noise", largest)
    if fast_device and (not fast or fast_device["images_per_s"] > fast["images_per_s"]):
        fast = fast_device
    put("speedup_vs_reference",
        fast["images_per_s"] / ref["images_per_s"] if ref and fast else None,
        f"batch {largest}: {fast['provider']} vs reference" if ref and fast else "needs CUDA rows")
    eager, graphed = _e2e(rows, "static", 1), _e2e(rows, "static+graphs", 1)
    put("graphs_step_latency_cut",
        eager["seconds_per_step"] / graphed["seconds_per_step"] if eager and graphed else None,
        "batch 1" if eager and graphed else "needs CUDA rows at batch 1")
    model = _e2e(rows, "static+graphs", largest)
    gemm = next((r for r in rows if r.get("suite") == "matmul"), None)
    put("fraction_of_matmul",
        model["model_tflops"] / gemm["tflops"] if model and gemm else None,
        f"{model['model_tflops']:.1f} / {gemm['tflops']:.1f} TFLOP/s" if model and gemm else "needs CUDA rows")
    return out
