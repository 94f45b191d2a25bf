"""Checkpoint formats: facebookresearch/DiT, diffusers `DiTTransformer2DModel`, and flexikern's own.

Nothing here executes code from a file: .pt/.pth go through `torch.load(weights_only=True)` with
exactly one extra class allowed (`argparse.Namespace`, the `args` of DiT's training
checkpoints); .safetensors through safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import torch

from flexikern.files import atomic_write
from flexikern.ops._checks import check_positive_int

__all__ = ["load_checkpoint", "from_dit", "from_diffusers", "to_diffusers", "text_to_diffusers", "save_pretrained",
           "from_pretrained", "load_state_dict_strict", "pixart_from_diffusers", "latte_from_diffusers"]

# Heads cannot be read off the tensors; the known DiT widths give them.
HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}
FORMAT_VERSION = 1
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")   # terminal escape codes in third-party messages


def _reason(e: BaseException) -> str:
    """A wrapped third-party error for our messages: its type and text, terminal escape codes removed."""
    return f"{type(e).__name__}: {_ANSI.sub('', str(e)).strip()}"


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file when it is empty, not JSON or not an object."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({_reason(e)})") from e
    if not text.strip():
        raise ValueError(f"{path}: the file is empty; expected a JSON object")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, got a {type(value).__name__}")
    return value


def _folder_loader(folder: Path) -> str:
    """Which loader reads this folder, for errors about passing it to another one."""
    config = folder / "config.json"
    try:
        fmt = str(_read_json(config).get("format", "")) if config.is_file() else ""
    except ValueError:
        fmt = ""
    if fmt.startswith("flexikern."):
        return f"it was written by save_pretrained: load it with {fmt.removeprefix('flexikern.')}.from_pretrained"
    if (folder / "model_index.json").is_file() or config.is_file():
        return "a diffusers model or pipeline folder: load it with from_diffusers"
    return "expected a .pt, .pth or .safetensors file"


def _loaded(model, patch_sizes, adapter: str, lora_rank: int):
    """A converted model made flexible when `patch_sizes` is given, in eval mode (as every loader
    returns its model)."""
    if patch_sizes is not None:
        model.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)
    return model.eval()


def load_checkpoint(path: str | os.PathLike) -> Any:
    """The object in a .pt/.pth (weights only) or .safetensors file, refusing anything that carries code.

    Raises FileNotFoundError (no such file), IsADirectoryError (a folder: names its loader), and
    ValueError naming the file when it is truncated, corrupt, not a checkpoint, or holds code.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a folder, not a checkpoint file; {_folder_loader(path)}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file: truncated or corrupt ({_reason(e)})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's weights-only message runs over many lines; its "unsupported ..." line says what failed.
        lines = [line.strip() for line in _ANSI.sub("", str(e)).splitlines() if line.strip()]
        detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
        if isinstance(e, pickle.UnpicklingError) and "global" in detail.lower():
            raise ValueError(f"{path}: refused to load: the file holds Python objects other than tensors "
                             f"and argparse.Namespace, which could run code. Nothing was executed. "
                             f"Re-save the weights as a plain state dict or as .safetensors. ({detail})") from e
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: truncated, corrupt or another "
                         f"format ({type(e).__name__}: {detail})") from e


