"""Guided eps correction for any scheduler, in one pass: model_output' = [head - coef * grad, rest].

head is the first ``channels`` channels of the denoiser's output (eps, v or x0, per the scheduler's
prediction type), rest its learned-variance channels (copied unchanged), coef a per-sample factor
(PPAPGuidance.correct computes it from the step's alpha / sigma). Math in float32 (float64 for float64
outputs), as PyTorch's eager ``(head.float() - coef * grad.float()).to(dtype)`` then ``cat``. The
checks read shapes only (nothing syncs, so a CUDA graph can capture the op).
"""
from __future__ import annotations

import functools

import torch

from ppap_fast.ops import _ext, _registry
from ppap_fast.ops._kernel_util import on_device
from ppap_fast.ops.update import _per_sample_contiguous

OP = "guided_eps"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(model_output, grad, coef, channels) -> torch.Tensor:
    """Raises ValueError on bad input; returns coef as a contiguous (B,) tensor in the math dtype."""
    mo = model_output
    if not isinstance(mo, torch.Tensor) or mo.ndim < 2 or mo.dtype not in DTYPES:
        raise ValueError("model_output must be a float16, bfloat16, float32 or float64 tensor [B, C, ...], got "
                         + (f"{mo.dtype} {tuple(mo.shape)}" if isinstance(mo, torch.Tensor) else type(mo).__name__))
    B, C = mo.shape[:2]
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= C:
        raise ValueError(f"channels must be an int in [1, {C}] (model_output's channels), got {channels!r}")
    want = (B, channels, *mo.shape[2:])
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != want:
        got = tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise ValueError(f"grad must have shape [B, channels, ...] = {want}, got {got}")
    if grad.dtype not in (mo.dtype, torch.float32) or grad.device != mo.device:
        raise ValueError(f"grad must be on model_output's device ({mo.device}) with its dtype ({mo.dtype}) or "
                         f"float32, got {grad.dtype} on {grad.device}")
    if not isinstance(coef, torch.Tensor) or not coef.is_floating_point() or coef.device != mo.device:
        raise ValueError(f"coef must be a floating tensor on model_output's device ({mo.device}), got "
                         + (f"{coef.dtype} on {coef.device}" if isinstance(coef, torch.Tensor) else type(coef).__name__))
    # per sample: a scalar, (B,) / (1,), or (B or 1, 1, ..., 1) of model_output's rank
    per_sample = coef.ndim == 0 or (coef.ndim == 1 and coef.shape[0] in (1, B)) or (
        coef.ndim == mo.ndim and coef.shape[0] in (1, B) and all(s == 1 for s in coef.shape[1:]))
    if not per_sample:
        raise ValueError(f"coef must hold one value per sample: shape (), ({B},) or ({B}, 1, ...) with "
                         f"{mo.ndim} dims (1 for B broadcasts), got {tuple(coef.shape)}")
    return coef.to(_math_dtype(mo.dtype)).reshape(-1).expand(B).contiguous()


def guided_eps_reference(model_output, grad, coef, channels):
    """Pure PyTorch: the eager formula [model_output[:, :channels] - coef * grad, the rest of model_output]
    (coef: one value per sample, as guided_eps takes it)."""
    work = _math_dtype(model_output.dtype)
    coef = coef.to(work).reshape(-1).view(-1, *([1] * (model_output.ndim - 1)))
    new = (model_output[:, :channels].to(work) - coef * grad.to(work)).to(model_output.dtype)
    if model_output.shape[1] == channels:
        return new
    return torch.cat([new, model_output[:, channels:]], dim=1)


def _native(model_output, grad, coef, channels):
    return torch.ops.ppap_fast.guided_eps(_per_sample_contiguous(model_output), _per_sample_contiguous(grad), coef,
                                          channels)


def _triton(model_output, grad, coef, channels):
    from ppap_fast.ops.update_triton import guided_eps_triton

    with on_device(model_output):  # Triton launches on the current device: make it model_output's
        return guided_eps_triton(_per_sample_contiguous(model_output), _per_sample_contiguous(grad), coef, channels)


def guided_eps(model_output: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor, channels: int,
               backend: str | None = None) -> torch.Tensor:
    """A new tensor shaped like model_output (contiguous, its dtype): the first ``channels`` channels
    ``head - coef[b] * grad``, the others copied. grad: [B, channels, ...] in model_output's dtype or
    float32; coef: one value per sample (shape (), (B,) or (B, 1, ...)). Inputs need only be contiguous
    within a sample (channel slices are fine). backend: None/"auto", "cuda", "cpp", "triton", "reference";
    the automatic choice under autograd (inputs requiring grad) is the reference, the kernels being
    forward-only."""
    coef = _check(model_output, grad, coef, channels)
    autograd = torch.is_grad_enabled() and (model_output.requires_grad or grad.requires_grad or coef.requires_grad)
    fn = _registry.select_gated(OP, model_output, backend, DTYPES,
                                "is forward-only (inputs require grad)" if autograd else None)
    return fn(model_output, grad, coef, channels)


@functools.cache
def _has_kernel(dispatch_key: str) -> bool:
    """The loaded extension has the op with a kernel for dispatch_key (an older build may not)."""
    return hasattr(torch.ops.ppap_fast, OP) and torch._C._dispatch_has_kernel_for_dispatch_key(f"ppap_fast::{OP}",
                                                                                               dispatch_key)


def _needs_the_kernel(why_unavailable, dispatch_key: str):
    def why(device: torch.device) -> str | None:
        reason = why_unavailable(device)
        if reason is None and not _has_kernel(dispatch_key):
            reason = f"extension ppap_fast._C was built without the {dispatch_key} {OP} kernel: rebuild it"
        return reason
    return why


# The registry's automatic order: cuda > triton on CUDA (unmeasured for this op: both are one elementwise
# pass), cpp > reference on CPU
_registry.register(OP, "reference", guided_eps_reference, _ext.reference_unavailable)
_registry.register(OP, "cpp", _native, _needs_the_kernel(_ext.cpp_unavailable, "CPU"))
_registry.register(OP, "cuda", _native, _needs_the_kernel(_ext.cuda_unavailable, "CUDA"))
_registry.register(OP, "triton", _triton, _ext.triton_unavailable)
