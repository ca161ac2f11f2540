"""Where an ExpertBank puts per-expert parameters.

A :class:`Placement` names, by module path in the wrapped model:

* ``lora``: Linear / Conv2d modules (timm's Conv2dSame too) that get a per-expert LoRA adapter;
* ``bias``: modules whose ``bias`` becomes per-expert (Linear, Conv2d, or the
  bias of a BatchNorm / LayerNorm / GroupNorm whose weight stays shared);
* ``norm``: BatchNorm / LayerNorm / GroupNorm modules whose affine weight AND
  bias become per-expert (timm's BatchNormAct2d, GroupNormAct and timm / torchvision LayerNorm2d too).

A BatchNorm named in ``bias`` or ``norm`` also gets per-expert running
statistics (each expert sees its own noise level, so its statistics differ).
Everything else is the frozen, shared base model.

Rules (:func:`make_placement`): ``"resnet"``, ``"deit"``, ``"mobilenet_v2"``,
``"generic"``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .lora import check_layout

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Placement:
    lora: tuple = ()
    bias: tuple = ()
    norm: tuple = ()
    r: int = 16
    alpha: float = 8.0
    layout: str = "factorised"
    rule: str = "custom"

    def __post_init__(self):
        for name in ("lora", "bias", "norm"):  # tuple("conv1") is ('c', 'o', 'n', 'v', '1')
            if isinstance(getattr(self, name), str):
                raise ValueError(f"Placement.{name} must be a list of module names, got the string "
                                 f"{getattr(self, name)!r}: write ({getattr(self, name)!r},)")
        object.__setattr__(self, "lora", tuple(self.lora))
        object.__setattr__(self, "bias", tuple(self.bias))
        object.__setattr__(self, "norm", tuple(self.norm))
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real):  # "8" was taken as 8.0
            raise ValueError(f"Placement.alpha must be a number (the LoRA scale is alpha / r), got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        check_layout(self.layout)
        if isinstance(self.r, bool) or not isinstance(self.r, numbers.Integral) or self.r <= 0:  # True was rank 1
            raise ValueError(f"Placement.r must be a positive int, got {self.r!r}")
        object.__setattr__(self, "r", int(self.r))  # a numpy int too (it is written to config.json)
        if not math.isfinite(self.alpha):  # NaN experts, found only when saving after the whole run
            raise ValueError(f"Placement.alpha must be a finite number, got {self.alpha!r}")
        if self.alpha == 0:  # LoRA scale alpha / r = 0: the adapters add nothing and get no gradient
            raise ValueError("Placement.alpha must not be 0: the LoRA scale alpha / r would be 0, so the adapters "
                             "would contribute and learn nothing")
        for name, lst in (("lora", self.lora), ("bias", self.bias), ("norm", self.norm)):
            dup = sorted({m for m in lst if lst.count(m) > 1})
            if dup:
                raise ValueError(f"Placement.{name} lists modules more than once: {dup}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("lora", "bias", "norm"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown Placement fields {extra}")
        return cls(**d)


def _has_bias(m: nn.Module) -> bool:
    return isinstance(getattr(m, "bias", None), nn.Parameter)


def _affine_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)):
        return m.affine
    if isinstance(m, nn.LayerNorm):  # LayerNorm(bias=False) has no bias to route: left shared
        return m.elementwise_affine and m.weight is not None and m.bias is not None
    return False


def _last_linear(model: nn.Module) -> str | None:
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return last


# ----------------------------------------------------------------------------- rules
def resnet_placement(model: nn.Module, r: int = 16, alpha: float = 8, layout: str = "loralib",
                     official: bool = True) -> Placement:
    """PPAP's ResNet placement (torchvision and timm naming).

    LoRA on the stem ``conv1`` (every conv of a deep stem) and on ``conv1`` and ``conv2`` of
    every Bottleneck / BasicBlock; not on conv3, downsample or fc. Per-expert: every bias
    except fc's, and BatchNorm affine + running statistics.

    ``official=True`` reproduces the official trainable rule exactly (parameters named
    ``*bn*`` and every bias except fc's): a downsample BatchNorm (``downsample.1``) has a
    per-expert bias and running stats but its weight stays shared, which gives the
    manifest's 1,459,632 trainable parameters per ResNet50 expert. ``official=False``
    makes every BatchNorm's affine weight per-expert as well.
    """
    modules = dict(model.named_modules())
    lora = []
    stem = modules.get("conv1")
    if isinstance(stem, nn.Conv2d):
        lora.append("conv1")
    elif stem is not None:
        lora += [f"conv1.{n}" for n, m in stem.named_modules() if isinstance(m, nn.Conv2d)]
    blocks = [n for n, m in modules.items()
              if n and isinstance(getattr(m, "conv1", None), nn.Conv2d) and isinstance(getattr(m, "conv2", None), nn.Conv2d)]
    if not blocks:
        raise ValueError(f"resnet placement: no residual blocks with conv1/conv2 found in {type(model).__name__}")
    for b in blocks:
        lora += [f"{b}.conv1", f"{b}.conv2"]
    head = "fc" if isinstance(modules.get("fc"), nn.Linear) else _last_linear(model)
    norm, bias = [], []
    for n, m in modules.items():
        if isinstance(m, NORM_TYPES) and _affine_norm(m):
            if not official or "bn" in n:
                norm.append(n)
            elif _has_bias(m):
                bias.append(n)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) and _has_bias(m) and n != head:
            bias.append(n)
    return Placement(tuple(lora), tuple(bias), tuple(norm), r, alpha, layout, "resnet")


def deit_placement(model: nn.Module, r: int = 16, alpha: float = 8, layout: str = "factorised") -> Placement:
    """PPAP's DeiT/ViT placement (timm naming): LoRA on ``attn.qkv`` and ``attn.proj`` of
    every block; every bias (Linear, patch-embed conv, LayerNorm bias, head) per expert;
    LayerNorm weights stay shared (deit_small_patch16_224: 494,824 per expert, ~0.49M)."""
    lora = [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and re.search(r"(^|\.)attn\.(qkv|proj)$", n)]
    if not lora:
        raise ValueError(f"deit placement: no attn.qkv / attn.proj Linear found in {type(model).__name__}")
    bias = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and _has_bias(m)]
    return Placement(tuple(lora), tuple(bias), (), r, alpha, layout, "deit")


def mobilenet_v2_placement(model: nn.Module, r: int = 4, alpha: float = 4,
                           layout: str = "factorised") -> Placement:
    """torchvision MobileNetV2: LoRA on every Conv2d of the stem and the inverted-residual
    blocks (expand 1x1, depthwise 3x3 - rank per group x groups, project 1x1), not on the
    final 1x1 conv nor the classifier; every BatchNorm's affine + stats and every bias except
    the classifier's per expert."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if not any(type(m).__name__ == "InvertedResidual" for m in modules.values()):
        raise ValueError(f"mobilenet_v2 placement: {type(model).__name__} has no InvertedResidual blocks, so it is "
                         "not a MobileNetV2; use placement='generic' or give a Placement")
    if modules[convs[-1]].kernel_size != (1, 1):
        raise ValueError(f"mobilenet_v2 placement: the last conv {convs[-1]!r} of {type(model).__name__} is "
                         f"{modules[convs[-1]].kernel_size}, not MobileNetV2's 1x1 head conv; use placement='generic'")
    lora = convs[:-1]  # the last conv is the 1x1 head conv (features.18)
    head = _last_linear(model)
    norm = [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES) and _affine_norm(m)]
    bias = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and _has_bias(m) and n != head]
    return Placement(tuple(lora), tuple(bias), tuple(norm), r, alpha, layout, "mobilenet_v2")


