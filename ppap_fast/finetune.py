"""Supervised training: the clean classifiers and the noise-aware baselines.

* ``train_classifier``: the off-the-shelf classifier and the evaluator, on CLEAN images only.
* ``MultiExperts``: N full copies of a classifier, expert n for original timesteps
  [n*T/N, (n+1)*T/N) (half-open), routed per sample; N=1 is the single noise-aware model.
* ``finetune_noise_aware``: full fine-tuning of every expert with labels on q_sample(x0, t),
  t drawn per sample over [0, T) so that one pass over mixed-timestep batches trains all experts.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import random_shift
from .schedule import Schedule


def _cosine_lr(opt, base_lr, step, total, warmup=50):
    lr = base_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = lr


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 1500, batch_size: int = 64,
                     lr: float = 2e-3, weight_decay: float = 5e-4, seed: int = 0, shift: int = 1,
                     progress: bool = True, desc: str = "train-classifier", device: str = "cpu") -> nn.Module:
    """Plain supervised training on clean images (with +-shift pixel augmentation)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, mininterval=2)
    for step in it:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        xb = random_shift(x[idx], shift, generator=gen)
        _cosine_lr(opt, lr, step, steps)
        loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.cpu().eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> float:
    model.eval()
    logits = model(x) if t is None else model(x, t)
    return float((logits.argmax(1) == y).float().mean())


class MultiExperts(nn.Module):
    """N full classifiers; ``forward(x, t)`` sends sample i to expert t_i // (T / N)."""

    def __init__(self, base: nn.Module, n_experts: int, num_timesteps: int = 1000):
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts <= 0:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}")
        if num_timesteps % n_experts:
            raise ValueError(f"n_experts={n_experts} must divide num_timesteps={num_timesteps}")
        self.n_experts, self.num_timesteps = n_experts, num_timesteps
        self.band = num_timesteps // n_experts
        self.experts = nn.ModuleList(copy.deepcopy(base) for _ in range(n_experts))
        self.num_classes = base.fc.out_features if hasattr(base, "fc") else None

    def expert_index(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(batch)
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
        return out


def finetune_noise_aware(base: nn.Module, x: torch.Tensor, y: torch.Tensor, n_experts: int = 1, steps: int = 1500,
                         batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 5e-4, seed: int = 0,
                         shift: int = 1, progress: bool = True, device: str = "cpu",
                         max_minutes: float | None = None) -> MultiExperts:
    """Full supervised fine-tuning of N copies of ``base`` on noisy labelled images."""
    if n_experts <= 0 or steps <= 0 or batch_size <= 0 or (max_minutes is not None and not max_minutes > 0):
        raise ValueError("n_experts, steps and batch_size must be positive, max_minutes positive or None")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sched = Schedule.create("linear", 1000)
    me = MultiExperts(base, n_experts).to(device).train()
    t0 = time.time()
    opt = torch.optim.AdamW(me.parameters(), lr=lr, weight_decay=weight_decay)
    it = range(steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"finetune noise-aware x{n_experts}", mininterval=2)
    done = 0
    for step in it:
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen)
        x0 = random_shift(x[idx], shift, generator=gen)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen)).float()
        frac = step / steps if max_minutes is None else max(step / steps, (time.time() - t0) / (60 * max_minutes))
        if frac >= 1:
            break
        _cosine_lr(opt, lr, int(frac * steps), steps)
        loss = F.cross_entropy(me(xt.to(device), t.to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
    me.trained_steps = done
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


def load_multi(path) -> MultiExperts:
    import json

    from .models.tiny import MODEL_KINDS, read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("kind") != "multiexperts":
        raise ValueError(f"weight file {path} does not hold noise-aware experts (kind={meta.get('kind')!r})")
    base = MODEL_KINDS[meta["base_kind"]](**json.loads(meta["base_config"]))
    me = MultiExperts(base, int(meta["n_experts"]), int(meta["num_timesteps"]))
    try:
        me.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weight file {path} does not match its model: {str(e).splitlines()[0]}") from None
    me.extra = json.loads(meta.get("extra", "{}"))
    return me.eval()


def from_modules(modules, num_timesteps: int = 1000) -> MultiExperts:
    """A per-sample router over given plain modules (e.g. ``bank.merged(n)`` for every n)."""
    modules = list(modules)
    me = MultiExperts(nn.Identity(), len(modules), num_timesteps)
    me.experts = nn.ModuleList(modules)
    return me.eval()
