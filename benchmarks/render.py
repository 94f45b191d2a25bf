"""Render stored benchmark results as a markdown table and a PNG plot.

    python benchmarks/render.py benchmarks/results/cpu            # a folder of pytest-benchmark JSON
    python benchmarks/render.py out.json --out benchmarks/results/cpu

Writes `results.md` and `e2e.png` next to the results (or into --out) and prints the markdown.
Everything shown comes from the stored rows: the end-to-end throughput table, the goals computed
by `_results.goals`, and every other benchmark's median with its recorded figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import TARGET_STEPS, goals, load_rows  # noqa: E402

# extra_info fields worth a column in the "other benchmarks" table, when a row has them.
OTHER_FIELDS = ("tflops", "achieved_tflops", "achieved_gb_s", "fraction_of_copy", "relative_flops", "speedup")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def header(meta: dict) -> list[str]:
    device = meta.get("device", "unknown device")
    lines = [f"# Benchmark results: {device}", ""]
    if device == "cpu":
        lines += ["**CPU figures** (toy sizes, shared CPU): they check that the benchmarks run and "
                  "say nothing about GPU speed.", ""]
    versions = ", ".join(f"{k} {meta[k]}" for k in ("torch", "triton", "cuda", "flexikern_git", "capability")
                         if meta.get(k))
    return lines + [f"Versions: {versions}.", ""]


def e2e_table(rows: list[dict]) -> list[str]:
    e2e = [r for r in rows if r.get("suite") == "e2e"]
    e2e.sort(key=lambda r: r["batch"])   # stable: providers keep the order they ran in
    if not e2e:
        return []
    steps = {r["steps"] for r in e2e}
    lines = ["## End-to-end sampling", "",
             f"{e2e[0]['model']}, {e2e[0]['dtype']}, guidance on every step. Timed with {sorted(steps)} "
             f"steps; images/s is per-step throughput extrapolated to {TARGET_STEPS} steps "
             f"(batch / (seconds per step x {TARGET_STEPS})).", "",
             "| batch | provider | relative FLOPs | s / step | images/s | model TFLOP/s | vs reference |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in e2e:
        ref = next((x for x in e2e if x["batch"] == r["batch"] and x["provider"] == "reference"), None)
        speedup = r["images_per_s"] / ref["images_per_s"] if ref else None
        lines.append(f"| {r['batch']} | {r['provider']} | {r['relative_flops']:.3f} | "
                     f"{r['seconds_per_step'] * 1e3:.2f} ms | {_fmt(r['images_per_s'])} | "
                     f"{_fmt(r['model_tflops'])} | {_fmt(speedup)}x |")
    return lines + [""]


def goals_table(rows: list[dict]) -> list[str]:
    lines = ["## Goals", "", "| goal | value | target | status | measured on |", "|---|---:|---:|---|---|"]
    for name, g in goals(rows).items():
        lines.append(f"| {g['description']} | {_fmt(g['value'])} | {g['target']} | {g['status']} | {g['detail']} |")
    return lines + [""]


def other_table(rows: list[dict]) -> list[str]:
    other = [r for r in rows if r.get("suite") != "e2e"]
    if not other:
        return []
    fields = [f for f in OTHER_FIELDS if any(f in r for r in other)]
    lines = ["## Other benchmarks", "", "| benchmark | median | " + " | ".join(fields) + " |",
             "|---|---:|" + "---:|" * len(fields)]
    for r in sorted(other, key=lambda r: (r.get("group") or "", r["name"])):
        median = r["median_s"]
        shown = f"{median * 1e3:.3f} ms" if median < 1 else f"{median:.3f} s"
        lines.append(f"| {r['name']} | {shown} | " + " | ".join(_fmt(r.get(f)) for f in fields) + " |")
    return lines + [""]


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    e2e = [r for r in rows if r.get("suite") == "e2e"]
    if not e2e:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in e2e})
    providers = list(dict.fromkeys(r["provider"] for r in e2e))
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6.0, 4.5 * len(batches)), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        found = {r["provider"]: r for r in e2e if r["batch"] == batch}
        names = [p for p in providers if p in found]
        values = [found[p]["images_per_s"] for p in names]
        errors = [[found[p]["images_per_s"] - batch / (found[p]["q3_s"] / found[p]["steps"] * TARGET_STEPS)
                   for p in names],
                  [batch / (found[p]["q1_s"] / found[p]["steps"] * TARGET_STEPS) - found[p]["images_per_s"]
                   for p in names]]
        ax.barh(names, values, xerr=errors, color=["#888" if p == "reference" else "#3a7" for p in names])
        ax.set_title(f"batch {batch}")
        ax.set_xlabel(f"images/s ({TARGET_STEPS} steps)")
        ax.invert_yaxis()
    device = meta.get("device", "?")
    label = " (CPU, toy sizes)" if device == "cpu" else ""
    fig.suptitle(f"{e2e[0]['model']} sampling throughput on {device}{label}\n"
                 f"bars: median, whiskers: q1-q3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(paths: list[str], out: Path | None = None) -> str:
    rows, meta = load_rows(paths)
    if not rows:
        raise SystemExit(f"no pytest-benchmark rows found in {paths}")
    out = out or (Path(paths[0]) if Path(paths[0]).is_dir() else Path(paths[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    lines = header(meta) + e2e_table(rows) + goals_table(rows) + other_table(rows)
    if plot(rows, meta, out / "e2e.png"):
        lines += ["![end-to-end throughput](e2e.png)", ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="pytest-benchmark JSON files or folders of them")
    parser.add_argument("--out", type=Path, default=None, help="where results.md and e2e.png go")
    args = parser.parse_args()
    print(render(args.paths, args.out))


if __name__ == "__main__":
    main()
