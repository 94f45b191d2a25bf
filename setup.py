"""Build flexikern's C++/CUDA extension flexikern._C, and map kernels/ to flexikern.kernels.

The metadata (name, version, dependencies, extras, entry point) is in pyproject.toml. Install with
`pip install --no-build-isolation .` (`-e .` for development): the extension is compiled against
the installed torch, which an isolated build environment would not have.

The extension (csrc/) is always built for CPU; its CUDA kernels are added when torch has CUDA
and nvcc is found. Knobs (environment):
  FLEXIKERN_SKIP_CUDA_BUILD=1   build the CPU extension only
  FLEXIKERN_CUDA_ARCHS="80;90a" GPU architectures: one -gencode each, plus PTX of the newest
  MAX_JOBS=N                    parallel compile jobs (default: sized from cores and RAM)
The build is recorded in flexikern/_build_info.json (flexikern._ext.build_info()).
"""

import json
import os
import platform
import subprocess
import sysconfig
import time

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_SOURCES = ["csrc/ops.cpp", "csrc/patchify_cpu.cpp", "csrc/python_module.cpp"]
CUDA_SOURCES = ["csrc/ops_cuda.cpp", "csrc/patchify_cuda.cu"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(cmd: list[str], last: bool = False) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    lines = out.splitlines() or ["unknown"]
    return lines[-1] if last else lines[0]


def _set_max_jobs(with_cuda: bool) -> None:
    """MAX_JOBS from cores and RAM when unset (nvcc jobs take more memory than g++ ones)."""
    if os.environ.get("MAX_JOBS"):
        return
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    per_job_gb = 4.0 if with_cuda else 2.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb / per_job_gb))))


def cuda_arch_flags(archs: str) -> list[str]:
    """One -gencode per arch ("80;90a" or "8.0;9.0a"), plus PTX of the newest so that newer GPUs
    can JIT it.

    The PTX drops an arch-specific suffix ("90a" -> compute_90): "a" PTX runs on that exact
    arch only, which would defeat the point of shipping PTX.
    """
    names = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not names:
        raise ValueError(f"FLEXIKERN_CUDA_ARCHS={archs!r}: expected e.g. '80;90a'")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in names]
    newest = max(names, key=lambda a: int(a.rstrip("af")))
    ptx = newest.rstrip("af")
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def _extension_build():
    """(ext_modules, cmdclass) for flexikern._C, or nothing when torch is not importable."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("flexikern: torch is not importable; skipping the C++ extension")
        return [], {}

    archs = os.environ.get("FLEXIKERN_CUDA_ARCHS", "80;90a")
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and not _env_flag("FLEXIKERN_SKIP_CUDA_BUILD"))
    _set_max_jobs(with_cuda)
    # -fopenmp: at::parallel_for parallelises through OpenMP pragmas inlined from ATen headers.
    cxx = ["-O3", "-fopenmp"]
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "flexikern._C", CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("FLEXIKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + cuda_arch_flags(archs)},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("flexikern._C", CPU_SOURCES,
                                         extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])

    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if with_cuda else None
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "nvcc": _first_line([nvcc, "--version"], last=True) if nvcc else None,
        "cuda_archs": archs if with_cuda else None,
        "cxx": _first_line([os.environ.get("CXX") or sysconfig.get_config_var("CXX").split()[0],
                            "--version"]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "max_jobs": int(os.environ["MAX_JOBS"]),
    }

    class BuildExtensionWithInfo(cpp_extension.BuildExtension):
        """Builds with ninja, then records the build in flexikern/_build_info.json."""

        def finalize_options(self):
            super().finalize_options()
            # Keep objects between builds so ninja recompiles only what changed: pip's editable
            # builds otherwise use a fresh temporary folder and rebuild everything each time.
            self.build_temp = os.path.join(ROOT, "build", "flexikern-ext")

        def run(self):
            super().run()
            record = dict(info, built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            targets = {os.path.join(ROOT, "flexikern")}
            if not self.inplace:
                targets.add(os.path.join(os.path.abspath(self.build_lib), "flexikern"))
            for folder in targets:
                if os.path.isdir(folder):
                    with open(os.path.join(folder, "_build_info.json"), "w") as f:
                        json.dump(record, f, indent=2, sort_keys=True)
                        f.write("\n")

    return [ext], {"build_ext": BuildExtensionWithInfo.with_options(use_ninja=True)}


EXT_MODULES, CMDCLASS = _extension_build()

setup(
    # Every folder under flexikern/ (the asset folders too, as setuptools counts any folder a
    # package), plus the Triton kernels, which live in kernels/ at the top.
    packages=(find_namespace_packages(include=["flexikern", "flexikern.*"], exclude=["*.__pycache__"])
              + ["flexikern.kernels"]),
    package_dir={"flexikern.kernels": "kernels"},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
)
