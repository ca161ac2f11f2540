"""ADM UNet (openai/guided-diffusion's UNetModel), written from its semantics.

State-dict keys and shapes equal guided-diffusion's, so official checkpoints
load with strict=True. Attention runs through F.scaled_dot_product_attention
(a math path is kept beside it as the reference). The model is called as
model(x, t[, y]) with integer original timesteps t of shape [B].
"""
from __future__ import annotations

import math
import operator
import os
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from ._inputs import check_halvable, per_sample_timesteps

__all__ = [
    "ADMUNet",
    "AttentionBlock",
    "GroupNorm32",
    "group_norm_from_channel_stats",
    "ResBlock",
    "timestep_embedding",
    "qkv_attention",
    "adm_kwargs_from_flags",
    "ADM_FLAG_DEFAULTS",
    "ADM_PRESETS",
]

NUM_CLASSES = 1000

# guided-diffusion's model_and_diffusion_defaults(), model part.
ADM_FLAG_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, learn_sigma=False,
)
# Script flags of public checkpoints (checked against the official key manifest).
ADM_PRESETS: dict[str, dict[str, Any]] = {
    "256x256_diffusion_uncond": dict(
        attention_resolutions="32,16,8", class_cond=False, diffusion_steps=1000, image_size=256,
        learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2,
        resblock_updown=True, use_fp16=True, use_scale_shift_norm=True),
}
# Diffusion flags that may sit beside the model flags; ignored by the model.
_DIFFUSION_FLAGS = {
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
    "rescale_timesteps", "rescale_learned_sigmas",
}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"dims must be 1, 2 or 3, got {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def group_norm_from_channel_stats(x: torch.Tensor, num_groups: int, weight=None, bias=None,
                                  eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps) from per-channel statistics: each channel's
    mean and variance over its spatial positions, combined exactly into its group's (equal counts:
    the group mean is the channels' mean, the group variance their mean variance plus the spread
    of their means), then one scale and shift per (sample, channel). The same math as GroupNorm,
    written for inductor on CPU: in the channels-last layout that freezing gives the convs, its
    GroupNorm reduces over a few channels per group with masked vector loads (3 of 16 lanes at 96
    channels: 1.1-1.3 ms vs 0.4-0.5 ms this way at [4, 96, 32, 32], one core); here the reductions
    run along contiguous channels. Eager it is slower than F.group_norm."""
    B, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the channel count {C}")
    var_c, mean_c = torch.var_mean(x, dim=tuple(range(2, x.dim())), correction=0)  # [B, C]
    k = C // num_groups
    if k == 1:
        mean_g, var_g = mean_c, var_c
    else:  # averaging within groups as a matmul keeps [B, C] results (no per-element group index)
        avg = torch.block_diag(*[torch.full((k, k), 1.0 / k, dtype=x.dtype, device=x.device)] * num_groups)
        mean_g = mean_c @ avg
        var_g = (var_c + (mean_c - mean_g) ** 2) @ avg
    scale = torch.rsqrt(var_g + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean_g * scale
    if bias is not None:
        shift = shift + bias
    shape = (B, C) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


# channel statistics pay where inductor's masked group reduction is slow: large maps with several
# channels per group (measured, one core: [4, 96|64, 32, 32] 2.3-2.7x faster; at 8x8 or 16x16 slower)
CHANNEL_STATS_MIN_POSITIONS = 1024


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in (at least) float32, result cast back to the input dtype.

    ``stats_by_channel`` (ADMUNet.set_group_norm_stats): when torch.compile traces it, large maps
    with several channels per group use :func:`group_norm_from_channel_stats` (same math, faster
    inductor code on CPU; on CUDA unmeasured, so the fast sampler sets it for CPU models only);
    eager runs are unchanged."""

    stats_by_channel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        if self.stats_by_channel and x.shape[1] > self.num_groups \
                and math.prod(x.shape[2:]) >= CHANNEL_STATS_MIN_POSITIONS and torch.compiler.is_compiling():
            return group_norm_from_channel_stats(x.to(dt), self.num_groups, w, b, self.eps).type(x.dtype)
        return F.group_norm(x.to(dt), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape [B, dim], float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward takes (x, emb)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling (3-D: inner two dims only), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_conv, self.dims = use_conv, dims
        self.fast_resample = False  # ADMUNet.fuse_norm_act: ops.upsample_nearest2x
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        elif getattr(self, "fast_resample", False):  # ADMUNet.fuse_norm_act (modules pickled before: absent)
            from ..ops.resample import upsample_nearest2x

            x = upsample_nearest2x(x)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or average pooling (3-D: inner two dims only)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        self.fast_resample = False  # ADMUNet.fuse_norm_act: ops.avg_pool2x
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "fast_resample", False):  # ADMUNet.fuse_norm_act: a 2x2 AvgPool2d as ops.avg_pool2x
            from ..ops.resample import avg_pool2x

            return avg_pool2x(x)
        return self.op(x)

    def fast_pool_possible(self) -> bool:
        """Whether self.op is a 2x2 stride-2 AvgPool2d that ops.avg_pool2x computes (no padding, floor)."""
        op = self.op
        return type(op) is nn.AvgPool2d and _pair(op.kernel_size) == (2, 2) and _pair(op.stride) == (2, 2) \
            and _pair(op.padding) == (0, 0) and not op.ceil_mode and op.divisor_override is None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _fused_norm_act(norm: nn.GroupNorm, h, scale=None, shift=None, in_bias=None, silu=True, out_dtype=None):
    """``norm`` of h + in_bias (+ scale-shift) then SiLU as one op (ADMUNet.fuse_norm_act); its statistics
    from the sums h's producer left on it (_fused_residual, the decoder's skip copy), where it did."""
    from ..ops.channel_sums import attached
    from ..ops.norm_act import group_norm_act

    sums = attached(h) if in_bias is None else None
    return group_norm_act(h, norm.num_groups, norm.weight, norm.bias, norm.eps, scale=scale, shift=shift,
                          in_bias=in_bias, silu=silu, out_dtype=out_dtype, channel_sums=sums)


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _plain_head_conv(conv: nn.Module) -> bool:
    """A 3x3, stride 1, zero-padding 1 conv to at most ops.out_head.MAX_OUT_CHANNELS channels (the fused head's)."""
    from ..ops.out_head import MAX_OUT_CHANNELS

    return type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1) \
        and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 \
        and conv.padding_mode == "zeros" and conv.out_channels <= MAX_OUT_CHANNELS


