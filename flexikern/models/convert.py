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
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["load_checkpoint", "from_dit", "from_diffusers", "to_diffusers", "save_pretrained",
           "from_pretrained", "load_state_dict_strict", "pixart_from_diffusers", "latte_from_diffusers"]

# Heads cannot be read off the tensors; the known DiT widths give them.
HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6}
FORMAT_VERSION = 1


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Read a .pt/.pth (weights only) or .safetensors file, refusing anything that carries code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[-1]})") from e
        raise ValueError(f"{path}: refused to load: the file holds Python objects other than tensors "
                         f"and argparse.Namespace, which could run code. Nothing was executed. "
                         f"Re-save the weights as a plain state dict or as .safetensors. ({e})") from e
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def _unwrap(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, args) from a release file, a training checkpoint or a state dict."""
    args: dict[str, Any] = {}
    if isinstance(obj, Mapping) and "ema" in obj and isinstance(obj["ema"], Mapping):
        if isinstance(obj.get("args"), argparse.Namespace):
            args = vars(obj["args"])
        obj = obj["ema"]                      # DiT's training checkpoints: sample with the EMA
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("checkpoint: expected a state dict of tensors, or a DiT training checkpoint "
                         "{'model', 'ema', 'opt', 'args'}")
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
    """A FlexiDiT from facebookresearch/DiT weights: exact at the original patch size."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        raw = load_checkpoint(path_or_state_dict)
    else:
        source, raw = "state dict", path_or_state_dict
    state, args = _unwrap(raw)
    config = _infer_dit_config(state, args, source, num_heads, num_classes, input_size)
    model = cls(**config)
    key = model.original_patch_size.name
    state = dict(state)
    pos = state.pop("pos_embed", None)
    if pos is not None:
        table = model.pos_embed((config["input_size"],) * 2, model.original_patch_size)
        if pos.shape[-2:] != table.shape or not torch.allclose(pos.reshape(table.shape).float(), table, atol=1e-5):
            raise ValueError(f"{source}: pos_embed is not DiT's fixed sin-cos table; flexikern "
                             "regenerates that table per grid and cannot load a learned one")
    for name in ("x_embedder", "final_layer.linear"):
        for part in ("weight", "bias"):
            old = f"{name}.proj.{part}" if name == "x_embedder" else f"{name}.{part}"
            if old in state:
                state[f"{name}.{part}.{key}"] = state.pop(old)
    load_state_dict_strict(model, state, source)
    if patch_sizes is not None:
        model.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)
    return model


# ----------------------------------------------------------------------------- diffusers

def _diffusers_map(depth: int, key: str) -> dict[str, str]:
    """flexikern name -> diffusers name (q, k, v are split and handled separately)."""
    m = {"t_embedder.mlp.0": "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1",
         "t_embedder.mlp.2": "transformer_blocks.0.norm1.emb.timestep_embedder.linear_2",
         "final_layer.adaLN_modulation.1": "proj_out_1"}
    for i in range(depth):
        m[f"blocks.{i}.adaLN_modulation.1"] = f"transformer_blocks.{i}.norm1.linear"
        m[f"blocks.{i}.attn.proj"] = f"transformer_blocks.{i}.attn1.to_out.0"
        m[f"blocks.{i}.mlp.fc1"] = f"transformer_blocks.{i}.ff.net.0.proj"
        m[f"blocks.{i}.mlp.fc2"] = f"transformer_blocks.{i}.ff.net.2"
    out = {}
    for ours, theirs in m.items():
        out[f"{ours}.weight"], out[f"{ours}.bias"] = f"{theirs}.weight", f"{theirs}.bias"
    out["y_embedder.embedding_table.weight"] = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    out[f"x_embedder.weight.{key}"], out[f"x_embedder.bias.{key}"] = "pos_embed.proj.weight", "pos_embed.proj.bias"
    out[f"final_layer.linear.weight.{key}"] = "proj_out_2.weight"
    out[f"final_layer.linear.bias.{key}"] = "proj_out_2.bias"
    return out


