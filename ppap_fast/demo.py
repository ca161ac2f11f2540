"""The bundled digits demo: training recipes for its models and the end-to-end comparison.

Stages (each also a ``ppap-fast`` subcommand, see cli.py):
  train_diffusion  unconditional eps-prediction UNet on the diffusion-train split
  (classifiers, distillation and fine-tuning live in finetune.py / distill.py)
  run_demo         sample every method with the shipped weights, score with the evaluator
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DigitsSplits, random_shift
from .models.tiny import EpsModel, count_params, load_model, save_model
from .schedule import Schedule

# The demo UNet: ~0.95M parameters, attention only at 4x4 (fast enough for a CPU demo).
DEMO_UNET = dict(block_out_channels=[32, 48, 64],
                 down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"])


def _log(msg: str, log=None):
    print(msg, flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(msg + "\n")


def train_diffusion(out, steps: int = 2000, batch_size: int = 64, lr: float = 2e-4, seed: int = 0,
                    data_seed: int = 0, ema_decay: float = 0.999, device: str = "cpu",
                    max_minutes: float | None = None, checkpoint_every: int = 500, unet_config: dict | None = None,
                    log=None, progress: bool = True) -> Path:
    """Train the unconditional demo UNet (linear schedule, T=1000, eps prediction, MSE).

    Saves the EMA weights to ``out`` (safetensors). A checkpoint ``out + '.ckpt.pt'`` is written
    every ``checkpoint_every`` steps and resumed from if present.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_all = DigitsSplits.create(data_seed).diffusion[0]
    sched = Schedule.create("linear", 1000).to(device)
    model = EpsModel(**(unet_config or DEMO_UNET)).to(device)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ckpt = Path(str(out) + ".ckpt.pt")
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"]); ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"]); start = state["step"]; gen.set_state(state["gen"])
        _log(f"resumed from {ckpt} at step {start}", log)
    _log(f"train-diffusion: {count_params(model)} params, {x_all.shape[0]} images, steps {start}->{steps}, "
         f"batch {batch_size}, device {device}", log)
    t0 = time.time()
    it = range(start, steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="train-diffusion", initial=start, total=steps, mininterval=5)
    running = None
    step = start
    for step in it:
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        x0 = random_shift(x_all[idx], 1, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        warm = min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr * warm
        loss = F.mse_loss(model(sched.q_sample(x0, t, noise), t), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
            for be, bm in zip(ema.buffers(), model.buffers()):
                be.copy_(bm)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        done = step + 1
        timed_out = max_minutes is not None and (time.time() - t0) > 60 * max_minutes
        if done % checkpoint_every == 0 or done == steps or timed_out:
            _log(f"step {done} loss {running:.4f} elapsed {time.time() - t0:.0f}s", log)
            tmp = Path(str(ckpt) + ".tmp")
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "step": done, "gen": gen.get_state()}, tmp)
            tmp.replace(ckpt)
            save_model(ema.cpu(), out, extra={"steps": done, "batch_size": batch_size, "lr": lr, "seed": seed,
                                             "data_seed": data_seed, "ema_decay": ema_decay})
            ema.to(device)
        if timed_out:
            _log(f"stopping at step {done}: max_minutes={max_minutes} reached", log)
            break
    return out
