"""``preview.png`` of a data-free set: what its teacher sees in the first images (any image size and channel count)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

# a classifier with at most this many classes gets a row per class; more (ImageNet's 1000): one plain grid
MAX_CLASS_ROWS = 20
CELL_MAX = 64  # larger images are shrunk to this many pixels a side in the picture


def _rgb(images_u8: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x C -> N x H x W x 3: grey for 1 channel (or more than 4: the first), RGB(A) as RGB."""
    c = images_u8.shape[-1]
    return images_u8[..., :3] if c in (3, 4) else np.repeat(images_u8[..., :1], 3, axis=-1)


def mask_colours(num_classes: int) -> np.ndarray:
    """uint8 [K, 3]: class 0 black, the others distinct bright colours."""
    k = np.arange(num_classes)
    colours = (np.stack([k * 67, k * 151, k * 211], 1) % 200 + 55).astype(np.uint8)
    colours[0] = 0
    return colours


def _cells(rgb: np.ndarray) -> np.ndarray:
    """The images at picture scale: small ones enlarged by an integer factor (16x16 digits x3), large ones shrunk."""
    h, w = rgb.shape[1:3]
    if max(h, w) > CELL_MAX:
        from PIL import Image

        f = CELL_MAX / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        return np.stack([np.asarray(Image.fromarray(im).resize(size, Image.BILINEAR)) for im in rgb])
    scale = max(1, 48 // max(h, w))
    return rgb.repeat(scale, 1).repeat(scale, 2)


def save_cell_grid(path, rows: list, columns: int) -> Path:
    """PNG of ``rows`` (each uint8 n x H x W x 3, n <= columns), one line each, 1-pixel grey borders."""
    from PIL import Image

    from .shards import _atomic

    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + 1) + 1, columns * (w + 1) + 1, 3), 64, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row[:columns]):
            canvas[1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w] = im
    im = Image.fromarray(canvas)
    return _atomic(path, lambda tmp: im.save(tmp, format="PNG"), ".png")


def datafree_preview(out, shown: int = 100, per_row: int = 10) -> str:
    """Write ``preview.png`` into a finished data-free set ``out``: its first ``shown`` images in rows by the
    teacher's top-1 class (more than MAX_CLASS_ROWS classes: a plain grid), or for a dense teacher each image
    beside its predicted mask. Returns a line to print with the teacher's top-1 counts over the whole set for
    a classifier (is every class there?)."""
    from .shards import ShardSet, remove_stale_tmp

    out = Path(out)
    data = ShardSet(out)
    remove_stale_tmp(out / "preview.png", ".png")  # a preview write that was killed
    key = "logits" if "logits" in data else "targets" if "targets" in data else None
    if key is None:
        return f"{out}: no cached teacher outputs, no preview"
    path = out / "preview.png"
    first = data.gather(key, np.arange(1))
    if first.ndim == 2:  # a classifier: top-1 of every image, read in chunks; the first ``shown`` pictured
        top1 = np.concatenate([data.gather(key, np.arange(s, min(s + 1000, len(data)))).argmax(1)
                               for s in range(0, len(data), 1000)])
        sel = np.arange(min(shown, len(data)))
        cells = _cells(_rgb(data.gather("images", sel)))
        k = first.shape[1]
        counts = np.bincount(top1, minlength=k)
        if k <= MAX_CLASS_ROWS:
            rows = [cells[top1[sel] == c][:per_row] for c in np.unique(top1[sel])]
            save_cell_grid(path, rows, per_row)
            return (f"{path}: the first {len(sel)} images, a row per teacher class; the teacher's top-1 over all "
                    f"{len(data)}: " + ", ".join(f"{c}: {n}" for c, n in enumerate(counts.tolist())))
        save_cell_grid(path, [cells[i:i + per_row] for i in range(0, len(cells), per_row)], per_row)
        common = np.argsort(-counts, kind="stable")[:10]
        return (f"{path}: the first {len(sel)} images; the teacher's top-1 over all {len(data)} covers "
                f"{int((counts > 0).sum())} of {k} classes, most often " +
                ", ".join(f"{c}: {counts[c]}" for c in common.tolist() if counts[c]))
    sel = np.arange(min(shown // 2, len(data)))  # each image beside its mask
    images, maps = data.gather("images", sel), data.gather(key, sel)
    if maps.ndim == 3:  # a depth map without its channel dim ([B, H, W], as predicted_depth)
        maps = maps[:, None]
    if maps.ndim != 4:
        return f"{out}: teacher outputs of shape {maps.shape[1:]}, no preview"
    if maps.shape[1] == 1:  # one channel (depth, a saliency map): min-max scaled per image
        m = maps[:, 0].astype(np.float32)
        lo, hi = m.min((1, 2), keepdims=True), m.max((1, 2), keepdims=True)
        masks = np.repeat(((m - lo) / np.maximum(hi - lo, 1e-12) * 255).round().astype(np.uint8)[..., None], 3, -1)
        what = "its teacher output (min to max)"
    else:
        masks = mask_colours(maps.shape[1])[maps.argmax(1)]
        what = "the teacher's predicted mask"
    if masks.shape[1:3] != images.shape[1:3]:  # a dense output at another resolution: shown at the image's
        from PIL import Image

        masks = np.stack([np.asarray(Image.fromarray(m).resize(images.shape[2:0:-1], Image.NEAREST)) for m in masks])
    pairs = _cells(np.stack([_rgb(images), masks], 1).reshape(-1, *images.shape[1:3], 3))
    save_cell_grid(path, [pairs[i:i + per_row] for i in range(0, len(pairs), per_row)], per_row)
    return f"{path}: the first {len(sel)} images, each beside {what}"
