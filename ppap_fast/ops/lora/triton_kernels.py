"""Triton SGMV kernels (punica-style) for multi-expert LoRA.

Every kernel addresses its activations as a strided 3-D "row tensor" [S, M, C]
(sample, row-within-sample, channel): tokens of a linear layer ([S, L, D]) and
pixels of an NCHW feature map (the view [S, H*W, C] with strides (C*H*W, 1, H*W))
are read in place, with no permutation copies. Rows of segment e are the rows of
the samples ``sorted_idx[offsets[e]:offsets[e+1]]``; stacked expert weights are
indexed by expert id (no pointer arrays).

Row tiles: the launch grid is fixed by shapes only, ``cdiv(S*M, BLOCK_M) + N``
programs (each segment adds at most one partial tile), so no host sync is
needed. Each program finds its (segment, tile) with a scalar scan over the N
offsets and exits early when it has none (empty experts cost nothing).

Precision: fp32 accumulation; fp16/bf16 use the tensor-core dot; fp32 uses
IEEE dot unless torch allows TF32 for matmul. Under TRITON_INTERPRET=1 every
dot is done in fp32 (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._kernel_util import grid_chunks, new_buffer, sm_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """a @ b accumulated in fp32: on fp32 operands (IEEE or TF32 by PREC) when DOT_F32, else the
    tensor-core dot in a's dtype (b cast to it)."""
    if DOT_F32:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        r = tl.dot(a, b.to(a.dtype))
    return r


