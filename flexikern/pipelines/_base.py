"""What the flexible diffusers pipelines share (`FlexiPipelineMixin`).

* **Loading** a standard diffusers pipeline folder (or Hub id): its family is checked first
  (model_index.json's pipeline and transformer classes), diffusers loads the parts, and the
  transformer becomes flexible (`from_diffusers(..., patch_sizes, adapter)`), or flexible weights
  are loaded (`flexible=`: a flexikern `save_pretrained` folder; by default a folder's own
  `flexible/`, which `save_pretrained` writes).
* **A call's FlexiDiT arguments**: `budget=` (`Schedule.for_budget`) or `schedule=` (one patch
  size per model evaluation of the scheduler), `guidance_mode` ("flexi", the paper's rule, or
  "cfg"); the pipeline's scheduler drives the steps (`SchedulerSampler`) inside `fk.sample`.
* **Saving** a folder both libraries read: diffusers' own pipeline folder with the transformer's
  original patch size (`to_diffusers`, exact), plus `flexible/` with the whole flexible model.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from flexikern.diffusion import Guidance, Schedule, sample
from flexikern.diffusion.schedulers import SchedulerSampler, check_scheduler
from flexikern.files import staged_folder
from flexikern.ops._checks import check_finite, check_positive_int

__all__ = ["FlexiPipelineMixin", "FLEXIBLE", "OUTPUT_TYPES"]

FLEXIBLE = "flexible"   # the subfolder of a saved pipeline that holds the flexible transformer
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_MODES = ("flexi", "cfg")   # a call's guidance_mode (guidance_scale <= 1: none)
# diffusers pipelines flexikern has a flexible twin of, to name the right one in errors.
_TWINS = {"DiTPipeline": "FlexiDiTPipeline", "PixArtAlphaPipeline": "FlexiPixArtPipeline",
          "LattePipeline": "FlexiLattePipeline"}


def _reason(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class FlexiPipelineMixin:
    """Shared by `FlexiDiTPipeline`, `FlexiPixArtPipeline` and `FlexiLattePipeline`; each sets the class
    attributes."""

    _diffusers_pipeline: type               # the diffusers pipeline it replaces (DiTPipeline, ...)
    _transformer_classes: tuple[str, ...]   # the diffusers transformer classes it converts
    _model_class: type                      # the flexikern model (FlexiDiT, ...)

    # ---------------------------------------------------------------------- the transformer
    @classmethod
    def _flexible_transformer(cls, transformer: Any) -> Any:
        """A flexikern model as it is; a diffusers transformer of this family made flexible with
        the default patch sizes (original and twice it, LoRA); anything else refused."""
        if isinstance(transformer, cls._model_class):
            return transformer
        if type(transformer).__name__ in cls._transformer_classes:
            return cls._model_class.from_diffusers(transformer, patch_sizes=cls._default_sizes(transformer))
        raise TypeError(f"transformer: expected a flexikern {cls._model_class.__name__} (e.g. "
                        f"{cls._model_class.__name__}.from_diffusers(model, patch_sizes=(2, 4))) or a diffusers "
                        f"{' / '.join(cls._transformer_classes[:1])}; got {type(transformer).__name__}")

    # ---------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, patch_sizes: Any = None,
                        adapter: str | None = None, lora_rank: int | None = None,
                        flexible: str | os.PathLike | bool | None = None, **kwargs: Any):
        """A flexible pipeline from a diffusers pipeline folder or Hub id of this family.

        Args:
            pretrained_model_name_or_path: a folder (or Hub id) `save_pretrained` of the diffusers
                pipeline (or of this one) wrote.
            patch_sizes: the sizes the transformer runs at (default: its original size p and 2p).
            adapter: "lora" (default; the original size stays bit-exact) or "shared"; `lora_rank`
                (default 32). All three only when the folder's transformer is made flexible here.
            flexible: a flexikern `save_pretrained` folder with the flexible (fine-tuned)
                transformer to use instead; None (default) takes the folder's own `flexible/` if it
                has one, else makes the folder's transformer flexible; False always does the latter.
            kwargs: diffusers' `from_pretrained` arguments (`torch_dtype`, ...), for the other parts;
                `transformer=` (a flexikern model, or a diffusers one to make flexible) replaces the
                folder's.
        Raises:
            ValueError: the folder holds another family's pipeline (naming what it found and what is
                expected), or cannot be read; `patch_sizes`/`adapter`/`lora_rank` together with
                flexible weights, `lora_rank` with the shared adapter. TypeError: a `torch_dtype`
                that is not a torch.dtype. FileNotFoundError: no such folder or `flexible` folder.
        """
        source = str(pretrained_model_name_or_path)
        dtype = kwargs.get("torch_dtype")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"torch_dtype={dtype!r}: expected a torch.dtype, e.g. torch.float16")
        if adapter == "shared" and lora_rank is not None:
            raise ValueError(f"lora_rank={lora_rank!r} with adapter='shared': the rank is the LoRA adapter's; "
                             f"drop lora_rank or pass adapter='lora'")
        given = kwargs.pop("transformer", None)
        if given is not None and flexible not in (None, False):
            raise ValueError(f"transformer=... and flexible={str(flexible)!r}: pass one of them")
        index = cls._read_index(source)
        flexible_dir = None if given is not None else cls._flexible_dir(source, flexible)
        if flexible_dir is not None and (patch_sizes, adapter, lora_rank) != (None, None, None):
            raise ValueError(f"patch_sizes={patch_sizes!r}, adapter={adapter!r}, lora_rank={lora_rank!r} with the "
                             f"flexible model in {flexible_dir}: it has its own; leave them unset, or pass "
                             f"flexible=False to make the folder's transformer flexible anew")
        skip = {"transformer": None} if flexible_dir is not None or given is not None else {}
        try:
            plain = cls._diffusers_pipeline.from_pretrained(pretrained_model_name_or_path, **skip, **kwargs)
        except (OSError, ValueError, TypeError, EnvironmentError) as e:
            raise ValueError(f"{source}: diffusers could not load this {cls._diffusers_pipeline.__name__} "
                             f"({_reason(e)})") from e
        if flexible_dir is not None:
            transformer = cls._model_class.from_pretrained(flexible_dir, dtype=dtype)
        elif given is not None and isinstance(given, cls._model_class):
            transformer = given
        else:
            diffusers_model = plain.transformer if given is None else given
            transformer = cls._model_class.from_diffusers(
                diffusers_model,
                patch_sizes=cls._default_sizes(diffusers_model) if patch_sizes is None else patch_sizes,
                adapter="lora" if adapter is None else adapter, lora_rank=32 if lora_rank is None else lora_rank)
            if dtype is not None:
                transformer = transformer.to(dtype)
        components = {**plain.components, "transformer": transformer.to(plain.device)}
        return cls(**components, **cls._extra_init(index))

    @classmethod
    def _default_sizes(cls, transformer: Any) -> tuple:
        """The patch sizes a diffusers transformer is made flexible with: its original p and 2p (the
        paper's weak size for DiT-XL/2)."""
        p = transformer.config.patch_size
        return (p, 2 * p)

    @classmethod
    def _extra_init(cls, index: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments from model_index.json besides the components (DiT: id2label)."""
        return {}

    @classmethod
    def _read_index(cls, source: str) -> dict[str, Any]:
        """model_index.json of a pipeline folder or Hub id, its family checked."""
        folder = Path(source)
        if folder.exists() and not (folder / "model_index.json").is_file():
            what = "a file" if folder.is_file() else "a folder without model_index.json"
            raise FileNotFoundError(f"{source}: {what}; expected a diffusers pipeline folder "
                                    f"({cls._diffusers_pipeline.__name__}.save_pretrained writes one)")
        try:
            index = dict(cls._diffusers_pipeline.load_config(source))
        except Exception as e:   # diffusers raises OSError/EnvironmentError/ValueError by cause
            raise ValueError(f"{source}: not a readable diffusers pipeline folder or Hub id ({_reason(e)})") from e
        expected = cls._diffusers_pipeline.__name__
        found = index.get("_class_name")
        transformer = index.get("transformer")
        transformer = transformer[1] if isinstance(transformer, (list, tuple)) and len(transformer) == 2 else None
        if found in (expected, cls.__name__) and transformer in (*cls._transformer_classes, None):
            return index
        twin = _TWINS.get(found)
        hint = (f"; load it with flexikern.pipelines.{twin}" if twin and twin != cls.__name__ else "")
        raise ValueError(f"{source}: a {found} folder with transformer {transformer}, not a {expected} "
                         f"(transformer {' or '.join(cls._transformer_classes)}), which {cls.__name__} "
                         f"loads{hint}")

    @classmethod
    def _flexible_dir(cls, source: str, flexible: Any) -> Path | None:
        """The flexible model's folder: `flexible` itself, the pipeline folder's `flexible/`, or None."""
        if flexible is False:
            return None
        if flexible is None or flexible is True:
            own = Path(source) / FLEXIBLE
            if (own / "config.json").is_file():
                return own
            if flexible is True:
                raise FileNotFoundError(f"flexible=True: {source} has no {FLEXIBLE}/ folder (written by "
                                        f"{cls.__name__}.save_pretrained); pass the flexible model's folder")
            return None
        if not isinstance(flexible, (str, os.PathLike)):
            raise TypeError(f"flexible={flexible!r}: expected a folder written by {cls._model_class.__name__}"
                            f".save_pretrained, or None/False")
        path = Path(flexible)
        if not path.is_dir():
            what = "a file, not a folder" if path.exists() else "no such folder"
            raise FileNotFoundError(f"flexible={str(flexible)!r}: {what}; expected a folder written by "
                                    f"{cls._model_class.__name__}.save_pretrained")
        if not (path / "config.json").is_file() and (path / FLEXIBLE / "config.json").is_file():
            return path / FLEXIBLE   # a pipeline folder this class saved: its flexible model
        return path

    # ---------------------------------------------------------------------- saving
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write a folder diffusers' own pipeline class loads (the transformer at its original patch
        size, exactly) with the whole flexible model in `flexible/`, which `from_pretrained` of this
        class loads back. The folder's entries are replaced only once everything is written.

        Raises:
            ValueError: a transformer diffusers cannot hold (`to_diffusers` names why: e.g. the
                "shared" adapter), before anything is written. NotADirectoryError: a file.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub=True: save to a folder, then upload it (huggingface_hub's upload_folder)")
        try:
            transformer = self.transformer.to_diffusers()
        except ValueError as e:   # what diffusers cannot hold
            raise ValueError(f"save_pretrained: {e}. To keep this model, save it alone with "
                             f"pipe.transformer.save_pretrained(folder) and load it back with "
                             f"{type(self).__name__}.from_pretrained(<the diffusers folder>, flexible=folder)") from e
        extra = self._extra_save()
        plain = self._diffusers_pipeline(**{**self.components, "transformer": transformer}, **extra)
        plain.register_to_config(**extra)   # model_index.json keeps them (DiTPipeline's id2label)
        with staged_folder(save_directory) as tmp:
            plain.save_pretrained(tmp, **kwargs)
            self.transformer.save_pretrained(tmp / FLEXIBLE)

    def _extra_save(self) -> dict[str, Any]:
        """Constructor arguments of the diffusers pipeline besides the components."""
        return {}

    # ---------------------------------------------------------------------- calling
    def _images_without_vae(self) -> bool:
        """Whether samples are images without decoding (DiT: a pixel-space model, vae=None)."""
        return False

    @staticmethod
    def _refuse_unsupported(**arguments: Any) -> None:
        """diffusers arguments the flexible loop does not take: refused by name when given."""
        for name, value in arguments.items():
            if value is not None:
                raise ValueError(f"{name}=...: not supported by the flexible pipelines; pass num_inference_steps "
                                 f"(the scheduler's own spacing) and no callbacks")

    def _check_call(self, n: int, num_inference_steps: Any, guidance_scale: Any, guidance_mode: Any,
                    output_type: Any, generator: Any, budget: Any, schedule: Any) -> tuple[int, float]:
        """The arguments every call shares, before any compute; returns (steps, guidance scale)."""
        steps = check_positive_int(num_inference_steps, "num_inference_steps")
        scale = check_finite(guidance_scale, "guidance_scale", "a finite float (> 1 guides; 1 = no guidance)")
        if guidance_mode not in _MODES:
            raise ValueError(f"guidance_mode={guidance_mode!r}: expected 'flexi' (FlexiDiT's weak-model rule where "
                             f"the branches' patch sizes differ, CFG elsewhere) or 'cfg'")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: expected one of {', '.join(OUTPUT_TYPES)}")
        if output_type != "latent" and self.vae is None and not self._images_without_vae():
            raise ValueError(f"output_type={output_type!r}: this pipeline has no vae to decode its "
                             f"{self.transformer.in_channels}-channel latents with; load one, or pass "
                             f"output_type='latent'")
        generators = generator if isinstance(generator, list) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators) or generators == []:
            raise TypeError(f"generator={generator!r}: expected a torch.Generator (e.g. "
                            f"torch.Generator().manual_seed(0)), a list of them, one per image, or None")
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"generator: {len(generator)} generators for {n} images; pass one, or one per image")
        if budget is not None and schedule is not None:
            raise ValueError(f"budget={budget!r} and schedule={schedule!r}: pass one of them (budget builds "
                             f"Schedule.for_budget for this call's steps)")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule: expected a flexikern Schedule (e.g. Schedule.for_budget(pipe.transformer, "
                            f"{steps}, 0.6)), got {type(schedule).__name__}")
        check_scheduler(self.scheduler, "pipe.scheduler")
        return steps, scale

    @staticmethod
    def _check_latents(latents: Any, shape: tuple[int, ...], source: str) -> None:
        """The `latents` argument: None, or a float tensor of `shape` (`source` says where it comes from)."""
        if latents is None:
            return
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            got = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise TypeError(f"latents: expected a float tensor of shape {shape}, got {got}")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape} ({source}), got {tuple(latents.shape)}")

    def _check_text(self, prompt: Any, prompt_embeds: Any, negative_prompt_embeds: Any, num_images_per_prompt: Any,
                    **counts: Any) -> int:
        """What diffusers' `check_inputs` leaves to fail deep inside: an empty prompt list, text
        embeddings of the wrong width, and the positive ints in `counts`. Returns the number of
        images (or videos): prompts (or rows of `prompt_embeds`) times `num_images_per_prompt`."""
        for name, value in {"num_images_per_prompt": num_images_per_prompt, **counts}.items():
            check_positive_int(value, name)
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt=[]: no prompts; pass at least one")
        channels = self.transformer.text_channels
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.dim() != 3
                                       or embeds.shape[-1] != channels):
                got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"{name}: expected text-encoder embeddings (N, L, {channels}), the width the "
                                 f"transformer takes; got {got}")
        prompts = (1 if isinstance(prompt, str) else len(prompt)) if prompt is not None else prompt_embeds.shape[0]
        return prompts * num_images_per_prompt

    def _initial_noise(self, shape: tuple[int, ...], generator: Any, dtype: torch.dtype,
                       latents: torch.Tensor | None = None) -> torch.Tensor:
        """The given `latents`, or noise drawn as diffusers' pipelines draw it (`randn_tensor` with
        `generator`), on the execution device; `fk.sample` scales it by `init_noise_sigma`."""
        device = self._execution_device
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None \
            else latents.to(device)

    def _plan(self, steps: int, scale: float, guidance_mode: str, budget: Any, schedule: Schedule | None,
              generator: Any, eta: float | None = None, first_channels: int | None = None
              ) -> tuple[SchedulerSampler, Schedule, Guidance | None]:
        """The scheduler as a sampler for `steps` inference steps, the patch-size schedule (static at
        the original size unless `budget` or `schedule`) and the guidance (None for scale <= 1)."""
        model = self.transformer
        step_takes = inspect.signature(self.scheduler.step).parameters
        sampler = SchedulerSampler(self.scheduler, steps, generator=generator,
                                   eta=eta if eta is not None and "eta" in step_takes else None,
                                   device=self._execution_device)
        guided = scale > 1
        if schedule is None:
            schedule = (Schedule.static(sampler.num_steps, model.original_patch_size) if budget is None
                        else Schedule.for_budget(model, sampler.num_steps, budget, guidance=guided))
        elif schedule.num_steps != sampler.num_steps:
            per = ("" if sampler.num_steps == steps else
                   f" ({sampler.name} evaluates the model {sampler.num_steps} times for {steps} steps; a "
                   f"schedule has one entry per evaluation)")
            raise ValueError(f"schedule: {schedule.num_steps} steps, but num_inference_steps={steps} runs "
                             f"{sampler.num_steps}{per}; build it for {sampler.num_steps} (e.g. "
                             f"Schedule.for_budget(pipe.transformer, {sampler.num_steps}, 0.6)) or pass budget=")
        schedule.validate(model)
        guidance = Guidance(scale, guidance_mode, first_channels=first_channels) if guided else None
        return sampler, schedule, guidance

    def _denoise(self, y: Any, noise: torch.Tensor, sampler: SchedulerSampler, schedule: Schedule,
                 guidance: Guidance | None, y_null: Any = None) -> torch.Tensor:
        """`fk.sample` from `noise` (scaled by the scheduler's init_noise_sigma), float32 latents."""
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        return sample(self.transformer, y, schedule, guidance, sampler=sampler, noise=noise, y_null=y_null,
                      progress=progress)

