"""PPAP data-free knowledge transfer.

1. ``generate_datafree``: unconditional DDIM samples of the diffusion model, stored as resumable
   uint8 shards together with the teacher's logits on the CLEAN images (cached once: the teacher
   sees x0, which does not depend on t).
2. ``distill_ppap``: an ExpertBank (frozen off-the-shelf classifier + per-expert LoRA / biases /
   BatchNorm) trained with KL(softmax(teacher / 0.25) || softmax(student(q_sample(x0, t), t))),
   t drawn per sample over [0, T): one pass over mixed-timestep batches trains all experts
   through the bank's per-sample routing. No labels anywhere.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ShardSet, ShardWriter, from_uint8, to_uint8
from .sampling import sample_loop
from .schedule import Schedule

TEACHER_TEMPERATURE = 0.25


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images_u8: np.ndarray, batch_size: int = 500, device="cpu") -> np.ndarray:
    teacher.eval()
    out = []
    for i in range(0, images_u8.shape[0], batch_size):
        out.append(teacher(from_uint8(images_u8[i:i + batch_size]).to(device)).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


def generate_datafree(unet: nn.Module, teacher: nn.Module, out_dir, num_images: int = 6000, shard_size: int = 500,
                      seed: int = 0, respacing: str = "ddim25", device: str = "cpu", progress: bool = True,
                      shard_hook=None) -> list[int]:
    """Write (or complete) the data-free set in ``out_dir``; returns the shard indices written now.

    Shard k is a pure function of (seed, k): x_T ~ N(0, I) from torch.Generator().manual_seed(seed * 1_000_003 + k)
    on the CPU, DDIM (eta 0) to x_0, quantised to uint8; teacher logits computed on the dequantised images.
    ``shard_hook(k)`` is called after each shard is written (tests use it to simulate a crash).
    """
    sched = Schedule.create("linear", 1000, respacing=respacing).to(device)
    unet = unet.to(device).eval()
    teacher = teacher.to(device).eval()
    from .distributed import module_fingerprint

    writer = ShardWriter(out_dir, num_images, shard_size,
                         meta={"kind": "datafree", "seed": seed, "respacing": respacing,
                               "teacher_temperature": TEACHER_TEMPERATURE,
                               # which models made the images / cached logits: a resume with other weights
                               # is refused, and distillation can check its teacher against it
                               "unet_state": module_fingerprint(unet),
                               "teacher_state": module_fingerprint(teacher)})

    def make(k):
        n = writer.shard_count(k)
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        x_t = torch.randn((n, 1, 16, 16), generator=g).to(device)
        x0 = sample_loop(unet, x_t, sched, sampler="ddim", eta=0.0)
        imgs = to_uint8(x0)
        arrays = {"images": imgs, "logits": teacher_logits(teacher, imgs, device=device)}
        return arrays

    if shard_hook is None:
        return writer.run(make, progress=progress)
    done = []
    for k in writer.missing():  # same as writer.run, with a hook after each shard
        writer.write_manifest(complete=False)
        from .data.shards import write_npz_atomic
        write_npz_atomic(writer.shard_path(k), **make(k))
        done.append(k)
        shard_hook(k)
    writer.write_manifest(complete=not writer.missing())
    return done


def make_bank(teacher: nn.Module, n_experts: int, r: int = 4, alpha: float = 2.0):
    from .experts import ExpertBank

    return ExpertBank(teacher, "resnet", n_experts, 1000, r=r, alpha=alpha)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = TEACHER_TEMPERATURE):
    """KL(softmax(teacher / temperature) || softmax(student)), batch mean."""
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(F.log_softmax(student_logits.float(), dim=1), p_t, reduction="batchmean")


def distill_ppap(teacher: nn.Module, data_dir, n_experts: int = 5, r: int = 4, alpha: float = 2.0,
                 steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
                 seed: int = 0, device: str = "cpu", progress: bool = True, max_minutes: float | None = None):
    """Train PPAP-N experts data-free; returns the ExpertBank (eval mode)."""
    if steps <= 0 or batch_size <= 0 or (max_minutes is not None and not max_minutes > 0):
        raise ValueError("steps and batch_size must be positive, max_minutes positive or None")
    data = ShardSet(data_dir)  # read lazily: only each batch's rows
    if "logits" not in data:
        raise ValueError(f"{data_dir} holds no cached teacher logits")
    from .distributed import module_fingerprint

    cached_by = data.manifest.get("teacher_state") or data.manifest.get("config", {}).get("teacher_state")
    if cached_by is not None and cached_by != module_fingerprint(teacher):
        raise ValueError(f"the logits cached in {data_dir} were computed by another classifier than this teacher; "
                         "distil with the classifier the set was generated with, or generate a new set")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = Schedule.create("linear", 1000)
    bank = make_bank(teacher, n_experts, r, alpha).to(device).train()
    params = bank.parameters_to_train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"distill ppap-{n_experts}", mininterval=2)
    import time
    t0 = time.time()
    done = 0
    for step in it:
        frac = step / steps if max_minutes is None else max(step / steps, (time.time() - t0) / (60 * max_minutes))
        if frac >= 1:
            break
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x0 = from_uint8(data.gather("images", idx.numpy()))
        tl = torch.from_numpy(data.gather("logits", idx.numpy())).float()
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).float()
        lr_now = lr * min(1.0, (step + 1) / 50) * (1 - frac)  # linear anneal (official), after a 50-step warm-up (ours)
        for g in opt.param_groups:
            g["lr"] = lr_now
        loss = kd_loss(bank(xt.to(device), t.to(device)), tl.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        bank.step_sampled_experts(opt, bank.sampled_experts(t.to(device)))  # an expert moves on its own samples only
        done = step + 1
    bank.trained_steps = done  # optimizer steps taken (was the last index: steps - 1 for a full run)
    return bank.eval()


# ----------------------------------------------------------------------------- dense guides
def pixel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """Per-pixel KL(softmax(teacher / temperature) || softmax(student)) over the class dim 1 of
    [B, K, *spatial] logits (segmentation), averaged over pixels and the batch. With no spatial
    dims ([B, K]) it equals :func:`kd_loss`."""
    _check_pair(student_logits, teacher_logits, "pixel_kl", min_dim=2)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_q, log_p_t, reduction="none", log_target=True).sum(1).mean()


def dense_mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's map on x_t and the teacher's on x0 (depth or any
    dense regression: [B, 1, H, W], [B, H, W], ...), averaged over every element."""
    _check_pair(student, teacher, "mse", min_dim=1)
    return F.mse_loss(student.float(), teacher.float())


