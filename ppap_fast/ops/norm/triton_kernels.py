"""Triton kernels of the per-expert normalisation ops.

Segments (``sorted_idx``/``offsets`` from ops.lora.segments.build_segments, computed on
the device) give each expert's samples; every launch grid depends on shapes and N
only, so nothing reads values on the host (CUDA-graph capturable). Per-expert
reductions: programs (expert, column block, split) each loop over one split of the
expert's rows and write fp32 partials [SPLIT, N, ...] that torch sums (deterministic,
no atomics); SPLIT comes from the shapes and the SM count. Statistics are fp32
whatever the input dtype; the variance is two-pass (mean first), as in the reference.

BatchNorm rows: x viewed as [S, C, P] (P = spatial size, 1 for [S, C]); a "row" of
expert e is one (sample, position) of its segment, a tile is [BLOCK_C, BLOCK_R].
LayerNorm rows: x viewed as [S*M, D]; row r belongs to sample r // M.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._kernel_util import grid_chunks, new_buffer, sm_count

POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def alloc(shape, dtype, device) -> torch.Tensor:
    return new_buffer(shape, dtype, device, POISON)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# =============================================================================== shared pieces
@triton.jit
def _split_program(off_ptr, F, rows_per_sample, SPLIT, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr):
    """Program (expert e, feature block, split sp) of a per-expert reduction: e, the block's
    features offs (< F: fmask), sp, the first position lo of e's samples in sorted_idx and the
    rows [begin, end) of e's segment (rows_per_sample rows a sample) that split sp handles
    (chunks of whole BLOCK_R tiles)."""
    e = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    sp = tl.program_id(2)
    fmask = offs < F
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    nrows = (hi - lo) * rows_per_sample
    chunk = ((nrows + SPLIT - 1) // SPLIT + BLOCK_R - 1) // BLOCK_R * BLOCK_R
    begin = sp * chunk
    return e, offs, fmask, sp, lo, begin, tl.minimum(nrows, begin + chunk)


@triton.jit
def _seg_rows(sidx_ptr, lo, r0, end, P, BLOCK_R: tl.constexpr):
    """Rows r0.. (< end) of a segment starting at sorted_idx[lo], P rows a sample: the sample
    (int64), the row within it (int64) and the row mask."""
    r = r0 + tl.arange(0, BLOCK_R)
    rmask = r < end
    smp = tl.load(sidx_ptr + lo + r // P, mask=rmask, other=0).to(tl.int64)
    return smp, (r % P).to(tl.int64), rmask


@triton.jit
def _dwb_step(dy_ptr, x_ptr, off, m, mean, rstd, aw, ab):
    """aw += dy * xhat, ab += dy over one tile (mean, rstd broadcast to the tile)."""
    g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean) * rstd
    return aw + tl.where(m, g * xhat, 0.0), ab + g


@triton.jit
def _store_partials(out1_ptr, out2_ptr, sp, N, e, F, offs, fmask, a1, a2, AXIS: tl.constexpr, BOTH: tl.constexpr):
    """Row split sp's sums of the tiles a1 (and a2 if BOTH) over AXIS into [SPLIT, N, F][sp, e, offs]."""
    dst = (sp * N + e).to(tl.int64) * F + offs
    tl.store(out1_ptr + dst, tl.sum(a1, axis=AXIS), mask=fmask)
    if BOTH:
        tl.store(out2_ptr + dst, tl.sum(a2, axis=AXIS), mask=fmask)


