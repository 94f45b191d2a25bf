"""The package installs whole: a wheel built from the checkout runs the demo from a fresh venv.

The wheel is built without build isolation (the extension compiles against this torch), from a
copy of the files git tracks or would track, so that nothing the checkout built or left behind
(the editable install's extension, build/) can stand in for what the wheel lacks. The fresh venv
gets its dependencies (torch, numpy, ...) from this interpreter's site-packages through a .pth
line, which adds that folder to sys.path without running its .pth files, so the checkout's
editable install stays out; the test checks that flexikern comes from the wheel. About a minute
on 2 cores, most of it compiling the CPU extension.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import flexikern

ROOT = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    """Why a wheel cannot be built here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (the wheel's extension builds against it)"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        return "no C++ compiler (c++, g++, clang++) to build flexikern._C"
    # Not find_spec("pip"): setuptools' distutils shim answers that by switching itself off, after
    # which importing setuptools (torch.compile's C++ builds do) fails on the stdlib distutils.
    try:
        importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return "pip is not installed in this interpreter"
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return "not a git checkout: the wheel is built from the files git tracks"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _run(cmd: list, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _copy_checkout(dest: Path) -> None:
    """The files git tracks or would track (the working tree's version), as a fresh clone has them."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], 60, cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():                 # tracked but deleted in the working tree: skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def test_wheel_installs_and_runs_the_demo_from_a_fresh_venv(tmp_path):
    src, wheels, venv, work = (tmp_path / d for d in ("src", "wheels", "venv", "work"))
    _copy_checkout(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "TRITON_INTERPRET")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
          "-w", wheels, src], 600, env={**env, "FLEXIKERN_SKIP_CUDA_BUILD": "1"})
    wheel, = wheels.glob("flexikern-*.whl")

    _run([sys.executable, "-m", "venv", "--without-pip", venv], 120, env=env)
    python = venv / "bin" / "python"
    # --ignore-installed: this pip, run for the venv, still sees the checkout's editable install.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--ignore-installed", "--no-deps",
          "--no-index", wheel], 300, env=env)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], 60,
                     env=env).stdout.strip())
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work.mkdir()
    out = _run([python, "-c", "import torch, flexikern, flexikern._C, importlib.metadata as m; "
                "print(flexikern.__file__); print(flexikern._C.__file__); print(flexikern.__version__); "
                "print(m.version('flexikern'))"], 120, cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in out[:2]), (out, site)
    assert out[2] == out[3] == flexikern.__version__

    png = work / "demo.png"
    done = _run([python, "-m", "flexikern", "demo", "--steps", "4", "--num-samples", "10", "--out", png],
                300, cwd=work, env=env)
    assert png.stat().st_size > 0 and "speed-up" in done.stdout
    assert "usage: flexikern" in _run([venv / "bin" / "flexikern", "--help"], 120, cwd=work, env=env).stdout
