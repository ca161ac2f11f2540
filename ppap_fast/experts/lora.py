"""Single-expert LoRA layers for Linear and Conv2d, in two layouts.

Layouts (``layout=``):

* ``"factorised"`` (peft-like): ``A`` is a conv ``C_in -> R`` with the base conv's
  kernel, stride, padding, dilation and groups; ``B`` is a grouped 1x1 conv
  ``R -> C_out``. ``r`` is the rank *per group*; the total rank is
  ``R = r * groups``. Per group ``j``: ``delta_W[j] = B_j @ A_j`` (A_j flattened
  over ``C_in/g * kh * kw``), which has exactly the base weight's shape.
  Stored shapes: ``lora_A [R, C_in/g, kh, kw]``, ``lora_B [C_out, r]``.
* ``"loralib"`` (microsoft/LoRA ``ConvLoRA``, used by the official PPAP code):
  ``lora_A [r*kh, C_in*kw]``, ``lora_B [C_out/g*kh, r*kh]``,
  ``delta_W = (lora_B @ lora_A).view(W.shape)`` (a plain row-major reshape).

For Linear both layouts are the same: ``lora_A [r, in]``, ``lora_B [out, r]``.

In every case the effective weight is ``W + scale * delta_W`` with
``scale = alpha / r`` (PPAP: r=16, alpha=8 -> 0.5). The official PPAP LoRA
*linear* forward drops ``alpha / r``; we do not reproduce that bug.

Initialisation: ``lora_A`` kaiming-uniform (a=sqrt(5)), ``lora_B`` zeros, so a
fresh adapter leaves the base model's output unchanged.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYOUTS = ("factorised", "loralib")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; expected one of {LAYOUTS}")
    return layout


def _check_rank(r, alpha) -> tuple[int, float]:
    """(r, alpha) as int and float, checked as Placement checks them (NumPy numbers too)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"LoRA alpha must be a finite non-zero number (the scale alpha / r), got {alpha!r}")
    return int(r), float(alpha)


def _check_plain(base: nn.Module, layer: str, torch_cls: type) -> None:
    """Refuse a subclass whose own forward (timm's Conv2dSame, StdConv2d) the LoRA layer would not run."""
    from .bank import SAME_PADDING_CONVS, _other_forward, _qualname

    if _other_forward(base) or _qualname(base) in SAME_PADDING_CONVS:
        raise ValueError(f"{layer} wraps a plain nn.{torch_cls.__name__}: {type(base).__name__} has its own forward, "
                         "which the LoRA layer would not run (dynamic padding, weight standardisation, ...)")


