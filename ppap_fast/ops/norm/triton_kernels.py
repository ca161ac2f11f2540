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

POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def alloc(shape, dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# =============================================================================== BatchNorm
@triton.jit
def _bn_seg_tile(sidx_ptr, lo, r0, nrows, offs_c, cmask, P, sx_s, sx_c, sx_p, BLOCK_R: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_R] and mask of rows r0.. of a segment starting at sorted_idx[lo]."""
    r = r0 + tl.arange(0, BLOCK_R)
    rmask = r < nrows
    smp = tl.load(sidx_ptr + lo + r // P, mask=rmask, other=0).to(tl.int64)
    p = (r % P).to(tl.int64)
    off = (smp * sx_s + p * sx_p)[None, :] + offs_c[:, None].to(tl.int64) * sx_c
    m = cmask[:, None] & rmask[None, :]
    return off, m


@triton.jit
def _split_range(nrows, sp, SPLIT, BLOCK_R: tl.constexpr):
    """Rows [begin, end) of a segment of nrows handled by split sp (chunks of whole tiles)."""
    chunk = ((nrows + SPLIT - 1) // SPLIT + BLOCK_R - 1) // BLOCK_R * BLOCK_R
    begin = sp * chunk
    return begin, tl.minimum(nrows, begin + chunk)


@triton.jit
def _bn_partial_kernel(x_ptr, dy_ptr, sidx_ptr, off_ptr, mean_ptr, rstd_ptr, out1_ptr, out2_ptr,
                       N, C, P, SPLIT, sx_s, sx_c, sx_p,
                       MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Partial per-expert channel sums over split sp's share of the expert's rows, [SPLIT, N, C]
    (every entry written, zeros for empty experts). dy has x's strides.
    MODE 0: sum x.  MODE 1: sum (x - mean)^2.  MODE 2: sum dy and sum dy * xhat."""
    e = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sp = tl.program_id(2)
    cmask = offs_c < C
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    begin, end = _split_range((hi - lo) * P, sp, SPLIT, BLOCK_R)
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
    dst = (sp * N + e).to(tl.int64) * C + offs_c
    tl.store(out1_ptr + dst, tl.sum(a1, axis=1), mask=cmask)
    if MODE == 2:
        tl.store(out2_ptr + dst, tl.sum(a2, axis=1), mask=cmask)


@triton.jit
def _bn_apply_kernel(x_ptr, y_ptr, idx_ptr, a_ptr, b_ptr, C, P,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """y = x * a[e] + b[e] per channel (x, y contiguous [S, C, P]; a, b fp32 [N, C])."""
    s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs_c < C
    m = cmask[:, None] & (offs_p < P)[None, :]
    e = tl.load(idx_ptr + s).to(tl.int64)
    a = tl.load(a_ptr + e * C + offs_c, mask=cmask, other=0.0)
    b = tl.load(b_ptr + e * C + offs_c, mask=cmask, other=0.0)
    off = s.to(tl.int64) * C * P + offs_c[:, None].to(tl.int64) * P + offs_p[None, :]
    xv = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, (xv * a[:, None] + b[:, None]).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_dx_kernel(dy_ptr, x_ptr, dx_ptr, idx_ptr, mean_ptr, rstd_ptr, a_ptr, k1_ptr, k2_ptr, C, P,
                  TRAIN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = a[e] * (dy - k1[e] - xhat * k2[e]) (train) or a[e] * dy (eval); a = w * rstd."""
    s = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = offs_c < C
    m = cmask[:, None] & (offs_p < P)[None, :]
    e = tl.load(idx_ptr + s).to(tl.int64)
    a = tl.load(a_ptr + e * C + offs_c, mask=cmask, other=0.0)
    off = s.to(tl.int64) * C * P + offs_c[:, None].to(tl.int64) * P + offs_p[None, :]
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
    target = 4 * _sm_count(device)
    per_expert_tiles = triton.cdiv(rows, max(N, 1) * block_r)
    return max(1, min(64, triton.cdiv(target, max(programs, 1)), per_expert_tiles))


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def _bn_partials(mode, x3, dy3, sorted_idx, offsets, N, mean=None, rstd=None):
    S, C, P = x3.shape
    BLOCK_C, BLOCK_R = _bn_blocks(C, P)
    cb = triton.cdiv(C, BLOCK_C)
    split = _n_split(x3.device, N * cb, S * P, N, BLOCK_R)
    out1 = alloc((split, N, C), torch.float32, x3.device)
    out2 = alloc((split, N, C), torch.float32, x3.device) if mode == 2 else out1
    _bn_partial_kernel[(N, cb, split)](x3, dy3 if dy3 is not None else x3, sorted_idx, offsets,
                                       mean if mean is not None else out1, rstd if rstd is not None else out1,
                                       out1, out2, N, C, P, split, *x3.stride(),
                                       MODE=mode, BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    return out1.sum(0), (out2.sum(0) if mode == 2 else None)


def bn_stats(x3, sorted_idx, offsets, n):
    """x3 [S, C, P] (any strides), n fp32 [N] rows per expert -> mean, biased var fp32 [N, C]
    (two passes; zeros for empty experts)."""
    N, C = n.shape[0], x3.shape[1]
    if N == 0 or C == 0:
        z = torch.zeros((N, C), dtype=torch.float32, device=x3.device)
        return z, z.clone()
    inv = (1.0 / n.clamp(min=1))[:, None]
    mean = (_bn_partials(0, x3, None, sorted_idx, offsets, N)[0] * inv).contiguous()
    var = _bn_partials(1, x3, None, sorted_idx, offsets, N, mean)[0] * inv
    return mean, var


def bn_bwd_reduce(dy3, x3, sorted_idx, offsets, mean, rstd):
    """Both [S, C, P] with the same strides -> sum dy, sum dy * xhat fp32 [N, C]."""
    N, C = mean.shape
    if N == 0 or C == 0:
        z = torch.zeros((N, C), dtype=torch.float32, device=x3.device)
        return z, z.clone()
    return _bn_partials(2, x3, dy3, sorted_idx, offsets, N, mean, rstd)


def _elementwise_grid(S, C, P):
    BLOCK_C = _pow2(C, 16, 32)
    BLOCK_P = _pow2(P, 16, 64 if _interpreting() else 256)
    return (S, triton.cdiv(C, BLOCK_C), triton.cdiv(P, BLOCK_P)), BLOCK_C, BLOCK_P


def bn_apply(x3, expert_idx, a, b, out_dtype):
    """x3 contiguous [S, C, P] -> x * a[e] + b[e] (a, b fp32 [N, C])."""
    S, C, P = x3.shape
    y = alloc((S, C, P), out_dtype, x3.device)
    if y.numel() == 0:
        return y
    grid, BC, BP = _elementwise_grid(S, C, P)
    _bn_apply_kernel[grid](x3, y, expert_idx, a, b, C, P, BLOCK_C=BC, BLOCK_P=BP)
    return y


def bn_dx(dy3, x3, expert_idx, mean, rstd, a, k1, k2, train, out_dtype):
    S, C, P = x3.shape
    dx = alloc((S, C, P), out_dtype, x3.device)
    if dx.numel() == 0:
        return dx
    grid, BC, BP = _elementwise_grid(S, C, P)
    _bn_dx_kernel[grid](dy3, x3, dx, expert_idx, mean, rstd, a, k1, k2, C, P, TRAIN=bool(train),
                        BLOCK_C=BC, BLOCK_P=BP)
    return dx


# =============================================================================== LayerNorm
@triton.jit
def _ln_fwd_kernel(x_ptr, y_ptr, idx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, M, D, eps,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """x, y contiguous [R, D]; row r uses the affine of expert idx[r // M]; writes mean, rstd [R]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    e = tl.load(idx_ptr + rows // M, mask=rmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (d < D)[None, :]
        acc += tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / D
    acc2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (d < D)[None, :]
        xv = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        xc = xv - mean[:, None]
        acc2 += tl.where(m, xc * xc, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(acc2, axis=1) / D + eps)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (d < D)[None, :]
        xv = tl.load(x_ptr + rows64[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + e[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + e[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        yv = (xv - mean[:, None]) * rstd[:, None] * w + b
        tl.store(y_ptr + rows64[:, None] * D + d[None, :], yv.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _ln_dx_kernel(dy_ptr, x_ptr, dx_ptr, idx_ptr, w_ptr, mean_ptr, rstd_ptr, R, M, D,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w[e]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    e = tl.load(idx_ptr + rows // M, mask=rmask, other=0).to(tl.int64)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    s1 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (d < D)[None, :]
        off = rows64[:, None] * D + d[None, :]
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + e[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        s1 += g
        s2 += tl.where(m, g * xhat, 0.0)
    c1 = tl.sum(s1, axis=1) / D
    c2 = tl.sum(s2, axis=1) / D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (d < D)[None, :]
        off = rows64[:, None] * D + d[None, :]
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + e[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ln_dwb_kernel(dy_ptr, x_ptr, sidx_ptr, off_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, N, M, D, SPLIT,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial dw[sp, e] = sum dy * xhat, db[sp, e] = sum dy over split sp's share of the rows
    of expert e's samples ([SPLIT, N, D], every entry written)."""
    e = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    sp = tl.program_id(2)
    dmask = d < D
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    begin, end = _split_range((hi - lo) * M, sp, SPLIT, BLOCK_R)
    aw = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    ab = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for r0 in range(begin, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < end
        smp = tl.load(sidx_ptr + lo + r // M, mask=rmask, other=0).to(tl.int64)
        row = smp * M + (r % M)
        m = rmask[:, None] & dmask[None, :]
        off = row[:, None] * D + d[None, :]
        mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)
        g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        aw += tl.where(m, g * xhat, 0.0)
        ab += g
    dst = (sp * N + e).to(tl.int64) * D + d
    tl.store(dw_ptr + dst, tl.sum(aw, axis=0), mask=dmask)
    tl.store(db_ptr + dst, tl.sum(ab, axis=0), mask=dmask)


def _ln_blocks(D):
    return 16, _pow2(D, 16, 64 if _interpreting() else 256)


def ln_fwd(x2, expert_idx, M, w, b, eps):
    R, D = x2.shape
    y = alloc((R, D), x2.dtype, x2.device)
    mean = alloc((R,), torch.float32, x2.device)
    rstd = alloc((R,), torch.float32, x2.device)
    if R == 0 or D == 0:
        return y, mean, rstd
    BLOCK_R, BLOCK_D = _ln_blocks(D)
    _ln_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](x2, y, expert_idx, w, b, mean, rstd, R, M, D, float(eps),
                                               BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return y, mean, rstd


def ln_dx(dy2, x2, expert_idx, M, w, mean, rstd):
    R, D = x2.shape
    dx = alloc((R, D), x2.dtype, x2.device)
    if R == 0 or D == 0:
        return dx
    BLOCK_R, BLOCK_D = _ln_blocks(D)
    _ln_dx_kernel[(triton.cdiv(R, BLOCK_R),)](dy2, x2, dx, expert_idx, w, mean, rstd, R, M, D,
                                              BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return dx


def ln_dwb(dy2, x2, sorted_idx, offsets, M, mean, rstd, N):
    R, D = x2.shape
    if N == 0 or D == 0:
        z = torch.zeros((N, D), dtype=torch.float32, device=x2.device)
        return z, z.clone()
    BLOCK_R, BLOCK_D = _ln_blocks(D)
    db_ = triton.cdiv(D, BLOCK_D)
    split = _n_split(x2.device, N * db_, R, N, BLOCK_R)
    dw = alloc((split, N, D), torch.float32, x2.device)
    db = alloc((split, N, D), torch.float32, x2.device)
    _ln_dwb_kernel[(N, db_, split)](dy2, x2, sorted_idx, offsets, mean, rstd, dw, db, N, M, D, split,
                                    BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
    return dw.sum(0), db.sum(0)


# =============================================================================== GroupNorm
# x contiguous [S, C, P] with C = G * Cg: row r = (sample r // G, group r % G) is the
# contiguous run of L = Cg * P values at r * L; value k of row r is channel (r % G) * Cg + k // P.
@triton.jit
def _gn_fwd_kernel(x_ptr, y_ptr, idx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, R, G, Cg, P, C, eps,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    L = Cg * P
    base = rows.to(tl.int64) * L
    e = tl.load(idx_ptr + rows // G, mask=rmask, other=0).to(tl.int64)
    c0 = (rows % G) * Cg
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
        ch = e[:, None] * C + c0[:, None] + k[None, :] // P
        xv = tl.load(x_ptr + base[:, None] + k[None, :], mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ch, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ch, mask=m, other=0.0).to(tl.float32)
        yv = (xv - mean[:, None]) * rstd[:, None] * w + b
        tl.store(y_ptr + base[:, None] + k[None, :], yv.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _gn_dx_kernel(dy_ptr, x_ptr, dx_ptr, idx_ptr, w_ptr, mean_ptr, rstd_ptr, R, G, Cg, P, C,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the row, g = dy * w[e, channel]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    L = Cg * P
    base = rows.to(tl.int64) * L
    e = tl.load(idx_ptr + rows // G, mask=rmask, other=0).to(tl.int64)
    c0 = (rows % G) * Cg
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    s1 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, L, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (k < L)[None, :]
        off = base[:, None] + k[None, :]
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + e[:, None] * C + c0[:, None] + k[None, :] // P, mask=m, other=0.0).to(tl.float32)
        s1 += g
        s2 += tl.where(m, g * xhat, 0.0)
    c1 = tl.sum(s1, axis=1) / L
    c2 = tl.sum(s2, axis=1) / L
    for k0 in range(0, L, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        m = rmask[:, None] & (k < L)[None, :]
        off = base[:, None] + k[None, :]
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32) \
            * tl.load(w_ptr + e[:, None] * C + c0[:, None] + k[None, :] // P, mask=m, other=0.0).to(tl.float32)
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gn_dwb_kernel(dy_ptr, x_ptr, sidx_ptr, off_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr, N, G, Cg, P, C, SPLIT,
                   BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Partial dw[sp, e, c] = sum dy * xhat, db[sp, e, c] = sum dy over split sp's share of
    expert e's (sample, position) rows ([SPLIT, N, C], every entry written)."""
    e = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    sp = tl.program_id(2)
    cmask = offs_c < C
    lo = tl.load(off_ptr + e)
    hi = tl.load(off_ptr + e + 1)
    begin, end = _split_range((hi - lo) * P, sp, SPLIT, BLOCK_R)
    aw = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    ab = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for r0 in range(begin, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < end
        smp = tl.load(sidx_ptr + lo + r // P, mask=rmask, other=0).to(tl.int64)
        p = (r % P).to(tl.int64)
        m = cmask[:, None] & rmask[None, :]
        off = (smp * C * P + p)[None, :] + offs_c[:, None].to(tl.int64) * P
        srow = smp[None, :] * G + (offs_c // Cg)[:, None]
        mean = tl.load(mean_ptr + srow, mask=m, other=0.0)
        rstd = tl.load(rstd_ptr + srow, mask=m, other=0.0)
        g = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        xhat = (tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        aw += tl.where(m, g * xhat, 0.0)
        ab += g
    dst = (sp * N + e).to(tl.int64) * C + offs_c
    tl.store(dw_ptr + dst, tl.sum(aw, axis=1), mask=cmask)
    tl.store(db_ptr + dst, tl.sum(ab, axis=1), mask=cmask)


def _gn_blocks(L):
    return 16, _pow2(L, 16, 64 if _interpreting() else 256)


def gn_fwd(x3, expert_idx, G, w, b, eps):
    """x3 contiguous [S, C, P] -> y (x's dtype), mean, rstd fp32 [S * G]."""
    S, C, P = x3.shape
    R, Cg = S * G, C // G
    y = alloc((S, C, P), x3.dtype, x3.device)
    mean = alloc((R,), torch.float32, x3.device)
    rstd = alloc((R,), torch.float32, x3.device)
    if R == 0 or Cg * P == 0:
        return y, mean, rstd
    BLOCK_R, BLOCK_K = _gn_blocks(Cg * P)
    _gn_fwd_kernel[(triton.cdiv(R, BLOCK_R),)](x3, y, expert_idx, w, b, mean, rstd, R, G, Cg, P, C, float(eps),
                                               BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return y, mean, rstd


def gn_dx(dy3, x3, expert_idx, G, w, mean, rstd):
    S, C, P = x3.shape
    R, Cg = S * G, C // G
    dx = alloc((S, C, P), x3.dtype, x3.device)
    if R == 0 or Cg * P == 0:
        return dx
    BLOCK_R, BLOCK_K = _gn_blocks(Cg * P)
    _gn_dx_kernel[(triton.cdiv(R, BLOCK_R),)](dy3, x3, dx, expert_idx, w, mean, rstd, R, G, Cg, P, C,
                                              BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)
    return dx


def gn_dwb(dy3, x3, sorted_idx, offsets, G, mean, rstd, N):
    S, C, P = x3.shape
    if N == 0 or C == 0:
        z = torch.zeros((N, C), dtype=torch.float32, device=x3.device)
        return z, z.clone()
    BLOCK_C, BLOCK_R = _bn_blocks(C, P)
    cb = triton.cdiv(C, BLOCK_C)
    split = _n_split(x3.device, N * cb, S * P, N, BLOCK_R)
    dw = alloc((split, N, C), torch.float32, x3.device)
    db = alloc((split, N, C), torch.float32, x3.device)
    _gn_dwb_kernel[(N, cb, split)](dy3, x3, sorted_idx, offsets, mean, rstd, dw, db, N, G, C // G, P, C, split,
                                   BLOCK_C=BLOCK_C, BLOCK_R=BLOCK_R)
    return dw.sum(0), db.sum(0)
