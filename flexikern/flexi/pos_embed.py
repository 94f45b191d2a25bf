"""Fixed sin-cos positional tables at original-grid patch coordinates (DESIGN.md).

A token of a patch `ratio` times the original patch size covers `ratio` original tokens per
axis; it sits at the centre of those: coordinate `i * ratio + (ratio - 1) / 2`. At the original
size this is DiT's `get_2d_sincos_pos_embed` (first half of the channels: the column
coordinate, second half: the row coordinate; `sin` before `cos`; computed in float64).
Tables are regenerated per grid and cached, never interpolated.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["sincos_1d", "sincos_2d"]


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(len(pos), dim) float64: `[sin(pos * omega), cos(pos * omega)]`, omega = 10000^(-k/(dim/2))."""
    if dim % 2:
        raise ValueError(f"dim={dim}: a sin-cos embedding needs an even dimension")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def _coords(n: int, ratio: float) -> torch.Tensor:
    # DiT builds its grid with np.float32 before the float64 product; keep that rounding.
    return (torch.arange(n, dtype=torch.float64) * ratio + (ratio - 1) / 2).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _sincos_2d(dim: int, grid: tuple[int, int], ratio: tuple[float, float], device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"dim={dim}: a 2-D sin-cos embedding needs a multiple of 4")
    gh, gw = grid
    rows = _coords(gh, ratio[0])[:, None].expand(gh, gw)
    cols = _coords(gw, ratio[1])[None, :].expand(gh, gw)
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.to(device=device, dtype=dtype)


def sincos_2d(dim: int, grid: tuple[int, int], ratio: tuple[float, float] = (1.0, 1.0),
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(gh*gw, dim) table for a (gh, gw) token grid whose patches are `ratio` original patches wide.

    Cached per (dim, grid, ratio, device, dtype): do not modify the returned tensor in place.
    """
    return _sincos_2d(int(dim), (int(grid[0]), int(grid[1])), (float(ratio[0]), float(ratio[1])),
                      torch.device(device or "cpu"), dtype)
