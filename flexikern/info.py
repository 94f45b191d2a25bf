"""`python -m flexikern.info`: what flexikern can use here, and why not.

Lists the versions, the device, the compiled extension's build, and every op's backends in
priority order with the reason each one cannot run (the xformers.info idea).
"""

from __future__ import annotations

import importlib
import os
import platform

import torch

from flexikern import __version__

__all__ = ["report", "main"]


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def _probe_inputs(op: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Small typical inputs, to ask each backend whether it would run them."""
    x = torch.empty(1, 4, 8, 8, device=device, dtype=dtype)
    if op == "patchify":
        return dict(x=x, patch_size=(2, 2))
    if op == "unpatchify":
        return dict(tokens=torch.empty(1, 16, 16, device=device, dtype=dtype), patch_size=(2, 2), size=(8, 8))
    if op == "patch_embed":
        return dict(x=x, weight=torch.empty(8, 4, 4, 4, device=device, dtype=dtype), bias=None,
                    patch_size=(2, 2), pos_embed=None, size_embed=None)
    if op == "de_embed":
        return dict(x=torch.empty(1, 16, 8, device=device, dtype=dtype),
                    weight=torch.empty(64, 8, device=device, dtype=dtype), bias=None, kernel_size=(4, 4),
                    patch_size=(2, 2), size=(8, 8))
    if op == "varlen_attention":
        q = torch.empty(80, 2, 72, device=device, dtype=dtype)
        return dict(q=q, k=q, v=q, cu_seqlens=torch.tensor([0, 64, 80], dtype=torch.int32, device=device),
                    max_seqlen=64, scale=None)
    return {}


def report() -> str:
    from flexikern.ops._dispatch import backends, forced_backend, triton_interpreting
    lines = [f"flexikern {__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}",
             f"flash-attn {_version('flash_attn')}, xformers {_version('xformers')}, "
             f"diffusers {_version('diffusers')}, transformers {_version('transformers')} "
             f"(flexikern.pipelines: diffusers; PixArt and Latte also transformers)"]
    if torch.cuda.is_available():
        device = torch.device("cuda")
        lines.append(f"device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
                     f"capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        device = torch.device("cpu")
        why = "a CPU build of torch" if torch.version.cuda is None else "no visible GPU"
        lines.append(f"device: cpu ({why}); Triton kernels run only under TRITON_INTERPRET=1 "
                     f"(now {'on' if triton_interpreting() else 'off'}) and when forced")
    try:
        from flexikern import _ext
        reason = _ext.unavailable_reason()
        lines.append("extension flexikern._C: " + ("loaded" if reason is None else f"unavailable ({reason})"))
        info = _ext.build_info()
        if info:
            lines.append("  build: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    except ImportError as e:
        lines.append(f"extension flexikern._C: unavailable ({e})")
    if os.environ.get("FLEXIKERN_BACKEND"):
        lines.append(f"FLEXIKERN_BACKEND={os.environ['FLEXIKERN_BACKEND']}")
    lines.append("")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines.append(f"ops (backends in priority order, probed with small {device.type} {dtype} inputs):")
    for op, entries in backends().items():
        inputs = _probe_inputs(op, device, dtype)
        forced = forced_backend(op)
        chosen = None
        lines.append(f"  {op}" + (f"  [forced: {forced}]" if forced else ""))
        for backend in entries:
            if inputs:
                reasons = backend.not_supported_reasons(**inputs)
            else:  # no typical inputs to probe with: report whether it can run at all
                reasons = [r for r in [backend.unavailable_reason()] if r]
            if not reasons and device.type == "cpu" and not backend.auto_on_cpu:
                reasons = ["runs CPU tensors only when forced (slow emulation)"]
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            if not reasons and chosen is None:
                chosen = backend.name
                status += "  <- chosen"
            lines.append(f"    {backend.name:<14} {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    argparse.ArgumentParser(prog="python -m flexikern.info",
                            description="Which op backends run here, and why the others do not.").parse_args(argv)
    print(report())


if __name__ == "__main__":
    main()
