"""Autograd Functions of the Triton per-expert norms (fp32 statistics, sync-free).

BatchNorm, per expert e and channel c over the expert's n rows (samples x positions):

    y    = x * a + (b - mean * a),  a = w * rstd
    db   = sum dy,  dw = sum dy * xhat
    dx   = a * (dy - db / n - xhat * dw / n)     (train; eval: dx = a * dy)

Running statistics are updated inside the forward on the device (torch.where on the
per-expert counts: experts with at most one value per channel keep theirs).

LayerNorm (row-wise over D, affine of the row's expert):

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w[e]
    dw[e] = sum over e's rows of dy * xhat,  db[e] = sum dy
"""
from __future__ import annotations

import math

import torch

from .._kernel_util import first_order_only
from . import triton_kernels as tk
from ..lora.segments import saved_for_backward


def _channels_last_input(x) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _in_format(t, channels_last: bool):
    """The kernels read and write contiguous NCHW: a channels_last input's output (or dx) goes back to
    channels_last, as the reference's and torch's norms return it."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


class ExpertBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, seg, training: bool, momentum: float, eps: float):
        S, C = x.shape[:2]
        P = math.prod(x.shape[2:])
        x3 = x.contiguous().view(S, C, P)
        n = seg.counts.to(torch.float32) * P  # rows per expert
        if training:
            mean, var = tk.bn_stats(x3, seg.sorted_idx, seg.offsets, n)
            with torch.no_grad():
                has = (n > 1)[:, None]  # n == 1: no variance to estimate (nn.BatchNorm raises)
                unb = var * (n / (n - 1).clamp(min=1))[:, None]
                rm = running_mean * (1 - momentum) + momentum * mean.to(running_mean.dtype)
                rv = running_var * (1 - momentum) + momentum * unb.to(running_var.dtype)
                running_mean.copy_(torch.where(has, rm, running_mean))
                running_var.copy_(torch.where(has, rv, running_var))
        else:
            # contiguous [N, C]: the kernels index mean / rstd at e * C + c (clone() keeps a strided
            # running stat's strides, and so does rsqrt)
            mean = running_mean.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            var = running_var.detach().float()
        rstd = torch.rsqrt(var + eps).contiguous()
        w = weight.detach().float()
        a = (w * rstd).contiguous()
        shift = (bias.detach().float() - mean * a).contiguous()
        y = tk.bn_apply(x3, seg.expert_idx, a, shift, x.dtype, x.shape)
        ctx.save_for_backward(x3, mean, rstd, a, n, *saved_for_backward(seg))  # seg's: autograd's in-place check
        ctx.seg, ctx.training, ctx.cl = seg, training, _channels_last_input(x)
        ctx.meta = (x.shape, weight.dtype, bias.dtype)
        return _in_format(y, ctx.cl)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x3, mean, rstd, a, n = ctx.saved_tensors[:5]
        seg = ctx.seg
        x_shape, w_dt, b_dt = ctx.meta
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy3 = dy.to(x3.dtype).contiguous().view(x3.shape)
        dx = dw = db = None
        if need_w or need_b or (need_x and ctx.training):
            sdy, sdyx = tk.bn_bwd_reduce(dy3, x3, seg.sorted_idx, seg.offsets, mean, rstd.contiguous())
            dw = sdyx.to(w_dt) if need_w else None
            db = sdy.to(b_dt) if need_b else None
        if need_x:
            if ctx.training:
                inv_n = (1.0 / n.clamp(min=1))[:, None]
                k1, k2 = (sdy * inv_n).contiguous(), (sdyx * inv_n).contiguous()
            else:
                k1 = k2 = a
            dx = tk.bn_dx(dy3, x3, seg.expert_idx, mean, rstd, a, k1, k2, ctx.training, x3.dtype).view(x_shape)
            dx = _in_format(dx, ctx.cl)
        return dx, dw, db, None, None, None, None, None, None


def _row_norm_forward(ctx, x, xv, weight, bias, seg, k, fwd, eps):
    """Layer / group norm forward: fwd(xv, expert_idx, k, w, b, eps) -> y, mean, rstd on the
    contiguous view xv of x (k: M rows a sample, or G groups)."""
    w, b = weight.detach().contiguous(), bias.detach().contiguous()
    y, mean, rstd = fwd(xv, seg.expert_idx, k, w, b, eps, x.shape)  # y in x's shape, not a view
    ctx.save_for_backward(xv, w, mean, rstd, *saved_for_backward(seg))  # seg's: autograd's in-place check
    ctx.seg, ctx.k, ctx.cl = seg, k, _channels_last_input(x)
    ctx.meta = (x.shape, weight.dtype, bias.dtype)
    return _in_format(y, ctx.cl)


def _row_norm_backward(ctx, dy, dx_fn, dwb_fn):
    """dx, dw, db of _row_norm_forward (None where not needed) with the kernels' dx_fn, dwb_fn."""
    xv, w, mean, rstd = ctx.saved_tensors[:4]
    seg, k = ctx.seg, ctx.k
    x_shape, w_dt, b_dt = ctx.meta
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dyv = dy.to(xv.dtype).contiguous().view(xv.shape)
    dx = dw = db = None
    if need_x:
        dx = _in_format(dx_fn(dyv, xv, seg.expert_idx, k, w, mean, rstd).view(x_shape), ctx.cl)
    if need_w or need_b:
        gw, gb = dwb_fn(dyv, xv, seg.sorted_idx, seg.offsets, k, mean, rstd, w.shape[0])
        dw = gw.to(w_dt) if need_w else None
        db = gb.to(b_dt) if need_b else None
    return dx, dw, db


class ExpertLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seg, eps: float):
        M = math.prod(x.shape[1:-1])
        x2 = x.contiguous().view(math.prod(x.shape[:-1]), x.shape[-1])
        return _row_norm_forward(ctx, x, x2, weight, bias, seg, M, tk.ln_fwd, eps)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        return (*_row_norm_backward(ctx, dy, tk.ln_dx, tk.ln_dwb), None, None)


class ExpertGroupNormFn(torch.autograd.Function):
    """GroupNorm per (sample, group), then the channel affine of the sample's expert."""

    @staticmethod
    def forward(ctx, x, weight, bias, seg, num_groups: int, eps: float):
        S, C = x.shape[:2]
        x3 = x.contiguous().view(S, C, math.prod(x.shape[2:]))
        return _row_norm_forward(ctx, x, x3, weight, bias, seg, num_groups, tk.gn_fwd, eps)

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        return (*_row_norm_backward(ctx, dy, tk.gn_dx, tk.gn_dwb), None, None, None)