def weight_read_directly(model: nn.Module) -> set:
    """Names of Linear modules whose parent reads their weight itself instead of calling them
    (``nn.MultiheadAttention.out_proj``): replacing them would silently change nothing."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


READS_CHILDREN_DIRECTLY = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def inside_fused_layers(model: nn.Module) -> dict:
    """{module name: enclosing layer name} for modules inside torch's Transformer*Layer, whose forward
    reads its children's parameters directly (the fused inference path): experts cannot live there."""
    layers = [n for n, m in model.named_modules() if isinstance(m, READS_CHILDREN_DIRECTLY)]
    return {n: p for n, _ in model.named_modules() for p in layers if n.startswith(p + ".")}


def output_linear(model: nn.Module, keys=("out", "logits", "predicted_depth")) -> tuple[bool, str | None]:
    """(traced, name): the Linear that produces the model's output (its first tensor, or a dict's first of
    ``keys``), found by symbolic tracing (torch.fx, nothing runs): back from the output
    through parameter-free ops to the first module with parameters; name is None when that is no Linear (a conv
    head). (False, None) when the model cannot be traced."""
    import inspect

    import torch.fx

    class LayerLeaves(torch.fx.Tracer):  # a Linear / Conv2d subclass (timm's Linear) is one module, not its F.linear
        def is_leaf_module(self, m, qualname):
            return isinstance(m, (nn.Linear, nn.Conv2d)) or super().is_leaf_module(m, qualname)

    try:  # optional arguments as their defaults (``forward(x, return_features=False)``)
        defaults = {n: a.default for n, a in inspect.signature(model.forward).parameters.items()
                    if a.default is not inspect.Parameter.empty}
        graph = LayerLeaves().trace(model, concrete_args=defaults or None)
    except Exception:  # noqa: BLE001 - data-dependent control flow and the like
        return False, None
    modules = dict(model.named_modules())
    node = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(node, dict):
        node = next((node[k] for k in keys if k in node), next(iter(node.values()), None))
    while isinstance(node, (tuple, list)) and node:
        node = node[0]
    while isinstance(node, torch.fx.Node):
        if node.op == "call_module" and any(True for _ in modules[node.target].parameters()):
            return True, node.target if isinstance(modules[node.target], nn.Linear) else None
        if node.op not in ("call_module", "call_method", "call_function"):
            break  # an input, a parameter
        node = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
    return True, None


