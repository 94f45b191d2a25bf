"""argparse types shared by the commands (`flexikern sample`, `train`, `finetune`, `eval`, ...):
each parses one flag's text or raises `argparse.ArgumentTypeError` saying what to write."""

from __future__ import annotations

import argparse

from flexikern.ops.patch_size import PatchSize

__all__ = ["patch_size_arg", "patch_sizes_arg", "classes_arg", "schedule_arg", "interval_arg", "positive_int",
           "fraction_arg"]


def patch_size_arg(text: str) -> PatchSize:
    """"4" -> PatchSize (4, 4); "2x4" -> (2, 4): `PatchSize.parse`, with argparse's error type."""
    try:
        return PatchSize.parse(text, ndim=2, name="patch size")
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}; write e.g. 4 or 2x4") from None


def patch_sizes_arg(text: str) -> tuple[PatchSize, ...]:
    """"2,4" -> ((2, 2), (4, 4))."""
    return tuple(patch_size_arg(p) for p in text.split(",") if p.strip())


def classes_arg(text: str) -> list[int]:
    """"1,2,3" or ranges "0-9,20" -> a list of class ids."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected class ids like 1,2,3 or a range like 0-999") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least one class id")
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
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI in model timesteps, e.g. 0,700") from None
    return lo, hi


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive fraction of the static schedule's "
                                         f"FLOPs, e.g. 0.6")
    return value
