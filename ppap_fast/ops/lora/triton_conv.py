"""The base convolution and its multi-expert LoRA in the same implicit-GEMM Triton kernels
(``lora_conv2d(..., a_stage="in_base")``).

The ``implicit`` A stage leaves the base conv to cuDNN and adds the LoRA with separate kernels,
which re-read x, y, dy and dx: about 6 activation passes and 4-5 launches on top of the base
layer (benchmarks/NOTES.md: a floor of ~1.25-1.35x the frozen layer's fwd+bwd). Here the LoRA
rides on the base conv's own loads:

* forward ``conv_base_lora_fwd``: rows are output pixels in expert-sorted segment tiles (one
  expert per tile, as in the SGMV kernels); each K step loads one x tile and multiplies it by
  the W tile (y) and by the tile's expert's A tile (h, R extra columns); the epilogue adds
  ``scale * h B_e`` + bias + expert bias and writes y, and h for the backward. Extra FLOPs:
  R / BLOCK_N of the base conv.
* input gradient ``conv_base_lora_dgrad``: dx = conv_transpose(dy, W) + conv_transpose(dh, A_e)
  as one GEMM whose K runs over the taps x C_out of dy and then the taps x R of dh.

W is read through its strides (channels_last weights, [C_out, kh, kw, C] in memory, give
contiguous tiles); activations in channels_last give contiguous channel loads. Any stride,
padding and dilation; groups 1. With ``A is None`` the kernels are a plain convolution and its
input gradient (the speed of the Triton conv alone, against cuDNN).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .triton_kernels import (_conv_geometry, _dot, _dot_cfg, _find_tile, _interpreting, _pow2_at_least, _tap_input,
                             _tap_source, alloc)

IN_BASE_MAX_RANK = 64  # the forward keeps the R columns of h in one register tile beside the y tile


@triton.jit
def _dot_into(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b (fp32 acc), the dot accumulating in place."""
    if DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    else:
        r = tl.dot(a, b.to(a.dtype), acc)
    return r