def _unwrap(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, args) from a release file, a training checkpoint or a state dict."""
    args: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "ema" in obj and isinstance(obj["ema"], Mapping):
        if isinstance(obj.get("args"), argparse.Namespace):
            args = vars(obj["args"])
        obj = obj["ema"]                      # DiT's training checkpoints: sample with the EMA
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source}: expected a state dict of tensors, or a DiT training checkpoint "
                         f"{{'model', 'ema', 'opt', 'args'}}; got a {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}, args


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load with every missing, unexpected and misshaped key listed in ONE error."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                       for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        lines = [f"{source}: the checkpoint does not fit the model"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("misshaped keys", misshaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _require(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{source}: missing key {key!r}; is this a DiT checkpoint? "
                         f"(first keys: {list(state)[:5]})")
    return state[key]


def _infer_dit_config(state, args, source, num_heads=None, num_classes=None, input_size=None):
    w = _require(state, "x_embedder.proj.weight", source)
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"{source}: x_embedder.proj.weight has shape {tuple(w.shape)}, expected (D, C, p, p)")
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise ValueError(f"{source}: no 'blocks.*' keys")
    mlp_hidden = _require(state, "blocks.0.mlp.fc1.weight", source).shape[0]
    out = _require(state, "final_layer.linear.weight", source).shape[0] // (patch * patch)
    if out not in (in_channels, 2 * in_channels):
        raise ValueError(f"{source}: final_layer.linear gives {out} output channels for {in_channels} "
                         "input channels; expected the same (eps) or twice (learn_sigma)")
    rows = _require(state, "y_embedder.embedding_table.weight", source).shape[0]
    num_classes = num_classes if num_classes is not None else args.get("num_classes", rows - 1)
    if rows not in (num_classes, num_classes + 1):
        raise ValueError(f"{source}: y_embedder has {rows} rows, which fits neither num_classes="
                         f"{num_classes} nor num_classes + a null row")
    if num_heads is None:
        if hidden not in HEADS_BY_WIDTH:
            raise ValueError(f"{source}: width {hidden} is not a known DiT config; pass num_heads=")
        num_heads = HEADS_BY_WIDTH[hidden]
    if input_size is None:
        if "pos_embed" in state:
            input_size = int(round(math.sqrt(state["pos_embed"].shape[1]))) * patch
        elif "image_size" in args:
            input_size = int(args["image_size"]) // 8
        else:
            input_size = 32
    return dict(input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden,
                class_dropout_prob=0.1 if rows == num_classes + 1 else 0.0, num_classes=num_classes,
                learn_sigma=out == 2 * in_channels)


def from_dit(cls, path_or_state_dict, patch_sizes=None, adapter="lora", lora_rank=32,
             num_heads=None, num_classes=None, input_size=None):
    """A FlexiDiT from facebookresearch/DiT weights (a release or training .pt, a .safetensors file,
    or a state dict) with DiT's numerics, exact at the original patch size; in eval mode.

    The weights are loaded into a float32 model whatever their dtype (an fp16 checkpoint is upcast
    exactly); `.to(dtype)` after. A DDP "module." prefix is removed; a training checkpoint's "ema"
    weights are used over its "model" ones (as DiT's sample.py does).
    Errors name the file: see `load_checkpoint`; a folder is refused, naming the loader for it.
    """
    for name, value in (("num_heads", num_heads), ("num_classes", num_classes), ("input_size", input_size)):
        if value is not None:
            check_positive_int(value, name, "a positive int, or None to read it from the checkpoint")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        raw = load_checkpoint(path_or_state_dict)
    elif isinstance(path_or_state_dict, Mapping):
        source, raw = "state dict", path_or_state_dict
    else:
        raise TypeError(f"path_or_state_dict: expected a checkpoint path or a state dict, got "
                        f"{type(path_or_state_dict).__name__}")
    state, args = _unwrap(raw, source)
    config = _infer_dit_config(state, args, source, num_heads, num_classes, input_size)
    model = cls(**config)
    key = model.original_patch_size.name
    state = dict(state)
    pos = state.pop("pos_embed", None)
    if pos is not None:
        table = model.pos_embed((config["input_size"],) * 2, model.original_patch_size)
        if pos.shape[-2:] != table.shape:
            raise ValueError(f"{source}: pos_embed has {pos.shape[-2]} positions, but input_size="
                             f"{config['input_size']} with patch size {key} needs {table.shape[0]}; leave "
                             f"input_size=None to read it from the checkpoint")
        # An fp16 or bf16 checkpoint holds the table rounded to its dtype: compare within a step of it.
        atol = 1e-5 + torch.finfo(pos.dtype).eps
        if not torch.allclose(pos.reshape(table.shape).float(), table.to(pos.dtype).float(), atol=atol):
            raise ValueError(f"{source}: pos_embed is not DiT's fixed sin-cos table; flexikern "
                             "regenerates that table per grid and cannot load a learned one")
    for name in ("x_embedder", "final_layer.linear"):
        for part in ("weight", "bias"):
            old = f"{name}.proj.{part}" if name == "x_embedder" else f"{name}.{part}"
            if old in state:
                state[f"{name}.{part}.{key}"] = state.pop(old)
    load_state_dict_strict(model, state, source)
    return _loaded(model, patch_sizes, adapter, lora_rank)


# ----------------------------------------------------------------------------- diffusers

def _pipeline_component(components: Mapping[str, str], cls_name: str, where: str) -> str:
    """The name of a pipeline's `cls_name` component ({name: class name}), else its "transformer"."""
    names = [n for n, c in components.items() if c == cls_name] or [n for n in components if n == "transformer"]
    if len(names) != 1:
        raise ValueError(f"{where}: a diffusers pipeline whose components {sorted(components)} hold no single "
                         f"{cls_name}; pass subfolder= naming the model's component")
    return names[0]


def _diffusers_module(model_or_dir, cls_name: str, subfolder: str | None = None):
    """A diffusers model of class `cls_name`: itself, a pipeline's component, or loaded from a local
    folder of a model or a saved pipeline, or a Hugging Face Hub id of either.

    `subfolder` names the model's folder (a pipeline's component: "transformer"); by default a
    pipeline's component of class `cls_name`, else its "transformer".
    Raises TypeError (another object), FileNotFoundError (a local folder that does not exist or
    holds no model) and ValueError naming the folder when diffusers cannot load it.
    """
    import diffusers
    target = getattr(diffusers, cls_name)
    if subfolder is not None and not isinstance(subfolder, str):
        raise TypeError(f"subfolder: expected a str (e.g. 'transformer'), got {type(subfolder).__name__}")
    if isinstance(model_or_dir, diffusers.DiffusionPipeline):
        components = {n: type(m).__name__ for n, m in model_or_dir.components.items()}
        name = subfolder or _pipeline_component(components, cls_name, type(model_or_dir).__name__)
        if components.get(name) != cls_name:
            what = f"is a {components[name]}" if name in components else "does not exist"
            raise ValueError(f"subfolder={name!r}: this {type(model_or_dir).__name__}'s component {name!r} "
                             f"{what}, not a {cls_name} (its components: {components})")
        return model_or_dir.components[name]
    if isinstance(model_or_dir, (str, os.PathLike)):
        return _diffusers_from_pretrained(target, model_or_dir, subfolder)
    if not isinstance(model_or_dir, target):
        raise TypeError(f"expected a diffusers {cls_name}, a pipeline holding one, or a folder saved by "
                        f"either; got {type(model_or_dir).__name__}")
    if subfolder is not None:
        raise ValueError(f"subfolder={subfolder!r}: given a {cls_name} itself; subfolder= selects a model "
                         "in a pipeline or a folder")
    return model_or_dir


def _diffusers_from_pretrained(target, name: str | os.PathLike, subfolder: str | None):
    """`target.from_pretrained` of a local model or pipeline folder (checked first), or a Hub id."""
    cls_name, folder = target.__name__, Path(name)
    # A Hub id is "name" or "org/name"; a path object, or anything that exists here, is local.
    local = folder.exists() or not isinstance(name, str) or not re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", name)
    if local:
        if not folder.is_dir():
            what = "a file, not a folder" if folder.exists() else "no such folder"
            raise FileNotFoundError(f"{folder}: {what}; expected the folder of a diffusers {cls_name} or pipeline")
        if subfolder is None and not (folder / "config.json").is_file():
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(f"{folder}: neither a diffusers model (config.json) nor a pipeline "
                                        f"(model_index.json)")
            index = _read_json(folder / "model_index.json")
            components = {n: v[1] for n, v in index.items() if isinstance(v, list) and len(v) == 2}
            subfolder = _pipeline_component(components, cls_name, str(folder))
        config_path = folder / (subfolder or "") / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no such file (subfolder={subfolder!r})")
        found = _read_json(config_path).get("_class_name")
        if found not in (cls_name, "Transformer2DModel"):   # the old name of DiT's and PixArt's transformers
            raise ValueError(f"{config_path}: a diffusers {found}, not a {cls_name}")
    kwargs = {} if subfolder is None else {"subfolder": subfolder}
    try:
        return target.from_pretrained(str(name), **kwargs)
    except Exception as e:
        if local:
            raise ValueError(f"{folder / (subfolder or '')}: diffusers could not load a {cls_name} "
                             f"({_reason(e)})") from e
        if _offline(e):
            raise ValueError(f"{str(name)!r}: no such local folder, and as a Hugging Face Hub id it is neither "
                             f"in the local cache nor reachable (no network?). Download it where there is "
                             f"network (e.g. hf download {name} --local-dir FOLDER) and pass its local "
                             f"folder") from e
        raise ValueError(f"{str(name)!r}: no such local folder, and diffusers could not load it as a Hugging "
                         f"Face Hub id ({_reason(e)})") from e


def _offline(error: BaseException) -> bool:
    """Whether a Hub download failed for want of a connection (diffusers reports it as a missing file)."""
    names = {"LocalEntryNotFoundError", "ConnectError", "ConnectionError", "ConnectTimeout", "gaierror"}
    while error is not None:
        if type(error).__name__ in names:
            return True
        error = error.__cause__ or error.__context__
    return False


def _diffusers_map(depth: int, key: str, block_embedders: bool) -> dict[str, str]:
    """diffusers `DiTTransformer2DModel` name -> FlexiDiT name (q, k, v are split and handled
    separately). Every block's embedder maps to the shared one, or with `block_embedders` block i's
    to `block_embedders.i` (block 0's to the model's)."""
    m = {"proj_out_1": "final_layer.adaLN_modulation.1"}
    for i in range(depth):
        theirs, emb = f"transformer_blocks.{i}", (f"block_embedders.{i}." if block_embedders and i else "")
        m[f"{theirs}.norm1.linear"] = f"blocks.{i}.adaLN_modulation.1"
        m[f"{theirs}.attn1.to_out.0"] = f"blocks.{i}.attn.proj"
        m[f"{theirs}.ff.net.0.proj"] = f"blocks.{i}.mlp.fc1"
        m[f"{theirs}.ff.net.2"] = f"blocks.{i}.mlp.fc2"
        m[f"{theirs}.norm1.emb.timestep_embedder.linear_1"] = f"{emb}t_embedder.mlp.0"
        m[f"{theirs}.norm1.emb.timestep_embedder.linear_2"] = f"{emb}t_embedder.mlp.2"
    out = {f"{theirs}.{part}": f"{ours}.{part}" for theirs, ours in m.items() for part in ("weight", "bias")}
    for i in range(depth):
        emb = f"block_embedders.{i}." if block_embedders and i else ""
        out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"] = \
            f"{emb}y_embedder.embedding_table.weight"
    out["pos_embed.proj.weight"], out["pos_embed.proj.bias"] = f"x_embedder.weight.{key}", f"x_embedder.bias.{key}"
    out["proj_out_2.weight"] = f"final_layer.linear.weight.{key}"
    out["proj_out_2.bias"] = f"final_layer.linear.bias.{key}"
    return out


def _shared_embedders(state: Mapping[str, torch.Tensor], depth: int) -> bool:
    """Whether every block's timestep/class embedder equals block 0's (as in a converted DiT checkpoint)."""
    first = "transformer_blocks.0.norm1.emb."
    return all(torch.equal(state[name.replace(first, f"transformer_blocks.{i}.norm1.emb.")], tensor)
               for name, tensor in state.items() if name.startswith(first) for i in range(1, depth))


# Every config field of diffusers' DiTTransformer2DModel is read into the model, checked in
# `from_diffusers`, or has no effect on its outputs in eval mode; any other field is refused.
_DIT_FIELDS = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
               "sample_size", "patch_size", "num_embeds_ada_norm", "norm_eps",             # read
               "norm_type", "norm_elementwise_affine", "activation_fn", "attention_bias",  # checked
               "dropout",            # training only
               "norm_num_groups",    # no group norm in DiT
               "upcast_attention"}   # read only by diffusers' legacy (non-SDPA) attention processor


