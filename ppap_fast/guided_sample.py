"""Guided sampling with real models from the command line: ``ppap-fast guided-sample``.

    ppap-fast guided-sample --denoiser adm:256x256_diffusion_uncond --checkpoint 256x256_diffusion_uncond.pt \\
        --guide resnet50 --guide-weights resnet50.pth --experts /ckpt/ppap10 --targets 207 --scale 10 \\
        --num-samples 64 --batch-size 32 --out samples/goldfish.npz

* denoiser: ``adm:<preset>`` with its guided-diffusion checkpoint, ``tiny`` (a ppap_fast tiny UNet
  file) or ``random-conv`` (smoke tests); the same specs as ``python -m ppap_fast.distributed``.
* guide: any teacher spec of :func:`ppap_fast.distributed.build_teacher` (a registry name with
  ``--guide-weights``, ``tiny:<file>``, ``py:module:factory`` with ``--guide-task``), or none
  (unguided). Its task picks the guide: classification -> :class:`ClassGuide` (``--targets``, cycled
  over the samples), segmentation -> :class:`SegmentationGuide`, depth / regression ->
  :class:`DenseRegressionGuide` (``--target-map``: a .npy label or depth map shared by all samples).
* experts: a :func:`ppap_fast.experts.save_experts` directory or a Hugging Face repo id in the local
  cache (``--experts-subfolder``): PPAP. Without ``--experts`` the plain model guides (the naive
  off-the-shelf baseline). ``--raw-input`` skips the model's input transform (the official PPAP
  experts were trained on raw x_t in [-1, 1]). Experts that record the input transform they were distilled
  through (``python -m ppap_fast.distributed`` distillation) are refused with another one.

Sample k of the run draws its x_T and its sampler noise (DDPM, eta > 0) from a CPU generator of its
own, ``torch.Generator().manual_seed(ppap_fast.seeding.sample_seed(seed, k))``: the same seed gives
the same images (up to float rounding) on the fast and the reference path, on any device and at any
``--batch-size``. ``--first-sample K`` starts the run at sample K (its x_T, noise and cycled target):
a large run split into parts (``--first-sample 0 --num-samples 25000``, ``--first-sample 25000 ...``,
on other machines) gives the images of the whole run.
Writes OUT (.npz: ``images`` uint8 N x H x W x C, quantised as guided-diffusion's sample scripts do,
``((x + 1) * 127.5).clamp(0, 255)`` truncated; ``targets`` when classifying), a PNG grid beside it
and OUT with .json: NFE, seconds, images/s, peak memory (``peak_memory_mb``: the CUDA allocator's
peak on a GPU, the process's peak RSS on a CPU, named by ``peak_memory_kind``: "cuda_allocator" |
"process_rss"; ``peak_rss_mb`` on both), DDPM's ``var_type`` (a diffusers scheduler's fixed_small /
fixed_large, else the sampler's default), ``clip_x0`` (the bound x0 was clipped to: a diffusers scheduler's
clip_sample_range, null with clip_sample=False, else 1.0), the configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class GuidedSampleConfig:
    out: str
    denoiser: str = "adm:256x256_diffusion_uncond"
    checkpoint: str | None = None
    image_size: int = 256
    channels: int = 3
    guide: str | None = None
    guide_weights: str | None = None
    guide_task: str | None = None
    experts: str | None = None
    experts_subfolder: str | None = None
    raw_input: bool = False
    targets: str | None = None
    target_map: str | None = None
    ignore_index: int | None = None     # segmentation: --target-map label of void pixels (None: -100)
    scale: float = 10.0
    sampler: str = "ddim"
    schedule: str = "linear"            # the denoiser's noise schedule (guided-diffusion's "linear" / "cosine")
    steps: int | None = None
    eta: float = 0.0
    num_samples: int = 16
    batch_size: int = 16
    seed: int = 0
    first_sample: int = 0               # index of the run's first sample (split a large run into parts)
    device: str = "auto"
    fast: bool = True
    guide_dtype: str | None = None      # "bf16" | "fp16": autocast of the guide (fast path)
    cuda_graph: bool | None = None      # one CUDA graph per step (fast path; None: on CUDA)
    compile: bool = False               # torch.compile (inductor) of the denoiser (fast path)
    fuse_norm_act: bool | None = None   # ADM: GroupNorm (+ scale-shift) + SiLU as one op (fast path; None: on CUDA)


def _schedule(cfg: GuidedSampleConfig):
    """(the respaced Schedule, its step count) of --sampler / --steps / --schedule, on the CPU."""
    from .demo import check_step_count
    from .schedule import SCHEDULE_NAMES, Schedule

    if cfg.schedule not in SCHEDULE_NAMES:  # was reported as a bad --steps
        raise ValueError(f"--schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {cfg.schedule!r}")
    steps = cfg.steps or (25 if cfg.sampler == "ddim" else 250)
    try:  # "cannot divide section of 1000 steps into 1500" named neither option
        check_step_count(cfg.sampler, steps)
        sched = Schedule.create(cfg.schedule, 1000, respacing=f"ddim{steps}" if cfg.sampler == "ddim" else str(steps))
    except ValueError as e:
        raise ValueError(f"--steps {steps} with --sampler {cfg.sampler} over 1000 diffusion steps: {e}") from None
    return sched, steps


def _check(cfg: GuidedSampleConfig):
    """(the output path, the Schedule, its step count): every check that needs no model, before --out's folder
    is made."""
    from .sampling import check_sampler_options

    out = Path(cfg.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz, got {out.name}")
    check_sampler_options(cfg.sampler, cfg.eta, None)
    if cfg.num_samples < 1 or cfg.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be positive")
    if cfg.first_sample < 0:
        raise ValueError(f"--first-sample must be >= 0, got {cfg.first_sample}")
    if cfg.image_size < 1 or cfg.channels < 1:
        raise ValueError(f"--image-size and --channels must be positive, got {cfg.image_size} and {cfg.channels}")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"--steps must be positive, got {cfg.steps}")
    if cfg.experts_subfolder and not cfg.experts:
        raise ValueError("--experts-subfolder needs --experts")
    if not math.isfinite(cfg.scale):
        raise ValueError(f"--scale must be finite, got {cfg.scale}")
    if cfg.guide_dtype not in (None, "bf16", "fp16"):
        raise ValueError(f"--guide-dtype must be bf16 or fp16, got {cfg.guide_dtype!r}")
    if cfg.guide is None and (cfg.experts or cfg.targets or cfg.target_map):
        raise ValueError("--experts / --targets / --target-map need --guide (the off-the-shelf model)")
    if cfg.guide is None and cfg.guide_dtype:  # an unguided run ignored it without a word
        raise ValueError("--guide-dtype sets the guide's autocast dtype: it needs --guide")
    if cfg.guide is None:  # the guide's other options: ignored silently without one (an unguided run)
        given = [f for f, v in (("--guide-weights", cfg.guide_weights), ("--guide-task", cfg.guide_task),
                                ("--raw-input", cfg.raw_input or None), ("--ignore-index", cfg.ignore_index))
                 if v is not None]
        if given:
            raise ValueError(f"{' / '.join(given)} need --guide (the off-the-shelf model); without it the run is "
                             "unguided")
    if cfg.guide is not None and cfg.ignore_index is not None:  # was refused only after loading the models
        task = _declared_task(cfg)
        if task is not None:
            _check_ignore_index(task)
    if not cfg.fast and (cfg.guide_dtype or cfg.cuda_graph is not None or cfg.compile or cfg.fuse_norm_act is not None):
        raise ValueError("--guide-dtype, --cuda-graph, --compile and --fuse-norm-act are options of the fast path "
                         "(drop --no-fast)")
    sched, steps = _schedule(cfg)  # a step count it cannot take left --out's new folders behind, empty
    for p in (out, out.with_suffix(".png"), out.with_suffix(".json")):
        if p.is_dir():  # the atomic writes would fail after all the sampling, naming a temporary file
            raise ValueError(f"output {p} is a directory; --out names a new .npz (its .png and .json go beside it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    from .data.shards import remove_stale_tmp

    for p in (out, out.with_suffix(".png"), out.with_suffix(".json")):
        remove_stale_tmp(p, p.suffix)  # a killed run's atomic-write temporaries
    return out, sched, steps


def _declared_task(cfg: GuidedSampleConfig) -> str | None:
    """The guide's task where it is known without building the guide: --guide-task, a registry model's, a tiny:
    file's (its header only); None otherwise (a py: factory, a bad name or file: build_teacher reports them)."""
    from .distributed import TEACHER_TASKS

    if cfg.guide_task is not None:
        return cfg.guide_task if cfg.guide_task in TEACHER_TASKS else None
    if cfg.guide.startswith("tiny:"):
        from safetensors import safe_open

        from .distill import TINY_TEACHERS

        try:
            with safe_open(cfg.guide[5:], framework="pt") as f:
                kind = (f.metadata() or {}).get("kind")
        except Exception:  # noqa: BLE001 - missing or damaged: reported when the guide is built
            return None
        return TINY_TEACHERS[kind][1] if kind in TINY_TEACHERS else None
    if cfg.guide.startswith("py:"):
        return None
    from .models.registry import GUIDES

    spec = GUIDES.get(cfg.guide)
    return spec.task if spec is not None else None


