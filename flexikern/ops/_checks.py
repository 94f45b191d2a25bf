"""Input validation: bad input never reaches a kernel (or any compute).

The ops' tensor checks, and the scalar checks of the whole package (here, in the lowest layer,
so every layer applies the same rules: a bool is never a number, numpy ints are ints). Each
raises naming the argument, its value and what was expected. Patch sizes are read by
`flexikern.ops.patch_size.PatchSize.parse`, the one parser.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED_LIMIT = 2 ** 63   # torch.Generator.manual_seed takes more; an int64 holds every seed


def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
                 device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected one of {list(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the other inputs are on {device}; "
                         "move them to one device")


def check_same_dtype(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    """`t` (a weight or bias) must have x's dtype, as F.conv2d and F.linear require, unless
    autocast is on (it casts both)."""
    if t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}; cast one to the other "
                        f"(e.g. x.to({name}.dtype)) or run under torch.autocast")


def check_size(name: str, size) -> tuple[int, ...]:
    """An output size given as (H, W) or (F, H, W) positive ints (numpy ints too), as a tuple."""
    ok = (isinstance(size, (tuple, list, torch.Size)) and len(size) in (2, 3)
          and all(is_int(s) and s > 0 for s in size))
    if not ok:
        raise ValueError(f"{name}={size!r}: expected (H, W) or (F, H, W) of positive ints")
    return tuple([operator.index(s) for s in size])   # static under torch.compile (`is_int`)


def check_divides(name: str, sizes: Sequence[int], patch: Sequence[int]) -> None:
    """Spatial `sizes` must be positive multiples of `patch`."""
    if any([s <= 0 for s in sizes]):
        raise ValueError(f"{name}: spatial size {tuple(sizes)} has an empty axis; expected positive "
                         f"multiples of the patch size {tuple(patch)}")
    if any([s % p for s, p in zip(sizes, patch)]):
        raise ValueError(f"{name}: spatial size {tuple(sizes)} is not divisible by patch size "
                         f"{tuple(patch)}; crop or pad the input to a multiple of the patch size")


# ----------------------------------------------------------------------------- scalars


def check_flag(value: Any, name: str) -> bool:
    """True or False (not 1, "yes" or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected True or False")
    return value


def is_int(value: Any) -> bool:
    """A Python or numpy integer (numbers.Integral), not a bool; or, inside torch.compile, a
    symbolic int (`torch.SymInt`: an int the graph is not specialised on, such as a dynamic batch
    size, or a patch size after the compiler saw two values). `operator.index(value)` specialises
    the graph on a symbolic int's value (`int()` does not)."""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_positive_int(value: Any, name: str, expected: str = "a positive int") -> int:
    """`value` as an int >= 1 (numpy ints too; a symbolic int stays symbolic); raises ValueError
    for anything else."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r}: expected {expected}")
    return value if isinstance(value, torch.SymInt) else int(value)


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


def max_seed(n: int, stride: int = 1) -> int:
    """The largest seed s for which the seeds s * stride + i of n samples (i < n) stay below 2**63."""
    return (SEED_LIMIT - n) // stride
