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

:func:`run_semantic`: the same comparison with semantic masks (0 background, 1 + the digit's class on its ink;
``semseg.safetensors`` / ``semseg_ppap5``), scored by ink IoU, the evaluator's class accuracy and their
conjunction (success). Not part of the demo run: PPAP-5 did not win at s = 10 (docs/demo.md).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .demo import (DEFAULT_SCALE, DemoError, _load_ppap, check_writable_dir, demo_schedule, evaluate_samples,
                   load_evaluator, load_teacher, load_unet, markdown_table, run_sampler, save_comparison,
                   save_samples)

SEG_METHODS = ["none", "naive", "ppap-5"]
SEG_EXPERTS = {"ppap-5": "seg_ppap5"}  # method -> experts folder in the weights dir
SEG_CLASSES = 2  # background, ink
TARGET_ROW = "target mask"
# the semantic comparison (background / ink of digit 0..9): its experts folder and class count
SEM_EXPERTS = {"ppap-5": "semseg_ppap5"}
SEM_CLASSES = 11
TASK_EXPERTS = {"segmentation": SEG_EXPERTS, "semantic": SEM_EXPERTS}
TASK_CLASSES = {"segmentation": SEG_CLASSES, "semantic": SEM_CLASSES}
SUCCESS_IOU = 0.5  # semantic success: ink IoU at least this and the evaluator reads the target digit


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


