"""Sync-free, loop-free PyTorch path (graph-capturable) for an op cuDNN already does well:
lora_conv2d_delta = W + delta[e] per sample as the base conv plus ONE grouped conv over the
batch (S*groups groups, per-sample weights delta[idx]).
"""
from __future__ import annotations

import torch.nn.functional as F


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