def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter="lora", lora_rank=32):
    """A FlexiDiT from a diffusers DiTTransformer2DModel, reproducing diffusers' numerics
    (timestep frequencies divided by half-1, second LayerNorm eps from its config)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        from diffusers import DiTTransformer2DModel
        model_or_dir = DiTTransformer2DModel.from_pretrained(model_or_dir)
    cfg = model_or_dir.config
    if cfg.norm_type != "ada_norm_zero" or cfg.norm_elementwise_affine:
        raise ValueError(f"diffusers model: norm_type={cfg.norm_type!r}, elementwise_affine="
                         f"{cfg.norm_elementwise_affine}; only DiT's ada_norm_zero without affine is supported")
    if cfg.activation_fn != "gelu-approximate":
        raise ValueError(f"diffusers model: activation_fn={cfg.activation_fn!r}; DiT uses 'gelu-approximate'")
    state = model_or_dir.state_dict()
    depth, hidden = cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim
    out_channels = cfg.out_channels or cfg.in_channels
    rows = state["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0]
    num_classes = cfg.num_embeds_ada_norm
    mlp_hidden = state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
    model = cls(input_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
                hidden_size=hidden, depth=depth, num_heads=cfg.num_attention_heads,
                mlp_ratio=mlp_hidden / hidden, class_dropout_prob=0.1 if rows > num_classes else 0.0,
                num_classes=num_classes, learn_sigma=out_channels == 2 * cfg.in_channels,
                timestep_freq_shift=1, norm2_eps=cfg.norm_eps)
    if out_channels not in (cfg.in_channels, 2 * cfg.in_channels):
        raise ValueError(f"diffusers model: out_channels={out_channels} for in_channels={cfg.in_channels}")
    # diffusers gives every block its own timestep/class embedder; DiT shares one. Converted DiT
    # checkpoints hold identical copies, which is what flexikern can represent.
    for i in range(1, depth):
        for name, tensor in state.items():
            if name.startswith(f"transformer_blocks.{i}.norm1.emb."):
                first = name.replace(f"transformer_blocks.{i}.", "transformer_blocks.0.", 1)
                if not torch.equal(tensor, state[first]):
                    raise ValueError(f"diffusers model: block {i}'s embedder ({name}) differs from block 0's; "
                                     "flexikern shares one timestep/class embedder as DiT does")
    key = model.original_patch_size.name
    ours = {name: state[theirs] for name, theirs in _diffusers_map(depth, key).items()}
    for i in range(depth):
        attn = f"transformer_blocks.{i}.attn1"
        for part in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state[f"{attn}.to_{n}.{part}"] for n in "qkv"])
    load_state_dict_strict(model, ours, "diffusers DiTTransformer2DModel")
    if patch_sizes is not None:
        model.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)
    return model


def to_diffusers(model):
    """The original patch size of a FlexiDiT as a diffusers DiTTransformer2DModel."""
    from diffusers import DiTTransformer2DModel
    cfg = model.config
    if model.adapter == "shared":
        raise ValueError("to_diffusers: a 'shared' model has trained per-size norms and resized kernels "
                         "that DiTTransformer2DModel cannot hold; export a 'lora' or plain model")
    hidden, heads = cfg["hidden_size"], cfg["num_heads"]
    if cfg["patch_size"][0] != cfg["patch_size"][1]:
        raise ValueError(f"to_diffusers: DiTTransformer2DModel needs a square patch, got {cfg['patch_size']}")
    if cfg["timestep_freq_shift"] != 1:
        raise ValueError("to_diffusers: this model has facebookresearch/DiT numerics (timestep frequencies / "
                         "half); diffusers divides by half - 1, so its outputs would differ. Convert models "
                         "that came from diffusers, or compare against DiT's numerics instead")
    out = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads,
                                in_channels=model.in_channels, out_channels=model.out_channels,
                                num_layers=cfg["depth"], sample_size=cfg["input_size"],
                                patch_size=cfg["patch_size"][0], num_embeds_ada_norm=cfg["num_classes"],
                                norm_eps=cfg["norm2_eps"])
    state = model.state_dict()
    theirs = {t: state[o] for o, t in _diffusers_map(cfg["depth"], model.original_patch_size.name).items()}
    for i in range(cfg["depth"]):
        for part in ("weight", "bias"):
            for name, chunk in zip("qkv", state[f"blocks.{i}.attn.qkv.{part}"].chunk(3)):
                theirs[f"transformer_blocks.{i}.attn1.to_{name}.{part}"] = chunk
        for name in ("timestep_embedder.linear_1", "timestep_embedder.linear_2", "class_embedder.embedding_table"):
            for part in ("weight", "bias"):
                src = f"transformer_blocks.0.norm1.emb.{name}.{part}"
                if src in theirs:
                    theirs[f"transformer_blocks.{i}.norm1.emb.{name}.{part}"] = theirs[src]
    target = out.state_dict()
    missing = sorted(set(target) - set(theirs) - {"pos_embed.pos_embed"})
    if missing:
        raise RuntimeError(f"to_diffusers: no source for {missing[:10]}")
    out.load_state_dict({**{k: v for k, v in target.items() if k not in theirs}, **theirs}, strict=True)
    return out


# ----------------------------------------------------------------------------- flexikern's own

# ----------------------------------------------------------------------------- PixArt and Latte (diffusers)

def _diffusers_module(model_or_dir, cls_name: str):
    import diffusers
    target = getattr(diffusers, cls_name)
    if isinstance(model_or_dir, (str, os.PathLike)):
        return target.from_pretrained(str(model_or_dir))
    if not isinstance(model_or_dir, target):
        raise TypeError(f"expected a diffusers {cls_name} or a directory saved by it, got "
                        f"{type(model_or_dir).__name__}")
    return model_or_dir


def _check_text_config(cfg, source: str, allowed_activations=("gelu-approximate",)) -> None:
    """Reject the diffusers options flexikern's PixArt/Latte blocks do not reproduce, naming each."""
    problems = []
    if cfg.norm_type != "ada_norm_single":
        problems.append(f"norm_type={cfg.norm_type!r} (expected 'ada_norm_single')")
    if cfg.norm_elementwise_affine:
        problems.append("norm_elementwise_affine=True (PixArt/Latte norms have no affine)")
    if cfg.activation_fn not in allowed_activations:
        problems.append(f"activation_fn={cfg.activation_fn!r} (expected {allowed_activations})")
    if not cfg.attention_bias:
        problems.append("attention_bias=False (expected True)")
    if cfg.caption_channels is None:
        problems.append("caption_channels=None (a caption projection is required)")
    if cfg.patch_size is None:
        problems.append("patch_size=None")
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    if cfg.cross_attention_dim is not None and cfg.cross_attention_dim != heads * head_dim:
        problems.append(f"cross_attention_dim={cfg.cross_attention_dim} != inner dim {heads * head_dim}")
    if getattr(cfg, "attention_type", "default") not in (None, "default"):
        problems.append(f"attention_type={cfg.attention_type!r}")
    if problems:
        raise ValueError(f"{source}: unsupported configuration: " + "; ".join(problems))


