"""Supervised training: the clean classifiers and the noise-aware baselines.

* ``train_classifier``: the off-the-shelf classifier and the evaluator, on CLEAN images only.
* ``MultiExperts``: N full copies of a classifier, expert n for original timesteps
  [n*T/N, (n+1)*T/N) (half-open), routed per sample; N=1 is the single noise-aware model.
* ``finetune_noise_aware``: full fine-tuning of every expert with labels on q_sample(x0, t),
  t drawn per sample over [0, T) so that one pass over mixed-timestep batches trains all experts,
  each as if trained separately on its own samples (distill.expert_mean_loss and
  :meth:`MultiExperts.step_sampled_experts`); resumable after a kill (``checkpoint_path``).
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import random_shift
from .progress import BarLoss
from .schedule import Schedule


LR_WARMUP_STEPS = 50  # fixed (the docstrings and the CLI's --lr help say so): shorter runs never reach the base LR


def _cosine_lr(opt, base_lr, step, total, warmup=LR_WARMUP_STEPS):
    lr = base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = lr


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, steps: int = 1500, batch_size: int = 64,
                     lr: float = 2e-3, weight_decay: float = 5e-4, seed: int = 0, shift: int = 1,
                     progress: bool = True, desc: str = "train-classifier", device: str = "cpu",
                     labels_fn=None) -> nn.Module:
    """Plain supervised training on clean images (with +-shift pixel augmentation).

    The learning rate: ``lr`` times a linear warmup over the first 50 steps (fixed, so a run of fewer steps never
    reaches ``lr``) times a cosine decay to 0 at ``steps``.

    ``labels_fn(images) -> labels``: labels computed from each shifted clean batch instead of ``y`` (the
    stroke segmentation net: :func:`ppap_fast.data.ink_mask`, per-pixel labels [B, H, W]); given with ``y``,
    ``labels_fn(images, y_batch)`` (the semantic net: :func:`ppap_fast.data.semantic_mask`)."""
    if y is None and labels_fn is None:
        raise ValueError("train_classifier takes labels y, a labels_fn, or both (labels_fn(images, y)); got neither")
    _check_images_labels(x, y)
    _check_trainable(model, "train_classifier: the model")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 for v in (steps, batch_size)):
        # batch_size 0 "trained" on empty batches (weight decay only), steps 0 returned the model untrained
        raise ValueError(f"steps and batch_size must be positive ints, got steps={steps!r}, batch_size={batch_size!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, mininterval=2)
    bar_loss = BarLoss(it)
    for step in it:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = random_shift(x[idx], shift, generator=gen)
        _cosine_lr(opt, lr, step, steps)
        yb = y[idx] if labels_fn is None else labels_fn(xb) if y is None else labels_fn(xb, y[idx])
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar_loss.add(loss)
    return model.cpu().eval()


def _check_trainable(model: nn.Module, what: str) -> None:
    if not any(p.requires_grad for p in model.parameters()):  # it failed in backward, naming no model
        raise ValueError(f"{what} has no parameter with requires_grad=True (build_guide_model / build_teacher "
                         "return frozen models): call .requires_grad_(True) on it first")


def _check_images_labels(x, y) -> None:
    """x: floating, finite images [N, ...] with N > 0; y (if any): one label row per image."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty floating tensor of images [N, C, ...], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not bool(torch.isfinite(x).all()):  # NaN images trained every expert to NaN without a word
        raise ValueError(f"x holds {int((~torch.isfinite(x)).sum())} non-finite values (NaN/Inf)")
    if y is not None and (not isinstance(y, torch.Tensor) or y.ndim < 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"y must hold one label per image of x ({x.shape[0]}), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> float:
    if x.shape[0] == 0:
        raise ValueError("accuracy of no images (x is empty)")
    was_training = model.training  # left in eval mode, a training loop calling this went on with eval BatchNorm
    model.eval()
    try:
        logits = model(x) if t is None else model(x, t)
    finally:
        model.train(was_training)
    pred = logits.argmax(1)
    y = torch.as_tensor(y, device=pred.device)
    if y.shape != pred.shape:  # (N, 1) or (1,) broadcast into a wrong accuracy
        raise ValueError(f"y must have shape {tuple(pred.shape)} like the predictions, got {tuple(y.shape)}")
    return float((pred == y).float().mean())


class MultiExperts(nn.Module):
    """N full classifiers; ``forward(x, t)`` sends sample i to expert t_i // (T / N)."""

    def __init__(self, base: nn.Module, n_experts: int, num_timesteps: int = 1000):
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, numbers.Integral) or n_experts <= 0:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        n_experts = int(n_experts)  # a numpy int too (as ExpertBank)
        if num_timesteps % n_experts:
            raise ValueError(f"n_experts={n_experts} must divide num_timesteps={num_timesteps}")
        self.n_experts, self.num_timesteps = n_experts, num_timesteps
        self.band = num_timesteps // n_experts
        self.experts = nn.ModuleList(copy.deepcopy(base) for _ in range(n_experts))
        self.num_classes = base.fc.out_features if hasattr(base, "fc") else None

    def expert_index(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:  # 499.9 was truncated into a band
            raise ValueError(f"t must hold integer (original) timesteps, got dtype {t.dtype}")
        t = t.long()
        if t.ndim == 0:
            t = t.expand(batch)
        if t.ndim != 1 or t.shape[0] != batch:  # rows without a t came out as zeros
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        if bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"t out of range [0, {self.num_timesteps})")
        return torch.div(t, self.band, rounding_mode="floor")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        idx = self.expert_index(t, x.shape[0]).to(x.device)
        out = None
        for n, expert in enumerate(self.experts):
            sel = (idx == n).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            o = expert(x[sel])
            if out is None:
                out = o.new_zeros((x.shape[0],) + o.shape[1:])
            out = out.index_copy(0, sel, o)
        return self.experts[0](x) if out is None else out  # an empty batch: no expert ran (it returned None)

    def sampled_experts(self, t) -> torch.Tensor:
        """bool [N]: which experts the original timesteps ``t`` ([B]) route a sample to."""
        idx = self.expert_index(t, torch.as_tensor(t).numel())
        return torch.zeros(self.n_experts, dtype=torch.bool, device=idx.device).index_fill_(0, idx, True)

    def step_sampled_experts(self, opt, sampled: torch.Tensor) -> None:
        """``opt.step()`` that changes only the experts with ``sampled[n]`` (bool [N]): the others keep
        their parameters, optimizer moments and step count, as when each expert trains on its own
        batches (weight decay and Adam's moments would otherwise move an expert whose gradient is zero).
        The experts are separate modules, so unlike ExpertBank.step_sampled_experts (stacked tensors:
        restore after the step) their gradients are dropped: torch optimizers skip a parameter
        without one. One host sync."""
        sampled = torch.as_tensor(sampled)
        if sampled.dtype != torch.bool or tuple(sampled.shape) != (self.n_experts,):
            raise ValueError(f"sampled must be a bool tensor of shape ({self.n_experts},), got "
                             f"{sampled.dtype} {tuple(sampled.shape)}")
        for n in (~sampled).cpu().nonzero().flatten().tolist():
            for p in self.experts[n].parameters():
                p.grad = None
        opt.step()


