"""PPAP data-free knowledge transfer.

1. ``generate_datafree``: unconditional DDIM samples of the diffusion model, stored as resumable
   uint8 shards together with the teacher's logits on the CLEAN images (cached once: the teacher
   sees x0, which does not depend on t).
2. ``distill_ppap``: an ExpertBank (frozen off-the-shelf classifier + per-expert LoRA / biases /
   BatchNorm) trained with KL(softmax(teacher / 0.25) || softmax(student(q_sample(x0, t), t))),
   t drawn per sample over [0, T): one pass over mixed-timestep batches trains all experts
   through the bank's per-sample routing, each on the mean loss over its own samples
   (:func:`expert_mean_loss`), as when trained separately. No labels anywhere.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import numbers
from pathlib import Path
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ShardSet, ShardWriter, from_uint8, to_uint8
from .progress import BarLoss
from .sampling import sample_loop
from .schedule import Schedule

TEACHER_TEMPERATURE = 0.25


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images_u8: np.ndarray, batch_size: int = 500, device="cpu") -> np.ndarray:
    teacher.eval()
    out = []
    for i in range(0, images_u8.shape[0], batch_size):
        out.append(teacher(from_uint8(images_u8[i:i + batch_size]).to(device)).float().cpu())
    y = torch.cat(out)
    if not bool(torch.isfinite(y).all()):  # cached as distillation targets: every expert would train to NaN
        raise ValueError(f"teacher logits {tuple(y.shape)} hold {int((~torch.isfinite(y)).sum())} non-finite "
                         "values (NaN/Inf: a half-precision teacher overflowing?)")
    return y.numpy().astype(np.float32)


def declared_image_shape(unet) -> tuple | None:
    """(C, H, W) a denoiser declares: its config's in_channels and sample_size (diffusers, the demo's EpsModel)
    or ADMUNet's in_channels and image_size; None if it declares none."""
    cfg = getattr(unet, "config", None)
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    c, size = get("in_channels"), get("sample_size")
    if c is None or size is None:
        c, size = getattr(unet, "in_channels", None), getattr(unet, "image_size", None)
    if not isinstance(c, int) or not isinstance(size, (int, tuple, list)):
        return None
    return (c, *((size, size) if isinstance(size, int) else size))


def warn_if_not_declared(unet, channels: int, image_size: int, options: str = "--channels / --image-size") -> None:
    """A denoiser sampled at another size than it declares (an ADM-64 at the default 256) gave images of
    another resolution, silently."""
    declared = declared_image_shape(unet)
    if declared is not None and tuple(declared) != (channels, image_size, image_size):
        warnings.warn(f"the denoiser declares {tuple(declared)} images but sampling makes "
                      f"{(channels, image_size, image_size)} ({options}); pass its size unless this is intended",
                      UserWarning, stacklevel=3)


