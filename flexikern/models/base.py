"""What every flexible model family shares (class-conditional DiT, PixArt, Latte).

`FlexibleModel` is the one base: patch-size resolution and input checks, `flexify` (the weak
sizes' kernels and adapters), DiT's initialisation, `from_config`, the packed path (embedding and
de-embedding through `fk.ops` per (patch size, resolution) group), `prepare` and checkpoints.
A family file holds only what differs: its blocks, its conditioning and its positional tables.

The sampler's view of a model is declared in `flexikern.diffusion.protocol.FlexibleDenoiser`;
every `FlexibleModel` implements it.

Host synchronisation: a forward reads nothing back from the device (and copies nothing to it)
once its caches are built (`FlexibleModel.prepare` builds them ahead) and its conditions' values
are trusted: checking class labels' range and that timesteps are finite and >= 0 reads them on
the host, so forwards skip it inside `conditions_checked()`, which `fk.sample` enters after
validating its conditions once. (A text condition's 0/1 mask is checked once, when the
`TextCondition` is built.) Shapes and dtypes (host metadata) are always checked.

torch.compile: every model traces with `fullgraph=True` at every patch size, forward and
backward, `forward_packed` included. Inside a compiled graph the value checks are device-side
assertions (`assert_on_device`: no host read, no graph break); the per-size constants are traced
or embedded in the graph (`flexikern.ops._cache.tensor_cache`); packings are built in the graph
from host constants. Patch sizes and latent sizes are always static: a patch size the compiler
made symbolic (torch.compile's default after it saw two values) is specialised again
(`operator.index` in `PatchSize.parse`), so each size compiles one graph, once; the batch may be
dynamic. A check that fails while tracing with fullgraph=True surfaces as dynamo's "Observed
exception", carrying the message. `flexikern.runtime.compiled` compiles sampling.
"""

from __future__ import annotations

import contextlib
import contextvars
import operator
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from flexikern.flexi.layers import LoRALinear, SizeLayerNorm
from flexikern.ops._cache import building
from flexikern.ops._checks import check_positive_int, is_finite, is_int
from flexikern.ops.patch_size import PatchSize
from flexikern.flexi.packing import Packing

__all__ = ["FlexibleModel", "assert_on_device", "check_labels", "check_timesteps", "conditions_checked",
           "condition_values_trusted", "group_samples"]

_CONDITIONS_CHECKED = contextvars.ContextVar("flexikern_conditions_checked", default=False)
_PACKINGS_LOCK = threading.Lock()   # models' packing caches, shared by threads that run one model


@contextlib.contextmanager
def conditions_checked() -> Iterator[None]:
    """Inside: model forwards trust the VALUES of their conditions (class labels in range) and
    skip checking them, which would read the tensors back (a device sync per forward). For a
    caller that validated its conditions itself: `fk.sample` does, once, and enters this around
    its denoising loop. Shapes and dtypes are still checked. A context variable: it applies to
    this thread (and asyncio task) only.
    """
    token = _CONDITIONS_CHECKED.set(True)
    try:
        yield
    finally:
        _CONDITIONS_CHECKED.reset(token)


