"""Backend dispatch for flexikern's ops (the xformers `ops/fmha` idea).

Every op has a priority list: its backends, in the order they are tried, written out as a plain
tuple in the op's module (`PATCH_EMBED_BACKENDS = (TritonPatchEmbed(), TorchPatchEmbed())`, like
xformers' `_dispatch_fw_priority_list`) and collected into `PRIORITY` by
`flexikern/ops/__init__.py`. A backend is a class that declares what it supports and answers
`not_supported_reasons(**inputs) -> list[str]`; dispatch takes the first backend with no reasons.
When nothing fits, one error lists every backend's reasons. This module imports no op module.

A choice is forced with the environment
(`FLEXIKERN_BACKEND="patch_embed:triton,varlen_attention:torch"`) or with the `use_backend(...)`
context manager, which wins over the environment.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Any, Iterator, Sequence

import torch

from flexikern.ops._cache import constant_while_tracing

__all__ = ["Backend", "PRIORITY", "declare", "backends", "select", "dispatch", "use_backend",
           "forced_backend", "triton_interpreting"]


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (`TRITON_INTERPRET=1`), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@constant_while_tracing   # torch.compile runs it while tracing (imports are not traced)
def import_failure(modules: tuple[str, ...]) -> str | None:
    """Why importing one of `modules` fails, or None when they all import."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as e:  # an ImportError, or a broken install raising anything else
            return f"`import {module}` failed ({type(e).__name__}: {e})"
    return None


class Backend:
    """One implementation of one op.

    Subclasses set `op`, `name`, optionally `requires` (modules that must import), and implement
    `__call__(**inputs)` and, where they support less than everything, `not_supported_reasons`.
    """

    op: str = ""
    name: str = ""
    requires: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    # False for backends that can take CPU tensors only through a slow emulation (the Triton
    # interpreter): they run on CPU when forced, never by automatic choice.
    auto_on_cpu: bool = True

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all here (a missing package or build), or None."""
        return import_failure(self.requires)

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        """Why this backend cannot run these inputs; empty when it can."""
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable:
            return [unavailable]
        for value in inputs.values():
            if isinstance(value, torch.Tensor):
                if value.device.type not in self.devices:
                    reasons.append(f"device {value.device.type} not in {self.devices}")
                if value.is_floating_point() and value.dtype not in self.dtypes:
                    reasons.append(f"dtype {value.dtype} not in {self.dtypes}")
                break  # the first tensor argument decides device and dtype
        return reasons

    def __call__(self, **inputs: Any) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.op}:{self.name}>"


# {op: its backends, in priority order}. Filled by flexikern/ops/__init__.py (`declare`).
PRIORITY: dict[str, tuple[Backend, ...]] = {}
_FORCED = threading.local()


def declare(op: str, priority: Sequence[Backend]) -> None:
    """Declare `op` with its priority list: the backends in the order dispatch tries them."""
    names = [backend.name for backend in priority]
    if len(set(names)) != len(names):
        raise ValueError(f"op {op!r}: backend names {names} are not unique")
    wrong = [backend for backend in priority if backend.op != op]
    if wrong:
        raise ValueError(f"op {op!r}: backends {wrong} belong to another op")
    PRIORITY[op] = tuple(priority)


def backends(op: str | None = None) -> dict[str, list[Backend]] | list[Backend]:
    """The backends in priority order: of every op (a dict), or of one op (a list)."""
    if op is None:
        return {name: list(priority) for name, priority in PRIORITY.items()}
    if op not in PRIORITY:
        raise ValueError(f"unknown op {op!r}; known ops: {sorted(PRIORITY)}")
    return list(PRIORITY[op])


def _parse_env() -> dict[str, str]:
    spec = os.environ.get("FLEXIKERN_BACKEND", "").strip()
    forced: dict[str, str] = {}
    if not spec:
        return forced
    for item in spec.split(","):
        op, sep, name = item.strip().partition(":")
        if not sep or not op or not name:
            raise ValueError(
                f"FLEXIKERN_BACKEND={spec!r}: item {item!r} must look like 'op:backend', "
                "e.g. FLEXIKERN_BACKEND='patch_embed:triton,varlen_attention:torch'")
        forced[op.strip()] = name.strip()
    return forced


def forced_backend(op: str) -> str | None:
    """The backend name forced for `op` (context manager first, then FLEXIKERN_BACKEND), or None."""
    stack = getattr(_FORCED, "stack", [])
    for frame in reversed(stack):
        if op in frame:
            return frame[op]
    return _parse_env().get(op)


def _validate_forced(forced: dict[str, str]) -> None:
    for op, name in forced.items():
        if op not in PRIORITY:
            raise ValueError(f"unknown op {op!r} in a forced backend; known ops: {sorted(PRIORITY)}")
        names = [b.name for b in PRIORITY[op]]
        if name not in names:
            raise ValueError(f"unknown backend {name!r} for op {op!r}; known backends: {names}")


@contextlib.contextmanager
def use_backend(**forced: str) -> Iterator[None]:
    """Force backends inside a `with` block: `with fk.ops.use_backend(patch_embed="torch"): ...`."""
    _validate_forced(forced)
    stack = getattr(_FORCED, "stack", None)
    if stack is None:
        stack = _FORCED.stack = []
    stack.append(dict(forced))
    try:
        yield
    finally:
        stack.pop()


def select(op: str, **inputs: Any) -> Backend:
    """The backend that `dispatch` would run for these inputs."""
    candidates = backends(op)
    name = forced_backend(op)
    if name is not None:
        _validate_forced({op: name})
        backend = next(b for b in candidates if b.name == name)
        reasons = backend.not_supported_reasons(**inputs)
        if reasons:
            raise RuntimeError(f"{op}: the forced backend {name!r} cannot run these inputs: "
                               f"{'; '.join(reasons)}. Unset FLEXIKERN_BACKEND or choose another.")
        return backend
    on_cpu = any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in inputs.values())
    failures = []
    for backend in candidates:
        reasons = backend.not_supported_reasons(**inputs)
        if on_cpu and not backend.auto_on_cpu:
            reasons = reasons + ["runs CPU tensors only when forced (an emulation, slow)"]
        if not reasons:
            return backend
        failures.append(f"  {backend.name}: {'; '.join(reasons)}")
    shapes = {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in inputs.items()
              if isinstance(v, torch.Tensor)}
    raise RuntimeError(f"{op}: no backend supports these inputs {shapes}:\n" + "\n".join(failures))


def dispatch(op: str, **inputs: Any) -> Any:
    """Run `op` on the first backend of its priority list that supports the inputs."""
    return select(op, **inputs)(**inputs)

