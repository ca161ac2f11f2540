"""Per-expert normalisation ops (issue #3), behind the ops backend registry.

    expert_batch_norm(x, expert_idx, weight, bias, running_mean, running_var, training,
                      momentum=0.1, eps=1e-5, *, backend=None, segments=None)
    expert_layer_norm(x, expert_idx, weight, bias, eps=1e-5, *, backend=None, segments=None)
    expert_group_norm(x, expert_idx, num_groups, weight, bias, eps=1e-5, *, backend=None, segments=None)

BatchNorm: x [S, C] or [S, C, *spatial]; weight/bias/running stats [N, C]. In training
each expert's samples are normalised with their own batch statistics and only the
running statistics of experts with more than one value per channel (n > 1) are updated
(unbiased variance n/(n-1)); an expert with one value per channel (nn.BatchNorm raises)
keeps them.
LayerNorm: over the last dim of x [S, ..., D] with the affine [N, D] of each sample's expert.
GroupNorm: x [S, C, *], statistics per (sample, group), channel affine [N, C] per expert.

Backends (ops.set_backend / backend= / last_backend(op) as for every registered op):
"triton" (CUDA; on CPU only when asked for, under TRITON_INTERPRET=1) and "reference"
(pure PyTorch). Automatic choice: triton on CUDA for fp32/fp16/bf16, else reference.
Both give y in x's dtype whatever the parameters' (float32 under autocast for layer / group norm).
The Triton path computes statistics in fp32 and never syncs with the host; its
segment metadata (``segments=``, an ops.lora.build_segments result that the bank
shares across layers) is built on the device; a stale one is refused (segments.check_segments).
"""
from __future__ import annotations

import torch

from .. import _ext, _registry
from .._kernel_util import autocast_off, on_device
from ..lora import _check_idx
from ..lora.segments import build_segments, check_segments
from . import reference

FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("expert_batch_norm", "expert_layer_norm", "expert_group_norm")


def _select(op: str, x: torch.Tensor, backend):
    return _registry.select_gated(op, x, backend, FAST_DTYPES)


def _check_params(what, x, feat, **tensors):
    N = next(iter(tensors.values())).shape[0]
    for name, t in tensors.items():
        if t.dim() != 2 or t.shape != (N, feat):
            raise ValueError(f"{what}: {name} must be [N, {feat}] (N={N}), got {tuple(t.shape)} for x "
                             f"{tuple(x.shape)}")
    return N


def expert_batch_norm(x, expert_idx, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5,
                      *, backend=None, segments=None):
    """Per-expert BatchNorm of x [S, C, *spatial], sample s by expert expert_idx[s] (module doc): weight, bias,
    running_mean, running_var [N, C]; training: batch statistics, updating the running ones by momentum,
    else the running ones; eps: the variance's epsilon. backend: None / "auto" (automatic), "triton" or
    "reference"; segments: a build_segments(expert_idx, N) result to reuse."""
    if x.dim() < 2:
        raise ValueError(f"expert_batch_norm: x must be [S, C] or [S, C, *spatial], got {tuple(x.shape)}")
    if momentum is None:
        raise ValueError("momentum=None (cumulative moving average) is not supported; pass a float")
    N = _check_params("expert_batch_norm", x, x.shape[1], weight=weight, bias=bias, running_mean=running_mean,
                      running_var=running_var)
    _check_idx(expert_idx, x.shape[0], N, x.device)
    if segments is not None:
        check_segments(segments, expert_idx, N)
    fn = _select("expert_batch_norm", x, backend)
    return fn(x, expert_idx, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps),
              segments)