def _check_ignore_index(task: str | None) -> None:
    if task != "segmentation":
        raise ValueError(f"--ignore-index marks void pixels of a segmentation --target-map; this guide's task is "
                         f"{task}")


def _probe(what: str, cfg: GuidedSampleConfig, fn):
    """One batch-1 forward that turns a shape mismatch (a raw RuntimeError deep in a conv or a skip
    concatenation) into a one-line error naming the options, before any sampling."""
    try:
        with torch.no_grad():
            return fn()
    except (RuntimeError, ValueError) as e:  # ValueError: a model checking its own input shape
        raise ValueError(f"{what} does not take [1, {cfg.channels}, {cfg.image_size}, {cfg.image_size}] images "
                         f"(check --channels / --image-size): {str(e).splitlines()[0]}") from None


def _class_targets(spec: str | None, n: int, first: int = 0) -> torch.Tensor:
    if not spec:
        raise ValueError("a classification guide needs --targets (class ids, comma-separated, cycled)")
    try:
        ids = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--targets must be comma-separated integers, got {spec!r}") from None
    if not ids or min(ids) < 0:
        raise ValueError(f"--targets must be non-negative class ids, got {spec!r}")
    return torch.tensor([ids[i % len(ids)] for i in range(first, first + n)], dtype=torch.long)


