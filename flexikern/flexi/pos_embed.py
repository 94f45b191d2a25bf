"""Fixed sin-cos positional tables at original-grid patch coordinates (FlexiDiT, arXiv 2502.20126, Sec. 3.2).

A token of a patch `ratio` times the original patch size covers `ratio` original tokens per
axis; it sits at the centre of those: coordinate `i * ratio + (ratio - 1) / 2`. At the original
size this is DiT's `get_2d_sincos_pos_embed` (first half of the channels: the column
coordinate, second half: the row coordinate; `sin` before `cos`; computed in float64).
Tables are regenerated per grid and cached (as ordinary tensors, even when first built under
`torch.inference_mode()`: `flexikern.ops._cache`), never interpolated.
"""

from __future__ import annotations

import torch

from flexikern.ops._cache import tensor_cache

__all__ = ["sincos_1d", "sincos_2d", "sincos_2d_scaled", "sincos_frames"]


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


@tensor_cache(maxsize=64)
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


# ------------------------------------------------------------------ PixArt / Latte (diffusers numerics)

@tensor_cache(maxsize=64)
def _sincos_2d_scaled(dim: int, grid: tuple[int, int], ratio: tuple[float, float], base_size: int,
                      interpolation_scale: float, original_grid: tuple[int, int], frames: int,
                      device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if dim % 4:
        raise ValueError(f"dim={dim}: a 2-D sin-cos embedding needs a multiple of 4")
    gh, gw = grid
    # diffusers' `get_2d_sincos_pos_embed`: float32 `arange(g) / (g / base_size) / interpolation_scale`,
    # here with g the ORIGINAL-patch grid and arange replaced by the patch centres in it.
    rows = _coords(gh, ratio[0]) / (original_grid[0] / base_size) / interpolation_scale
    cols = _coords(gw, ratio[1]) / (original_grid[1] / base_size) / interpolation_scale
    rows, cols = rows[:, None].expand(gh, gw), cols[None, :].expand(gh, gw)
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.repeat(frames, 1).to(device=device, dtype=dtype)


def sincos_2d_scaled(dim: int, grid: tuple[int, int], ratio: tuple[float, float], base_size: int,
                     interpolation_scale: float, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32, frames: int = 1) -> torch.Tensor:
    """PixArt's (and Latte's) spatial table: positions normalised to a `base_size` grid.

    A (gh, gw) token grid of patches `ratio` original patches wide; the original-patch grid is
    (gh * ratio[0], gw * ratio[1]); token centres in it are divided by (original grid / base_size)
    and by `interpolation_scale`, in float32 as diffusers does. At ratio 1 this is diffusers'
    `get_2d_sincos_pos_embed(dim, grid, base_size=..., interpolation_scale=...)` bit for bit.
    `frames` > 1 repeats the (gh*gw, D) table for that many frames (groups) of a video's tokens.
    Cached: do not modify the returned tensor in place.
    """
    original = (round(grid[0] * ratio[0]), round(grid[1] * ratio[1]))
    return _sincos_2d_scaled(int(dim), (int(grid[0]), int(grid[1])), (float(ratio[0]), float(ratio[1])),
                             int(base_size), float(interpolation_scale), original, int(frames),
                             torch.device(device or "cpu"), dtype)


@tensor_cache(maxsize=64)
def _sincos_frames(dim: int, frames: int, ratio: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return sincos_1d(dim, _coords(frames, float(ratio))).to(device=device, dtype=dtype)


def sincos_frames(dim: int, frames: int, ratio: int = 1, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(frames, dim) temporal table (Latte's `temp_pos_embed`) for tokens spanning `ratio` frames each.

    A token merging frames `ratio*j .. ratio*j + ratio - 1` sits at their centre. Together with
    `sincos_2d_scaled` per frame this is the factorised 3-D table Latte uses (spatial added at the
    embedding, temporal before the first temporal block). Cached: do not modify it in place.
    """
    return _sincos_frames(int(dim), int(frames), int(ratio), torch.device(device or "cpu"), dtype)
