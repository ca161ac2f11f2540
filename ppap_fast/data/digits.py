"""scikit-learn's ``load_digits`` as 16x16 images in [-1, 1].

Mapping (fixed, documented in docs/demo.md):
  * raw pixel values 0..16 map linearly to [-1, 1]: v -> v / 8 - 1
    (background 0 -> -1, full ink 16 -> +1; never inverted);
  * 8x8 -> 16x16 by bilinear interpolation (align_corners=False), applied after the
    linear map, so the result stays inside [-1, 1];
  * uint8 files hold round((x + 1) * 127.5) in 0..255.

Seeded split of the 1797 images (permutation with ``torch.Generator().manual_seed(seed)``):
  diffusion-train 900, classifier-train 500, held-out eval 397.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SIZES = {"diffusion": 900, "classifier": 500, "eval": 397}
INK_THRESHOLD = 0.0  # a pixel is ink when its value in [-1, 1] is above this (raw digit value > 8 of 16)


def ink_mask(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel stroke labels of images N x 1 x H x W in [-1, 1]: long N x H x W, 1 = ink (value above
    ``INK_THRESHOLD``), 0 = background. The segmentation net's training labels (on clean images), the
    demo's target masks and its evaluator of samples all use this one rule."""
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"ink_mask takes one-channel images N x 1 x H x W, got shape {tuple(x.shape)}")
    return (x[:, 0] > INK_THRESHOLD).long()


SEMANTIC_CLASSES = 1 + NUM_CLASSES  # background, then ink of digit 0..9


def semantic_mask(x: torch.Tensor, y) -> torch.Tensor:
    """Per-pixel semantic labels of images N x 1 x H x W in [-1, 1] of digit classes ``y`` [N] (0..9):
    long N x H x W, 0 = background, 1 + y on the image's ink (:func:`ink_mask`). The semantic segmentation
    net's training labels and the demo's semantic targets."""
    ink = ink_mask(x)
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or tuple(y.shape) != (ink.shape[0],):
        raise ValueError(f"semantic_mask takes one integer class per image, [{ink.shape[0]}], got {y.dtype} "
                         f"with shape {tuple(y.shape)}")
    if y.numel() and bool(((y < 0) | (y >= NUM_CLASSES)).any()):
        raise ValueError(f"semantic_mask: classes must lie in [0, {NUM_CLASSES}), got {y.unique().tolist()[:10]}")
    return ink * (1 + y.long().to(ink.device).view(-1, 1, 1))


def values_to_unit(values) -> torch.Tensor:
    """Raw digit values 0..16 -> [-1, 1] (linear, background -1, ink bright)."""
    v = torch.as_tensor(np.asarray(values), dtype=torch.float32)
    return v / 8.0 - 1.0


def to_uint8(x: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """[-1, 1] tensor N x C x H x W -> uint8 array N x H x W x C: round((x + 1) * 127.5) (the demo's files);
    ``truncate``: guided-diffusion's sample scripts' ((x + 1) * 127.5).clamp(0, 255).to(uint8), which
    truncates (the official samples scored for FID)."""
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):  # NaN -> uint8 is undefined (usually 0: a plausible black pixel)
        raise ValueError(f"images hold {int((~torch.isfinite(x)).sum())} non-finite values (NaN/Inf); "
                         "refusing to quantise them to uint8")
    u = ((x.clamp(-1, 1) + 1) * 127.5)
    u = (u if truncate else u.round()).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(a) -> torch.Tensor:
    """uint8 array N x H x W x C -> float tensor N x C x H x W in [-1, 1]."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 4:
        raise ValueError(f"expected uint8 N x H x W x C, got {a.dtype} with shape {a.shape}")
    return torch.from_numpy(a.astype(np.float32)).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def load_digits_16(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images float32 N x 1 x size x size in [-1, 1], labels int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = values_to_unit(d.images).unsqueeze(1)  # N x 1 x 8 x 8
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).contiguous(), torch.as_tensor(d.target, dtype=torch.long)


@dataclass
class DigitsSplits:
    diffusion: tuple[torch.Tensor, torch.Tensor]
    classifier: tuple[torch.Tensor, torch.Tensor]
    eval: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def create(cls, seed: int = 0, size: int = IMAGE_SIZE) -> "DigitsSplits":
        x, y = load_digits_16(size)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        a = SPLIT_SIZES["diffusion"]
        b = a + SPLIT_SIZES["classifier"]
        parts = [perm[:a], perm[a:b], perm[b:]]
        return cls(*[(x[p].contiguous(), y[p].contiguous()) for p in parts])


def random_shift(x: torch.Tensor, max_shift: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, padding with background (-1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device)  # n x h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device)  # n x w
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # n h w c
    return out.permute(0, 3, 1, 2).contiguous()