def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter="lora", lora_rank=32, subfolder=None):
    """A FlexiDiT from a diffusers `DiTTransformer2DModel` with diffusers' numerics at every
    resolution (timestep frequencies divided by half-1, second LayerNorm eps, positions rescaled
    to `sample_size`'s grid as its `PatchEmbed` does), exact at the original patch size; in eval mode.

    `model_or_dir`: the model, a `DiTPipeline`, or a local folder or Hub id of either; `subfolder`:
    the model's folder in it (default: the pipeline's transformer). Blocks whose embedders are all
    equal (a converted DiT) share one; otherwise each keeps its own (`block_embedders`).
    """
    module = _diffusers_module(model_or_dir, "DiTTransformer2DModel", subfolder)
    source, cfg = "diffusers DiTTransformer2DModel", module.config
    problems = [f"{field}={cfg[field]!r} (a field flexikern does not know, so cannot reproduce)"
                for field in cfg if not field.startswith("_") and field not in _DIT_FIELDS]
    if cfg.norm_elementwise_affine:
        problems.append("norm_elementwise_affine=True (DiT's norms have no affine)")
    if cfg.activation_fn != "gelu-approximate":
        problems.append(f"activation_fn={cfg.activation_fn!r} (DiT uses 'gelu-approximate')")
    if not cfg.attention_bias:
        problems.append("attention_bias=False (DiT's attention has biases)")
    out_channels = module.out_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        problems.append(f"out_channels={out_channels} for in_channels={cfg.in_channels} (expected the "
                        "same, or twice with learned variance)")
    if problems:
        raise ValueError(f"{source}: unsupported configuration: " + "; ".join(problems))
    state = module.state_dict()
    depth, hidden = cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim
    rows = state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0]
    mlp_hidden = state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    block_embedders = not _shared_embedders(state, depth)
    model = cls(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                hidden_size=hidden, depth=depth, num_heads=cfg.num_attention_heads,
                mlp_ratio=mlp_hidden / hidden, class_dropout_prob=0.1 if rows > cfg.num_embeds_ada_norm else 0.0,
                num_classes=cfg.num_embeds_ada_norm, learn_sigma=out_channels == 2 * cfg.in_channels,
                timestep_freq_shift=1, norm2_eps=cfg.norm_eps, pos_base_size=module.pos_embed.base_size,
                block_embedders=block_embedders)
    # With shared embedders every block's copy maps to the one (equal, as checked).
    names = _diffusers_map(depth, model.original_patch_size.name, block_embedders)
    ours = {o: state[t] for t, o in names.items()}
    for i in range(depth):
        attn = f"transformer_blocks.{i}.attn1"
        for part in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state[f"{attn}.to_{n}.{part}"] for n in "qkv"])
    load_state_dict_strict(model, ours, source)
    return _loaded(model, patch_sizes, adapter, lora_rank)


