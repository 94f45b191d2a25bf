"""Training data: images (or latents) with class labels, in memory, and a resumable batch order.

Every source ends up as a `TensorData` (x: (N, C, H, W) float32, y: (N,) int64):

* `TensorData(x, y)` / `TensorData.from_npz(path)`: tensors or an .npz of images/latents + labels;
* `image_folder(root, size)`: one subfolder per class (sorted names = class ids), read with PIL,
  resized to `size`, scaled to [-1, 1];
* `teacher_samples(model, n, ...)`: data-free distillation. Users of a released checkpoint rarely
  have its training set, so x0 is sampled from the teacher itself (its original patch size) and
  cached as an .npz; the trainer then noises these x0 like real data.

`BatchOrder` makes the data position a function of the step alone: epoch e is the permutation
drawn from `seed + e`, and global batch `step` takes positions [step * B, (step + 1) * B) of the
concatenated epochs. Resuming at step s therefore continues with exactly the batches an
uninterrupted run would have seen, whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexikern.files import atomic_write
from flexikern.ops._checks import is_int, max_seed

__all__ = ["TensorData", "BatchOrder", "image_folder", "teacher_samples", "shapes_data"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEACHER_SEED_STRIDE = 1_000_003    # teacher sample i is seeded seed * stride + i: seeds never overlap


class TensorData:
    """Images or latents `x` (N, C, H, W) with integer class labels `y` (N,)."""

    def __init__(self, x: Any, y: Any) -> None:
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x: expected a float (N, C, H, W) array, got {x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"y: expected {x.shape[0]} integer labels, got {y.dtype} {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x: the dataset is empty")
        self.x, self.y = x.float().contiguous(), y.long().contiguous()

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "TensorData":
        """Keys: images as "x", "images" or "latents"; labels as "y" or "labels"."""
        with np.load(path, allow_pickle=False) as f:
            xk = next((k for k in ("x", "images", "latents") if k in f), None)
            yk = next((k for k in ("y", "labels") if k in f), None)
            if xk is None or yk is None:
                raise ValueError(f"{path}: expected arrays 'x' (or 'images'/'latents') and 'y' (or 'labels'), "
                                 f"found {sorted(f.keys())}")
            return cls(f[xk], f[yk])

    def save_npz(self, path: str | os.PathLike) -> None:
        """Write x and y as an .npz (`flexikern.files.atomic_write`: the old file or the new one)."""
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=self.x.numpy(), y=self.y.numpy())

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1


class BatchOrder:
    """Global batch `step` -> dataset indices; epoch e is `randperm(N)` seeded with `seed + e`."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        positions = range(step * batch_size, (step + 1) * batch_size)
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in positions])


def image_folder(root: str | os.PathLike, size: int | None = None) -> TensorData:
    """A class-per-subfolder image tree (`root/<class>/<image>`) as RGB in [-1, 1].

    Classes are the sorted subfolder names; images are resized (bicubic) to `size` x `size`
    when given, else must all share one size.
    """
    from PIL import Image

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise ValueError(f"image_folder: {root} has no class subfolders (expected root/<class>/<image>)")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32)
            if xs and arr.shape != xs[0].shape:
                raise ValueError(f"image_folder: {f} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                                 f"{xs[0].shape[1]}x{xs[0].shape[0]}; pass size= to resize them")
            xs.append(arr)
            ys.append(label)
    if not xs:
        raise ValueError(f"image_folder: no images ({', '.join(_IMAGE_SUFFIXES)}) under {root}")
    x = np.stack(xs).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return TensorData(x.astype(np.float32), np.asarray(ys))


def shapes_data(n: int, size: int = 16, seed: int = 0) -> TensorData:
    """The generated shapes dataset (`flexikern.datasets.make_shapes`) as training data."""
    from flexikern.datasets import make_shapes
    return TensorData(*make_shapes(n, size=size, seed=seed))


def teacher_samples(model: Any, n: int, steps: int = 50, cache: str | os.PathLike | None = None,
                    seed: int = 0, guidance_scale: float = 1.0, batch_size: int = 256,
                    sampler: str = "ddpm", progress: bool = False, clip_denoised: bool = False) -> TensorData:
    """x0 for data-free distillation: `n` class-balanced samples of the teacher at its original size.

    With `cache`, an existing file is reused when it was made by the same call (same teacher
    weights, n, steps, seed, guidance, sampler, clipping: a key stored in the file), otherwise the
    samples are drawn again and the file is replaced.
    `guidance_scale` > 1 samples with classifier-free guidance (the teacher needs a null class).
    `clip_denoised` clips the predicted x0 to [-1, 1] (pixel-space models).
    """
    from flexikern.diffusion import Guidance, Schedule, make_sampler, sample

    if not (is_int(seed) and 0 <= seed <= max_seed(n, TEACHER_SEED_STRIDE)):
        raise ValueError(f"seed={seed!r}: sample i is seeded seed * {TEACHER_SEED_STRIDE} + i, below 2**63; "
                         f"with n={n} pass a seed in [0, {max_seed(n, TEACHER_SEED_STRIDE)}]")
    key = _teacher_key(model, n=n, steps=steps, seed=seed, guidance_scale=guidance_scale, sampler=sampler,
                       clip_denoised=clip_denoised)
    if cache is not None and Path(cache).exists():
        try:
            with np.load(cache, allow_pickle=False) as f:
                if "key" in f and str(f["key"]) == key:
                    return TensorData(f["x"], f["y"])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            pass    # not a readable cache: sample again and replace it
    schedule = Schedule.static(steps, model.original_patch_size)
    guidance = Guidance(guidance_scale, "cfg") if guidance_scale != 1.0 else None
    y = torch.arange(n) % model.num_classes
    chunks = []
    for start in range(0, n, batch_size):
        yb = y[start:start + batch_size]
        chunks.append(sample(model, yb, schedule, guidance, progress=progress,
                             sampler=make_sampler(sampler, steps, clip_denoised=clip_denoised),
                             seed=[seed * TEACHER_SEED_STRIDE + i for i in range(start, start + len(yb))]).cpu())
    data = TensorData(torch.cat(chunks), y)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=data.x.numpy(), y=data.y.numpy(), key=np.array(key))
    return data


def _teacher_key(model: Any, **settings: Any) -> str:
    """What teacher samples depend on: the settings and a digest of the teacher's weights."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return json.dumps({**settings, "weights": digest.hexdigest()}, sort_keys=True)