# =============================================================================== BatchNorm
@triton.jit
def _bn_seg_tile(sidx_ptr, lo, r0, nrows, offs_c, cmask, P, sx_s, sx_c, sx_p, BLOCK_R: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_R] and mask of rows r0.. of a segment starting at sorted_idx[lo]."""
    smp, p, rmask = _seg_rows(sidx_ptr, lo, r0, nrows, P, BLOCK_R)
    off = (smp * sx_s + p * sx_p)[None, :] + offs_c[:, None].to(tl.int64) * sx_c
    m = cmask[:, None] & rmask[None, :]
    return off, m


@triton.jit
def _bn_partial_kernel(x_ptr, dy_ptr, sidx_ptr, off_ptr, mean_ptr, rstd_ptr, out1_ptr, out2_ptr,
                       N, C, P, SPLIT, sx_s, sx_c, sx_p,
                       MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Partial per-expert channel sums over split sp's share of the expert's rows, [SPLIT, N, C]
    (every entry written, zeros for empty experts). dy has x's strides.
    MODE 0: sum x.  MODE 1: sum (x - mean)^2.  MODE 2: sum dy and sum dy * xhat."""
    e, offs_c, cmask, sp, lo, begin, end = _split_program(off_ptr, C, P, SPLIT, BLOCK_C, BLOCK_R)
    mean = tl.load(mean_ptr + e * C + offs_c, mask=cmask, other=0.0)  # MODE 0: a placeholder, unused
    rstd = tl.load(rstd_ptr + e * C + offs_c, mask=cmask, other=0.0)  # MODE 0/1: unused
    a1 = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for r0 in range(begin, end, BLOCK_R):
        off, m = _bn_seg_tile(sidx_ptr, lo, r0, end, offs_c, cmask, P, sx_s, sx_c, sx_p, BLOCK_R)
        xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if MODE == 0:
            a1 += xv
        elif MODE == 1:
            d = xv - mean[:, None]
            a1 += tl.where(m, d * d, 0.0)
        else:
            g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
            a1 += g
            a2 += tl.where(m, g * (xv - mean[:, None]) * rstd[:, None], 0.0)
    _store_partials(out1_ptr, out2_ptr, sp, N, e, C, offs_c, cmask, a1, a2, 1, MODE == 2)