def to_diffusers(model):
    """The original patch size of a FlexiDiT as a diffusers `DiTTransformer2DModel` (per-block
    embedders included), on the model's device and dtype, in eval mode.

    Raises ValueError for what diffusers cannot hold or would compute differently: a "shared"
    adapter, a non-square patch, no null class, DiT's timestep numerics or positional table.
    """
    from diffusers import DiTTransformer2DModel
    cfg, problems = model.config, []
    if model.adapter == "shared":
        problems.append("adapter='shared': trained per-size norms and resized kernels that "
                        "DiTTransformer2DModel cannot hold; export a 'lora' or plain model")
    if cfg["patch_size"][0] != cfg["patch_size"][1]:
        problems.append(f"patch_size={tuple(cfg['patch_size'])}: DiTTransformer2DModel needs a square patch")
    if not model.has_null_class:
        problems.append("no null class (class_dropout_prob=0): DiTTransformer2DModel always has one")
    if cfg["timestep_freq_shift"] != 1:
        problems.append("timestep_freq_shift=0: facebookresearch/DiT's timestep frequencies (/ half; "
                        "diffusers divides by half - 1)")
    base = cfg["input_size"] // cfg["patch_size"][0]
    if cfg["pos_base_size"] != base:
        problems.append(f"pos_base_size={cfg['pos_base_size']}: diffusers' positional table at sizes other "
                        f"than input_size is scaled to its {base}x{base} grid")
    if problems:
        raise ValueError("to_diffusers: the outputs would differ from this model's: " + "; ".join(problems)
                         + ". Convert models that came from diffusers, or compare against DiT's numerics")
    hidden, heads = cfg["hidden_size"], cfg["num_heads"]
    out = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads,
                                in_channels=model.in_channels, out_channels=model.out_channels,
                                num_layers=cfg["depth"], sample_size=cfg["input_size"],
                                patch_size=cfg["patch_size"][0], num_embeds_ada_norm=cfg["num_classes"],
                                norm_eps=cfg["norm2_eps"])
    state = model.state_dict()
    key = model.original_patch_size.name
    theirs = {t: state[o] for t, o in _diffusers_map(cfg["depth"], key, cfg["block_embedders"]).items()}
    for i in range(cfg["depth"]):
        for part in ("weight", "bias"):
            for name, chunk in zip("qkv", state[f"blocks.{i}.attn.qkv.{part}"].chunk(3)):
                theirs[f"transformer_blocks.{i}.attn1.to_{name}.{part}"] = chunk
    load_state_dict_strict(out, theirs, "to_diffusers")
    ref = next(model.parameters())   # (a float32 `.to(dtype=)` makes diffusers warn about casting)
    out = out.to(ref.device) if ref.dtype == torch.float32 else out.to(ref.device, ref.dtype)
    return out.eval()


# ----------------------------------------------------------------------------- PixArt and Latte (diffusers)

