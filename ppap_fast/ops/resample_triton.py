"""Triton kernels of ops.resample on channels_last-contiguous [B, C, H, W] tensors, i.e. [pixels, C] in
memory: each program takes a block of pixels (flattened over B, H, W) by a block of channels, so every
load and store is a run of contiguous channels. Grids depend on shapes only (CUDA-graph capturable)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._kernel_util import grid_chunks


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _upsample_nearest2x_kernel(x_ptr, y_ptr, NP, W, C, cb0, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Input pixel p = (b, h, w) of a block: its channels go to output pixels (b, 2h + i, 2w + j)."""
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = (cb0 + tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)  # channel blocks in chunks of <= 65535
    m = (ps < NP)[:, None] & (cs < C)[None, :]
    v = tl.load(x_ptr + ps[:, None] * C + cs[None, :], mask=m)
    w = ps % W
    bh = ps // W  # b * H + h
    row = 2 * W * C  # one output row
    o = y_ptr + (bh * 2 * row + 2 * w * C)[:, None] + cs[None, :]
    tl.store(o, v, mask=m)
    tl.store(o + C, v, mask=m)
    tl.store(o + row, v, mask=m)
    tl.store(o + row + C, v, mask=m)


@triton.jit
def _avg_pool2x_kernel(x_ptr, y_ptr, NP, Wo, C, cb0, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output pixel q = (b, i, j) of a block: the mean of input pixels (b, 2i + r, 2j + s), summed in
    float32 as PyTorch does (0 + x00 + x01 + x10 + x11), times 1/4 (exact, as PyTorch's division by 4)."""
    qs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = (cb0 + tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (qs < NP)[:, None] & (cs < C)[None, :]
    j = qs % Wo
    bi = qs // Wo  # b * Ho + i
    row = 2 * Wo * C  # one input row
    a = x_ptr + (bi * 2 * row + 2 * j * C)[:, None] + cs[None, :]
    s = 0.0 + tl.load(a, mask=m, other=0.0).to(tl.float32)  # from +0 as PyTorch: four -0.0 give +0.0
    s += tl.load(a + C, mask=m, other=0.0).to(tl.float32)
    s += tl.load(a + row, mask=m, other=0.0).to(tl.float32)
    s += tl.load(a + row + C, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + qs[:, None] * C + cs[None, :], (s * 0.25).to(y_ptr.dtype.element_ty), mask=m)


def _blocks(C: int, aligned: bool | None = None):
    """(BLOCK_P, BLOCK_C): on a GPU tiles up to 256 channels wide, of 4096 elements where every pixel's
    run of channels is 16-aligned (``aligned``; default: C a multiple of 16; Triton then knows it: vector
    loads and stores, 32 elements a thread) and of 1024 elsewhere (element-wise addresses: 4096 spilled
    registers); under the interpreter small tiles (tests reach partial channel blocks and several pixel
    blocks with tiny tensors). Also ops.concat's tiles."""
    if _interpreting():
        return 16, max(2, min(8, triton.next_power_of_2(C)))
    aligned = C % 16 == 0 if aligned is None else aligned
    bc = max(2, min(256, triton.next_power_of_2(C)))
    return max(1, (4096 if aligned else 1024) // bc), bc


def _empty_channels_last(shape, like, poison):
    y = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    if poison:
        y.fill_(float("nan"))
    return y


def _launch(kernel, x, y, pixels, *shape_args):
    C = x.shape[1]
    bp, bc = _blocks(C)
    for cb0, count in grid_chunks(triton.cdiv(C, bc)):  # one launch unless C > 65535 channel blocks
        kernel[(triton.cdiv(pixels, bp), count)](x, y, pixels, *shape_args, C, cb0, BLOCK_P=bp, BLOCK_C=bc)
    return y


def upsample_nearest2x(x, poison=False):
    B, C, H, W = x.shape
    y = _empty_channels_last((B, C, 2 * H, 2 * W), x, poison)
    if y.numel() == 0:
        return y
    return _launch(_upsample_nearest2x_kernel, x, y, B * H * W, W)


def avg_pool2x(x, poison=False):
    B, C, H, W = x.shape
    y = _empty_channels_last((B, C, H // 2, W // 2), x, poison)
    if y.numel() == 0:
        return y
    return _launch(_avg_pool2x_kernel, x, y, B * (H // 2) * (W // 2), W // 2)
