"""Pure-PyTorch references of the per-expert normalisation ops (autograd gives the gradients).

Written for clarity: per-expert sums as index_add over samples, checked against
nn.BatchNorm / F.layer_norm applied expert by expert (tests/test_norm_ops.py). The
fast paths are checked against these in float64.

* ``x``: the leading dimension is the sample dimension S; ``expert_idx`` long [S].
* BatchNorm: ``x`` [S, C] or [S, C, *spatial]; ``weight``/``bias``/``running_*`` [N, C].
* LayerNorm: ``x`` [S, ..., D] normalised over D; ``weight``/``bias`` [N, D].
* GroupNorm: ``x`` [S, C, *]; ``weight``/``bias`` [N, C].
* y in x's dtype (as the Triton path and nn.BatchNorm on CUDA), computed in float32 at least.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x, *params):
    """float32 at least: half x is normalised in float32 and rounded once, to x's dtype."""
    dt = torch.float32
    for t in (x, *params):
        dt = torch.promote_types(dt, t.dtype)
    return dt


def _row_norm_out_dtype(x):
    """x's dtype; float32 for half x under autocast (which runs layer_norm / group_norm in float32)."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half and torch.is_autocast_enabled(x.device.type) else x.dtype


def expert_batch_norm(x, expert_idx, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """BatchNorm with per-expert affine parameters and running statistics.

    Training: each expert's samples (and spatial positions) are normalised with their own
    biased batch statistics (two-pass: mean, then mean squared deviation); the running
    statistics of experts with more than one value per channel (n > 1) are updated in place
    like nn.BatchNorm (unbiased variance n/(n-1)); experts with n <= 1 (nn.BatchNorm raises
    at n == 1: no variance to estimate) are untouched. Eval: each sample uses its expert's
    running statistics.
    Per-expert sums are index_add over samples: no loop, no host sync; fp16/bf16 statistics
    are computed in float32.
    """
    S, C = x.shape[:2]
    N = weight.shape[0]
    bshape = (S, C) + (1,) * (x.dim() - 2)
    # statistics in float32 at least (as nn.BatchNorm): counts and sums in fp16/bf16 lose
    # integers past 2048/256 and overflow
    acc = _compute_dtype(x, weight, bias)
    pe = lambda t: t[expert_idx].to(acc).view(bshape)  # noqa: E731
    if not training:
        y = (x.to(acc) - pe(running_mean)) * torch.rsqrt(pe(running_var) + eps) * pe(weight) + pe(bias)
        return y.to(x.dtype)
    red = tuple(range(2, x.dim()))
    xa = x.to(acc)
    per_channel = x[0, 0].numel() if S else 1  # values per (sample, channel)
    n = torch.zeros(N, dtype=acc, device=x.device).index_add(
        0, expert_idx, torch.full((S,), float(per_channel), dtype=acc, device=x.device))
    total = lambda t: torch.zeros(N, C, dtype=acc, device=x.device).index_add(  # noqa: E731
        0, expert_idx, t.sum(dim=red) if red else t)
    mean = total(xa) / n.clamp(min=1)[:, None]
    xc = xa - mean[expert_idx].view(bshape)
    var = total(xc * xc) / n.clamp(min=1)[:, None]
    y = (xc * torch.rsqrt(var[expert_idx].view(bshape) + eps) * pe(weight) + pe(bias)).to(x.dtype)
    with torch.no_grad():
        has = (n > 1)[:, None]  # n == 1: no variance to estimate (nn.BatchNorm raises)
        unb = var * (n / (n - 1).clamp(min=1))[:, None]
        running_mean.copy_(torch.where(has, running_mean * (1 - momentum) + momentum * mean.to(running_mean.dtype),
                                       running_mean))
        running_var.copy_(torch.where(has, running_var * (1 - momentum) + momentum * unb.to(running_var.dtype),
                                      running_var))
    return y


def expert_layer_norm(x, expert_idx, weight, bias, eps=1e-5):
    """LayerNorm over the last dimension with the affine parameters of each sample's expert."""
    D = x.shape[-1]
    shp = (x.shape[0],) + (1,) * (x.dim() - 2) + (D,)
    cd = _compute_dtype(x, weight, bias)
    y = F.layer_norm(x.to(cd), (D,), None, None, eps)
    y = y * weight[expert_idx].to(cd).view(shp) + bias[expert_idx].to(cd).view(shp)
    return y.to(_row_norm_out_dtype(x))


def expert_group_norm(x, expert_idx, num_groups, weight, bias, eps=1e-5):
    """GroupNorm of x [S, C, *] (statistics per sample and group), then the channel affine
    [N, C] of each sample's expert."""
    shp = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    cd = _compute_dtype(x, weight, bias)
    y = F.group_norm(x.to(cd), num_groups, None, None, eps)
    y = y * weight[expert_idx].to(cd).view(shp) + bias[expert_idx].to(cd).view(shp)
    return y.to(_row_norm_out_dtype(x))


__all__ = ["expert_batch_norm", "expert_layer_norm", "expert_group_norm"]