def condition_values_trusted(device: torch.device) -> bool:
    """Whether a forward on `device` must skip reading its conditions' values: inside
    `conditions_checked()`, or while capturing a CUDA graph (checked before capture)."""
    return _CONDITIONS_CHECKED.get() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_timesteps(t, n: int, device) -> torch.Tensor:
    """Diffusion timesteps `t` as an (n,) tensor on `device`.

    `t`: an (n,) tensor of any int or float dtype (not bool), a number, a list or a numpy array; a
    scalar is broadcast to the batch. Values must be finite and >= 0 (diffusion timesteps run from
    0, clean, up to the last training step): read once per call, on the host (a device sync for a
    CUDA tensor), unless trusted (`conditions_checked`, a CUDA graph capture). Raises ValueError
    naming `t`, its value and what was expected.
    """
    if not isinstance(t, torch.Tensor):
        try:
            t = torch.as_tensor(t)   # host values: checked on the host, then copied once
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"t: expected timesteps (a number, a list of numbers or a tensor), got "
                             f"{type(t).__name__} {t!r:.60}") from None
    if not (t.is_floating_point() or _is_integer(t.dtype)):
        raise ValueError(f"t: expected int or float timesteps, got a {t.dtype} tensor; pass numbers "
                         f"(e.g. a long or float tensor)")
    if t.is_meta:
        raise ValueError("t: on the meta device, it holds no values; pass real timesteps")
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t: expected shape ({n},) to match x's batch (or a scalar), got {tuple(t.shape)}")
    hint = "diffusion timesteps run from 0 (clean) to the last training step (e.g. 999)"
    if torch.compiler.is_compiling():
        assert_on_device(torch.isfinite(t) & (t >= 0), f"t: timesteps must be finite and >= 0; {hint}")
    elif not condition_values_trusted(t.device):
        valid = torch.isfinite(t) & (t >= 0)
        if not bool(valid.all()):   # one host read
            raise ValueError(f"t: timesteps must be finite and >= 0, got {t[~valid][:8].tolist()}; {hint}")
    return t if t.device == device else t.to(device)   # already there (a sampling step): no call


def assert_on_device(valid: torch.Tensor, message: str) -> None:
    """Inside torch.compile: fail with `message` unless every value of the bool tensor `valid` is
    True, without reading it on the host (that would break the graph and sync the device).
    `torch._assert_async`: on CPU the compiled call raises RuntimeError(message); on CUDA it is a
    device-side assertion, as an out-of-range embedding index would be. Eager forwards read the
    values on the host instead and raise ValueError with the values themselves."""
    torch._assert_async(valid.all(), message)


def check_labels(y, num_classes: int, null_class: bool, n: int | None = None,
                 check_values: bool = True) -> torch.Tensor:
    """Class labels as a long (N,) tensor, on `y`'s device (host data: the CPU). The one validation
    of class labels: `FlexiDiT.check_condition` (hence `fk.sample`) and its forwards use it.

    Args:
        y: an int, a list or tuple of ints, numpy integers, or an integer (N,) tensor or numpy
            array of any int dtype (unsigned included). Bools and floats are refused, integral
            floats too: a float label is a mistake upstream, and truncating it would sample
            another class. A scalar (0-dim) is broadcast to `n` (one label when `n` is None).
        num_classes, null_class: valid labels are 0..num_classes-1, and `num_classes` (the null
            class of classifier-free guidance) when `null_class`.
        n: the batch size the labels must match, or None.
        check_values: check the values' range: read on the host (a device sync on CUDA), or,
            inside torch.compile, by a device-side assertion (`assert_on_device`).
    Raises:
        ValueError: naming `y`, the offending values, what was expected and the fix.
    """
    if n is not None:
        n = check_positive_int(n, "n")
    if not isinstance(y, torch.Tensor):
        y = _host_labels(y)
    if y.is_meta:
        raise ValueError("y: class labels on the meta device hold no values; pass real labels")
    if not _is_integer(y.dtype):
        values = "" if torch.compiler.is_compiling() else f" {y.reshape(-1)[:8].tolist()}"   # no host read
        raise ValueError(f"y: class labels must be integers, got a {y.dtype} tensor{values}; pass ints "
                         f"(e.g. torch.tensor([1, 3]), or y.long() if the values are whole numbers)")
    if y.dim() > 1:
        raise ValueError(f"y: expected (N,) class labels, got shape {tuple(y.shape)}; pass one label "
                         f"per sample (y.reshape(-1))")
    if y.dim() == 0:
        y = y.reshape(1) if n is None else y.expand(n)
    if n is not None and y.shape[0] != n:
        raise ValueError(f"y: {y.shape[0]} labels for a batch of {n}")
    if y.shape[0] == 0:
        raise ValueError("y: expected at least one class label, got none")
    y = y.long()   # a no-op for long labels; nn.Embedding takes int32 and int64 only
    top = num_classes if null_class else num_classes - 1
    if check_values and torch.compiler.is_compiling():
        valid = (y >= 0) & (y <= top)
        assert_on_device(valid, f"y: class labels out of range; expected 0..{top}"
                         + (f" ({num_classes} = the null class)" if null_class else ""))
        # In range for the embedding whatever the assertion's place in the compiled code: only it
        # can fail (inductor's embedding has a bounds check of its own, with a cryptic message).
        y = torch.where(valid, y, 0)
    elif check_values and not bool(((y >= 0) & (y <= top)).all()):   # one host read
        bad = sorted(set(y[(y < 0) | (y > top)].tolist()))
        message = f"y: labels {bad[:8]}{' ...' if len(bad) > 8 else ''} out of range; expected 0..{num_classes - 1}"
        if null_class:
            message += f" (or {num_classes} = the null class, for unconditional samples)"
        elif num_classes in bad:
            message += (f". Label {num_classes} (= num_classes) is the null class of classifier-free "
                        f"guidance, and this model has no null class: it was trained without class "
                        f"dropout (class_dropout_prob=0). Classifier-free guidance needs a model trained "
                        f"with class dropout; with this one, sample with Guidance(mode='none')")
        else:
            message += " (this model has no null class)"
        raise ValueError(message)
    return y