def _text_block_map(prefix: str, ours: str, cross: bool) -> dict[str, str]:
    """flexikern PixArtBlock names -> diffusers BasicTransformerBlock (ada_norm_single) names."""
    names = {"scale_shift_table": "scale_shift_table"}
    for part in ("weight", "bias"):
        names[f"attn.proj.{part}"] = f"attn1.to_out.0.{part}"
        names[f"mlp.fc1.{part}"] = f"ff.net.0.proj.{part}"
        names[f"mlp.fc2.{part}"] = f"ff.net.2.{part}"
        if cross:
            names[f"cross_attn.q_linear.{part}"] = f"attn2.to_q.{part}"
            names[f"cross_attn.proj.{part}"] = f"attn2.to_out.0.{part}"
    return {f"{ours}.{o}": f"{prefix}.{t}" for o, t in names.items()}


def _text_block_state(state, prefix: str, ours: str, cross: bool) -> dict[str, torch.Tensor]:
    out = {o: state[t] for o, t in _text_block_map(prefix, ours, cross).items()}
    for part in ("weight", "bias"):
        out[f"{ours}.attn.qkv.{part}"] = torch.cat([state[f"{prefix}.attn1.to_{n}.{part}"] for n in "qkv"])
        if cross:
            out[f"{ours}.cross_attn.kv_linear.{part}"] = torch.cat(
                [state[f"{prefix}.attn2.to_{n}.{part}"] for n in "kv"])
    return out