def _image_shape(unet, image_shape) -> tuple:
    """(C, H, W) of the images ``unet`` samples: ``image_shape`` if given, else :func:`declared_image_shape`."""
    if image_shape is None:
        image_shape = declared_image_shape(unet)
        if image_shape is None:
            raise ValueError(f"cannot infer the image shape from the denoiser ({type(unet).__name__}): pass "
                             "image_shape=(C, H, W)")
    shape = tuple(image_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    return shape


def _respacing_as_steps_option(respacing):
    """'ddim25' -> '--steps 25' (what `generate` makes of --steps); None for any other respacing."""
    n = str(respacing)[4:] if str(respacing).startswith("ddim") else ""
    return f"--steps {n}" if n.isdigit() else None


def generate_datafree(unet: nn.Module, teacher: nn.Module, out_dir, num_images: int = 6000, shard_size: int = 500,
                      seed: int = 0, respacing: str = "ddim25", device: str = "cpu", progress: bool = True,
                      image_shape: tuple | None = None, schedule: str = "linear") -> list[int]:
    """Write (or complete) the data-free set in ``out_dir``; returns the shard indices written now.

    Shard k is a pure function of (seed, k): x_T ~ N(0, I) from torch.Generator().manual_seed(seed * 1_000_003 + k)
    on the CPU, DDIM (eta 0) to x_0, quantised to uint8; teacher logits computed on the dequantised images.
    The manifest records the device type (devices round differently): a resume on another type is refused, a
    finished set is only read, and a set written before the record resumes on any device.
    ``schedule``: the unet's 1000-step noise schedule (``schedule.SCHEDULE_NAMES``), recorded in the manifest
    (:func:`distill_ppap` takes linear sets only).
    ``image_shape`` (C, H, W): by default the unet's (config in_channels / sample_size, or ADMUNet's).
    ``unet`` and ``teacher`` run in eval mode, left as they were: a copy runs on ``device`` where they are elsewhere.
    """
    shape = _image_shape(unet, image_shape)
    sched = Schedule.create(schedule, 1000, respacing=respacing).to(device)
    from .distributed import module_fingerprint

    device_type = torch.device(device).type
    recorded_type = _recorded_device_type(out_dir)
    writer = ShardWriter(out_dir, num_images, shard_size,
                         meta={"kind": "datafree", "seed": seed, "respacing": respacing, "schedule": schedule,
                               "image_shape": list(shape),
                               "teacher_temperature": TEACHER_TEMPERATURE,
                               # which models made the images / cached logits: a resume with other weights
                               # is refused, and distillation can check its teacher against it
                               "unet_state": module_fingerprint(unet),
                               "teacher_state": module_fingerprint(teacher),
                               # devices round differently (CUDA convs in TF32): checked below, not by the writer
                               "device_type": recorded_type or device_type},
                         user_terms={"respacing": _respacing_as_steps_option})
    if "schedule" not in writer.meta and schedule != "linear":  # its shards predate the record: linear ones
        raise ValueError(f"{out_dir} holds a shard set made with the linear schedule (before the schedule was "
                         f"recorded), not {schedule!r}; use schedule='linear' or another directory")
    if recorded_type not in (None, device_type) and writer.missing():  # a finished set is only read
        raise ValueError(f"{out_dir} holds shards sampled on {recorded_type!r}, not {device_type!r}: a mix would match "
                         f"no uninterrupted run; finish it with device={recorded_type!r} (generate --device), "
                         "or use another directory")
    with _in_eval_on(unet, device) as unet, _in_eval_on(teacher, device) as teacher:
        def make(k):
            n = writer.shard_count(k)
            g = torch.Generator().manual_seed(seed * 1_000_003 + k)
            x_t = torch.randn((n, *shape), generator=g).to(device)
            x0 = sample_loop(unet, x_t, sched, sampler="ddim", eta=0.0)
            imgs = to_uint8(x0)
            return {"images": imgs, "logits": teacher_logits(teacher, imgs, device=device)}

        return writer.run(make, progress=progress)


def _recorded_device_type(out_dir):
    """The device type the set in ``out_dir`` was sampled on; None where unknown (no set, one written before the
    record) or where nothing was sampled yet (a manifest without shards: it starts afresh)."""
    from .data.shards import MANIFEST, nothing_written_yet

    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or damaged: ShardWriter reports that
        return None
    if not isinstance(manifest, dict) or nothing_written_yet(out_dir, manifest):
        return None
    return manifest.get("device_type")


def _is_on(module: nn.Module, device) -> bool:
    """Whether all of ``module``'s parameters and buffers are on ``device`` ("cuda": the current one)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return all(t.device == device for t in (*module.parameters(), *module.buffers()))


@contextlib.contextmanager
def _in_eval_on(module: nn.Module, device):
    """``module`` in eval mode on ``device`` for the block, the caller's left as it was: itself where all its
    tensors are there already (every submodule's train / eval mode restored after), else a copy on ``device``."""
    if not _is_on(module, device):
        yield copy.deepcopy(module).to(device).eval()
        return
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module.eval()
    finally:
        for m, training in modes:
            m.training = training


# the tiny teachers (by model kind): (expert placement, task). The classifier takes PPAP's ResNet rule; the
# stroke segnet (plain conv stack, no residual blocks) LoRA on every conv and per-expert BatchNorm / head bias
TINY_TEACHERS = {"resnet": ("resnet", "classification"), "segnet": ("generic", "segmentation")}


def tiny_teacher_kind(model: nn.Module, what: str = "teacher") -> str:
    """``model.kind`` if it is a tiny teacher's (the UNet and the evaluator are none)."""
    kind = getattr(model, "kind", None)
    if kind not in TINY_TEACHERS:
        raise ValueError(f"{what} holds a tiny {kind!r} model; a tiny teacher is one of {sorted(TINY_TEACHERS)} "
                         "(train-classifier --arch)")
    return kind


def make_bank(teacher: nn.Module, n_experts: int, r: int = 4, alpha: float = 2.0):
    """The teacher's ExpertBank: a tiny teacher's placement by its kind; a model without one (any classifier
    of the user's) the ResNet rule."""
    from .experts import ExpertBank

    rule = "resnet" if getattr(teacher, "kind", None) is None else TINY_TEACHERS[tiny_teacher_kind(teacher)][0]
    return ExpertBank(teacher, rule, n_experts, 1000, r=r, alpha=alpha)


def _upcast(a: torch.Tensor, b: torch.Tensor):
    """Both in float32, or float64 where either is (fp16 / bf16 logits are upcast)."""
    dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dt), b.to(dt)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = TEACHER_TEMPERATURE):
    """KL(softmax(teacher / temperature) || softmax(student)), batch mean."""
    return kd_loss_per_sample(student_logits, teacher_logits, temperature).mean()


