"""argparse types shared by the commands (`flexikern sample`, `train`, `finetune`, `eval`, ...):
each parses one flag's text or raises `argparse.ArgumentTypeError` saying what to write, so a bad
flag is one `error:` line before any work. Paths the commands write are checked here too
(`output_file_arg`, `output_dir_arg`): a run never loses its work to a bad output path at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

from flexikern.ops.patch_size import PatchSize

__all__ = ["patch_size_arg", "patch_sizes_arg", "classes_arg", "schedule_arg", "interval_arg", "positive_int",
           "nonnegative_int", "seed_arg", "fraction_arg", "positive_float", "nonnegative_float", "finite_float",
           "probability_arg", "device_arg", "output_file_arg", "output_dir_arg", "model_arg", "shipped_models",
           "add_threads_arg", "resolve_guidance", "IMAGE_SUFFIXES", "FIGURE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")   # what save_grid (Pillow) writes
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")                    # what matplotlib writes


def patch_size_arg(text: str) -> PatchSize:
    """"4" -> PatchSize (4, 4); "2x4" -> (2, 4): `PatchSize.parse`, with argparse's error type."""
    try:
        return PatchSize.parse(text, ndim=2, name="patch size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; write e.g. 4 or 2x4") from None


def patch_sizes_arg(text: str) -> tuple[PatchSize, ...]:
    """"2,4" -> ((2, 2), (4, 4))."""
    sizes = tuple(patch_size_arg(p) for p in text.split(",") if p.strip())
    if not sizes:
        raise argparse.ArgumentTypeError(f"{text!r}: expected patch sizes like 2,4 or 2,2x4")
    return sizes


MAX_CLASSES = 1_000_000    # more class ids than any class-conditional model has: a typo like 0-99999999999


def classes_arg(text: str) -> list[int]:
    """"1,2,3" or ranges "0-9,20" -> a list of class ids."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected class ids like 1,2,3 or a range like "
                                             "0-999") from None
        if first > last:
            raise argparse.ArgumentTypeError(f"{text!r}: the range {part.strip()} is empty (from > to); write "
                                             f"{last}-{first}")
        if len(out) + last - first >= MAX_CLASSES:
            raise argparse.ArgumentTypeError(f"{text!r}: more than {MAX_CLASSES} class ids; write the model's "
                                             "classes, e.g. 0-999")
        out.extend(range(first, last + 1))
    return out


def schedule_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """"static", "weak_first:N[,M]", "weak_last:N[,M]" or the paper's "x/y"."""
    hint = ("write static, weak_first:N (the first N steps weak), weak_first:N,M (M guidance steps "
            "weak), weak_last:N, or the paper's x/y (powerful for the last x conditional / y guidance steps)")
    kind, _, numbers = text.partition(":")
    try:
        if text == "static":
            return "static", ()
        if "/" in text and not numbers:
            return "notation", tuple(int(v) for v in text.split("/", 1))
        if kind in ("weak_first", "weak_last") and numbers:
            counts = tuple(int(v) for v in numbers.split(","))
            if len(counts) in (1, 2) and min(counts) >= 0:
                return kind, counts
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: {hint}")


def interval_arg(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI in model timesteps with 0 <= LO <= HI, "
                                         "e.g. 0,700")
    return lo, hi


