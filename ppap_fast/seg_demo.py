"""The segmentation-guidance comparison of the digits demo (dense PPAP guidance).

An off-the-shelf stroke segmentation net (``segnet.safetensors``: :class:`~ppap_fast.models.tiny.SegNet`,
trained on clean images with labels taken from each image itself, :func:`~ppap_fast.data.ink_mask`) guides
the unconditional diffusion model towards the ink mask of a held-out real digit with
:class:`~ppap_fast.guidance.SegmentationGuide` (per-pixel cross-entropy):

* ``none``: no guidance;
* ``naive``: the segmentation net on x_t;
* ``ppap-5``: the net turned into 5 timestep experts (``seg_ppap5/``), distilled data-free with the
  per-pixel KL on the diffusion model's own samples (``ppap-fast distill --task segmentation``).

Targets: the ink masks of the first held-out (eval split) image of each class 0..9, never used for
training. Metric: IoU between the sample's own ink mask (the generated image thresholded by the same
rule: an evaluator independent of the guide) and the target mask; plus the class demo's evaluator
figures (FD, and the accuracy of the target digit's class) of the same samples.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .demo import (DEFAULT_SCALE, DemoError, _load_ppap, check_writable_dir, demo_schedule, evaluate_samples,
                   load_evaluator, load_teacher, load_unet, run_sampler, save_comparison, save_samples)

SEG_METHODS = ["none", "naive", "ppap-5"]
SEG_EXPERTS = {"ppap-5": "seg_ppap5"}  # method -> experts folder in the weights dir
SEG_CLASSES = 2  # background, ink
TARGET_ROW = "target mask"


def iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample intersection over union of binary masks [N, H, W] (bool, or integers 0 / 1): float64 [N];
    two empty masks agree completely (1.0)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"iou takes two masks of one shape [N, H, W], got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    for name, m in (("pred", pred), ("target", target)):
        if m.is_floating_point() or m.is_complex() or (m.numel() and not bool(((m == 0) | (m == 1)).all())):
            values = "" if m.is_floating_point() or m.is_complex() else f" with values {m.unique().tolist()[:5]}"
            raise ValueError(f"iou: {name} must be a binary mask (bool or 0 / 1 integers), got {m.dtype}{values}")
    p, t = pred.bool().flatten(1), target.bool().flatten(1)
    inter, union = (p & t).sum(1).double(), (p | t).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def heldout_targets(data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ink masks long [10, 16, 16], their digit classes [10]): the first image of each class 0..9 in the
    held-out eval split, quantised to uint8 as every sample is."""
    from .data import DigitsSplits, from_uint8, ink_mask, to_uint8

    x, y = DigitsSplits.create(data_seed).eval
    idx = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    return ink_mask(from_uint8(to_uint8(x[idx]))), y[idx]


def check_masks(masks) -> torch.Tensor:
    """Target masks as long [T, 16, 16] of 0 / 1 (a single [16, 16] mask is one target)."""
    m = torch.as_tensor(masks)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3 or tuple(m.shape[1:]) != (16, 16) or m.shape[0] == 0:
        raise DemoError(f"target masks must be [T, 16, 16] (or one [16, 16]) like the demo's images, got shape "
                        f"{tuple(torch.as_tensor(masks).shape)}")
    if m.is_floating_point() or not bool(((m == 0) | (m == 1)).all()):
        raise DemoError("target masks must hold 0 (background) and 1 (ink) only, as integers or bools")
    return m.long()


def load_seg_guide(weights_dir, method: str):
    """(guide model or None, pass_t, info) of a segmentation method."""
    if method not in SEG_METHODS:
        raise DemoError(f"unknown segmentation method {method!r}: expected one of {', '.join(SEG_METHODS)}")
    if method == "none":
        return None, False, {"trainable_parameters": 0, "labelled_data": 0}
    try:
        net = load_teacher(weights_dir, "segmentation")
    except DemoError as e:
        raise DemoError(f"{e} (the segmentation comparison needs it: regenerate it as docs/demo.md says, or "
                        "run the demo with --seg-per-target 0)") from None
    if method == "naive":
        return net, False, {"trainable_parameters": 0, "labelled_data": 0}
    model, trainable = _load_ppap(Path(weights_dir) / SEG_EXPERTS[method], net)
    if model.n_experts != 5:
        raise DemoError(f"{Path(weights_dir) / SEG_EXPERTS[method]} holds {model.n_experts} experts, {method} needs 5")
    return model, True, {"trainable_parameters": int(trainable), "labelled_data": 0}