def _conv_without_bias(conv: nn.Module, h):
    """(conv(h) without its bias, the bias) for a plain conv, so that the next fused op adds the
    bias; (conv(h), None) for anything else."""
    if type(conv) in _PLAIN_CONVS and conv.bias is not None:
        return conv._conv_forward(h, conv.weight, None), conv.bias
    return conv(h), None


def _sum_bias(a, b):
    if a is None or b is None:
        return a if b is None else b
    return a.float() + b.float()


# per-channel sums of each residual output (and decoder concatenation) for the GroupNorm reading it next
# (ops.channel_sums): "0" off (default: on an H100 the producers' sums cost more than the statistics passes
# they saved, ADM-256 b32 forward 151.3 vs 144.5 ms), "auto" on CUDA tensors, "1" everywhere (tests)
CHANNEL_SUMS = os.environ.get("PPAP_FAST_CHANNEL_SUMS", "0")


def _channel_sums_wanted(y: torch.Tensor, *inputs) -> bool:
    """Whether the fused op writing y leaves its channel sums on it: a channels_last 4-D y, outside autograd,
    torch.compile and inference mode (whose tensors have no version to check the sums against)."""
    if CHANNEL_SUMS not in ("auto", "1", "0"):
        raise ValueError(f"PPAP_FAST_CHANNEL_SUMS must be 'auto', '1' or '0', got {CHANNEL_SUMS!r}")
    if CHANNEL_SUMS == "0" or (CHANNEL_SUMS == "auto" and y.device.type != "cuda"):
        return False
    return y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) \
        and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled() \
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs))


def _fused_residual(h, skip, bias, out=None):
    """ops.bias_residual_add; its output carries its channel sums (or, written into a decoder buffer, adds them
    to the buffer's) where _channel_sums_wanted."""
    from ..ops.channel_sums import ChannelSums, attach
    from ..ops.residual import bias_residual_add

    sums = None
    if out is not None:
        sums = getattr(out, "_ppap_cat_sums", None)  # the decoder buffer's (_residual_target)
    elif skip.dim() == 4 and skip.shape == h.shape and _channel_sums_wanted(skip, h, skip, bias):
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device, memory_format=torch.channels_last)
        sums = attach(out, ChannelSums(out))
    return bias_residual_add(h, skip, bias, out=out, channel_sums=sums)


class _CatTarget:
    """The next decoder concatenation (its skip, the block's C_out) ADMUNet.forward left on a block's last layer;
    ``buf`` allocated by _residual_target."""

    def __init__(self, skip: torch.Tensor, c_out: int):
        self.skip, self.c_out, self.buf = skip, c_out, None


def _residual_target(module: nn.Module, like: torch.Tensor):
    """A channel slice of the next decoder concatenation's buffer (ADMUNet.forward's _CatTarget on ``module``),
    allocated now, for the output when it fits ``like``; None otherwise (the output gets its own tensor)."""
    tgt = getattr(module, "_cat_target", None)
    if tgt is None:
        return None
    s = tgt.skip
    if tuple(like.shape) != (s.shape[0], tgt.c_out, *s.shape[2:]) or like.dtype != s.dtype or like.device != s.device:
        return None
    # only now: the block's intermediates are gone (peak memory)
    tgt.buf = torch.empty((s.shape[0], tgt.c_out + s.shape[1], *s.shape[2:]), dtype=s.dtype, device=s.device,
                          memory_format=torch.channels_last)
    view = tgt.buf[:, :tgt.c_out]
    if _channel_sums_wanted(tgt.buf):
        from ..ops.channel_sums import ChannelSums, attach

        view._ppap_cat_sums = attach(tgt.buf, ChannelSums(tgt.buf))  # filled by the residual op, then the skip copy
    return view


