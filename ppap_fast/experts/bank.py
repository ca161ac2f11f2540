"""ExpertBank: one frozen backbone shared by N timestep experts, routed per sample.

``bank(x, t)`` sends every sample of the batch to the expert of its own timestep
band ``[n*T/N, (n+1)*T/N)`` (half-open: with T=1000, N=5, t=199 -> 0, t=200 -> 1).
The placed modules of the wrapped model are replaced by routed modules
(:class:`RoutedLinear`, :class:`RoutedConv2d`, :class:`RoutedBias`,
:class:`ExpertBatchNorm`, :class:`ExpertLayerNorm`, :class:`ExpertGroupNorm`).
Their per-expert tensors are stacked ``[N, ...]`` so that fused ops index them;
they read the current per-sample expert index from a small router object owned
by their bank (set for the duration of one forward, restored afterwards; no
global state, so several banks and nested calls do not interfere).
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
import warnings
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import conv_lora_shapes, factorised_conv_delta, init_lora_, linear_lora_shapes, loralib_conv_delta
from .placement import NORM_TYPES, Placement, make_placement


def _ops():
    """The routed LoRA ops: the dispatching package API when present, else its reference."""
    import ppap_fast.ops.lora as pkg

    if hasattr(pkg, "lora_linear"):
        return pkg
    from ppap_fast.ops.lora import reference

    return reference


def _norm_ops():
    """The dispatched per-expert norm ops (ops.norm: triton on CUDA, reference elsewhere)."""
    from ppap_fast.ops import norm

    return norm


class _Router:
    """Holds the per-sample expert index of the forward in flight."""

    __slots__ = ("idx", "_seg")

    def __init__(self):
        self.idx = None
        self._seg = None

    def set(self, idx):
        prev = (self.idx, self._seg)
        self.idx, self._seg = idx, None
        return prev

    def restore(self, prev):
        self.idx, self._seg = prev

    def segments(self, x, n_experts):
        """Sort-by-expert metadata shared by all routed layers of one forward (CUDA fast paths)."""
        if x.device.type != "cuda":
            return None
        if self._seg is None:
            ops = _ops()
            if not hasattr(ops, "build_segments"):
                return None
            self._seg = ops.build_segments(self.idx, n_experts)
        return self._seg


def _frozen(t):
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False)


def nonfinite_after_cast(dst: dict, src: dict) -> list:
    """Names of floating ``src`` tensors that hold NaN / Inf, or whose values overflow to Inf when cast to the
    dtype of ``dst[name]`` (an fp32 running_var of 1e5 in an fp16 bank), or that hold non-integers for an integer
    ``dst[name]``: loading them would run wrong numbers."""
    bad = []
    for k, v in src.items():
        d = dst.get(k)
        if d is None or not v.is_floating_point():
            continue
        if not d.is_floating_point():  # e.g. num_batches_tracked: copy_ truncates 2.5 to 2, NaN to garbage
            if not torch.isfinite(v).all() or not torch.equal(v, v.trunc()):
                bad.append(f"{k} (non-integer values for {d.dtype})")
            continue
        if not torch.isfinite(v).all():
            bad.append(f"{k} (non-finite values)")
        elif not torch.isfinite(v.to(d.dtype)).all():
            bad.append(f"{k} (overflows {d.dtype}: max |value| {v.abs().max().item():.4g})")
    return sorted(bad)


def _stack(t, n):
    return nn.Parameter(t.detach().clone().unsqueeze(0).repeat(n, *([1] * t.dim())))


class _Routed(nn.Module):
    """Base of routed modules; ``per_expert`` lists the names of the stacked [N, ...] tensors."""

    per_expert: tuple = ()

    def __init__(self, router: _Router, n_experts: int):
        super().__init__()
        object.__setattr__(self, "_router", router)  # plain attribute, never a submodule
        self.n_experts = n_experts

    def _idx(self, x):
        idx = self._router.idx
        if idx is None:
            raise RuntimeError(f"{type(self).__name__} was called outside its ExpertBank's forward "
                               "(no expert index is set); call the bank, not the inner model")
        if x.shape[0] != idx.shape[0]:
            raise RuntimeError(f"{type(self).__name__}: input has {x.shape[0]} samples but the bank routed "
                               f"{idx.shape[0]}; the leading dimension must stay the sample dimension")
        return idx

    def to_plain(self, n: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- LoRA modules
class _RoutedLoRA(_Routed):
    """Frozen base weight/bias + stacked per-expert LoRA A/B (and optionally per-expert bias)."""

    def _init_lora(self, base: nn.Module, r, alpha, a_shape, b_shape, per_expert_bias: bool):
        self.r, self.alpha = r, float(alpha)
        self.weight = _frozen(base.weight)
        if per_expert_bias:
            if base.bias is None:
                raise ValueError(f"per-expert bias requested for a {type(base).__name__} without bias")
            self.bias = None
            self.expert_bias = _stack(base.bias, self.n_experts)
        else:
            self.bias = _frozen(base.bias)
            self.expert_bias = None
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty((self.n_experts, *a_shape), **kw))
        self.lora_B = nn.Parameter(torch.empty((self.n_experts, *b_shape), **kw))
        init_lora_(self.lora_A, self.lora_B, stacked=True)
        self.per_expert = ("lora_A", "lora_B") + (("expert_bias",) if per_expert_bias else ())

    @property
    def scale(self):
        return self.alpha / self.r


class RoutedLinear(_RoutedLoRA):
    def __init__(self, base: nn.Linear, router, n_experts, r, alpha, per_expert_bias=False):
        super().__init__(router, n_experts)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_lora(base, r, alpha, *linear_lora_shapes(base, r), per_expert_bias)

    def delta_weight(self, n: int):
        return (self.lora_B[n] @ self.lora_A[n]) * self.scale

    def forward(self, x):
        idx, ops = self._idx(x), _ops()
        seg = self._router.segments(x, self.n_experts)
        kw = {} if seg is None else {"segments": seg}
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, idx, self.scale,
                               self.expert_bias, **kw)

    def to_plain(self, n):
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None or self.expert_bias is not None,
                        device="meta")
        lin.weight = nn.Parameter((self.weight + self.delta_weight(n)).detach().clone(), requires_grad=False)
        b = self.expert_bias[n] if self.expert_bias is not None else self.bias
        if b is not None:
            lin.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        return lin


def _as_int(v):
    """A Python int for integer scalars (numpy's included); anything else unchanged (for the caller's error)."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def as_int_or_tensor(v, numpy_scalars_as_tensors: bool = False):
    """Timesteps / indices as an int or tensor: integer scalars (numpy's, 0-d numpy int arrays) -> int, other
    numpy arrays -> tensors (their dtype checked by the caller); anything else unchanged (for the caller's error).
    ``numpy_scalars_as_tensors``: other numpy scalars (floats, bools) -> 0-d tensors too, for a caller whose
    tensor dtype check names them (sampling._index_tensor)."""
    if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0 and v.dtype.kind in "iu":
        return int(v)
    if type(v).__module__ == "numpy" and (type(v).__name__ == "ndarray" or (numpy_scalars_as_tensors and
                                                                            hasattr(v, "dtype"))):
        return torch.as_tensor(v)
    return _as_int(v)


