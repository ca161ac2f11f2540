"""Triton kernel of ops.residual (bias_residual_add): tiles of [B, C, P] addressed by strides (P the
flattened spatial size), so NCHW and channels_last run without a copy; grids depend on shapes only
(CUDA-graph capturable)."""
from __future__ import annotations

import triton
import triton.language as tl

from ._kernel_util import grid_chunks
from .norm_act_triton import _bcp_empty, _bcp_strides, _bcp_view, _elementwise_blocks


@triton.jit
def _bias_residual_kernel(h_ptr, s_ptr, b_ptr, y_ptr, C, HW, b0, shb, shc, shp, ssb, ssc, ssp, syb, syc, syp,
                          HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pp = tl.program_id(0)
    pc = tl.program_id(1)
    b = b0 + tl.program_id(2).to(tl.int64)  # samples in chunks of <= 65535 (CUDA's cap on grid axis 2)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    cm = cs < C
    m = cm[:, None] & (ps < HW)[None, :]
    c64, p64 = cs[:, None].to(tl.int64), ps[None, :].to(tl.int64)
    y = tl.load(h_ptr + b * shb + c64 * shc + p64 * shp, mask=m, other=0.0).to(tl.float32) \
        + tl.load(s_ptr + b * ssb + c64 * ssc + p64 * ssp, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cs, mask=cm, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + b * syb + c64 * syc + p64 * syp, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def store_channel_sums(part_ptr, kshift_ptr, b, pk, C_SUM, chans, cm, s1, s2, k):
    """A producer program's shifted sums s1, s2 of position chunk pk into part [B, chunks, 2, C_SUM] at channels
    ``chans``, and (chunk 0) the channels' shifts k (ops.channel_sums)."""
    out = part_ptr + ((b * tl.num_programs(0) + pk) * 2) * C_SUM + chans
    tl.store(out, s1, mask=cm)
    tl.store(out + C_SUM, s2, mask=cm)
    if pk == 0:
        tl.store(kshift_ptr + b * C_SUM + chans, k, mask=cm)


@triton.jit
def _bias_residual_sums_kernel(h_ptr, s_ptr, b_ptr, y_ptr, part_ptr, kshift_ptr, C, HW, C_SUM, c_off, P_CHUNK, b0,
                               shb, shc, shp, ssb, ssc, ssp, syb, syc, syp,
                               HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (position chunk, channel block, sample): _bias_residual_kernel over the chunk's tiles, and the
    per-channel shifted sums of the stored y (ops.channel_sums: shift = y at position 0) into part
    [B, chunks, 2, C_SUM] at channels c_off.."""
    pk = tl.program_id(0)
    pc = tl.program_id(1)
    b = b0 + tl.program_id(2).to(tl.int64)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    c64 = cs[:, None].to(tl.int64)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    k = (tl.load(h_ptr + b * shb + cs * shc, mask=cm, other=0.0).to(tl.float32)
         + tl.load(s_ptr + b * ssb + cs * ssc, mask=cm, other=0.0).to(tl.float32) + bias)
    k = k.to(y_ptr.dtype.element_ty).to(tl.float32)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    p_lo = pk * P_CHUNK  # P_CHUNK is a multiple of BLOCK_P: chunks do not overlap
    for p0 in range(p_lo, p_lo + P_CHUNK, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = cm[:, None] & (ps < HW)[None, :]
        p64 = ps[None, :].to(tl.int64)
        y = tl.load(h_ptr + b * shb + c64 * shc + p64 * shp, mask=m, other=0.0).to(tl.float32) \
            + tl.load(s_ptr + b * ssb + c64 * ssc + p64 * ssp, mask=m, other=0.0).to(tl.float32) + bias[:, None]
        yq = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + b * syb + c64 * syc + p64 * syp, yq, mask=m)
        d = tl.where(m, yq.to(tl.float32) - k[:, None], 0.0)
        s1 += tl.sum(d, axis=1)
        s2 += tl.sum(d * d, axis=1)
    store_channel_sums(part_ptr, kshift_ptr, b, pk, C_SUM, c_off + cs, cm, s1, s2, k)


def _sums_blocks(bc: int, bp: int, p_chunk: int):
    """A position tile dividing p_chunk (chunks must not overlap)."""
    return bc, min(bp, p_chunk & -p_chunk)


def bias_residual_add(h, skip, bias, poison=False, out=None, channel_sums=None):
    B, C = h.shape[:2]
    HW = h.numel() // max(B * C, 1)
    h, sh = _bcp_view(h)
    skip, ss = _bcp_view(skip)
    if out is None:
        y, sy = _bcp_empty(skip, h.dtype, poison)  # the residual stream's layout (e.g. ADM attention's [B, C, HW] view)
    else:  # a view whose spatial dims flatten (ops.residual checked): written in place
        y, sy = out, _bcp_strides(out)
        if poison:
            y.fill_(float("nan"))
    if h.numel() == 0:
        if channel_sums is not None:  # no values: zero sums
            c_off = channel_sums.offset_of(y)
            channel_sums.part[..., c_off:c_off + C].zero_()
            channel_sums.shift[:, c_off:c_off + C].zero_()
            channel_sums.mark_written(c_off, c_off + C, y)
        return y
    bias = bias.contiguous() if bias is not None else None
    bc, bp = _elementwise_blocks(C, HW, sh[1] == 1 and C > 1)
    if channel_sums is not None:  # out is the sums' target or a channel slice of it (ops.residual checked)
        cs, c_off = channel_sums, channel_sums.offset_of(y)
        if poison:
            cs.part[:, :, :, c_off:c_off + C].fill_(float("nan"))
            cs.shift[:, c_off:c_off + C].fill_(float("nan"))
        bc, bp = _sums_blocks(*_elementwise_blocks(C, HW, True), cs.p_chunk)
        for b0, count in grid_chunks(B):
            _bias_residual_sums_kernel[(cs.chunks, triton.cdiv(C, bc), count)](
                h, skip, bias if bias is not None else h, y, cs.part, cs.shift, C, HW, cs.channels, c_off, cs.p_chunk,
                b0, *sh, *ss, *sy, HAS_BIAS=bias is not None, BLOCK_C=bc, BLOCK_P=bp)
        cs.mark_written(c_off, c_off + C, y)
        return y
    for b0, count in grid_chunks(B):  # one launch unless B > 65535
        _bias_residual_kernel[(triton.cdiv(HW, bp), triton.cdiv(C, bc), count)](
            h, skip, bias if bias is not None else h, y, C, HW, b0, *sh, *ss, *sy,
            HAS_BIAS=bias is not None, BLOCK_C=bc, BLOCK_P=bp)
    return y
