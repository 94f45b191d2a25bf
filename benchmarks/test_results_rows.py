"""The result rows: conftest's writer, `_results`' loader and goals, render.py on partial results.

A unit test (no benchmark, no GPU; a few seconds on CPU): a GPU stage killed by its time limit
leaves a .jsonl file with some rows and maybe half a line, and render.py must still produce the
table, with the goals it cannot compute as "n/a".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import _results
import render
from _results import append_jsonl, goals, load_results

HERE = Path(__file__).resolve().parent


def _row(name: str, **extra) -> dict:
    return {"type": "row", "file": "test_bench_e2e.py", "name": name, "group": "e2e", "median_s": 1.0,
            "q1_s": 0.9, "q3_s": 1.1, "min_s": 0.8, "max_s": 1.2, "rounds": 3, "iterations": 1,
            "timer": "perf_counter", "extra_info": extra}


def _e2e(provider: str, batch: int, images_per_s: float, smoke: bool = False, **more) -> dict:
    return _row(f"test_bench_e2e[{provider}-batch{batch}]", suite="e2e", provider=provider, batch=batch,
                steps=10, images_per_s=images_per_s, seconds_per_step=batch / (images_per_s * 250),
                model="DiT-XL/2", dtype="bfloat16", relative_flops=1.0, smoke=smoke, **more)


def _partial_file(folder: Path) -> Path:
    """What a stage killed mid-run leaves: two rows, a skip, and a half-written last line."""
    path = folder / "e2e.jsonl"
    append_jsonl(path, _e2e("reference", 32, 2.0))
    append_jsonl(path, _e2e("flexi_0.6+graphs", 32, 6.0, model_tflop_s=300.0, gemm_tflop_s=600.0))
    append_jsonl(path, {"type": "skip", "file": "test_bench_e2e.py", "name": "test_bench_e2e[x]",
                        "reason": "no reason"})
    with open(path, "a") as f:
        f.write('{"type": "row", "name": "test_bench_e2e[static-batch32]", "median')
    return path


def test_writer_and_loader(tmp_path):
    path = _partial_file(tmp_path)
    kinds = [json.loads(line)["type"] for line in path.read_text().splitlines()[:-1]]
    assert kinds == ["metadata", "row", "row", "skip"]   # the metadata line once, first
    results = load_results([tmp_path])
    assert [r["provider"] for r in results.rows] == ["reference", "flexi_0.6+graphs"]
    assert results.rows[0]["median_s"] == 1.0 and results.rows[0]["iterations"] == 1   # stats, flat
    assert results.meta["device"] == _results.device_name() and results.meta["torch"] == torch.__version__
    assert [s["name"] for s in results.skips] == ["test_bench_e2e[x]"]
    assert len(results.problems) == 1 and "e2e.jsonl:5" in results.problems[0]


def test_goals_from_partial_rows(tmp_path):
    g = goals(load_results([_partial_file(tmp_path)]).rows)
    assert g["speedup_vs_reference"]["value"] == pytest.approx(3.0)
    assert g["speedup_vs_reference"]["status"] == "met"
    assert g["speedup_vs_compiled_reference"]["status"] == "n/a"   # no reference+compile row
    assert g["fraction_of_gemm"]["status"] == "n/a"          # no static row
    assert g["graphs_step_latency_cut"]["status"] == "n/a"   # no batch-1 rows
    complete = [_e2e("static", 32, 3.0, fraction_of_gemm=0.5), _e2e("static", 1, 0.1),
                _e2e("static+graphs", 1, 0.2)]
    g = goals([_results._flat(r) for r in complete])
    assert g["fraction_of_gemm"]["value"] == 0.5 and g["fraction_of_gemm"]["status"] == "missed"
    assert g["graphs_step_latency_cut"]["value"] == pytest.approx(2.0)
    smoke = [_results._flat(_e2e(p, 32, 1.0, smoke=True)) for p in ("reference", "flexi_0.6")]
    assert goals(smoke)["speedup_vs_reference"]["status"] == "n/a"   # CPU rows never count


def test_speedup_vs_compiled_reference():
    """Against the compiled plain DiT, FlexiDiT's best row counts compiled ones too; the eager goal
    stays eager vs eager (a compiled FlexiDiT row never counts against the eager reference)."""
    rows = [_results._flat(r) for r in (
        _e2e("reference", 32, 2.0), _e2e("reference+compile", 32, 4.0), _e2e("flexi_0.6", 32, 5.0),
        _e2e("flexi_0.6+graphs", 32, 6.0), _e2e("flexi_0.6+compile", 32, 9.0, warmup_s=95.0),
        _e2e("flexi_0.6+compile+graphs", 32, 11.0), _e2e("static", 32, 20.0),   # static: not a budget row
        _e2e("reference+compile", 1, 0.5), _e2e("flexi_0.6+compile", 32, 50.0, smoke=True))]   # never count
    g = goals(rows)
    compiled = g["speedup_vs_compiled_reference"]
    assert compiled["value"] == pytest.approx(11.0 / 4.0) and compiled["status"] == "met"
    assert compiled["detail"] == "batch 32: flexi_0.6+compile+graphs / reference+compile"
    assert g["speedup_vs_reference"]["value"] == pytest.approx(6.0 / 2.0)   # flexi_0.6+graphs / reference
    missed = goals([r for r in rows if r["provider"] != "flexi_0.6+compile+graphs"])
    assert missed["speedup_vs_compiled_reference"]["value"] == pytest.approx(9.0 / 4.0)
    assert missed["speedup_vs_compiled_reference"]["status"] == "missed"
    text = "\n".join(render.e2e_table(rows) + render.goals_table(rows))
    assert "| 32 | flexi_0.6+compile | 1 | 14.222 ms | 9 | - | - | 95.000 s | 4.5x | 2.25x |" in text
    assert "| 2.75 | 2.5 | met | batch 32: flexi_0.6+compile+graphs / reference+compile |" in text


def test_render_partial_and_empty(tmp_path):
    _partial_file(tmp_path)
    text = render.render([str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == text
    assert "| 32 | flexi_0.6+graphs |" in text and "| met |" in text and "| n/a |" in text
    assert "## Skipped" in text and "unreadable" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    text = render.render([str(empty)])
    assert "No benchmark rows" in text and text.count("| n/a |") == len(_results.GOALS)


def test_pytest_benchmark_json_still_loads(tmp_path):
    data = {"machine_info": {"flexikern": {"device": "cpu"}},
            "benchmarks": [{"name": "test_x", "group": "g", "extra_info": {"suite": "x"},
                            "stats": {"median": 2.0, "q1": 1.0, "q3": 3.0, "rounds": 5, "iterations": 4}}]}
    (tmp_path / "ops.json").write_text(json.dumps(data))
    results = load_results([tmp_path])
    assert results.meta == {"device": "cpu"}
    assert results.rows == [{"name": "test_x", "group": "g", "median_s": 2.0, "q1_s": 1.0, "q3_s": 3.0,
                             "min_s": None, "max_s": None, "rounds": 5, "iterations": 4, "suite": "x"}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU check (CI runs it); it would only cost "
                                                      "the GPU stage seconds")
def test_conftest_writes_rows_as_they_finish(tmp_path):
    """The real hook, in a pytest of its own: a timed row, a skip and a failure, each one line."""
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent("""
        import pytest

        def test_timed(benchmark):
            benchmark.extra_info["suite"] = "tiny"
            benchmark.pedantic(lambda: sum(range(100)), rounds=3, iterations=2)

        def test_skipped(benchmark):
            pytest.skip("not here")

        def test_broken(benchmark):
            raise ValueError("boom")
    """))
    rows = tmp_path / "rows.jsonl"
    env = dict(os.environ, FLEXIKERN_BENCH_ROWS=str(rows),
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_tiny.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr   # test_broken fails, by design
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert [r["type"] for r in records] == ["metadata", "row", "skip", "fail"]
    row = records[1]
    assert row["name"] == "test_timed" and row["rounds"] == 3 and row["iterations"] == 2
    assert row["extra_info"] == {"suite": "tiny"} and row["timer"] == "perf_counter"
    assert records[2]["reason"] == "not here" and "boom" in records[3]["reason"]
    assert load_results([rows]).rows[0]["suite"] == "tiny"
