"""ops.residual: y = h + skip + bias[c] in one pass, forward only: a UNet block's output conv
(run without its bias) joined to the residual stream. Unfused that is two passes (PyTorch adds a
conv's bias with a kernel of its own, then the residual add): on an H100 the bias adds alone were
16% of an ADM-256 forward with the fused norms (138 calls, 40 ms of 248).

Sums in float32, y in h's dtype and in skip's layout (the residual stream's: NCHW, channels_last,
or a [B, C, HW] view of channels_last); skip in h's shape (any float dtype and strides); bias [C]
or None.

``channel_sums`` (an ops.channel_sums.ChannelSums whose target is ``out`` or holds it as a channel slice):
the per-channel sums of the written y go there too, for the GroupNorm that reads y next
(group_norm_act(channel_sums=)): its statistics pass is skipped.

Backends (registry op "bias_residual_add"): "triton" (CUDA; on CPU only when asked for, under
TRITON_INTERPRET=1) and "reference" (PyTorch, differentiable). With autograd recording and an input
that requires grad the reference runs (an explicit backend="triton" then raises).
"""
from __future__ import annotations

import torch

from . import _ext, _registry
from ._kernel_util import autocast_off, on_device

OP = "bias_residual_add"
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def bias_residual_add_reference(h, skip, bias=None):
    """Pure-PyTorch h + skip + bias[c] (bias None: none), summed in float32, in h's dtype."""
    dt = torch.promote_types(h.dtype, torch.float32)
    y = skip.to(dt) + h.to(dt)
    if bias is not None:
        y = y + bias.to(dt).reshape((1, -1) + (1,) * (h.dim() - 2))
    return y.to(h.dtype)


def _check(h, skip, bias):
    if h.dim() < 2:
        raise ValueError(f"bias_residual_add: h must be [B, C, *spatial], got shape {tuple(h.shape)}")
    if tuple(skip.shape) != tuple(h.shape):
        raise ValueError(f"bias_residual_add: skip must have h's shape {tuple(h.shape)}, got {tuple(skip.shape)}")
    if skip.device != h.device:
        raise ValueError(f"bias_residual_add: skip is on {skip.device}, h on {h.device}")
    if bias is not None and tuple(bias.shape) != (h.shape[1],):
        raise ValueError(f"bias_residual_add: bias must be [C] = [{h.shape[1]}], got {tuple(bias.shape)}")


def _check_out(out, h):
    from ._kernel_util import _bcp_strides  # no triton import: the reference takes out= too

    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(h.shape) or out.dtype != h.dtype \
            or out.device != h.device:
        raise ValueError(f"bias_residual_add: out must be a {h.dtype} tensor of h's shape {tuple(h.shape)} on "
                         f"{h.device}, got {getattr(out, 'dtype', type(out).__name__)} {tuple(getattr(out, 'shape', ()))}")
    if _bcp_strides(out) is None:
        raise ValueError("bias_residual_add: out's spatial dims must flatten to one stride (e.g. a channel slice "
                         "of a channels_last tensor)")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("bias_residual_add: out must not require grad")


def bias_residual_add(h, skip, bias=None, *, out=None, channel_sums=None, backend: str | None = None):
    """h + skip + bias[c] (module docstring); ``out``: written there (e.g. a channel slice of a concatenation
    buffer) and returned; ``channel_sums``: the sums of what was written added there (needs ``out``);
    backend: None / "auto" (automatic), "triton" or "reference"."""
    _check(h, skip, bias)
    if out is not None:
        _check_out(out, h)
    if channel_sums is not None:
        from .channel_sums import check_producer

        check_producer("bias_residual_add", channel_sums, out)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, skip, bias))
    fn = _registry.select_gated(OP, h, backend, FAST_DTYPES,
                                "is forward-only (an input requires grad)" if needs_grad else None)
    return fn(h, skip, bias, out, channel_sums)


def _reference(h, skip, bias, out=None, channel_sums=None):
    y = bias_residual_add_reference(h, skip, bias)
    if out is None:
        return y
    out.copy_(y)
    if channel_sums is not None:
        from .channel_sums import fill_reference

        c_off = channel_sums.offset_of(out)
        fill_reference(channel_sums, out, c_off)
        channel_sums.mark_written(c_off, c_off + out.shape[1], out)
    return out


def _triton(h, skip, bias, out=None, channel_sums=None):
    from . import residual_triton as tk

    if out is not None:  # an in-place write, as copy_'s (ChannelSums check versions)
        torch.autograd.graph.increment_version(out)
    with autocast_off(h.device.type), on_device(h):  # Triton launches on the current device
        return tk.bias_residual_add(h, skip, bias, poison=POISON, out=out, channel_sums=channel_sums)


_registry.register(OP, "reference", _reference, _ext.reference_unavailable)
_registry.register(OP, "triton", _triton, _ext.triton_unavailable)

__all__ = ["bias_residual_add", "bias_residual_add_reference", "OP", "FAST_DTYPES"]