FINETUNE_STATE_FORMAT = "ppap_fast.finetune_noise_aware"


def noisy_batch(x: torch.Tensor, y: torch.Tensor, batch_size: int, shift: int, gen: torch.Generator,
                sched: Schedule, num_timesteps: int = 1000, dtype: torch.dtype = torch.float32):
    """One training batch of :func:`finetune_noise_aware`: (q_sample(x0, t) in ``dtype``, labels, t), every
    draw from ``gen`` (rows, shift, t, noise, in that order)."""
    idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
    x0 = random_shift(x[idx], shift, generator=gen)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=gen)
    xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).to(dtype)
    return xt, y[idx], t


def finetune_noise_aware(base: nn.Module, x: torch.Tensor, y: torch.Tensor, n_experts: int = 1, steps: int = 1500,
                         batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 5e-4, seed: int = 0,
                         shift: int = 1, progress: bool = True, device: str = "cpu",
                         max_minutes: float | None = None, loss_reduction: str = "expert_mean",
                         checkpoint_path=None, checkpoint_every: int = 200) -> MultiExperts:
    """Full supervised fine-tuning of N copies of ``base`` on noisy labelled images.

    The learning rate: ``lr`` times a linear warmup over the first 50 steps (fixed, so a run of fewer steps never
    reaches ``lr``) times a cosine decay to 0 at ``steps`` (or at ``max_minutes``).

    ``loss_reduction`` (distill.LOSS_REDUCTIONS): "expert_mean" trains each expert on the mean
    cross-entropy over its own samples; "batch_mean" (the mean over the mixed batch, which scales
    expert e's gradient by n_e / B) reproduces runs made before it. Either way an expert without a
    sample in a batch is left as it was (:meth:`MultiExperts.step_sampled_experts`; the plain step
    already skipped it: its gradient is None).

    ``checkpoint_path``: a resumable training state (distributed.save_train_state: parameters,
    BatchNorm statistics, AdamW state, RNG states, step, losses, elapsed time) written atomically
    there every ``checkpoint_every`` steps and when training ends. If the file exists the run resumes
    from it and ends with the experts of an uninterrupted run (bitwise, same device); a state written
    with other settings (base weights, x / y, n_experts, steps, batch_size, lr, weight_decay, seed,
    shift, loss_reduction, max_minutes) is refused with a ValueError naming them. With
    ``max_minutes`` the schedule follows the elapsed time: a resume counts the time trained before
    the kill (stored in the state), so it ends within the same budget but, like any time-bounded
    run, not bitwise as an uninterrupted one. The caller removes the file once the experts are saved.
    The result has ``trained_steps``, ``resumed_from_step`` and ``train_losses`` (each step's
    batch-mean cross-entropy)."""
    from .distill import check_loss_reduction, expert_counts, expert_mean_loss

    counts = dict(n_experts=n_experts, steps=steps, batch_size=batch_size)
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 for v in counts.values()) or \
            (max_minutes is not None and not max_minutes > 0):  # steps=2.5 was a TypeError deep in range()
        raise ValueError(f"n_experts, steps and batch_size must be positive ints, max_minutes positive or None; got "
                         f"{', '.join(f'{k}={v!r}' for k, v in counts.items())}, max_minutes={max_minutes!r}")
    if checkpoint_path is not None and (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int)
                                        or checkpoint_every <= 0):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    check_loss_reduction(loss_reduction)
    _check_images_labels(x, y)
    _check_trainable(base, "finetune_noise_aware: the base model")
    from .distributed import LocalTrainState, _kill_hook, module_fingerprint, tensors_fingerprint

    ident = None
    if checkpoint_path is not None:
        # what determines the experts (not device / progress / checkpoint_every: a resume is exact)
        ident = {"format": FINETUNE_STATE_FORMAT, "base_state": module_fingerprint(base),
                 "data": tensors_fingerprint([("x", x), ("y", y)]), "n_experts": n_experts, "steps": steps,
                 "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed, "shift": shift,
                 "loss_reduction": loss_reduction, "max_minutes": max_minutes}
    state = LocalTrainState(checkpoint_path, ident)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = Schedule.create("linear", 1000)
    me = MultiExperts(base, n_experts).to(device).train()
    # the experts' dtype: a float64 model was fed float32 batches (a dtype error in its first layer)
    dtype = next((p.dtype for p in me.parameters() if p.is_floating_point()), torch.float32)
    opt = torch.optim.AdamW(me.parameters(), lr=lr, weight_decay=weight_decay)
    start = state.resume(me, opt, gen, device)

    it = range(start, steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"finetune noise-aware x{n_experts}", initial=start, total=steps, mininterval=2)
    bar_loss = BarLoss(it)
    done = start
    for step in it:
        xt, yb, t = noisy_batch(x, y, batch_size, shift, gen, sched, dtype=dtype)
        frac = step / steps if max_minutes is None else max(step / steps, state.elapsed_s() / (60 * max_minutes))
        if frac >= 1:
            break
        _cosine_lr(opt, lr, max(step, int(frac * steps)), steps)  # int(29 / 100 * 100) is 28
        t = t.to(device)
        e = me.expert_index(t, batch_size)
        per_sample = F.cross_entropy(me(xt.to(device), t), yb.to(device), reduction="none")
        counts = expert_counts(e, n_experts, per_sample.dtype)
        opt.zero_grad(set_to_none=True)
        expert_mean_loss(per_sample, e, n_experts, loss_reduction, counts).backward()
        me.step_sampled_experts(opt, counts > 0)  # an expert moves on its own samples only
        state.step_losses.append(per_sample.detach().mean())
        bar_loss.add(state.step_losses[-1])
        done = step + 1
        if checkpoint_path is not None and done % checkpoint_every == 0 and done < steps:
            state.save(done)
        _kill_hook(0, done, "PPAP_FAST_TEST_KILL_AFTER_STEPS")
    if done > start or checkpoint_path is None:  # on completion (or max_minutes): the final state
        state.save(done)
    me.trained_steps = done
    me.resumed_from_step = start
    me.train_losses = state.losses
    return me.cpu().eval()


