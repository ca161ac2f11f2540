"""Triton kernel of ops.concat on channels_last-contiguous [B, C_i, H, W] tensors, i.e. [pixels, C_i] in
memory: one launch per input, each program copying a block of pixels (flattened over B, H, W) by a block
of that input's channels to the same pixels at the input's channel offset of the output, so every load
and store is a run of contiguous channels. Grids depend on shapes only (CUDA-graph capturable)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._kernel_util import grid_chunks


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _cat_channels_kernel(x_ptr, y_ptr, NP, C, C_OUT, c_off, cb0, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pixel p, channel c of x (C channels) -> pixel p, channel c_off + c of y (C_OUT channels)."""
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = (cb0 + tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)  # channel blocks in chunks of <= 65535
    m = (ps < NP)[:, None] & (cs < C)[None, :]
    v = tl.load(x_ptr + ps[:, None] * C + cs[None, :], mask=m)
    tl.store(y_ptr + (ps * C_OUT + c_off)[:, None] + cs[None, :], v, mask=m)


def _blocks(C: int, aligned: bool):
    """(BLOCK_P, BLOCK_C): on a GPU tiles up to 256 channels wide, of 4096 elements where the input's
    channels, the output's and the offset are multiples of 16 (Triton then knows each pixel's runs are
    aligned: vector loads and stores) and of 1024 elsewhere; under the interpreter small tiles (tests
    reach partial channel blocks and several pixel blocks with tiny tensors)."""
    if _interpreting():
        return 16, max(2, min(8, triton.next_power_of_2(C)))
    bc = max(2, min(256, triton.next_power_of_2(C)))
    return max(1, (4096 if aligned else 1024) // bc), bc


def cat_channels(tensors, poison=False):
    first = tensors[0]
    B, _, H, W = first.shape
    c_out = sum(t.shape[1] for t in tensors)
    y = torch.empty((B, c_out, H, W), dtype=first.dtype, device=first.device, memory_format=torch.channels_last)
    if poison:
        y.fill_(float("nan"))
    pixels = B * H * W
    c_off = 0
    for x in tensors:
        C = x.shape[1]
        if pixels and C:
            bp, bc = _blocks(C, C % 16 == 0 and c_out % 16 == 0 and c_off % 16 == 0)
            for cb0, count in grid_chunks(triton.cdiv(C, bc)):  # one launch unless C > 65535 channel blocks
                _cat_channels_kernel[(triton.cdiv(pixels, bp), count)](
                    x, y, pixels, C, c_out, c_off, cb0, BLOCK_P=bp, BLOCK_C=bc)
        c_off += C
    return y