def _is_integer(dtype: torch.dtype) -> bool:
    """Whether `dtype` is an integer dtype, signed or unsigned (bool is not)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _host_labels(y) -> torch.Tensor:
    """Labels given as Python or numpy values (an int, a list or tuple of ints, numpy integers or
    an integer array) as a long tensor; anything else (bools, floats, strings) is refused."""
    if isinstance(y, (np.ndarray, np.generic)):
        if y.dtype.kind not in "iu":
            raise ValueError(f"y: class labels must be integers, got a numpy {y.dtype} "
                             f"{'array' if y.ndim else 'scalar'} {np.ravel(y)[:8].tolist()}; pass ints")
        return torch.from_numpy(np.asarray(y, dtype=np.int64).copy())
    items = y if isinstance(y, (list, tuple)) else [y]
    bad = [v for v in items if isinstance(v, (bool, np.bool_)) or not _is_index(v)]
    if bad:
        shown = ", ".join(f"{v!r:.40} ({type(v).__name__})" for v in bad[:8])
        raise ValueError(f"y: class labels must be ints (an int, a list of ints, an integer tensor or "
                         f"numpy array), got {shown}; pass ints, not bools, floats or strings")
    labels = torch.tensor([operator.index(v) for v in items], dtype=torch.long)
    return labels if isinstance(y, (list, tuple)) else labels[0]


def _is_index(v) -> bool:
    """Whether `v` is an integer (a Python or numpy int, a 0-dim integer tensor); bools pass, so
    callers refuse them first."""
    try:
        operator.index(v)
    except TypeError:
        return False
    return not (isinstance(v, torch.Tensor) and v.dtype == torch.bool)


def group_samples(samples: list[tuple]) -> tuple[list[tuple], list[int]]:
    """(runs, packed order) of samples' (patch size, resolution): the order sorts equal samples
    together; a run is (patch size, resolution, [input indices]), embedded in one batched call."""
    order = [i for _, i in sorted([(tuple(map(tuple, sample)), i) for i, sample in enumerate(samples)])]
    runs: list[tuple] = []
    for i in order:
        if runs and runs[-1][:2] == samples[i]:
            runs[-1][2].append(i)
        else:
            runs.append((*samples[i], [i]))
    return runs, order


def _describe(x: Any) -> str:
    """A value's shape (a tensor), length (a list or tuple) or type, for an error message."""
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}"
    return f"a {type(x).__name__} of length {len(x)}" if isinstance(x, (list, tuple)) else type(x).__name__