@triton.jit
def _find_tile(off_ptr, pid, N, M, BLOCK_M: tl.constexpr):
    """(expert, first row of this tile within the segment, rows in the segment,
    first position of the segment in sorted_idx); expert = -1 when idle."""
    zero = pid * 0
    acc = zero
    e_hit = zero - 1
    start = zero
    nrows = zero
    s0 = zero
    for e in range(0, N):
        lo = tl.load(off_ptr + e)
        hi = tl.load(off_ptr + e + 1)
        rows = (hi - lo) * M
        nt = (rows + BLOCK_M - 1) // BLOCK_M
        hit = (pid >= acc) & (pid < acc + nt)
        e_hit = tl.where(hit, e, e_hit)
        start = tl.where(hit, (pid - acc) * BLOCK_M, start)
        nrows = tl.where(hit, rows, nrows)
        s0 = tl.where(hit, lo, s0)
        acc += nt
    return e_hit, start, nrows, s0


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, w_ptr, out_ptr, sidx_ptr, off_ptr,
    N, M, K, R,
    xs_s, xs_m, xs_k,
    ws_e, ws_r, ws_k,
    os_s, os_m, os_r, os_e,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, ZERO_OTHERS: tl.constexpr,
):
    """out[s, m, r] = scale * sum_k x[s, m, k] * w[e(s), r, k]   (written, not accumulated).
    os_e: out's per-expert offset (the row is written at + e(s) * os_e); ZERO_OTHERS also
    writes zeros at every other expert's offset (a stacked [N*R] channel gradient)."""
    pid = tl.program_id(0)
    pid_r = tl.program_id(1)
    e, start, nrows, s0 = _find_tile(off_ptr, pid, N, M, BLOCK_M)
    if e < 0:
        return
    j = start + tl.arange(0, BLOCK_M)
    rmask = j < nrows
    smp = tl.load(sidx_ptr + s0 + j // M, mask=rmask, other=0).to(tl.int64)
    m = (j % M).to(tl.int64)
    xrow = smp * xs_s + m * xs_m
    orow = smp * os_s + m * os_m
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rvalid = offs_r < R
    w_base = w_ptr + e.to(tl.int64) * ws_e
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kvalid = offs_k < K
        xt = tl.load(x_ptr + xrow[:, None] + offs_k[None, :] * xs_k,
                     mask=rmask[:, None] & kvalid[None, :], other=0.0)
        wt = tl.load(w_base + offs_k[:, None] * ws_k + offs_r[None, :] * ws_r,
                     mask=kvalid[:, None] & rvalid[None, :], other=0.0)
        acc += _dot(xt, wt, DOT_F32, PREC)
    acc = acc * scale
    omask = rmask[:, None] & rvalid[None, :]
    tl.store(out_ptr + e.to(tl.int64) * os_e + orow[:, None] + offs_r[None, :] * os_r,
             acc.to(out_ptr.dtype.element_ty), mask=omask)
    if ZERO_OTHERS:
        zeros = tl.zeros((BLOCK_M, BLOCK_R), dtype=out_ptr.dtype.element_ty)
        zptr = out_ptr + orow[:, None] + offs_r[None, :] * os_r
        for e2 in range(0, N):
            tl.store(zptr, zeros, mask=omask & (e2 != e))
            zptr += os_e


@triton.jit
def _sgmv_expand_kernel(
    h_ptr, w_ptr, out_ptr, bias_ptr, sidx_ptr, off_ptr, src_ptr, hout_ptr,
    N, M, R, NOUT,
    hs_s, hs_m, hs_r, hs_e,
    ws_e, ws_n, ws_r,
    os_s, os_m, os_n,
    bs_e, bs_n,
    ss_s, ss_m, ss_n,
    ho_s, ho_m, ho_r,
    scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    ACCUM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_HOUT: tl.constexpr, SRC_IS_OUT: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """out[s, m, n] = (src[s, m, n] if ACCUM) + scale * sum_r h[s, m, r] * w[e(s), n, r] (+ bias[e(s), n]).
    h is read at + e(s) * hs_e (rows of a stacked per-expert tensor); src may be out itself
    (SRC_IS_OUT: one pointer tile for both, half the address registers).
    HAS_HOUT: the column-0 programs also copy the h rows they read to hout [S, M, R]."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, start, nrows, s0 = _find_tile(off_ptr, pid, N, M, BLOCK_M)
    if e < 0:
        return
    j = start + tl.arange(0, BLOCK_M)
    rmask = j < nrows
    smp = tl.load(sidx_ptr + s0 + j // M, mask=rmask, other=0).to(tl.int64)
    m = (j % M).to(tl.int64)
    hrow = smp * hs_s + m * hs_m + e.to(tl.int64) * hs_e
    orow = smp * os_s + m * os_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nvalid = offs_n < NOUT
    w_base = w_ptr + e.to(tl.int64) * ws_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rvalid = offs_r < R
        ht = tl.load(h_ptr + hrow[:, None] + offs_r[None, :] * hs_r,
                     mask=rmask[:, None] & rvalid[None, :], other=0.0)
        if HAS_HOUT:
            tl.store(hout_ptr + (smp * ho_s + m * ho_m)[:, None] + offs_r[None, :] * ho_r, ht,
                     mask=rmask[:, None] & rvalid[None, :] & (pid_n == 0))
        wt = tl.load(w_base + offs_r[:, None] * ws_r + offs_n[None, :] * ws_n,
                     mask=rvalid[:, None] & nvalid[None, :], other=0.0)
        acc += _dot(ht, wt, DOT_F32, PREC)
    acc = acc * scale
    if HAS_BIAS:
        b = tl.load(bias_ptr + e.to(tl.int64) * bs_e + offs_n * bs_n, mask=nvalid, other=0.0)
        acc += b.to(tl.float32)[None, :]
    optr = out_ptr + orow[:, None] + offs_n[None, :] * os_n
    omask = rmask[:, None] & nvalid[None, :]
    if ACCUM:
        if SRC_IS_OUT:
            acc += tl.load(optr, mask=omask, other=0.0).to(tl.float32)
        else:
            acc += tl.load(src_ptr + (smp * ss_s + m * ss_m)[:, None] + offs_n[None, :] * ss_n, mask=omask,
                           other=0.0).to(tl.float32)
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _seg_outer_kernel(
    u_ptr, v_ptr, out_ptr, sidx_ptr, off_ptr, sum_ptr,
    M, P, Q, SPLIT,
    us_s, us_m, us_p,
    vs_s, vs_m, vs_q, vs_e,
    os_split, os_e, os_p, os_q,
    ss_split, ss_e, ss_p,
    alpha,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    HAS_SUM: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """out[split, e, p, q] = alpha * sum over this split's share of the rows of segment e of
    u[row, p] * v[row + e * vs_e, q]. Every (split, e, tile) is written, zeros for empty segments
    (used for the weight gradients dA, dB; splits are summed by the caller). HAS_SUM: the column-0
    programs also write sum[split, e, p] = the same rows' sum of u[row, p], unscaled (the expert
    bias gradient beside dB, from the same loads)."""
    e = tl.program_id(0)
    pid_p = tl.program_id(1)
    pid_qs = tl.program_id(2)
    pid_q = pid_qs // SPLIT
    sp = pid_qs % SPLIT
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    nrows = (hi - lo) * M
    chunk = ((nrows + SPLIT - 1) // SPLIT + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    r_begin = sp * chunk
    r_end = tl.minimum(nrows, r_begin + chunk)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pvalid = offs_p < P
    qvalid = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    usum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for j0 in range(r_begin, r_end, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        rmask = j < r_end
        smp = tl.load(sidx_ptr + lo + j // M, mask=rmask, other=0).to(tl.int64)
        m = (j % M).to(tl.int64)
        ut = tl.load(u_ptr + (smp * us_s + m * us_m)[None, :] + offs_p[:, None] * us_p,
                     mask=pvalid[:, None] & rmask[None, :], other=0.0)
        if HAS_SUM:
            usum += tl.sum(ut.to(tl.float32), axis=1)
        vt = tl.load(v_ptr + e.to(tl.int64) * vs_e + (smp * vs_s + m * vs_m)[:, None] + offs_q[None, :] * vs_q,
                     mask=rmask[:, None] & qvalid[None, :], other=0.0)
        acc += _dot(ut, vt, DOT_F32, PREC)
    acc = acc * alpha
    tl.store(out_ptr + sp.to(tl.int64) * os_split + e.to(tl.int64) * os_e + offs_p[:, None] * os_p
             + offs_q[None, :] * os_q, acc.to(out_ptr.dtype.element_ty), mask=pvalid[:, None] & qvalid[None, :])
    if HAS_SUM:
        tl.store(sum_ptr + sp.to(tl.int64) * ss_split + e.to(tl.int64) * ss_e + offs_p * ss_p,
                 usum.to(sum_ptr.dtype.element_ty), mask=pvalid & (pid_q == 0))


@triton.jit
def _a_block_channels(q, tap, C, PART, KHKW):
    """The input channels c whose flat A column c * KHKW + tap lies in block q's [q*PART, (q+1)*PART)."""
    c_lo = (q * PART - tap + KHKW - 1) // KHKW  # numerators are >= 0: same rounding compiled and interpreted
    c_hi = ((q + 1) * PART - tap + KHKW - 1) // KHKW
    return tl.maximum(c_lo, 0), tl.minimum(c_hi, C)


@triton.jit
def _tap_input(oh, ow, kh, kw, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W):
    """The input pixel (ih, iw) that tap (kh, kw) of output pixel (oh, ow) reads, and whether it lies
    inside the map (not in the padding)."""
    ih = oh * STRIDE_H - PAD_H + kh * DIL_H
    iw = ow * STRIDE_W - PAD_W + kw * DIL_W
    return ih, iw, (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)


@triton.jit
def _tap_source(ih, iw, kh, kw, Ho, Wo, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W):
    """The output pixel (oh, ow) from which tap (kh, kw) reaches input pixel (ih, iw), and whether one
    exists (inside the map, on the stride)."""
    nh = ih + PAD_H - kh * DIL_H
    nw = iw + PAD_W - kw * DIL_W
    oh = nh // STRIDE_H
    ow = nw // STRIDE_W
    ok = (nh >= 0) & (nh - oh * STRIDE_H == 0) & (oh < Ho) & (nw >= 0) & (nw - ow * STRIDE_W == 0) & (ow < Wo)
    return oh, ow, ok


@triton.jit
def _conv_lora_fwd_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, eb_ptr, eidx_ptr, hout_ptr,
    s0, C, H, W, Ho, Wo, R, NOUT, NB, RB, PART,
    xs_s, xs_c, xs_h, xs_w,
    as_e, as_r, as_c, as_h, as_w,
    bs_e, bs_n, bs_r,
    ys_s, ys_c, ys_h, ys_w,
    ebs_e, ebs_n,
    hs_s, hs_r, hs_h, hs_w,
    scale, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCKED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """Per-sample LoRA of a conv in one pass, accumulated into the base conv's output y:
    h = conv(x, A_e) (implicit GEMM: each tap's channel tiles of x dotted with A_e's), y += scale *
    B_e h (+ eb[e]) over every output channel, and h stored to hout [S, R, Ho, Wo] for the backward.
    One program: one sample, BLOCK_M output pixels; e = expert_idx[s] (no segments needed). Grid:
    (pixel tile, sample - s0): the pixel tiles on axis 0 (on axis 1, CUDA's 65535 cap, a 1024x1024 map
    of 16-row tiles failed), samples from s0 in launches of <= 65535.
    BLOCKED: A is block diagonal, NB blocks of RB rank rows, block q nonzero only on the flat
    (C, kh, kw) columns [q*PART, (q+1)*PART) (the loralib layout as a factorised LoRA): each block's
    h is computed over its own columns only, stored, and read back for the expand. Otherwise
    NB = 1, RB = R and all R rank channels stay in one register tile."""
    pid_m = tl.program_id(0)
    s = s0 + tl.program_id(1).to(tl.int64)
    e = tl.load(eidx_ptr + s).to(tl.int64)
    p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = p < Ho * Wo
    oh = p // Wo
    ow = p % Wo
    x_base = x_ptr + s * xs_s
    a_base = a_ptr + e * as_e
    hrow = hout_ptr + s * hs_s + (oh * hs_h + ow * hs_w)[:, None]
    KHKW = KH * KW
    if BLOCKED:
        for q in range(0, NB):
            offs_r = q * RB + tl.arange(0, BLOCK_R)
            rvalid = tl.arange(0, BLOCK_R) < RB
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for tap in range(0, KHKW):  # a loop, not unrolled: fewer live registers
                kh = tap // KW
                kw = tap % KW
                ih, iw, inb = _tap_input(oh, ow, kh, kw, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
                inb = inb & pmask
                xrow = x_base + ih.to(tl.int64) * xs_h + iw.to(tl.int64) * xs_w
                a_tap = a_base + kh * as_h + kw * as_w
                c_lo, c_hi = _a_block_channels(q, tap, C, PART, KHKW)
                for c0 in range(c_lo, c_hi, BLOCK_K):
                    offs_c = c0 + tl.arange(0, BLOCK_K)
                    cvalid = offs_c < c_hi
                    xt = tl.load(xrow[:, None] + offs_c[None, :] * xs_c, mask=inb[:, None] & cvalid[None, :],
                                 other=0.0)
                    at = tl.load(a_tap + offs_c[:, None] * as_c + offs_r[None, :] * as_r,
                                 mask=cvalid[:, None] & rvalid[None, :], other=0.0)
                    acc += _dot(xt, at, DOT_F32, PREC)
            hq = acc.to(hout_ptr.dtype.element_ty)
            tl.store(hrow + offs_r[None, :] * hs_r, hq, mask=pmask[:, None] & rvalid[None, :])
        tl.debug_barrier()  # the blocks' h, stored above by other threads, are read back below
    else:  # one flat loop over (tap, channel tile): the software pipeliner overlaps its loads and dots
        offs_r = tl.arange(0, BLOCK_R)
        rvalid = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        CT = tl.cdiv(C, BLOCK_K)
        for k in range(0, KHKW * CT):
            tap = k // CT
            c0 = (k - tap * CT) * BLOCK_K
            kh = tap // KW
            kw = tap % KW
            ih, iw, inb = _tap_input(oh, ow, kh, kw, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            inb = inb & pmask
            offs_c = c0 + tl.arange(0, BLOCK_K)
            cvalid = offs_c < C
            xt = tl.load((x_base + ih.to(tl.int64) * xs_h + iw.to(tl.int64) * xs_w)[:, None] + offs_c[None, :] * xs_c,
                         mask=inb[:, None] & cvalid[None, :], other=0.0)
            at = tl.load(a_base + kh * as_h + kw * as_w + offs_c[:, None] * as_c + offs_r[None, :] * as_r,
                         mask=cvalid[:, None] & rvalid[None, :], other=0.0)
            acc += _dot(xt, at, DOT_F32, PREC)
        h = acc.to(hout_ptr.dtype.element_ty)  # h in the compute dtype, as a separate A conv gives it
        tl.store(hrow + offs_r[None, :] * hs_r, h, mask=pmask[:, None] & rvalid[None, :])
    yrow = y_ptr + s * ys_s + oh.to(tl.int64) * ys_h + ow.to(tl.int64) * ys_w
    b_base = b_ptr + e * bs_e
    for n0 in range(0, NOUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nvalid = offs_n < NOUT
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for q in range(0, NB):
            offs_r = q * RB + tl.arange(0, BLOCK_R)
            rvalid = tl.arange(0, BLOCK_R) < RB
            if BLOCKED:
                hq = tl.load(hrow + offs_r[None, :] * hs_r, mask=pmask[:, None] & rvalid[None, :], other=0.0)
            else:
                hq = h
            bt = tl.load(b_base + offs_r[:, None] * bs_r + offs_n[None, :] * bs_n,
                         mask=rvalid[:, None] & nvalid[None, :], other=0.0)
            out += _dot(hq, bt, DOT_F32, PREC)
        out = out * scale
        if HAS_BIAS:
            out += tl.load(eb_ptr + e * ebs_e + offs_n * ebs_n, mask=nvalid, other=0.0).to(tl.float32)[None, :]
        omask = pmask[:, None] & nvalid[None, :]
        yp = yrow[:, None] + offs_n[None, :] * ys_c
        out += tl.load(yp, mask=omask, other=0.0).to(tl.float32)
        tl.store(yp, out.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _conv_lora_dgrad_kernel(
    dh_ptr, a_ptr, dx_ptr, eidx_ptr,
    s0, C, H, W, Ho, Wo, R, RB, PART,
    ds_s, ds_r, ds_h, ds_w, ds_e,
    as_e, as_r, as_c, as_h, as_w,
    xs_s, xs_c, xs_h, xs_w,
    STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCKED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """dx += conv_transpose(dh, A_e) for each sample's own expert (the LoRA share of a conv's
    input gradient), added in place into the base dgrad. dh is read at + e * ds_e (expert 0's
    slice of a stacked [S, N*R, Ho, Wo] gradient). One program: one sample, BLOCK_M input pixels,
    BLOCK_N input channels; K = taps x R (each tap keeps only the output pixels it maps onto). Grid:
    (pixel tile, channel tile, sample - s0): the pixel tiles on axis 0 (CUDA caps axes 1/2 at 65535),
    samples from s0 in launches of <= 65535.
    BLOCKED (A block diagonal: RB rank rows per block, PART flat columns): each tap reads only the
    rank rows of the blocks its channel tile's columns fall in, off-block entries masked."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = s0 + tl.program_id(2).to(tl.int64)
    e = tl.load(eidx_ptr + s).to(tl.int64)
    q = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qmask = q < H * W
    ih = q // W
    iw = q % W
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cvalid = offs_c < C
    dh_base = dh_ptr + s * ds_s + e * ds_e
    a_base = a_ptr + e * as_e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCKED:
        for tap in range(0, KH * KW):  # a loop, not unrolled: fewer live registers
            kh = tap // KW
            kw = tap % KW
            oh, ow, ok = _tap_source(ih, iw, kh, kw, Ho, Wo, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            ok = ok & qmask
            drow = dh_base + oh.to(tl.int64) * ds_h + ow.to(tl.int64) * ds_w
            a_tap = a_base + kh * as_h + kw * as_w
            # the rank rows of the blocks holding this tap's columns of the channel tile
            g_first = (pid_n * BLOCK_N) * (KH * KW) + tap
            g_last = (tl.minimum(pid_n * BLOCK_N + BLOCK_N, C) - 1) * (KH * KW) + tap
            r_lo = (g_first // PART) * RB
            r_hi = tl.minimum((g_last // PART + 1) * RB, R)
            col_block = (offs_c * (KH * KW) + tap) // PART
            for r0 in range(r_lo, r_hi, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                rvalid = offs_r < r_hi
                dt = tl.load(drow[:, None] + offs_r[None, :] * ds_r, mask=ok[:, None] & rvalid[None, :], other=0.0)
                amask = rvalid[:, None] & cvalid[None, :] & ((offs_r // RB)[:, None] == col_block[None, :])
                at = tl.load(a_tap + offs_r[:, None] * as_r + offs_c[None, :] * as_c, mask=amask, other=0.0)
                acc += _dot(dt, at, DOT_F32, PREC)
    else:  # one flat loop over (tap, rank tile): the software pipeliner overlaps its loads and dots
        RT = tl.cdiv(R, BLOCK_R)
        for k in range(0, KH * KW * RT):
            tap = k // RT
            kh = tap // KW
            kw = tap % KW
            oh, ow, ok = _tap_source(ih, iw, kh, kw, Ho, Wo, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
            ok = ok & qmask
            offs_r = (k - tap * RT) * BLOCK_R + tl.arange(0, BLOCK_R)
            rvalid = offs_r < R
            dt = tl.load((dh_base + oh.to(tl.int64) * ds_h + ow.to(tl.int64) * ds_w)[:, None] + offs_r[None, :] * ds_r,
                         mask=ok[:, None] & rvalid[None, :], other=0.0)
            at = tl.load(a_base + kh * as_h + kw * as_w + offs_r[:, None] * as_r + offs_c[None, :] * as_c,
                         mask=rvalid[:, None] & cvalid[None, :], other=0.0)
            acc += _dot(dt, at, DOT_F32, PREC)
    xp = dx_ptr + s * xs_s + (ih.to(tl.int64) * xs_h + iw.to(tl.int64) * xs_w)[:, None] + offs_c[None, :] * xs_c
    omask = qmask[:, None] & cvalid[None, :]
    acc += tl.load(xp, mask=omask, other=0.0).to(tl.float32)
    tl.store(xp, acc.to(dx_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _conv_lora_wgrad_kernel(
    x_ptr, dh_ptr, out_ptr, sidx_ptr, off_ptr,
    C, H, W, Ho, Wo, R, SPLIT, N_CT, RB, PART,
    xs_s, xs_c, xs_h, xs_w,
    ds_s, ds_r, ds_h, ds_w,
    os_split, os_e, os_r, os_c, os_h, os_w,
    alpha, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCKED: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    """out[split, e, r, c, kh, kw] = alpha * sum over this split's share of the (sample, output
    pixel) rows of segment e of dh[s, r, p] * x[s, c, ih(p, kh), iw(p, kw)]: the weight gradient
    of each expert's A conv over its own samples only (no N-fold stacked gradient). Grid: (expert,
    R tile x C tile, tap x split); every (split, e, r, c, tap) is written, zeros for empty experts.
    BLOCKED (A block diagonal, RB rank rows / PART flat columns per block): off-block entries are
    structural zeros, written as 0; tiles with none on a block are not reduced at all."""
    e = tl.program_id(0)
    pid_rc = tl.program_id(1)
    pid_ts = tl.program_id(2)
    tap = pid_ts // SPLIT
    sp = pid_ts % SPLIT
    kh = tap // KW
    kw = tap % KW
    offs_r = (pid_rc // N_CT) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid_rc % N_CT) * BLOCK_C + tl.arange(0, BLOCK_C)
    rvalid = offs_r < R
    cvalid = offs_c < C
    P = Ho * Wo
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    nrows = (hi - lo) * P
    chunk = ((nrows + SPLIT - 1) // SPLIT + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    r_begin = sp * chunk
    r_end = tl.minimum(nrows, r_begin + chunk)
    if BLOCKED:
        c_first = (pid_rc % N_CT) * BLOCK_C
        r_first = (pid_rc // N_CT) * BLOCK_R
        gq_lo = (c_first * (KH * KW) + tap) // PART
        gq_hi = ((tl.minimum(c_first + BLOCK_C, C) - 1) * (KH * KW) + tap) // PART
        rq_lo = r_first // RB
        rq_hi = (tl.minimum(r_first + BLOCK_R, R) - 1) // RB
        r_end = tl.where((rq_hi < gq_lo) | (gq_hi < rq_lo), r_begin, r_end)  # no block in this tile
    # the [C, R] orientation: C (>= 64) is the MMA's M side, so Hopper can run it as wgmma (an
    # [R, C] tile has M = R = 16, too small for wgmma: mma.sync)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for j0 in range(r_begin, r_end, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        jmask = j < r_end
        smp = tl.load(sidx_ptr + lo + j // P, mask=jmask, other=0).to(tl.int64)
        p = j % P
        oh = p // Wo
        ow = p % Wo
        ih, iw, inb = _tap_input(oh, ow, kh, kw, H, W, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W)
        inb = inb & jmask
        xt = tl.load(x_ptr + (smp * xs_s + ih.to(tl.int64) * xs_h + iw.to(tl.int64) * xs_w)[None, :]
                     + offs_c[:, None] * xs_c, mask=cvalid[:, None] & inb[None, :], other=0.0)
        dt = tl.load(dh_ptr + (smp * ds_s + oh.to(tl.int64) * ds_h + ow.to(tl.int64) * ds_w)[:, None]
                     + offs_r[None, :] * ds_r, mask=jmask[:, None] & rvalid[None, :], other=0.0)
        acc += _dot(xt, dt, DOT_F32, PREC)
    acc = acc * alpha
    if BLOCKED:
        acc = tl.where(((offs_c * (KH * KW) + tap) // PART)[:, None] == (offs_r // RB)[None, :], acc, 0.0)
    tl.store(out_ptr + sp.to(tl.int64) * os_split + e.to(tl.int64) * os_e + kh * os_h + kw * os_w
             + offs_c[:, None] * os_c + offs_r[None, :] * os_r, acc.to(out_ptr.dtype.element_ty),
             mask=cvalid[:, None] & rvalid[None, :])


# --------------------------------------------------------------------------- launchers
def _pow2_at_least(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def tf32_matmul_allowed() -> bool:
    """torch's TF32 setting for fp32 matmuls. Reading the legacy ``allow_tf32`` raises (torch >= 2.9:
    "mix of the legacy and new APIs") once ``torch.backends[.cuda.matmul].fp32_precision = "tf32"`` (the
    new API) is set: every fp32 Triton LoRA launch on CUDA then failed; read the new flag instead."""
    m = torch.backends.cuda.matmul
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return getattr(m, "fp32_precision", "ieee") == "tf32"


def _dot_cfg(*tensors: torch.Tensor):
    if _interpreting() or any(t.dtype == torch.float32 for t in tensors):
        tf32 = (not _interpreting()) and tensors[0].is_cuda and tf32_matmul_allowed()
        return True, ("tf32" if tf32 else "ieee")
    return False, "ieee"


def _check3(name, t):
    if t.dim() != 3:
        raise ValueError(f"{name} must be a 3-D [S, M, C] (or [N, *, *]) view, got {tuple(t.shape)}")


def sgmv_shrink(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_idx: torch.Tensor,
                offsets: torch.Tensor, scale: float = 1.0, out_expert_stride: int = 0,
                zero_others: bool = False) -> torch.Tensor:
    """out[s, m, :R] = scale * x[s, m, :] @ w[e(s)].T; x [S, M, K], w [N, R, K], out [S, M, R]
    (all may be strided views). ``out_expert_stride``: the row of sample s goes to
    out + e(s) * stride (out = expert 0's slice of a stacked tensor); ``zero_others`` zeroes the
    other experts' slices. Returns out."""
    for n_, t in (("x", x), ("w", w), ("out", out)):
        _check3(n_, t)
    S, M, K = x.shape
    N, R, _ = w.shape
    if S == 0 or M == 0 or R == 0:
        return out
    BLOCK_M = 64 if not _interpreting() else 32
    BLOCK_R = _pow2_at_least(R)
    BLOCK_K = 64 if not _interpreting() else 32
    dot_f32, prec = _dot_cfg(x, w)
    grid = (triton.cdiv(S * M, BLOCK_M) + N, triton.cdiv(R, BLOCK_R))
    _sgmv_shrink_kernel[grid](
        x, w, out, sorted_idx, offsets, N, M, K, R,
        *x.stride(), *w.stride(), *out.stride(), int(out_expert_stride), float(scale),
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, DOT_F32=dot_f32, PREC=prec,
        ZERO_OTHERS=bool(zero_others),
    )
    return out


def sgmv_expand(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_idx: torch.Tensor,
                offsets: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | None = None,
                accumulate: bool = True, src: torch.Tensor | None = None, h_expert_stride: int = 0,
                h_out: torch.Tensor | None = None) -> torch.Tensor:
    """out[s, m, :] (+)= scale * h[s, m, :] @ w[e(s)].T (+ bias[e(s)]); h [S, M, R],
    w [N, NOUT, R], out [S, M, NOUT], bias [N, NOUT] or None. Returns out.
    ``src`` [S, M, NOUT]: accumulate src instead of out (out is then fully written);
    ``h_expert_stride``: sample s reads h + e(s) * stride (h = expert 0's slice of a stacked
    tensor); ``h_out`` [S, M, R]: also receives the h rows read (the compact per-sample h)."""
    for n_, t in (("h", h), ("w", w), ("out", out)):
        _check3(n_, t)
    S, M, R = h.shape
    N, NOUT, _ = w.shape
    if S == 0 or M == 0 or NOUT == 0:
        return out
    BLOCK_M = 64 if not _interpreting() else 32
    BLOCK_N = 64 if not _interpreting() else 32
    BLOCK_R = _pow2_at_least(R)
    dot_f32, prec = _dot_cfg(h, w)
    grid = (triton.cdiv(S * M, BLOCK_M) + N, triton.cdiv(NOUT, BLOCK_N))
    has_bias = bias is not None
    b = bias if has_bias else out
    bs = bias.stride() if has_bias else (0, 0)
    src_is_out = src is None or (src.data_ptr() == out.data_ptr() and src.stride() == out.stride())
    src = out if src is None else src
    ho = h if h_out is None else h_out
    _sgmv_expand_kernel[grid](
        h, w, out, b, sorted_idx, offsets, src, ho, N, M, R, NOUT,
        *h.stride(), int(h_expert_stride), *w.stride(), *out.stride(), *bs, *src.stride(), *ho.stride(),
        float(scale),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R, ACCUM=bool(accumulate), HAS_BIAS=has_bias,
        HAS_HOUT=h_out is not None, SRC_IS_OUT=src_is_out, DOT_F32=dot_f32, PREC=prec,
    )
    return out


def seg_outer(u: torch.Tensor, v: torch.Tensor, out: torch.Tensor, sorted_idx: torch.Tensor,
              offsets: torch.Tensor, alpha: float = 1.0, split: int | None = None,
              v_expert_stride: int = 0, u_sum: torch.Tensor | None = None) -> torch.Tensor:
    """out[e] = alpha * U_e^T @ V_e with U_e, V_e the rows of segment e of u [S, M, P],
    v [S, M, Q]; out [N, P, Q] (fully written, zeros for empty experts). ``v_expert_stride``:
    segment e reads v + e * stride (v = expert 0's slice of a stacked tensor).

    ``split`` > 1 splits each segment's rows over that many programs (more parallelism when
    N * tiles is small next to the SM count); partials go to an fp32 buffer summed with
    torch (deterministic, no atomics). Default: chosen from the shapes alone (no sync).
    ``u_sum`` [N, P] (float32, or u's dtype): also receives each segment's unscaled row sum of u
    from the same loads (the expert-bias gradient beside dB: no separate reduction)."""
    for n_, t in (("u", u), ("v", v), ("out", out)):
        _check3(n_, t)
    S, M, P = u.shape
    Q = v.shape[2]
    N = out.shape[0]
    if u_sum is not None and tuple(u_sum.shape) != (N, P):
        raise ValueError(f"u_sum must be [N, P] = [{N}, {P}], got {tuple(u_sum.shape)}")
    if u_sum is not None and Q == 0 and N * P:
        raise ValueError("u_sum needs Q >= 1 (the row sums ride on the outer product's loads)")
    if N == 0 or P == 0 or Q == 0:
        return out
    if S == 0 or M == 0:
        if u_sum is not None:
            u_sum.zero_()
        return out.zero_()
    BLOCK_M = 64 if not _interpreting() else 32
    BLOCK_P = _pow2_at_least(P)
    BLOCK_Q = _pow2_at_least(Q)
    result = out
    if BLOCK_P < min(BLOCK_Q, 64) and u_sum is None and not v_expert_stride:
        # out[e]^T = V_e^T U_e: the wider side becomes the MMA's M side (a 16-row M side, e.g. the
        # rank of dA = dh^T x, is mma.sync on Hopper; 64 rows can be wgmma)
        u, v, out, P, Q, BLOCK_P, BLOCK_Q = v, u, out.transpose(1, 2), Q, P, BLOCK_Q, BLOCK_P
    tiles = N * triton.cdiv(P, BLOCK_P) * triton.cdiv(Q, BLOCK_Q)
    if split is None:
        target = 2 * sm_count(u.device, 4)
        split = max(1, min(16, triton.cdiv(target, tiles), triton.cdiv(S * M, BLOCK_M * max(N, 1) * 4)))
    split = int(split)
    dot_f32, prec = _dot_cfg(u, v)
    has_sum = u_sum is not None
    if split == 1:
        dst, ds = out, (0,) + tuple(out.stride())
        sdst, ss = (u_sum, (0,) + tuple(u_sum.stride())) if has_sum else (out, (0, 0, 0))
    else:  # one fp32 workspace: [split, N, P, Q (+1 column for the sums)], one reduction for both
        work = alloc((split, N, P, Q + int(has_sum)), torch.float32, out.device)
        dst, ds = work[..., :Q], tuple(work.stride())
        sdst, ss = (work[..., Q], tuple(work[..., Q].stride())) if has_sum else (work, (0, 0, 0))
    grid = (N, triton.cdiv(P, BLOCK_P), triton.cdiv(Q, BLOCK_Q) * split)
    _seg_outer_kernel[grid](
        u, v, dst, sorted_idx, offsets, sdst, M, P, Q, split,
        *u.stride(), *v.stride(), int(v_expert_stride), *ds, *ss, float(alpha),
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_Q=BLOCK_Q, HAS_SUM=has_sum, DOT_F32=dot_f32, PREC=prec,
    )
    if split > 1:
        total = work.sum(0)
        out.copy_(total[..., :Q])
        if has_sum:
            u_sum.copy_(total[..., Q])
    return result


POISON = False


def alloc(shape, dtype, device) -> torch.Tensor:
    """Buffers a kernel fully overwrites; NaN-filled when POISON is on (tests)."""
    return new_buffer(shape, dtype, device, POISON)


# --------------------------------------------------------------------------- implicit-GEMM conv LoRA
IMPLICIT_MAX_RANK = 256  # the forward keeps all R rank channels of a pixel tile in one register tile


def _conv_geometry(stride, padding, dilation):
    pair = lambda v: (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))  # noqa: E731
    return pair(stride), pair(padding), pair(dilation)


def _check4(name, t):
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D, got {tuple(t.shape)}")


def _a_blocks(A: torch.Tensor, a_blocks: int):
    """(NB, RB, PART) of an A [N, R, C, kh, kw] with a_blocks diagonal blocks over its flat columns."""
    R, K = A.shape[1], A.shape[2] * A.shape[3] * A.shape[4]
    nb = int(a_blocks)
    if nb < 1 or R % nb or K % nb:
        raise ValueError(f"a_blocks={a_blocks} must divide the rank {R} and the flat A columns {K}")
    return nb, R // nb, K // nb


def conv_lora_fwd(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, y: torch.Tensor, expert_idx: torch.Tensor,
                  scale: float, stride=1, padding=0, dilation=1, expert_bias: torch.Tensor | None = None,
                  h_out: torch.Tensor | None = None, a_blocks: int = 1) -> torch.Tensor:
    """y[s] += scale * B_e conv(x[s], A_e) (+ expert_bias[e]) with e = expert_idx[s], in place, and
    h_out[s] = conv(x[s], A_e). x [S, C, H, W], A [N, R, C, kh, kw] (groups 1), B [N, NOUT, R],
    y [S, NOUT, Ho, Wo], h_out [S, R, Ho, Wo]; any memory format (strides). ``a_blocks`` > 1: A is
    block diagonal over its flat (C, kh, kw) columns (reference.loralib_conv_as_factorised): the
    zero blocks are skipped (entries there are never read). Returns y."""
    _check4("x", x)
    _check4("y", y)
    if A.dim() != 5 or B.dim() != 3:
        raise ValueError(f"A must be [N, R, C, kh, kw] and B [N, NOUT, R], got {tuple(A.shape)}, {tuple(B.shape)}")
    S, C, H, W = x.shape
    N, R, _, KH, KW = A.shape
    NOUT = B.shape[1]
    Ho, Wo = y.shape[2:]
    nb, rb, part = _a_blocks(A, a_blocks)
    if rb > IMPLICIT_MAX_RANK:
        raise ValueError(f"conv_lora_fwd keeps a block's rank in one tile: {rb} > {IMPLICIT_MAX_RANK}")
    if h_out is None:
        h_out = alloc((S, R, Ho, Wo), x.dtype, x.device)
    if S == 0 or Ho * Wo == 0:
        return y
    (sh, sw), (ph, pw), (dh, dw) = _conv_geometry(stride, padding, dilation)
    BLOCK_R = _pow2_at_least(rb, 16, IMPLICIT_MAX_RANK)
    wide = 2 if x.dtype == torch.float32 else 1  # fp32 tiles take twice the registers
    BLOCK_M = max(16, min((64 if BLOCK_R <= 32 else 4096 // BLOCK_R) // wide,  # small maps (ResNet layer4's
                          triton.next_power_of_2(Ho * Wo))) if not _interpreting() else 16  # 4x4): no idle rows
    BLOCK_K = (64 if C >= 64 and BLOCK_R * wide <= 32 else 32) if not _interpreting() else 16
    BLOCK_N = 64 if not _interpreting() else 16
    dot_f32, prec = _dot_cfg(x, A)
    has_eb = expert_bias is not None
    eb = expert_bias if has_eb else y
    ebs = expert_bias.stride() if has_eb else (0, 0)
    for s0, count in grid_chunks(S):  # one launch unless S > 65535
        _conv_lora_fwd_kernel[(triton.cdiv(Ho * Wo, BLOCK_M), count)](
            x, A, B, y, eb, expert_idx, h_out, s0, C, H, W, Ho, Wo, R, NOUT, nb, rb, part,
            *x.stride(), *A.stride(), *B.stride(), *y.stride(), *ebs, *h_out.stride(),
            float(scale), sh, sw, ph, pw, dh, dw,
            KH=KH, KW=KW, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N,
            HAS_BIAS=has_eb, BLOCKED=nb > 1, DOT_F32=dot_f32, PREC=prec,
        )
    return y


def conv_lora_dgrad(dh: torch.Tensor, A: torch.Tensor, dx: torch.Tensor, expert_idx: torch.Tensor,
                    stride=1, padding=0, dilation=1, dh_expert_stride: int = 0, a_blocks: int = 1) -> torch.Tensor:
    """dx[s] += conv_transpose(dh[s], A_e) with e = expert_idx[s] (the input gradient of
    conv(x, A_e)), in place. dh [S, R, Ho, Wo] (read at + e * dh_expert_stride: expert 0's slice of
    a stacked [S, N*R, Ho, Wo] tensor), A [N, R, C, kh, kw], dx [S, C, H, W]. ``a_blocks``: A block
    diagonal (conv_lora_fwd), off-block entries never read. Returns dx."""
    _check4("dh", dh)
    _check4("dx", dx)
    S, C, H, W = dx.shape
    N, R, _, KH, KW = A.shape
    Ho, Wo = dh.shape[2:]
    nb, rb, part = _a_blocks(A, a_blocks)
    if S == 0 or H * W == 0 or C == 0:
        return dx
    (sh, sw), (ph, pw), (dlh, dlw) = _conv_geometry(stride, padding, dilation)
    BLOCK_M = max(16, min(64, triton.next_power_of_2(H * W))) if not _interpreting() else 16
    BLOCK_N = 64 if not _interpreting() else 16
    BLOCK_R = _pow2_at_least(R, 16, 32)
    dot_f32, prec = _dot_cfg(dh, A)
    for s0, count in grid_chunks(S):  # one launch unless S > 65535
        _conv_lora_dgrad_kernel[(triton.cdiv(H * W, BLOCK_M), triton.cdiv(C, BLOCK_N), count)](
            dh, A, dx, expert_idx, s0, C, H, W, Ho, Wo, R, rb, part,
            *dh.stride(), int(dh_expert_stride), *A.stride(), *dx.stride(),
            sh, sw, ph, pw, dlh, dlw,
            KH=KH, KW=KW, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCKED=nb > 1, DOT_F32=dot_f32,
            PREC=prec,
        )
    return dx


# programs per SM that conv_lora_wgrad's automatic split aims for on a GPU: each program loops over its
# share of a segment's rows, every step's loads behind an index gather (latency-bound). Stop 19's replay had
# it at 0.046 ms with 2 a SM (resnet50.layer3.conv2, N=5: 360 programs of 20 serial steps), the largest
# LoRA kernel of the layer. bench_distill's wgrad_split_new_vs_old compares.
WGRAD_PROGRAMS_PER_SM = int(os.environ.get("PPAP_FAST_WGRAD_PROGRAMS_PER_SM", "8"))


def _wgrad_blocks(x: torch.Tensor, N: int, R: int, C: int, KH: int, KW: int):
    """(BLOCK_R, BLOCK_M, BLOCK_C, C tiles, all (expert, R, C, tap) tiles) of conv_lora_wgrad."""
    BLOCK_R = _pow2_at_least(R, 16, 64)
    BLOCK_M = (64 if BLOCK_R <= 32 and x.dtype != torch.float32 else 32) if not _interpreting() else 16
    BLOCK_C = 64 if not _interpreting() else 16  # the MMA's M side: 64 for wgmma
    n_ct = triton.cdiv(C, BLOCK_C)
    return BLOCK_R, BLOCK_M, BLOCK_C, n_ct, N * triton.cdiv(R, BLOCK_R) * n_ct * KH * KW


def wgrad_auto_split(x: torch.Tensor, dh: torch.Tensor, out: torch.Tensor, per_sm: int | None = None) -> int:
    """conv_lora_wgrad's automatic split of each segment's rows: about ``per_sm`` (default
    WGRAD_PROGRAMS_PER_SM on CUDA, 2 elsewhere) programs a SM, at most 16, at least 4 row tiles a program."""
    S, C = x.shape[:2]
    N, R, _, KH, KW = out.shape
    _, block_m, _, _, tiles = _wgrad_blocks(x, N, R, C, KH, KW)
    if per_sm is None:
        per_sm = WGRAD_PROGRAMS_PER_SM if x.device.type == "cuda" else 2
    target = per_sm * sm_count(x.device, 4)
    rows = S * dh.shape[2] * dh.shape[3]
    return max(1, min(16, triton.cdiv(target, max(tiles, 1)), triton.cdiv(rows, block_m * max(N, 1) * 4)))


def conv_lora_wgrad(x: torch.Tensor, dh: torch.Tensor, out: torch.Tensor, sorted_idx: torch.Tensor,
                    offsets: torch.Tensor, stride=1, padding=0, dilation=1, alpha: float = 1.0,
                    split: int | None = None, a_blocks: int = 1) -> torch.Tensor:
    """out[e] = alpha * the weight gradient of conv(x, A_e) over expert e's samples (segments of
    build_segments): out [N, R, C, kh, kw] (fully written, zeros for empty experts), x [S, C, H, W],
    dh [S, R, Ho, Wo] (the gradient of each sample's own h). ``split`` > 1 splits each segment's
    rows over that many programs (fp32 partials summed in a fixed order); default from shapes.
    ``a_blocks``: A block diagonal (conv_lora_fwd): off-block entries get 0 (structural zeros)."""
    _check4("x", x)
    _check4("dh", dh)
    if out.dim() != 5:
        raise ValueError(f"out must be [N, R, C, kh, kw], got {tuple(out.shape)}")
    S, C, H, W = x.shape
    N, R, _, KH, KW = out.shape
    Ho, Wo = dh.shape[2:]
    nb, rb, part = _a_blocks(out, a_blocks)
    if N == 0 or R == 0 or C == 0:
        return out
    if S == 0 or Ho * Wo == 0:
        return out.zero_()
    (sh, sw), (ph, pw), (dlh, dlw) = _conv_geometry(stride, padding, dilation)
    BLOCK_R, BLOCK_M, BLOCK_C, n_ct, _ = _wgrad_blocks(x, N, R, C, KH, KW)
    split = int(wgrad_auto_split(x, dh, out) if split is None else split)
    dot_f32, prec = _dot_cfg(x, dh)
    dst = out if split == 1 else alloc((split, N, R, C, KH, KW), torch.float32, out.device)
    ds = (0,) + tuple(out.stride()) if split == 1 else tuple(dst.stride())
    grid = (N, triton.cdiv(R, BLOCK_R) * n_ct, KH * KW * split)
    _conv_lora_wgrad_kernel[grid](
        x, dh, dst, sorted_idx, offsets, C, H, W, Ho, Wo, R, split, n_ct, rb, part,
        *x.stride(), *dh.stride(), *ds, float(alpha), sh, sw, ph, pw, dlh, dlw,
        KH=KH, KW=KW, BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, BLOCKED=nb > 1, DOT_F32=dot_f32,
        PREC=prec,
    )
    if split > 1:
        out.copy_(dst.sum(0))
    return out
