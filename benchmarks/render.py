"""Render stored benchmark results as a markdown table and a PNG plot.

    python benchmarks/render.py benchmarks/results/cpu            # a folder of .jsonl / .json rows
    python benchmarks/render.py e2e.jsonl ops.jsonl --out DIR      # files (rows or pytest-benchmark JSON)

Writes `results.md` and `e2e.png` (when there are end-to-end rows and matplotlib) next to the
results (or into --out) and prints the markdown. Everything shown comes from the stored rows: the
ceilings measured in the run, the end-to-end throughput, the goals computed by `_results.goals`,
every other benchmark with its figures, and what was skipped or failed and why. Partial results
(a stage that timed out, no rows at all) render too: missing figures show as "-", goals as "n/a".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import TARGET_STEPS, Results, goals, load_results  # noqa: E402

# extra_info fields shown in the "other benchmarks" table, in this order, when some row has them.
OTHER_FIELDS = {
    "regime": "regime", "mode": "mode", "achieved_gb_s": "GB/s", "fraction_of_copy": "of copy",
    "achieved_tflop_s": "TFLOP/s", "fraction_of_gemm": "of GEMM", "launch_bound": "launch-bound",
    "relative_flops": "relative FLOPs", "speedup_vs_static": "vs static", "speedup_vs_eager": "vs eager",
}
TEXT_FIELDS = {"regime", "mode", "launch_bound"}
SUITE_ORDER = ["ceiling", "patchify", "embed", "attention", "sampling"]   # others after, by name


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _seconds(value) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.2f} us"
    return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.3f} s"


def _smoke(results: Results) -> bool:
    return results.meta.get("device") == "cpu" or any(r.get("smoke") for r in results.rows)


def header(results: Results) -> list[str]:
    meta = results.meta
    device = meta.get("device", "unknown device")
    lines = [f"# Benchmark results: {device}", ""]
    if _smoke(results):
        lines += ["**CPU smoke figures** (toy sizes, a shared CPU, host timer): they check that the "
                  "benchmarks run and say nothing about GPU speed.", ""]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "cuda", "flexikern_git", "capability")
                         if meta.get(k))
    if versions:
        lines += [f"Versions: {versions}.", ""]
    if not results.rows:
        lines += ["**No benchmark rows** were found (did the stages run out of time?).", ""]
    return lines


def ceilings(rows: list[dict]) -> list[str]:
    """The copy bandwidth and GEMM rate of this run (every row carries the ones of its process)."""
    copy = next((r["copy_gb_s"] for r in rows if isinstance(r.get("copy_gb_s"), (int, float))), None)
    gemm = next((r["gemm_tflop_s"] for r in rows if isinstance(r.get("gemm_tflop_s"), (int, float))), None)
    if copy is None and gemm is None:
        return []
    return [f"Ceilings measured in this run (each process measures its own; see each row): device "
            f"copy {_fmt(copy)} GB/s, GEMM {_fmt(gemm)} TFLOP/s. `of copy` / `of GEMM` below are "
            f"fractions of these.", ""]


def e2e_table(rows: list[dict]) -> list[str]:
    e2e = [r for r in rows if r.get("suite") == "e2e"]
    if not e2e:
        return []
    e2e.sort(key=lambda r: -(r.get("batch") or 0))   # stable: providers keep the order they ran in
    steps = sorted({r.get("steps") for r in e2e if r.get("steps")})
    first = e2e[0]
    lines = ["## End-to-end sampling", "",
             f"{first.get('model', '?')}, {first.get('dtype', '?')}, guidance on every step. Timed with "
             f"{steps} steps; images/s is per-step throughput extrapolated to {TARGET_STEPS} steps "
             f"(batch / (seconds per step x {TARGET_STEPS})). Warm-up: the untimed first run's seconds "
             f"(graph captures; for `+compile` rows, torch.compile's compile time).", "",
             "| batch | provider | relative FLOPs | s / step | images/s | model TFLOP/s | of GEMM | warm-up "
             "| vs reference | vs reference+compile |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def speedup(r: dict, baseline: str) -> str:
        ref = next((x for x in e2e if x.get("batch") == r.get("batch") and x.get("provider") == baseline), None)
        value = (r["images_per_s"] / ref["images_per_s"]
                 if ref and r.get("images_per_s") and ref.get("images_per_s") else None)
        return f"{_fmt(value)}{'x' if value else ''}"

    for r in e2e:
        lines.append(f"| {_fmt(r.get('batch'))} | {_fmt(r.get('provider'))} | {_fmt(r.get('relative_flops'))} | "
                     f"{_seconds(r.get('seconds_per_step'))} | {_fmt(r.get('images_per_s'))} | "
                     f"{_fmt(r.get('model_tflop_s'))} | {_fmt(r.get('fraction_of_gemm'))} | "
                     f"{_seconds(r.get('warmup_s'))} | {speedup(r, 'reference')} | "
                     f"{speedup(r, 'reference+compile')} |")
    return lines + [""]


def goals_table(rows: list[dict]) -> list[str]:
    lines = ["## Goals", "", "| goal | value | target | status | measured on |", "|---|---:|---:|---|---|"]
    for g in goals(rows).values():
        lines.append(f"| {g['description']} | {_fmt(g['value'])} | {g['target']} | {g['status']} | {g['detail']} |")
    return lines + [""]


def failures(results: Results) -> list[str]:
    if not results.failures and not results.problems:
        return []
    lines = ["## Failed", ""]
    lines += [f"* `{f.get('name')}` ({f.get('file')}): {f.get('reason')}" for f in results.failures]
    lines += [f"* unreadable: {p}" for p in results.problems]
    return lines + [""]


def other_table(rows: list[dict]) -> list[str]:
    other = [r for r in rows if r.get("suite") != "e2e"]
    if not other:
        return []
    fields = [f for f in OTHER_FIELDS if any(f in r for r in other)]
    lines = ["## Other benchmarks", "",
             "Time per op call: the median over rounds (CUDA events on a GPU; see benchmarks/_timing.py).", "",
             "| benchmark | group | per call | " + " | ".join(OTHER_FIELDS[f] for f in fields) + " |",
             "|---|---|---:|" + "".join("---|" if f in TEXT_FIELDS else "---:|" for f in fields)]

    def order(r):
        suite = str(r.get("suite") or "")
        rank = SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)
        return rank, suite, str(r.get("group") or ""), str(r.get("name"))

    for r in sorted(other, key=order):
        per_call = r.get("seconds_per_call", r.get("median_s"))
        lines.append(f"| {r.get('name')} | {_fmt(r.get('group'))} | {_seconds(per_call)} | "
                     + " | ".join(_fmt(r.get(f)) for f in fields) + " |")
    return lines + [""]


def skipped(results: Results) -> list[str]:
    if not results.skips:
        return []
    by_reason: dict[str, list[str]] = {}
    for s in results.skips:
        by_reason.setdefault(str(s.get("reason")), []).append(f"`{s.get('name')}`")
    lines = ["## Skipped", ""]
    return lines + [f"* {reason}: {', '.join(names)}" for reason, names in by_reason.items()] + [""]


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    """A bar chart of images/s per provider and batch (q1-q3 whiskers); False when nothing to plot."""
    needed = ("batch", "provider", "images_per_s", "steps", "q1_s", "q3_s")
    e2e = [r for r in rows if r.get("suite") == "e2e" and all(r.get(k) for k in needed)]
    if not e2e:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("render: matplotlib is not installed; no e2e.png", file=sys.stderr)
        return False

    def images_per_s(r, seconds):
        return r["batch"] / (seconds / r["steps"] * TARGET_STEPS)

    batches = sorted({r["batch"] for r in e2e}, reverse=True)
    providers = list(dict.fromkeys(r["provider"] for r in e2e))
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.5 * len(batches)), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        found = {r["provider"]: r for r in e2e if r["batch"] == batch}
        names = [p for p in providers if p in found]
        values = [found[p]["images_per_s"] for p in names]
        errors = [[max(0.0, found[p]["images_per_s"] - images_per_s(found[p], found[p]["q3_s"])) for p in names],
                  [max(0.0, images_per_s(found[p], found[p]["q1_s"]) - found[p]["images_per_s"]) for p in names]]
        ax.barh(names, values, xerr=errors, color=["#888" if p.startswith("reference") else "#3a7" for p in names])
        ax.set_title(f"batch {batch}")
        ax.set_xlabel(f"images/s ({TARGET_STEPS} steps)")
        ax.invert_yaxis()
    device = meta.get("device", "?")
    label = " (CPU smoke test, toy sizes)" if device == "cpu" or any(r.get("smoke") for r in e2e) else ""
    fig.suptitle(f"{e2e[0].get('model', '?')} sampling throughput on {device}{label}\n"
                 f"bars: median, whiskers: q1-q3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(paths: list[str], out: Path | None = None) -> str:
    results = load_results(paths)
    first = Path(paths[0]) if paths else Path(".")
    out = out or (first if first.is_dir() or not first.suffix else first.parent)   # a folder, even if missing
    out.mkdir(parents=True, exist_ok=True)
    rows = results.rows
    picture = ["![end-to-end throughput](e2e.png)", ""] if plot(rows, results.meta, out / "e2e.png") else []
    lines = (header(results) + ceilings(rows) + e2e_table(rows) + picture + goals_table(rows)
             + failures(results) + other_table(rows) + skipped(results))
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help=".jsonl row files, pytest-benchmark JSON files, or folders of them")
    parser.add_argument("--out", type=Path, default=None, help="where results.md and e2e.png go")
    args = parser.parse_args()
    print(render(args.paths, args.out))


if __name__ == "__main__":
    main()