def kd_loss_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """:func:`kd_loss` of each sample: [B]."""
    _check_temperature(temperature)
    _check_kl(student_logits, teacher_logits)  # teacher [B, 1] or [1, K] broadcast into a wrong loss
    s, t = _upcast(student_logits, teacher_logits)
    p_t = F.softmax(t / temperature, dim=1)
    return F.kl_div(F.log_softmax(s, dim=1), p_t, reduction="none").sum(1)


DISTILL_STATE_FORMAT = "ppap_fast.distill_ppap"


def _transformed_teacher_spec(manifest: dict) -> str | None:
    """The teacher spec of a set whose cached targets went through an input transform (``ppap_fast.distributed
    generate --teacher`` with a registry model: resized, normalised inputs); None for tiny: / py: teachers
    (raw [-1, 1] inputs) and for sets that record no teacher spec."""
    cfg = manifest.get("config")
    spec = cfg.get("teacher") if isinstance(cfg, dict) else None
    if not isinstance(spec, str) or not spec or spec.startswith(("tiny:", "py:")):
        return None
    return spec


def check_shards_intact(data: ShardSet, progress: bool = False) -> None:
    """Read every file of ``data`` whole once and check its CRC-32 (:meth:`ShardSet.verify`, with its bar if
    ``progress``); a ValueError naming the damaged files and what rewrites them."""
    bad = data.verify(progress=progress)
    if bad:  # generate's resume checks the zip headers, not the data: removing the file makes it rewrite the shard
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"damaged data set {data.dir}: {bad[0]}{more}; remove the damaged shard file(s) and rerun "
                         "generate (generate_datafree) with the set's arguments: it rewrites missing shards")