def _cat_with_sums(tensors):
    """ops.cat_channels of a decoder input, with its channel sums on it where _channel_sums_wanted."""
    from ..ops.concat import cat_channels

    first = tensors[0]
    if not (first.dim() == 4 and all(t.dtype == first.dtype and t.is_contiguous(memory_format=torch.channels_last)
                                     for t in tensors) and _channel_sums_wanted(first, *tensors)):
        return cat_channels(tensors)
    from ..ops.channel_sums import ChannelSums, attach

    out = torch.empty((first.shape[0], sum(t.shape[1] for t in tensors), *first.shape[2:]), dtype=first.dtype,
                      device=first.device, memory_format=torch.channels_last)
    return cat_channels(tensors, out=out, channel_sums=attach(out, ChannelSums(out)))


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning (scale-shift norm optional) and optional up/down."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels, self.out_channels = channels, out_channels or channels
        self.use_scale_shift_norm, self.use_checkpoint = use_scale_shift_norm, use_checkpoint
        self.fused_norm_act = False  # ADMUNet.fuse_norm_act: GroupNorm(+scale-shift)+SiLU in one op
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            _zero(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if getattr(self, "fused_norm_act", False):  # modules pickled before the option existed
            return self._forward_fused(x, emb)
        if self.updown:
            # norm + act, resample, then conv (the skip path is resampled too)
            h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.view(*emb_out.shape, *([1] * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

    def _forward_fused(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """ADMUNet.fuse_norm_act's path: each norm (+ scale-shift) + SiLU one op; the convs run without
        their biases, which the next op adds on its way (conv1's, and the embedding without
        scale-shift, in the out norm; conv2's and a conv skip's in the residual add)."""
        h = _fused_norm_act(self.in_layers[0], x)
        if self.updown:  # norm + act, resample, then conv (the skip path is resampled too)
            h, x = self.h_upd(h), self.x_upd(x)
        h, b1 = _conv_without_bias(self.in_layers[-1], h)
        emb_out = self.emb_layers(emb).type(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = _fused_norm_act(self.out_layers[0], h, scale, shift, in_bias=b1)
        else:
            h = _fused_norm_act(self.out_layers[0], h, in_bias=_sum_bias(emb_out, b1))
        h, b2 = _conv_without_bias(self.out_layers[3], self.out_layers[2](h))  # dropout, conv
        skip, b_skip = _conv_without_bias(self.skip_connection, x)
        return _fused_residual(h, skip, _sum_bias(b2, b_skip), _residual_target(self, h))


def qkv_attention(qkv: torch.Tensor, num_heads: int, legacy: bool = True, use_sdpa: bool = True) -> torch.Tensor:
    """Multi-head self-attention on a packed qkv tensor [B, 3*H*C, T] -> [B, H*C, T].

    legacy=True: per head, channels are [q|k|v] (QKVAttentionLegacy: reshape to
    [B*H, 3C, T] then split). legacy=False: [q of all heads | k | v] (QKVAttention).
    Scale 1/sqrt(C); softmax in at least float32 on the math path (guided-diffusion: float32).
    """
    bs, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3*num_heads={3 * num_heads}")
    ch = width // (3 * num_heads)
    if use_sdpa:
        # [B, H, T, C] with channels contiguous (one copy): the fused SDPA kernels (flash, memory-efficient)
        # need a unit last-dim stride; the transposed views had stride T, which sent CUDA to the math
        # path, in float32 for half inputs (FFMA GEMMs, ~15 ms of an ADM-256 b32 step on an H100)
        if legacy:
            qkv_t = qkv.reshape(bs, num_heads, 3 * ch, length).transpose(-1, -2).contiguous()
            q, k, v = qkv_t.split(ch, dim=-1)
        else:
            qkv_t = qkv.reshape(bs, 3, num_heads, ch, length).permute(1, 0, 2, 4, 3).contiguous()
            q, k, v = qkv_t.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        return a.transpose(-1, -2).reshape(bs, num_heads * ch, length)
    if legacy:
        q, k, v = qkv.reshape(bs, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (u.reshape(bs, num_heads, ch, length) for u in qkv.chunk(3, dim=1))
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    w = torch.einsum("bhct,bhcs->bhts", q * scale, k * scale)
    w = torch.softmax(w.float() if w.element_size() < 4 else w, dim=-1).type(w.dtype)
    a = torch.einsum("bhts,bhcs->bhct", w, v)
    return a.reshape(bs, num_heads * ch, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention: x + proj_out(attn(qkv(norm(x)))); qkv/proj_out are kernel-1 Conv1d."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads <= 0 or channels % num_heads:  # was the first forward's qkv width error
                raise ValueError(f"num_heads {num_heads} does not divide the {channels} channels of an attention "
                                 "block (num_heads_upsample in the decoder): pick a divisor, or set num_head_channels")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.legacy = not use_new_attention_order
        self.use_sdpa = True  # False selects the math reference path
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return _checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        if getattr(self, "fused_norm_act", False) and self.use_sdpa and x.dim() > 2 and x.stride(1) == 1 \
                and type(self.qkv) is nn.Conv1d and type(self.proj_out) is nn.Conv1d:
            return self._forward_channels_last(x)
        x = x.reshape(b, c, math.prod(spatial))  # not -1: ambiguous for an empty batch
        if getattr(self, "fused_norm_act", False):  # ADMUNet.fuse_norm_act: one norm op, one residual op
            h = qkv_attention(self.qkv(_fused_norm_act(self.norm, x, silu=False)), self.num_heads, self.legacy,
                              self.use_sdpa)
            h, b_out = _conv_without_bias(self.proj_out, h)
            return _fused_residual(h, x, b_out).reshape(b, c, *spatial)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, self.legacy, self.use_sdpa)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The fused block on a channels-fastest x ([B, C, *spatial], channel stride 1): token-major
        throughout, with no layout copies. The 1x1 qkv / proj_out convs as GEMMs on [B, T, C] views, q / k /
        v as strided [B, heads, T, ch] views of the qkv GEMM's output (unit last stride: SDPA's fused
        kernels), the attention read back as [B, T, C]. The channel-major path copied x to conv1d's layout,
        qkv to [B, heads, T, ch] and the attention back to [B, C, T] (PyTorch's strided copy kernels)."""
        b, c, *spatial = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        h = _fused_norm_act(self.norm, x, silu=False)
        tokens = h.movedim(1, -1).reshape(b, math.prod(spatial), c)  # a view where h is channels-fastest too
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # [B, T, 3C]
        T = qkv.shape[1]
        if self.legacy:  # per head [q | k | v]
            q, k, v = qkv.view(b, T, heads, 3, ch).unbind(3)
        else:  # [q of all heads | k | v]
            q, k, v = qkv.view(b, T, 3, heads, ch).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(b, T, c)  # [B, T, heads, ch] -> [B, T, C]
        out = F.linear(a, self.proj_out.weight.squeeze(-1))  # its bias goes to the residual op
        out = out.view(b, *spatial, c).movedim(-1, 1)  # [B, C, *spatial], channels-fastest like x
        return _fused_residual(out, x, self.proj_out.bias, _residual_target(self, out))


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ADMUNet(nn.Module):
    """guided-diffusion UNetModel. Arguments mirror its constructor (image_size, in_channels, model_channels,
    out_channels, num_res_blocks, attention_resolutions, dropout, channel_mult, conv_resample, dims,
    num_classes, use_checkpoint, use_fp16, num_heads, num_head_channels, num_heads_upsample,
    use_scale_shift_norm, resblock_updown, use_new_attention_order).

    attention_resolutions holds downsample rates (image_size // resolution), as
    UNetModel expects; `from_config` also accepts the script flags ("32,16,8").
    use_fp16=True converts the torso convs to float16 at construction
    (guided-diffusion's convert_to_fp16); fp32 checkpoints still load (cast on copy).
    The attribute ``trained_schedule`` holds (noise_schedule, diffusion_steps) of the flags `from_config` was
    given (None: not given); ``sampling.sample_loop`` and ``FastGuidedSampler`` refuse a Schedule of another.
    The attribute ``timestep_scale`` is 1000 / diffusion_steps where the flags say rescale_timesteps=True
    (guided-diffusion fed that model t * 1000 / T); forward applies it to the original integer timesteps the
    samplers pass.
    """

    trained_schedule: tuple[str, int] | None = None
    timestep_scale: float | None = None

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if isinstance(attention_resolutions, str):  # "16" read as (1, 6); "32,16,8" failed on int(",")
            res = [int(r) for r in attention_resolutions.split(",") if r.strip().isdigit() and int(r)]
            raise ValueError(f"attention_resolutions={attention_resolutions!r} is guided-diffusion's script flag "
                             "(resolutions); UNetModel takes downsample rates image_size // resolution "
                             f"({tuple(image_size // r for r in res)} here): pass those, or give the script flags "
                             "(num_channels=..., without model_channels)")
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        rates = [2 ** k for k in range(len(channel_mult))]
        if any(r not in rates for r in attention_resolutions):  # no attention block was built there, silently
            raise ValueError(f"attention_resolutions {attention_resolutions} are downsample rates; "
                             f"{[r for r in attention_resolutions if r not in rates]} is none this UNet reaches "
                             f"({rates}, for {len(channel_mult)} channel_mult levels)")
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels, self.out_channels = model_channels, out_channels
        self.num_res_blocks, self.attention_resolutions = num_res_blocks, attention_resolutions
        self.dropout, self.channel_mult = dropout, tuple(channel_mult)
        self.conv_resample, self.num_classes = conv_resample, num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.dims = dims

        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, ted)

        def res(ch_in, ch_out, **kw):
            return ResBlock(ch_in, ted, dropout, out_channels=ch_out, dims=dims, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch, heads):
            return AttentionBlock(ch, num_heads=heads, num_head_channels=num_head_channels,
                                  use_checkpoint=use_checkpoint, use_new_attention_order=use_new_attention_order)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), _zero(conv_nd(dims, input_ch, out_channels, 3, padding=1)))
        if use_fp16:
            self.convert_to_fp16()

    # -- precision ---------------------------------------------------------
    def _torso_convs(self):
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    yield m

    def convert_to_fp16(self, dtype: torch.dtype = torch.float16) -> "ADMUNet":
        """Cast the Conv1d/2d/3d weights and biases of input/middle/output blocks (guided-diffusion's
        convert_to_fp16). Linear layers, time_embed, out and GroupNorms stay as they are."""
        for m in self._torso_convs():
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
        return self

    def convert_to_fp32(self) -> "ADMUNet":
        return self.convert_to_fp16(torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the torso runs in (that of its convs)."""
        return self.input_blocks[0][0].weight.dtype

    def fuse_norm_act(self, enabled: bool = True, half_out_conv: bool | None = None,
                      fused_out_head: bool | None = None) -> "ADMUNet":
        """With ``enabled`` (False undoes it, in place as well):
        run every ResBlock's GroupNorm (+ scale-shift) + SiLU pair, and the output head's, as one
        fused op (:func:`ppap_fast.ops.group_norm_act`: Triton on CUDA, float32 statistics and activation,
        one rounding to the torso dtype; without autograd recording, else its reference). Same math
        as GroupNorm32 then SiLU, rounded once instead of twice. The plain convs of ResBlocks and
        attention's output projection then run without their biases: the next fused op adds them
        (the out norm's ``in_bias``; :func:`ppap_fast.ops.bias_residual_add`, which also does the
        residual add), as the attention blocks' norms become ``group_norm_act`` without SiLU. Blocks
        whose norms were replaced (e.g. by a routed ExpertGroupNorm) keep their modules. The 2-D
        Upsample / Downsample (ResBlocks' up / down paths and the standalone ones) resample through
        :func:`ppap_fast.ops.upsample_nearest2x` / :func:`ppap_fast.ops.avg_pool2x` (Triton on
        channels_last CUDA tensors, PyTorch's results bit for bit; a strided-conv Downsample keeps its conv).
        The decoder's skip concatenations of a 2-D model go through :func:`ppap_fast.ops.cat_channels`
        (Triton on channels_last CUDA tensors, torch.cat's result bit for bit).

        ``half_out_conv`` (default True; env PPAP_FAST_HALF_OUT_CONV=0 turns it off): a half torso's output
        head writes the out norm in the torso dtype and runs the output conv (float32 in guided-diffusion, TF32
        on a GPU: inputs with a 10-bit mantissa, as fp16's) in it, the result cast back; not bit for bit the
        float32 head (fp16 rounding of the conv's inputs and output). On an H100 at ADM-256 b32: 2.9 vs 5.1 ms
        (bench_denoiser ``out_head_half_vs_float`` 0.58, the outputs 3.1e-4 apart; the guided step's difference
        from the reference 3.13e-4 with it, 3.13e-4 without).

        ``fused_out_head`` (default True; env PPAP_FAST_FUSED_OUT_HEAD=0 turns it off): with half_out_conv, the
        head's norm, SiLU and 3x3 conv as one op (:func:`ppap_fast.ops.group_norm_silu_conv3x3`: on CUDA two
        Triton passes that never write the normalised activation; the reference, the unfused half head,
        elsewhere), for plain 3x3 output convs of at most ``ops.out_head.MAX_OUT_CHANNELS`` channels and when no
        channel sums ride on the torso's output. A CUDA device's first eager forward also runs the unfused head
        and compares: beyond rounding (relative error 1e-2) it warns and keeps the unfused head. An eager
        fused head that raises (e.g. a Triton compile failure) warns once and keeps the unfused head too."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                plain = all(type(n) in (GroupNorm32, nn.GroupNorm) for n in (m.in_layers[0], m.out_layers[0]))
                m.fused_norm_act = bool(enabled) and plain and isinstance(m.in_layers[1], nn.SiLU) \
                    and isinstance(m.out_layers[1], nn.SiLU) and len(m.in_layers) == 3 and len(m.out_layers) == 4
            elif isinstance(m, AttentionBlock):
                m.fused_norm_act = bool(enabled) and type(m.norm) in (GroupNorm32, nn.GroupNorm)
            elif isinstance(m, Upsample):  # nearest 2x (before the conv, if any) as ops.upsample_nearest2x
                m.fast_resample = bool(enabled) and m.dims == 2
            elif isinstance(m, Downsample):  # the conv-less one's average pool as ops.avg_pool2x
                m.fast_resample = bool(enabled) and m.fast_pool_possible()
        self.fast_cat = bool(enabled) and isinstance(self.input_blocks[0][0], nn.Conv2d)  # 4-D activations
        self.fused_out_norm_act = bool(enabled) and type(self.out[0]) in (GroupNorm32, nn.GroupNorm) \
            and isinstance(self.out[1], nn.SiLU)
        if half_out_conv is None:
            half_out_conv = os.environ.get("PPAP_FAST_HALF_OUT_CONV", "1") != "0"
        self.half_out_conv = self.fused_out_norm_act and bool(half_out_conv) and type(self.out[2]) is nn.Conv2d
        if fused_out_head is None:
            fused_out_head = os.environ.get("PPAP_FAST_FUSED_OUT_HEAD", "1") != "0"
        self.fused_out_head = self.half_out_conv and bool(fused_out_head) and _plain_head_conv(self.out[2])
        self._fused_out_head_verified = set()  # devices whose first fused head was checked against the unfused one
        return self

    def _should_verify_fused_head(self, y) -> bool:
        """A device's first fused head, eager: checked once against the unfused half head (not while a
        CUDA graph is captured or inductor traces; on a CPU the op runs its reference)."""
        if y.device.type != "cuda" or str(y.device) in getattr(self, "_fused_out_head_verified", ()):
            return False
        return not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling()

    def _verified_fused_head(self, y, half_head):
        """y, or the unfused half head's output (and the fused head off, with a warning) where a device's
        first fused head is not finite or differs from it by more than rounding (relative error 1e-2)."""
        if not self._should_verify_fused_head(y):
            return y
        want = half_head()
        if not bool(torch.isfinite(want).all()):  # the model's own NaN / Inf: nothing to judge the op by
            return y
        if not hasattr(self, "_fused_out_head_verified"):
            self._fused_out_head_verified = set()
        self._fused_out_head_verified.add(str(y.device))
        rel = ((y.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
        if rel <= 1e-2:  # NaN fails too
            return y
        import warnings

        warnings.warn(f"ADMUNet: the fused output head (ops.group_norm_silu_conv3x3) on {y.device} differs from "
                      f"the unfused half head (relative error {rel:.3g}); using the unfused head from now on "
                      f"(fuse_norm_act(fused_out_head=False)); please report this with your GPU and versions",
                      RuntimeWarning, stacklevel=3)
        self.fused_out_head = False
        return want

    def _drop_fused_head(self, err: Exception) -> None:
        """The fused output head raised: warn once, naming the error, and use the unfused half head from now on."""
        import warnings

        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"ADMUNet: the fused output head (ops.group_norm_silu_conv3x3) raised {type(err).__name__}: "
                      f"{first_line}; using the unfused half head from now on (fuse_norm_act(fused_out_head=False)); "
                      f"please report this with your GPU and versions", RuntimeWarning, stacklevel=4)
        self.fused_out_head = False

    def _into_next_cat(self, block: nn.Module, h, emb, next_skip):
        """(block(h, emb), None), or, where the block's last layer is a fused ResBlock / channels_last
        AttentionBlock (no autograd), (a new channels_last [B, C_out + C_skip, H, W] buffer holding the block's
        output in its first C_out channels, C_out): the next decoder concatenation without a copy of h."""
        last = block[-1] if len(block) else None
        c_out = last.out_channels if isinstance(last, ResBlock) else last.channels \
            if isinstance(last, AttentionBlock) else None
        # compiled: no data_ptr checks or module attributes in the trace (fullgraph); inductor fuses the cat
        if c_out is None or next_skip is None or next_skip.dim() != 4 or torch.is_grad_enabled() \
                or torch.compiler.is_compiling() \
                or not getattr(last, "fused_norm_act", False) \
                or not next_skip.is_contiguous(memory_format=torch.channels_last):  # the fast path's layout
            return block(h, emb), None
        tgt = last._cat_target = _CatTarget(next_skip, c_out)
        try:
            y = block(h, emb)
        finally:
            last._cat_target = None
        buf = tgt.buf
        if buf is None or y.data_ptr() != buf.data_ptr() or tuple(y.shape) != (buf.shape[0], c_out, *buf.shape[2:]):
            return y, None  # it could not write there (another path, shape or dtype)
        return buf, c_out

    def set_group_norm_stats(self, mode: str) -> "ADMUNet":
        """"group" (default) or "channel": how the GroupNorm32 layers compute their statistics when
        compiled (:class:`GroupNorm32`); FastGuidedSampler sets "channel" with compile_freeze on CPU."""
        if mode not in ("group", "channel"):
            raise ValueError(f"group norm stats must be 'group' or 'channel', got {mode!r}")
        for m in self.modules():
            if isinstance(m, GroupNorm32):
                m.stats_by_channel = mode == "channel"
        return self

    def set_attention_backend(self, backend: str) -> "ADMUNet":
        """"sdpa" (default) or "math" (einsum reference, float32 softmax)."""
        if backend not in ("sdpa", "math"):
            raise ValueError(f"attention backend must be 'sdpa' or 'math', got {backend!r}")
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.use_sdpa = backend == "sdpa"
        return self

    # -- forward -----------------------------------------------------------
    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, ...], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        halvings = len(self.channel_mult) - 1
        resampled = x.shape[3:] if getattr(self, "dims", 2) == 3 else x.shape[2:]  # 3-D: inner two dims only
        check_halvable(resampled, halvings)
        timesteps = per_sample_timesteps(timesteps, x, "timesteps")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional (num_classes set)")
        if self.timestep_scale is not None:  # rescale_timesteps=True: trained on t * 1000 / diffusion_steps
            if timesteps.is_floating_point():  # guided-diffusion's rescaled t would be rescaled twice
                raise ValueError("this model rescales timesteps itself (rescale_timesteps=True): pass the original "
                                 f"integer timesteps, got {timesteps.dtype} (create guided-diffusion's diffusion "
                                 "with rescale_timesteps=False)")
            timesteps = timesteps.float() * self.timestep_scale

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.num_classes is not None:
            y = torch.as_tensor(y, device=x.device)
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"y must hold integer class indices, got {y.dtype}: pass y.long()")
            if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling() \
                    and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):  # accelerators: no host sync
                raise ValueError(f"y must be class indices in [0, {self.num_classes}), got min {int(y.min())} "
                                 f"max {int(y.max())}")
            emb = emb + self.label_emb(y)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        if getattr(self, "fast_cat", False):  # ADMUNet.fuse_norm_act (models pickled before: absent)
            from ..ops.concat import cat_channels

            # each block's output goes straight into the next concatenation's buffer where its last
            # residual op can write there (then only the skip is copied in); else a concatenation
            h, c_h = self._into_next_cat(self.middle_block, h, emb, hs[-1] if hs else None)
            for module in self.output_blocks:
                skip = hs.pop()
                if c_h is None:
                    xin = _cat_with_sums([h, skip])
                else:
                    xin = cat_channels([skip], out=h, c_off=c_h, channel_sums=getattr(h, "_ppap_channel_sums", None))
                h, c_h = self._into_next_cat(module, xin, emb, hs[-1] if hs else None)
        else:
            h = self.middle_block(h, emb)
            for module in self.output_blocks:
                h = module(torch.cat([h, hs.pop()], dim=1), emb)
        if getattr(self, "fused_out_norm_act", False):  # the torso's dtype read, x's written: no upcast pass
            if getattr(self, "half_out_conv", False) and h.dtype in (torch.float16, torch.bfloat16):
                conv = self.out[2]
                from ..ops.channel_sums import attached

                half_head = lambda: conv._conv_forward(  # noqa: E731
                    _fused_norm_act(self.out[0], h), conv.weight.to(h.dtype),
                    None if conv.bias is None else conv.bias.to(h.dtype)).to(x.dtype)
                if getattr(self, "fused_out_head", False) and attached(h) is None:
                    from ..ops.out_head import group_norm_silu_conv3x3

                    norm = self.out[0]
                    fused_head = lambda: group_norm_silu_conv3x3(  # noqa: E731
                        h, norm.num_groups, norm.weight, norm.bias, norm.eps,
                        conv_weight=conv.weight, conv_bias=conv.bias, out_dtype=x.dtype)
                    if torch.compiler.is_compiling():  # no exception handling in the trace
                        return fused_head()
                    try:
                        y = fused_head()
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as err:  # e.g. a Triton compile failure on a new GPU
                        self._drop_fused_head(err)
                        return half_head()
                    return self._verified_fused_head(y, half_head)
                return half_head()
            head = self.out[2].weight.dtype
            return self.out[2](_fused_norm_act(self.out[0], h, out_dtype=head)).type(x.dtype)
        # the head in its weights' dtype, the result in x's (x of another dtype failed at the output conv)
        return self.out(h.type(self.out[2].weight.dtype)).type(x.dtype)

    # -- construction from configs -----------------------------------------
    @classmethod
    def config_to_kwargs(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs from: UNetModel kwargs (e.g. a fixture's `config`, extra keys
        learn_sigma / attention_resolutions_str ignored), guided-diffusion script flags
        (num_channels, attention_resolutions="32,16,8", ...), or a manifest holding `unet_kwargs`."""
        config = dict(config)
        if "unet_kwargs" in config:
            return cls.config_to_kwargs(config["unet_kwargs"])
        if _flag_bool("predict_xstart", config.get("predict_xstart", False)):  # it was ignored: x0 read as eps
            raise ValueError("predict_xstart=True: this model predicts x0, and ppap_fast samples eps-prediction "
                             "models (guided-diffusion's default, predict_xstart=False)")
        if "model_channels" not in config:
            return adm_kwargs_from_flags(config)
        known = set(_INIT_ARGS)
        ignored = {"learn_sigma", "attention_resolutions_str", "class_cond"} | _DIFFUSION_FLAGS
        unknown = set(config) - known - ignored
        if unknown:
            raise ValueError(f"unknown ADMUNet config keys: {sorted(unknown)}")
        _check_flags_agree_with_kwargs(config)
        return {k: v for k, v in config.items() if k in known}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str, **overrides) -> "ADMUNet":
        """Build from a config dict (see config_to_kwargs) or a preset name in ADM_PRESETS. ``overrides``:
        UNetModel arguments, or (for script flags and presets) flags such as class_cond / learn_sigma."""
        if isinstance(config, str):
            if config not in ADM_PRESETS:
                from .registry import did_you_mean

                raise ValueError(f"unknown ADM preset {config!r}{did_you_mean(config, ADM_PRESETS)}; known: "
                                 f"{sorted(ADM_PRESETS)}")
            config = ADM_PRESETS[config]
        not_kwargs = sorted(k for k in overrides if k not in _INIT_ARGS)
        if not_kwargs:  # script flags (class_cond=True, num_channels=...) were the constructor's TypeError
            if "model_channels" in config or "unet_kwargs" in config:
                raise ValueError(f"overrides {not_kwargs} are not ADMUNet arguments, and this config gives "
                                 f"UNetModel arguments: override those ({', '.join(_INIT_ARGS)})")
            config = {**config, **{k: overrides.pop(k) for k in not_kwargs}}  # flags: applied to the flags
        kwargs = cls.config_to_kwargs(config)
        kwargs.update(overrides)
        trained = _flags_schedule(config)
        model = cls(**kwargs)
        model.trained_schedule = trained  # the samplers refuse another schedule (they were ignored)
        if _flag_bool("rescale_timesteps", config.get("rescale_timesteps", False)) and trained and trained[1] != 1000:
            model.timestep_scale = 1000.0 / trained[1]  # was ignored: the samplers fed raw t
        return model

    @classmethod
    def from_checkpoint(cls, path, config: Mapping[str, Any] | str, map_location="cpu", strict: bool = True,
                        **overrides) -> "ADMUNet":
        """Build from `config` and load the official guided-diffusion .pt state_dict at ``path`` (weights_only,
        ``map_location``: the device the returned model is on, a str or torch.device, default the CPU).
        An unreadable file, or (strict) any missing / unexpected / misshaped key or non-finite value, is a
        :class:`ppap_fast.models.offtheshelf.CheckpointError` naming the file and the differing keys; with
        ``strict=False`` missing / unexpected keys are a warning naming them, the rest still an error."""
        from .offtheshelf import CheckpointError, load_state_dict_strict, read_state_dict

        if not isinstance(map_location, (str, torch.device)):
            raise TypeError(f"map_location must be a device (a str such as 'cuda' or a torch.device), got "
                            f"{type(map_location).__name__}")
        device = torch.device(map_location)
        model = cls.from_config(config, **overrides)
        state = read_state_dict(path)
        what = f"ADM UNet {config!r}" if isinstance(config, str) else "the ADM UNet config given"
        if strict:
            try:
                load_state_dict_strict(model, state, what=what, source=str(path))
            except CheckpointError as e:
                notes = _variant_notes(model, state)
                if not notes:
                    raise
                raise CheckpointError(f"checkpoint {path} does not fit {what}: {'; '.join(notes)} ({e})") from None
        else:
            _load_partial(model, state, what, path)
        return model.to(device).eval()  # was left on the CPU whatever map_location said


def _load_partial(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, path) -> None:
    """from_checkpoint(strict=False): the keys that fit are loaded; a misshaped key or non-finite value is still a
    CheckpointError, and missing / unexpected keys are named in a warning (they were dropped without a word)."""
    import warnings

    from .offtheshelf import CheckpointError

    own = model.state_dict()
    bad = [f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(v.shape)}"
           for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"checkpoint {path} does not fit {what} even with strict=False: {len(bad)} shape "
                              f"mismatches {bad[:8]}: build the model from the checkpoint's config")
    nonfinite = [k for k, v in state.items() if k in own and v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"checkpoint {path} has non-finite values in {nonfinite[:8]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        warnings.warn(f"checkpoint {path} loaded partially into {what} (strict=False): {len(missing)} missing keys "
                      f"keep their initial values {missing[:8]}, {len(unexpected)} unexpected keys ignored "
                      f"{unexpected[:8]}", UserWarning, stacklevel=3)


def _check_flags_agree_with_kwargs(config: Mapping[str, Any]) -> None:
    """class_cond / learn_sigma beside UNetModel kwargs must say what num_classes / out_channels say (they
    are not applied: a contradiction built another model than the flags describe)."""
    if "class_cond" in config:
        n = config.get("num_classes")
        if _flag_bool("class_cond", config["class_cond"]) != (n is not None):
            raise ValueError(f"class_cond={config['class_cond']!r} contradicts num_classes={n!r}: give "
                             f"num_classes={NUM_CLASSES} for a class-conditional model, None (or left out) otherwise")
    if "learn_sigma" in config and "in_channels" in config and "out_channels" in config:
        c, out = int(config["in_channels"]), int(config["out_channels"])
        want = 2 * c if _flag_bool("learn_sigma", config["learn_sigma"]) else c
        if out != want:
            raise ValueError(f"learn_sigma={config['learn_sigma']!r} contradicts out_channels={out} "
                             f"(in_channels={c}): give out_channels={want}, or the other learn_sigma")


def _flags_schedule(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(noise_schedule, diffusion_steps) that a config's diffusion flags name, guided-diffusion's defaults
    (linear, 1000) for the one left out; None where it names neither."""
    if "noise_schedule" not in config and "diffusion_steps" not in config:
        return None
    from ..schedule import SCHEDULE_NAMES

    name = config.get("noise_schedule", "linear")
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"noise_schedule={name!r}: ppap_fast samples the schedules {list(SCHEDULE_NAMES)} only")
    return name, int(config.get("diffusion_steps", 1000))


def _variant_notes(model: ADMUNet, state: Mapping[str, Any]) -> list:
    """learn_sigma / class_cond differences between a model and a checkpoint, in the flags' words (the
    generic hint read 'number of classes?' for a learned-sigma output conv)."""
    notes = []
    w = state.get("out.2.weight")
    if isinstance(w, torch.Tensor) and w.shape[1:] == model.out[2].weight.shape[1:] \
            and w.shape[0] != model.out_channels:  # same head conv, other output count
        c = model.in_channels
        kind = {c: "eps only", 2 * c: "eps and learned sigmas"}
        if w.shape[0] in kind and model.out_channels in kind:
            notes.append(f"the checkpoint predicts {kind[w.shape[0]]} ({w.shape[0]} output channels), the model "
                         f"{kind[model.out_channels]} ({model.out_channels}): learn_sigma={w.shape[0] == 2 * c} "
                         f"(out_channels={w.shape[0]})")
    emb = state.get("label_emb.weight")
    if isinstance(emb, torch.Tensor) and emb.ndim == 2 and emb.shape[0] != model.num_classes:
        notes.append(f"the checkpoint is class-conditional ({emb.shape[0]} classes): class_cond=True "
                     f"(num_classes={emb.shape[0]})")
    elif emb is None and model.num_classes is not None:
        notes.append("the checkpoint is unconditional (no label_emb): class_cond=False (num_classes=None)")
    return notes


def check_preset_schedule(preset: str, schedule: str, num_timesteps: int | None) -> None:
    """Raise if the ADM preset was trained on another noise schedule / number of steps than the run
    samples with (``num_timesteps`` None: 1000); an unknown preset is left to :meth:`ADMUNet.from_config`."""
    flags = ADM_PRESETS.get(preset)
    if flags is None:
        return
    theirs, T = flags.get("noise_schedule", "linear"), int(flags.get("diffusion_steps", 1000))
    n = 1000 if num_timesteps is None else int(num_timesteps)
    if (theirs, T) != (schedule, n):
        where = f"denoiser 'adm:{preset}'"
        if T != n and num_timesteps is None:
            raise ValueError(f"{where} was trained over {T} steps; this command samples over 1000 only")
        raise ValueError(f"{where} was trained on the {theirs} schedule over {T} steps; this run samples "
                         f"{schedule!r} over {n}: pass --schedule {theirs}" + (f" --num-timesteps {T}" if T != n else ""))


_INIT_ARGS = (
    "image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
    "dropout", "channel_mult", "conv_resample", "dims", "num_classes", "use_checkpoint", "use_fp16", "num_heads",
    "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
)


_BOOL_FLAGS = ("class_cond", "use_checkpoint", "use_scale_shift_norm", "resblock_updown", "use_fp16",
               "use_new_attention_order", "learn_sigma")


def _flag_bool(name: str, v) -> bool:
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("true", "t", "yes", "y", "1"):
            return True
        if low in ("false", "f", "no", "n", "0"):
            return False
        raise ValueError(f"ADM flag {name}={v!r} is not a boolean (True / False)")
    return bool(v)


def _attention_resolutions_flag(v) -> list[int]:
    """The attention_resolutions script flag ("32,16,8", an int, or a list of ints) as resolutions."""
    items = v.split(",") if isinstance(v, str) else [v] if isinstance(v, int) else list(v)
    try:
        res = [int(r.strip()) if isinstance(r, str) else operator.index(r) for r in items
               if not (isinstance(r, str) and not r.strip())]
    except (TypeError, ValueError):
        res = [0]
    if any(r <= 0 for r in res):
        raise ValueError(f"attention_resolutions={v!r} must be positive integer resolutions, e.g. \"32,16,8\"")
    return res


def adm_kwargs_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """guided-diffusion create_model(): script flags -> UNetModel kwargs (defaults filled in)."""
    unknown = set(flags) - set(ADM_FLAG_DEFAULTS) - _DIFFUSION_FLAGS
    if unknown:
        raise ValueError(f"unknown ADM flags: {sorted(unknown)}")
    f = {**ADM_FLAG_DEFAULTS, **flags}
    for k in _BOOL_FLAGS:  # script flags read as strings: bool("False") is True
        f[k] = _flag_bool(k, f[k])
    size = int(f["image_size"])
    cm = f["channel_mult"]
    if cm == "" or cm is None:
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if size not in defaults:
            raise ValueError(f"no default channel_mult for image_size {size}; pass channel_mult")
        cm = defaults[size]
    elif isinstance(cm, str):
        cm = tuple(int(c) for c in cm.split(","))
    ar = _attention_resolutions_flag(f["attention_resolutions"])
    reached = [size // 2 ** k for k in range(len(cm))]
    missed = [r for r in ar if r not in reached]
    if missed:  # image_size // r matched no level: the model was built without that attention, silently
        raise ValueError(f"attention_resolutions={f['attention_resolutions']!r}: {missed} not among the resolutions "
                         f"this UNet runs at ({reached}: image_size {size} halved {len(cm) - 1} times)")
    return dict(
        image_size=size, in_channels=3, model_channels=int(f["num_channels"]),
        out_channels=6 if f["learn_sigma"] else 3, num_res_blocks=int(f["num_res_blocks"]),
        attention_resolutions=tuple(size // int(r) for r in ar), dropout=float(f["dropout"]),
        channel_mult=tuple(cm), num_classes=NUM_CLASSES if f["class_cond"] else None,
        use_checkpoint=bool(f["use_checkpoint"]), use_fp16=bool(f["use_fp16"]), num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]), num_heads_upsample=int(f["num_heads_upsample"]),
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]), resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
    )
