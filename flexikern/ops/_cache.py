"""Caches of derived constant tensors that are right in every grad mode.

A value cached while `torch.inference_mode()` is on would be an inference tensor, and a later
training step could not save it for backward ("Inference tensors cannot be saved for
backward"). Every cache in the package therefore builds its value through `building()`: outside
inference mode and without autograd, so the value is an ordinary constant tensor that any later
code, inference or training, can read. Cached values hold no weights (nothing that can change
under them): only constants derived from sizes, devices and dtypes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, TypeVar

import torch

__all__ = ["building", "tensor_cache"]

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Inside: new tensors are ordinary (not inference) tensors that record no autograd graph."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def tensor_cache(maxsize: int) -> Callable[[F], F]:
    """`functools.lru_cache(maxsize)` for a function of hashable arguments that builds constant
    tensors, each built inside `building()` (`cache_clear` and `cache_info` work as usual).

    A cached tensor is shared by every caller; one a caller modified in place (its version
    moved) is never returned again: the cache is cleared and the value rebuilt."""
    def decorate(fn: F) -> F:
        @functools.lru_cache(maxsize=maxsize)
        def build(*args):
            with building():
                value = fn(*args)
            return value, _version(value)

        @functools.wraps(fn)
        def cached(*args):
            value, version = build(*args)
            if _version(value) != version:   # modified in place by a caller
                build.cache_clear()
                value, _ = build(*args)
            return value

        cached.cache_clear, cached.cache_info = build.cache_clear, build.cache_info
        return cached
    return decorate


def _version(value) -> int | None:
    """A tensor's version counter (bumped by every in-place write); None for other values."""
    return value._version if isinstance(value, torch.Tensor) else None