def distill_ppap(teacher: nn.Module, data_dir, n_experts: int = 5, r: int = 4, alpha: float = 2.0,
                 steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                 seed: int = 0, device: str = "cpu", progress: bool = True, max_minutes: float | None = None,
                 loss_reduction: str = "expert_mean", checkpoint_path=None, checkpoint_every: int = 200,
                 loss: str = "kl", verify: bool = True):
    """Train PPAP-N experts data-free; returns the ExpertBank (eval mode). ``loss_reduction``: see
    :func:`expert_mean_loss` (the default trains each expert on the batch mean of its own samples).
    ``loss``: "kl" (a classifier's [B, K] logits), "pixel_kl" (a segmentation net's [B, K, H, W]: the
    same KL per pixel) or "mse" (:func:`distill_loss`); the cached teacher outputs must have the student's shape.

    ``checkpoint_path``: a resumable training state (distributed.save_train_state: trained tensors,
    BatchNorm statistics, AdamW state, RNG states, step, losses) written atomically there every
    ``checkpoint_every`` steps and when training ends. If the file exists the run resumes from it and
    ends with the experts of an uninterrupted run (bitwise, same device); a state written with other
    settings (teacher weights, data set, n_experts, r, alpha, steps, batch_size, lr, weight_decay,
    seed, loss_reduction, max_minutes) is refused with a ValueError naming them. The caller removes the
    file once the experts are saved. The returned bank has ``trained_steps``, ``resumed_from_step``
    ``train_losses`` (each step's batch-mean loss) and ``train_expert_losses`` (per step, each expert's mean
    loss over its samples, NaN where it had none; :func:`plot_train_losses` draws both), and
    ``input_transform_record`` raw (the experts take raw x_t: a normalising guide is refused, a save records it).
    ``data_dir``: the data-free set (``generate``'s output); ``progress``: a progress bar;
    ``verify``: before training, read every shard whole once and check its CRC-32 (:func:`check_shards_intact`;
    batches read single rows, which skips it); False skips that read (a set checked already)."""
    if steps <= 0 or batch_size <= 0 or (max_minutes is not None and not max_minutes > 0):
        raise ValueError("steps and batch_size must be positive, max_minutes positive or None")
    if checkpoint_path is not None and (not isinstance(checkpoint_every, int) or checkpoint_every <= 0):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    check_loss_reduction(loss_reduction)
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {loss!r}; expected one of {list(DISTILL_LOSSES)}")
    data = ShardSet(data_dir)  # read lazily: only each batch's rows
    if "logits" not in data:
        raise ValueError(f"{data_dir} holds no cached teacher logits")
    from .distributed import LocalTrainState, _kill_hook, data_manifest_hash, generating_schedule, module_fingerprint

    made_by = generating_schedule(data.manifest, 1000, Path(data_dir) / "manifest.json")
    if made_by != ("linear", 1000):  # it noised the images with linear-1000 regardless: wrong x_t, no error
        raise ValueError(f"{data_dir} was generated by a {made_by[0]} {made_by[1]}-step diffusion model; this "
                         "distillation noises with the linear 1000-step schedule: use `python -m ppap_fast.distributed "
                         "distill` (it reads the set's schedule), or generate the set with a linear 1000-step model")
    spec = _transformed_teacher_spec(data.manifest)
    if spec is not None:  # same weights, same fingerprint: the raw-x_t student trained on them silently
        raise ValueError(f"the logits cached in {data_dir} are {spec!r}'s on its input transform (resized, "
                         "normalised images); distill_ppap feeds the teacher raw [-1, 1] images, so the experts "
                         f"would learn other inputs' targets: use `python -m ppap_fast.distributed distill "
                         f"--teacher {spec}` (it applies the transform)")

    teacher_state = module_fingerprint(teacher)
    cached_by = data.manifest.get("teacher_state") or data.manifest.get("config", {}).get("teacher_state")
    if cached_by is not None and cached_by != teacher_state:
        raise ValueError(f"the logits cached in {data_dir} were computed by another classifier than this teacher; "
                         "distil with the classifier the set was generated with, or generate a new set")
    # what determines the experts (not device / progress / checkpoint_every: a resume is exact)
    ident = {"format": DISTILL_STATE_FORMAT, "teacher_state": teacher_state, "data_manifest": data_manifest_hash(data_dir),
             "n_experts": n_experts, "r": r, "alpha": alpha, "steps": steps, "batch_size": batch_size, "lr": lr,
             "weight_decay": weight_decay, "seed": seed, "loss_reduction": loss_reduction, "max_minutes": max_minutes,
             "teacher_temperature": TEACHER_TEMPERATURE}
    if loss != "kl":  # absent for the classifier: states written before the option keep their identity
        ident["loss"] = loss
    state = LocalTrainState(checkpoint_path, ident, data=data)
    if verify:  # after the resume check: a rerun with other settings is refused without reading the set
        check_shards_intact(data, progress)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = Schedule.create("linear", 1000)
    bank = make_bank(teacher, n_experts, r, alpha).to(device).train()
    opt = make_expert_optimizer(bank.parameters_to_train(), n_experts, loss_reduction, lr, weight_decay)
    start = state.resume(bank, opt, gen, device)

    it = range(start, steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"distill ppap-{n_experts}", initial=start, total=steps, mininterval=2)
    bar_loss = BarLoss(it)
    done = start
    for step in it:
        frac = step / steps if max_minutes is None else max(step / steps, state.elapsed_s() / (60 * max_minutes))
        if frac >= 1:
            break
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0 = from_uint8(data.gather("images", idx.numpy()))
        tl = torch.from_numpy(data.gather("logits", idx.numpy())).float()
        if not bool(torch.isfinite(tl).all()):  # on the CPU (read from the shards): NaN targets trained NaN experts
            raise ValueError(f"the teacher logits cached in {data_dir} hold NaN / Inf (rows "
                             f"{idx[~torch.isfinite(tl).flatten(1).all(1)].tolist()[:5]} of the set): regenerate the set")
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).float()
        lr_now = lr * min(1.0, (step + 1) / 50) * (1 - frac)  # linear anneal (official), after a 50-step warm-up (ours)
        for g in opt.param_groups:
            g["lr"] = lr_now
        e = bank.expert_index(t.to(device))
        per_sample = distill_loss_per_sample(loss, bank(xt.to(device), t.to(device)), tl.to(device))
        counts = expert_counts(e, n_experts, per_sample.dtype)
        opt.zero_grad(set_to_none=True)
        expert_mean_loss(per_sample, e, n_experts, loss_reduction, counts).backward()
        bank.step_sampled_experts(opt, counts > 0)  # an expert moves on its own samples only
        state.record(per_sample, e, counts)
        bar_loss.add(state.step_losses[-1])
        done = step + 1
        if checkpoint_path is not None and done % checkpoint_every == 0 and done < steps:
            state.save(done)
        _kill_hook(0, done, "PPAP_FAST_TEST_KILL_AFTER_STEPS")
    if done > start or checkpoint_path is None:  # on completion (or max_minutes): the final state
        state.save(done)
    bank.trained_steps = done  # optimizer steps taken (was the last index: steps - 1 for a full run)
    bank.resumed_from_step = start
    bank.train_losses = state.losses
    bank.train_expert_losses = state.expert_losses
    from .experts.checkpoint import input_transform_record

    bank.input_transform_record = input_transform_record(None)  # trained on raw x_t: save_experts records it
    return bank.eval()