def _number(text: str, kind: type, ok: Callable[[float], bool], expected: str) -> float:
    """`kind(text)` if it parses, is finite and passes `ok`; else ArgumentTypeError saying `expected`."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def seed_arg(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2 ** 63, "a seed: an integer in [0, 2**63)")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive finite number, e.g. 1e-4")


def nonnegative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a finite number >= 0")


def finite_float(text: str) -> float:
    return _number(text, float, lambda v: True, "a finite number")


def probability_arg(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def fraction_arg(text: str) -> float:
    return _number(text, float, lambda v: v > 0,
                   "a positive fraction of the static schedule's FLOPs, e.g. 0.6")


def device_arg(text: str) -> str:
    """"cpu", "cuda", "cuda:1", "mps", ...: a device torch knows and this machine has."""
    import torch
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: not a device; write cpu, cuda, cuda:1 or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) is a CPU build without "
                                             "CUDA; use --device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count or count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} visible GPU(s)"
                                             + (f"; use cuda:0 ... cuda:{count - 1}" if count else
                                                "; use --device cpu"))
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: flexikern runs on cpu, cuda or mps")
    return text


def resolve_guidance(scale: float | None, mode: str | None, default_scale: float,
                     default_mode: str) -> tuple[float, str]:
    """(scale, mode) from --guidance and --guidance-mode (None: not given). A scale of 1 guides
    nothing in every mode (DiT's `cfg_scale > 1`), so it means mode "none"; ValueError, naming both
    flags, when they contradict each other (a scale with mode none, a mode with scale 1)."""
    value = default_scale if scale is None else scale
    if mode is None:
        return value, (default_mode if value != 1 else "none")
    if mode == "none" and scale is not None and scale != 1:
        raise ValueError(f"--guidance {scale} --guidance-mode none: mode none does not guide, so the scale is "
                         "unused; drop one of them")
    if mode != "none" and value == 1:
        raise ValueError(f"--guidance-mode {mode}: the guidance scale is 1{'' if scale else ' (the default)'}, "
                         "which guides nothing; pass --guidance S with S != 1 (e.g. 1.5 or 4)")
    return (1.0, mode) if mode == "none" else (value, mode)


# ----------------------------------------------------------------------------- paths
def _unwritable(path: Path) -> str | None:
    """Why nothing can be created at `path` (its folders made as needed), or None."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as e:
        return f"cannot write in {ancestor} ({e.strerror or e})"
    return None


def output_file_arg(*suffixes: str) -> Callable[[str], str]:
    """An argparse type for a file a command will write, with one of `suffixes` (".png", ...):
    checked before the command runs, so no work is lost to a bad path at the end."""
    def output_file(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: an empty path; give a file name, e.g. out{suffixes[0]}")
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r}: is a directory; give a file name, e.g. "
                                             f"{path / ('out' + suffixes[0])}")
        if path.suffix.lower() not in suffixes:
            got = f"the extension {path.suffix!r}" if path.suffix else "no extension"
            raise argparse.ArgumentTypeError(f"{text!r}: {got}; expected a file name ending in "
                                             f"{', '.join(suffixes)}")
        why = _unwritable(path)
        if why:
            raise argparse.ArgumentTypeError(f"{text!r}: {why}")
        return text
    return output_file


def output_dir_arg(text: str) -> str:
    """An argparse type for a folder a command will write into (made if missing)."""
    if not text.strip():     # Path("") is the current folder: a run would scatter its files there
        raise argparse.ArgumentTypeError(f"{text!r}: an empty path; give a folder, e.g. runs/a (or . for "
                                         "the current one)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: is a file; expected a folder")
    why = _unwritable(path / "_") if path.is_dir() else _unwritable(path)
    if why:
        raise argparse.ArgumentTypeError(f"{text!r}: {why}")
    return text


# ----------------------------------------------------------------------------- models
def shipped_models() -> dict[str, Path]:
    """The models under flexikern/assets/ by name (e.g. "shapes16" -> its save_pretrained folder)."""
    assets = Path(__file__).resolve().parent / "assets"
    return {p.name: p for p in sorted(assets.iterdir()) if (p / "config.json").exists()}


def model_arg(text: str) -> str:
    """--model: a shipped model's name (`shipped_models`) becomes its folder; anything else is kept
    (a path or a config name, which the command resolves)."""
    shipped = shipped_models()
    if text in shipped and not os.path.exists(text):
        return str(shipped[text])
    return text


def add_threads_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int | None) -> None:
    """--threads: torch CPU threads (one definition for every command)."""
    parser.add_argument("--threads", type=positive_int, default=default,
                        help="torch CPU threads (default: " + ("torch's" if default is None else
                             f"{default}; small models run faster on one thread of a busy CPU") + ")")
