"""Triton kernel of ops.concat on channels_last-contiguous [B, C_i, H, W] tensors, i.e. [pixels, C_i] in
memory: one launch per input, each program copying a block of pixels (flattened over B, H, W) by a block
of that input's channels to the same pixels at the input's channel offset of the output, so every load
and store is a run of contiguous channels. Grids depend on shapes only (CUDA-graph capturable)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._kernel_util import MAX_GRID_YZ, grid_chunks
from .resample_triton import _blocks, _empty_channels_last
from .residual_triton import store_channel_sums


@triton.jit
def _cat_channels_kernel(x_ptr, y_ptr, NP, C, C_OUT, c_off, cb0, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pixel p, channel c of x (C channels) -> pixel p, channel c_off + c of y (C_OUT channels)."""
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cs = (cb0 + tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)  # channel blocks in chunks of <= 65535
    m = (ps < NP)[:, None] & (cs < C)[None, :]
    v = tl.load(x_ptr + ps[:, None] * C + cs[None, :], mask=m)
    tl.store(y_ptr + (ps * C_OUT + c_off)[:, None] + cs[None, :], v, mask=m)


@triton.jit
def _cat_channels_sums_kernel(x_ptr, y_ptr, part_ptr, kshift_ptr, P, C, C_OUT, c_off, C_SUM, s_off, P_CHUNK, b0,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (position chunk, channel block, sample): _cat_channels_kernel over the chunk's pixels of one
    sample, and the per-channel shifted sums of what it copied (ops.channel_sums: shift = x at position 0)
    into part [B, chunks, 2, C_SUM] at channels s_off.."""
    pk = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = b0 + tl.program_id(2).to(tl.int64)
    cm = cs < C
    xb = x_ptr + b * P * C
    yb = y_ptr + b * P * C_OUT + c_off
    k = tl.load(xb + cs, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    p_lo = pk * P_CHUNK  # P_CHUNK is a multiple of BLOCK_P: chunks do not overlap
    for p0 in range(p_lo, p_lo + P_CHUNK, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        m = (ps < P)[:, None] & cm[None, :]
        v = tl.load(xb + ps[:, None] * C + cs[None, :], mask=m)
        tl.store(yb + ps[:, None] * C_OUT + cs[None, :], v, mask=m)
        d = tl.where(m, v.to(tl.float32) - k[None, :], 0.0)
        s1 += tl.sum(d, axis=0)
        s2 += tl.sum(d * d, axis=0)
    store_channel_sums(part_ptr, kshift_ptr, b, pk, C_SUM, s_off + cs, cm, s1, s2, k)


def _cat_with_sums(x, y, c_off, cs, s_off):
    B, C, H, W = x.shape
    bp, bc = _blocks(C, C % 16 == 0 and y.shape[1] % 16 == 0 and c_off % 16 == 0)
    bp = min(bp, cs.p_chunk & -cs.p_chunk)
    if triton.cdiv(C, bc) > MAX_GRID_YZ:
        raise ValueError(f"cat_channels: channel_sums take at most {MAX_GRID_YZ * bc} channels a tensor, got {C}")
    for b0, count in grid_chunks(B):  # the channel blocks of one launch: <= 65535 (ops.concat checked)
        _cat_channels_sums_kernel[(cs.chunks, triton.cdiv(C, bc), count)](
            x, y, cs.part, cs.shift, H * W, C, y.shape[1], c_off, cs.channels, s_off, cs.p_chunk, b0,
            BLOCK_P=bp, BLOCK_C=bc)


def cat_channels(tensors, poison=False, out=None, c_off=0, channel_sums=None):
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
    n_in = sum(t.shape[1] for t in tensors)
    s_off = None if channel_sums is None else channel_sums.offset_of(y) + c_off
    if channel_sums is not None and poison:
        channel_sums.part[..., s_off:s_off + n_in].fill_(float("nan"))
        channel_sums.shift[:, s_off:s_off + n_in].fill_(float("nan"))
    for x in tensors:
        C = x.shape[1]
        if channel_sums is not None:
            if pixels and C:
                _cat_with_sums(x, y, c_off, channel_sums, s_off)
            else:  # no values: zero sums
                channel_sums.part[..., s_off:s_off + C].zero_()
                channel_sums.shift[:, s_off:s_off + C].zero_()
            s_off += C
        elif pixels and C:
            bp, bc = _blocks(C, C % 16 == 0 and c_out % 16 == 0 and c_off % 16 == 0)
            for cb0, count in grid_chunks(triton.cdiv(C, bc)):  # one launch unless C > 65535 channel blocks
                _cat_channels_kernel[(triton.cdiv(pixels, bp), count)](
                    x, y, pixels, C, c_out, c_off, cb0, BLOCK_P=bp, BLOCK_C=bc)
        c_off += C
    if channel_sums is not None:
        channel_sums.mark_written(s_off - n_in, s_off, y)
    return y