def smooth_losses(values, window: int) -> np.ndarray:
    """Running mean over the last ``window`` steps, NaN (an expert without samples that step) skipped;
    NaN where the window holds none."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive int (steps), got {window!r}")  # 0: every value NaN
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    cnt = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(v) + 1) - window, 0)
    hi = np.arange(1, len(v) + 1)
    n = cnt[hi] - cnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (csum[hi] - csum[lo]) / np.maximum(n, 1), np.nan)


def plot_train_losses(path, losses, expert_losses=None, bands=None, title: str = "distillation loss") -> Path:
    """PNG of a training run's loss against the step (running mean over 5% of the run): the batch mean and,
    given ``expert_losses`` [steps][N], each expert's (labelled with its timestep band from ``bands``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(losses) == 0:
        raise ValueError("plot_train_losses: no losses to draw")
    window = max(1, len(losses) // 20)
    steps = np.arange(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    if expert_losses is not None and len(expert_losses):
        per = np.asarray(expert_losses, dtype=np.float64)
        cmap = plt.get_cmap("viridis")
        for k in range(per.shape[1]):
            band = f" (t {bands[k][0]}-{bands[k][1] - 1})" if bands is not None else ""
            ax.plot(np.arange(len(losses) - len(per) + 1, len(losses) + 1), smooth_losses(per[:, k], window),
                    lw=1, color=cmap(k / max(per.shape[1] - 1, 1)), label=f"expert {k}{band}")
    ax.plot(steps, smooth_losses(losses, window), lw=2.2, color="black", label="batch mean")
    finite = np.asarray(losses, dtype=np.float64)
    if np.isfinite(finite).all() and (finite > 0).all():
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="step", ylabel=f"loss (running mean over {window} step{'s' * (window > 1)})", title=title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    from .data.shards import _atomic

    try:
        return _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90), ".png")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- dense guides
