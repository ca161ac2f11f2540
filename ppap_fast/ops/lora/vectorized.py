"""Sync-free, loop-free PyTorch paths (graph-capturable) for lora_conv2d_delta, conv(x, W + delta[e]):

* ``lora_conv2d_delta`` ("vectorized"): the base conv plus ONE grouped conv over the batch
  (S*groups groups, per-sample weights delta[idx]): the FLOPs of two base convs, but S copies of a
  delta per layer (e.g. 64 x 2.36M values for ResNet50's layer4 conv2) and a grouped conv with S
  large groups, forward, dgrad and wgrad.
* ``lora_conv2d_delta_stacked`` ("stacked"): ONE dense conv with every expert's W + delta_e
  stacked along the output channels (N*C_out), then each sample keeps its own expert's channels
  (one gather): N times the base conv's FLOPs (and N-fold dgrad / wgrad), no per-sample weight
  copies, no grouped conv.
"""
from __future__ import annotations

import torch.nn.functional as F

from .reference import stacked_expert_conv


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


def lora_conv2d_delta_stacked(x, W, bias, delta, expert_idx, stride=1, padding=0, dilation=1, groups=1,
                              expert_bias=None):
    w_all = W.detach().to(delta.dtype) + delta  # [N, C_out, C_in/g, kh, kw], differentiable in delta
    y = stacked_expert_conv(x, w_all, expert_idx, stride, padding, dilation, groups)
    if bias is not None:
        y = y + bias.detach().to(y.dtype)[:, None, None]
    if expert_bias is not None:
        y = y + expert_bias[expert_idx].to(y.dtype)[:, :, None, None]
    return y
