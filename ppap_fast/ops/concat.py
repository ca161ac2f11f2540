"""ops.concat: ``cat_channels``, the concatenation of 4-D [B, C_i, H, W] tensors along the channels
(what ``torch.cat(tensors, dim=1)`` does), forward only: ADM's decoder joins each level's input with
its skip this way.

On an H100 PyTorch's channels_last concatenation (CatArrayBatchedCopy) took ~3-4x the time its bytes
need (ADM-256 at batch 32: 21 ms for the 18 skip concatenations of one guided step). The Triton path
copies, per input, blocks of pixels by blocks of contiguous channels into that input's channel offset
of the output: a copy, so torch.cat's result bit for bit.

``channel_sums`` (an ops.channel_sums.ChannelSums whose target is ``out`` or holds it as a channel slice):
the per-channel sums of the copied channels go there too, for the GroupNorm that reads out next
(group_norm_act(channel_sums=)).

Backends (registry op "cat_channels"): "triton" (CUDA; on CPU only when asked for, under
TRITON_INTERPRET=1) and "reference" (torch.cat, differentiable). The Triton path takes channels_last-
contiguous tensors of one fp32 / fp16 / bf16 dtype on one device and writes a channels_last output;
anything else (NCHW, mixed dtypes, which torch.cat promotes), and inputs that require grad under
autograd, run the reference (an explicit backend="triton" then raises, saying why). Tensors that do
not share B, H and W raise a ValueError on every backend.
"""
from __future__ import annotations

import torch

from . import _ext, _registry
from ._kernel_util import on_device

OP = "cat_channels"
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_X = 2**31 - 1  # CUDA's cap on grid axis 0 (the kernel's pixel blocks)
POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def cat_channels_reference(tensors):
    """torch.cat of tensors along the channels (dim 1)."""
    return torch.cat(list(tensors), dim=1)


def _check(tensors) -> list:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"cat_channels: tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat_channels: needs at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cat_channels: tensors[{i}] must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"cat_channels: tensors[{i}] must be [B, C, H, W], got shape {tuple(t.shape)}")
    bhw = {(t.shape[0], t.shape[2], t.shape[3]) for t in tensors}
    if len(bhw) > 1:
        raise ValueError("cat_channels: tensors must share B, H and W, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    return tensors


def _not_fast(tensors) -> str | None:
    """Why the Triton kernel cannot take these tensors (None when it can)."""
    first = tensors[0]
    if any(t.dtype != first.dtype for t in tensors):
        return f"takes tensors of one dtype, got {[str(t.dtype) for t in tensors]}"
    if any(t.device != first.device for t in tensors):
        return f"takes tensors on one device, got {[str(t.device) for t in tensors]}"
    if not all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return "takes channels_last-contiguous tensors (and out) only"
    pixels = first.shape[0] * first.shape[2] * first.shape[3]
    if pixels > MAX_GRID_X:  # pixel blocks on grid axis 0: at most one block per pixel
        return f"takes at most {MAX_GRID_X} pixels per launch, got {pixels}"
    return None


def _check_out(tensors, out, c_off):
    first = tensors[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or (out.shape[0], out.shape[2], out.shape[3]) != \
            (first.shape[0], first.shape[2], first.shape[3]):
        raise ValueError(f"cat_channels: out must be [B, C, H, W] with the tensors' B, H, W, got "
                         f"{tuple(getattr(out, 'shape', ()))}")
    c_total = sum(t.shape[1] for t in tensors)
    if isinstance(c_off, bool) or not isinstance(c_off, int) or c_off < 0 or c_off + c_total > out.shape[1]:
        raise ValueError(f"cat_channels: c_off={c_off!r} + {c_total} channels must fit out's {out.shape[1]}")
    if out.requires_grad and torch.is_grad_enabled():
        raise ValueError("cat_channels: out must not require grad")


def cat_channels(tensors, *, out=None, c_off: int = 0, channel_sums=None, backend: str | None = None):
    """tensors [B, C_1, H, W], ..., [B, C_n, H, W] -> [B, C_1 + ... + C_n, H, W] (module docstring); with ``out``:
    written into its channels c_off.. (the rest of out untouched) and out returned; ``channel_sums``: the
    sums of the copied channels added there (needs ``out``); backend: None / "auto" (automatic), "triton" or
    "reference"."""
    tensors = _check(tensors)
    if out is not None:
        _check_out(tensors, out, c_off)
    if channel_sums is not None:
        from .channel_sums import check_producer

        check_producer("cat_channels", channel_sums, out)
    layout = _not_fast(tensors if out is None else tensors + [out])
    if layout is not None and backend in (None, "auto"):
        return _registry.select(OP, tensors[0].device, "reference")(tensors, out, c_off, channel_sums)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fn = _registry.select_gated(OP, tensors[0], backend, FAST_DTYPES,
                                layout or ("is forward-only (an input requires grad)" if needs_grad else None))
    return fn(tensors, out, c_off, channel_sums)


def _reference(tensors, out=None, c_off=0, channel_sums=None):
    y = cat_channels_reference(tensors)
    if out is None:
        return y
    out[:, c_off:c_off + y.shape[1]].copy_(y)
    if channel_sums is not None:
        from .channel_sums import fill_reference

        s_off = channel_sums.offset_of(out) + c_off
        fill_reference(channel_sums, out[:, c_off:c_off + y.shape[1]], s_off)  # the stored values
        channel_sums.mark_written(s_off, s_off + y.shape[1], out)
    return out


def _triton_cat(tensors, out=None, c_off=0, channel_sums=None):
    from . import concat_triton as tk

    if out is not None:  # an in-place write, as copy_'s (ChannelSums check versions)
        torch.autograd.graph.increment_version(out)
    with on_device(tensors[0]):  # Triton launches on the current device
        return tk.cat_channels(tensors, poison=POISON, out=out, c_off=c_off, channel_sums=channel_sums)


_registry.register(OP, "reference", _reference, _ext.reference_unavailable)
_registry.register(OP, "triton", _triton_cat, _ext.triton_unavailable)

__all__ = ["cat_channels", "cat_channels_reference", "OP", "FAST_DTYPES"]