def pixel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """Per-pixel KL(softmax(teacher / temperature) || softmax(student)) over the class dim 1 of
    [B, K, *spatial] logits (segmentation), averaged over pixels and the batch. With no spatial
    dims ([B, K]) it equals :func:`kd_loss`."""
    return _pixel_kd(student_logits, teacher_logits, temperature).mean()


def _check_temperature(temperature) -> None:
    """0 gave NaN losses, a negative one a target that favours the teacher's least likely classes."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 (PPAP: {TEACHER_TEMPERATURE}), got {temperature!r}")


def _pixel_kd(student_logits, teacher_logits, temperature):  # [B, *spatial]
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits, "pixel_kl", min_dim=2)
    s, t = _upcast(student_logits, teacher_logits)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(F.log_softmax(s, dim=1), log_p_t, reduction="none", log_target=True).sum(1)


def dense_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's map on x_t and the teacher's on x0 (depth or any
    dense regression: [B, 1, H, W], [B, H, W], ...), averaged over every element."""
    _check_pair(student, teacher, "mse", min_dim=1)
    return F.mse_loss(*_upcast(student, teacher))


DISTILL_LOSSES = ("kl", "pixel_kl", "mse")
TASK_LOSS = {"classification": "kl", "segmentation": "pixel_kl", "semantic": "pixel_kl", "depth": "mse",
             "regression": "mse"}


def _check_pair(student, teacher, kind, min_dim):
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"{kind} loss: the student's output has shape {tuple(student.shape)} but the teacher "
                         f"targets have shape {tuple(teacher.shape)} (cached targets from another teacher or "
                         "resolution?)")
    if student.dim() < min_dim:
        raise ValueError(f"{kind} loss needs at least {min_dim} dims, got shape {tuple(student.shape)}")
    if student.shape[0] == 0:  # its mean is NaN
        raise ValueError(f"{kind} loss of an empty batch (shape {tuple(student.shape)})")


def _check_kl(student, teacher):
    _check_pair(student, teacher, "kl", min_dim=2)
    if student.dim() != 2:
        raise ValueError(f"kl loss takes [B, K] logits, got shape {tuple(student.shape)}; "
                         "use pixel_kl for segmentation logits")


def loss_for_task(task: str) -> str:
    """The PPAP distillation loss of a teacher task (classification: kl, segmentation: pixel_kl,
    depth / regression: mse)."""
    if task not in TASK_LOSS:
        raise ValueError(f"unknown teacher task {task!r}; expected one of {sorted(TASK_LOSS)}")
    return TASK_LOSS[task]


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor,
                 temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """``kind``: "kl" (:func:`kd_loss`, [B, K] logits), "pixel_kl" (:func:`pixel_kd_loss`) or "mse"
    (:func:`dense_mse_loss`, temperature unused). Shapes must match exactly (ValueError naming both).
    Batch mean; :func:`expert_mean_loss` is what one-pass training differentiates."""
    if kind == "kl":
        _check_kl(student, teacher)
        return kd_loss(student, teacher, temperature)
    if kind == "pixel_kl":
        return pixel_kd_loss(student, teacher, temperature)
    if kind == "mse":
        return dense_mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}; expected one of {list(DISTILL_LOSSES)}")


