"""The two fused patch GEMMs behind `patch_embed` and `de_embed` (forward and backward).

Both ops multiply by an *effective* weight that is the stored (underlying) kernel resized to the
patch size being run:

    W_eff[d, c, j] = sum_i W[d, c, i] * P[i, j]

with `i` a pixel of the stored kh x kw kernel, `j` a pixel of the ph x pw patch and P the
(kh*kw, ph*pw) resize matrix, given by the caller (`flexikern.ops.resize.pi_resize_matrix` for
the embedding, `resize_matrix^T` for the de-embedding). The resize is folded into the GEMM: per
K-tile (a block of channels) the kernel loads the stored rows and multiplies them by a
block-diagonal kron(I, P^T) tile in registers, so no resized weight ever exists in memory.
Strides describe W and P, so one kernel serves the embedding layout (D, C, kh, kw) and the
de-embedding layout (kh*kw*C, D).

* `image_to_tokens`: out[n, t, d] = sum_{c,j} image[n, c, patch t pixel j] * W_eff[d, c, j]
  (+ bias + pos_embed[t] + size_embed). The image is read in place through its strides (no
  patchify copy). patch_embed forward; de_embed backward w.r.t. the tokens.
* `tokens_to_image`: image[n, c, patch t pixel j] = sum_d tokens[n, t, d] * W_eff[d, c, j]
  (+ resized bias[c, j]), written straight into (N, C, H, W) through its strides (unpatchify
  fused). de_embed forward; patch_embed backward w.r.t. the latent.

Accumulation is fp32 with one cast on store. fp32 products (the resize always, the GEMM for fp32
inputs) use 3xTF32 (`input_precision="tf32x3"`): fp32-level accuracy on tensor cores, where plain
TF32 would miss the 1e-5 tolerance and IEEE dots leave tensor cores. 16-bit inputs multiply in
their dtype. Under the Triton interpreter (the launchers' `interpret=True`), 16-bit operands are
upcast to fp32 before `tl.dot` (triton 3.9's interpreter gets bf16 dots wrong).

Tiling is one config per shape (`*_meta`, no autotune: the interpreter cannot autotune, and the
ops are memory-bound at DiT sizes), chosen so that the DiT-XL/2 launches compile for sm_90 with
no register spills and at least two blocks per SM (`benchmarks/sm90_compile.py` compiles them
and tabulates registers and occupancy: benchmarks/README.md, "sm_90 compile table").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["EffectiveWeight", "image_to_tokens", "tokens_to_image", "new_output", "POISON_OUTPUTS"]

# Tests set this to True: every output buffer starts as NaN, so an element a kernel forgets to
# write fails the comparison with the reference instead of passing by luck.
POISON_OUTPUTS = False

# tl.dot needs every dimension >= 16.
_MIN_DOT = 16


def new_output(shape, dtype: torch.dtype, device: torch.device,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised output buffer (NaN-filled when `POISON_OUTPUTS`)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


@dataclass
class EffectiveWeight:
    """W_eff[d, c, j] = sum_i weight[d, c, i] * resize[i, j], described by strides.

    `weight_strides` are the (d, c, i) strides of the stored kernel, with i the flattened
    (kh, kw) pixel; `resize` is (kh*kw, ph*pw) with any strides, or None when the stored size is
    the patch size (then i = j).
    """

    weight: torch.Tensor
    weight_strides: tuple[int, int, int]
    channels: int
    features: int
    kernel_size: tuple[int, int]
    patch_size: tuple[int, int]
    resize: torch.Tensor | None = None

    def kernel_args(self) -> tuple:
        """(w, resize pointers), then the (d, c, i) and (i, j) strides."""
        # Without a resize, a dummy pointer: the RESIZE branches never read it.
        resize = self.resize if self.resize is not None else self.weight
        resize_strides = (resize.stride(0), resize.stride(1)) if self.resize is not None else (0, 0)
        return (self.weight, resize), (*self.weight_strides, *resize_strides)


def _next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _channel_tiling(w: EffectiveWeight, max_tile: int) -> tuple[int, int, int]:
    """(BLOCK_C, KI_PAD, PP_PAD): how many channels one K-tile covers, and the padded pixel counts.

    A K-tile is BLOCK_C channels x PP_PAD patch pixels; the stored rows feeding it are
    BLOCK_C x KI_PAD kernel pixels. Channels are added while the tile stays under `max_tile`
    (fewer passes over the other operand); then pixels are padded (masked) up to tl.dot's
    minimum of 16 rather than adding channels, whose resize cost grows as BLOCK_C**2.
    """
    pp_pad = _next_pow2(w.patch_size[0] * w.patch_size[1])
    ki_pad = _next_pow2(w.kernel_size[0] * w.kernel_size[1]) if w.resize is not None else pp_pad
    block_c = 1
    while block_c < w.channels and 2 * block_c * max(pp_pad, ki_pad) <= max_tile:
        block_c *= 2
    pp_pad = max(pp_pad, _MIN_DOT // block_c)
    ki_pad = max(ki_pad, _MIN_DOT // block_c) if w.resize is not None else pp_pad
    return block_c, ki_pad, pp_pad


@triton.jit
def _resize_tile(p_ptr, stride_pi, stride_pj, KK, PP,
                 RESIZE: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_C: tl.constexpr,
                 KI_PAD: tl.constexpr, PP_PAD: tl.constexpr):
    """kron(I_BLOCK_C, P^T) as a (BLOCK_C*PP_PAD, BLOCK_C*KI_PAD) fp32 tile; its transpose if
    TRANSPOSED. All zero without RESIZE (the caller then never uses it)."""
    offs_ko = tl.arange(0, BLOCK_C * PP_PAD)
    offs_ki = tl.arange(0, BLOCK_C * KI_PAD)
    j = offs_ko % PP_PAD
    i = offs_ki % KI_PAD
    # Channel-block diagonal: output pixel (c, j) mixes only stored pixels (c, i) of its own channel.
    if TRANSPOSED:
        mask = ((offs_ki // KI_PAD)[:, None] == (offs_ko // PP_PAD)[None, :]) \
            & (i < KK)[:, None] & (j < PP)[None, :] & RESIZE
        offsets = i[:, None] * stride_pi + j[None, :] * stride_pj
    else:
        mask = ((offs_ko // PP_PAD)[:, None] == (offs_ki // KI_PAD)[None, :]) \
            & (j < PP)[:, None] & (i < KK)[None, :] & RESIZE
        offsets = j[:, None] * stride_pj + i[None, :] * stride_pi
    return tl.load(p_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile(ptr, rows, cols, mask_rows, mask_cols, TRANSPOSED: tl.constexpr):
    """Load ptr[rows + cols] as a (rows, cols) fp32 tile, or as (cols, rows) if TRANSPOSED."""
    # One return statement: the compiler unifies the return types of all branches.
    if TRANSPOSED:
        tile = tl.load(ptr + rows[None, :] + cols[:, None],
                       mask=mask_rows[None, :] & mask_cols[:, None], other=0.0)
    else:
        tile = tl.load(ptr + rows[:, None] + cols[None, :],
                       mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _effective_weight_tile(w_ptr, p_ptr, c0, offs_d, C, D, KK, PP,
                           stride_wd, stride_wc, stride_wi, stride_pi, stride_pj,
                           RESIZE: tl.constexpr, TRANSPOSED: tl.constexpr,
                           BLOCK_C: tl.constexpr, KI_PAD: tl.constexpr, PP_PAD: tl.constexpr):
    """W_eff for channels c0 .. c0+BLOCK_C and features offs_d: a (BLOCK_C*PP_PAD, BLOCK_D) fp32
    tile with rows ordered (c, j), or (BLOCK_D, BLOCK_C*PP_PAD) if TRANSPOSED (built that way
    rather than transposed after the fact: no layout shuffle). Zero outside C, PP and D, so it can
    feed tl.dot unmasked."""
    offs_ko = tl.arange(0, BLOCK_C * PP_PAD)
    c_out = c0 + offs_ko // PP_PAD
    j = offs_ko % PP_PAD
    mask_out = (c_out < C) & (j < PP)
    mask_d = offs_d < D
    d_offsets = offs_d * stride_wd
    if RESIZE:
        offs_ki = tl.arange(0, BLOCK_C * KI_PAD)
        c_in = c0 + offs_ki // KI_PAD
        i = offs_ki % KI_PAD
        mask_in = (c_in < C) & (i < KK)
        # Reloaded per tile (P is tiny and cache-resident) rather than kept live in registers.
        resize = _resize_tile(p_ptr, stride_pi, stride_pj, KK, PP, RESIZE, TRANSPOSED, BLOCK_C,
                              KI_PAD, PP_PAD)
        stored = _tile(w_ptr, c_in * stride_wc + i * stride_wi, d_offsets, mask_in, mask_d,
                       TRANSPOSED)
        if TRANSPOSED:
            weight = tl.dot(stored, resize, input_precision="tf32x3")
        else:
            weight = tl.dot(resize, stored, input_precision="tf32x3")
    else:
        weight = _tile(w_ptr, c_out * stride_wc + j * stride_wi, d_offsets, mask_out, mask_d,
                       TRANSPOSED)
    return weight


@triton.jit
def _image_to_tokens_kernel(
    image_ptr, w_ptr, p_ptr, bias_ptr, pos_ptr, size_ptr, out_ptr,
    M, T, GW, C, D, KK, PP, PH, PW,
    stride_xn, stride_xc, stride_xh, stride_xw,
    stride_wd, stride_wc, stride_wi, stride_pi, stride_pj,
    stride_pt, stride_pd, stride_on, stride_ot, stride_od,
    RESIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_SIZE: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, KI_PAD: tl.constexpr, PP_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    # int64 token ids: N*T*D and the image offsets can pass 2**31 at large batch.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    n = offs_m // T
    t = offs_m % T
    gy = t // GW
    gx = t % GW
    patch_origin = n * stride_xn + (gy * PH) * stride_xh + (gx * PW) * stride_xw

    offs_k = tl.arange(0, BLOCK_C * PP_PAD)
    j = offs_k % PP_PAD
    pixel = (j // PW).to(tl.int64) * stride_xh + (j % PW).to(tl.int64) * stride_xw

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + offs_k // PP_PAD
        mask_k = (c < C) & (j < PP)
        patches = tl.load(image_ptr + patch_origin[:, None]
                          + (c.to(tl.int64) * stride_xc + pixel)[None, :],
                          mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        weight = _effective_weight_tile(w_ptr, p_ptr, c0, offs_d, C, D, KK, PP,
                                        stride_wd, stride_wc, stride_wi, stride_pi, stride_pj,
                                        RESIZE, False, BLOCK_C, KI_PAD, PP_PAD)
        if FP32_DOT:
            acc += tl.dot(patches.to(tl.float32), weight, input_precision="tf32x3")
        else:
            acc += tl.dot(patches, weight.to(patches.dtype))

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        acc += tl.load(pos_ptr + t[:, None] * stride_pt + offs_d[None, :] * stride_pd,
                       mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if HAS_SIZE:
        acc += tl.load(size_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + n[:, None] * stride_on + t[:, None] * stride_ot + offs_d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _tokens_to_image_kernel(
    tokens_ptr, w_ptr, p_ptr, bias_ptr, out_ptr,
    M, T, GW, C, D, KK, PP, PH, PW,
    stride_tn, stride_tt, stride_td,
    stride_wd, stride_wc, stride_wi, stride_pi, stride_pj,
    stride_bc, stride_bi, stride_on, stride_oc, stride_oh, stride_ow,
    RESIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr, KI_PAD: tl.constexpr, PP_PAD: tl.constexpr,
):
    # A 1-D grid with channel blocks fastest: programs sharing a token tile run together (L2
    # reuse), and the token-tile count is not bound by grid axis 1's limit of 65535.
    pid = tl.program_id(0)
    pid_c = pid % tl.cdiv(C, BLOCK_C)
    pid_m = pid // tl.cdiv(C, BLOCK_C)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n = offs_m // T
    t = offs_m % T
    c0 = pid_c * BLOCK_C
    offs_k = tl.arange(0, BLOCK_C * PP_PAD)
    c = c0 + offs_k // PP_PAD
    j = offs_k % PP_PAD
    mask_k = (c < C) & (j < PP)

    acc = tl.zeros((BLOCK_M, BLOCK_C * PP_PAD), dtype=tl.float32)
    token_row = n * stride_tn + t * stride_tt
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tokens = tl.load(tokens_ptr + token_row[:, None] + offs_d[None, :] * stride_td,
                         mask=mask_m[:, None] & (offs_d < D)[None, :], other=0.0)
        weight = _effective_weight_tile(w_ptr, p_ptr, c0, offs_d, C, D, KK, PP,
                                        stride_wd, stride_wc, stride_wi, stride_pi, stride_pj,
                                        RESIZE, True, BLOCK_C, KI_PAD, PP_PAD)
        if FP32_DOT:
            acc += tl.dot(tokens.to(tl.float32), weight, input_precision="tf32x3")
        else:
            acc += tl.dot(tokens, weight.to(tokens.dtype))

    if HAS_BIAS:
        if RESIZE:
            # The bias is resized like one more stored row: b_eff[c, j] = sum_i b[c, i] P[i, j].
            resize_tile = _resize_tile(p_ptr, stride_pi, stride_pj, KK, PP, RESIZE, False, BLOCK_C,
                                       KI_PAD, PP_PAD)
            offs_ki = tl.arange(0, BLOCK_C * KI_PAD)
            c_in = c0 + offs_ki // KI_PAD
            i = offs_ki % KI_PAD
            stored = tl.load(bias_ptr + c_in * stride_bc + i * stride_bi,
                             mask=(c_in < C) & (i < KK), other=0.0).to(tl.float32)
            acc += tl.sum(resize_tile * stored[None, :], axis=1)[None, :]
        else:
            acc += tl.load(bias_ptr + c * stride_bc + j * stride_bi, mask=mask_k,
                           other=0.0).to(tl.float32)[None, :]

    # Unpatchify fused: pixel j of token t lands at row gy*PH + j//PW, column gx*PW + j%PW.
    gy = t // GW
    gx = t % GW
    row = gy * PH
    col = gx * PW
    offs_out = (n * stride_on + row * stride_oh + col * stride_ow)[:, None] \
        + (c.to(tl.int64) * stride_oc + (j // PW).to(tl.int64) * stride_oh
           + (j % PW).to(tl.int64) * stride_ow)[None, :]
    tl.store(out_ptr + offs_out, acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


def _or(tensor: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer for every argument; a HAS_* constexpr keeps the dummy unread.
    return tensor if tensor is not None else dummy


def _fp32_dot(dtype: torch.dtype, interpret: bool) -> bool:
    return dtype == torch.float32 or interpret


def _num_warps(*tile_elements: int) -> int:
    # From 8K live tile elements (the stored rows and the resize tile included) 4 warps need
    # ~255 registers or spill on sm_90 (benchmarks/sm90_compile.py); use 8.
    return 8 if sum(tile_elements) >= 8192 else 4


def _block_m(m: int, other_blocks: int, largest: int = 64) -> int:
    """`largest` tokens per program, fewer (down to tl.dot's 16) until the grid has >= 512
    programs: these ops are memory-bound, so every SM needs several programs in flight."""
    block_m = largest
    while block_m > _MIN_DOT and triton.cdiv(m, block_m) * other_blocks < 512:
        block_m //= 2
    return block_m


def image_to_tokens_meta(weight: EffectiveWeight, m: int, dtype: torch.dtype,
                        interpret: bool) -> dict:
    """Block sizes and warps of `_image_to_tokens_kernel` for M tokens (one config, no autotune:
    the interpreter cannot autotune, and the op is memory-bound at DiT sizes)."""
    block_c, ki_pad, pp_pad = _channel_tiling(weight, max_tile=64)
    block_k = block_c * pp_pad
    block_d = min(128, max(_MIN_DOT, _next_pow2(weight.features)))
    # 3xTF32 dots (the resize always, the GEMM for fp32) keep both operands in registers twice
    # (high and low parts): 64 features and, for fp32, 32 tokens keep a block under ~128
    # registers, two blocks per SM (128 features or 64 tokens: ~200 registers, or spills).
    fp32_dot = _fp32_dot(dtype, interpret)
    if weight.resize is not None or fp32_dot:
        block_d = min(block_d, 64)
    block_m = _block_m(m, triton.cdiv(weight.features, block_d), 32 if fp32_dot else 64)
    resize = block_c * ki_pad * (block_d + block_k) if weight.resize is not None else 0
    return dict(FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c,
                KI_PAD=ki_pad, PP_PAD=pp_pad,
                num_warps=_num_warps(block_m * block_d, block_m * block_k, block_k * block_d, resize))


def tokens_to_image_meta(weight: EffectiveWeight, m: int, dtype: torch.dtype,
                         interpret: bool) -> dict:
    """Block sizes and warps of `_tokens_to_image_kernel` for M tokens."""
    # The resize tile kron(I, P^T) grows as BLOCK_C**2 and, like every 3xTF32 operand, lives
    # in registers twice: resizing or fp32 takes 32 features per step and a resize at most 64
    # stored rows per K-tile (twice that: 1 block per SM at ~225 registers).
    resizing = weight.resize is not None
    block_c, ki_pad, pp_pad = _channel_tiling(weight, max_tile=64 if resizing else 128)
    block_m = _block_m(m, triton.cdiv(weight.channels, block_c))
    block_k = block_c * pp_pad
    fp32_dot = _fp32_dot(dtype, interpret)
    block_d = 32 if resizing or fp32_dot else 64
    resize = block_c * ki_pad * (block_d + block_k) if resizing else 0
    return dict(FP32_DOT=fp32_dot, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_C=block_c,
                KI_PAD=ki_pad, PP_PAD=pp_pad,
                num_warps=_num_warps(block_m * block_k, block_m * block_d, block_k * block_d, resize))


def image_to_tokens(image: torch.Tensor, weight: EffectiveWeight, out: torch.Tensor,
                    bias: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None,
                    size_embed: torch.Tensor | None = None, *, interpret: bool) -> torch.Tensor:
    """out (N, T, D) = patches of `image` (N, C, H, W) times W_eff, plus the optional adds.

    Any strides for `image`, `out` and `pos_embed`; `bias` and `size_embed` contiguous (D,).
    `interpret`: the launch runs in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
    """
    n, c, h, w = image.shape
    ph, pw = weight.patch_size
    kh, kw = weight.kernel_size
    grid_w = w // pw
    tokens = (h // ph) * grid_w
    d = weight.features
    m = n * tokens
    if m == 0 or d == 0:
        return out
    meta = image_to_tokens_meta(weight, m, image.dtype, interpret)
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]))
    pointers, weight_strides = weight.kernel_args()
    pos_strides = pos_embed.stride() if pos_embed is not None else (0, 0)
    _image_to_tokens_kernel[grid](
        image, *pointers, _or(bias, out), _or(pos_embed, out), _or(size_embed, out), out,
        m, tokens, grid_w, c, d, kh * kw, ph * pw, ph, pw,
        *image.stride(), *weight_strides, *pos_strides, *out.stride(),
        RESIZE=weight.resize is not None, HAS_BIAS=bias is not None,
        HAS_POS=pos_embed is not None, HAS_SIZE=size_embed is not None,
        **meta,
    )
    return out


def tokens_to_image(tokens: torch.Tensor, weight: EffectiveWeight, out: torch.Tensor,
                    bias: torch.Tensor | None = None,
                    bias_strides: tuple[int, int] = (0, 0), *, interpret: bool) -> torch.Tensor:
    """out (N, C, H, W) = tokens (N, T, D) times W_eff, unpatchified, plus the resized bias.

    `bias` is the stored bias with (c, i) strides `bias_strides`; it is resized with W's matrix.
    Any strides for `tokens` and `out`. `interpret`: as for `image_to_tokens`.
    """
    n, c, h, w = out.shape
    ph, pw = weight.patch_size
    kh, kw = weight.kernel_size
    grid_w = w // pw
    num_tokens = (h // ph) * grid_w
    d = weight.features
    m = n * num_tokens
    if m == 0 or c == 0:
        return out
    meta = tokens_to_image_meta(weight, m, tokens.dtype, interpret)
    grid = (triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(m, meta["BLOCK_M"]),)
    pointers, weight_strides = weight.kernel_args()
    _tokens_to_image_kernel[grid](
        tokens, *pointers, _or(bias, out), out,
        m, num_tokens, grid_w, c, d, kh * kw, ph * pw, ph, pw,
        *tokens.stride(), *weight_strides, *bias_strides, *out.stride(),
        RESIZE=weight.resize is not None, HAS_BIAS=bias is not None, **meta,
    )
    return out