class FlexibleModel(nn.Module):
    """A DiT-family model runnable at any configured patch size (2-D images or 3-D videos).

    A family's `__init__` calls `_setup(...)`, builds `x_embedder` (`FlexiPatchEmbed`),
    `t_embedder`, its blocks and `final_layer` (whose `.linear` is a `FlexiDeEmbed`), then
    `initialize_weights()` and, with `patch_sizes`, `flexify(...)`. It defines `pos_embed(size,
    patch)`, `forward`, `forward_packed`, `flops`, the conditions (`check_condition`,
    `null_condition`, `has_null_class`) and the class attributes below.
    """

    checkpoint_format: str = ""               # "flexikern.FlexiDiT", ...
    configs: dict[str, dict[str, Any]] = {}   # `from_config` names
    adapters: tuple[str, ...] = ("lora", "shared")

    def _setup(self, config: dict[str, Any], patch_size, ndim: int, in_channels: int, hidden_size: int,
               num_heads: int, learn_sigma: bool) -> PatchSize:
        """The attributes every family has; returns the original patch size."""
        for name in ("input_size", "num_frames", "in_channels", "hidden_size", "depth", "num_heads",
                     "num_classes", "text_len", "caption_channels", "cross_attention_dim"):
            value = config.get(name)
            if value is not None and (not is_int(value) or value < (0 if name == "num_classes" else 1)):
                raise ValueError(f"{name}={value!r}: expected " + ("an int >= 0" if name == "num_classes"
                                                                   else "a positive int"))
        dropout = config.get("class_dropout_prob", 0.0)
        if not (is_finite(dropout) and 0 <= dropout < 1):
            raise ValueError(f"class_dropout_prob={dropout!r}: expected a probability in [0, 1) (DiT: 0.1; 0 = no "
                             f"null class, so no classifier-free guidance)")
        if not (is_finite(config.get("mlp_ratio", 1.0)) and config.get("mlp_ratio", 1.0) > 0):
            raise ValueError(f"mlp_ratio={config['mlp_ratio']!r}: expected a positive number, e.g. 4.0")
        if hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size}: expected a multiple of 4 (the 2-D sin-cos positional "
                             f"table splits it in four)")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        patch = PatchSize.parse(patch_size, ndim)
        latent = (config["input_size"],) * 2 if ndim == 2 else (config["num_frames"], *(config["input_size"],) * 2)
        if any(s % p for s, p in zip(latent, patch)):
            sizes = "input_size" if ndim == 2 else "num_frames, input_size"
            raise ValueError(f"{sizes}={latent if ndim == 3 else latent[0]}: not a multiple of patch_size {tuple(patch)}")
        self.config = {**config, "patch_size": patch}
        self.in_channels, self.num_heads, self.learn_sigma = in_channels, num_heads, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.original_patch_size = patch
        self.patch_sizes: tuple[PatchSize, ...] = (patch,)
        self.adapter: str | None = None
        self.lora_rank: int | None = None
        self.gradient_checkpointing = False
        return patch

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent: (C, H, W) (videos: (C, F, H, W))."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def device(self) -> torch.device:
        """The device of the weights (diffusers' `ModelMixin.device`, which its pipelines read)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (diffusers' `ModelMixin.dtype`)."""
        return next(self.parameters()).dtype

    @property
    def embed_dtype(self) -> torch.dtype:
        """The dtype tokens are embedded in (positional tables included): the model's weights'."""
        return self.t_embedder.mlp[0].weight.dtype

    # Caches derived while running (packed layouts, label tensors already checked): rebuilt on
    # use, so a pickled or copied model (torch.save(model), deepcopy) carries none of them.
    _derived_state = ("_packings", "_checked_labels")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {k: ([] if k == "_checked_labels" else {}) if k in self._derived_state else v
                for k, v in state.items()}

    # ------------------------------------------------------------------ initialisation
    def _normal_init(self) -> list[nn.Module]:
        """Modules whose weight DiT's initialisation draws from N(0, 0.02), in drawing order."""
        raise NotImplementedError

    def _zero_init(self) -> list[nn.Module]:
        """Modules whose weight and bias start at zero (adaLN-Zero, output projections)."""
        raise NotImplementedError

    def initialize_weights(self) -> None:
        """DiT's initialisation (PixArt's and Latte's too): xavier-uniform linears with zero bias,
        the patch embedding xavier-uniform as a linear, small embedders, zero-initialised
        modulation and output (the original patch size's kernels)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        name = self.original_patch_size.name
        w = self.x_embedder.weight[name]
        nn.init.xavier_uniform_(w.data.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias[name], 0)
        for module in self._normal_init():
            nn.init.normal_(module.weight, std=0.02)
        for module in self._zero_init():
            nn.init.constant_(module.weight, 0)
            nn.init.constant_(module.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight[name], 0)
        nn.init.constant_(self.final_layer.linear.bias[name], 0)

    # ------------------------------------------------------------------ flexibility
    def flexify(self, patch_sizes: Iterable, adapter: str = "lora", lora_rank: int = 32):
        """Add weak patch sizes to a single-size model, initialised from its weights (in place).

        `adapter="lora"`: everything frozen; per weak size LoRA on every `LoRALinear`
        (self-attention, MLP; cross-attention gets none, the paper's T2I/video recipe), its own
        embed/de-embed and patch-size embedding, trainable. `"shared"`: all trainable, one
        underlying embed/de-embed kernel, per-size norm affines (identity). The original size must
        be among `patch_sizes`. Returns self.
        """
        original = self.original_patch_size
        if isinstance(patch_sizes, (int, str, PatchSize)) or not isinstance(patch_sizes, Iterable):
            raise TypeError(f"patch_sizes={patch_sizes!r}: expected a sequence of patch sizes including the "
                            f"original size {original}, e.g. [{original[-1]}, {2 * original[-1]}]")
        sizes = tuple(dict.fromkeys(PatchSize.parse(p, original.ndim, "patch_sizes") for p in patch_sizes))
        if self.patch_sizes != (original,):
            raise RuntimeError(f"this model is already flexible (patch_sizes={self.patch_sizes})")
        if original not in sizes:
            raise ValueError(f"patch_sizes={sizes} must include the original patch size {original}")
        if adapter not in self.adapters:
            raise ValueError(f"adapter={adapter!r}: {type(self).__name__} supports {self.adapters}")
        lora_rank = check_positive_int(lora_rank, "lora_rank")
        latent = self.latent_shape[1:]
        for p in sizes:
            if any(s % q for s, q in zip(latent, p)):
                raise ValueError(f"patch size {p} does not divide the latent size {latent}")
        self.patch_sizes = tuple(sorted(sizes))
        if len(sizes) == 1:
            return self
        self.adapter, self.lora_rank = adapter, (lora_rank if adapter == "lora" else None)
        embedders = [self.x_embedder, self.final_layer.linear]
        for layer in embedders:
            layer.flexify(original, list(sizes), adapter == "shared")
        weak = [p for p in sizes if p != original]
        ref = next(self.parameters())
        if adapter == "shared":
            for norm in (m for m in self.modules() if isinstance(m, SizeLayerNorm)):
                for p in sizes:
                    norm.add_affine(p, device=ref.device, dtype=ref.dtype)
            return self
        for param in self.parameters():
            param.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, LoRALinear):
                for p in weak:
                    module.add_adapter(p, self.lora_rank)
        for p in weak:
            for layer in embedders:
                layer.weight[p.name].requires_grad_(True)
                layer.bias[p.name].requires_grad_(True)
            self.x_embedder.size_embed[p.name].requires_grad_(True)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ checks
    def _patch(self, patch_size) -> PatchSize:
        if patch_size is None:
            return self.original_patch_size
        configured = [tuple(p) for p in self.patch_sizes]   # plain tuples: torch.compile formats them
        kind = "an int or (ph, pw)" if self.original_patch_size.ndim == 2 else "a video patch (pt, ph, pw)"
        try:
            patch = PatchSize.parse(patch_size, self.original_patch_size.ndim)
        except ValueError:
            raise ValueError(f"patch_size={patch_size!r}: expected {kind} of positive ints, one of "
                             f"{configured}") from None
        if patch not in self.patch_sizes:
            raise ValueError(f"patch_size={patch_size!r} is not configured; this model has "
                             f"patch_sizes={configured} (make it flexible with .flexify(...) "
                             "or the converters' patch_sizes=)")
        return patch

    def _check_size(self, size, patch: PatchSize, name: str = "size") -> tuple[int, ...]:
        """A latent's spatial size, (H, W) (videos: (F, H, W)), as ints: positive multiples of `patch`."""
        axes = "(H, W)" if patch.ndim == 2 else "(F, H, W)"
        if not (isinstance(size, (tuple, list, torch.Size)) and len(size) == patch.ndim
                and all(is_int(s) and s > 0 for s in size)):
            raise ValueError(f"{name}={size!r}: expected the latent's spatial size {axes}, positive ints")
        size = tuple([operator.index(s) for s in size])   # static under torch.compile (`is_int`)
        if any([s % p for s, p in zip(size, patch)]):
            raise ValueError(f"{name}={size}: not a multiple of patch_size {tuple(patch)}; pass a size the "
                             f"patch divides")
        return size

    def _flops_args(self, patch_size, batch, input_size, num_frames=None) -> tuple[PatchSize, int, tuple[int, ...]]:
        """`flops`' (patch size, batch, latent size), checked: `batch` a positive int; `input_size`
        an int or (H, W) and (videos) `num_frames`, default the model's, multiples of the patch size."""
        patch = self._patch(patch_size)
        batch = check_positive_int(batch, "batch")
        hw = PatchSize.parse(self.input_size if input_size is None else input_size, 2, "input_size")
        if patch.ndim == 3:
            frames = check_positive_int(self.num_frames if num_frames is None else num_frames, "num_frames")
            return patch, batch, self._check_size((frames, *hw), patch, "(num_frames, *input_size)")
        return patch, batch, self._check_size(tuple(hw), patch, "input_size")

    def _check_x(self, x: torch.Tensor, patch: PatchSize, name: str = "x") -> torch.Tensor:
        """`x` checked against the model and `patch`, cast to the model's dtype (its weights').

        The cast is the boundary's dtype rule: a float latent of any dtype runs in the model's
        dtype, so a bf16 model takes fp32 latents (diffusers' pipelines prepare latents in
        `transformer.dtype` for the same reason); the output is in the model's dtype. Everything
        else is refused before any compute, naming `name`, its value and the fix.
        """
        layout = "(N, C, H, W)" if patch.ndim == 2 else "a video (N, C, F, H, W)"
        if not isinstance(x, torch.Tensor) or x.dim() != patch.ndim + 2:
            raise ValueError(f"{name}: expected {layout}, got {_describe(x)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: {x.shape[1]} channels, but the model expects in_channels={self.in_channels}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}; pass latents as "
                            f"floats (e.g. {name}.float())")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: an empty batch, shape {tuple(x.shape)}; pass at least one sample")
        if 0 in x.shape[2:]:
            axes = "H, W" if patch.ndim == 2 else "F, H, W"
            raise ValueError(f"{name}: {axes} = {tuple(x.shape[2:])} has an empty axis; expected positive "
                             f"multiples of the patch size {tuple(patch)}")
        if patch.ndim == 3 and x.shape[2] % patch[0]:
            raise ValueError(f"{name}: {x.shape[2]} frames are not a multiple of the temporal patch "
                             f"{patch[0]} (patch_size {patch})")
        if x.shape[-2] % patch[-2] or x.shape[-1] % patch[-1]:
            raise ValueError(f"{name}: H, W = {tuple(x.shape[-2:])} are not multiples of patch_size "
                             f"{tuple(patch[-2:])}")
        weight = self.t_embedder.mlp[0].weight   # the model's device and dtype (`embed_dtype`)
        if weight.is_meta:
            raise RuntimeError(f"{type(self).__name__} is on the meta device: its weights hold no data. "
                               f"Load weights first, e.g. model.to_empty(device='cpu') then "
                               f"model.load_state_dict(state_dict), or build it with from_pretrained")
        if x.device != weight.device:
            raise ValueError(f"{name}: on {x.device}, but the model is on {weight.device}; move it to the "
                             f"model's device ({name}.to('{weight.device}'))")
        return x.to(weight.dtype)   # no copy when it is already the model's dtype

    def _check_packed(self, xs: list[torch.Tensor], patch_sizes: list) -> tuple[list[torch.Tensor], list[PatchSize]]:
        """Validate a packed batch (B latents without batch dim, B patch sizes): (the latents cast
        to the model's dtype as `_check_x` does, their patch sizes)."""
        layout = "(C, H, W)" if self.original_patch_size.ndim == 2 else "(C, F, H, W)"
        if not isinstance(xs, (list, tuple)) or not xs:
            raise ValueError(f"xs: expected a non-empty list of {layout} latents, got {_describe(xs)}")
        if not isinstance(patch_sizes, (list, tuple)):
            raise ValueError(f"patch_sizes: expected a list of one patch size per sample, got "
                             f"{_describe(patch_sizes)} {patch_sizes!r:.60}")
        if len(patch_sizes) != len(xs):
            raise ValueError(f"patch_sizes: {len(patch_sizes)} entries for {len(xs)} samples")
        patches = [self._patch(p) for p in patch_sizes]
        checked = []
        for i, (x, p) in enumerate(zip(xs, patches)):
            if not isinstance(x, torch.Tensor) or x.dim() != p.ndim + 1:
                raise ValueError(f"xs[{i}]: expected {layout}, got {_describe(x)}")
            checked.append(self._check_x(x[None], p, f"xs[{i}]")[0])
        return checked, patches

    def _run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """A block's forward, under activation checkpointing when `gradient_checkpointing` trains."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------ packed batches
    def _embed_packed(self, xs: list[torch.Tensor], runs: list[tuple]) -> torch.Tensor:
        """Tokens (total, D) of a packed batch: each (patch size, resolution) run embedded in one
        batched `fk.ops.patch_embed` call, with its positions, in packed order."""
        device, dtype, tokens = xs[0].device, self.embed_dtype, []
        for p, size, members in runs:
            pos = self.pos_embed(size, p, device=device, dtype=dtype)
            h = self.x_embedder(torch.stack([xs[i] for i in members]), p, pos)
            tokens.append(h.reshape(-1, h.shape[-1]))
        return torch.cat(tokens)

    def _unpack(self, h: torch.Tensor, runs: list[tuple]) -> list[torch.Tensor]:
        """De-embed packed (modulated) tokens run by run, back to per-sample outputs in input order."""
        outputs: list[torch.Tensor | None] = [None] * sum(len(members) for _, _, members in runs)
        start = 0
        for p, size, members in runs:
            n = len(members) * p.tokens(size)
            out = self.final_layer.linear(h[start:start + n].reshape(len(members), -1, h.shape[-1]), p, size)
            for j, i in enumerate(members):
                outputs[i] = out[j]
            start += n
        return outputs

    def _packed_layout(self, samples: list[tuple[PatchSize, tuple[int, ...]]], device: torch.device):
        """The layout one `forward_packed` call of these (patch size, resolution) samples uses:
        (runs, packed order, `Packing`), one attention sequence per sample (runs: see
        `group_samples`); cached. A family with another layout (Latte) overrides it."""
        def build():
            runs, order = group_samples(samples)
            lengths = [p.tokens(size) for p, size in (samples[i] for i in order)]
            patches = [samples[i][0] for i in order]
            return runs, torch.tensor(order, device=device), Packing.from_lengths(lengths, patches, device)
        return self._cached_packing((tuple(samples), device), build)

    def _cached_packing(self, signature, build: Callable[[], tuple]):
        """`build()`'s packed layout for a batch signature, cached (the 16 latest): after the first
        call nothing is copied between host and device (so a step neither syncs nor breaks a
        CUDA graph capture). Built outside inference mode (`flexikern.ops._cache.building`), so a
        layout first built while sampling serves training too. Under torch.compile the layout is
        built in the graph instead (from host constants: the compiler folds it)."""
        if torch.compiler.is_compiling():
            return build()
        with _PACKINGS_LOCK:   # two threads running one model evict from one cache
            cache = self.__dict__.setdefault("_packings", {})
            hit = cache.get(signature)
            if hit is None:
                with building():
                    hit = build()
                while len(cache) >= 16:
                    cache.pop(next(iter(cache)))
                cache[signature] = hit
            return hit

    def _position_tables(self, size: tuple[int, ...], patch: PatchSize, device) -> list[torch.Tensor]:
        """The positional tables a forward at `patch` on latents of `size` reads (built and cached)."""
        return [self.pos_embed(size, patch, device=device, dtype=self.embed_dtype)]

    def prepare(self, patch_sizes: list, size: tuple[int, ...], device: torch.device,
                packed: bool = False) -> list[torch.Tensor]:
        """Build now what forwards at `patch_sizes` on latents of spatial `size` build on first use:
        positional tables, the constant matrices that resize the embedding kernels to each patch
        size and, with `packed`, the packing of one `forward_packed` call of one latent per patch
        size, in this order. Those forwards then copy nothing between host and device;
        `fk.sample` calls this for every phase of its schedule before the first step. Nothing
        built depends on the weights (forwards resize the live kernels), and every cache builds
        ordinary tensors, so what is built here serves any grad mode.

        Returns the device tensors built (a CUDA graph that reads them keeps them alive).
        """
        if not isinstance(patch_sizes, (list, tuple)) or isinstance(patch_sizes, PatchSize) or not patch_sizes:
            raise ValueError(f"patch_sizes={patch_sizes!r}: expected a non-empty list of patch sizes, e.g. "
                             f"[{list(self.original_patch_size)}]")
        patches = [self._patch(p) for p in patch_sizes]
        device = torch.device(device)
        for patch in dict.fromkeys(patches):
            size = self._check_size(size, patch)
        built: list[torch.Tensor] = []
        for patch in dict.fromkeys(patches):
            built += self._position_tables(size, patch, device)
            for layer in (self.x_embedder, self.final_layer.linear):
                built += layer.resize_matrices(patch)
        if packed:
            layout = self._packed_layout([(p, size) for p in patches], device)
            built += [t for t in _tensors(layout)]
        return built

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_config(cls, name: str, patch_sizes=None, adapter: str = "lora", **overrides):
        """A randomly initialised model from a registry name (`cls.configs`), with its defaults."""
        if name not in cls.configs:
            raise ValueError(f"unknown config {name!r}; known: {sorted(cls.configs)}")
        return cls(**{**cls.configs[name], **overrides}, patch_sizes=patch_sizes, adapter=adapter)

    def save_pretrained(self, directory) -> None:
        """Write `config.json` and `model.safetensors` (flexible parts and adapters included)."""
        from flexikern.models.convert import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        """Load a directory written by `save_pretrained`, in eval mode; `device=`/`dtype=` place it."""
        from flexikern.models.convert import from_pretrained
        return from_pretrained(cls, directory, **kwargs)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested layout (tuples, lists, packings)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Packing):
        yield from (value.segment_ids, value.cu_seqlens)