def distill_loss_per_sample(kind: str, student: torch.Tensor, teacher: torch.Tensor,
                            temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """:func:`distill_loss` of each sample, [B] (dense losses: the mean over the sample's pixels);
    its mean is :func:`distill_loss` (to rounding)."""
    if kind == "kl":
        _check_kl(student, teacher)
        return kd_loss_per_sample(student, teacher, temperature)
    if kind == "pixel_kl":
        return _pixel_kd(student, teacher, temperature).flatten(1).mean(1)
    if kind == "mse":
        _check_pair(student, teacher, kind, min_dim=1)
        s, t = _upcast(student, teacher)
        return (s - t).square().reshape(s.shape[0], -1).mean(1)
    raise ValueError(f"unknown distillation loss {kind!r}; expected one of {list(DISTILL_LOSSES)}")


LOSS_REDUCTIONS = ("expert_mean", "batch_mean")
LOSS_REDUCTION_HELP = ("expert_mean: each expert's gradient is that of the mean loss over its own samples, as when "
                       "trained separately; batch_mean: the mean over the whole mixed batch, as earlier runs "
                       "(the class demo's shipped weights) were trained")


def check_loss_reduction(reduction: str) -> None:
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; expected one of {list(LOSS_REDUCTIONS)}")


def make_expert_optimizer(params, n_experts: int, reduction: str, lr, weight_decay: float, capturable: bool = False):
    """The distillers' AdamW over the stacked per-expert tensors, stepped by
    ``ExpertBank.step_sampled_experts``. "expert_mean": :class:`~ppap_fast.experts.optim.ExpertAdamW`,
    each expert with its own step count (as trained separately). "batch_mean": torch.optim.AdamW with
    one shared count, as the experts made before were (they reproduce up to rounding). ``capturable``: for a CUDA
    graph (``lr`` a device tensor)."""
    check_loss_reduction(reduction)
    if reduction == "expert_mean":
        from .experts.optim import ExpertAdamW

        return ExpertAdamW(params, n_experts, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"capturable": True} if capturable else {}))


def expert_counts(expert_idx: torch.Tensor, n_experts: int, dtype=torch.float32) -> torch.Tensor:
    """[N] how many samples ``expert_idx`` routes to each expert (index_add: no host sync, unlike
    CUDA's bincount)."""
    ones = torch.ones(expert_idx.shape, dtype=dtype, device=expert_idx.device)
    return torch.zeros(n_experts, dtype=dtype, device=expert_idx.device).index_add_(0, expert_idx, ones)


def expert_mean_loss(per_sample: torch.Tensor, expert_idx: torch.Tensor, n_experts: int,
                     reduction: str = "expert_mean", counts: torch.Tensor | None = None,
                     world_size: int = 1) -> torch.Tensor:
    """The loss that one-pass training of N experts differentiates, from per-sample losses [B].

    "expert_mean": sum over the sampled experts of the mean over each one's samples, i.e. sample i
    weighted by 1 / n_{e(i)}: expert e's gradient is that of its own batch-mean loss, as when each
    expert trains separately on its samples (the batch mean scales it by n_e / B, a factor that
    varies from step to step). Under DDP pass the global ``counts`` (the all-reduced
    :func:`expert_counts`) and ``world_size``: DDP averages the gradients over the ranks, so the
    weight is world_size / n_e and each expert gets the mean over its samples on every rank.
    "batch_mean": the plain batch mean (the reduction before). Sync-free; an expert without a
    sample contributes nothing."""
    check_loss_reduction(reduction)
    if reduction == "batch_mean":
        return per_sample.mean()
    if counts is None:
        if world_size != 1:  # local counts with the world size: every expert's loss world_size times too large
            raise ValueError(f"world_size={world_size} needs the global counts (the all-reduced expert_counts)")
        counts = expert_counts(expert_idx, n_experts, per_sample.dtype)
    w = world_size / counts.to(per_sample.dtype)[expert_idx]  # every indexed count is >= 1
    return (per_sample * w).sum()