def noisy_accuracy(model, x, y, t_values=(0, 100, 300, 500, 700, 900), seed: int = 0, clean_model: bool = False):
    """Accuracy on q_sample(x, t) for a few t (diagnostic, printed by the CLI)."""
    sched = Schedule.create("linear", 1000)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for tv in t_values:
        t = torch.full((x.shape[0],), tv, dtype=torch.long)
        xt = sched.q_sample(x, t, torch.randn(x.shape, generator=gen)).float()
        out[tv] = accuracy(model, xt, y, None if clean_model else t)
    return out


# ----------------------------------------------------------------------------- files
def save_multi(me: MultiExperts, path, extra: dict | None = None):
    """MultiExperts (of TinyResNet experts) as safetensors with the rebuild config in the metadata."""
    import json

    from .data.shards import save_safetensors_atomic

    base = me.experts[0]
    meta = {"kind": "multiexperts", "n_experts": str(me.n_experts), "num_timesteps": str(me.num_timesteps),
            "base_kind": base.kind, "base_config": json.dumps(base.config), "extra": json.dumps(extra or {})}
    return save_safetensors_atomic(path, me.state_dict(), metadata=meta)


def _metadata_int(meta: dict, key: str, path) -> int:
    if key not in meta:
        raise ValueError(f"weight file {path} has no {key!r} in its metadata: re-save it with save_multi")
    try:
        return int(meta[key])
    except ValueError:
        raise ValueError(f"weight file {path}: metadata {key!r} must be an integer, got {meta[key]!r}: re-save the "
                         "file or fix that entry") from None


