"""ops.resample: ADM's 2x resampling, forward only: nearest 2x upsampling (``upsample_nearest2x``, what
``F.interpolate(x, scale_factor=2, mode="nearest")`` does) and 2x2 average pooling with stride 2
(``avg_pool2x``, ``F.avg_pool2d(x, 2, 2)``) of a [B, C, H, W] tensor.

On an H100 PyTorch's channels_last kernels for these ran ~10x below HBM bandwidth (ADM-256 at batch
32: 22 ms for the 10 upsamplings and 13 ms for the 10 poolings of one guided step). The Triton path
copies contiguous blocks of channels per pixel; the pool sums its four inputs in float32 in PyTorch's
order (row by row, left to right) and multiplies by 1/4, so both ops give PyTorch's results bit for bit.

Backends (registry ops "upsample_nearest2x", "avg_pool2x"): "triton" (CUDA; on CPU only when asked
for, under TRITON_INTERPRET=1) and "reference" (PyTorch, differentiable). The Triton path takes
channels_last-contiguous 4-D fp32 / fp16 / bf16 tensors (the pool: even H and W) and writes a
channels_last output; anything else, and inputs that require grad under autograd, run the reference
(an explicit backend="triton" then raises, saying why).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext, _registry
from ._kernel_util import on_device

UPSAMPLE_OP = "upsample_nearest2x"
POOL_OP = "avg_pool2x"
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_GRID_X = 2**31 - 1  # CUDA's cap on grid axis 0 (the kernels' pixel blocks)
POISON = False  # tests: buffers the kernels fully overwrite start as NaN


def upsample_nearest2x_reference(x):
    """PyTorch's nearest 2x upsampling of x [B, C, H, W]."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def avg_pool2x_reference(x):
    """PyTorch's 2x2 average pooling, stride 2, of x [B, C, H, W]."""
    return F.avg_pool2d(x, 2, 2)


def _check(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [B, C, H, W], got shape {tuple(x.shape)}")


def _not_fast(x, pool: bool) -> str | None:
    """Why the Triton kernels cannot take x (None when they can)."""
    if not x.is_contiguous(memory_format=torch.channels_last):
        return "takes channels_last-contiguous tensors only"
    if pool and (x.shape[2] % 2 or x.shape[3] % 2):
        return f"takes even H and W only, got {tuple(x.shape[2:])}"
    pixels = x.shape[0] * x.shape[2] * x.shape[3] // (4 if pool else 1)  # input pixels (up), output pixels (pool)
    if pixels > MAX_GRID_X:  # pixel blocks on grid axis 0: at most one block per pixel
        return f"takes at most {MAX_GRID_X} pixels per launch, got {pixels}"
    return None


def _select(op, x, backend, pool):
    """The reference where the kernels cannot take x (unless asked for one explicitly: then raise
    with the reason); else the registry's choice (dtype and autograd gating as for every op)."""
    layout = _not_fast(x, pool)
    if layout is not None and backend in (None, "auto"):
        return _registry.select(op, x.device, "reference")
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return _registry.select_gated(op, x, backend, FAST_DTYPES,
                                  layout or ("is forward-only (x requires grad)" if needs_grad else None))


def upsample_nearest2x(x, *, backend: str | None = None):
    """Nearest 2x upsampling of x [B, C, H, W] -> [B, C, 2H, 2W] (module docstring); backend: None / "auto"
    (automatic), "triton" or "reference"."""
    _check("upsample_nearest2x", x)
    return _select(UPSAMPLE_OP, x, backend, pool=False)(x)


def avg_pool2x(x, *, backend: str | None = None):
    """2x2 average pooling, stride 2: x [B, C, H, W] -> [B, C, H // 2, W // 2] (module docstring);
    backend: None / "auto" (automatic), "triton" or "reference"."""
    _check("avg_pool2x", x)
    return _select(POOL_OP, x, backend, pool=True)(x)


def _triton_upsample(x):
    from . import resample_triton as tk

    with on_device(x):  # Triton launches on the current device
        return tk.upsample_nearest2x(x, poison=POISON)


def _triton_pool(x):
    from . import resample_triton as tk

    with on_device(x):
        return tk.avg_pool2x(x, poison=POISON)


_registry.register(UPSAMPLE_OP, "reference", upsample_nearest2x_reference, _ext.reference_unavailable)
_registry.register(UPSAMPLE_OP, "triton", _triton_upsample, _ext.triton_unavailable)
_registry.register(POOL_OP, "reference", avg_pool2x_reference, _ext.reference_unavailable)
_registry.register(POOL_OP, "triton", _triton_pool, _ext.triton_unavailable)

__all__ = ["upsample_nearest2x", "upsample_nearest2x_reference", "avg_pool2x", "avg_pool2x_reference",
           "UPSAMPLE_OP", "POOL_OP", "FAST_DTYPES"]