# Every config field of diffusers' PixArt and Latte transformers is read into the model, checked
# for the values flexikern reproduces (`_check_text_config`), or has no effect on these models:
_TEXT_FIELDS_READ = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                     "cross_attention_dim", "attention_bias", "sample_size", "patch_size", "norm_eps",
                     "caption_channels", "interpolation_scale", "use_additional_conditions", "video_length"}
_TEXT_FIELDS_NO_EFFECT = {
    "norm_num_groups",      # no group norm in these models
    "num_embeds_ada_norm",  # read only by the ada_norm / ada_norm_zero norms, not adaLN-single
    "upcast_attention",     # read only by diffusers' legacy (non-SDPA) attention processor
}


def _check_text_config(cfg, source: str) -> None:
    """Reject, naming each, the diffusers PixArt/Latte options flexikern does not reproduce, and any
    field it does not know (a newer diffusers' option could change the numerics)."""
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    supported = {
        "norm_type": (cfg.norm_type == "ada_norm_single", "'ada_norm_single'"),
        "norm_elementwise_affine": (not cfg.norm_elementwise_affine, "False (adaLN-single norms have no affine)"),
        "activation_fn": (cfg.activation_fn == "gelu-approximate", "'gelu-approximate'"),
        "dropout": (not cfg.dropout, "0 (flexikern's blocks have no dropout, which acts only in training)"),
        "attention_type": (cfg.get("attention_type", "default") in (None, "default"), "'default'"),
        "patch_size": (isinstance(cfg.patch_size, int), "an int"),
        "in_channels": (isinstance(cfg.in_channels, int), "an int"),
        "cross_attention_dim": (
            cfg.cross_attention_dim is not None and (cfg.caption_channels is None or cfg.cross_attention_dim == inner),
            f"an int: the text channels without a caption projection (caption_channels=None), else the inner "
            f"dim {inner} the projection makes (diffusers' own forward fails otherwise); None has no "
            f"cross-attention, which flexikern's text models need"),
    }
    problems = [f"{field}={cfg[field]!r} (supported: {what})" for field, (ok, what) in supported.items()
                if field in cfg and not ok]
    problems += [f"{field}={cfg[field]!r} (a field flexikern does not know, so cannot reproduce)"
                 for field in cfg if not field.startswith("_")
                 and field not in _TEXT_FIELDS_READ | _TEXT_FIELDS_NO_EFFECT | set(supported)]
    if problems:
        raise ValueError(f"{source}: unsupported configuration: " + "; ".join(problems))


def _text_block_map(prefix: str, ours: str, cross: bool, bias: bool) -> dict[str, str]:
    """flexikern PixArtBlock names -> diffusers BasicTransformerBlock (ada_norm_single) names; q, k,
    v (fused in flexikern) are `_text_block_state`'s. `bias`: diffusers' `attention_bias`."""
    names = {"scale_shift_table": "scale_shift_table"}
    for part in ("weight", "bias"):
        names[f"attn.proj.{part}"] = f"attn1.to_out.0.{part}"
        names[f"mlp.fc1.{part}"] = f"ff.net.0.proj.{part}"
        names[f"mlp.fc2.{part}"] = f"ff.net.2.{part}"
        if cross:
            names[f"cross_attn.proj.{part}"] = f"attn2.to_out.0.{part}"
            if part == "weight" or bias:
                names[f"cross_attn.q_linear.{part}"] = f"attn2.to_q.{part}"
    return {f"{ours}.{o}": f"{prefix}.{t}" for o, t in names.items()}


def _text_block_state(state, prefix: str, ours: str, cross: bool, bias: bool) -> dict[str, torch.Tensor]:
    out = {o: state[t] for o, t in _text_block_map(prefix, ours, cross, bias).items()}
    for part in ("weight", "bias") if bias else ("weight",):
        out[f"{ours}.attn.qkv.{part}"] = torch.cat([state[f"{prefix}.attn1.to_{n}.{part}"] for n in "qkv"])
        if cross:
            out[f"{ours}.cross_attn.kv_linear.{part}"] = torch.cat(
                [state[f"{prefix}.attn2.to_{n}.{part}"] for n in "kv"])
    return out


def _text_common_state(state, key: str, caption_projection: bool) -> dict[str, torch.Tensor]:
    """Embedders, adaLN-single, caption projection (if any) and output layer (shared by PixArt and Latte)."""
    return {o: state[t] for o, t in _text_common_names(key, caption_projection).items()}


def _text_common_names(key: str, caption_projection: bool) -> dict[str, str]:
    """`_text_common_state`'s names: flexikern name -> diffusers name."""
    names = {"x_embedder.weight." + key: "pos_embed.proj.weight", "x_embedder.bias." + key: "pos_embed.proj.bias",
             "final_layer.scale_shift_table": "scale_shift_table",
             "final_layer.linear.weight." + key: "proj_out.weight",
             "final_layer.linear.bias." + key: "proj_out.bias"}
    for part in ("weight", "bias"):
        names[f"t_embedder.mlp.0.{part}"] = f"adaln_single.emb.timestep_embedder.linear_1.{part}"
        names[f"t_embedder.mlp.2.{part}"] = f"adaln_single.emb.timestep_embedder.linear_2.{part}"
        names[f"t_block.1.{part}"] = f"adaln_single.linear.{part}"
        if caption_projection:
            names[f"y_embedder.y_proj.fc1.{part}"] = f"caption_projection.linear_1.{part}"
            names[f"y_embedder.y_proj.fc2.{part}"] = f"caption_projection.linear_2.{part}"
    return names