@triton.jit
def _bn_elem_tile(idx_ptr, s0, C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Tile (position block, channel block, sample s - s0) of contiguous [S, C, P]: s's expert e,
    the channels offs_c (< C: cmask), the offsets [BLOCK_C, BLOCK_P] and their mask. The position
    blocks on grid axis 0 (on axis 2, CUDA's 65535 cap, 4096x4096 positions failed), samples from
    s0 in launches of <= 65535."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = s0 + tl.program_id(2).to(tl.int64)
    cmask = offs_c < C
    m = cmask[:, None] & (offs_p < P)[None, :]
    e = tl.load(idx_ptr + s).to(tl.int64)
    off = s.to(tl.int64) * C * P + offs_c[:, None].to(tl.int64) * P + offs_p[None, :]
    return e, offs_c, cmask, off, m


@triton.jit
def _bn_apply_kernel(x_ptr, y_ptr, idx_ptr, a_ptr, b_ptr, s0, C, P,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = x * a[e] + b[e] per channel (x, y contiguous [S, C, P]; a, b fp32 [N, C])."""
    e, offs_c, cmask, off, m = _bn_elem_tile(idx_ptr, s0, C, P, BLOCK_C, BLOCK_P)
    a = tl.load(a_ptr + e * C + offs_c, mask=cmask, other=0.0)
    b = tl.load(b_ptr + e * C + offs_c, mask=cmask, other=0.0)
    xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (xv * a[:, None] + b[:, None]).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_dx_kernel(dy_ptr, x_ptr, dx_ptr, idx_ptr, mean_ptr, rstd_ptr, a_ptr, k1_ptr, k2_ptr, s0, C, P,
                  TRAIN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = a[e] * (dy - k1[e] - xhat * k2[e]) (train) or a[e] * dy (eval); a = w * rstd."""
    e, offs_c, cmask, off, m = _bn_elem_tile(idx_ptr, s0, C, P, BLOCK_C, BLOCK_P)
    a = tl.load(a_ptr + e * C + offs_c, mask=cmask, other=0.0)
    g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
    if TRAIN:
        mean = tl.load(mean_ptr + e * C + offs_c, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + e * C + offs_c, mask=cmask, other=0.0)
        k1 = tl.load(k1_ptr + e * C + offs_c, mask=cmask, other=0.0)
        k2 = tl.load(k2_ptr + e * C + offs_c, mask=cmask, other=0.0)
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = g - k1[:, None] - xhat * k2[:, None]
    tl.store(dx_ptr + off, (g * a[:, None]).to(dx_ptr.dtype.element_ty), mask=m)


def _bn_blocks(C, P):
    BLOCK_C = _pow2(C, 16, 32)
    BLOCK_R = _pow2(P, 16, 32 if _interpreting() else 128)
    return BLOCK_C, BLOCK_R


SPLIT = None  # tests: force the number of row splits of the per-expert reductions


def _n_split(device, programs: int, rows: int, N: int, block_r: int) -> int:
    """Row splits per (expert, column block) so the reductions fill the GPU; shapes only (no sync).
    Partials go to an fp32 [SPLIT, N, ...] buffer summed by torch (deterministic, no atomics)."""
    if SPLIT is not None:
        return int(SPLIT)
    target = 4 * sm_count(device, 1)
    per_expert_tiles = triton.cdiv(rows, max(N, 1) * block_r)
    return max(1, min(64, triton.cdiv(target, max(programs, 1)), per_expert_tiles))


def _split_grid(device, N: int, F: int, block_f: int, rows: int, block_r: int):
    """Grid (expert, feature block, split) of a per-expert reduction over F features and rows rows."""
    fb = triton.cdiv(F, block_f)
    return N, fb, _n_split(device, N * fb, rows, N, block_r)


def _partials(k: int, split: int, N: int, F: int, device):
    """k fp32 [split, N, F] partial-sum buffers (the kernels write every entry)."""
    return [alloc((split, N, F), torch.float32, device) for _ in range(k)]


def _zeros_pair(N: int, F: int, device):
    z = torch.zeros((N, F), dtype=torch.float32, device=device)
    return z, z.clone()


def _bn_partials(mode, x3, dy3, sorted_idx, offsets, N, mean=None, rstd=None):
    S, C, P = x3.shape
    BLOCK_C, BLOCK_R = _bn_blocks(C, P)
    grid = _split_grid(x3.device, N, C, BLOCK_C, S * P, BLOCK_R)
    bufs = _partials(2 if mode == 2 else 1, grid[2], N, C, x3.device)
    out1, out2 = bufs[0], bufs[-1]
    _bn_partial_kernel[grid](x3, dy3 if dy3 is not None else x3, sorted_idx, offsets,
                             mean if mean is not None else out1, rstd if rstd is not None else out1,
                             out1, out2, N, C, P, grid[2], *x3.stride(),
                             MODE=mode, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    return out1.sum(0), (out2.sum(0) if mode == 2 else None)


def bn_stats(x3, sorted_idx, offsets, n):
    """x3 [S, C, P] (any strides), n fp32 [N] rows per expert -> mean, biased var fp32 [N, C]
    (two passes; zeros for empty experts)."""
    N, C = n.shape[0], x3.shape[1]
    if N == 0 or C == 0:
        return _zeros_pair(N, C, x3.device)
    inv = (1.0 / n.clamp(min=1))[:, None]
    mean = (_bn_partials(0, x3, None, sorted_idx, offsets, N)[0] * inv).contiguous()
    var = _bn_partials(1, x3, None, sorted_idx, offsets, N, mean)[0] * inv
    return mean, var


def bn_bwd_reduce(dy3, x3, sorted_idx, offsets, mean, rstd):
    """Both [S, C, P] with the same strides -> sum dy, sum dy * xhat fp32 [N, C]."""
    N, C = mean.shape
    if N == 0 or C == 0:
        return _zeros_pair(N, C, x3.device)
    return _bn_partials(2, x3, dy3, sorted_idx, offsets, N, mean, rstd)


def _elementwise_launches(S, C, P):
    """(grid, s0) of each launch of an elementwise kernel over [S, C, P] (one unless S > 65535), and
    its BLOCK_C, BLOCK_P."""
    BLOCK_C = _pow2(C, 16, 32)
    BLOCK_P = _pow2(P, 16, 64 if _interpreting() else 256)
    tiles = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C))
    return [(tiles + (count,), s0) for s0, count in grid_chunks(S)], BLOCK_C, BLOCK_P


def bn_apply(x3, expert_idx, a, b, out_dtype, out_shape=None):
    """x3 contiguous [S, C, P] -> x * a[e] + b[e] (a, b fp32 [N, C]), allocated in out_shape (a
    contiguous tensor, not a view: an autograd Function's output may then be modified in place)."""
    S, C, P = x3.shape
    out = alloc(out_shape or (S, C, P), out_dtype, x3.device)
    if out.numel() == 0:
        return out
    launches, BC, BP = _elementwise_launches(S, C, P)
    for grid, s0 in launches:
        _bn_apply_kernel[grid](x3, out.view(S, C, P), expert_idx, a, b, s0, C, P, BLOCK_C=BC, BLOCK_P=BP)
    return out


def bn_dx(dy3, x3, expert_idx, mean, rstd, a, k1, k2, train, out_dtype):
    S, C, P = x3.shape
    dx = alloc((S, C, P), out_dtype, x3.device)
    if dx.numel() == 0:
        return dx
    launches, BC, BP = _elementwise_launches(S, C, P)
    for grid, s0 in launches:
        _bn_dx_kernel[grid](dy3, x3, dx, expert_idx, mean, rstd, a, k1, k2, s0, C, P, TRAIN=bool(train),
                            BLOCK_C=BC, BLOCK_P=BP)
    return dx


# ====================================================================== row norms (Layer / Group)
# Both normalise the rows of a contiguous [R, L] (one program: BLOCK_R rows, loops over L in
# BLOCK_K tiles); value k of row r has the affine w/b at wbase[r] + k // P.
@triton.jit
def _row_block(idx_ptr, R, L, M, BLOCK_R: tl.constexpr):
    """This program's rows (< R: rmask), their offsets rows * L (int64) and the expert of
    their sample idx[row // M]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    e = tl.load(idx_ptr + rows // M, mask=rmask, other=0).to(tl.int64)
    return rows, rmask, rows.to(tl.int64) * L, e


@triton.jit
def _row_fwd(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, rows, rmask, base, wbase, L, P, eps,
             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = xhat * w + b over each row (fp32 two-pass mean and variance); writes mean, rstd [R]."""
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (k < L)[None, :]
        acc += tl.load(x_ptr + base[:, None] + k[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / L
    acc2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (k < L)[None, :]
        xc = tl.load(x_ptr + base[:, None] + k[None, :], mask=m, other=0.0).to(tl.float32) - mean[:, None]
        acc2 += tl.where(m, xc * xc, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=1) / L + eps)
    for k0 in range(0, L, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (k < L)[None, :]
        ch = wbase[:, None] + k[None, :] // P
        xv = tl.load(x_ptr + base[:, None] + k[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ch, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch, mask=m, other=0.0).to(tl.float32)
        yv = (xv - mean[:, None]) * rstd[:, None] * w + b
        tl.store(y_ptr + base[:, None] + k[None, :], yv.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _row_g_xhat(dy_ptr, x_ptr, w_ptr, rmask, base, wbase, k0, L, P, mean, rstd, BLOCK_K: tl.constexpr):
    """Tile k0.. of the rows: offsets, mask, xhat and g = dy * w."""
    k = k0 + tl.arange(0, BLOCK_K)
    m = rmask[:, None] & (k < L)[None, :]
    off = base[:, None] + k[None, :]
    xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
    g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32) \
        * tl.load(w_ptr + wbase[:, None] + k[None, :] // P, mask=m, other=0.0).to(tl.float32)
    return off, m, xhat, g


@triton.jit
def _row_dx(dy_ptr, x_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, rows, rmask, base, wbase, L, P,
            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over each row, g = dy * w."""
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    s1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        off, m, xhat, g = _row_g_xhat(dy_ptr, x_ptr, w_ptr, rmask, base, wbase, k0, L, P, mean, rstd, BLOCK_K)
        s1 += g
        s2 += tl.where(m, g * xhat, 0.0)
    c1 = tl.sum(s1, axis=1) / L
    c2 = tl.sum(s2, axis=1) / L
    for k0 in range(0, L, BLOCK_K):
        off, m, xhat, g = _row_g_xhat(dy_ptr, x_ptr, w_ptr, rmask, base, wbase, k0, L, P, mean, rstd, BLOCK_K)
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _row_blocks(L):
    return 16, _pow2(L, 16, 64 if _interpreting() else 256)


def _row_outputs(x, R, out_shape=None):
    """y (allocated in out_shape, returned as its view of x's shape), mean and rstd fp32 [R] (the
    kernels write every entry)."""
    y = alloc(out_shape or x.shape, x.dtype, x.device)
    return y, y.view(x.shape), alloc((R,), torch.float32, x.device), alloc((R,), torch.float32, x.device)


# =============================================================================== LayerNorm
# x viewed as [R, D] = [S*M, D]: row r is of sample r // M, value d has w[e, d] (P = 1).
@triton.jit
def _ln_fwd_kernel(x_ptr, y_ptr, idx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, M, D, eps,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """x, y contiguous [R, D]; row r uses the affine of expert idx[r // M]; writes mean, rstd [R]."""
    rows, rmask, base, e = _row_block(idx_ptr, R, D, M, BLOCK_R)
    _row_fwd(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, rows, rmask, base, e * D, D, 1, eps, BLOCK_R, BLOCK_D)


@triton.jit
def _ln_dx_kernel(dy_ptr, x_ptr, dx_ptr, idx_ptr, w_ptr, mean_ptr, rstd_ptr, R, M, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w[e]."""
    rows, rmask, base, e = _row_block(idx_ptr, R, D, M, BLOCK_R)
    _row_dx(dy_ptr, x_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, rows, rmask, base, e * D, D, 1, BLOCK_R, BLOCK_D)


@triton.jit
def _ln_dwb_kernel(dy_ptr, x_ptr, sidx_ptr, off_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, N, M, D, SPLIT,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial dw[sp, e] = sum dy * xhat, db[sp, e] = sum dy over split sp's share of the rows
    of expert e's samples ([SPLIT, N, D], every entry written)."""
    e, d, dmask, sp, lo, begin, end = _split_program(off_ptr, D, M, SPLIT, BLOCK_D, BLOCK_R)
    aw = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    ab = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(begin, end, BLOCK_R):
        smp, j, rmask = _seg_rows(sidx_ptr, lo, r0, end, M, BLOCK_R)
        row = smp * M + j
        m = rmask[:, None] & dmask[None, :]
        mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)
        aw, ab = _dwb_step(dy_ptr, x_ptr, row[:, None] * D + d[None, :], m, mean[:, None], rstd[:, None], aw, ab)
    _store_partials(dw_ptr, db_ptr, sp, N, e, D, d, dmask, aw, ab, 0, True)


def ln_fwd(x2, expert_idx, M, w, b, eps, out_shape=None):
    R, D = x2.shape
    out, y, mean, rstd = _row_outputs(x2, R, out_shape)
    if R == 0 or D == 0:
        return out, mean, rstd
    BLOCK_R, BLOCK_D = _row_blocks(D)
    _ln_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](x2, y, expert_idx, w, b, mean, rstd, R, M, D, float(eps),
                                               BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return out, mean, rstd


def ln_dx(dy2, x2, expert_idx, M, w, mean, rstd):
    R, D = x2.shape
    dx = alloc((R, D), x2.dtype, x2.device)
    if R == 0 or D == 0:
        return dx
    BLOCK_R, BLOCK_D = _row_blocks(D)
    _ln_dx_kernel[(triton.cdiv(R, BLOCK_R),)](dy2, x2, dx, expert_idx, w, mean, rstd, R, M, D,
                                              BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return dx


def ln_dwb(dy2, x2, sorted_idx, offsets, M, mean, rstd, N):
    R, D = x2.shape
    if N == 0 or D == 0:
        return _zeros_pair(N, D, x2.device)
    BLOCK_R, BLOCK_D = _row_blocks(D)
    grid = _split_grid(x2.device, N, D, BLOCK_D, R, BLOCK_R)
    dw, db = _partials(2, grid[2], N, D, x2.device)
    _ln_dwb_kernel[grid](dy2, x2, sorted_idx, offsets, mean, rstd, dw, db, N, M, D, grid[2],
                         BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return dw.sum(0), db.sum(0)


# =============================================================================== GroupNorm
# x contiguous [S, C, P] with C = G * Cg: row r = (sample r // G, group r % G) is the
# contiguous run of L = Cg * P values at r * L; value k of row r is channel (r % G) * Cg + k // P.
@triton.jit
def _gn_fwd_kernel(x_ptr, y_ptr, idx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, G, Cg, P, C, eps,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, rmask, base, e = _row_block(idx_ptr, R, Cg * P, G, BLOCK_R)
    wbase = e * C + (rows % G) * Cg
    _row_fwd(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, rows, rmask, base, wbase, Cg * P, P, eps,
             BLOCK_R, BLOCK_K)


@triton.jit
def _gn_dx_kernel(dy_ptr, x_ptr, dx_ptr, idx_ptr, w_ptr, mean_ptr, rstd_ptr, R, G, Cg, P, C,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the row, g = dy * w[e, channel]."""
    rows, rmask, base, e = _row_block(idx_ptr, R, Cg * P, G, BLOCK_R)
    wbase = e * C + (rows % G) * Cg
    _row_dx(dy_ptr, x_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, rows, rmask, base, wbase, Cg * P, P, BLOCK_R, BLOCK_K)


@triton.jit
def _gn_dwb_kernel(dy_ptr, x_ptr, sidx_ptr, off_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, N, G, Cg, P, C, SPLIT,
                   BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Partial dw[sp, e, c] = sum dy * xhat, db[sp, e, c] = sum dy over split sp's share of
    expert e's (sample, position) rows ([SPLIT, N, C], every entry written)."""
    e, offs_c, cmask, sp, lo, begin, end = _split_program(off_ptr, C, P, SPLIT, BLOCK_C, BLOCK_R)
    aw = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    ab = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for r0 in range(begin, end, BLOCK_R):
        smp, p, rmask = _seg_rows(sidx_ptr, lo, r0, end, P, BLOCK_R)
        m = cmask[:, None] & rmask[None, :]
        off = (smp * C * P + p)[None, :] + offs_c[:, None].to(tl.int64) * P
        srow = smp[None, :] * G + (offs_c // Cg)[:, None]
        mean = tl.load(mean_ptr + srow, mask=m, other=0.0)
        rstd = tl.load(rstd_ptr + srow, mask=m, other=0.0)
        aw, ab = _dwb_step(dy_ptr, x_ptr, off, m, mean, rstd, aw, ab)
    _store_partials(dw_ptr, db_ptr, sp, N, e, C, offs_c, cmask, aw, ab, 1, True)


def gn_fwd(x3, expert_idx, G, w, b, eps, out_shape=None):
    """x3 contiguous [S, C, P] -> y (x's dtype, in out_shape), mean, rstd fp32 [S * G]."""
    S, C, P = x3.shape
    R, Cg = S * G, C // G
    out, y, mean, rstd = _row_outputs(x3, R, out_shape)
    if R == 0 or Cg * P == 0:
        return out, mean, rstd
    BLOCK_R, BLOCK_K = _row_blocks(Cg * P)
    _gn_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](x3, y, expert_idx, w, b, mean, rstd, R, G, Cg, P, C, float(eps),
                                               BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return out, mean, rstd


def gn_dx(dy3, x3, expert_idx, G, w, mean, rstd):
    S, C, P = x3.shape
    R, Cg = S * G, C // G
    dx = alloc((S, C, P), x3.dtype, x3.device)
    if R == 0 or Cg * P == 0:
        return dx
    BLOCK_R, BLOCK_K = _row_blocks(Cg * P)
    _gn_dx_kernel[(triton.cdiv(R, BLOCK_R),)](dy3, x3, dx, expert_idx, w, mean, rstd, R, G, Cg, P, C,
                                              BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return dx


def gn_dwb(dy3, x3, sorted_idx, offsets, G, mean, rstd, N):
    S, C, P = x3.shape
    if N == 0 or C == 0:
        return _zeros_pair(N, C, x3.device)
    BLOCK_C, BLOCK_R = _bn_blocks(C, P)
    grid = _split_grid(x3.device, N, C, BLOCK_C, S * P, BLOCK_R)
    dw, db = _partials(2, grid[2], N, C, x3.device)
    _gn_dwb_kernel[grid](dy3, x3, sorted_idx, offsets, mean, rstd, dw, db, N, G, C // G, P, C, grid[2],
                         BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    return dw.sum(0), db.sum(0)