DISTILL_LOSSES = ("kl", "pixel_kl", "mse")
TASK_LOSS = {"classification": "kl", "segmentation": "pixel_kl", "depth": "mse", "regression": "mse"}


def _check_pair(student, teacher, kind, min_dim):
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"{kind} loss: the student's output has shape {tuple(student.shape)} but the teacher "
                         f"targets have shape {tuple(teacher.shape)} (cached targets from another teacher or "
                         "resolution?)")
    if student.dim() < min_dim:
        raise ValueError(f"{kind} loss needs at least {min_dim} dims, got shape {tuple(student.shape)}")


def loss_for_task(task: str) -> str:
    """The PPAP distillation loss of a teacher task (classification: kl, segmentation: pixel_kl,
    depth / regression: mse)."""
    if task not in TASK_LOSS:
        raise ValueError(f"unknown teacher task {task!r}; expected one of {sorted(TASK_LOSS)}")
    return TASK_LOSS[task]


def distill_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor,
                 temperature: float = TEACHER_TEMPERATURE) -> torch.Tensor:
    """``kind``: "kl" (:func:`kd_loss`, [B, K] logits), "pixel_kl" (:func:`pixel_kd_loss`) or "mse"
    (:func:`dense_mse_loss`, temperature unused). Shapes must match exactly (ValueError naming both)."""
    if kind == "kl":
        _check_pair(student, teacher, kind, min_dim=2)
        if student.dim() != 2:
            raise ValueError(f"kl loss takes [B, K] logits, got shape {tuple(student.shape)}; "
                             "use pixel_kl for segmentation logits")
        return kd_loss(student, teacher, temperature)
    if kind == "pixel_kl":
        return pixel_kd_loss(student, teacher, temperature)
    if kind == "mse":
        return dense_mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}; expected one of {list(DISTILL_LOSSES)}")