def sample_seg_method(method: str, weights_dir, masks, per_target: int = 2, sampler: str = "ddim",
                      steps: int | None = None, scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250,
                      unet=None, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """``per_target`` samples per target mask (sample i aims at mask i % T, so samples 0..T-1 are one per
    target); the same initial noise for every method. Returns (images in [-1, 1], stats)."""
    from .guidance import SegmentationGuide

    masks = check_masks(masks)
    if per_target < 1:
        raise DemoError(f"per_target must be at least 1, got {per_target}")
    sched, steps = demo_schedule(sampler, steps)
    unet = unet if unet is not None else load_unet(weights_dir)
    gmodel, pass_t, info = load_seg_guide(weights_dir, method)
    n = masks.shape[0] * per_target
    wanted = masks.repeat(per_target, 1, 1)

    def make_guide(rows, denoiser):
        if gmodel is None:
            return None
        return SegmentationGuide(gmodel, wanted[rows], scale, pass_t=pass_t, num_classes=SEG_CLASSES)

    x, run = run_sampler(unet, n, sched, sampler, make_guide, seed, batch_size, False, progress, f"segment {method}")
    return x, {**info, "method": method, "sampler": sampler, "steps": steps, "scale": scale if gmodel else 0.0,
               "num_samples": n, "nfe_per_sample": run["unet_calls"] / run["chunks"],
               "seconds": round(run["seconds"], 2)}


def score_segmentation(images_u8: np.ndarray, masks: torch.Tensor) -> dict:
    """IoU of each sample's own ink mask (its pixels above the ink threshold) with its target mask
    (sample i: mask i % T): mean, standard deviation and per-target means."""
    from .data import from_uint8, ink_mask

    masks = check_masks(masks)
    if images_u8.shape[0] % masks.shape[0]:
        raise DemoError(f"{images_u8.shape[0]} samples are not a whole number of rounds over {masks.shape[0]} targets")
    per = iou(ink_mask(from_uint8(images_u8)), masks.repeat(images_u8.shape[0] // masks.shape[0], 1, 1))
    by_target = per.view(-1, masks.shape[0]).mean(0)
    return {"iou": float(per.mean()), "iou_std": float(per.std()) if per.numel() > 1 else 0.0,
            "iou_per_target": [round(float(v), 4) for v in by_target]}


def run_segmentation(out, weights_dir, per_target: int = 2, sampler: str = "ddim", steps: int | None = None,
                     scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250, progress: bool = True,
                     unet=None, evaluator=None, methods=None, threads: int | None = 1) -> dict:
    """Sample every segmentation method towards the 10 held-out masks, score them, and write
    ``seg_samples_<method>.npz`` and ``segmentation.png`` (rows: target mask, then a method each; columns:
    the targets, each from the same initial noise) in ``out``. Returns {"methods": {method: results}, ...}.

    ``threads``: torch CPU threads meanwhile (None: as set). One by default: the demo's batches of 20 tiny
    images gain nothing from a second thread, and on 2 shared cores its spin-waits made a method take
    8-15 s instead of 0.8 s (measured under load)."""
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_segmentation(Path(out), weights_dir, per_target, sampler, steps, scale, seed, batch_size,
                                 progress, unet, evaluator, methods)
    finally:
        torch.set_num_threads(prev)


def _run_segmentation(out, weights_dir, per_target, sampler, steps, scale, seed, batch_size, progress, unet,
                      evaluator, methods) -> dict:
    out = check_writable_dir(out)
    methods = list(SEG_METHODS if methods is None else methods)
    for m in methods:  # every weight file loads before any work
        load_seg_guide(weights_dir, m)
    unet = unet if unet is not None else load_unet(weights_dir)
    evaluator = evaluator if evaluator is not None else load_evaluator(weights_dir)
    masks, classes = heldout_targets()
    labels = classes.repeat(per_target).numpy()  # the target digit's class: the evaluator's accuracy
    t0 = time.time()
    results, pictured = {}, {TARGET_ROW: (masks.repeat(per_target, 1, 1) * 255).to(torch.uint8)[..., None].numpy()}
    for m in methods:
        x, stats = sample_seg_method(m, weights_dir, masks, per_target, sampler, steps, scale, seed, batch_size,
                                     unet=unet, progress=progress)
        path = save_samples(out / f"seg_samples_{m}.npz", x, labels)
        with np.load(path) as z:
            images = z["images"]
        pictured[m] = images
        ev = evaluate_samples(images, labels, evaluator) if images.shape[0] >= 4 else {}  # (FD needs a few)
        results[m] = {**score_segmentation(images, masks), "fd": ev.get("fd"),
                      "target_class_accuracy": ev.get("target_accuracy"), **stats}
    save_comparison(out / "segmentation.png", pictured, labels,
                    {m: f"IoU {r['iou']:.2f}" + ("" if r["fd"] is None else f", FD {r['fd']:.0f}")
                     for m, r in results.items()})
    return {"methods": results, "per_target": per_target, "num_targets": int(masks.shape[0]),
            "target_classes": classes.tolist(), "scale": scale, "seed": seed,
            "ink_rule": "pixel value in [-1, 1] > 0", "seconds": round(time.time() - t0, 1),
            "torch_threads": torch.get_num_threads()}


def format_seg_table(results: dict) -> str:
    rows = [["method", "IoU", "IoU sd", "FD", "class acc", "trainable", "sec"]]
    for m, r in results.items():
        rows.append([m, f"{r['iou']:.3f}", f"{r['iou_std']:.3f}", "-" if r["fd"] is None else f"{r['fd']:.1f}",
                     "-" if r["target_class_accuracy"] is None else f"{r['target_class_accuracy']:.3f}",
                     f"{r['trainable_parameters']:d}", f"{r['seconds']:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