def _target_map(path: str | None, task: str) -> torch.Tensor:
    if not path:
        raise ValueError(f"a {task} guide needs --target-map (a .npy map shared by all samples)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:  # a junk file was "pickled (object) data", an object array named no file
        raise ValueError(f"--target-map {path} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz: an open NpzFile
        arr.close()
        raise ValueError(f"--target-map {path}: expected a single .npy array, got an .npz archive")
    if task == "segmentation" and not np.issubdtype(arr.dtype, np.integer):  # .long() would truncate 1.7 -> 1
        raise ValueError(f"--target-map {path}: a segmentation map holds integer class labels, got {arr.dtype}")
    if task == "segmentation" and arr.ndim != 2:  # [B, H, W] was read per batch: cycled, or refused at a short batch
        raise ValueError(f"--target-map {path}: a segmentation map is one [H, W] label map shared by all samples, "
                         f"got shape {arr.shape}")
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.long() if task == "segmentation" else t.float()


def _check_experts_transform(cfg: GuidedSampleConfig, experts, transform) -> None:
    """Refuse experts distilled through another input transform than the guide's (raw x_t vs normalised, other
    mean / std): they were never trained on such inputs. Checkpoints without the record load as before."""
    from .experts.checkpoint import check_input_transform

    def reason():
        if cfg.raw_input:
            return "--raw-input"
        if transform is None:
            return f"--guide {cfg.guide} takes x_t as is"
        from .models import offtheshelf as ots

        try:
            weights = ots.resolve_weights_path(cfg.guide_weights) if cfg.guide_weights not in (None, "imagenet") \
                else None
        except (OSError, ValueError):
            weights = None
        if weights is not None and ots.timm_normalisation(weights) is not None:
            return f"the timm config.json beside --guide-weights {weights}"
        if weights is not None:
            return f"--guide {cfg.guide}'s default, no timm config.json beside --guide-weights {weights}"
        return f"--guide {cfg.guide}'s default"

    def hint(want):
        if cfg.raw_input:
            return "drop --raw-input"
        if transform is None:
            return "guide with the model the experts were distilled from"
        return ("pass --raw-input" if want.get("raw") else
                "guide with the weights the experts were distilled from, with the config.json that was beside them")

    check_input_transform(experts, transform, subject=f"the experts in {cfg.experts}", sees="this guide sees",
                          reason=reason, hint=hint)


def _build_guide(cfg: GuidedSampleConfig, device):
    """-> (make_guide(targets [B] on device or None) -> guide, info dict)."""
    from .distributed import build_teacher
    from .guidance import ClassGuide, DenseRegressionGuide, SegmentationGuide

    bt = build_teacher(cfg.guide, cfg.guide_weights, task=cfg.guide_task)
    if cfg.guide_weights is None and not cfg.experts and not cfg.guide.startswith(("tiny:", "py:")):
        import warnings

        warnings.warn(f"--guide {cfg.guide} without --guide-weights: a randomly initialised network guides the "
                      "samples; pass --guide-weights PATH (mobilenet_v2: 'imagenet', shipped offline)", stacklevel=2)
    model = bt.model
    info = {"guide": cfg.guide, "task": bt.task, "experts": None}
    if cfg.experts:
        from .experts import load_experts

        model = load_experts(cfg.experts, bt.model, subfolder=cfg.experts_subfolder).eval()
        _check_experts_transform(cfg, model, None if cfg.raw_input else bt.transform)
        info["experts"] = {"path": cfg.experts, "n_experts": model.n_experts}
    model = model.to(device)
    tf = None if cfg.raw_input or bt.transform is None else bt.transform.to(device)
    if bt.task == "classification" and cfg.target_map:
        raise ValueError("--target-map is for segmentation / depth guides; a classification guide takes --targets")
    if bt.task in ("segmentation", "depth", "regression") and cfg.targets:
        raise ValueError(f"--targets (class ids) is for classification guides; a {bt.task} guide takes --target-map")
    if cfg.ignore_index is not None:  # a py: factory's task (_check knew the others)
        _check_ignore_index(bt.task)
    if bt.task == "classification":
        return (lambda tgt: ClassGuide(model, tgt, cfg.scale, input_transform=tf)), info
    if bt.task in ("segmentation", "depth", "regression"):
        kw = {"ignore_index": cfg.ignore_index} if cfg.ignore_index is not None else {}
        cls = SegmentationGuide if bt.task == "segmentation" else DenseRegressionGuide
        tmap = _target_map(cfg.target_map, bt.task).to(device)
        if cls is DenseRegressionGuide:  # shared by all samples: [1, ...] (a [C, H, W] map at batch C is ambiguous)
            tmap = tmap[None]
        guide = cls(model, tmap, cfg.scale, input_transform=tf, **kw)
        return (lambda tgt: guide), info
    raise ValueError(f"the guide's task is unknown ({bt.task!r}): pass --guide-task classification|segmentation|"
                     "depth|regression")


def save_image_grid(path, images_u8: np.ndarray, ncol: int = 8) -> Path:
    """PNG grid of N x H x W x C (C = 1 or 3) uint8 images, ``ncol`` per row."""
    from PIL import Image

    from .data.shards import _atomic

    n, h, w, c = images_u8.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    canvas = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 64, np.uint8)
    for k in range(n):
        i, j = divmod(k, ncol)
        canvas[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = images_u8[k]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return _atomic(path, lambda tmp: img.save(tmp, format="PNG"), ".png")


def _peak_memory(device: torch.device, mem) -> dict:
    """``peak_memory_mb``: the CUDA caching allocator's peak (tensors on the GPU, reset before
    sampling) on CUDA, else the process's peak RSS; ``peak_memory_kind`` says which
    ("cuda_allocator" | "process_rss"); ``peak_rss_mb``: the process's peak RSS on any device."""
    rss = round(mem.peak_mb, 1)
    if device.type == "cuda":
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda_allocator", "peak_rss_mb": rss}
    return {"peak_memory_mb": rss, "peak_memory_kind": "process_rss", "peak_rss_mb": rss}


def run_guided_sample(cfg: GuidedSampleConfig, progress: bool = True) -> dict:
    """Sample ``cfg.num_samples`` images; writes the .npz, the grid and the stats JSON; returns the stats."""
    from .data import to_uint8
    from .data.shards import write_json_atomic, write_npz_atomic
    from .demo import PeakMemory
    from .distributed import _device_for, build_denoiser, clip_options, denoiser_clip, denoiser_var_type
    from .distill import declared_image_shape, warn_if_not_declared
    from .fast_sampling import FastGuidedSampler, recommended_options
    from .sampling import sample_loop
    from .seeding import PerSampleNoise

    out, sched, steps = _check(cfg)
    try:
        device = _device_for(cfg.device, 0)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    sched = sched.to(device)
    clip = denoiser_clip(cfg.denoiser, cfg.fast)  # a diffusers scheduler's clip_sample / clip_sample_range
    unet = build_denoiser(cfg.denoiser, cfg.checkpoint, cfg.channels, device.type, cfg.schedule,
                          sampler=cfg.sampler).to(device).eval()
    unet.requires_grad_(False)
    x1 = torch.zeros(1, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    t1 = sched.timestep_map[:1].to(device)
    declared = declared_image_shape(unet)
    hint = "" if declared is None or len(declared) != 3 or declared[1] != declared[2] else \
        f" (it declares {' x '.join(map(str, declared))}: --channels {declared[0]} --image-size {declared[1]})"
    out_channels = _probe(f"denoiser {cfg.denoiser!r}{hint}", cfg, lambda: unet(x1, t1)).shape[1]
    warn_if_not_declared(unet, cfg.channels, cfg.image_size)  # after the probe: a failed one is the only line
    var_type = denoiser_var_type(cfg.denoiser, cfg.sampler)  # a diffusers scheduler's fixed_small / fixed_large
    make_guide, info = (None, {"guide": None}) if cfg.guide is None else _build_guide(cfg, device)
    targets = None
    if info.get("task") == "classification":
        targets = _class_targets(cfg.targets, cfg.num_samples, cfg.first_sample)
        check = make_guide(targets.to(device))  # validates the ids against the model's class count
        if not check.target.checked:  # count unknown until the model has run: one forward on one image
            k = _probe(f"guide {cfg.guide!r}", cfg,
                       lambda: check.logits(x1, torch.zeros(1, dtype=torch.long, device=device))).shape[1]
            check.target._check(k)
    opts = {}
    if cfg.fast:
        opts = {"guide_autocast": {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.guide_dtype),
                "cuda_graph": device.type == "cuda" if cfg.cuda_graph is None else cfg.cuda_graph,
                "compile_model": cfg.compile,
                **recommended_options(unet, device, compile_model=cfg.compile, fuse_norm_act=cfg.fuse_norm_act)}

    samplers: dict = {}  # batch size -> (sampler or None, target buffer): experts merge once per size

    def sampler_for(b):
        if b not in samplers:
            buf = torch.zeros(b, dtype=torch.long, device=device)
            guide = None if make_guide is None else make_guide(buf)
            s = FastGuidedSampler(unet, sched, sampler=cfg.sampler, guide=guide, eta=cfg.eta, var_type=var_type,
                                  clip_denoised=clip is not None, **opts) \
                if cfg.fast else None
            samplers[b] = (s, buf, guide)
        return samplers[b]

    chunks = list(range(0, cfg.num_samples, cfg.batch_size))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(chunks) * sched.num_timesteps, desc="guided sampling", unit="step", mininterval=1)
    images = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_s = None
    with PeakMemory() as mem:
        t0 = time.time()
        for k, c in enumerate(chunks):
            if k == 1:  # the first batch also merges experts, compiles and captures graphs
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first_s = time.time() - t0
            b = min(cfg.batch_size, cfg.num_samples - c)
            fast, buf, guide = sampler_for(b)
            if targets is not None:
                buf.copy_(targets[c:c + b])  # in place: merged experts and captured graphs see it
            streams = PerSampleNoise((cfg.seed,), range(cfg.first_sample + c, cfg.first_sample + c + b))
            x_T = streams.randn((cfg.channels, cfg.image_size, cfg.image_size)).to(device)
            noise_fn = streams.noise_fn
            cb = (lambda *a: bar.update(1)) if bar is not None else None
            try:
                if fast is not None:
                    x0 = fast.sample(x_T, noise_fn=noise_fn, callback=cb)
                else:
                    x0 = sample_loop(unet, x_T, sched, sampler=cfg.sampler, guide=guide, eta=cfg.eta,
                                     var_type=var_type, noise_fn=noise_fn, **clip_options(clip),
                                     callback=(lambda i, o: bar.update(1)) if bar else None)
            except RuntimeError as e:  # the guide's non-finite check: a bad-input error for the CLI, not a crash
                if "NaN/Inf" not in str(e):
                    raise
                raise ValueError(f"batch {k}: {e} (guidance scale {cfg.scale} too large?)") from None
            if not torch.isfinite(x0).all():
                raise ValueError(f"batch {k} produced non-finite images (guidance scale {cfg.scale} too large?)")
            images.append(to_uint8(x0, truncate=True))  # as guided-diffusion's sample scripts: FID comparable
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.time() - t0
    if bar is not None:
        bar.close()
    imgs = np.concatenate(images)
    arrays = {"images": imgs}
    if targets is not None:
        arrays["targets"] = targets.numpy()
    for side in (out.with_suffix(".json"), out.with_suffix(".png")):  # a previous run's: not this .npz's
        side.unlink(missing_ok=True)
    write_npz_atomic(out, **arrays)  # the .json, written last, marks a complete output
    save_image_grid(out.with_suffix(".png"), imgs)
    guided = make_guide is not None
    applied = {}
    if cfg.fast:  # what ran, not what was asked (config has that): on if every batch size's sampler ran it
        per = [s.applied_options for s, _, _ in samplers.values()]
        applied = {k: all(p[k] for p in per) if isinstance(v, bool) else per[0][k] for k, v in opts.items()}
    if cfg.sampler == "ddpm" and var_type is None:  # the sampler's default
        var_type = "learned_range" if out_channels == 2 * cfg.channels else "fixed_large"
    stats = {"out": str(out), "num_samples": cfg.num_samples, "sampler": cfg.sampler, "var_type": var_type,
             "clip_x0": clip, "steps": steps, "path": "fast" if cfg.fast else "reference", "device": str(device),
             "fast_options": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in applied.items()},
             "nfe_per_sample": steps, "guide_evals_per_sample": steps if guided else 0,
             "seconds": round(seconds, 3), "images_per_s": round(cfg.num_samples / max(seconds, 1e-9), 3),
             "first_batch_seconds": round(first_s if first_s is not None else seconds, 3),
             "steady_images_per_s": None if first_s is None else round((cfg.num_samples - min(cfg.batch_size, cfg.num_samples))
                                                                       / max(seconds - first_s, 1e-9), 3),
             **_peak_memory(device, mem), **info, "config": dataclasses.asdict(cfg)}
    write_json_atomic(out.with_suffix(".json"), stats)
    return stats


def add_arguments(s) -> None:
    """The ``guided-sample`` subcommand's arguments (ppap_fast.cli)."""
    from .cli import _positive_int, finite_float as _finite_float
    from .schedule import SCHEDULE_NAMES

    s.add_argument("--out", required=True, help="output .npz (grid .png and stats .json beside it)")
    s.add_argument("--denoiser", default="adm:256x256_diffusion_uncond", help="adm:<preset> | tiny | diffusers:PATH (a saved UNet2DModel or pipeline) | random-conv")
    s.add_argument("--checkpoint", default=None, help="the denoiser's weights (guided-diffusion .pt for adm:)")
    s.add_argument("--image-size", type=_positive_int, default=256, help="the denoiser's image side, pixels")
    s.add_argument("--channels", type=_positive_int, default=3, help="the denoiser's image channels")
    s.add_argument("--guide", default=None, help="registry name | tiny:<file> | py:module:factory (none: unguided)")
    s.add_argument("--guide-weights", default=None,
                   help="the guide network's weights: a local checkpoint (torchvision / timm / official PPAP "
                        "state_dict), or 'imagenet' for a registry model with offline weights (mobilenet_v2); "
                        "needs --guide")
    s.add_argument("--guide-task", default=None, choices=["classification", "segmentation", "depth", "regression"],
                   help="default: the guide's own (its registry entry's, the tiny: file's kind, or a py: factory's "
                        "or module's .task); needs --guide")
    s.add_argument("--experts", default=None,
                   help="PPAP experts: save_experts dir or HF repo id in the local cache (needs --guide; without "
                        "--experts the guide is the naive baseline)")
    s.add_argument("--experts-subfolder", default=None, help="the experts' folder inside --experts (a repo id's "
                                                                 "subfolder)")
    s.add_argument("--raw-input", action="store_true", help="no input transform (official PPAP experts: raw x_t); "
                                                                 "needs --guide")
    s.add_argument("--targets", default=None, help="a classification guide's class ids, comma-separated, "
                                                   "cycled over the samples (needs --guide)")
    s.add_argument("--target-map", default=None, help=".npy label map (segmentation) or depth map of a dense "
                                                      "guide (needs --guide)")
    s.add_argument("--ignore-index", type=int, default=None,
                   help="segmentation: the --target-map label of void pixels, which do not count (VOC / ADE20K / "
                        "Cityscapes maps: 255; default -100); needs --guide")
    s.add_argument("--scale", type=_finite_float, default=10.0, help="guidance scale")
    s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM or ancestral DDPM")
    s.add_argument("--schedule", default="linear", choices=list(SCHEDULE_NAMES),
                   help="the denoiser's noise schedule (ADM's ImageNet models: linear)")
    s.add_argument("--steps", type=_positive_int, default=None, help="default: 25 (ddim), 250 (ddpm)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    s.add_argument("--num-samples", type=_positive_int, default=16, help="samples in this run")
    s.add_argument("--batch-size", type=_positive_int, default=16,
                   help="samples per batch (the images do not depend on it beyond float rounding)")
    s.add_argument("--first-sample", type=int, default=0,
                   help="index of the first sample: parts of a large run (each sample's noise and target depend on "
                        "its index only)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--no-fast", dest="fast", action="store_false",
                   help="the reference sampling loop (not with --guide-dtype, --cuda-graph, --compile or "
                        "--fuse-norm-act)")
    s.add_argument("--guide-dtype", default=None, choices=["bf16", "fp16"],
                   help="autocast the guide's forward and backward (fast path; default: none, the guide runs in its "
                        "weights' dtype)")
    s.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture each guided step in a CUDA graph (default: on with the fast path on CUDA; "
                        "--cuda-graph elsewhere warns and runs eagerly)")
    s.add_argument("--fuse-norm-act", action=argparse.BooleanOptionalAction, default=None,
                   help="ADM denoiser: each GroupNorm (+ scale-shift) + SiLU as one fused op (Triton on CUDA; "
                        "default: on with the fast path on CUDA, unless --compile)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (the first batch pays the compile: see first_batch_seconds; "
                        "on the CPU with inductor freezing)")


def config_from_args(a) -> GuidedSampleConfig:
    names = {f.name for f in dataclasses.fields(GuidedSampleConfig)}
    return GuidedSampleConfig(**{k: v for k, v in vars(a).items() if k in names})


def main_json(cfg: GuidedSampleConfig, progress: bool) -> str:
    stats = run_guided_sample(cfg, progress=progress)
    return json.dumps({k: v for k, v in stats.items() if k != "config"})
