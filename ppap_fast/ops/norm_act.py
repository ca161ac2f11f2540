"""ops.norm_act: fused GroupNorm (+ per-sample scale/shift) + SiLU, forward only: the
norm-activation pairs of a diffusion UNet (ADM's ResBlock in_layers and its scale-shift
out_layers), for sampling.

    y = act((gn(x + in_bias) * weight[c] + bias[c]) * (1 + scale[b, c]) + shift[b, c])

in_bias ([C] or [B, C], optional) is added to x before the statistics: the bias of the conv that
produced x (run without it) and, without scale-shift, ADM's timestep embedding, so that neither
costs a pass of its own.

gn: statistics per (sample, group) in float32 whatever x's dtype (as ADM's GroupNorm32), act
SiLU or identity, y in x's memory format (NCHW or channels_last) and dtype, or ``out_dtype``: a
float32 result of a half x equals upcasting x first (the upcast is exact), without the upcast's pass
(ADM's output head: the fp16 torso's last activation into the float32 out norm). Unfused, an fp16
ADM runs this as upcast, GroupNorm, downcast, scale-shift, SiLU: ~28 bytes of memory traffic per
element; the Triton path reads x twice and writes y once (6 bytes in fp16).

Backends (registry op "group_norm_act"; set_backend / backend= / last_backend as for every op):
"triton" (CUDA; on CPU only when asked for, under TRITON_INTERPRET=1) and "reference" (PyTorch,
differentiable). The Triton path has no backward: with autograd recording and an input that
requires grad the reference runs (an explicit backend="triton" then raises).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _ext, _registry
from ._kernel_util import autocast_off, on_device

OP = "group_norm_act"
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def group_norm_act_reference(x, num_groups, weight=None, bias=None, eps=1e-5, scale=None, shift=None,
                             silu=True, in_bias=None, out_dtype=None, channel_sums=None):
    """Pure-PyTorch group_norm_act, differentiable: x, num_groups, weight, bias, eps, scale, shift, silu,
    in_bias, out_dtype and channel_sums as there."""
    dt = torch.promote_types(x.dtype, torch.float32)
    shp = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    xx = x.to(dt)
    if in_bias is not None:
        xx = xx + in_bias.to(dt).reshape((-1, x.shape[1]) + (1,) * (x.dim() - 2))
    if xx.numel() == 0:  # F.group_norm refuses H*W = 0 or C = 0; the Triton path returns an empty y
        h = _affine(xx, weight, bias, dt)
    elif channel_sums is None:
        h = F.group_norm(xx, num_groups, None if weight is None else weight.to(dt),
                         None if bias is None else bias.to(dt), eps)
    else:
        h = _normalize_from_sums(xx, num_groups, weight, bias, eps, channel_sums, dt)
    if scale is not None:
        h = h * (1 + scale.to(dt).reshape(shp))
    if shift is not None:
        h = h + shift.to(dt).reshape(shp)
    if silu:
        h = F.silu(h)
    return h.to(out_dtype or x.dtype)


def _normalize_from_sums(x, num_groups, weight, bias, eps, channel_sums, dt):
    """F.group_norm's result with the group statistics from channel_sums (ops.channel_sums)."""
    from .channel_sums import group_stats_reference

    B, C = x.shape[:2]
    kg, m1, var = group_stats_reference(channel_sums, num_groups, math.prod(x.shape[2:]))
    per_channel = (B, C) + (1,) * (x.dim() - 2)  # elementwise from here: x's memory format kept

    def expand(v):
        return v.to(dt).repeat_interleave(C // num_groups, dim=1).reshape(per_channel)

    h = ((x - expand(kg)) - expand(m1)) * expand(torch.rsqrt(var + eps))
    return _affine(h, weight, bias, dt)


def _affine(h, weight, bias, dt):
    shp = (1, h.shape[1]) + (1,) * (h.dim() - 2)
    if weight is not None:
        h = h * weight.to(dt).reshape(shp)
    if bias is not None:
        h = h + bias.to(dt).reshape(shp)
    return h


def _check(x, num_groups, weight, bias, scale, shift, in_bias=None):
    if x.dim() < 2:
        raise ValueError(f"group_norm_act: x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_act: num_groups={num_groups!r} must be a positive divisor of C={C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"group_norm_act: {name} must be [{C}], got {tuple(t.shape)}")
    out = []
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            if t.numel() != B * C or t.shape[:2] != (B, C):
                raise ValueError(f"group_norm_act: {name} must be [B, C] (or [B, C, 1, ...]) = [{B}, {C}], "
                                 f"got {tuple(t.shape)}")
            t = t.reshape(B, C)
        out.append(t)
    if in_bias is not None:
        if tuple(in_bias.shape) not in ((C,), (B, C)):
            raise ValueError(f"group_norm_act: in_bias must be [C] = [{C}] or [B, C] = [{B}, {C}], "
                             f"got {tuple(in_bias.shape)}")
        in_bias = in_bias.reshape(-1, C)
    return out + [in_bias]


def group_norm_act(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5, *, scale=None, shift=None,
                   silu: bool = True, in_bias=None, out_dtype: torch.dtype | None = None, channel_sums=None,
                   backend: str | None = None):
    """Fused GroupNorm + optional per-sample scale/shift + SiLU (module docstring):
    act((gn(x + in_bias) * weight + bias) * (1 + scale) + shift).

    x [B, C, *spatial] in num_groups groups; weight, bias: [C] or None; eps: the variance's epsilon;
    scale, shift: [B, C] or None; silu: False for no activation; in_bias: [C] or [B, C] or None;
    out_dtype: y's dtype (None: x's); channel_sums: a ChannelSums of x whose sums replace the
    statistics pass (no in_bias with it); backend: None / "auto" (automatic), "triton" or "reference"."""
    scale, shift, in_bias = _check(x, num_groups, weight, bias, scale, shift, in_bias)
    if channel_sums is not None:
        from .channel_sums import ChannelSums

        if not isinstance(channel_sums, ChannelSums):
            raise TypeError(f"group_norm_act: channel_sums must be a ChannelSums, got {type(channel_sums).__name__}")
        if in_bias is not None:
            raise ValueError("group_norm_act: channel_sums are x's own sums: no in_bias with them")
        if not channel_sums.complete_for(x):
            raise ValueError("group_norm_act: channel_sums do not describe x (another tensor, channels not all "
                             "written, or x modified since)")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"group_norm_act: out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, scale, shift, in_bias))
    if channel_sums is not None and x.requires_grad and torch.is_grad_enabled():
        raise ValueError("group_norm_act: channel_sums are constants to autograd: not with an x that requires grad")
    why = "is forward-only (an input requires grad)" if needs_grad else None
    if out_dtype is not None and out_dtype not in FAST_DTYPES:
        why = f"writes fp32/fp16/bf16, got out_dtype {out_dtype}"
    fn = _registry.select_gated(OP, x, backend, FAST_DTYPES, why)
    return fn(x, num_groups, weight, bias, float(eps), scale, shift, bool(silu), in_bias, out_dtype or x.dtype,
              channel_sums)


def _triton(x, num_groups, weight, bias, eps, scale, shift, silu, in_bias, out_dtype, channel_sums=None):
    from . import norm_act_triton as tk

    with autocast_off(x.device.type), on_device(x):  # Triton launches on the current device
        return tk.group_norm_act(x, num_groups, weight, bias, eps, scale, shift, silu, in_bias, poison=POISON,
                                 out_dtype=out_dtype, channel_sums=channel_sums)


def _reference(x, num_groups, weight, bias, eps, scale, shift, silu, in_bias, out_dtype, channel_sums=None):
    return group_norm_act_reference(x, num_groups, weight, bias, eps, scale, shift, silu, in_bias, out_dtype,
                                    channel_sums)


_registry.register(OP, "reference", _reference, _ext.reference_unavailable)
_registry.register(OP, "triton", _triton, _ext.triton_unavailable)

__all__ = ["group_norm_act", "group_norm_act_reference", "OP", "FAST_DTYPES"]
