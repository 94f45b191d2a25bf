"""What sampling needs of a model: the `FlexibleDenoiser` protocol.

`fk.sample`, `GuidedDenoiser`, `Schedule` and the CUDA-graph runner use a model through these
members and no others. FlexiDiT, FlexiPixArt and FlexiLatte implement them in their shared base;
a model from another library is converted first (`fk.FlexiDiT.from_diffusers`, ...).
`fk.sample` checks a model once, at its boundary (`check_denoiser`), so a model that lacks a
member fails there with its name rather than somewhere inside a step.
Around its denoising loop `fk.sample` enters `flexikern.models.base.conditions_checked()`: the
conditions were validated once by `check_condition`, so a forward may skip reading their values
back (a device sync per step). It runs the model in eval mode (`eval_mode`: thread-safe, each
submodule's mode restored after), as does calibration.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from flexikern.ops.patch_size import PatchSize

__all__ = ["FlexibleDenoiser", "check_denoiser", "eval_mode"]


@runtime_checkable
class FlexibleDenoiser(Protocol):
    """A diffusion transformer that runs at any of its configured patch sizes.

    A condition `y` is whatever `check_condition` returns: a long (N,) tensor of class labels, or
    a `TextCondition`. Sampling concatenates conditions along the batch (`torch.cat`, or the
    condition's `cat`) and hands them back to `forward` and `forward_packed` unchanged.
    """

    patch_sizes: tuple[PatchSize, ...]    # every size the model runs at
    original_patch_size: PatchSize        # the size it was trained at: the most powerful
    in_channels: int
    training: bool                        # nn.Module's

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent: (C, H, W), or (C, F, H, W) for a video model."""

    @property
    def has_null_class(self) -> bool:
        """Whether `null_condition` exists (a class model trained without class dropout has none)."""

    def check_condition(self, y: Any, n: int | None = None, device: torch.device | None = None) -> Any:
        """`y` validated (on the host, once: forwards inside `fk.sample` trust it) and on `device`.

        Raises:
            ValueError: naming what is wrong (a label out of range, an embedding's channels, ...).
        """

    def null_condition(self, y: Any) -> Any:
        """The guidance branch's condition for `y`'s batch: the null class, or the null caption.

        Raises:
            ValueError: the model has no null condition (`has_null_class` is False).
        """

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Any,
                patch_size: PatchSize | None = None) -> torch.Tensor:
        """The model output for latents `x` at timesteps `t` (N,), at `patch_size` (default: the
        original one)."""

    def forward_packed(self, xs: list[torch.Tensor], t: torch.Tensor, y: Any,
                       patch_sizes: list[PatchSize]) -> list[torch.Tensor]:
        """One output per latent of `xs`, each at its own patch size, in ONE packed forward."""

    def prepare(self, patch_sizes: list[PatchSize], size: tuple[int, ...], device: torch.device,
                packed: bool = False) -> list[torch.Tensor]:
        """Build now what forwards at `patch_sizes` on latents of spatial (or (F, H, W)) `size`
        build on first use (with `packed`: the packing of one `forward_packed` call of one latent
        per entry); returns the device tensors it cached, which a CUDA graph reads in place."""

    def flops(self, patch_size: PatchSize | None = None, batch: int = 1) -> int:
        """Analytic forward FLOPs of `batch` samples at `patch_size` (default: the original one)."""

    # nn.Module's.
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Any,
                 patch_size: PatchSize | None = None) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def _members(protocol: type) -> tuple[str, ...]:
    """The protocol's members, in declaration order."""
    names = [*protocol.__annotations__,
             *(name for name, value in vars(protocol).items() if callable(value) or isinstance(value, property))]
    return tuple(name for name in dict.fromkeys(names) if not name.startswith("_") or name == "__call__")


_MEMBERS = _members(FlexibleDenoiser)


def check_denoiser(model: Any, caller: str = "fk.sample") -> None:
    """Check that `model` is a `FlexibleDenoiser`.

    Raises:
        TypeError: naming the members it lacks, and how to get a model that has them.
    """
    if isinstance(model, FlexibleDenoiser):
        return
    missing = [name for name in _MEMBERS if getattr(model, name, None) is None]
    raise TypeError(f"{caller}: {type(model).__name__} is not a flexible denoiser: it lacks "
                    f"{', '.join(missing)} (flexikern.diffusion.FlexibleDenoiser). Convert the model "
                    f"first, e.g. fk.FlexiDiT.from_diffusers(model) (or FlexiPixArt / FlexiLatte."
                    f"from_diffusers), or implement these members.")


_EVAL_LOCK = threading.Lock()
_EVAL_USERS: dict[int, tuple[int, list[tuple[Any, bool]]]] = {}   # id(model) -> (users, saved modes)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Inside, `model` is in eval mode; after, every submodule is back in the train/eval mode it had.

    Samplers need eval mode: in training mode DiT's label embedder drops labels at random, and
    dropout is active. Safe across threads and nestable: the uses of one model share one switch,
    under a lock; the first to enter saves the modes and switches, the last to leave restores
    them, so two threads sampling one model leave it as it was. (A `model.train()` called by
    someone else while a sampling runs is not undone.)
    """
    key = id(model)   # the model is alive while an entry exists: the entry leaves with its last user
    with _EVAL_LOCK:
        users, saved = _EVAL_USERS.get(key, (0, []))
        if users == 0:
            modules = model.modules() if callable(getattr(model, "modules", None)) else [model]
            saved = [(m, m.training) for m in modules]
            model.eval()
        _EVAL_USERS[key] = (users + 1, saved)
    try:
        yield model
    finally:
        with _EVAL_LOCK:
            users, saved = _EVAL_USERS.pop(key)
            if users > 1:
                _EVAL_USERS[key] = (users - 1, saved)
            else:
                model.train(saved[0][1])
                for module, mode in saved[1:]:   # submodules whose mode differed from the model's
                    if module.training != mode:
                        module.training = mode