def _null_caption(model, null_caption, source: str) -> torch.Tensor:
    """diffusers drops PixArt's learned null caption (`y_embedder.y_embedding`); take it from the caller."""
    current = model.y_embedder.y_embedding.detach()
    if null_caption is None:
        return current
    null_caption = torch.as_tensor(null_caption)
    if null_caption.shape != current.shape:
        raise ValueError(f"null_caption: expected shape {tuple(current.shape)} (text_len, text channels), "
                         f"got {tuple(null_caption.shape)}")
    return null_caption.to(current.dtype)


def _text_model(model_or_dir, cls_name: str, source: str, null_caption, subfolder):
    """(module, its config, float state dict, our constructor kwargs) of a diffusers PixArt or
    Latte transformer (or a pipeline holding one: see `_diffusers_module`), its config checked."""
    module = _diffusers_module(model_or_dir, cls_name, subfolder)
    cfg = module.config
    _check_text_config(cfg, source)
    state = {k: v.detach().float() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = module.out_channels
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"{source}: out_channels={out_channels} for in_channels={cfg.in_channels}")
    mlp_hidden = state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    text_len = 120 if null_caption is None else int(torch.as_tensor(null_caption).shape[0])
    config = dict(input_size=cfg.sample_size, in_channels=cfg.in_channels, hidden_size=hidden,
                  depth=cfg.num_layers, num_heads=cfg.num_attention_heads, mlp_ratio=mlp_hidden / hidden,
                  caption_channels=cfg.caption_channels, text_len=text_len,
                  learn_sigma=out_channels == 2 * cfg.in_channels,
                  interpolation_scale=module.pos_embed.interpolation_scale, norm_eps=cfg.norm_eps,
                  cross_attention_dim=cfg.cross_attention_dim, attention_bias=cfg.attention_bias)
    return module, cfg, state, config


def _text_state(state, cfg, key: str, temporal: bool) -> dict[str, torch.Tensor]:
    """A diffusers PixArt/Latte state dict under flexikern's names (Latte: with `temporal` blocks)."""
    ours = _text_common_state(state, key, caption_projection=cfg.caption_channels is not None)
    for i in range(cfg.num_layers):
        ours.update(_text_block_state(state, f"transformer_blocks.{i}", f"blocks.{i}", True, cfg.attention_bias))
        if temporal:
            ours.update(_text_block_state(state, f"temporal_transformer_blocks.{i}", f"temporal_blocks.{i}",
                                          False, cfg.attention_bias))
    return ours


def pixart_from_diffusers(cls, model_or_dir, patch_sizes=None, adapter="lora", lora_rank=32, null_caption=None,
                          subfolder=None):
    """A diffusers `PixArtTransformer2DModel` as a FlexiPixArt with the same numerics, in eval mode.

    Supported: the 256/512 models (`use_additional_conditions=False`), with or without a caption
    projection (`caption_channels=None`: the text embeddings, `cross_attention_dim` wide, go to the
    cross-attention unprojected), `attention_bias` either way. The 1024 model's resolution and
    aspect-ratio embeddings, and the options `_check_text_config` names, are rejected. diffusers
    does not keep PixArt's learned null caption: pass it as `null_caption` (text_len, C_text), e.g.
    the original checkpoint's `y_embedder.y_embedding`, else the model keeps a random one (set it
    before guided sampling). The text length is not stored by diffusers either: `text_len` = 120
    (T5 in PixArt) unless the given null caption says otherwise. `model_or_dir` and `subfolder`
    as in `_diffusers_module` (a model, a pipeline, or a folder or Hub id of either).
    """
    source = "diffusers PixArtTransformer2DModel"
    module, cfg, state, config = _text_model(model_or_dir, "PixArtTransformer2DModel", source, null_caption,
                                             subfolder)
    if module.use_additional_conditions:
        raise ValueError(f"{source}: use_additional_conditions=True (the 1024px model's resolution and "
                         f"aspect-ratio embeddings) is not supported; convert a 256/512 model "
                         f"(sample_size != 128 or use_additional_conditions=False)")
    model = cls(patch_size=cfg.patch_size, **config)
    if module.pos_embed.base_size != model.base_size:
        raise ValueError(f"{source}: pos_embed.base_size={module.pos_embed.base_size}, expected "
                         f"{model.base_size}")
    ours = _text_state(state, cfg, model.original_patch_size.name, temporal=False)
    ours["y_embedder.y_embedding"] = _null_caption(model, null_caption, source)
    load_state_dict_strict(model, ours, source)
    return _loaded(model, patch_sizes, adapter, lora_rank)