LORALIB_CONV_ROUTES = ("delta", "factorised", "lowrank")


def loralib_conv_route(device: torch.device | str | None = None) -> str:
    """How a routed loralib-layout conv (groups 1) on ``device`` runs (the default: "lowrank" on a CPU, where
    a ResNet18 PPAP-5 training step took 0.16x the delta route's time on 2 cores (bench_distill
    ``distill_resnet18_lowrank_vs_delta``), "delta" elsewhere until a GPU times it; PPAP_FAST_LORALIB_CONV picks
    one everywhere): "delta" (dense per-expert deltas through lora_conv2d_delta), "factorised"
    (PPAP_FAST_LORALIB_CONV=factorised: the exactly equal rank r*kh*kh factorised LoRA through lora_conv2d's
    implicit A stage: the base conv once plus each sample's own expert, instead of the delta path's N dense
    convs on CUDA) or "lowrank"
    (PPAP_FAST_LORALIB_CONV=lowrank: ops.lora.vectorized.loralib_conv2d_lowrank, the base conv once plus
    the LoRA's low-rank factors as one stacked grouped cuDNN conv (N*r*kh channels over ~C_in/kh-channel
    windows) and one bmm: about r*kh/C_out of the delta route's N-fold conv FLOPs; per conv, where that
    takes fewer multiply-adds than the delta route: vectorized.lowrank_is_cheaper, else the delta route)."""
    import os

    on_cpu = device is not None and torch.device(device).type == "cpu"
    route = os.environ.get("PPAP_FAST_LORALIB_CONV", "").strip().lower() or ("lowrank" if on_cpu else "delta")
    if route not in LORALIB_CONV_ROUTES:
        raise ValueError(f"PPAP_FAST_LORALIB_CONV must be one of {LORALIB_CONV_ROUTES}, got {route!r}")
    return route


def _conv_like(c, weight, bias):
    if c._plain is not None:  # timm's Conv2dSame: that class back, with its dynamic padding
        return _fill_shell(c._plain, {"weight": weight.detach().clone(),
                                      **({"bias": bias.detach().clone()} if bias is not None else {})}, {})
    conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                     bias=bias is not None, device="meta")
    conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return conv


def _conv_geometry(self, base: nn.Conv2d):
    if base.padding_mode != "zeros":
        raise ValueError(f"routed conv supports padding_mode='zeros' only, got {base.padding_mode!r}")
    self.in_channels, self.out_channels = base.in_channels, base.out_channels
    self.kernel_size, self.stride, self.padding = base.kernel_size, base.stride, base.padding
    self.dilation, self.groups = base.dilation, base.groups
    self.same_pad = _qualname(base) in SAME_PADDING_CONVS  # its padding is 0: the input is padded per call
    object.__setattr__(self, "_plain", _plain_shell(base) if self.same_pad else None)
    self.uneven_same_pads = _uneven_same_pads(base)