# ----------------------------------------------------------------------------- shape helpers (shared with the bank)
def conv_lora_shapes(conv: nn.Conv2d, r: int, layout: str):
    """(A shape, B shape) of one expert's LoRA factors for ``conv`` in ``layout``."""
    check_layout(layout)
    c_out, c_in_g, kh, kw = conv.weight.shape
    g = conv.groups
    if layout == "factorised":
        return (r * g, c_in_g, kh, kw), (c_out, r)
    return (r * kh, conv.in_channels * kw), (c_out // g * kh, r * kh)


def linear_lora_shapes(linear: nn.Linear, r: int):
    return (r, linear.in_features), (linear.out_features, r)


def factorised_conv_delta(A: torch.Tensor, B: torch.Tensor, groups: int) -> torch.Tensor:
    """Dense delta (no scale) of the factorised layout; A [..., R, C_in/g, kh, kw], B [..., C_out, R/g]."""
    lead = A.shape[:-4]
    R, cin_g, kh, kw = A.shape[-4:]
    c_out, rg = B.shape[-2:]
    Ag = A.reshape(*lead, groups, rg, cin_g * kh * kw)
    Bg = B.reshape(*lead, groups, c_out // groups, rg)
    return (Bg @ Ag).reshape(*lead, c_out, cin_g, kh, kw)


def loralib_conv_delta(A: torch.Tensor, B: torch.Tensor, weight_shape) -> torch.Tensor:
    """Dense delta (no scale) of the loralib layout; A [..., r*kh, C_in*kw], B [..., C_out/g*kh, r*kh]."""
    lead = A.shape[:-2]
    return (B @ A).reshape(*lead, *weight_shape)


def init_lora_(A: torch.Tensor, B: torch.Tensor, stacked: bool = False) -> None:
    """A kaiming-uniform(a=sqrt(5)) (per expert slice when ``stacked``), B zeros."""
    with torch.no_grad():
        for a in (A if stacked else [A]):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        B.zero_()


def _frozen(t: torch.Tensor | None):
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=False)


# ----------------------------------------------------------------------------- common merge logic
class _LoRABase(nn.Module):
    r: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def _init_params(self, base: nn.Module, a_shape, b_shape) -> None:
        """Frozen copies of the base weight/bias, a fresh LoRA pair (B = 0: starts as the base)."""
        self.weight = _frozen(base.weight)
        self.bias = _frozen(base.bias)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **kw))
        init_lora_(self.lora_A, self.lora_B)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge(self, safe_merge: bool = False) -> None:
        """Add ``scale * delta_W`` into the base weight (the LoRA branch is then skipped).

        ``safe_merge=True`` computes the merged weight first and raises ValueError, leaving
        the module untouched, when it holds NaN/inf.
        """
        if self.merged:
            return
        with torch.no_grad():
            new = self.weight + self.delta_weight()
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"{type(self).__name__}: merged weight is not finite; adapter left unmerged")
            self.weight.copy_(new)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        with torch.no_grad():
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Always the unmerged base weight: a merged one (the flag is not saved) got the delta added twice when
        loaded into a fresh layer."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            with torch.no_grad():
                destination[prefix + "weight"] = self.weight - self.delta_weight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.merged = False  # the loaded weight is the unmerged one (see _save_to_state_dict)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scale={self.scale}, merged={self.merged}"


class LoRALinear(_LoRABase):
    """``y = x W^T + b + (alpha/r) * (x A^T) B^T`` around a frozen copy of ``base``."""

    def __init__(self, base: nn.Linear, r: int = 16, alpha: float = 8, layout: str = "factorised"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        _check_plain(base, "LoRALinear", nn.Linear)
        self.r, self.alpha = _check_rank(r, alpha)
        self.layout = check_layout(layout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_params(base, *linear_lora_shapes(base, self.r))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale


class LoRAConv2d(_LoRABase):
    """LoRA around a frozen copy of an ``nn.Conv2d`` (any kernel/stride/padding/dilation/groups)."""

    def __init__(self, base: nn.Conv2d, r: int = 16, alpha: float = 8, layout: str = "factorised"):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRAConv2d supports padding_mode='zeros' only, got {base.padding_mode!r}")
        _check_plain(base, "LoRAConv2d", nn.Conv2d)
        self.r, self.alpha = _check_rank(r, alpha)
        self.layout = check_layout(layout)
        self.stride, self.padding, self.dilation, self.groups = base.stride, base.padding, base.dilation, base.groups
        self.in_channels, self.out_channels, self.kernel_size = base.in_channels, base.out_channels, base.kernel_size
        self._init_params(base, *conv_lora_shapes(base, self.r, self.layout))

    def delta_weight(self) -> torch.Tensor:
        if self.layout == "factorised":
            d = factorised_conv_delta(self.lora_A, self.lora_B, self.groups)
        else:
            d = loralib_conv_delta(self.lora_A, self.lora_B, self.weight.shape)
        return d * self.scale

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x):
        if self.merged:
            return self._conv(x, self.weight, self.bias)
        if self.layout == "loralib":  # as the official code: conv with W + delta_W
            return self._conv(x, self.weight + self.delta_weight(), self.bias)
        y = self._conv(x, self.weight, self.bias)
        h = self._conv(x, self.lora_A, None)
        rg = self.lora_B.shape[1]
        d = F.conv2d(h, self.lora_B.reshape(self.out_channels, rg, 1, 1), None, 1, 0, 1, self.groups)
        return y + d * self.scale


__all__ = [
    "LAYOUTS", "LoRALinear", "LoRAConv2d", "conv_lora_shapes", "linear_lora_shapes",
    "factorised_conv_delta", "loralib_conv_delta", "init_lora_", "check_layout",
]
