"""Triton paths of the fused guided update (same math as guided_update_reference) and of the guided eps
correction (guided_eps_reference)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppap_fast.ops._kernel_util import grid_chunks


@triton.jit
def _guided_update_kernel(x_ptr, eps_ptr, es, v_ptr, vs, grad_ptr, gs, noise_ptr, ns, idx_ptr, coef_ptr, T,
                          sample_ptr, pred_ptr, inner, b0,
                          MODE: tl.constexpr, CLIP: tl.constexpr, HAS_GRAD: tl.constexpr,
                          HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    # sample b0 + axis 1 (launched in chunks: grid axis 1 holds at most 65535); b * inner and b * stride in
    # int64 (int32 wraps past 2^31 elements)
    b = b0 + tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    t = tl.load(idx_ptr + b).to(tl.int64)
    t = tl.minimum(tl.maximum(t, 0), T - 1)  # as the CUDA kernel: never read outside the table (the wrapper checks on CPU)
    row = coef_ptr + t * 8
    c0 = tl.load(row + 0)
    c1 = tl.load(row + 1)
    x = tl.load(x_ptr + b * inner + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + b * es + offs, mask=mask, other=0.0).to(tl.float32)
    pred = c0 * x - c1 * eps
    if CLIP:
        pred = tl.minimum(tl.maximum(pred, -1.0), 1.0)
    if MODE == 0:
        e = (c0 * x - pred) / c1
        if HAS_GRAD:
            g = tl.load(grad_ptr + b * gs + offs, mask=mask, other=0.0).to(tl.float32)
            e = e - tl.load(row + 2) * g
            pred = c0 * x - c1 * e
        sample = pred * tl.load(row + 3) + tl.load(row + 4) * e
        if HAS_NOISE:
            z = tl.load(noise_ptr + b * ns + offs, mask=mask, other=0.0).to(tl.float32)
            sample = sample + tl.load(row + 5) * z
    else:
        mean = tl.load(row + 2) * pred + tl.load(row + 3) * x
        if MODE == 2:
            v = tl.load(v_ptr + b * vs + offs, mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) / 2.0
            log_var = frac * tl.load(row + 4) + (1.0 - frac) * tl.load(row + 5)
        else:
            log_var = tl.zeros_like(x) + tl.load(row + 4)
        if HAS_GRAD:
            g = tl.load(grad_ptr + b * gs + offs, mask=mask, other=0.0).to(tl.float32)
            mean = mean + tl.exp(log_var) * g
        sample = mean
        if HAS_NOISE:
            z = tl.load(noise_ptr + b * ns + offs, mask=mask, other=0.0).to(tl.float32)
            sample = sample + tl.load(row + 6) * tl.exp(0.5 * log_var) * z
    tl.store(sample_ptr + b * inner + offs, sample.to(sample_ptr.dtype.element_ty), mask=mask)
    tl.store(pred_ptr + b * inner + offs, pred.to(pred_ptr.dtype.element_ty), mask=mask)


def guided_update_triton(x, eps, idx, table, v=None, grad=None, noise=None, clip_denoised=True, block: int = 1024):
    if x.dtype == torch.float64:
        raise TypeError("the Triton guided update computes in float32; use the reference or cpp path for float64")
    x = x.contiguous()
    tensors = []
    for t in (eps, v, grad, noise):
        if t is not None and t.shape[0] and not t[0].is_contiguous():
            t = t.contiguous()
        tensors.append(t)
    eps, v, grad, noise = tensors
    sample, pred = torch.empty_like(x), torch.empty_like(x)
    B = x.shape[0]
    if x.numel() == 0:
        return sample, pred
    inner = x.numel() // B

    def ptr(t):
        return (x, 0) if t is None else (t, t.stride(0))

    for b0, count in grid_chunks(B):  # one launch unless B > 65535
        _guided_update_kernel[(triton.cdiv(inner, block), count)](
            x, eps, eps.stride(0), *ptr(v), *ptr(grad), *ptr(noise), idx, table.coefs_f32, table.coefs_f32.shape[0],
            sample, pred, inner, b0,
            MODE=table.mode, CLIP=bool(clip_denoised), HAS_GRAD=grad is not None, HAS_NOISE=noise is not None,
            BLOCK=block,
        )
    return sample, pred


@triton.jit
def _guided_eps_kernel(mo_ptr, ms, grad_ptr, gs, coef_ptr, out_ptr, inner, head_len, b0, BLOCK: tl.constexpr):
    # one pass over sample b0 + axis 1 (chunked launches as above): the first head_len elements (the
    # corrected channels) become model_output - coef[b] * grad, the rest are copied
    b = b0 + tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    in_head = offs < head_len
    m = tl.load(mo_ptr + b * ms + offs, mask=mask, other=0.0)
    c = tl.load(coef_ptr + b)  # float32, or float64 for float64 model outputs: the math type
    g = tl.load(grad_ptr + b * gs + offs, mask=mask & in_head, other=0.0).to(c.dtype)
    new = (m.to(c.dtype) - c * g).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * inner + offs, tl.where(in_head, new, m), mask=mask)


def guided_eps_triton(model_output, grad, coef, channels: int, block: int = 1024):
    """model_output [B, C, ...] and grad [B, channels, ...] contiguous within a sample, coef (B,)
    contiguous in the math type (checked by ppap_fast.ops.eps_correction)."""
    out = torch.empty(model_output.shape, dtype=model_output.dtype, device=model_output.device)
    B = model_output.shape[0]
    if out.numel() == 0:
        return out
    inner = out.numel() // B
    head_len = inner // model_output.shape[1] * channels
    for b0, count in grid_chunks(B):  # one launch unless B > 65535
        _guided_eps_kernel[(triton.cdiv(inner, block), count)](
            model_output, model_output.stride(0), grad, grad.stride(0), coef, out, inner, head_len, b0, BLOCK=block)
    return out