@triton.jit
def _segment_rows(off_ptr, sidx_ptr, pid, N, M, BLOCK_M: tl.constexpr):
    """This program's rows: (expert (-1: idle), row mask, sample of each row (int64), row within its
    sample) of the expert-sorted segment tiles over M rows per sample."""
    e, start, nrows, s0 = _find_tile(off_ptr, pid, N, M, BLOCK_M)
    j = start + tl.arange(0, BLOCK_M)
    rmask = j < nrows
    smp = tl.load(sidx_ptr + s0 + j // M, mask=rmask, other=0).to(tl.int64)
    return e, rmask, smp, j % M


@triton.jit
def _conv_base_lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, eb_ptr, y_ptr, h_ptr, sidx_ptr, off_ptr,
    N, C, H, W, Ho, Wo, NOUT, R, CP,
    xs_s, xs_c, xs_h, xs_w,
    ws_n, ws_c, ws_h, ws_w,
    as_e, as_r, as_c, as_h, as_w,
    bs_e, bs_n, bs_r,
    ebs_e, ebs_n,
    ys_s, ys_c, ys_h, ys_w,
    hs_s, hs_r, hs_h, hs_w,
    scale, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EB: tl.constexpr, FLAT_K: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """y = conv(x, W) + bias + eb[e] + scale * B_e conv(x, A_e), h = conv(x, A_e) (HAS_LORA).
    Program (tile, pid_n): BLOCK_M output pixels of expert e's segment x BLOCK_N output channels;
    K = taps x CP (C padded to BLOCK_K per tap; FLAT_K, C < BLOCK_K: CP = C, the taps' channels
    packed with no padding). The pid_n == 0 programs store h."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rmask, smp, p = _segment_rows(off_ptr, sidx_ptr, pid, N, Ho * Wo, BLOCK_M)
    if e < 0:
        return
    oh = p // Wo
    ow = p % Wo
    x_smp = x_ptr + smp * xs_s
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nvalid = offs_n < NOUT
    offs_r = tl.arange(0, BLOCK_R)
    rvalid = offs_r < R
    a_base = a_ptr + e.to(tl.int64) * as_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, KH * KW * CP, BLOCK_K):  # one flat loop: Triton pipelines its loads
        if FLAT_K:  # few channels (a stem conv): K = taps x C unpadded, each column its own tap and channel
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kvalid = offs_k < KH * KW * C
            tap_k = offs_k // C
            c_k = offs_k - tap_k * C
            kh_k = tap_k // KW
            kw_k = tap_k - kh_k * KW
            ih2, iw2, inside = _tap_input(oh[:, None], ow[:, None], kh_k[None, :], kw_k[None, :], H, W,
                                          STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            xmask = rmask[:, None] & kvalid[None, :] & inside
            xt = tl.load(x_smp[:, None] + (ih2 * xs_h + iw2 * xs_w + c_k[None, :] * xs_c),  # in-sample: int32
                         mask=xmask, other=0.0)
            w_k = (kh_k * ws_h + kw_k * ws_w + c_k * ws_c)[:, None]
            a_k = (kh_k * as_h + kw_k * as_w + c_k * as_c)[:, None]
        else:  # one tap per K step, BLOCK_K of its channels
            tap = k0 // CP
            c0 = k0 - tap * CP
            kh = tap // KW
            kw = tap - kh * KW
            ih, iw, inb = _tap_input(oh, ow, kh, kw, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            inb = inb & rmask
            offs_c = c0 + tl.arange(0, BLOCK_K)
            kvalid = offs_c < C
            xt = tl.load((x_smp + ih.to(tl.int64) * xs_h + iw.to(tl.int64) * xs_w)[:, None] + offs_c[None, :] * xs_c,
                         mask=inb[:, None] & kvalid[None, :], other=0.0)
            w_k = kh * ws_h + kw * ws_w + offs_c[:, None] * ws_c
            a_k = kh * as_h + kw * as_w + offs_c[:, None] * as_c
        wt = tl.load(w_ptr + w_k + offs_n[None, :] * ws_n, mask=kvalid[:, None] & nvalid[None, :], other=0.0)
        acc += _dot(xt, wt, DOT_F32, PREC)
        if HAS_LORA:
            at = tl.load(a_base + a_k + offs_r[None, :] * as_r, mask=kvalid[:, None] & rvalid[None, :], other=0.0)
            hacc += _dot(xt, at, DOT_F32, PREC)
    if HAS_LORA:
        h = hacc.to(h_ptr.dtype.element_ty)  # h in the compute dtype, as a separate A conv gives it
        tl.store(h_ptr + (smp * hs_s + oh.to(tl.int64) * hs_h + ow.to(tl.int64) * hs_w)[:, None]
                 + offs_r[None, :] * hs_r, h, mask=rmask[:, None] & rvalid[None, :] & (pid_n == 0))
        bt = tl.load(b_ptr + e.to(tl.int64) * bs_e + offs_r[:, None] * bs_r + offs_n[None, :] * bs_n,
                     mask=rvalid[:, None] & nvalid[None, :], other=0.0)
        bt = (bt.to(tl.float32) * scale).to(h.dtype)  # scale on B: the dot accumulates into acc (no 2nd tile)
        acc = _dot_into(h, bt, acc, DOT_F32, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
    if HAS_EB:
        acc += tl.load(eb_ptr + e.to(tl.int64) * ebs_e + offs_n * ebs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + (smp * ys_s + oh.to(tl.int64) * ys_h + ow.to(tl.int64) * ys_w)[:, None] + offs_n[None, :] * ys_c,
             acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nvalid[None, :])


@triton.jit
def _conv_base_lora_dgrad_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, dx_ptr, sidx_ptr, off_ptr,
    N, C, H, W, Ho, Wo, NOUT, R, NP,
    dys_s, dys_n, dys_h, dys_w,
    ws_n, ws_c, ws_h, ws_w,
    dhs_s, dhs_r, dhs_h, dhs_w,
    as_e, as_r, as_c, as_h, as_w,
    dxs_s, dxs_c, dxs_h, dxs_w,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_LORA: tl.constexpr, FLAT_K: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """dx = conv_transpose(dy, W) (+ conv_transpose(dh, A_e), HAS_LORA), written. Program (tile,
    pid_n): BLOCK_M input pixels of expert e's segment x BLOCK_N input channels; K = taps x NP
    (C_out padded to BLOCK_K per tap; FLAT_K, C_out < BLOCK_K: NP = C_out, packed) over dy, then
    taps x R over dh. A tap reaches an input pixel
    only from the output pixels its stride lands on (others masked)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, rmask, smp, q = _segment_rows(off_ptr, sidx_ptr, pid, N, H * W, BLOCK_M)
    if e < 0:
        return
    ih = q // W
    iw = q % W
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cvalid = offs_c < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KH * KW * NP, BLOCK_K):
        if FLAT_K:  # few output channels: K = taps x C_out unpadded, each column its own tap and channel
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kvalid = offs_k < KH * KW * NOUT
            tap_k = offs_k // NOUT
            n_k = offs_k - tap_k * NOUT
            kh_k = tap_k // KW
            kw_k = tap_k - kh_k * KW
            oh2, ow2, ok2 = _tap_source(ih[:, None], iw[:, None], kh_k[None, :], kw_k[None, :], Ho, Wo,
                                        STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            dmask = rmask[:, None] & kvalid[None, :] & ok2
            dt = tl.load((dy_ptr + smp * dys_s)[:, None] + (oh2 * dys_h + ow2 * dys_w + n_k[None, :] * dys_n),
                         mask=dmask, other=0.0)
            w_k = (kh_k * ws_h + kw_k * ws_w + n_k * ws_n)[:, None]
        else:
            tap = k0 // NP
            n0 = k0 - tap * NP
            kh = tap // KW
            kw = tap - kh * KW
            oh, ow, ok = _tap_source(ih, iw, kh, kw, Ho, Wo, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            ok = ok & rmask
            offs_k = n0 + tl.arange(0, BLOCK_K)
            kvalid = offs_k < NOUT
            dt = tl.load((dy_ptr + smp * dys_s + oh.to(tl.int64) * dys_h + ow.to(tl.int64) * dys_w)[:, None]
                         + offs_k[None, :] * dys_n, mask=ok[:, None] & kvalid[None, :], other=0.0)
            w_k = kh * ws_h + kw * ws_w + offs_k[:, None] * ws_n
        wt = tl.load(w_ptr + w_k + offs_c[None, :] * ws_c, mask=kvalid[:, None] & cvalid[None, :], other=0.0)
        acc += _dot(dt, wt, DOT_F32, PREC)
    if HAS_LORA:
        offs_r = tl.arange(0, BLOCK_R)
        rvalid = offs_r < R
        a_base = a_ptr + e.to(tl.int64) * as_e
        for tap in range(0, KH * KW):
            kh = tap // KW
            kw = tap - kh * KW
            oh, ow, ok = _tap_source(ih, iw, kh, kw, Ho, Wo, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            ok = ok & rmask
            dht = tl.load((dh_ptr + smp * dhs_s + oh.to(tl.int64) * dhs_h + ow.to(tl.int64) * dhs_w)[:, None]
                          + offs_r[None, :] * dhs_r, mask=ok[:, None] & rvalid[None, :], other=0.0)
            at = tl.load(a_base + kh * as_h + kw * as_w + offs_r[:, None] * as_r + offs_c[None, :] * as_c,
                         mask=rvalid[:, None] & cvalid[None, :], other=0.0)
            acc += _dot(dht, at, DOT_F32, PREC)
    tl.store((dx_ptr + smp * dxs_s + ih.to(tl.int64) * dxs_h + iw.to(tl.int64) * dxs_w)[:, None]
             + offs_c[None, :] * dxs_c, acc.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & cvalid[None, :])


# --------------------------------------------------------------------------- launchers
_TILE_OVERRIDE: list = []  # [(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)] inside tiles()


@contextlib.contextmanager
def tiles(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int):
    """Launch the in-base kernels with these tiles inside the block (benchmarks compare tilings;
    not for the interpreter, which keeps its 16-wide tiles). Powers of two, >= 16."""
    for v in (block_m, block_n, block_k):
        if v < 16 or v & (v - 1):
            raise ValueError(f"tile sizes must be powers of two >= 16, got {(block_m, block_n, block_k)}")
    _TILE_OVERRIDE.append((block_m, block_n, block_k, num_warps, num_stages))
    try:
        yield
    finally:
        _TILE_OVERRIDE.pop()


def _tiles(n_cols: int, dtype: torch.dtype, rank_tile: int, channels_inner: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM of n_cols output columns beside
    a rank_tile-wide LoRA tile; channels_inner: the activation's channel stride is 1 (channels_last),
    else every element of an activation tile has its own address (half the K tile: fewer registers)."""
    if _interpreting():
        return 16, 16, 16, 4, 1
    if _TILE_OVERRIDE:
        return _TILE_OVERRIDE[-1]
    f32 = dtype == torch.float32
    bn = max(16, min(128, triton.next_power_of_2(max(n_cols, 1))))
    bk = 32 if (f32 or not channels_inner) else 64
    bm = 128 if (not f32 and rank_tile <= 32) else 64
    warps = 8 if bn >= 128 else 4
    return bm, bn, bk, warps, (2 if f32 else 3)


def _check_lora(A, B, C, NOUT, KH, KW):
    if A is None:
        return 0
    if A.dim() != 5 or B is None or B.dim() != 3:
        raise ValueError(f"A must be [N, R, C, kh, kw] and B [N, C_out, R], got {tuple(A.shape)}, "
                         f"{None if B is None else tuple(B.shape)}")
    R = A.shape[1]
    if tuple(A.shape[2:]) != (C, KH, KW) or tuple(B.shape[1:]) != (NOUT, R) or B.shape[0] != A.shape[0]:
        raise ValueError(f"A {tuple(A.shape)} / B {tuple(B.shape)} do not fit W [{NOUT}, {C}, {KH}, {KW}]")
    if R > IN_BASE_MAX_RANK:
        raise ValueError(f"conv_base_lora keeps the rank in one tile: {R} > {IN_BASE_MAX_RANK}")
    return R


def conv_base_lora_fwd(x: torch.Tensor, W: torch.Tensor, y: torch.Tensor, sorted_idx: torch.Tensor,
                       offsets: torch.Tensor, stride=1, padding=0, dilation=1, bias: torch.Tensor | None = None,
                       A: torch.Tensor | None = None, B: torch.Tensor | None = None, scale: float = 1.0,
                       expert_bias: torch.Tensor | None = None, h_out: torch.Tensor | None = None) -> torch.Tensor:
    """y = conv(x, W) + bias + expert_bias[e] + scale * B_e conv(x, A_e) with e the expert of each
    sample (segments of build_segments: sorted_idx, offsets), written (fully); h_out [S, R, Ho, Wo]
    receives conv(x, A_e). x [S, C, H, W], W [C_out, C, kh, kw] (groups 1), A [N, R, C, kh, kw],
    B [N, C_out, R], y [S, C_out, Ho, Wo]; any strides. A None: the plain conv (+ bias, + expert
    bias). Returns y."""
    for name, t in (("x", x), ("W", W), ("y", y)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got {tuple(t.shape)}")
    S, C, H, Wd = x.shape
    NOUT, Cw, KH, KW = W.shape
    if Cw != C or y.shape[:2] != (S, NOUT):
        raise ValueError(f"x {tuple(x.shape)}, W {tuple(W.shape)}, y {tuple(y.shape)} do not fit (groups 1)")
    R = _check_lora(A, B, C, NOUT, KH, KW)
    if R and (h_out is None or tuple(h_out.shape) != (S, R, *y.shape[2:])):
        raise ValueError(f"h_out must be [S, R, Ho, Wo] = {(S, R, *y.shape[2:])}")
    N = offsets.numel() - 1
    Ho, Wo = y.shape[2:]
    if S == 0 or Ho * Wo == 0 or NOUT == 0:
        return y
    (sh, sw), (ph, pw), (dh, dw) = _conv_geometry(stride, padding, dilation)
    BR = _pow2_at_least(R, 16, IN_BASE_MAX_RANK)
    BM, BN, BK, warps, stages = _tiles(NOUT, x.dtype, BR if R else 0, x.stride(1) == 1)
    flat = C < BK
    CP = C if flat else triton.cdiv(C, BK) * BK
    dot_f32, prec = _dot_cfg(x, W)
    a, b = (A, B) if R else (W, W)
    h = h_out if R else y
    eb = expert_bias if expert_bias is not None else y
    grid = (triton.cdiv(S * Ho * Wo, BM) + N, triton.cdiv(NOUT, BN))
    _conv_base_lora_fwd_kernel[grid](
        x, W, bias if bias is not None else y, a, b, eb, y, h, sorted_idx, offsets,
        N, C, H, Wd, Ho, Wo, NOUT, R, CP,
        *x.stride(), *W.stride(), *(A.stride() if R else (0,) * 5), *(B.stride() if R else (0,) * 3),
        *(expert_bias.stride() if expert_bias is not None else (0, 0)), *y.stride(),
        *(h_out.stride() if R else (0,) * 4),
        float(scale), sh, sw, ph, pw, dh, dw,
        KH=KH, KW=KW, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BR, HAS_LORA=R > 0,
        HAS_BIAS=bias is not None, HAS_EB=expert_bias is not None, FLAT_K=flat, DOT_F32=dot_f32, PREC=prec,
        num_warps=warps, num_stages=stages,
    )
    return y


def conv_base_lora_dgrad(dy: torch.Tensor, W: torch.Tensor, dx: torch.Tensor, sorted_idx: torch.Tensor,
                         offsets: torch.Tensor, stride=1, padding=0, dilation=1, dh: torch.Tensor | None = None,
                         A: torch.Tensor | None = None) -> torch.Tensor:
    """dx = conv_transpose(dy, W) + conv_transpose(dh, A_e) (the input gradient of
    conv_base_lora_fwd's y given dh = scale * B_e^T dy), written (fully). dy [S, C_out, Ho, Wo],
    W [C_out, C, kh, kw], dx [S, C, H, W], dh [S, R, Ho, Wo], A [N, R, C, kh, kw]; any strides.
    A None: the plain conv's input gradient. Returns dx."""
    for name, t in (("dy", dy), ("W", W), ("dx", dx)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got {tuple(t.shape)}")
    S, C, H, Wd = dx.shape
    NOUT, Cw, KH, KW = W.shape
    if Cw != C or dy.shape[:2] != (S, NOUT):
        raise ValueError(f"dy {tuple(dy.shape)}, W {tuple(W.shape)}, dx {tuple(dx.shape)} do not fit (groups 1)")
    R = 0
    if A is not None:
        if A.dim() != 5 or tuple(A.shape[2:]) != (C, KH, KW):
            raise ValueError(f"A must be [N, R, {C}, {KH}, {KW}], got {tuple(A.shape)}")
        R = A.shape[1]
        if R > IN_BASE_MAX_RANK:
            raise ValueError(f"conv_base_lora keeps the rank in one tile: {R} > {IN_BASE_MAX_RANK}")
        if dh is None or tuple(dh.shape) != (S, R, *dy.shape[2:]):
            raise ValueError(f"dh must be [S, R, Ho, Wo] = {(S, R, *dy.shape[2:])}")
    N = offsets.numel() - 1
    Ho, Wo = dy.shape[2:]
    if S == 0 or H * Wd == 0 or C == 0:
        return dx
    (sh, sw), (ph, pw), (dlh, dlw) = _conv_geometry(stride, padding, dilation)
    BR = _pow2_at_least(R, 16, IN_BASE_MAX_RANK)
    BM, BN, BK, warps, stages = _tiles(C, dy.dtype, BR if R else 0, dy.stride(1) == 1)
    flat = NOUT < BK
    NP = NOUT if flat else triton.cdiv(NOUT, BK) * BK
    dot_f32, prec = _dot_cfg(dy, W)
    grid = (triton.cdiv(S * H * Wd, BM) + N, triton.cdiv(C, BN))
    _conv_base_lora_dgrad_kernel[grid](
        dy, W, dh if R else dy, A if R else W, dx, sorted_idx, offsets,
        N, C, H, Wd, Ho, Wo, NOUT, R, NP,
        *dy.stride(), *W.stride(), *(dh.stride() if R else (0,) * 4), *(A.stride() if R else (0,) * 5),
        *dx.stride(), sh, sw, ph, pw, dlh, dlw,
        KH=KH, KW=KW, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=BR, HAS_LORA=R > 0, FLAT_K=flat,
        DOT_F32=dot_f32, PREC=prec, num_warps=warps, num_stages=stages,
    )
    return dx


def weight_for_tiles(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A conv weight [C_out, C, kh, kw] in channels_last ([C_out, kh, kw, C] in memory: contiguous
    channel tiles for both kernels) and ``dtype``; one copy at most, none when it already is."""
    return t.to(dtype=dtype or t.dtype, memory_format=torch.channels_last)


def lora_a_for_tiles(A: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A [N, R, C, kh, kw] in ``dtype`` as a view of a [N, kh, kw, C, R] tensor (the rank contiguous: the
    forward's [C, R] and the dgrad's [R, C] tiles read whole rank rows); one copy at most (cast and
    permutation together), none when it already is."""
    dtype = dtype or A.dtype
    N, R, C, KH, KW = A.shape
    if A.dtype == dtype and A.stride() == (KH * KW * C * R, 1, R, KW * C * R, C * R):
        return A
    out = torch.empty((N, KH, KW, C, R), dtype=dtype, device=A.device)
    out.copy_(A.permute(0, 3, 4, 2, 1))
    return out.permute(0, 4, 3, 1, 2)
