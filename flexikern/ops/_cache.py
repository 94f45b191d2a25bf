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

__all__ = ["building", "tensor_cache", "constant_while_tracing"]

F = TypeVar("F", bound=Callable)


def constant_while_tracing(fn: F) -> F:
    """Mark `fn` as `torch.compiler.assume_constant_result` does: torch.compile calls it for real
    while tracing and puts its result in the graph as a constant (no graph break, no guard). For
    functions of constants whose result does not change in a process: imports, availability,
    small matrices. Marked without importing torch._dynamo (which imports triton) when flexikern
    is imported: this is the attribute that decorator sets (torch 2.x)."""
    fn._dynamo_marked_constant = True
    return fn


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Inside: new tensors are ordinary (not inference) tensors that record no autograd graph."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def tensor_cache(maxsize: int, small: bool = False) -> Callable[[F], F]:
    """`functools.lru_cache(maxsize)` for a function of hashable arguments that builds constant
    tensors, each built inside `building()` (`cache_clear` and `cache_info` work as usual).

    A cached tensor is shared by every caller; one a caller modified in place (its version
    moved) is never returned again: the cache is cleared and the value rebuilt.

    Under torch.compile nothing is looked up while the graph runs: the function is traced into
    the graph (its ops run from constants: positional tables are elementwise), or, with `small`
    (a matrix of a few hundred values whose construction is not worth tracing, e.g. a pinv), its
    values are read once while tracing and embedded in the graph as a constant. A `small`
    function's last two arguments are the device and dtype of its result.
    """
    def decorate(fn: F) -> F:
        @functools.lru_cache(maxsize=maxsize)
        def build(*args):
            with building():
                value = fn(*args)
            return value, _version(value)

        def lookup(*args):
            value, version = build(*args)
            if _version(value) != version:   # modified in place by a caller
                build.cache_clear()
                value, _ = build(*args)
            return value

        @constant_while_tracing   # run for real while tracing: its nested tuples of floats are
        @functools.wraps(fn)      # a constant of the graph (a tensor result is not: dynamo
        def values(*args):        # mishandles two of them from one function in one graph)
            return _nested_tuple(lookup(*args).tolist())

        @functools.wraps(fn)
        def cached(*args):
            if not torch.compiler.is_compiling():
                return lookup(*args)
            if small:
                return torch.tensor(values(*args), device=args[-2], dtype=args[-1])
            return fn(*args)   # traced into the graph

        cached.cache_clear, cached.cache_info = build.cache_clear, build.cache_info
        return cached
    return decorate


def _nested_tuple(value):
    """`tensor.tolist()`'s nested lists as nested tuples (constants torch.compile can embed)."""
    return tuple(map(_nested_tuple, value)) if isinstance(value, list) else value


def _version(value) -> int | None:
    """A tensor's version counter (bumped by every in-place write); None for other values."""
    return value._version if isinstance(value, torch.Tensor) else None