def text_to_diffusers(model):
    """The original patch size of a FlexiPixArt or FlexiLatte as a diffusers
    `PixArtTransformer2DModel` (256/512 kind: no size conditions) or `LatteTransformer3DModel`, on
    the model's device and dtype, in eval mode. The learned null caption has no place in it
    (diffusers' pipelines guide with the empty prompt's encoding).

    Raises ValueError for what diffusers cannot hold: a "shared" adapter, a non-square patch (Latte:
    or one spanning frames), an MLP ratio other than 4, a Latte positional scale other than its own.
    """
    from diffusers import LatteTransformer3DModel, PixArtTransformer2DModel
    latte = model.checkpoint_format == "flexikern.FlexiLatte"
    target = LatteTransformer3DModel if latte else PixArtTransformer2DModel
    cfg, problems = model.config, []
    patch = tuple(cfg["patch_size"])
    if model.adapter == "shared":
        problems.append(f"adapter='shared': trained per-size norms and resized kernels that {target.__name__} "
                        f"cannot hold; export a 'lora' or plain model")
    if patch[-1] != patch[-2] or (latte and patch[0] != 1):
        problems.append(f"patch_size={patch}: {target.__name__} needs a square patch"
                        + (" of one frame" if latte else ""))
    if cfg["mlp_ratio"] != 4:
        problems.append(f"mlp_ratio={cfg['mlp_ratio']}: diffusers' feed-forward is 4x wide")
    if latte and cfg["interpolation_scale"] != max(cfg["input_size"] // 64, 1):
        problems.append(f"interpolation_scale={cfg['interpolation_scale']}: Latte's is max(sample_size // 64, 1)")
    if problems:
        raise ValueError("to_diffusers: the outputs would differ from this model's: " + "; ".join(problems))
    hidden, heads, bias = cfg["hidden_size"], cfg["num_heads"], cfg["attention_bias"]
    kwargs = dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=model.in_channels,
                  out_channels=model.out_channels, num_layers=cfg["depth"],
                  cross_attention_dim=cfg["cross_attention_dim"] or hidden, attention_bias=bias,
                  sample_size=cfg["input_size"], patch_size=patch[-1], activation_fn="gelu-approximate",
                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=cfg["norm_eps"],
                  caption_channels=cfg["caption_channels"])
    out = (target(**kwargs, video_length=cfg["num_frames"]) if latte else
           target(**kwargs, interpolation_scale=cfg["interpolation_scale"], use_additional_conditions=False))
    state, key = model.state_dict(), model.original_patch_size.name
    names = _text_common_names(key, caption_projection=cfg["caption_channels"] is not None)
    theirs = {t: state[o] for o, t in names.items()}
    if latte:   # flexikern's 3-D kernel has a temporal extent of 1; Latte embeds each frame with a Conv2d
        theirs["pos_embed.proj.weight"] = theirs["pos_embed.proj.weight"][:, :, 0]
    blocks = [(f"transformer_blocks.{i}", f"blocks.{i}", True) for i in range(cfg["depth"])]
    if latte:
        blocks += [(f"temporal_transformer_blocks.{i}", f"temporal_blocks.{i}", False) for i in range(cfg["depth"])]
    for prefix, ours, cross in blocks:
        theirs.update({t: state[o] for o, t in _text_block_map(prefix, ours, cross, bias).items()})
        for part in ("weight", "bias") if bias else ("weight",):
            for n, chunk in zip("qkv", state[f"{ours}.attn.qkv.{part}"].chunk(3)):
                theirs[f"{prefix}.attn1.to_{n}.{part}"] = chunk
            if cross:
                for n, chunk in zip("kv", state[f"{ours}.cross_attn.kv_linear.{part}"].chunk(2)):
                    theirs[f"{prefix}.attn2.to_{n}.{part}"] = chunk
    load_state_dict_strict(out, theirs, "to_diffusers")
    ref = next(model.parameters())
    out = out.to(ref.device) if ref.dtype == torch.float32 else out.to(ref.device, ref.dtype)
    return out.eval()


def latte_from_diffusers(cls, model_or_dir, patch_sizes=None, adapter="lora", lora_rank=32, null_caption=None,
                         enable_temporal_attentions=True, subfolder=None):
    """A diffusers `LatteTransformer3DModel` as a FlexiLatte with the same numerics, in eval mode.

    Spatial blocks (cross-attention to text) alternate with temporal blocks (self-attention across
    frames); the temporal table is Latte's `temp_pos_embed`, regenerated for any frame count (at
    `video_length` frames it is Latte's). `enable_temporal_attentions` (diffusers' forward
    argument) becomes the model's setting. `null_caption`, `model_or_dir` and `subfolder` as for
    PixArt (Latte has no null caption either).
    """
    source = "diffusers LatteTransformer3DModel"
    module, cfg, state, config = _text_model(model_or_dir, "LatteTransformer3DModel", source, null_caption,
                                             subfolder)
    model = cls(num_frames=cfg.video_length, patch_size=(1, cfg.patch_size, cfg.patch_size),
                enable_temporal_attentions=enable_temporal_attentions, **config)
    key = model.original_patch_size.name
    ours = _text_state(state, cfg, key, temporal=True)
    # Latte embeds each frame with a Conv2d; flexikern's 3-D kernel has a temporal extent of 1.
    ours["x_embedder.weight." + key] = ours["x_embedder.weight." + key][:, :, None]
    ours["y_embedder.y_embedding"] = _null_caption(model, null_caption, source)
    load_state_dict_strict(model, ours, source)
    return _loaded(model, patch_sizes, adapter, lora_rank)


# ----------------------------------------------------------------------------- flexikern's own

# Keys every config written by `save_pretrained` has; a constructor argument added later may be
# absent, and then takes its default (which reproduces the older models).
_REQUIRED_KEYS = ("format", "format_version", "patch_sizes", "adapter", "lora_rank", "patch_size",
                  "input_size", "in_channels", "hidden_size", "depth", "num_heads")
# The flexible state `save_pretrained` records next to the constructor arguments, and its JSON types.
_FLEXIBLE_TYPES = {"patch_sizes": (list,), "adapter": (str, type(None)), "lora_rank": (int, type(None))}
_JSON_NAMES = {int: "an int", float: "a number", bool: "true/false", str: "a string", list: "a list",
               type(None): "null"}