def _uneven_same_pads(base: nn.Conv2d):
    """padding='same' with an even effective kernel (dilation * (k - 1) odd), which the LoRA ops refuse: F.pad's
    (left, right, top, bottom), the odd pixel right / bottom as F.conv2d; None otherwise."""
    if base.padding != "same":
        return None
    th, tw = (d * (k - 1) for k, d in zip(base.kernel_size, base.dilation))
    return None if th % 2 == 0 and tw % 2 == 0 else (tw // 2, tw - tw // 2, th // 2, th - th // 2)


def _pad_same(x, kernel_size, stride, dilation):
    """TF 'SAME' padding of ``x`` for its own height and width (timm's Conv2dSame): output size ceil(in / stride),
    the odd pixel on the bottom / right."""
    pads = []
    for size, k, st, d in zip(x.shape[-2:], kernel_size, stride, dilation):
        total = max((-(-size // st) - 1) * st + (k - 1) * d + 1 - size, 0)
        pads = [total // 2, total - total // 2] + pads
    return F.pad(x, pads)


class RoutedConv2d(_RoutedLoRA):
    """Conv2d + per-expert LoRA (``layout`` "factorised" or "loralib", see experts.lora)."""

    def __init__(self, base: nn.Conv2d, router, n_experts, r, alpha, layout="factorised", per_expert_bias=False):
        super().__init__(router, n_experts)
        _conv_geometry(self, base)
        self.layout = layout
        self._init_lora(base, r, alpha, *conv_lora_shapes(base, r, layout), per_expert_bias)

    def delta_weights(self):
        """Scaled dense deltas of all experts, [N, *W.shape]."""
        if self.layout == "factorised":
            return factorised_conv_delta(self.lora_A, self.lora_B, self.groups) * self.scale
        return loralib_conv_delta(self.lora_A, self.lora_B, self.weight.shape) * self.scale

    def delta_weight(self, n: int):
        if self.layout == "factorised":
            return factorised_conv_delta(self.lora_A[n], self.lora_B[n], self.groups) * self.scale
        return loralib_conv_delta(self.lora_A[n], self.lora_B[n], self.weight.shape) * self.scale

    def forward(self, x):
        idx = self._idx(x)
        if self.same_pad:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        padding = self.padding
        if self.uneven_same_pads is not None:  # padded here, as F.conv2d does for these
            x, padding = F.pad(x, self.uneven_same_pads), 0
        ops = _ops()
        if self.layout == "factorised" or (self.groups == 1 and loralib_conv_route(x.device) == "factorised"):
            seg = self._router.segments(x, self.n_experts)
            kw = {} if seg is None else {"segments": seg}
            A, B = self.lora_A, self.lora_B
            if self.layout == "loralib":  # the same delta as a factorised LoRA of rank r*kh*kh
                from ppap_fast.ops.lora.reference import loralib_conv_as_factorised

                A, B = loralib_conv_as_factorised(A, B, self.in_channels, *self.kernel_size)
                kw["a_stage"] = "implicit"  # its own expert only: the stacked A stage would be N*r*kh*kh wide
                kw["a_blocks"] = self.kernel_size[0]  # A is kh blocks on a diagonal: skip the zeros
            return ops.lora_conv2d(x, self.weight, self.bias, A, B, idx, self.scale,
                                   self.stride, padding, self.dilation, self.groups, self.expert_bias, **kw)
        if self.groups == 1 and x.shape[0] and loralib_conv_route(x.device) == "lowrank":
            from ppap_fast.ops.lora import vectorized as V

            if V.lowrank_is_cheaper(self.n_experts, self.out_channels, self.in_channels, *self.kernel_size,
                                    self.lora_A.shape[1]):
                return V.loralib_conv2d_lowrank(x, self.weight, self.bias, self.lora_A, self.lora_B, idx,
                                                self.scale, self.stride, padding, self.dilation,
                                                self.expert_bias)
        return ops.lora_conv2d_delta(x, self.weight, self.bias, self.delta_weights(), idx, self.stride,
                                     padding, self.dilation, self.groups, self.expert_bias)

    def to_plain(self, n):
        b = self.expert_bias[n] if self.expert_bias is not None else self.bias
        return _conv_like(self, self.weight + self.delta_weight(n), b)


class RoutedBias(_Routed):
    """A frozen Linear / Conv2d whose bias is per expert (no LoRA)."""

    def __init__(self, base: nn.Module, router, n_experts):
        super().__init__(router, n_experts)
        if not isinstance(base, (nn.Linear, nn.Conv2d)) or base.bias is None:
            raise ValueError(f"RoutedBias needs a Linear or Conv2d with a bias, got {type(base).__name__}")
        self.is_conv = isinstance(base, nn.Conv2d)
        if self.is_conv:
            _conv_geometry(self, base)
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
            self._plain = None
        self.weight = _frozen(base.weight)
        self.expert_bias = _stack(base.bias, n_experts)
        self.per_expert = ("expert_bias",)

    def forward(self, x):
        idx = self._idx(x)
        b = self.expert_bias[idx]
        if self.is_conv:
            if self.same_pad:
                x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
            y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
            return y + b[:, :, None, None]
        y = F.linear(x, self.weight)
        return y + b.view(b.shape[0], *([1] * (y.dim() - 2)), b.shape[1])

    def to_plain(self, n):
        if self.is_conv:
            return _conv_like(self, self.weight, self.expert_bias[n])
        lin = nn.Linear(self.in_features, self.out_features, device="meta")
        lin.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)
        lin.bias = nn.Parameter(self.expert_bias[n].detach().clone(), requires_grad=False)
        return lin


# ----------------------------------------------------------------------------- norms
# subclasses whose own forward the routed norms reproduce: a LayerNorm over the channels of NCHW maps, and timm's
# BatchNorm2d followed by its ``drop`` and ``act`` submodules
CHANNELS_FIRST_LAYER_NORMS = frozenset({"timm.layers.norm.LayerNorm2d", "torchvision.models.convnext.LayerNorm2d"})
BATCH_NORM_ACTS = frozenset({"timm.layers.norm_act.BatchNormAct2d"})
# timm's GroupNorm followed by its ``drop`` and ``act``; timm's Conv2dSame (padding 0, the input padded per call)
GROUP_NORM_ACTS = frozenset({"timm.layers.norm_act.GroupNormAct", "timm.layers.norm_act.GroupNorm1Act"})
SAME_PADDING_CONVS = frozenset({"timm.layers.conv2d_same.Conv2dSame"})


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _plain_shell(base: nn.Module) -> nn.Module:
    """A copy of ``base`` (its class and settings) without its own tensors and children, for ``to_plain``."""
    memo = {id(t): None for t in (*base.parameters(recurse=False), *base.buffers(recurse=False), *base.children())}
    return copy.deepcopy(base, memo)


def _fill_shell(shell: nn.Module, tensors: dict, children: dict) -> nn.Module:
    plain = copy.deepcopy(shell)
    for k, v in tensors.items():
        setattr(plain, k, nn.Parameter(v, requires_grad=False) if k in plain._parameters else v)
    for k, m in children.items():
        setattr(plain, k, copy.deepcopy(m))
    return plain


class _ExpertAffine(_Routed):
    def _init_affine(self, base, n_experts, per_expert_weight):
        if base.bias is None or base.weight is None:
            what = "without a bias (bias=False)" if base.weight is not None else "without affine parameters"
            raise ValueError(f"{type(base).__name__} {what} cannot have per-expert affine parameters")
        if per_expert_weight:
            self.expert_weight = _stack(base.weight, n_experts)
            self.weight = None
        else:
            self.expert_weight = None
            self.weight = _frozen(base.weight)
        self.expert_bias = _stack(base.bias, n_experts)
        self.per_expert = (("expert_weight",) if per_expert_weight else ()) + ("expert_bias",)

    def _weights(self):
        if self.expert_weight is not None:
            return self.expert_weight
        return self.weight.unsqueeze(0).expand(self.n_experts, -1)

    def _affine_n(self, n):
        w = self.expert_weight[n] if self.expert_weight is not None else self.weight
        return w.detach().clone(), self.expert_bias[n].detach().clone()


class ExpertBatchNorm(_ExpertAffine):
    """BatchNorm1d/2d with per-expert bias (and weight), and per-expert running statistics; replacing timm's
    BatchNormAct2d it then runs that module's ``drop`` and ``act`` (and ``to_plain`` gives back that class).

    Train mode normalises each expert's samples with that expert's own batch statistics and
    updates only its running stats (``momentum=None``, the cumulative average, is not supported); an
    expert with one value per channel (one sample of [S, C] or 1x1 maps) keeps its statistics.
    """

    def __init__(self, base, router, n_experts, per_expert_weight=True):
        super().__init__(router, n_experts)
        if not isinstance(base, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise ValueError(f"ExpertBatchNorm wraps BatchNorm1d/2d, got {type(base).__name__}")
        if not base.track_running_stats or base.momentum is None:
            raise ValueError("ExpertBatchNorm needs track_running_stats=True and a float momentum")
        self.kind = type(base)
        self.num_features, self.eps, self.momentum = base.num_features, base.eps, base.momentum
        self._plain = None
        if _qualname(base) in BATCH_NORM_ACTS:
            self.drop, self.act = base.drop, base.act
            object.__setattr__(self, "_plain", _plain_shell(base))
        self._init_affine(base, n_experts, per_expert_weight)
        self.register_buffer("running_mean", base.running_mean.detach().clone().unsqueeze(0).repeat(n_experts, 1))
        self.register_buffer("running_var", base.running_var.detach().clone().unsqueeze(0).repeat(n_experts, 1))
        self.register_buffer("num_batches_tracked",
                             base.num_batches_tracked.detach().clone().reshape(1).repeat(n_experts))
        self.per_expert = self.per_expert + ("running_mean", "running_var", "num_batches_tracked")

    def forward(self, x):
        idx = self._idx(x)
        y = _norm_ops().expert_batch_norm(x, idx, self._weights(), self.expert_bias, self.running_mean,
                                          self.running_var, self.training, self.momentum, self.eps,
                                          segments=self._router.segments(x, self.n_experts))
        if self.training:  # counted once the op ran (a call it refused counts nothing)
            with torch.no_grad():  # index_add, not bincount: no host sync (CUDA graphs)
                seen = torch.zeros(self.n_experts, dtype=torch.int64, device=idx.device)
                seen.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int64))
                # the op updates the stats of experts with more than one value per channel: count those
                updated = seen * math.prod(x.shape[2:]) > 1
                self.num_batches_tracked.add_(updated.to(self.num_batches_tracked.dtype))
        if self._plain is not None:
            y = self.act(self.drop(y))
        return y

    def to_plain(self, n):
        if self._plain is not None:
            w, b = self._affine_n(n)
            stats = {k: getattr(self, k)[n].detach().clone() for k in ("running_mean", "running_var",
                                                                         "num_batches_tracked")}
            return _fill_shell(self._plain, {"weight": w, "bias": b, **stats}, {"drop": self.drop, "act": self.act})
        bn = self.kind(self.num_features, eps=self.eps, momentum=self.momentum, device="meta")
        w, b = self._affine_n(n)
        bn.weight = nn.Parameter(w, requires_grad=False)
        bn.bias = nn.Parameter(b, requires_grad=False)
        bn.register_buffer("running_mean", self.running_mean[n].detach().clone())
        bn.register_buffer("running_var", self.running_var[n].detach().clone())
        bn.register_buffer("num_batches_tracked", self.num_batches_tracked[n].detach().clone())
        return bn


class ExpertLayerNorm(_ExpertAffine):
    """LayerNorm over the last dimension with per-expert bias (and weight); replacing a LayerNorm2d (timm's,
    torchvision's) it normalises the channels of NCHW maps (and ``to_plain`` gives back that class)."""

    def __init__(self, base: nn.LayerNorm, router, n_experts, per_expert_weight=True):
        super().__init__(router, n_experts)
        if len(base.normalized_shape) != 1:
            raise ValueError(f"ExpertLayerNorm supports a 1-D normalized_shape, got {base.normalized_shape}")
        self.normalized_shape, self.eps = tuple(base.normalized_shape), base.eps
        self._init_affine(base, n_experts, per_expert_weight)
        self.channels_first = _qualname(base) in CHANNELS_FIRST_LAYER_NORMS
        object.__setattr__(self, "_plain", _plain_shell(base) if self.channels_first else None)

    def forward(self, x):
        idx = self._idx(x)
        if self.channels_first:
            if x.dim() != 4:
                raise ValueError(f"{type(self._plain).__name__} normalises the channels of [B, C, H, W] maps, "
                                 f"got shape {tuple(x.shape)}")
            x = x.permute(0, 2, 3, 1)
        y = _norm_ops().expert_layer_norm(x, idx, self._weights(), self.expert_bias, self.eps,
                                          segments=self._router.segments(x, self.n_experts))
        return y.permute(0, 3, 1, 2) if self.channels_first else y

    def to_plain(self, n):
        if self._plain is not None:
            w, b = self._affine_n(n)
            return _fill_shell(self._plain, {"weight": w, "bias": b}, {})
        ln = nn.LayerNorm(self.normalized_shape, eps=self.eps, device="meta")
        w, b = self._affine_n(n)
        ln.weight, ln.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
        return ln


def _computes_in_fp32(norm: nn.Module) -> bool:
    """guided-diffusion's GroupNorm32 (ours in models.adm, or the official class of that name): the
    norm runs in float32 and its result is cast back to the input dtype (fp16 torsos)."""
    return type(norm).__name__ == "GroupNorm32"


class ExpertGroupNorm(_ExpertAffine):
    """GroupNorm with per-expert bias (and weight). Replacing a GroupNorm32 keeps its float32
    computation for half inputs (and ``to_plain`` gives back that class); replacing timm's GroupNormAct it
    then runs that module's ``drop`` and ``act`` (and ``to_plain`` gives back that class)."""

    def __init__(self, base: nn.GroupNorm, router, n_experts, per_expert_weight=True):
        super().__init__(router, n_experts)
        self.num_groups, self.num_channels, self.eps = base.num_groups, base.num_channels, base.eps
        self.fp32 = _computes_in_fp32(base)
        self.plain_cls = type(base)
        self._plain = None
        if _qualname(base) in GROUP_NORM_ACTS:
            self.drop, self.act = base.drop, base.act
            object.__setattr__(self, "_plain", _plain_shell(base))
        self._init_affine(base, n_experts, per_expert_weight)

    def forward(self, x):
        idx = self._idx(x)
        xin, w, b = x, self._weights(), self.expert_bias
        if self.fp32:
            dt = torch.promote_types(x.dtype, torch.float32)
            xin, w, b = x.to(dt), w.to(dt), b.to(dt)
        y = _norm_ops().expert_group_norm(xin, idx, self.num_groups, w, b, self.eps,
                                          segments=self._router.segments(x, self.n_experts))
        y = y.to(x.dtype) if self.fp32 else y
        return self.act(self.drop(y)) if self._plain is not None else y

    def to_plain(self, n):
        if self._plain is not None:
            w, b = self._affine_n(n)
            return _fill_shell(self._plain, {"weight": w, "bias": b}, {"drop": self.drop, "act": self.act})
        gn = None
        if self.fp32:  # other subclasses compute as nn.GroupNorm, and may order their arguments otherwise (timm's)
            try:
                gn = self.plain_cls(self.num_groups, self.num_channels, eps=self.eps, device="meta")
            except TypeError:  # another constructor: plain GroupNorm (same math in fp32 inputs)
                pass
        if gn is None:
            gn = nn.GroupNorm(self.num_groups, self.num_channels, eps=self.eps, device="meta")
        w, b = self._affine_n(n)
        gn.weight, gn.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
        return gn


ROUTED_TYPES = (RoutedLinear, RoutedConv2d, RoutedBias, ExpertBatchNorm, ExpertLayerNorm, ExpertGroupNorm)

# the torch classes whose forward the routed modules reproduce
_REPLACED = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# subclasses with their own forward that computes the same as their torch class (scripting / fast-norm variants)
_SAME_FORWARD = frozenset({"timm.layers.linear.Linear", "timm.layers.norm.LayerNorm", "timm.layers.norm.GroupNorm",
                           "timm.layers.norm.GroupNorm1"})


def _other_forward(m: nn.Module) -> str | None:
    """The torch class of ``m`` when ``m`` is a subclass whose own forward computes something else (timm's
    StdConv2d): a routed replacement would silently drop it. The routed modules reproduce LayerNorm2d,
    BatchNormAct2d, GroupNormAct and Conv2dSame (CHANNELS_FIRST_LAYER_NORMS, BATCH_NORM_ACTS, GROUP_NORM_ACTS,
    SAME_PADDING_CONVS)."""
    for base in _REPLACED:
        if isinstance(m, base):
            name = _qualname(m)
            same = (type(m).forward is base.forward or name in _SAME_FORWARD or name in CHANNELS_FIRST_LAYER_NORMS
                    or name in BATCH_NORM_ACTS or name in GROUP_NORM_ACTS or name in SAME_PADDING_CONVS)
            return None if same or _computes_in_fp32(m) else base.__name__.lstrip("_")
    return None


# ----------------------------------------------------------------------------- helpers
def _routed(name: str, cls, base: nn.Module, *args, **kwargs):
    """``cls(base, ...)``; its ValueError (padding_mode, track_running_stats, ...) names the module."""
    try:
        return cls(base, *args, **kwargs)
    except ValueError as e:
        raise ValueError(f"placement: cannot route {name!r} ({type(base).__name__}): {e}") from None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class DropAct(nn.Module):
    """What folding leaves of a BatchNormAct2d: its ``drop``, then its ``act``."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x):
        return self.act(self.drop(x))


def fold_batchnorm_(model: nn.Module) -> list:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that conv, in place.

    The graph is read with torch.fx: a pair is folded only when the conv's output feeds only
    the BatchNorm and each module is called exactly once; the BatchNorm becomes nn.Identity (timm's
    BatchNormAct2d: a module running its drop and act). A model that fx cannot trace is left unchanged.
    Returns the folded (conv, bn) names.
    """
    import torch.fx as fx

    class BatchNormActLeaves(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return _qualname(m) in BATCH_NORM_ACTS | SAME_PADDING_CONVS or super().is_leaf_module(m, qualname)

    try:
        graph = BatchNormActLeaves().trace(model)
    except Exception:
        return []
    mods = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        bn = mods[node.target]
        if len(node.args) != 1 or node.kwargs or not bn.track_running_stats or bn.training:
            continue  # a train-mode BatchNorm normalises by batch statistics: folding its running ones changed it
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(mods.get(prev.target), nn.Conv2d)):
            continue
        if len(prev.users) != 1 or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        conv = mods[prev.target]
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var + bn.eps)
            g = bn.weight * inv if bn.affine else inv
            beta = bn.bias if bn.affine else torch.zeros_like(inv)
            b0 = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = nn.Parameter(conv.weight * g.view(-1, 1, 1, 1), requires_grad=False)
            conv.bias = nn.Parameter((b0 - bn.running_mean) * g + beta, requires_grad=False)
        _set_submodule(model, node.target, DropAct(bn.drop, bn.act) if _qualname(bn) in BATCH_NORM_ACTS
                       else nn.Identity())
        folded.append((prev.target, node.target))
    return folded


# ----------------------------------------------------------------------------- the bank
# per-element states that torch.optim optimizers create at a tensor's first step and that start at zero
_ZERO_START_STATES = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                                "grad_avg", "acc_delta", "ax", "prev"})


