"""Noise schedules, respacing and the per-timestep tables of guided-diffusion.

Tables are built in float64 (as guided-diffusion does in numpy) and kept as
tensors; `Schedule.to(device)` moves them so that sampling never touches the host.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Iterable, Sequence

import torch

__all__ = ["get_named_beta_schedule", "space_timesteps", "Schedule", "check_trained_schedule", "extract"]


def betas_for_alpha_bar(num_timesteps: int, alpha_bar, max_beta: float = 0.999) -> torch.Tensor:
    betas = []
    for i in range(num_timesteps):
        t1, t2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float64)


SCHEDULE_NAMES = ("linear", "cosine")  # the names get_named_beta_schedule (and Schedule.create) accept


def get_named_beta_schedule(name: str, num_timesteps: int = 1000) -> torch.Tensor:
    """Betas (float64) of guided-diffusion's "linear" or "cosine" schedule."""
    if not isinstance(num_timesteps, numbers.Integral) or isinstance(num_timesteps, bool) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if name == "linear":
        scale = 1000 / num_timesteps
        start, end = scale * 0.0001, scale * 0.02
        if end >= 1:  # beta 1 zeroes alphas_cumprod: x_0 = x_t / 0, every sample NaN
            raise ValueError(f"the linear schedule needs num_timesteps > 20 (its last beta, 20 / num_timesteps, "
                             f"must stay below 1), got {num_timesteps}; use more steps and respacing, or 'cosine'")
        if num_timesteps == 1:
            return torch.tensor([start], dtype=torch.float64)
        # numpy.linspace's arithmetic (i * step + start, last = end), bit-exact with guided-diffusion;
        # torch.linspace differs in the last ulp.
        betas = torch.arange(num_timesteps, dtype=torch.float64) * ((end - start) / (num_timesteps - 1)) + start
        betas[-1] = end
        return betas
    if name == "cosine":
        return betas_for_alpha_bar(
            num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown beta schedule {name!r}: expected one of {list(SCHEDULE_NAMES)}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Timesteps kept by respacing, sorted, with guided-diffusion's semantics.

    "ddimN" takes a uniform stride below T giving exactly N steps (so no "ddim1": "1" is the single step t=0);
    "10,10,5" (or a list) splits [0, T) into equal sections and takes that many evenly spaced steps in each.
    """
    if isinstance(section_counts, numbers.Integral) and not isinstance(section_counts, bool):
        section_counts = [int(section_counts)]  # 250 as "250" (an int was 'not iterable')
    elif isinstance(section_counts, numbers.Number) or isinstance(section_counts, bool):  # 25.0: 'not iterable'
        raise ValueError(f"respacing must be an int step count, 'ddimN' or comma-separated step counts such as "
                         f"'10,10,5', got {section_counts!r}")
    if isinstance(section_counts, str):
        spec = section_counts
        try:  # "ddimx" / "abc": int()'s message named neither the option nor its forms
            desired = int(spec[len("ddim"):]) if spec.startswith("ddim") else None
            section_counts = [int(x) for x in spec.split(",")] if desired is None else None
        except ValueError:
            raise ValueError(f"respacing must be 'ddimN' or comma-separated step counts such as '250' or "
                             f"'10,10,5', got {spec!r}") from None
        if desired is not None:
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            hint = " (strides stop at T - 1, as guided-diffusion's): use respacing '1' for a single step" \
                if desired == 1 else ""
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}{hint}")
    section_counts = section_counts.tolist() if hasattr(section_counts, "tolist") else list(section_counts)  # arrays
    if not all(isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in section_counts):
        raise ValueError(f"section counts must be ints (steps per section), got {section_counts!r}")
    section_counts = [int(c) for c in section_counts]
    if not section_counts or any(c < 0 for c in section_counts) or sum(section_counts) == 0:
        raise ValueError(f"invalid section counts {section_counts!r}: non-negative, at least one step in all")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


@dataclass
class Schedule:
    """All per-timestep tables of a (possibly respaced) diffusion process.

    Index i runs over the respaced steps; `timestep_map[i]` is the original t
    that the denoiser and the guide receive. Build one with :meth:`create`, :meth:`from_betas` or
    :meth:`respaced`; the fields are guided-diffusion's GaussianDiffusion tables (float64, one entry per
    step): betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2, log_betas;
    original_num_timesteps: T of the base process.
    """

    betas: torch.Tensor
    timestep_map: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas: torch.Tensor
    original_num_timesteps: int = 1000

    @classmethod
    def from_betas(cls, betas: torch.Tensor, timestep_map: Iterable[int] | None = None,
                   original_num_timesteps: int | None = None) -> "Schedule":
        """The tables of ``betas`` (1-D, values in (0, 1)); ``timestep_map``: each step's original t (default
        0..N-1); ``original_num_timesteps``: the base T (default: the number of betas)."""
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            # a beta of 1 made alphas_cumprod 0 and every table derived from 1 / alphas_cumprod infinite
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1)")
        n = betas.numel()
        tmap = torch.arange(n) if timestep_map is None else torch.as_tensor(list(timestep_map))
        if tmap.is_floating_point() or tmap.is_complex() or tmap.dtype == torch.bool:  # 4.5 was truncated to 4
            raise ValueError(f"timestep_map must hold integer timesteps, got {tmap.dtype}")
        tmap = tmap.long()
        if tmap.numel() != n:
            raise ValueError(f"timestep_map has {tmap.numel()} entries for {n} betas")
        T = original_num_timesteps or n
        if n and (bool((tmap[1:] <= tmap[:-1]).any()) or int(tmap[0]) < 0 or int(tmap[-1]) >= T):
            raise ValueError(f"timestep_map must be strictly increasing original timesteps in [0, {T}), got "
                             f"{tmap.tolist()[:8]}{' ...' if n > 8 else ''}")
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        post_var_clipped = torch.cat([post_var[1:2], post_var[1:]]) if n > 1 else post_var.clamp_min(1e-20)
        return cls(
            betas=betas,
            timestep_map=tmap,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            sqrt_alphas_cumprod=acp.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - acp).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / acp).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / acp - 1).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_var_clipped.log(),
            posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
            log_betas=betas.log(),
            original_num_timesteps=original_num_timesteps or n,
        )

    @classmethod
    def create(cls, name: str = "linear", num_timesteps: int = 1000,
               respacing: str | Sequence[int] | None = None) -> "Schedule":
        """Base schedule ``name`` ("linear" or "cosine") of ``num_timesteps`` steps, optionally respaced
        (``respacing``: "ddim25", "250" or 250, "10,10,5", or a list of section counts as [10, 10, 5])."""
        base = get_named_beta_schedule(name, num_timesteps)
        num_timesteps = base.numel()  # a numpy int as an int
        if isinstance(respacing, numbers.Integral) and not isinstance(respacing, bool):
            respacing = str(int(respacing))
        # a str test first: an array compared with == had an ambiguous truth value
        if respacing is None or (isinstance(respacing, str) and respacing in ("", str(num_timesteps))):
            return cls.from_betas(base, original_num_timesteps=num_timesteps)
        return cls.respaced(base, space_timesteps(num_timesteps, respacing))

    @classmethod
    def respaced(cls, base_betas: torch.Tensor, use_timesteps: Iterable[int]) -> "Schedule":
        """The base process of ``base_betas`` kept at the original timesteps ``use_timesteps`` (guided-diffusion's
        SpacedDiffusion)."""
        base = cls.from_betas(base_betas)
        vals = use_timesteps.tolist() if hasattr(use_timesteps, "tolist") else list(use_timesteps)
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in vals):  # 500.7 kept 500
            raise ValueError(f"respaced timesteps must be ints, got {vals[:8]!r}")
        keep = sorted(set(int(t) for t in vals))
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError("respaced timesteps must lie in [0, T)")
        if len(keep) == base.num_timesteps:  # every step: the base (1 - abar_t / abar_t-1 differs in the last bit)
            return base
        new_betas, last = [], 1.0
        for t in keep:
            acp = float(base.alphas_cumprod[t])
            new_betas.append(1.0 - acp / last)
            last = acp
        return cls.from_betas(torch.tensor(new_betas, dtype=torch.float64), keep, base.num_timesteps)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def fixed_large_variance(self) -> torch.Tensor:
        """DDPM's fixed_large variance: betas with posterior_variance[1] at index 0 (as ADM); a 1-step
        schedule has no [1] (it failed with an IndexError) and keeps its beta."""
        if self.num_timesteps == 1:
            return self.betas.clone()
        return torch.cat([self.posterior_variance[1:2], self.betas[1:]])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "Schedule":
        """A copy with every table on ``device`` (tables stay float64)."""
        if isinstance(device, torch.dtype):  # converted every table: float timesteps for the model, float32 tables
            raise TypeError(f"Schedule.to takes a device, got the dtype {device}: the tables stay float64 and "
                            "the timestep map long (the steps cast to x's dtype themselves)")
        device = torch.device(device)
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kwargs[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return Schedule(**kwargs)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Diffuse x_start to step index t: sqrt(abar) x0 + sqrt(1-abar) noise."""
        if not isinstance(x_start, torch.Tensor) or not x_start.is_floating_point():
            raise ValueError(f"x_start must be a floating tensor, got {getattr(x_start, 'dtype', type(x_start))}")
        t = torch.as_tensor(t, device=self.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer step indices, got {t.dtype}")
        in_range = ((t >= 0) & (t < self.num_timesteps)).all()  # t = -1 read the last step's table
        msg = f"t must be step indices in [0, {self.num_timesteps})"
        if in_range.device.type == "cpu":
            if not bool(in_range):
                raise ValueError(msg)
        else:
            torch._assert_async(in_range, msg)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)


