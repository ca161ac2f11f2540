"""Input checks shared by the denoisers' forward (ADMUNet, EpsModel)."""
from __future__ import annotations

import torch


def check_halvable(spatial, halvings: int) -> None:
    """A spatial size the UNet cannot halve ``halvings`` times failed deep inside (a decoder concatenation)."""
    if any(s % 2 ** halvings for s in spatial):
        raise ValueError(f"x's spatial size {tuple(spatial)} must be divisible by {2 ** halvings} (this UNet "
                         f"halves it {halvings} times): resize or pad x")


def per_sample_timesteps(t, x: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a [B] tensor on x's device: one value (a scalar or [1], as guided-diffusion) or one per sample."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0 or tuple(t.shape) == (1,):
        t = t.reshape(()).expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{name} must be one value or one per sample, shape ({x.shape[0]},), got shape "
                         f"{tuple(t.shape)}")
    return t