def _text_common_state(state, key: str) -> dict[str, torch.Tensor]:
    """Embedders, adaLN-single, caption projection and output layer (shared by PixArt and Latte)."""
    names = {"x_embedder.weight." + key: "pos_embed.proj.weight", "x_embedder.bias." + key: "pos_embed.proj.bias",
             "final_layer.scale_shift_table": "scale_shift_table",
             "final_layer.linear.weight." + key: "proj_out.weight",
             "final_layer.linear.bias." + key: "proj_out.bias"}
    for part in ("weight", "bias"):
        names[f"t_embedder.mlp.0.{part}"] = f"adaln_single.emb.timestep_embedder.linear_1.{part}"
        names[f"t_embedder.mlp.2.{part}"] = f"adaln_single.emb.timestep_embedder.linear_2.{part}"
        names[f"t_block.1.{part}"] = f"adaln_single.linear.{part}"
        names[f"y_embedder.y_proj.fc1.{part}"] = f"caption_projection.linear_1.{part}"
        names[f"y_embedder.y_proj.fc2.{part}"] = f"caption_projection.linear_2.{part}"
    return {o: state[t] for o, t in names.items()}


def _null_caption(model, null_caption, source: str) -> torch.Tensor:
    """diffusers drops PixArt's learned null caption (`y_embedder.y_embedding`); take it from the caller."""
    current = model.y_embedder.y_embedding.detach()
    if null_caption is None:
        return current
    null_caption = torch.as_tensor(null_caption)
    if null_caption.shape != current.shape:
        raise ValueError(f"null_caption: expected shape {tuple(current.shape)} (text_len, caption_channels), "
                         f"got {tuple(null_caption.shape)}")
    return null_caption.to(current.dtype)


def _text_model(model_or_dir, cls_name: str, source: str, null_caption):
    """(module, its config, float state dict, our constructor kwargs) of a diffusers PixArt or
    Latte transformer, its config checked."""
    module = _diffusers_module(model_or_dir, cls_name)
    cfg = module.config
    _check_text_config(cfg, source)
    if cfg.cross_attention_dim is None:
        raise ValueError(f"{source}: cross_attention_dim=None (its blocks cross-attend to text)")
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
                  interpolation_scale=module.pos_embed.interpolation_scale, norm_eps=cfg.norm_eps)
    return module, cfg, state, config


def pixart_from_diffusers(cls, model_or_dir, patch_sizes=None, adapter="lora", lora_rank=32, null_caption=None):
    """A diffusers `PixArtTransformer2DModel` as a FlexiPixArt with the same numerics.

    Supported: the 256/512 models (`use_additional_conditions=False`). The 1024 model's resolution
    and aspect-ratio embeddings are rejected. diffusers does not keep PixArt's learned null caption:
    pass it as `null_caption` (text_len, caption_channels), e.g. the original checkpoint's
    `y_embedder.y_embedding`, else the model keeps a random one (set it before guided sampling).
    The text length is not stored by diffusers either: `text_len` = 120 (T5 in PixArt) unless the
    given null caption says otherwise.
    """
    source = "diffusers PixArtTransformer2DModel"
    module, cfg, state, config = _text_model(model_or_dir, "PixArtTransformer2DModel", source, null_caption)
    if module.use_additional_conditions:
        raise ValueError(f"{source}: use_additional_conditions=True (the 1024px model's resolution and "
                         f"aspect-ratio embeddings) is not supported; convert a 256/512 model "
                         f"(sample_size != 128 or use_additional_conditions=False)")
    model = cls(patch_size=cfg.patch_size, **config)
    if module.pos_embed.base_size != model.base_size:
        raise ValueError(f"{source}: pos_embed.base_size={module.pos_embed.base_size}, expected "
                         f"{model.base_size}")
    key = model.original_patch_size.name
    ours = _text_common_state(state, key)
    for i in range(cfg.num_layers):
        ours.update(_text_block_state(state, f"transformer_blocks.{i}", f"blocks.{i}", cross=True))
    ours["y_embedder.y_embedding"] = _null_caption(model, null_caption, source)
    load_state_dict_strict(model, ours, source)
    if patch_sizes is not None:
        model.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)
    return model


