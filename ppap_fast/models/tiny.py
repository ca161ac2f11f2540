"""Tiny models for the bundled digits demo.

* ``build_unet`` / ``EpsModel``: a small diffusers ``UNet2DModel`` (unconditional, eps prediction)
  wrapped so that it is called as ``model(x, t) -> eps`` with t the original timestep (0..T-1).
* ``TinyResNet``: the "off-the-shelf" classifier. A narrow torchvision-style ResNet with BasicBlocks
  and BatchNorm, a 3x3 stride-1 stem (no max-pool) for 16x16 inputs, and torchvision's module names
  (conv1, bn1, layerN.M.conv1/bn1/conv2/bn2/downsample, fc) so the "resnet" expert placement applies.
* ``SegNet``: the "off-the-shelf" segmentation nets (per-pixel logits: ink / background, or with an
  image-level context branch background / ink of digit 0..9).
* ``EvalNet``: the evaluator (a VGG-style CNN, a different architecture), used only for scoring;
  ``features(x)`` gives its penultimate activations for Fréchet distance / precision / recall.

``save_model`` / ``load_model`` store any of them as safetensors with the constructor config in the
metadata, so a weight file alone rebuilds its model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._inputs import check_halvable, per_sample_timesteps

# ----------------------------------------------------------------------------- diffusion model

UNET_DEFAULT = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=[32, 64, 64], norm_num_groups=8,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
)


def build_unet(**overrides):
    from diffusers import UNet2DModel

    cfg = {**UNET_DEFAULT, **overrides}
    return UNet2DModel(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()})


class EpsModel(nn.Module):
    """``model(x, t) -> eps``; t: int64 tensor of original timesteps, shape (N,) or scalar."""

    kind = "unet"

    def __init__(self, **config):
        super().__init__()
        self.config = {**UNET_DEFAULT, **config}
        self.unet = build_unet(**self.config)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # checked here: diffusers failed deep inside (a decoder concatenation, a broadcast, a reshape)
        c, halvings = self.config["in_channels"], len(self.config["block_out_channels"]) - 1
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"x must be [B, {c}, H, W], got shape {tuple(x.shape)}")
        check_halvable(x.shape[2:], halvings)
        t = per_sample_timesteps(t, x, "t")
        if x.shape[0] == 0:
            return x.new_zeros((0, self.config["out_channels"], *x.shape[2:]))
        return self.unet(x, t).sample


# ----------------------------------------------------------------------------- classifiers

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class TinyResNet(nn.Module):
    """Narrow ResNet (BasicBlock) for 16x16 single-channel images."""

    kind = "resnet"

    def __init__(self, widths=(16, 32, 64), layers=None, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        # layers: blocks per stage, default one per width (a fixed (1, 1, 1) built 3 stages of 4 widths)
        widths = list(widths)
        layers = [1] * len(widths) if layers is None else list(layers)
        if len(layers) < len(widths):  # (extra counts are ignored, as files saved before this accept)
            raise ValueError(f"TinyResNet: {len(widths)} widths but only {len(layers)} layer counts")
        self.config = dict(widths=widths, layers=layers, in_channels=in_channels, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        inplanes = widths[0]
        for i, (w, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(inplanes, w, stride=(1 if i == 0 or j > 0 else 2)))
                inplanes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def features(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class EvalNet(nn.Module):
    """VGG-style evaluator: 2x(conv-BN-ReLU) -> pool -> 2x(conv-BN-ReLU) -> pool -> fc(feat) -> fc."""

    kind = "evalnet"

    def __init__(self, width: int = 32, feat_dim: int = 128, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.config = dict(width=width, feat_dim=feat_dim, in_channels=in_channels, num_classes=num_classes)
        w = width

        def cbr(i, o):
            return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(*cbr(in_channels, w), *cbr(w, w), nn.MaxPool2d(2),
                                  *cbr(w, 2 * w), *cbr(2 * w, 2 * w), nn.MaxPool2d(2))
        self.proj = nn.Linear(2 * w * 16, feat_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(feat_dim, num_classes)

    def features(self, x):
        return F.relu(self.proj(torch.flatten(self.body(x), 1)))

    def forward(self, x):
        return self.head(self.drop(self.features(x)))


class SegNet(nn.Module):
    """The "off-the-shelf" segmentation nets of the digits demo: ``depth`` 3x3 conv-BN-ReLU layers
    (receptive field 2 * depth + 1) and a 1x1 head, logits [B, num_classes, H, W].

    ``context`` > 0 adds an image-level branch (as DeepLabV3's image pooling): ``context`` stride-2
    conv-BN-ReLU layers, a global average pool and a 1x1 conv, added to every pixel's features before the
    head. The semantic net (background / ink of digit 0..9) needs it: a pixel's class depends on the whole
    digit, not on its 7x7 neighbourhood. context=0 is the stroke net (ink / background)."""

    kind = "segnet"

    def __init__(self, width: int = 16, depth: int = 3, in_channels: int = 1, num_classes: int = 2,
                 context: int = 0):
        super().__init__()
        if context < 0:
            raise ValueError(f"context must be 0 (no image-level branch) or more stride-2 layers, got {context}")
        self.config = dict(width=width, depth=depth, in_channels=in_channels, num_classes=num_classes)
        if context:  # stroke files keep their config as it was
            self.config["context"] = context
        layers, c = [], in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers)
        if context:
            ctx, cc = [], c
            for _ in range(context):
                ctx += [nn.Conv2d(cc, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()]
                cc = 2 * width
            self.context = nn.Sequential(*ctx)
            self.context_proj = nn.Conv2d(cc, c, 1)
        self.head = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        h = self.body(x)
        if hasattr(self, "context"):
            g = self.context_proj(F.adaptive_avg_pool2d(self.context(h), 1))
            h = F.relu(h + g)
        return self.head(h)


MODEL_KINDS = {"unet": EpsModel, "resnet": TinyResNet, "evalnet": EvalNet, "segnet": SegNet}


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- files

def save_model(model: nn.Module, path, extra: dict | None = None, half: bool = False) -> Path:
    from ..data.shards import save_safetensors_atomic

    sd = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {"kind": model.kind, "config": json.dumps(model.config), "extra": json.dumps(extra or {})}
    return save_safetensors_atomic(path, sd, metadata=meta)


def read_safetensors(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, with a clear error for missing/corrupt files."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():  # e.g. an experts folder given as tiny:<file>: "not found" of a path that exists misled
        raise IsADirectoryError(f"weight file {path} is a directory: name a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:  # safetensors raises several types for damaged files
        raise ValueError(f"corrupt or unreadable weight file {path}: {type(e).__name__}: {e}") from None
    return tensors, meta


def load_model(path, kind: str | None = None) -> nn.Module:
    tensors, meta = read_safetensors(path)
    k = meta.get("kind")
    if k is not None and k not in MODEL_KINDS:  # e.g. finetune's experts: 'no model metadata' misled
        what = " (finetune's noise-aware experts: ppap_fast.finetune.load_multi)" if k == "multiexperts" else ""
        raise ValueError(f"weight file {path} holds a {k!r} file{what}, not one of the tiny models "
                         f"{sorted(MODEL_KINDS)}")
    if "kind" not in meta or "config" not in meta:
        raise ValueError(f"weight file {path} has no model metadata (kind/config)")
    k = meta["kind"]
    config = metadata_json(meta, "config", path)
    if kind is not None and k != kind:
        raise ValueError(f"weight file {path} holds a {k!r} model, expected {kind!r}")
    model = build_from_metadata(k, config, path)
    ref = model.state_dict()
    missing, unexpected = [n for n in ref if n not in tensors], [n for n in tensors if n not in ref]
    bad = [f"{n}: model {tuple(ref[n].shape)} vs file {tuple(v.shape)}"
           for n, v in tensors.items() if n in ref and v.shape != ref[n].shape]
    if missing or unexpected or bad:  # load_state_dict's first line named none of them
        raise ValueError(f"weight file {path} does not fit the {k!r} model its metadata describes ({config}): "
                         f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys "
                         f"{unexpected[:8]}, {len(bad)} shape mismatches {bad[:8]}")
    tensors = {n: v.to(ref[n].dtype) if n in ref else v for n, v in tensors.items()}
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weight file {path} does not match its model: {str(e).splitlines()[0]}") from None
    model.eval()
    model.extra = metadata_json(meta, "extra", path, default={})
    return model


def metadata_json(meta: dict, key: str, path, default: dict | None = None) -> dict:
    """The JSON object stored under ``key`` in a weight file's metadata; one-line ValueError naming the file
    when it is missing (and no default), not JSON, or not a JSON object."""
    if key not in meta:
        if default is not None:
            return default
        raise ValueError(f"weight file {path} has no {key!r} in its metadata: re-save it with the ppap_fast function "
                         "that wrote it")
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"weight file {path}: metadata {key!r} is not valid JSON ({e}): re-save the file or fix "
                         "that entry") from None
    if not isinstance(value, dict):
        raise ValueError(f"weight file {path}: metadata {key!r} must be a JSON object, got a JSON "
                         f"{type(value).__name__}: re-save the file or fix that entry")
    return value


def build_from_metadata(kind, config: dict, path) -> nn.Module:
    """MODEL_KINDS[kind](**config) with a one-line ValueError naming the file for an unknown kind or a config
    the constructor refuses."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"weight file {path} names model kind {kind!r}, not one of the tiny models "
                         f"{sorted(MODEL_KINDS)}")
    try:
        return MODEL_KINDS[kind](**config)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch refusing a size
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"weight file {path}: its {kind!r} config {config} does not build the model ({msg}): "
                         "re-save the file or fix the config") from None