class ExpertBank(nn.Module):
    """N timestep experts sharing one frozen copy of ``model``.

    Args:
        model: any nn.Module (deep-copied; the copy's base weights are frozen and shared).
        placement: a :class:`Placement` or a rule name ("resnet", "deit", "mobilenet_v2", "generic").
        n_experts: N; must divide ``num_timesteps``.
        num_timesteps: T (1000); expert n owns original timesteps [n*T/N, (n+1)*T/N).
        r, alpha, layout: passed to the rule when ``placement`` is a name.
        arch: architecture name recorded in checkpoints (default: the model's class name).

    The bank starts in the mode of ``model`` (eval for a guide model; ``.train()`` to distil).
    Call as ``bank(x, t)`` with ``t`` the ORIGINAL timesteps (long [B] or an int), or
    ``bank(x, expert_idx=...)``. Set ``bank.check_inputs = False`` to skip the range checks
    (they read values on the host, which a CUDA graph capture cannot do).
    """

    def __init__(self, model: nn.Module, placement="generic", n_experts: int = 5, num_timesteps: int = 1000,
                 *, r: int | None = None, alpha: float | None = None, layout: str | None = None,
                 arch: str | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):  # a function failed deep in the placement rule
            raise TypeError(f"ExpertBank wraps an nn.Module (the off-the-shelf network), got {type(model).__name__}")
        n_experts, num_timesteps = _as_int(n_experts), _as_int(num_timesteps)  # numpy ints too
        if not isinstance(n_experts, int) or n_experts <= 0:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        if not isinstance(num_timesteps, int) or num_timesteps <= 0:
            raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
        if num_timesteps % n_experts:
            raise ValueError(f"n_experts={n_experts} does not divide num_timesteps={num_timesteps}: "
                             "the timestep bands would not be equal")
        if isinstance(placement, str):
            placement = make_placement(placement, model, r=r, alpha=alpha, layout=layout)
        elif not isinstance(placement, Placement):
            raise TypeError(f"placement must be a Placement or a rule name, got {type(placement).__name__}")
        self.placement = placement
        self.n_experts, self.num_timesteps = n_experts, num_timesteps
        self.band = num_timesteps // n_experts
        self.arch = arch or type(model).__name__
        self.check_inputs = True
        self.input_transform_record = None  # load_experts: the checkpoint's (guides through another are refused)
        self.base_num_parameters = sum(p.numel() for p in model.parameters())
        object.__setattr__(self, "_router", _Router())
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self._install(placement)
        self.train(model.training)  # the routed modules were made in train mode: all in the model's mode

    def to(self, *args, **kwargs):
        """``nn.Module.to``; with ``memory_format`` only the tensors of that format's rank convert (4-D for
        channels_last: conv weights; the factorised conv LoRA's 5-D A [N, r, C, kh, kw] stays as it is,
        where ``nn.Module.to`` would raise)."""
        fmt = kwargs.pop("memory_format", None)
        out = super().to(*args, **kwargs) if (args or kwargs) else self
        if fmt is not None:
            rank = {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt)
            with torch.no_grad():
                for t in (*self.parameters(), *self.buffers()):
                    if (rank is None and t.dim() in (4, 5)) or t.dim() == rank:
                        t.data = t.data.contiguous(memory_format=fmt)
        return out

    # -- construction
    def _install(self, p: Placement):
        mods = dict(self.model.named_modules(remove_duplicate=False))  # a shared module under each of its names
        missing = sorted({n for n in (*p.lora, *p.bias, *p.norm) if n not in mods or n == ""})
        if missing:
            raise ValueError(f"placement names modules not in {type(self.model).__name__}: {missing}")
        aliases: dict = {}
        for n, m in mods.items():
            aliases.setdefault(id(m), []).append(n)
        shared = sorted({" = ".join(aliases[id(mods[n])]) for n in (*p.lora, *p.bias, *p.norm)
                         if len(aliases[id(mods[n])]) > 1})
        if shared:
            raise ValueError(f"placement puts experts on modules the model shares under several names ({shared[:3]}): "
                             "replacing one name would leave the others running the base weights, silently; "
                             "unshare them (copy.deepcopy each) or leave them out of the placement")
        from .placement import inside_fused_layers, weight_read_directly

        unrouted = sorted((set(p.lora) | set(p.bias)) & weight_read_directly(self.model))
        if unrouted:
            raise ValueError(f"placement puts LoRA / per-expert biases on {unrouted}: nn.MultiheadAttention reads "
                             "out_proj's weight and bias directly, so experts there would silently do nothing")
        fused = inside_fused_layers(self.model)
        inside = sorted(n for n in (*p.lora, *p.bias, *p.norm) if n in fused)
        if inside:
            raise ValueError(f"placement puts experts on {inside[:6]}{' ...' if len(inside) > 6 else ''} inside "
                             f"{sorted({fused[n] for n in inside})[:3]}: torch's nn.Transformer*Layer reads its "
                             "children's parameters directly (fused path), so experts there are unsupported; "
                             "use blocks that call their layers (e.g. timm's ViT / DeiT, placement 'deit')")
        other = sorted(f"{n} ({type(mods[n]).__name__}, an nn.{_other_forward(mods[n])} with its own forward)"
                       for n in dict.fromkeys((*p.lora, *p.bias, *p.norm)) if _other_forward(mods[n]))
        if other:
            raise ValueError(f"placement puts experts on {other[:6]}{' ...' if len(other) > 6 else ''}: a routed "
                             "module computes the plain torch layer's forward, so what these subclasses add (weight "
                             "standardisation, dynamic padding, a fused activation) would be "
                             "silently lost; leave them out of the placement")
        hooked = sorted(n for n in dict.fromkeys((*p.lora, *p.bias, *p.norm))
                        if any(getattr(mods[n], h, None) for h in ("_forward_hooks", "_forward_pre_hooks",
                                                                   "_backward_hooks", "_backward_pre_hooks")))
        if hooked:
            warnings.warn(f"hooks registered on {hooked[:6]}{' ...' if len(hooked) > 6 else ''} do not run in the "
                          "bank: these modules are replaced by routed ones; register them on the bank's modules "
                          "(bank.model.get_submodule(name)) after building it", UserWarning, stacklevel=3)
        lora, bias, norm = set(p.lora), set(p.bias), set(p.norm)
        R, N = self._router, self.n_experts
        for name in dict.fromkeys((*p.lora, *p.bias, *p.norm)):
            m = mods[name]
            if name in lora:
                if isinstance(m, nn.Linear):
                    new = _routed(name, RoutedLinear, m, R, N, p.r, p.alpha, per_expert_bias=name in bias)
                elif isinstance(m, nn.Conv2d):
                    new = _routed(name, RoutedConv2d, m, R, N, p.r, p.alpha, p.layout, per_expert_bias=name in bias)
                else:
                    raise ValueError(f"LoRA placed on {name!r}, a {type(m).__name__}; only Linear and Conv2d take LoRA")
                if name in norm:
                    raise ValueError(f"{name!r} is both a LoRA and a norm module")
            elif isinstance(m, NORM_TYPES):
                full = name in norm
                cls = (ExpertBatchNorm if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                       else ExpertLayerNorm if isinstance(m, nn.LayerNorm) else ExpertGroupNorm)
                new = _routed(name, cls, m, R, N, per_expert_weight=full)
            elif name in norm:
                raise ValueError(f"norm placement names {name!r}, a {type(m).__name__}; expected one of "
                                 f"{[t.__name__ for t in NORM_TYPES]}")
            else:
                if getattr(m, "bias", None) is None:
                    raise ValueError(f"per-expert bias placed on {name!r} ({type(m).__name__}), which has no bias")
                new = _routed(name, RoutedBias, m, R, N)
            _set_submodule(self.model, name, new)

    def train(self, mode: bool = True):
        """``nn.Module.train``; BatchNorms of the frozen base that no expert owns (e.g. ``affine=False``) stay in
        eval mode: their running statistics are part of the shared frozen model, which training must not
        overwrite with the mixed-noise-level statistics of every expert's samples."""
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # -- routing
    @property
    def bands(self) -> list:
        return [(n * self.band, (n + 1) * self.band) for n in range(self.n_experts)]

    def routed_modules(self):
        """(name, module) of every layer of the model that routes samples to experts."""
        for name, m in self.model.named_modules():
            if isinstance(m, _Routed):
                yield name, m

    def _ref_param(self):
        for p in self.model.parameters():
            if p.is_floating_point():
                return p
        return None

    def expert_index(self, t, batch: int | None = None) -> torch.Tensor:
        """Original timesteps (long [B] or int) -> expert indices long [B] (half-open bands); a 0-d t without
        ``batch`` gives a 0-d index."""
        ref = self._ref_param()
        device = ref.device if ref is not None else torch.device("cpu")
        t = as_int_or_tensor(t)
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise ValueError(f"t must be an int or an integer tensor of original timesteps, got {type(t).__name__}")
        if isinstance(t, int):
            t = torch.tensor(t, device=device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer (original) timesteps, got dtype {t.dtype}")
        if t.dim() == 0 and batch is not None:
            t = t.expand(batch)
        if t.dim() > 1 or (batch is not None and t.shape[0] != batch):
            raise ValueError(f"t must have shape [{batch if batch is not None else 'B'}], got {tuple(t.shape)}")
        if self.check_inputs and t.numel() and bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"t out of range [0, {self.num_timesteps}): min {int(t.min())}, max {int(t.max())}")
        return torch.div(t.to(device=device, dtype=torch.long), self.band, rounding_mode="floor")

    def _check_expert_idx(self, expert_idx, batch):
        ref = self._ref_param()
        device = ref.device if ref is not None else torch.device("cpu")
        expert_idx = as_int_or_tensor(expert_idx)
        if isinstance(expert_idx, bool) or not isinstance(expert_idx, (int, torch.Tensor)):
            raise ValueError(f"expert_idx must be an int or an integer tensor, got {type(expert_idx).__name__}")
        if isinstance(expert_idx, int):
            if not 0 <= expert_idx < self.n_experts:
                raise ValueError(f"expert_idx {expert_idx} out of range [0, {self.n_experts})")
            return torch.full((batch,), expert_idx, dtype=torch.long, device=device)
        if expert_idx.is_floating_point() or expert_idx.dtype == torch.bool:
            raise ValueError(f"expert_idx must be an integer tensor, got dtype {expert_idx.dtype}")
        if expert_idx.dim() == 0:
            expert_idx = expert_idx.expand(batch)
        if expert_idx.shape != (batch,):
            raise ValueError(f"expert_idx must have shape [{batch}], got {tuple(expert_idx.shape)}")
        if self.check_inputs and bool(((expert_idx < 0) | (expert_idx >= self.n_experts)).any()):
            raise ValueError(f"expert_idx out of range [0, {self.n_experts})")
        return expert_idx.to(device=device, dtype=torch.long)

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"x must have a leading sample dimension and features, got shape {tuple(x.shape)}")
        if x.dim() == 3 and self._has_conv2d():
            raise ValueError(f"x has shape {tuple(x.shape)}: the bank's convolutions take batches [B, C, H, W] "
                             "(one image [C, H, W]: x[None])")
        ref = self._ref_param()
        if ref is not None and (x.dtype != ref.dtype or x.device != ref.device):
            raise ValueError(f"x has dtype {x.dtype} on {x.device} but the bank's parameters are {ref.dtype} "
                             f"on {ref.device}; move one of them (bank.to(...) or x.to(...))")

    def _has_conv2d(self) -> bool:
        has = self.__dict__.get("_has_conv2d_cache")
        if has is None:
            has = any(isinstance(m, (nn.Conv2d, RoutedConv2d)) for m in self.model.modules())
            self.__dict__["_has_conv2d_cache"] = has
        return has

    def forward(self, x, t=None, *, expert_idx=None, **kwargs):
        """``model(x, **kwargs)`` with each sample of ``x`` routed to one expert: by ``t`` (original timesteps,
        long [B] or an int) or by ``expert_idx`` (long [B] or an int); exactly one of them."""
        self._check_x(x)
        if (t is None) == (expert_idx is None):
            raise ValueError("pass exactly one of t (original timesteps) or expert_idx")
        idx = self.expert_index(t, x.shape[0]) if t is not None else self._check_expert_idx(expert_idx, x.shape[0])
        prev = self._router.set(idx)
        try:
            return self.model(x, **kwargs)
        finally:
            self._router.restore(prev)

    # -- per-expert views
    def _per_expert_items(self, params_only=False):
        for name, m in self.routed_modules():
            for attr in m.per_expert:
                t = getattr(m, attr)
                if params_only and not isinstance(t, nn.Parameter):
                    continue
                yield f"{name}.{attr}", t

    def _check_n(self, n) -> int:
        """``n`` as a Python int in [0, N): ints, NumPy integers and 0-d integer tensors (e.g. from
        ``np.arange`` / ``torch.arange``); ValueError otherwise."""
        i = None
        if not isinstance(n, bool) and not (isinstance(n, torch.Tensor) and
                                            (n.dim() or n.is_floating_point() or n.dtype == torch.bool)):
            try:
                i = operator.index(n)
            except TypeError:
                pass
        if i is None:
            raise ValueError(f"expert must be an integer index, got {type(n).__name__} {n!r}")
        if not 0 <= i < self.n_experts:
            raise ValueError(f"expert {i} out of range [0, {self.n_experts})")
        return i

    def parameters_to_train(self) -> list:
        """The stacked per-expert parameters [N, ...] (all experts): give these to an optimiser.

        Routing a batch to one expert leaves the other experts' gradients zero, but AdamW still
        changes them: decoupled weight decay shrinks them, and Adam's running moments keep moving
        them after their last batch (weight_decay=0 does not stop that). Step with
        :meth:`step_sampled_experts` to leave the experts without a sample in the batch as they were,
        and use :class:`~ppap_fast.experts.optim.ExpertAdamW` for per-expert step counts.
        """
        return [t for _, t in self._per_expert_items(params_only=True)]

    def sampled_experts(self, t) -> torch.Tensor:
        """bool [N]: which experts the original timesteps ``t`` route a sample to (no host sync)."""
        idx = self.expert_index(t)
        return torch.zeros(self.n_experts, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)

    @torch.no_grad()
    def step_sampled_experts(self, opt, sampled: torch.Tensor) -> None:
        """``opt.step()`` that changes only the experts with ``sampled[n]`` (bool [N], e.g.
        :meth:`sampled_experts`): the others keep their parameters and optimizer moments, as when
        each expert is trained on its own batches (weight decay and Adam's moments would move them).
        With :class:`~ppap_fast.experts.optim.ExpertAdamW` this is ``opt.step(sampled)``: each
        expert also keeps its own step count (its bias corrections), which makes one-pass training
        equal separate training. Another optimizer (torch.optim.AdamW) steps every tensor's shared
        count: a skipped expert's later updates then differ from separate training (what
        ``--loss-reduction batch_mean`` runs keep, to reproduce the experts made so).
        Sync-free: capturable in a CUDA graph."""
        from .optim import ExpertAdamW

        if isinstance(opt, ExpertAdamW):
            opt.step(sampled.to(torch.bool))
            return
        params = self.parameters_to_train()
        kept = []
        for p in params:
            st = opt.state.get(p, {})
            ts = [p] + [v for k, v in st.items() if k != "step" and isinstance(v, torch.Tensor) and v.shape == p.shape]
            kept.append([(x, x.clone()) for x in ts])
        opt.step()
        sampled = sampled.to(torch.bool)
        for p, pairs in zip(params, kept):
            for x, old in pairs:
                x.copy_(torch.where(sampled.view(-1, *([1] * (x.dim() - 1))).to(x.device), x, old))
            # moments this step created: an unsampled expert's rows as never stepped (zero), not moved by a
            # weight decay added to its zero gradient (torch.optim.Adam / SGD weight_decay)
            known = {id(x) for x, _ in pairs}
            for k, v in opt.state.get(p, {}).items():
                if k in _ZERO_START_STATES and isinstance(v, torch.Tensor) and v.shape == p.shape \
                        and id(v) not in known:
                    v.masked_fill_(~sampled.view(-1, *([1] * (v.dim() - 1))).to(v.device), 0)

    def trainable_parameters(self, n: int) -> dict:
        """Views of what expert ``n`` owns: name -> tensor (LoRA factors, biases, norm affine)."""
        n = self._check_n(n)
        return {k: t[n] for k, t in self._per_expert_items(params_only=True)}

    def num_trainable_parameters(self, n: int = 0) -> int:
        """The number of parameters expert ``n`` trains."""
        return sum(v.numel() for v in self.trainable_parameters(n).values())

    def parameter_report(self) -> dict:
        """Trainable counts: per expert, in total, and as fractions of the frozen base model's."""
        per = self.num_trainable_parameters(0)
        base = self.base_num_parameters
        return {
            "n_experts": self.n_experts,
            "per_expert": per,
            "total_trainable": per * self.n_experts,
            "base_parameters": base,
            "fraction_of_base_per_expert": per / base if base else math.nan,
            "fraction_of_base_total": per * self.n_experts / base if base else math.nan,
        }

    def expert_state_dict(self, n: int) -> dict:
        """Copies of everything expert ``n`` owns, including its BatchNorm running statistics."""
        n = self._check_n(n)
        return {k: t[n].detach().clone() for k, t in self._per_expert_items()}

    def load_expert_state_dict(self, n: int, state_dict: dict, strict: bool = True) -> None:
        """Load expert ``n`` from ``state_dict`` (as :meth:`expert_state_dict` gives); with ``strict`` any missing /
        unexpected / misshaped key is a ValueError."""
        n = self._check_n(n)
        own = dict(self._per_expert_items())
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        bad = sorted(f"{k}: expected {tuple(own[k].shape[1:])}, got {tuple(state_dict[k].shape)}"
                     for k in set(own) & set(state_dict) if tuple(state_dict[k].shape) != tuple(own[k].shape[1:]))
        if bad or (strict and (missing or unexpected)):
            raise ValueError(f"expert {n} state_dict mismatch: missing keys {missing}; unexpected keys "
                             f"{unexpected}; shape mismatches {bad}")
        unusable = nonfinite_after_cast(own, state_dict)
        if unusable:
            raise ValueError(f"expert {n} state_dict cannot be loaded into this bank: {unusable[:10]}")
        with torch.no_grad():
            for k, v in state_dict.items():
                if k in own:
                    own[k][n].copy_(v)

    def per_expert_state_dict(self) -> dict:
        """All experts' stacked tensors [N, ...] by name (what checkpoints store)."""
        return dict(self._per_expert_items())

    # -- inference
    def merged(self, n: int, fold_bn: bool = True) -> nn.Module:
        """A plain nn.Module (eval mode, no LoRA, no routing) computing expert ``n``.

        LoRA deltas are merged into the weights, expert ``n``'s biases / norm parameters /
        running statistics are put in place, and with ``fold_bn`` every BatchNorm2d that
        directly follows a conv is folded into it (the result then equals expert ``n`` in
        eval mode only; it is returned in eval mode).
        """
        n = self._check_n(n)
        routed = list(self.routed_modules())
        memo = {id(m): None for _, m in routed}  # do not deep-copy the stacked expert tensors
        for _, m in routed:
            for p in m.parameters(recurse=False):
                memo[id(p)] = None
            for b in m.buffers(recurse=False):
                memo[id(b)] = None
        memo[id(self._router)] = None
        out = copy.deepcopy(self.model, memo)
        for name, m in routed:
            _set_submodule(out, name, m.to_plain(n))
        out.eval()
        out.requires_grad_(False)
        if fold_bn:
            fold_batchnorm_(out)
        return out

    def extra_repr(self) -> str:
        p = self.placement
        return (f"arch={self.arch}, n_experts={self.n_experts}, T={self.num_timesteps}, rule={p.rule}, "
                f"layout={p.layout}, r={p.r}, alpha={p.alpha}, lora={len(p.lora)}, bias={len(p.bias)}, "
                f"norm={len(p.norm)}")


__all__ = ["ExpertBank", "RoutedLinear", "RoutedConv2d", "RoutedBias", "ExpertBatchNorm", "ExpertLayerNorm",
           "ExpertGroupNorm", "fold_batchnorm_", "ROUTED_TYPES"]
