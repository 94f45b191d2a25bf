"""Checks of the scalar arguments of `fk.sample`, schedules, guidance and samplers: one place each.

Each raises naming the argument, its value and what was expected. Bools are never numbers here
(True is not a step count, a scale or a seed).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

SEED_LIMIT = 2 ** 63   # torch.Generator.manual_seed takes more; an int64 holds every seed


def check_flag(value: Any, name: str) -> bool:
    """True or False (not 1, "yes" or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected True or False")
    return value


def check_positive_int(value: Any, name: str, expected: str = "a positive int") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return value


def parse_counts(text: str, sep: str) -> list[int] | None:
    """The counts in `text` separated by `sep` ("10,15" -> [10, 15]; spaces around each allowed),
    or None when a part is not plain ASCII digits: no sign, and no "1_0" or other digits that
    `int()` would silently read."""
    parts = [part.strip() for part in text.split(sep)]
    if not all(part.isascii() and part.isdigit() for part in parts):
        return None
    return [int(part) for part in parts]


def is_finite(value: Any) -> bool:
    """A real number (numpy's too), not a bool, NaN or inf."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_finite(value: Any, name: str, expected: str) -> float:
    """`value` as a float; raises ValueError for a non-number, a bool, NaN or inf."""
    if not is_finite(value):
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return float(value)


def check_seed(value: Any, name: str = "seed") -> int:
    """A random seed as an int in [0, 2**63); numpy and 0-dim tensor ints are accepted, bools,
    floats and strings are not."""
    seed = None
    if not isinstance(value, (bool, str, float)) and type(value).__name__ not in ("bool_", "bool"):
        try:
            seed = operator.index(value)
        except TypeError:
            pass
    if seed is None or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}={value!r}: expected an int in [0, 2**63), e.g. 0")
    return seed