def check_trained_schedule(model, schedule: Schedule) -> None:
    """Raise where ``model`` records the schedule it was trained on (``trained_schedule``: (name, T), as
    ADMUNet.from_config sets from noise_schedule / diffusion_steps flags) and ``schedule`` (respaced or
    not) is not that one. Once per sampler or loop (a copy to the host)."""
    want = getattr(model, "trained_schedule", None)
    if want is None:
        return
    name, T = want
    ok = schedule.original_num_timesteps == T
    if ok:
        base = torch.cumprod(1.0 - get_named_beta_schedule(name, T), 0)
        ok = torch.allclose(schedule.alphas_cumprod.cpu(), base[schedule.timestep_map.cpu()], rtol=1e-9, atol=0)
    if not ok:
        raise ValueError(f"the denoiser was trained on the {name} schedule over {T} steps (its noise_schedule / "
                         f"diffusion_steps flags); this Schedule ({schedule.original_num_timesteps} steps) is "
                         f"another: use Schedule.create({name!r}, {T}, respacing=...)")


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] (per sample), cast to like's dtype and shaped to broadcast against it."""
    t = torch.as_tensor(t, device=table.device)
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    out = table[t].to(device=like.device, dtype=like.dtype)
    return out.view(-1, *([1] * (like.ndim - 1)))