def latte_from_diffusers(cls, model_or_dir, patch_sizes=None, adapter="lora", lora_rank=32, null_caption=None):
    """A diffusers `LatteTransformer3DModel` as a FlexiLatte with the same numerics.

    Spatial blocks (cross-attention to text) alternate with temporal blocks (self-attention across
    frames); the temporal table is Latte's `temp_pos_embed`, regenerated for any frame count (at
    `video_length` frames it is Latte's). `null_caption` as for PixArt (Latte has none either).
    """
    source = "diffusers LatteTransformer3DModel"
    module, cfg, state, config = _text_model(model_or_dir, "LatteTransformer3DModel", source, null_caption)
    model = cls(num_frames=cfg.video_length, patch_size=(1, cfg.patch_size, cfg.patch_size), **config)
    key = model.original_patch_size.name
    ours = _text_common_state(state, key)
    # Latte embeds each frame with a Conv2d; flexikern's 3-D kernel has a temporal extent of 1.
    ours["x_embedder.weight." + key] = ours["x_embedder.weight." + key][:, :, None]
    for i in range(cfg.num_layers):
        ours.update(_text_block_state(state, f"transformer_blocks.{i}", f"blocks.{i}", cross=True))
        ours.update(_text_block_state(state, f"temporal_transformer_blocks.{i}", f"temporal_blocks.{i}",
                                      cross=False))
    ours["y_embedder.y_embedding"] = _null_caption(model, null_caption, source)
    load_state_dict_strict(model, ours, source)
    if patch_sizes is not None:
        model.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)
    return model


def save_pretrained(model, directory) -> None:
    """`config.json` + `model.safetensors` (flexible parts and adapters included), each written
    atomically; the format is the model class's `checkpoint_format`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {**model.config, "patch_sizes": [list(p) for p in model.patch_sizes], "adapter": model.adapter,
              "lora_rank": model.lora_rank, "format": model.checkpoint_format, "format_version": FORMAT_VERSION}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / ".model.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, directory / "model.safetensors")
    tmp = directory / ".config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, directory / "config.json")


def from_pretrained(cls, directory, **kwargs):
    """A model of class `cls` from a directory written by `save_pretrained`; kwargs go to `.to()`."""
    from safetensors.torch import load_file
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for p in (config_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"{directory}: no {p.name}; expected a directory written by "
                                    f"{cls.__name__}.save_pretrained")
    config = json.loads(config_path.read_text())
    fmt = config.pop("format", None)
    if fmt != cls.checkpoint_format:
        raise ValueError(f"{config_path}: format {fmt!r}, not a {cls.checkpoint_format} config")
    config.pop("format_version", None)
    patch_sizes, adapter, rank = config.pop("patch_sizes"), config.pop("adapter"), config.pop("lora_rank")
    config["patch_size"] = tuple(config["patch_size"])
    model = cls(**config)
    if len(patch_sizes) > 1:
        model.flexify([tuple(p) for p in patch_sizes], adapter=adapter, lora_rank=rank or 32)
    load_state_dict_strict(model, load_file(str(weights_path)), str(weights_path))
    return model.to(**kwargs) if kwargs else model