def save_pretrained(model, directory) -> None:
    """`config.json` + `model.safetensors` (flexible parts and adapters included), each written
    atomically, in the model's dtype; the format is the model class's `checkpoint_format`.

    Raises NotADirectoryError (`directory`, or a folder above it, is a file) and OSError naming the
    folder it cannot make or the file it cannot write (`atomic_write`: no partial file is left).
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{directory}: a file, not a folder; save_pretrained writes a folder "
                                 f"(config.json, model.safetensors): pass a new or existing folder") from None
    except OSError as e:
        raise type(e)(e.errno, f"{directory}: cannot make the folder ({e.strerror})") from None
    config = {**model.config, "patch_sizes": [list(p) for p in model.patch_sizes], "adapter": model.adapter,
              "lora_rank": model.lora_rank, "format": model.checkpoint_format, "format_version": FORMAT_VERSION}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_write(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))


def _json_types(hint) -> tuple[type, ...]:
    """The JSON value types a constructor annotation accepts (a tuple arrives as a list, a float may be an int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _json_types(arg))
    if hint is float:
        return (int, float)
    if hint is tuple or typing.get_origin(hint) in (tuple, list):
        return (list,)
    return (hint,) if isinstance(hint, type) else (object,)


def _model_from_config(cls, config: dict[str, Any], path: Path):
    """A `cls` built, and made flexible, from a `save_pretrained` config, every key checked first.

    Raises ValueError naming `path` and the key: missing, unknown, of the wrong type, another
    format or format_version, or a value the constructor refuses.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: no {', '.join(map(repr, missing))}; expected the config.json written "
                         f"by {cls.__name__}.save_pretrained")
    fmt, version = config["format"], config["format_version"]
    if fmt != cls.checkpoint_format:
        ours = isinstance(fmt, str) and fmt.startswith("flexikern.")
        hint = f" (load it with {fmt.removeprefix('flexikern.')}.from_pretrained)" if ours else ""
        raise ValueError(f"{path}: format {fmt!r}, not a {cls.checkpoint_format} config{hint}")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {version!r} is unknown; this flexikern reads version "
                         f"{FORMAT_VERSION} (a newer flexikern writes newer versions: upgrade flexikern)")
    hints = typing.get_type_hints(cls.__init__)
    expected = {**{k: _json_types(h) for k, h in hints.items() if k != "return"}, **_FLEXIBLE_TYPES}
    settings = {k: v for k, v in config.items() if k not in ("format", "format_version")}
    unknown = sorted(set(settings) - set(expected))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} for {cls.__name__} (written by a newer flexikern?)")
    for key, value in settings.items():
        if not isinstance(value, expected[key]) or (isinstance(value, bool) and bool not in expected[key]):
            name = lambda t: _JSON_NAMES.get(t, t.__name__)
            raise ValueError(f"{path}: {key}={json.dumps(value)} is {name(type(value))}; expected "
                             + " or ".join(name(t) for t in expected[key]))
    patch_sizes, adapter, rank = (settings.pop(k) for k in _FLEXIBLE_TYPES)
    settings["patch_size"] = tuple(settings["patch_size"]) if isinstance(settings["patch_size"], list) \
        else settings["patch_size"]
    try:
        model = cls(**settings)
        if len(patch_sizes) > 1:
            sizes = [tuple(p) if isinstance(p, list) else p for p in patch_sizes]
            model.flexify(sizes, adapter=adapter, lora_rank=32 if rank is None else rank)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    return model


def from_pretrained(cls, directory, **kwargs):
    """A model of class `cls` from a folder written by `save_pretrained`, in eval mode; `device=` and
    `dtype=` move it (as `.to()`); without `dtype=` it is float32, whatever the saved dtype (as
    diffusers' `from_pretrained` without `torch_dtype`).

    Raises TypeError (other keyword arguments, a `dtype` that is not a floating torch.dtype),
    FileNotFoundError / NotADirectoryError (no such folder, a file: names the loader for it, a
    missing config.json or model.safetensors) and ValueError (a `device` torch cannot use here, or
    naming the file that is unreadable, incomplete or wrong: see `_model_from_config`,
    `load_checkpoint`, `load_state_dict_strict`), all before any weights are read.
    """
    other = sorted(set(kwargs) - {"device", "dtype"})
    if other:
        raise TypeError(f"from_pretrained({str(directory)!r}): unexpected "
                        + ", ".join(f"{k}={kwargs[k]!r}" for k in other)
                        + "; it takes device= and dtype= only (patch sizes, adapter and rank are the "
                          "saved model's, from its config.json)")
    dtype = kwargs.get("dtype")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype, e.g. torch.float16")
    if kwargs.get("device") is not None:
        try:
            torch.empty(0, device=kwargs["device"])
        except (RuntimeError, TypeError, AssertionError) as e:   # AssertionError: torch without CUDA
            raise ValueError(f"device={kwargs['device']!r}: not a device this torch can use here "
                             f"({_reason(e)}); e.g. 'cpu' or 'cuda'") from None
    directory = Path(directory)
    if directory.is_file():
        hint = (f"a facebookresearch/DiT checkpoint file loads with {cls.__name__}.from_dit"
                if hasattr(cls, "from_dit") else "expected a folder")
        raise NotADirectoryError(f"{directory}: a file, not a folder written by save_pretrained; {hint}")
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder")
    for p in (config_path, weights_path):
        if not p.is_file():
            hint = ("; it is a diffusers folder: load it with from_diffusers"
                    if (directory / "model_index.json").is_file() else "")
            raise FileNotFoundError(f"{directory}: no {p.name}; expected a folder written by "
                                    f"{cls.__name__}.save_pretrained{hint}")
    model = _model_from_config(cls, _read_json(config_path), config_path)
    load_state_dict_strict(model, load_checkpoint(weights_path), str(weights_path))
    return model.to(**kwargs).eval()