def head_linear(model: nn.Module, keys=("out", "logits", "predicted_depth")) -> tuple[bool, str | None]:
    """(traced, name): :func:`output_linear`'s head; a model torch.fx cannot trace: (False, its last
    registered Linear), which is wrong where the head is registered before another Linear."""
    traced, name = output_linear(model, keys)
    return (True, name) if traced else (False, _last_linear(model))


def generic_placement(model: nn.Module, r: int = 8, alpha: float = 8, layout: str = "factorised") -> Placement:
    """Every Conv2d / Linear except the classifier head (the Linear that produces the output, see
    :func:`output_linear`; none for a conv head) gets LoRA; every affine norm (weight+bias) and every
    Conv2d / Linear bias is per expert. nn.MultiheadAttention's out_proj is skipped (MHA reads its weight
    directly). A model torch.fx cannot trace takes its last Linear as the head (with a warning when it has
    several: pass a Placement to choose). Subclasses whose own forward the routed modules do not reproduce
    (timm's StdConv2d) are left shared, with a warning naming them; so are, in one more warning, other torch layers
    with weights (ConvTranspose2d, Conv1d, Embedding, nn.MultiheadAttention's in_proj, LayerNorm(bias=False))."""
    traced, head = head_linear(model)
    if not traced:
        if sum(isinstance(m, nn.Linear) for m in model.modules()) > 1:
            warnings.warn(f"generic placement: torch.fx cannot trace {type(model).__name__}, so the classifier head "
                          f"(no LoRA) is taken to be its last registered Linear {head!r}; if another Linear produces "
                          "the output, give a Placement", UserWarning, stacklevel=2)
    from .bank import _other_forward

    own = {n: type(m).__name__ for n, m in model.named_modules() if _other_forward(m)}
    if own:
        named = [f"{n} ({c})" for n, c in own.items()]
        warnings.warn(f"generic placement leaves {len(own)} module(s) without experts (shared, frozen): "
                      "their class overrides the forward of the torch layer it extends, which a routed module does "
                      "not reproduce (e.g. timm StdConv2d standardises its weight, SyncBatchNorm syncs its "
                      f"training batch statistics across processes): {named[:6]}"
                      f"{' ...' if len(named) > 6 else ''}", UserWarning, stacklevel=2)
    own = set(own)
    skip = weight_read_directly(model) | {head} | own
    lora = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in skip]
    norm = [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES) and _affine_norm(m) and n not in own]
    bias = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and _has_bias(m) and n not in (skip - {head}) | own]
    placed = set(lora) | set(bias) | set(norm) | skip
    # torch layers of other types with weights (ConvTranspose2d, Conv1d, ...), a LayerNorm without bias
    named = [f"{n} ({type(m).__name__}{' without bias' if isinstance(m, NORM_TYPES) else ''})"
             for n, m in model.named_modules() if n not in placed and type(m).__module__.startswith("torch.nn.")
             and next(m.parameters(recurse=False), None) is not None]
    if named:
        warnings.warn(f"generic placement leaves {len(named)} layer(s) with weights shared and frozen (no experts: "
                      f"it routes only plain Conv2d / Linear / BatchNorm / LayerNorm / GroupNorm): {named[:6]}"
                      f"{' ...' if len(named) > 6 else ''}; give a Placement to place experts yourself",
                      UserWarning, stacklevel=2)
    return Placement(tuple(lora), tuple(bias), tuple(norm), r, alpha, layout, "generic")


RULES: dict[str, Callable[..., Placement]] = {
    "resnet": resnet_placement,
    "deit": deit_placement,
    "mobilenet_v2": mobilenet_v2_placement,
    "generic": generic_placement,
}


def make_placement(rule: str, model: nn.Module, **kwargs) -> Placement:
    """Build the placement ``rule`` for ``model``; kwargs (r, alpha, layout, ...) go to the rule."""
    if rule not in RULES:
        raise ValueError(f"unknown placement rule {rule!r}; expected one of {sorted(RULES)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return RULES[rule](model, **kwargs)


__all__ = ["Placement", "RULES", "make_placement", "resnet_placement", "deit_placement",
           "mobilenet_v2_placement", "generic_placement", "output_linear", "head_linear",
           "NORM_TYPES"]
