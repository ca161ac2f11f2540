"""Triton kernels of ops.out_head (GroupNorm + SiLU + 3x3 conv to a few channels), forward only.

A 3x3 conv to Cout channels is, per pixel, 9 taps x Cout dot products with the normalised input. The
projection kernel reads each input pixel once, applies the GroupNorm affine and SiLU in float32
(rounded once to x's dtype, as the unfused head writes its norm), and multiplies it by the weights of
all 9 taps at once ([C, 9 * Cout], one tensor-core tile): P[b, tap, pixel, o], float32. The taps
kernel then sums, for each output pixel, tap (dy, dx)'s column of the neighbour at (y + dy - 1,
x + dx - 1), skipping neighbours outside the image (the zero padding), plus the bias. The normalised
activation is never written: ~1.5 passes of memory over x's size instead of the unfused head's four
(norm read + write, conv read, and a conv with a 6-wide output tile). Grids depend on shapes only."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._kernel_util import grid_chunks
from .norm_act_triton import _bcp_view, _channel_coefs, group_stats


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _head_project_kernel(x_ptr, shift_ptr, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, w_ptr, p_ptr, C, HW, Cg, G, Cout, b0,
                         sxb, sxc, sxp, HAS_GW: tl.constexpr, HAS_GB: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile (pixels, sample): P = silu(gn(x)) @ Wt for BLOCK_M pixels of one sample, Wt the [C, BLOCK_N]
    tap-major weights (columns past 9 * Cout zero, not stored)."""
    pm = tl.program_id(0)
    b = b0 + tl.program_id(1)
    ps = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = ps < HW
    ns = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xb = x_ptr + b.to(tl.int64) * sxb
    for c0 in range(0, C, BLOCK_K):
        cs = c0 + tl.arange(0, BLOCK_K)
        cm = cs < C
        k, mean, a, d = _channel_coefs(shift_ptr, mean_ptr, rstd_ptr, gw_ptr, gb_ptr, b * G + cs // Cg, cs, cm, HAS_GW,
                                       HAS_GB, BLOCK_K)
        m = pmask[:, None] & cm[None, :]
        xo = ps[:, None].to(tl.int64) * sxp + cs[None, :].to(tl.int64) * sxc
        h = ((tl.load(xb + xo, mask=m, other=0.0).to(tl.float32) - k[None, :]) - mean[None, :]) * a[None, :] \
            + d[None, :]
        h = (h * tl.sigmoid(h)).to(x_ptr.dtype.element_ty)  # masked channels meet zero weight rows
        w = tl.load(w_ptr + cs[:, None].to(tl.int64) * BLOCK_N + ns[None, :], mask=cm[:, None], other=0.0)
        acc = tl.dot(h, w, acc)
    tap = ns // Cout  # tap-major planes: P[b, tap, pixel, o], each tap's reads contiguous over pixels
    po = ((b.to(tl.int64) * 9 + tap[None, :]) * HW + ps[:, None].to(tl.int64)) * Cout + (ns % Cout)[None, :]
    tl.store(p_ptr + po, acc, mask=pmask[:, None] & (ns < 9 * Cout)[None, :])


@triton.jit
def _head_taps_kernel(p_ptr, bias_ptr, y_ptr, H, W, Cout, b0, syb, syc, syp, HAS_BIAS: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    """Tile (pixels, sample): y[o, y, x] = bias[o] + sum over the in-image taps of P[b, tap, neighbour, o]."""
    pp = tl.program_id(0)
    b = b0 + tl.program_id(1)
    HW = H * W
    ps = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = ps < HW
    yy = ps // W
    xx = ps % W
    os_ = tl.arange(0, BLOCK_O)
    om = os_ < Cout
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.float32)
    for tap in tl.static_range(9):
        y2 = yy + (tap // 3 - 1)
        x2 = xx + (tap % 3 - 1)
        ok = pm & (y2 >= 0) & (y2 < H) & (x2 >= 0) & (x2 < W)
        q = (b.to(tl.int64) * 9 + tap) * HW + (y2 * W + x2).to(tl.int64)
        acc += tl.load(p_ptr + q[:, None] * Cout + os_[None, :], mask=ok[:, None] & om[None, :], other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + os_, mask=om, other=0.0).to(tl.float32)[None, :]
    yo = b.to(tl.int64) * syb + os_[None, :].to(tl.int64) * syc + ps[:, None].to(tl.int64) * syp
    tl.store(y_ptr + yo, acc.to(y_ptr.dtype.element_ty), mask=pm[:, None] & om[None, :])


def tap_major_weight(conv_weight: torch.Tensor, dtype: torch.dtype, block_n: int) -> torch.Tensor:
    """[Cout, C, 3, 3] -> [C, block_n] in ``dtype``: column tap * Cout + o (tap = 3 ky + kx), zeros past 9 Cout."""
    Cout, C = conv_weight.shape[:2]
    w = torch.zeros(C, block_n, dtype=dtype, device=conv_weight.device)
    w[:, :9 * Cout] = conv_weight.detach().permute(1, 2, 3, 0).reshape(C, 9 * Cout).to(dtype)
    return w


def _tiles(C: int, NT: int):
    """(BLOCK_M, BLOCK_K, BLOCK_N, warps) of the projection; the interpreter's small, so tests reach several
    pixel and channel tiles."""
    bn = max(16, triton.next_power_of_2(NT))
    if _interpreting():
        return 16, 16, bn, 4
    return 128, max(16, min(32, triton.next_power_of_2(C))), bn, 8 if bn >= 64 else 4  # 4 warps at 64: 255 regs


def group_norm_silu_conv3x3(x, G, gw, gb, eps, conv_weight, conv_bias, out_dtype, poison=False):
    B, C, H, W = x.shape
    Cout = conv_weight.shape[0]
    HW, NT = H * W, 9 * Cout
    x, st = _bcp_view(x)
    fmt = torch.channels_last if (st[1] == 1 and C > 1) else torch.contiguous_format
    y = torch.empty((B, Cout, H, W), dtype=out_dtype, device=x.device, memory_format=fmt)
    if poison:
        y.fill_(float("nan"))
    if x.numel() == 0:
        return y
    shift0, mean, rstd = group_stats(x, st, G, eps, poison=poison)
    bm, bk, bn, warps = _tiles(C, NT)
    wt = tap_major_weight(conv_weight, x.dtype, bn)
    p = torch.empty(B * HW * NT, dtype=torch.float32, device=x.device)
    if poison:
        p.fill_(float("nan"))
    gw_ = gw.contiguous() if gw is not None else mean
    gb_ = gb.contiguous() if gb is not None else mean
    for b0, count in grid_chunks(B):  # samples in chunks of <= 65535 (CUDA's cap on grid axis 1)
        _head_project_kernel[(triton.cdiv(HW, bm), count)](
            x, shift0, mean, rstd, gw_, gb_, wt, p, C, HW, C // G, G, Cout, b0, *st,
            HAS_GW=gw is not None, HAS_GB=gb is not None, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, num_warps=warps)
    bo = max(2, triton.next_power_of_2(Cout))
    bp = 32 if _interpreting() else min(256, 1024 // bo)  # 256 x 8: 255 registers, 256 x 16 spilled
    bias = conv_bias.contiguous() if conv_bias is not None else mean
    sy = (y.stride(0), y.stride(1), y.stride(3))
    for b0, count in grid_chunks(B):
        _head_taps_kernel[(triton.cdiv(HW, bp), count)](
            p, bias, y, H, W, Cout, b0, *sy, HAS_BIAS=conv_bias is not None, BLOCK_P=bp, BLOCK_O=bo)
    return y
