"""Sync-free, loop-free PyTorch paths (graph-capturable) for the ops whose cost
is memory-bound elementwise work or a conv cuDNN already does well:

* expert_batch_norm: per-expert statistics with index_add over samples (two-pass
  variance), running-stat update masked on the device (experts with no samples
  keep their stats) -- no nonzero(), no .item().
* expert_layer_norm: layer_norm without affine, then a per-sample gather of the
  expert's affine parameters.
* lora_conv2d_delta: W + delta[e] per sample as the base conv plus ONE grouped
  conv over the batch (S*groups groups, per-sample weights delta[idx]).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_batch_norm(x, expert_idx, weight, bias, running_mean, running_var, training, momentum=0.1,
                      eps=1e-5):
    S, C = x.shape[:2]
    N = weight.shape[0]
    bshape = (S, C) + (1,) * (x.dim() - 2)
    if not training:
        inv = torch.rsqrt(running_var[expert_idx] + eps)
        w = weight[expert_idx] * inv
        b = bias[expert_idx] - running_mean[expert_idx] * w
        return x * w.view(bshape).to(x.dtype) + b.view(bshape).to(x.dtype)
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xf = x.to(acc)
    spatial = x[0, 0].numel() if x.dim() > 2 else 1
    red = tuple(range(2, x.dim()))
    cnt = torch.zeros(N, dtype=acc, device=x.device).index_add_(
        0, expert_idx, torch.full((S,), float(spatial), dtype=acc, device=x.device))  # elements per channel
    per_s = xf.sum(dim=red) if red else xf
    sums = torch.zeros(N, C, dtype=acc, device=x.device).index_add(0, expert_idx, per_s)
    mean = sums / cnt.clamp(min=1)[:, None]
    xc = xf - mean[expert_idx].view(bshape)
    sq = (xc * xc).sum(dim=red) if red else xc * xc
    var = torch.zeros(N, C, dtype=acc, device=x.device).index_add(0, expert_idx, sq) / cnt.clamp(min=1)[:, None]
    scale = torch.rsqrt(var + eps)[expert_idx] * weight[expert_idx].to(acc)
    y = (xc * scale.view(bshape) + bias[expert_idx].to(acc).view(bshape)).to(x.dtype)
    with torch.no_grad():
        has = (cnt > 0)[:, None]
        unb = var * (cnt / (cnt - 1).clamp(min=1))[:, None]
        running_mean.copy_(torch.where(has, running_mean * (1 - momentum) + momentum * mean.to(running_mean.dtype),
                                       running_mean))
        running_var.copy_(torch.where(has, running_var * (1 - momentum) + momentum * unb.to(running_var.dtype),
                                      running_var))
    return y


def expert_layer_norm(x, expert_idx, weight, bias, eps=1e-5):
    D = x.shape[-1]
    y = F.layer_norm(x, (D,), None, None, eps)
    shp = (x.shape[0],) + (1,) * (x.dim() - 2) + (D,)
    return torch.addcmul(bias[expert_idx].view(shp).to(y.dtype), y, weight[expert_idx].view(shp).to(y.dtype))


def lora_conv2d_delta(x, W, bias, delta, expert_idx, stride=1, padding=0, dilation=1, groups=1, expert_bias=None):
    S, C_in, H, Wd = x.shape
    y = F.conv2d(x, W.detach().to(x.dtype), None if bias is None else bias.detach().to(x.dtype), stride, padding,
                 dilation, groups)
    d = delta[expert_idx].to(x.dtype)  # [S, C_out, C_in/g, kh, kw]
    C_out = W.shape[0]
    yd = F.conv2d(x.reshape(1, S * C_in, H, Wd), d.reshape(S * C_out, *W.shape[1:]), None, stride, padding,
                  dilation, groups * S)
    y = y + yd.view_as(y)
    if expert_bias is not None:
        y = y + expert_bias[expert_idx].to(y.dtype)[:, :, None, None]
    return y
