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

import torch
import torch.nn.functional as F

from .reference import own_expert_conv, stacked_expert_conv


def lora_conv2d_delta(x, W, bias, delta, expert_idx, stride=1, padding=0, dilation=1, groups=1, expert_bias=None):
    y = F.conv2d(x, W.detach().to(x.dtype), None if bias is None else bias.detach().to(x.dtype), stride, padding,
                 dilation, groups)
    y = y + own_expert_conv(x, delta, expert_idx, stride, padding, dilation, groups)
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


def _lowrank_blocks(C_in: int, kh: int, kw: int):
    """The input channel windows of loralib_conv2d_lowrank: (Cb, starts, offsets). Row block q of a loralib
    delta covers the flat (C_in, kh, kw) weight entries [q*L, (q+1)*L), L = C_in*kw: the channels
    [q*L // (kh*kw), ceil((q+1)*L / (kh*kw))) (whole channels when kh divides C_in, else with partial
    channels at the ends). Every block gets a window of Cb channels (the widest block's) from
    ``starts[q]``, the entries of block q at flat offset ``offsets[q]`` of the window's kernel."""
    kk, L = kh * kw, C_in * kw
    lo = [q * L // kk for q in range(kh)]
    hi = [-(-(q + 1) * L // kk) for q in range(kh)]
    Cb = max(h - c for c, h in zip(lo, hi))
    starts = [min(c, C_in - Cb) for c in lo]
    return Cb, starts, [q * L - c * kk for q, c in enumerate(starts)]


def lowrank_is_cheaper(n_experts: int, C_out: int, C_in: int, kh: int, kw: int, rk: int) -> bool:
    """Whether loralib_conv2d_lowrank takes fewer multiply-adds than the stacked delta conv (N dense convs)
    for one training step (forward, dgrad, and wgrad where trained): per output pixel, delta
    3 * N*C_out*C_in*kh*kw; lowrank 2 * C_out*C_in*kh*kw (frozen base: forward + dgrad) + 3 * N*kh*rk*Cb*kh*kw
    (stacked A stage) + 3 * kh*rk*C_out (own B). ResNet50 (r=16): at N >= 5 every LoRA conv but the 7x7
    stem (3 input channels); at N = 1 the 3x3 convs of layer1 and layer2 and layer1.0.conv1 keep the delta
    route too."""
    Cb = _lowrank_blocks(C_in, kh, kw)[0]
    kk = kh * kw
    delta = 3 * n_experts * C_out * C_in * kk
    lowrank = 2 * C_out * C_in * kk + 3 * n_experts * kh * rk * Cb * kk + 3 * kh * rk * C_out
    return lowrank < delta


LOWRANK_A_STAGES = ("stacked", "own")


def lowrank_a_stage(device) -> str:
    """The A stage of loralib_conv2d_lowrank on ``device``: "own" (each sample's own expert: the samples as
    groups of one conv, reference.own_expert_conv) on a CPU, where it took a ResNet18 PPAP-5 step to
    0.74x the "stacked" one's time on 2 cores (bench_distill ``distill_resnet18_own_a_vs_stacked_a``), "stacked" (every
    expert in one conv, then a gather: reference.stacked_expert_conv) elsewhere until a GPU times both;
    PPAP_FAST_LOWRANK_A picks one everywhere."""
    import os

    stage = os.environ.get("PPAP_FAST_LOWRANK_A", "").strip().lower() or (
        "own" if torch.device(device).type == "cpu" else "stacked")
    if stage not in LOWRANK_A_STAGES:
        raise ValueError(f"PPAP_FAST_LOWRANK_A must be one of {LOWRANK_A_STAGES}, got {stage!r}")
    return stage


def loralib_conv2d_lowrank(x, W, bias, A, B, expert_idx, scale, stride=1, padding=0, dilation=1, expert_bias=None):
    """conv(x, W + scale * loralib_delta(A_e, B_e), bias) + expert_bias[e] (groups 1) WITHOUT the N dense
    per-expert convs of the "stacked" delta route: the base conv once, then the loralib LoRA as its exact
    low-rank factorisation, loop-free over experts and sync-free (graph-capturable).

    A [N, r*kh, C_in*kw], B [N, C_out*kh, r*kh] (the loralib layout). Row o*kh + q of B_e @ A_e holds the
    flat (C_in, kh, kw) weight entries [q*L, (q+1)*L) (L = C_in*kw) of output channel o: about C_in/kh
    input channels, every tap. So delta_e's conv is, per block q, the conv of that channel window with
    A_e's rows as kernels (r*kh outputs; A_e's flat rows placed at the block's offset in a window of Cb
    channels, zeros around), followed by B_e's rows o*kh + q. The A stage is ONE grouped cuDNN conv
    (kh groups, one a block's window of x) with every expert's A stacked (N*kh*r*kh outputs over Cb ~
    C_in/kh channels each) and a gather of each sample's own expert (reference.stacked_expert_conv; or,
    lowrank_a_stage "own", the CPU default, each sample's own A only: reference.own_expert_conv); the
    B stage one bmm with each sample's B_e as [C_out, kh*r*kh]. Per output pixel that is about
    N*r*kh*C_in*kh*kw + kh*r*kh*C_out multiply-adds (plus the base conv) instead of the stacked delta
    route's N*C_out*C_in*kh*kw: r*kh / C_out of it (r=16, 3x3: 0.75 at C_out 64, 0.09 at 512; 1x1:
    r / C_out), its dgrad and wgrad likewise. The same numbers as lora_conv2d_delta up to rounding."""
    S = x.shape[0]
    C_out, C_in, kh, kw = W.shape
    N, rk = A.shape[:2]
    if tuple(A.shape[1:]) != (rk, C_in * kw) or tuple(B.shape[1:]) != (C_out * kh, rk):
        raise ValueError(f"loralib_conv2d_lowrank: not a loralib LoRA of W {tuple(W.shape)}: A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")
    y = F.conv2d(x, W.detach().to(x.dtype), None if bias is None else bias.detach().to(x.dtype), stride, padding,
                 dilation)
    Cb, starts, offs = _lowrank_blocks(C_in, kh, kw)
    win = Cb * kh * kw
    if Cb * kh == C_in and all(o == 0 for o in offs):  # kh divides C_in: the windows tile the channels
        xw = x
    else:
        ch = torch.cat([torch.arange(c, c + Cb, device=x.device) for c in starts])
        xw = x.index_select(1, ch)  # [S, kh*Cb, H, W]
    # [N, kh*rk, Cb, kh, kw]: block q's rows are A_e's rows at flat offset offs[q] of its window
    a = torch.cat([F.pad(A, (o, win - A.shape[2] - o)) for o in offs], 1).view(N, kh * rk, Cb, kh, kw)
    a_conv = own_expert_conv if lowrank_a_stage(x.device) == "own" else stacked_expert_conv
    h = a_conv(xw, a, expert_idx, stride, padding, dilation, kh)  # [S, kh*rk, Ho, Wo], (q, j)
    Ho, Wo = h.shape[-2:]
    Bs = (B.reshape(N, C_out, kh * rk)[expert_idx] * scale).to(h.dtype)  # [S, C_out, (q, j)]
    yd = torch.bmm(Bs, h.reshape(S, kh * rk, Ho * Wo)).view(S, C_out, Ho, Wo)
    y = y + yd
    if expert_bias is not None:
        y = y + expert_bias[expert_idx].to(y.dtype)[:, :, None, None]
    return y
