"""Triton kernels of ops.norm_act (group_norm_act): a statistics pass per (sample, group) and one fused
normalise / scale-shift / SiLU pass. x is addressed by strides as [B, C, P] (P the flattened
spatial size, one stride), so NCHW and channels_last run without a copy. Grids depend on shapes
only: nothing reads values on the host (CUDA-graph capturable)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._kernel_util import _bcp_strides, grid_chunks


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _store_group_stats(shift_ptr, mean_ptr, rstd_ptr, pid, k, s1, s2, count, eps):
    """Group ``pid``'s shift k, mean of x - k and 1/std from the 2-D tiles of shifted sums s1, s2."""
    n = tl.cast(count, tl.float32)  # Cg == HW == 1 arrive as constexprs: a Python int, no .to()
    m1 = tl.sum(tl.sum(s1, axis=1), axis=0) / n
    var = tl.maximum(tl.sum(tl.sum(s2, axis=1), axis=0) / n - m1 * m1, 0.0)
    tl.store(shift_ptr + pid, k)
    tl.store(mean_ptr + pid, m1)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_stats_kernel(x_ptr, ib_ptr, shift_ptr, mean_ptr, rstd_ptr, HW, Cg, G, sxb, sxc, sxp, sib, eps,
                     HAS_IB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program b * G + g: 1/std of group g of sample b and its mean as k + m (k the group's first
    element, m the mean of x - k), fp32: one pass of sums shifted by k (exact for a constant group;
    no cancellation at a large mean, and x - k is exact where x is near k). x here is x + in_bias
    (per channel, stride sib per sample: 0 for a [C] bias)."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    base = x_ptr + b.to(tl.int64) * sxb + (g * Cg).to(tl.int64) * sxc
    k = tl.load(base).to(tl.float32)
    ib_base = ib_ptr + b.to(tl.int64) * sib + g * Cg
    if HAS_IB:
        k += tl.load(ib_base).to(tl.float32)
    s1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < Cg
        ib = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_IB:
            ib = tl.load(ib_base + cs, mask=cm, other=0.0).to(tl.float32)
        for p0 in range(0, HW, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            m = cm[:, None] & (ps < HW)[None, :]
            off = cs[:, None].to(tl.int64) * sxc + ps[None, :].to(tl.int64) * sxp
            d = tl.where(m, tl.load(base + off, mask=m, other=0.0).to(tl.float32) + ib[:, None] - k, 0.0)
            s1 += d
            s2 += d * d
    _store_group_stats(shift_ptr, mean_ptr, rstd_ptr, pid, k, s1, s2, Cg * HW, eps)


@triton.jit
def _gn_stats_cl_part_kernel(x_ptr, ib_ptr, part_ptr, C, HW, Cg, b0, sxb, sxp, sib, P_CHUNK,
                             HAS_IB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Channels-fastest x, tile (position chunk, channel block, sample): per-channel sums of d and d^2
    over P_CHUNK positions, d = x + in_bias - k with k the channel's group shift (as _gn_stats_kernel's),
    into part [B, chunks, 2, C]. Each row read is BLOCK_C contiguous channels (a program per group
    read only Cg of them: half-used sectors at ADM's 8 channels a group)."""
    pk = tl.program_id(0)
    pc = tl.program_id(1)
    b = b0 + tl.program_id(2)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    xb = x_ptr + b.to(tl.int64) * sxb
    first = (cs // Cg) * Cg
    k = tl.load(xb + first, mask=cm, other=0.0).to(tl.float32)
    ib = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_IB:
        ibb = ib_ptr + b.to(tl.int64) * sib
        ib = tl.load(ibb + cs, mask=cm, other=0.0).to(tl.float32)
        k += tl.load(ibb + first, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    p_lo = pk * P_CHUNK  # P_CHUNK is a multiple of BLOCK_P: chunks do not overlap
    for p0 in range(p_lo, p_lo + P_CHUNK, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        m = (ps < HW)[:, None] & cm[None, :]
        off = ps[:, None].to(tl.int64) * sxp + cs[None, :]
        d = tl.where(m, tl.load(xb + off, mask=m, other=0.0).to(tl.float32) + ib[None, :] - k[None, :], 0.0)
        s1 += d
        s2 += d * d
    out = part_ptr + ((b.to(tl.int64) * tl.num_programs(0) + pk) * 2) * C + cs
    tl.store(out, tl.sum(s1, axis=0), mask=cm)
    tl.store(out + C, tl.sum(s2, axis=0), mask=cm)


@triton.jit
def _gn_stats_cl_reduce_kernel(x_ptr, ib_ptr, part_ptr, shift_ptr, mean_ptr, rstd_ptr, C, HW, Cg, G, K, sxb, sib,
                               eps, HAS_IB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program b * G + g: the group's shift, mean and 1/std from the K position chunks' channel sums
    (the same shifted one-pass formula as _gn_stats_kernel)."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    k = tl.load(x_ptr + b.to(tl.int64) * sxb + g * Cg).to(tl.float32)
    if HAS_IB:
        k += tl.load(ib_ptr + b.to(tl.int64) * sib + g * Cg).to(tl.float32)
    s1 = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
    base = part_ptr + b.to(tl.int64) * K * 2 * C + g * Cg
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        for c0 in range(0, Cg, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            m = (ks < K)[:, None] & (cs < Cg)[None, :]
            off = ks[:, None].to(tl.int64) * 2 * C + cs[None, :]
            s1 += tl.load(base + off, mask=m, other=0.0)
            s2 += tl.load(base + off + C, mask=m, other=0.0)
    _store_group_stats(shift_ptr, mean_ptr, rstd_ptr, pid, k, s1, s2, Cg * HW, eps)


@triton.jit
def _gn_stats_from_sums_kernel(part_ptr, kshift_ptr, shift_ptr, mean_ptr, rstd_ptr, C, HW, Cg, G, K, eps,
                               BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program b * G + g: the group's shift (its first channel's), mean and 1/std from a producer's per-channel
    shifted sums (ops.channel_sums: part [B, K, 2, C], channel shifts [B, C]); each channel's sums moved to the
    group's shift exactly: sum(x - kg) = s1 + P d, sum((x - kg)^2) = s2 + 2 d s1 + P d^2, d = k_c - kg."""
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    ks_base = kshift_ptr + b.to(tl.int64) * C + g * Cg
    kg = tl.load(ks_base)
    n = tl.cast(HW, tl.float32)
    t1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    t2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = part_ptr + b.to(tl.int64) * K * 2 * C + g * Cg
    for c0 in range(0, Cg, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < Cg
        s1 = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_K, BLOCK_C], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            m = (ks < K)[:, None] & cm[None, :]
            off = ks[:, None].to(tl.int64) * 2 * C + cs[None, :]
            s1 += tl.load(base + off, mask=m, other=0.0)
            s2 += tl.load(base + off + C, mask=m, other=0.0)
        c1 = tl.sum(s1, axis=0)
        c2 = tl.sum(s2, axis=0)
        d = tl.where(cm, tl.load(ks_base + cs, mask=cm, other=0.0) - kg, 0.0)
        t1 += c1 + n * d
        t2 += c2 + 2.0 * d * c1 + n * d * d
    _store_group_stats(shift_ptr, mean_ptr, rstd_ptr, pid, kg, t1[None, :], t2[None, :], Cg * HW, eps)


# GroupNorm statistics of a channels-fastest x: "split" (coalesced per-channel partial sums over
# position chunks, then one small reduction) or "group" (one program per group, as for NCHW)
GN_STATS_CL = os.environ.get("PPAP_FAST_GN_STATS", "split")
_STATS_TARGET_PROGRAMS = 2048  # position chunks sized for about this many programs (a few per SM)


def _cl_stats_split(x, ib, shift0, mean, rstd, B, C, HW, G, st, sib, eps, poison):
    """shift0 / mean / rstd of a channels-fastest x through the split kernels."""
    Cg = C // G
    bc = max(4, min(64, triton.next_power_of_2(C)))
    bp = 16 if _interpreting() else 32
    ncb = triton.cdiv(C, bc)
    max_chunks = triton.cdiv(HW, bp)
    chunks = max(1, min(max_chunks, triton.cdiv(_STATS_TARGET_PROGRAMS, B * ncb)))
    p_chunk = triton.cdiv(triton.cdiv(HW, chunks), bp) * bp
    chunks = triton.cdiv(HW, p_chunk)
    part = torch.empty(B, chunks, 2, C, dtype=torch.float32, device=x.device)
    if poison:
        part.fill_(float("nan"))
    for b0, count in grid_chunks(B):
        _gn_stats_cl_part_kernel[(chunks, ncb, count)](x, ib if ib is not None else part, part, C, HW, Cg, b0,
                                                       st[0], st[2], sib, p_chunk, HAS_IB=ib is not None,
                                                       BLOCK_C=bc, BLOCK_P=bp)
    _gn_stats_cl_reduce_kernel[(B * G,)](x, ib if ib is not None else part, part, shift0, mean, rstd, C, HW, Cg, G,
                                         chunks, st[0], sib, eps, HAS_IB=ib is not None,
                                         BLOCK_K=min(64, triton.next_power_of_2(chunks)),
                                         BLOCK_C=max(2, min(32, triton.next_power_of_2(Cg))))


@triton.jit
def _channel_coefs(shift_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, grp, cs, cm, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """Per channel cs (group grp): the group's shift k and mean, a = rstd * weight and d = bias, so that
    gn(x) = ((x - k) - mean) * a + d (the mean subtracted first: no cancellation at a large mean)."""
    k = tl.load(shift_ptr + grp, mask=cm, other=0.0)
    mean = tl.load(mean_ptr + grp, mask=cm, other=0.0)
    a = tl.load(rstd_ptr + grp, mask=cm, other=0.0)
    if HAS_W:
        a = a * tl.load(w_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    d = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_B:
        d += tl.load(b_ptr + cs, mask=cm, other=0.0).to(tl.float32)
    return k, mean, a, d


@triton.jit
def _gn_apply_kernel(x_ptr, y_ptr, shift_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, ib_ptr, C, HW, Cg, G, b0,
                     sxb, sxc, sxp, syb, syc, syp, ssb, shb, sib,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     HAS_IB: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Tile (positions, channels, sample): y = act((x - mean) * a[c] + d[c]) with the per-(sample,
    channel) coefficients folded from 1/std, the affine and the scale / shift (the mean is subtracted
    first: no cancellation at a large mean)."""
    pp = tl.program_id(0)
    pc = tl.program_id(1)
    b = b0 + tl.program_id(2)  # samples in chunks of <= 65535 (CUDA's cap on grid axis 2)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    ps = pp * BLOCK_P + tl.arange(0, BLOCK_P)
    cm = cs < C
    m = cm[:, None] & (ps < HW)[None, :]
    k, mean, a, d = _channel_coefs(shift_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, b * G + cs // Cg, cs, cm, HAS_W, HAS_B,
                                   BLOCK_C)
    if HAS_IB:  # x + in_bias - k: fold the bias into the shift
        k -= tl.load(ib_ptr + b.to(tl.int64) * sib + cs, mask=cm, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = 1.0 + tl.load(sc_ptr + b.to(tl.int64) * ssb + cs, mask=cm, other=0.0).to(tl.float32)
        a = a * s
        d = d * s
    if HAS_SHIFT:
        d += tl.load(sh_ptr + b.to(tl.int64) * shb + cs, mask=cm, other=0.0).to(tl.float32)
    xo = b.to(tl.int64) * sxb + cs[:, None].to(tl.int64) * sxc + ps[None, :].to(tl.int64) * sxp
    h = ((tl.load(x_ptr + xo, mask=m, other=0.0).to(tl.float32) - k[:, None]) - mean[:, None]) * a[:, None] \
        + d[:, None]
    if SILU:
        h = h * tl.sigmoid(h)
    yo = b.to(tl.int64) * syb + cs[:, None].to(tl.int64) * syc + ps[None, :].to(tl.int64) * syp
    tl.store(y_ptr + yo, h.to(y_ptr.dtype.element_ty), mask=m)


def _bcp_view(t: torch.Tensor):
    """(t, its [B, C, P] strides); t copied contiguous where its spatial dims do not flatten."""
    st = _bcp_strides(t)
    if st is None:
        t = t.contiguous()
        st = _bcp_strides(t)
    return t, st


def _bcp_empty(like: torch.Tensor, dtype: torch.dtype, poison: bool):
    """(an output in ``like``'s layout, its [B, C, P] strides); NaN-filled with ``poison``."""
    y = torch.empty_like(like, dtype=dtype)
    if _bcp_strides(y) is None:
        y = torch.empty(like.shape, dtype=dtype, device=like.device)
    if poison:
        y.fill_(float("nan"))
    return y, _bcp_strides(y)


def _blocks(channels: int, HW: int, channels_fastest: bool):
    """(BLOCK_C, BLOCK_P): channel tiles as small as a group (ADM: 8 channels), position tiles up to
    256 (64 under the interpreter)."""
    hi_p = 64 if _interpreting() else 256
    bc = max(4, min(32 if channels_fastest else 16, triton.next_power_of_2(channels)))
    bp = max(16, min(hi_p, triton.next_power_of_2(max(HW, 1))))
    return bc, bp


# tiles of the channels-fastest elementwise passes (GroupNorm apply, ops.residual): "rows" (whole runs of
# up to 256 contiguous channels by fewer positions, as ops.resample's) or "narrow" (32 channels by 256
# positions: 64-byte runs of each pixel, the tiles before)
CL_TILE = os.environ.get("PPAP_FAST_CL_TILE", "rows")


def _elementwise_blocks(channels: int, HW: int, channels_fastest: bool):
    """(BLOCK_C, BLOCK_P) of the apply / residual passes: channels-fastest x in CL_TILE's tiles of 8192
    elements (the interpreter's: at most 64 channels by 32 positions, so small tests reach several channel
    blocks), else _blocks'."""
    if CL_TILE not in ("rows", "narrow"):
        raise ValueError(f"PPAP_FAST_CL_TILE must be 'rows' or 'narrow', got {CL_TILE!r}")
    if not channels_fastest or CL_TILE == "narrow":
        return _blocks(channels, HW, channels_fastest)
    bc = max(4, min(64 if _interpreting() else 256, triton.next_power_of_2(channels)))
    return bc, max(16, min((2048 if _interpreting() else 8192) // bc, triton.next_power_of_2(max(HW, 1))))


def group_stats(x, st, G, eps, ib=None, sib=0, channel_sums=None, poison=False):
    """(shift, mean, rstd), float32 [B * G]: the statistics of each (sample, group) of x + ib (x viewed as
    [B, C, P] by strides ``st``), from ``channel_sums`` where given (complete for x: no pass over x)."""
    B, C = x.shape[:2]
    HW = x.numel() // max(B * C, 1)
    Cg = C // G
    shift0, mean, rstd = (torch.empty(B * G, dtype=torch.float32, device=x.device) for _ in range(3))
    cl = st[1] == 1 and C > 1  # channels fastest (channels_last)
    if GN_STATS_CL not in ("split", "group"):
        raise ValueError(f"PPAP_FAST_GN_STATS must be 'split' or 'group', got {GN_STATS_CL!r}")
    if channel_sums is not None:
        K = channel_sums.chunks
        _gn_stats_from_sums_kernel[(B * G,)](channel_sums.part, channel_sums.shift, shift0, mean, rstd, C, HW, Cg, G,
                                             K, eps, BLOCK_K=min(64, triton.next_power_of_2(K)),
                                             BLOCK_C=max(2, min(32, triton.next_power_of_2(Cg))))
    elif cl and GN_STATS_CL == "split":
        _cl_stats_split(x, ib, shift0, mean, rstd, B, C, HW, G, st, sib, eps, poison)
    else:
        bc, bp = _blocks(Cg, HW, cl)
        _gn_stats_kernel[(B * G,)](x, ib if ib is not None else mean, shift0, mean, rstd, HW, Cg, G, *st, sib, eps,
                                   HAS_IB=ib is not None, BLOCK_C=bc, BLOCK_P=bp)
    return shift0, mean, rstd


def group_norm_act(x, G, weight, bias, eps, scale, shift, silu, in_bias=None, poison=False, out_dtype=None,
                   channel_sums=None):
    B, C = x.shape[:2]
    HW = x.numel() // max(B * C, 1)
    x, st = _bcp_view(x)
    y, sy = _bcp_empty(x, out_dtype or x.dtype, poison)  # x's memory format
    if x.numel() == 0:
        return y
    Cg = C // G
    cl = st[1] == 1 and C > 1  # channels fastest (channels_last)
    ib = in_bias if in_bias is None or in_bias.stride(-1) == 1 else in_bias.contiguous()
    sib = 0 if ib is None or ib.shape[0] == 1 else ib.stride(0)
    shift0, mean, rstd = group_stats(x, st, G, eps, ib, sib, channel_sums, poison)
    bc, bp = _elementwise_blocks(C, HW, cl)
    w = weight.contiguous() if weight is not None else mean
    bb = bias.contiguous() if bias is not None else mean
    sc = scale if scale is None or scale.stride(1) == 1 else scale.contiguous()
    sh = shift if shift is None or shift.stride(1) == 1 else shift.contiguous()
    for b0, count in grid_chunks(B):  # one launch unless B > 65535
        _gn_apply_kernel[(triton.cdiv(HW, bp), triton.cdiv(C, bc), count)](
            x, y, shift0, mean, rstd, w, bb, sc if sc is not None else mean, sh if sh is not None else mean,
            ib if ib is not None else mean, C, HW, Cg, G, b0, *st, *sy,
            sc.stride(0) if sc is not None else 0, sh.stride(0) if sh is not None else 0, sib,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, HAS_IB=ib is not None, SILU=bool(silu), BLOCK_C=bc, BLOCK_P=bp)
    return y
