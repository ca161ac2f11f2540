"""ops.out_head: GroupNorm + SiLU + 3x3 conv (stride 1, zero padding 1) to a few channels, forward only:
a diffusion UNet's output head (ADM: norm, SiLU, conv to 3 or 6 channels) on its half-precision torso.

    y = conv3x3(silu(gn(x)) rounded to x's dtype, weight, bias), written in ``out_dtype``

The reference is the unfused head of ``ADMUNet.fuse_norm_act(half_out_conv=True)``: the fused norm
written in x's dtype, then the conv in that dtype (F.conv2d), cast to out_dtype. The Triton path
(ops/out_head_triton.py) never writes the normalised activation: one pass projects each pixel onto the
9 taps' weights, a second sums the neighbours' taps (float32 accumulation throughout, no rounding of
the conv's result to x's dtype: it differs from the reference by that rounding).

Backends (registry op "group_norm_silu_conv3x3"; set_backend / backend= / last_backend as for every op):
"triton" (CUDA fp16 / bf16, at most MAX_OUT_CHANNELS outputs; on CPU only when asked for, under
TRITON_INTERPRET=1) and "reference" (PyTorch, differentiable; the automatic choice elsewhere).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext, _registry
from ._kernel_util import autocast_off, on_device
from .norm_act import group_norm_act_reference

OP = "group_norm_silu_conv3x3"
FAST_DTYPES = (torch.float16, torch.bfloat16)
MAX_OUT_CHANNELS = 14  # 9 taps x 14 = 126 columns: one 128-wide tile of the projection
POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def group_norm_silu_conv3x3_reference(x, num_groups, norm_weight, norm_bias, eps, conv_weight, conv_bias=None,
                                      out_dtype=None):
    """Pure-PyTorch group_norm_silu_conv3x3, differentiable (num_groups, norm_weight, norm_bias, eps,
    conv_weight, conv_bias and out_dtype as there): the norm in x's dtype, then the conv in that dtype."""
    h = group_norm_act_reference(x, num_groups, norm_weight, norm_bias, eps)
    b = None if conv_bias is None else conv_bias.to(h.dtype)
    return F.conv2d(h, conv_weight.to(h.dtype), b, 1, 1).to(out_dtype or x.dtype)


def _check(x, num_groups, norm_weight, norm_bias, conv_weight, conv_bias):
    name = "group_norm_silu_conv3x3"
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C == 0:
        raise ValueError(f"{name}: x has no channels (shape {tuple(x.shape)})")
    if x.shape[2] == 0 or x.shape[3] == 0:  # the backends disagreed (the conv raised, Triton crashed at W = 0)
        raise ValueError(f"{name}: x has no pixels (shape {tuple(x.shape)})")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"{name}: num_groups={num_groups!r} must be a positive divisor of C={C}")
    for label, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"{name}: {label} must be [{C}], got {tuple(t.shape)}")
    if conv_weight.dim() != 4 or conv_weight.shape[1:] != (C, 3, 3):
        raise ValueError(f"{name}: conv_weight must be [C_out, {C}, 3, 3], got {tuple(conv_weight.shape)}")
    if conv_bias is not None and tuple(conv_bias.shape) != (conv_weight.shape[0],):
        raise ValueError(f"{name}: conv_bias must be [{conv_weight.shape[0]}], got {tuple(conv_bias.shape)}")


def group_norm_silu_conv3x3(x, num_groups: int, norm_weight=None, norm_bias=None, eps: float = 1e-5, *,
                            conv_weight, conv_bias=None, out_dtype: torch.dtype | None = None,
                            backend: str | None = None):
    """GroupNorm + SiLU + 3x3 conv (padding 1) to at most MAX_OUT_CHANNELS channels on the fast path
    (module docstring); y in x's memory format, ``out_dtype`` (default x's dtype).

    x [B, C, H, W] in num_groups groups; norm_weight, norm_bias: the norm's [C] affine or None; eps: the
    variance's epsilon; conv_weight [C_out, C, 3, 3], conv_bias [C_out] or None; backend: None / "auto"
    (automatic), "triton" or "reference"."""
    _check(x, num_groups, norm_weight, norm_bias, conv_weight, conv_bias)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"group_norm_silu_conv3x3: out_dtype must be a floating-point torch.dtype or None, "
                         f"got {out_dtype!r}")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, norm_weight, norm_bias, conv_weight, conv_bias))
    why = "is forward-only (an input requires grad)" if needs_grad else None
    if x.dtype not in FAST_DTYPES:
        why = f"takes fp16/bf16 x (a half torso's head), got {x.dtype}"
    if conv_weight.shape[0] > MAX_OUT_CHANNELS:
        why = f"takes at most {MAX_OUT_CHANNELS} output channels, got {conv_weight.shape[0]}"
    if out_dtype is not None and out_dtype not in (torch.float32, *FAST_DTYPES):
        why = f"writes fp32/fp16/bf16, got out_dtype {out_dtype}"
    fn = _registry.select_gated(OP, x, backend, FAST_DTYPES, why)
    return fn(x, num_groups, norm_weight, norm_bias, float(eps), conv_weight, conv_bias, out_dtype or x.dtype)


def _triton(x, num_groups, norm_weight, norm_bias, eps, conv_weight, conv_bias, out_dtype):
    from . import out_head_triton as tk

    with autocast_off(x.device.type), on_device(x):
        return tk.group_norm_silu_conv3x3(x, num_groups, norm_weight, norm_bias, eps, conv_weight, conv_bias,
                                          out_dtype, poison=POISON)


_registry.register(OP, "reference", group_norm_silu_conv3x3_reference, _ext.reference_unavailable)
_registry.register(OP, "triton", _triton, _ext.triton_unavailable)

__all__ = ["group_norm_silu_conv3x3", "group_norm_silu_conv3x3_reference", "OP", "FAST_DTYPES", "MAX_OUT_CHANNELS"]