def expert_layer_norm(x, expert_idx, weight, bias, eps=1e-5, *, backend=None, segments=None):
    """LayerNorm over the last dim of x [S, ..., D] with per-expert affine (weight/bias [N, D]) of sample s's
    expert expert_idx[s]; eps, backend and segments as expert_batch_norm's."""
    if x.dim() < 2:
        raise ValueError(f"expert_layer_norm: x must be [S, ..., D], got {tuple(x.shape)}")
    N = _check_params("expert_layer_norm", x, x.shape[-1], weight=weight, bias=bias)
    _check_idx(expert_idx, x.shape[0], N, x.device)
    if segments is not None:
        check_segments(segments, expert_idx, N)
    fn = _select("expert_layer_norm", x, backend)
    return fn(x, expert_idx, weight, bias, float(eps), segments)


def expert_group_norm(x, expert_idx, num_groups, weight, bias, eps=1e-5, *, backend=None, segments=None):
    """GroupNorm of x [S, C, *spatial] in num_groups groups with per-expert channel affine (weight/bias [N, C])
    of sample s's expert expert_idx[s]; eps, backend and segments as expert_batch_norm's."""
    if x.dim() < 2:
        raise ValueError(f"expert_group_norm: x must be [S, C, *spatial], got {tuple(x.shape)}")
    if not isinstance(num_groups, int) or num_groups <= 0 or x.shape[1] % num_groups:
        raise ValueError(f"expert_group_norm: num_groups={num_groups!r} must be a positive int dividing "
                         f"C={x.shape[1]}")
    N = _check_params("expert_group_norm", x, x.shape[1], weight=weight, bias=bias)
    _check_idx(expert_idx, x.shape[0], N, x.device)
    if segments is not None:
        check_segments(segments, expert_idx, N)
    fn = _select("expert_group_norm", x, backend)
    return fn(x, expert_idx, num_groups, weight, bias, float(eps), segments)


# ----------------------------------------------------------------------------- backend implementations
def _bn_reference(x, idx, w, b, rm, rv, training, momentum, eps, segments):
    return reference.expert_batch_norm(x, idx, w, b, rm, rv, training, momentum, eps)


def _ln_reference(x, idx, w, b, eps, segments):
    return reference.expert_layer_norm(x, idx, w, b, eps)


def _gn_reference(x, idx, G, w, b, eps, segments):
    return reference.expert_group_norm(x, idx, G, w, b, eps)


def _seg(idx, N, segments):
    return segments if segments is not None else build_segments(idx, N)  # checked by the public op


def _bn_triton(x, idx, w, b, rm, rv, training, momentum, eps, segments):
    from .fast import ExpertBatchNormFn

    seg = _seg(idx, w.shape[0], segments)
    with autocast_off(x.device.type), on_device(x):  # Triton launches on the current device
        return ExpertBatchNormFn.apply(x, w, b, rm, rv, seg, training, momentum, eps)


def _fp32_under_autocast(x):
    """torch.autocast runs layer_norm / group_norm in float32: so do we."""
    return x.float() if torch.is_autocast_enabled(x.device.type) else x


def _ln_triton(x, idx, w, b, eps, segments):
    from .fast import ExpertLayerNormFn

    seg = _seg(idx, w.shape[0], segments)
    x = _fp32_under_autocast(x)
    with autocast_off(x.device.type), on_device(x):  # Triton launches on the current device
        return ExpertLayerNormFn.apply(x, w, b, seg, eps)


def _gn_triton(x, idx, G, w, b, eps, segments):
    from .fast import ExpertGroupNormFn

    seg = _seg(idx, w.shape[0], segments)
    x = _fp32_under_autocast(x)
    with autocast_off(x.device.type), on_device(x):  # Triton launches on the current device
        return ExpertGroupNormFn.apply(x, w, b, seg, G, eps)


for _op, _ref, _tri in (("expert_batch_norm", _bn_reference, _bn_triton),
                        ("expert_layer_norm", _ln_reference, _ln_triton),
                        ("expert_group_norm", _gn_reference, _gn_triton)):
    _registry.register(_op, "reference", _ref, _ext.reference_unavailable)
    _registry.register(_op, "triton", _tri, _ext.triton_unavailable)


__all__ = ["expert_batch_norm", "expert_layer_norm", "expert_group_norm", "reference", "OPS", "FAST_DTYPES"]
