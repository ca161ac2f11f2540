"""Triton kernel of ops.concat on channels_last-contiguous [B, C_i, H, W] tensors, i.e. [pixels, C_i] in
memory: one launch per input, each program copying a block of pixels (flattened over B, H, W) by a block
of that input's channels to the same pixels at the input's channel offset of the output, so every load
and store is a run of contiguous channels. Grids depend on shapes only (CUDA-graph capturable)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._kernel_util import grid_chunks
from .resample_triton import _blocks, _empty_channels_last


@triton.jit
def _cat_channels_kernel(x_ptr, y_ptr, NP, C, C_OUT, c_off, cb0, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pixel p, channel c of x (C channels) -> pixel p, channel c_off + c of y (C_OUT channels)."""
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = (cb0 + tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)  # channel blocks in chunks of <= 65535
    m = (ps < NP)[:, None] & (cs < C)[None, :]
    v = tl.load(x_ptr + ps[:, None] * C + cs[None, :], mask=m)
    tl.store(y_ptr + (ps * C_OUT + c_off)[:, None] + cs[None, :], v, mask=m)


def cat_channels(tensors, poison=False, out=None, c_off=0):
    first = tensors[0]
    B, _, H, W = first.shape
    if out is None:
        y = _empty_channels_last((B, sum(t.shape[1] for t in tensors), H, W), first, poison)
    else:  # channels_last-contiguous (ops.concat checked): its channels c_off.. written
        y = out
        if poison:
            y[:, c_off:c_off + sum(t.shape[1] for t in tensors)].fill_(float("nan"))
    c_out = y.shape[1]
    pixels = B * H * W
    for x in tensors:
        C = x.shape[1]
        if pixels and C:
            bp, bc = _blocks(C, C % 16 == 0 and c_out % 16 == 0 and c_off % 16 == 0)
            for cb0, count in grid_chunks(triton.cdiv(C, bc)):  # one launch unless C > 65535 channel blocks
                _cat_channels_kernel[(triton.cdiv(pixels, bp), count)](
                    x, y, pixels, C, c_out, c_off, cb0, BLOCK_P=bp, BLOCK_C=bc)
        c_off += C
    return y
