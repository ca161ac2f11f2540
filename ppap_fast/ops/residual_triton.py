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


def bias_residual_add(h, skip, bias, poison=False, out=None):
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
        return y
    bias = bias.contiguous() if bias is not None else None
    bc, bp = _elementwise_blocks(C, HW, sh[1] == 1 and C > 1)
    for b0, count in grid_chunks(B):  # one launch unless B > 65535
        _bias_residual_kernel[(triton.cdiv(HW, bp), triton.cdiv(C, bc), count)](
            h, skip, bias if bias is not None else h, y, C, HW, b0, *sh, *ss, *sy,
            HAS_BIAS=bias is not None, BLOCK_C=bc, BLOCK_P=bp)
    return y