def _heldout_images(data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import DigitsSplits, from_uint8, to_uint8

    x, y = DigitsSplits.create(data_seed).eval
    idx = torch.stack([torch.nonzero(y == c)[0, 0] for c in range(10)])
    return from_uint8(to_uint8(x[idx])), y[idx]


def heldout_targets(data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ink masks long [10, 16, 16], their digit classes [10]): the first image of each class 0..9 in the
    held-out eval split, quantised to uint8 as every sample is."""
    from .data import ink_mask

    x, y = _heldout_images(data_seed)
    return ink_mask(x), y


def semantic_targets(data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(semantic masks long [10, 16, 16]: 0 background, 1 + class on ink; their classes [10]) of the same
    held-out images as :func:`heldout_targets` (so ``masks > 0`` are its ink masks)."""
    from .data import semantic_mask

    x, y = _heldout_images(data_seed)
    return semantic_mask(x, y), y


def _mask_batch(masks, what: str) -> torch.Tensor:
    """``masks`` as a tensor [T, 16, 16], T >= 1 (a single [16, 16] mask is one target)."""
    m = torch.as_tensor(masks)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3 or tuple(m.shape[1:]) != (16, 16) or m.shape[0] == 0:
        raise DemoError(f"{what} must be [T, 16, 16] (or one [16, 16]) like the demo's images, got shape "
                        f"{tuple(torch.as_tensor(masks).shape)}")
    return m


def check_masks(masks) -> torch.Tensor:
    """Target masks as long [T, 16, 16] of 0 / 1 (a single [16, 16] mask is one target)."""
    m = _mask_batch(masks, "target masks")
    if m.is_floating_point() or not bool(((m == 0) | (m == 1)).all()):
        raise DemoError("target masks must hold 0 (background) and 1 (ink) only, as integers or bools")
    return m.long()


def check_semantic_masks(masks) -> torch.Tensor:
    """Semantic target masks as long [T, 16, 16] of 0 (background) .. 10 (ink of digit 9)."""
    m = _mask_batch(masks, "semantic target masks")
    if m.is_floating_point() or m.is_complex() or m.dtype == torch.bool or bool(((m < 0) | (m >= SEM_CLASSES)).any()):
        raise DemoError(f"semantic target masks must hold integers 0 (background) .. {SEM_CLASSES - 1} "
                        "(1 + the digit's class on its ink)")
    return m.long()


def _check_task(task: str) -> str:
    if task not in TASK_EXPERTS:
        raise DemoError(f"unknown dense task {task!r}: expected one of {', '.join(TASK_EXPERTS)}")
    return task


def load_seg_guide(weights_dir, method: str, task: str = "segmentation"):
    """(guide model or None, pass_t, info) of a segmentation method; ``task``: "segmentation" (the stroke
    net, ``segnet.safetensors`` / ``seg_ppap5``) or "semantic" (``semseg.safetensors`` / ``semseg_ppap5``)."""
    _check_task(task)
    if method not in SEG_METHODS:
        raise DemoError(f"unknown segmentation method {method!r}: expected one of {', '.join(SEG_METHODS)}")
    if method == "none":
        return None, False, {"trainable_parameters": 0, "labelled_data": 0}
    try:
        net = load_teacher(weights_dir, task)
    except DemoError as e:
        skip = ", or run the demo with --seg-per-target 0" if task == "segmentation" else ""
        raise DemoError(f"{e} (the {task} comparison needs it: regenerate it as docs/demo.md says{skip})") from None
    if method == "naive":  # labelled data: beyond the off-the-shelf net's own training, as in the class table
        return net, False, {"trainable_parameters": 0, "labelled_data": 0}
    folder = Path(weights_dir) / TASK_EXPERTS[task][method]
    model, trainable = _load_ppap(folder, net)
    if model.n_experts != 5:
        raise DemoError(f"{folder} holds {model.n_experts} experts, {method} needs 5")
    return model, True, {"trainable_parameters": int(trainable), "labelled_data": 0}


def sample_seg_method(method: str, weights_dir, masks, per_target: int = 2, sampler: str = "ddim",
                      steps: int | None = None, scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250,
                      unet=None, progress: bool = True, task: str = "segmentation") -> tuple[torch.Tensor, dict]:
    """``per_target`` samples per target mask (sample i aims at mask i % T, so samples 0..T-1 are one per
    target); the same initial noise for every method. Returns (images in [-1, 1], stats). ``task``
    "semantic": masks of 0..10 (:func:`semantic_targets`) and the semantic net's guides."""
    from .guidance import SegmentationGuide

    masks = check_masks(masks) if _check_task(task) == "segmentation" else check_semantic_masks(masks)
    if per_target < 1:
        raise DemoError(f"per_target must be at least 1, got {per_target}")
    sched, steps = demo_schedule(sampler, steps)
    unet = unet if unet is not None else load_unet(weights_dir)
    gmodel, pass_t, info = load_seg_guide(weights_dir, method, task)
    n = masks.shape[0] * per_target
    wanted = masks.repeat(per_target, 1, 1)

    def make_guide(rows, denoiser):
        if gmodel is None:
            return None
        return SegmentationGuide(gmodel, wanted[rows], scale, pass_t=pass_t, num_classes=TASK_CLASSES[task])

    x, run = run_sampler(unet, n, sched, sampler, make_guide, seed, batch_size, False, progress,
                         f"{'segment' if task == 'segmentation' else 'semantic'} {method}")
    return x, {**info, "method": method, "sampler": sampler, "steps": steps, "scale": scale if gmodel else 0.0,
               "num_samples": n, "nfe_per_sample": run["unet_calls"] / run["chunks"],
               "seconds": round(run["seconds"], 2)}


def score_segmentation(images_u8: np.ndarray, masks: torch.Tensor) -> dict:
    """IoU of each sample's own ink mask (its pixels above the ink threshold) with its target mask
    (sample i: mask i % T): mean, standard deviation and per-target means."""
    from .data import from_uint8, ink_mask

    masks = check_masks(masks)
    if images_u8.shape[0] == 0:  # 0 % T passed: an IoU of NaN (the mean of no samples), no error
        raise DemoError("no samples to score (an empty sample set)")
    if images_u8.shape[0] % masks.shape[0]:
        raise DemoError(f"{images_u8.shape[0]} samples are not a whole number of rounds over {masks.shape[0]} targets")
    per = iou(ink_mask(from_uint8(images_u8)), masks.repeat(images_u8.shape[0] // masks.shape[0], 1, 1))
    by_target = per.view(-1, masks.shape[0]).mean(0)
    return {"iou": float(per.mean()), "iou_std": float(per.std()) if per.numel() > 1 else 0.0,
            "iou_per_target": [round(float(v), 4) for v in by_target]}


def run_segmentation(out, weights_dir, per_target: int = 2, sampler: str = "ddim", steps: int | None = None,
                     scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250, progress: bool = True,
                     unet=None, evaluator=None, methods=None, threads: int | None = 1, on_written=None) -> dict:
    """Sample every segmentation method towards the 10 held-out masks, score them, and write
    ``seg_samples_<method>.npz`` and ``segmentation.png`` (rows: target mask, then a method each; columns:
    the targets, each from the same initial noise) in ``out``. Returns {"methods": {method: results}, ...}.

    ``threads``: torch CPU threads meanwhile (None: as set). One by default: the demo's batches of 20 tiny
    images gain nothing from a second thread, and on 2 shared cores its spin-waits made a method take
    8-15 s instead of 0.8 s (measured under load). ``on_written(name)``: called as each file is written."""
    return _run_dense("segmentation", out, weights_dir, per_target, sampler, steps, scale, seed, batch_size,
                      progress, unet, evaluator, methods, threads, on_written)


def _score_stroke_run(images, masks, ev, evaluator) -> dict:
    return {**score_segmentation(images, masks), "fd": ev.get("fd"), "target_class_accuracy": ev.get("target_accuracy")}


def _stroke_caption(r: dict) -> str:
    return f"IoU {r['iou']:.2f}" + ("" if r["fd"] is None else f", FD {r['fd']:.0f}")


def _run_dense(task, out, weights_dir, per_target, sampler, steps, scale, seed, batch_size, progress, unet,
               evaluator, methods, threads, on_written=None) -> dict:
    """The stroke or semantic comparison (:data:`DENSE_RUNS`), with ``threads`` torch threads meanwhile."""
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_dense_body(task, Path(out), weights_dir, per_target, sampler, steps, scale, seed, batch_size,
                               progress, unet, evaluator, methods, on_written)
    finally:
        torch.set_num_threads(prev)


def _run_dense_body(task, out, weights_dir, per_target, sampler, steps, scale, seed, batch_size, progress, unet,
                    evaluator, methods, on_written=None) -> dict:
    spec = DENSE_RUNS[task]
    written = on_written if on_written is not None else (lambda name: None)
    out = check_writable_dir(out)
    methods = list(SEG_METHODS if methods is None else methods)
    for m in methods:  # every weight file loads before any work
        load_seg_guide(weights_dir, m, task)
    unet = unet if unet is not None else load_unet(weights_dir)
    evaluator = evaluator if evaluator is not None else load_evaluator(weights_dir)
    masks, classes = spec["targets"]()
    labels = classes.repeat(per_target).numpy()  # the target digit's class: the evaluator's accuracy
    t0 = time.time()
    results, pictured = {}, {spec["target_row"]: spec["picture_targets"](masks.repeat(per_target, 1, 1))}
    for m in methods:
        x, stats = sample_seg_method(m, weights_dir, masks, per_target, sampler, steps, scale, seed, batch_size,
                                     unet=unet, progress=progress, task=task)
        path = save_samples(out / f"{spec['prefix']}_samples_{m}.npz", x, labels)
        written(path.name)  # at once: a run killed later still records it (the demo removes it on a rerun)
        with np.load(path) as z:
            images = z["images"]
        pictured[m] = images
        ev = evaluate_samples(images, labels, evaluator) if images.shape[0] >= 4 else {}  # (FD needs a few)
        results[m] = {**spec["score"](images, masks, ev, evaluator), **stats}
    save_comparison(out / spec["picture"], pictured, labels, {m: spec["caption"](r) for m, r in results.items()})
    written(spec["picture"])
    return {"methods": results, "per_target": per_target, "num_targets": int(masks.shape[0]),
            "target_classes": classes.tolist(), "scale": scale, "seed": seed, **spec["extra"],
            "seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- the semantic comparison
# picture colours of the semantic classes: background black, then digit 0..9
SEM_PALETTE = np.array([(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                        (140, 86, 75), (227, 119, 194), (160, 160, 160), (188, 189, 34), (23, 190, 207)], np.uint8)
SEM_TARGET_ROW = "target (class colour)"


def colour_masks(masks) -> np.ndarray:
    """Semantic masks [T, 16, 16] of 0..10 -> uint8 RGB [T, 16, 16, 3] (:data:`SEM_PALETTE`)."""
    return SEM_PALETTE[check_semantic_masks(masks).numpy()]


def score_semantic(images_u8: np.ndarray, masks, evaluator) -> dict:
    """Scores of samples aimed at semantic masks (sample i: mask i % T), by rules independent of the guide:
    ink IoU (the sample's ink mask vs the mask's ink), the evaluator's accuracy for the target digit (the
    mask's class), and success = both (IoU >= :data:`SUCCESS_IOU` and the evaluator reads the target digit)."""
    from .data import from_uint8, ink_mask
    from .metrics import evaluator_outputs

    masks = check_semantic_masks(masks)
    ink = (masks > 0).long()
    digit = masks.flatten(1).max(1).values - 1  # the class marked on each target's ink
    if bool((digit < 0).any()):
        raise DemoError("a semantic target mask has no ink, so no target digit")
    lowest = masks.masked_fill(masks == 0, SEM_CLASSES).flatten(1).min(1).values - 1
    if bool((lowest != digit).any()):  # the highest class was taken as the target digit, without an error
        raise DemoError("a semantic target mask marks its ink with more than one class, so no single target digit")
    if images_u8.shape[0] % masks.shape[0]:
        raise DemoError(f"{images_u8.shape[0]} samples are not a whole number of rounds over {masks.shape[0]} targets")
    rounds = images_u8.shape[0] // masks.shape[0]
    x = from_uint8(images_u8)
    per_iou = iou(ink_mask(x), ink.repeat(rounds, 1, 1))
    with torch.no_grad():
        read = torch.from_numpy(evaluator_outputs(evaluator, x)[1].argmax(1))
    correct = read == digit.repeat(rounds)
    success = (per_iou >= SUCCESS_IOU) & correct
    return {"iou": float(per_iou.mean()), "iou_std": float(per_iou.std()) if per_iou.numel() > 1 else 0.0,
            "class_accuracy": float(correct.double().mean()), "success": float(success.double().mean()),
            "success_per_target": [round(float(v), 4) for v in success.double().view(rounds, -1).mean(0)]}


def run_semantic(out, weights_dir, per_target: int = 2, sampler: str = "ddim", steps: int | None = None,
                 scale: float = DEFAULT_SCALE, seed: int = 0, batch_size: int = 250, progress: bool = True,
                 unet=None, evaluator=None, methods=None, threads: int | None = 1, on_written=None) -> dict:
    """The semantic comparison: every method towards the 10 held-out semantic masks
    (:func:`semantic_targets`), scored by :func:`score_semantic` (+ the evaluator's FD); writes
    ``sem_samples_<method>.npz`` and ``semantic.png`` (rows: the class-coloured target, then a method each;
    a column per target, each from the same initial noise) in ``out``. Threads: as :func:`run_segmentation`."""
    return _run_dense("semantic", out, weights_dir, per_target, sampler, steps, scale, seed, batch_size,
                      progress, unet, evaluator, methods, threads, on_written)


def _score_semantic_run(images, masks, ev, evaluator) -> dict:
    return {**score_semantic(images, masks, evaluator), "fd": ev.get("fd")}


def _semantic_caption(r: dict) -> str:
    return f"success {r['success']:.2f}\nIoU {r['iou']:.2f}, acc {r['class_accuracy']:.2f}"


# what differs between the two dense comparisons
DENSE_RUNS = {
    "segmentation": {"targets": heldout_targets, "target_row": TARGET_ROW, "prefix": "seg",
                     "picture": "segmentation.png", "score": _score_stroke_run, "caption": _stroke_caption,
                     "picture_targets": lambda m: (m * 255).to(torch.uint8)[..., None].numpy(),
                     "extra": {"ink_rule": "pixel value in [-1, 1] > 0"}},
    "semantic": {"targets": semantic_targets, "target_row": SEM_TARGET_ROW, "prefix": "sem",
                 "picture": "semantic.png", "score": _score_semantic_run, "caption": _semantic_caption,
                 "picture_targets": colour_masks, "extra": {"success_iou": SUCCESS_IOU}},
}


def format_sem_table(results: dict) -> str:
    rows = [["method", "success", "IoU", "class acc", "FD", "trainable", "sec"]]
    for m, r in results.items():
        rows.append([m, f"{r['success']:.3f}", f"{r['iou']:.3f}", f"{r['class_accuracy']:.3f}",
                     "-" if r["fd"] is None else f"{r['fd']:.1f}", f"{r['trainable_parameters']:d}",
                     f"{r['seconds']:.1f}"])
    return markdown_table(rows)


def format_seg_table(results: dict) -> str:
    rows = [["method", "IoU", "IoU sd", "FD", "class acc", "trainable", "sec"]]
    for m, r in results.items():
        rows.append([m, f"{r['iou']:.3f}", f"{r['iou_std']:.3f}", "-" if r["fd"] is None else f"{r['fd']:.1f}",
                     "-" if r["target_class_accuracy"] is None else f"{r['target_class_accuracy']:.3f}",
                     f"{r['trainable_parameters']:d}", f"{r['seconds']:.1f}"])
    return markdown_table(rows)