def load_multi(path) -> MultiExperts:
    from .models.tiny import build_from_metadata, metadata_json, read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("kind") != "multiexperts":
        raise ValueError(f"weight file {path} does not hold noise-aware experts (kind={meta.get('kind')!r})")
    if "base_kind" not in meta:
        raise ValueError(f"weight file {path} has no 'base_kind' in its metadata: re-save it with save_multi")
    base = build_from_metadata(meta["base_kind"], metadata_json(meta, "base_config", path), path)
    n_experts, num_timesteps = _metadata_int(meta, "n_experts", path), _metadata_int(meta, "num_timesteps", path)
    try:
        me = MultiExperts(base, n_experts, num_timesteps)
    except ValueError as e:
        raise ValueError(f"weight file {path}: its metadata does not build the experts: {e}") from None
    try:
        me.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # the first line is torch's header only ("Error(s) in loading state_dict ...")
        detail = "; ".join(ln.strip()[:300] + ("..." if len(ln.strip()) > 300 else "")
                           for ln in str(e).splitlines()[1:] if ln.strip())
        raise ValueError(f"weight file {path} does not match its model ({me.n_experts} x {meta['base_kind']} "
                         f"{meta['base_config']}): {detail}") from None
    me.extra = metadata_json(meta, "extra", path, default={})
    return me.eval()


def from_modules(modules, num_timesteps: int = 1000) -> MultiExperts:
    """A per-sample router over given plain modules (e.g. ``bank.merged(n)`` for every n)."""
    modules = list(modules)
    me = MultiExperts(nn.Identity(), len(modules), num_timesteps)
    me.experts = nn.ModuleList(modules)
    return me.eval()
