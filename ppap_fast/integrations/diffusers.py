"""diffusers integration: PPAP guidance for a diffusers denoiser and scheduler.

Three lines in an ordinary diffusers loop::

    guided = PPAPGuidance(guide)
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample   # x itself for DDPM / DDIM / DPM-Solver
        eps = guided.correct(eps, x, t, scheduler)
        x = scheduler.step(eps, t, x).prev_sample

That is guided-diffusion's update for a scheduler that does not clip x0 itself. With
``clip_sample=True`` (DDPM's and DDIM's default) the scheduler clips x0 after the guidance was added:
where x0 saturates the guidance is lost and the direction term moves against it (``thresholding=True``
likewise). There, clip first (``guided.clip_first(eps, x, t, scheduler)`` before ``correct``: it clips,
or thresholds as the scheduler would) and step a copy made with ``clip_sample=False, thresholding=False``,
as guided-diffusion (clip, then ``condition_score``) and the pipeline below do.

Or the whole loop: ``PPAPGuidedPipeline(unet, scheduler, guide)(batch_size=4, num_inference_steps=25)``,
a ``diffusers.DiffusionPipeline`` subclass (also ``PPAPGuidedPipeline.from_pipe(ddpm_pipe, guide=guide)``).
It follows diffusers' conventions: ``output_type`` "pil", "np", "pt" or "latent" (the final x as it is;
"raw" is an alias), ``callback_on_step_end(pipe, i, t, {"latents": x})`` whose returned dict may replace
the latents (the older ``callback(i, t, x)`` too), and ``class_labels`` go to a class-conditional UNet
(``num_class_embeds`` / ``class_embed_type``; required there) as well as to the guide's class target.

The correction is the generic score correction (guided-diffusion's ``condition_score``) that fits
any sampler built on the model's eps: ``eps' = eps - sqrt(1 - abar_t) * grad`` with
``grad = guide(x_t, t)`` (scale included) and ``abar_t = scheduler.alphas_cumprod[t]``, read from a
device copy of the table made once per scheduler (no host syncs). Solvers that convert the model output
with their own step sigma (DPM-Solver, UniPC, DEIS, SA-Solver: ``sigmas[step_index]``, off the training
grid with karras / lu-lambda / exponential / beta sigmas, where the rounded timestep's abar was up to 2%
off at 25 steps) get their ``_sigma_to_alpha_sigma_t`` of that sigma instead, as their step uses. A timestep outside
0..T-1 raises ValueError (device timesteps: one read per step for that check). Timesteps left on the host (the
default of ``scheduler.set_timesteps(n)``) cost one scalar host-to-device copy per step but tell
the guide the step's band, so a PPAP guide runs with merged experts (``fast=True``); timesteps on
the device (``set_timesteps(n, device=...)``) route per sample through the ExpertBank instead.
Schedulers predicting ``v_prediction`` or ``sample`` get the same correction expressed in their
parameterisation (v' = v - sqrt(1-abar)/sqrt(abar) grad; x0' = x0 + (1-abar)/sqrt(abar) grad).
A step with abar below ``MIN_GUIDED_ABAR`` = 1e-6 is not guided: x_t holds (almost) nothing of x0, so
p(y | x_t) ~ p(y), while the exact correction would move the predicted x0 by (1 - abar)/sqrt(abar) * grad
(4096 x grad at the 2**-24 that ``rescale_betas_zero_snr`` leaves in DPM-Solver / UniPC / Euler; DDIM / DDPM
keep 0). This holds in every parameterisation (they are one correction); the cosine schedule's last step
(abar 2.4e-9) is skipped too, the linear schedule's (4.0e-5) is guided.
Any other prediction_type raises ValueError. Sigma-space schedulers (Euler, Euler ancestral, Heun, LMS,
KDPM2: ``init_noise_sigma != 1``) sample x = x_t * sqrt(1 + sigma^2): the guide gets x_t (their
``scale_model_input`` of x, as the UNet) and the rounded timestep, and abar = 1 / (1 + sigma^2) of the
step's own sigma; call ``scheduler.scale_model_input`` in the loop as for the UNet. Schedulers with no
``alphas_cumprod`` (EDM, flow matching, VE) raise ValueError (the pipeline at guidance scale 0 runs them
unguided). With ``clip_sample`` or ``thresholding`` the scheduler limits x0 after the guidance was added: see below.

Faster denoiser on a GPU: ``fuse_norm_act(unet)`` runs each ResnetBlock2D's GroupNorm + SiLU pairs as
one op and adds its conv biases inside the next fused op (as ``ADMUNet.fuse_norm_act``; on an H100
the fused ADM-256 forward took 0.60x the eager one's time), in place; ``fuse_norm_act(unet, False)``
undoes it.

diffusers is imported only when ``PPAPGuidedPipeline`` is first used: this module imports without it.
"""
from __future__ import annotations

import inspect
import math
import numbers
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Union

import torch

from ..ops.eps_correction import guided_eps
from ..ops.lora.segments import _version  # None for an inference tensor
from ..sampling import FirstNonFinite, denoiser_output, eta_value

__all__ = ["PPAPGuidance", "PPAPGuidedPipeline", "PREDICTION_TYPES", "MIN_GUIDED_ABAR", "OUTPUT_TYPES",
           "fuse_norm_act"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "raw")  # "raw": alias of "latent" (the final x, unscaled)
# Below this abar (SNR < 1e-6: x_t keeps < 0.1% of x0's amplitude) a step is not guided, as at abar = 0:
# p(y | x_t) ~ p(y), and the exact correction moves the predicted x0 by (1 - abar) / sqrt(abar) * grad
# (> 1000 x grad). It catches zero-terminal-SNR's last step, which DPM-Solver / UniPC / Euler keep at
# abar = 2**-24 (4096 x grad), and the cosine schedule's last (2.4e-9); the linear schedule's last
# (4.0e-5) and every other step of the usual schedules stay guided.
MIN_GUIDED_ABAR = 1e-6


def _finite_scale(scale, what: str = "scale") -> float:
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and not scale.is_complex():
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a finite number, got {scale!r}")
    return float(scale)


def _prediction_type(scheduler) -> str:
    cfg = getattr(scheduler, "config", None)
    pt = getattr(cfg, "prediction_type", None) if cfg is not None else None
    if pt is None:
        pt = getattr(scheduler, "prediction_type", "epsilon")
    return pt


def _init_noise_sigma(scheduler) -> float:
    sigma0 = getattr(scheduler, "init_noise_sigma", 1.0)
    return float(sigma0.detach().cpu()) if isinstance(sigma0, torch.Tensor) else float(sigma0)


def _sigma_space(scheduler) -> bool:
    """A scheduler whose sample is x = x_t / sqrt(abar_t) (Euler, Heun, LMS, KDPM2, ...), not x_t."""
    return abs(_init_noise_sigma(scheduler) - 1.0) > 1e-6


ABAR_CACHE_SIZE = 16  # abar tables a PPAPGuidance keeps, per (scheduler, alphas_cumprod, device); LRU


def _scheduler_ref(scheduler):
    """A weak reference to ``scheduler``; one that takes none is held (ABAR_CACHE_SIZE bounds how many)."""
    try:
        return weakref.ref(scheduler)
    except TypeError:
        return lambda: scheduler


class PPAPGuidance:
    """Score correction of a diffusers model output by a guide.

    Args:
        guide: ``guide(x_t, t) -> grad`` (a ppap_fast guide: ClassGuide over an ExpertBank, ...),
            t the ORIGINAL timesteps, long [B] (the scheduler's timesteps are those).
        scale: an extra multiplier of the guide's gradient (0 skips the guide entirely).
        fast: run the guide through :class:`ppap_fast.fast_sampling.FastGuide`: when the timestep
            is known on the host (an int, or a CPU tensor as ``scheduler.timesteps`` is unless
            ``set_timesteps(device=...)`` moved it), a PPAP guide uses the merged experts of that
            band (LoRA merged, BN folded); a device timestep routes per sample. ``fast_options``
            (merge_experts, merge_mode, channels_last, guide_autocast, compile_guide, compile_kwargs) go to it.
    """

    def __init__(self, guide: Callable, scale: float = 1.0, fast: bool = True, **fast_options):
        if not callable(guide):
            raise TypeError(f"guide must be callable guide(x_t, t) -> grad, got {type(guide).__name__}")
        scale = _finite_scale(scale)
        allowed = {"merge_experts", "merge_mode", "channels_last", "guide_autocast", "compile_guide", "compile_kwargs"}
        if set(fast_options) - allowed:
            raise TypeError(f"unknown fast options {sorted(set(fast_options) - allowed)}; allowed: {sorted(allowed)}")
        if not fast and fast_options:  # the plain guide runs: they were ignored silently
            raise ValueError(f"fast options {sorted(fast_options)} configure the fast path, which fast=False does not "
                             "run: drop them or keep fast=True")
        self.guide, self.scale = guide, float(scale)
        self.fast, self.fast_options = bool(fast), dict(fast_options)

    @property
    def guide(self) -> Callable:
        return self._guide

    @guide.setter
    def guide(self, guide: Callable) -> None:
        # a new guide drops the caches built for the old one: its FastGuide (the old guide ran on) and the tables
        # whose creation checked the guide's banks / X0HatGuide tables against the scheduler
        if not callable(guide):
            raise TypeError(f"guide must be callable guide(x_t, t) -> grad, got {type(guide).__name__}")
        self._guide = guide
        self._tables: OrderedDict = OrderedDict()
        self._fast_guides: dict = {}

    def _fast_guide(self, device):
        fg = self._fast_guides.get(device)
        if fg is None:
            from ppap_fast.fast_sampling import FastGuide

            own = self.guide if isinstance(self.guide, FastGuide) else None
            if own is not None and self.fast_options:  # they would configure a second wrapper, not the guide's
                raise ValueError(f"fast options {sorted(self.fast_options)} given with a FastGuide: give them to the "
                                 "FastGuide (it runs with its own)")
            if own is not None and (own.device is None or (own.device.type == device.type and
                                                           own.device.index in (None, device.index))):
                fg = own  # a second FastGuide ran it as an opaque callable: never its merged experts
            else:
                fg = FastGuide(self.guide, device, **self.fast_options)
            self._fast_guides[device] = fg
        return fg

    @staticmethod
    def _host_timestep(t) -> int | None:
        """The batch's common timestep if it can be read without touching an accelerator."""
        from ppap_fast.experts.bank import as_int_or_tensor

        t = as_int_or_tensor(t)  # numpy ints / arrays: they routed per sample instead of merging
        if isinstance(t, int) and not isinstance(t, bool):
            return t
        if isinstance(t, float):
            return int(round(t))
        if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 0:
            flat = t.reshape(-1)
            if flat.numel() == 1 or bool((flat == flat[0]).all()):
                v = flat[0]
                return int(v.round()) if v.is_floating_point() else int(v)
        return None

    def _target(self, target, x) -> torch.Tensor:
        from ppap_fast.guidance import has_class_target

        if not has_class_target(self.guide):
            raise ValueError(f"class labels given, but the guide ({type(self.guide).__name__}) has no class target "
                             "to replace: pass them to a ClassGuide / X0HatGuide, or leave them out")
        return _labels_for_batch(torch.as_tensor(target, device=x.device), x.shape[0])

    # -- pieces --------------------------------------------------------------------------
    def _abar(self, scheduler, device) -> torch.Tensor:
        return self._table(scheduler, device)[0]

    def _forget(self, scheduler) -> None:
        """Drop the tables cached for ``scheduler`` (a temporary copy: they held its alphas_cumprod until evicted)."""
        for k in [k for k in self._tables if k[0] == id(scheduler)]:
            del self._tables[k]

    def _table(self, scheduler, device) -> tuple:
        """(abar table on device, whether the scheduler samples in sigma space), kept in an LRU of ABAR_CACHE_SIZE."""
        acp = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(acp, torch.Tensor) or acp.ndim != 1:
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod table: PPAPGuidance needs a "
                             "scheduler of the variance-preserving (DDPM-family) process")
        key = (id(scheduler), id(acp), torch.device(device))
        entry = self._tables.get(key)
        version = _version(acp)  # None for an inference tensor: its in-place changes are not seen, never reused
        # ids are reused once an object is freed; the table can change in place
        if (entry is not None and entry[2]() is scheduler and entry[3] is acp and version is not None
                and entry[4] == version):
            self._tables.move_to_end(key)
            return entry[:2]
        if _inverts(scheduler):  # its step at t converts with alphas_cumprod[t - stride]: the correction used [t]
            raise ValueError(f"{type(scheduler).__name__} steps from an image towards noise (inversion): "
                             "PPAPGuidance guides sampling only; correct the outputs of a sampling scheduler "
                             "(DDIMScheduler, DPMSolverMultistepScheduler), or run the inversion unguided")
        if _own_config(scheduler, "timestep_type") == "continuous":
            # its timesteps are 0.25 * log(sigma): rounded to 0 / 1 they routed the guide silently, then raised
            raise ValueError(f"{type(scheduler).__name__} with timestep_type='continuous' passes 0.25 * log(sigma) "
                             "as its timesteps, not the training timesteps 0..T-1 the guide takes: use "
                             "timestep_type='discrete' (the default)")
        sigma_space = _sigma_space(scheduler)
        if sigma_space and not callable(getattr(scheduler, "scale_model_input", None)):
            raise ValueError(f"{type(scheduler).__name__} samples in sigma space (init_noise_sigma="
                             f"{_init_noise_sigma(scheduler):.4g}) without scale_model_input: PPAPGuidance "
                             "cannot map its sample to x_t of the variance-preserving process")
        from ppap_fast.fast_sampling import _x0hat_guides, guide_banks

        for g in _x0hat_guides(self.guide):  # x0-hat from another schedule's abar than the denoiser's
            if g.acp.shape != acp.shape or not torch.allclose(g.acp, acp.detach().cpu().double(), rtol=1e-4,
                                                              atol=1e-7):
                raise ValueError(f"the X0HatGuide's alphas_cumprod ({g.acp.numel()} steps) is not the "
                                 f"{type(scheduler).__name__}'s ({acp.numel()} steps, its beta_schedule): give it "
                                 "scheduler.alphas_cumprod")
        for bank in guide_banks(self.guide, through_fast=True):  # a FastGuide's too
            if bank.num_timesteps != acp.numel():
                raise ValueError(f"{type(scheduler).__name__} has num_train_timesteps={acp.numel()} but the guide's "
                                 f"ExpertBank splits T={bank.num_timesteps} timesteps into its experts: the "
                                 "scheduler's timesteps would be routed to the wrong experts")
        # float64 (none on MPS): a float64 model's coefficient in float64; a float32 one's as before (exact cast)
        tab = acp.detach().to(device=device, dtype=torch.float32 if torch.device(device).type == "mps"
                              else torch.float64)
        if version is not None:
            self._tables.pop(key, None)  # a stale entry under the same key
            self._tables[key] = (tab, sigma_space, _scheduler_ref(scheduler), acp, version)
            while len(self._tables) > ABAR_CACHE_SIZE:
                self._tables.popitem(last=False)
        return tab, sigma_space

    def _range_checked_table(self, scheduler, num_train_timesteps: int):
        """scheduler.timesteps when its values all lie in 0..T-1: read once per table (set_timesteps) and in-place
        version, not once per step (a sync a step for a table on an accelerator); else None."""
        table = getattr(scheduler, "timesteps", None)
        if not isinstance(table, torch.Tensor) or table.numel() == 0 or table.is_complex() or not table.is_contiguous():
            return None
        key = (id(table), _version(table), num_train_timesteps)
        cached = getattr(self, "_checked_table", None)
        if cached is not None and cached[0] == key and cached[1]() is table:
            return table if cached[2] else None
        if key[1] is None:  # an inference tensor: in-place changes not seen
            return None
        v = table.round() if table.is_floating_point() else table
        lo, hi = (int(x) for x in torch.stack([v.min(), v.max()]).tolist())
        ok = lo >= 0 and hi < num_train_timesteps  # if not, each t is checked (and one outside raises)
        self._checked_table = (key, weakref.ref(table), ok)
        return table if ok else None

    @staticmethod
    def timesteps(t, batch: int, device, num_train_timesteps: int | None = None,
                  checked: torch.Tensor | None = None) -> torch.Tensor:
        """Scheduler timestep(s) -> long [B] on `device` (floats are rounded). With num_train_timesteps=T,
        a timestep outside 0..T-1 raises ValueError (one read when t is already on an accelerator, none for a t
        that is a view into ``checked``, a table whose values were checked)."""
        if isinstance(t, bool):
            raise TypeError("t must be an int or a tensor of timesteps, got bool")
        t = torch.as_tensor(t)
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold timesteps, got dtype {t.dtype}")
        known = _view_into(t, checked)  # before rounding (a new tensor)
        if t.is_floating_point():
            t = t.round()
        if num_train_timesteps is not None and t.numel() > 0 and not known:
            lo, hi = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())
            if lo < 0 or hi >= num_train_timesteps:
                bad = lo if lo < 0 else hi
                raise ValueError(f"timestep {bad} is outside the scheduler's range 0..{num_train_timesteps - 1} "
                                 f"(num_train_timesteps={num_train_timesteps})")
        t = t.to(device=device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
        return t

    def grad(self, x: torch.Tensor, t, scale: float | None = None, target=None) -> torch.Tensor:
        """scale * guide(x_t, t), detached, in x's dtype (guides cast their network's input to its dtype).
        ``target``: class labels [B] (or one int) replacing the guide's own target for this call (a
        ClassGuide / X0HatGuide, or a ComposedGuide / FastGuide holding one)."""
        s = self.scale if scale is None else _finite_scale(scale)
        tt = self.timesteps(t, x.shape[0], x.device)
        kw = {} if target is None else {"target": self._target(target, x)}
        if self.fast:
            g = self._fast_guide(x.device)(x.detach(), tt, self._host_timestep(t), **kw)
        else:
            with torch.enable_grad():
                g = self.guide(x.detach(), tt, **kw)
        if not isinstance(g, torch.Tensor) or g.shape != x.shape:
            from ppap_fast.guidance import raise_if_network

            raise_if_network(self.guide, None, f" (it returned {tuple(getattr(g, 'shape', ()))}, not a gradient "
                             "shaped like x_t)")
            raise ValueError(f"the guide must return a gradient shaped like x {tuple(x.shape)}, got "
                             f"{getattr(g, 'shape', type(g).__name__)}")
        g = g.detach().to(x.dtype)
        return g if s == 1.0 else g * s

    def vp_sample(self, x: torch.Tensor, t, scheduler) -> tuple:
        """(x_t, abar_t): the scheduler's sample as x_t of the variance-preserving process (what the guide
        is trained on) and abar_t as float32 (float64 for a float64 x) [B, 1, ...] (or a scalar) on x's device. For a
        scheduler in sigma space (Euler, Heun, LMS, KDPM2: x = x_t * sqrt(1 + sigma^2)) both come from its
        ``scale_model_input`` at this step (its sigma, which need not sit on the training grid; abar and
        sqrt(1 - abar) in float64 from that sigma where it is found in ``sigmas`` / ``sigmas_interpol``). For a
        solver that converts with its own step sigma (DPM-Solver, UniPC, DEIS, SA-Solver:
        ``sigmas[step_index]``, off the training grid with karras / lu-lambda / exponential / beta sigmas)
        abar_t = alpha_t^2 of that sigma, as its step uses; else ``alphas_cumprod[t]``. Timesteps outside
        0..T-1 raise ValueError."""
        x_t, _, _, abar = self._vp(x, t, scheduler)
        return x_t, abar

    def _vp(self, x: torch.Tensor, t, scheduler) -> tuple:
        """(x_t, alpha_t, sigma_t, abar_t) of :meth:`vp_sample` (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t),
        a solver's own alpha_t, sigma_t taken as they are: 1 - abar loses digits in float32 near abar = 1)."""
        tab, sigma_space = self._table(scheduler, x.device)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32  # the coefficient's dtype
        tt = self.timesteps(t, x.shape[0], x.device, num_train_timesteps=tab.numel(),
                            checked=self._range_checked_table(scheduler, tab.numel()))
        if not sigma_space:
            step = _solver_step_alpha_sigma(scheduler, t, work)
            if step is not None:  # the alpha_t, sigma_t the solver's step itself uses (karras / lu-lambda sigmas)
                a, s1 = (v.to(x.device) for v in step)
                return x, a, s1, a * a
            abar = tab[tt].to(work).view(-1, *([1] * (x.ndim - 1)))
            return x, abar.sqrt(), (1 - abar).sqrt(), abar
        step_t = _first_timestep(t)
        warned = getattr(scheduler, "is_scale_input_called", None)  # keep diffusers' "call scale_model_input" check
        c_in = scheduler.scale_model_input(torch.ones((), dtype=torch.float32), step_t)  # 1 / sqrt(1 + sigma^2)
        if warned is not None:
            scheduler.is_scale_input_called = warned
        # .cpu(): KDPM2 keeps sigmas_interpol on set_timesteps' device, so its second pass's c_in is there
        c_in = torch.as_tensor(c_in, dtype=torch.float32).reshape(()).cpu()
        sigma = _input_scaling_sigma(scheduler, c_in)
        a = c_in.to(work)
        if sigma is None:  # 1 - c_in^2 loses digits at small sigma (7e-5 off in sqrt(1 - abar) at sigma 0.03)
            abar = (a * a).to(x.device)
            s1 = (1 - abar).sqrt()
        else:  # float64 from the sigma itself
            abar = (1 / (1 + sigma * sigma)).to(device=x.device, dtype=work)
            s1 = (sigma / (1 + sigma * sigma).sqrt()).to(device=x.device, dtype=work)
            if work == torch.float64:  # c_in is float32
                a = (1 / (1 + sigma * sigma).sqrt()).to(x.device)
        return x * c_in.to(device=x.device, dtype=x.dtype), a.to(x.device), s1, abar

    # -- the correction ------------------------------------------------------------------
    def correct(self, model_output: torch.Tensor, x: torch.Tensor, t, scheduler, scale: float | None = None,
                grad: torch.Tensor | None = None, target=None) -> torch.Tensor:
        """The guided model output for ``scheduler.step(model_output', t, x)``.

        model_output: the denoiser's output for x at t ([B, C, ...], or [B, 2C, ...] with learned
        variance: only the first C channels are corrected). grad: a precomputed scale*guide(x_t, t) (no ``scale``
        with it), x_t the
        ``vp_sample`` of x (x itself unless the scheduler samples in sigma space). target: class labels
        for this call (see :meth:`grad`).
        """
        if grad is not None and scale is not None:  # the scale was ignored silently
            raise ValueError("grad= is a precomputed scale * guide(x_t, t): it takes no scale= (scale it yourself)")
        if grad is not None and target is not None:  # the labels were ignored silently
            raise ValueError("grad= is a precomputed scale * guide(x_t, t): it takes no target= (give the labels to "
                             "grad(x_t, t, target=...), or leave grad= out)")
        pt = _checked_prediction_type(scheduler)
        c = _check_output_shape(model_output, x)
        if grad is not None and (not isinstance(grad, torch.Tensor) or grad.shape[1:] != x.shape[1:]
                                 or grad.shape[0] not in (1, x.shape[0])):  # [C, H, W], [H], [B, 1, H, W] broadcast
            raise ValueError(f"grad must be a precomputed scale * guide(x_t, t) shaped like x {tuple(x.shape)} (or "
                             f"[1, ...] for every sample), got {getattr(grad, 'shape', type(grad).__name__)}")
        s = self.scale if scale is None else _finite_scale(scale)
        if grad is None and s == 0.0:
            return model_output
        x_vp, a, s1, abar = self._vp(x, t, scheduler)
        if grad is None:
            grad = self.grad(x_vp, t, s, target=target)
        if pt == "epsilon":
            coef = s1
        elif pt == "v_prediction":
            coef = s1 / a
        else:  # "sample": x0 moves the opposite way
            coef = -s1 * s1 / a
        # (near) zero SNR: x_t holds (almost) nothing of x0, p(y | x_t) ~ p(y): no guidance (MIN_GUIDED_ABAR)
        coef = torch.where(abar >= MIN_GUIDED_ABAR, coef, torch.zeros_like(coef))
        # one pass (ops.guided_eps): head - coef * grad in float32 (float64 for a float64 output), the variance
        # channels copied; grad as the eager formula took it: broadcast to the head, float32 unless in the
        # output's dtype
        grad = grad.expand(model_output[:, :c].shape)
        if grad.dtype not in (model_output.dtype, torch.float32):
            grad = grad.float()
        return guided_eps(model_output, grad, coef, c)

    __call__ = correct

    def clip_first(self, model_output: torch.Tensor, x: torch.Tensor, t, scheduler) -> torch.Tensor:
        """``model_output`` (the UNet's at x, t) with its predicted x0 clipped to ``clip_sample_range`` (or, for a
        scheduler with ``thresholding=True``, dynamically thresholded as it would): guided-diffusion clips x0 BEFORE
        ``condition_score`` adds the guidance, which is then never clipped. Call it before ``correct`` and
        step a scheduler that does not clip or threshold again (``clip_sample=False, thresholding=False``).

        Where the conversion is singular the output is returned unchanged (as ``correct`` leaves such
        steps unguided): epsilon at abar = 0 (zero terminal SNR: x0 = (x - eps) / 0) and epsilon or
        v_prediction at abar = 1 (eps = (x - x0) / 0); "sample" is never singular."""
        return self._clip_first(model_output, x, t, scheduler, scheduler)

    def _clip_first(self, model_output, x, t, scheduler, limits_of) -> torch.Tensor:
        """clip_first at ``scheduler``'s step (its step index: the scheduler that steps), x0 limited as
        ``limits_of`` would (the user's scheduler when a copy without limits steps)."""
        pt = _checked_prediction_type(scheduler)
        c = _check_output_shape(model_output, x)
        x_vp, a, s1, _ = self._vp(x, t, scheduler)
        singular = s1 == 0 if pt == "v_prediction" else (a == 0) | (s1 == 0) if pt == "epsilon" else None
        if singular is not None:  # unit divisors there: finite values, discarded below
            a, s1 = torch.where(singular, torch.ones_like(a), a), torch.where(singular, torch.ones_like(s1), s1)
        work = torch.float64 if model_output.dtype == torch.float64 else torch.float32
        head, xf = model_output[:, :c].to(work), x_vp.to(work)
        x0 = {"epsilon": lambda: (xf - s1 * head) / a, "v_prediction": lambda: a * xf - s1 * head,
              "sample": lambda: head}[pt]()
        x0 = _limit_x0(limits_of, x0)
        eps = (xf - a * x0) / s1
        new = {"epsilon": eps, "v_prediction": a * eps - s1 * x0, "sample": x0}[pt]
        if singular is not None:
            new = torch.where(singular, head, new)
        new = new.to(model_output.dtype)
        return new if model_output.shape[1] == c else torch.cat([new, model_output[:, c:]], dim=1)


def _input_scaling_sigma(scheduler, c_in: torch.Tensor) -> torch.Tensor | None:
    """The sigma (float64, 0-dim, on the CPU) of a sigma-space scheduler's ``scale_model_input`` that returned
    ``c_in`` = 1 / sqrt(1 + sigma^2) (float32) at its current step: ``sigmas[step_index]``, or in a
    second-order pass (``state_in_first_order`` False: KDPM2, KDPM2 ancestral) ``sigmas_interpol[step_index]``
    or ``[step_index - 1]``, or DPM-Solver SDE's ``mid_point_sigma``; the candidate whose input scaling, computed
    as the scheduler does, gives c_in bitwise. None where none does (another scheduler's sigma choice: c_in is used)."""
    idx = getattr(scheduler, "step_index", None)
    if not isinstance(idx, int):
        return None
    candidates = []
    if getattr(scheduler, "state_in_first_order", True) is False:
        candidates += [("sigmas_interpol", idx), ("sigmas_interpol", idx - 1), ("mid_point_sigma", None)]
    candidates.append(("sigmas", idx))
    for name, i in candidates:
        sigmas = getattr(scheduler, name, None)
        if i is None:  # a scalar (DPM-Solver SDE's midpoint sigma; a float or a 0-dim tensor)
            if not isinstance(sigmas, (float, torch.Tensor)) or torch.as_tensor(sigmas).numel() != 1:
                continue
            sigma = torch.as_tensor(sigmas).detach().cpu().reshape(())
        elif not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or not 0 <= i < len(sigmas):
            continue
        else:
            sigma = sigmas[i].detach().cpu()
        scaled = torch.ones((), dtype=torch.float32) / ((sigma ** 2 + 1) ** 0.5)
        if scaled.dtype == torch.float32 and torch.equal(scaled, c_in):
            return sigma.double()
    return None


def _solver_step_alpha_sigma(scheduler, t, dtype: torch.dtype = torch.float32) -> tuple | None:
    """(alpha_t, sigma_t) (``dtype`` scalars) of the sigma the scheduler's step converts x0 / eps with, for a solver
    that reads ``sigmas[step_index]`` through ``_sigma_to_alpha_sigma_t`` (DPM-Solver, UniPC, DEIS, SA-Solver);
    None for the others (they read alphas_cumprod[t]), before ``set_timesteps``, or for a t off its schedule.
    The step index is found as the step will: ``step_index``, else ``begin_index``, else t's place in
    ``timesteps`` (the second of two equal ones, as diffusers)."""
    sigmas, timesteps = getattr(scheduler, "sigmas", None), getattr(scheduler, "timesteps", None)
    to_alpha_sigma = getattr(scheduler, "_sigma_to_alpha_sigma_t", None)
    if not (isinstance(sigmas, torch.Tensor) and isinstance(timesteps, torch.Tensor) and callable(to_alpha_sigma)) \
            or getattr(scheduler, "num_inference_steps", None) is None:
        return None
    if _own_setting(scheduler, "use_flow_sigmas"):
        raise ValueError(f"{type(scheduler).__name__} with use_flow_sigmas=True samples a flow-matching path, not "
                         "the variance-preserving one PPAPGuidance corrects")
    idx = getattr(scheduler, "step_index", None)
    if idx is None:
        idx = getattr(scheduler, "begin_index", None)
    if idx is None:
        step_t = _first_timestep(t)
        found = (timesteps == torch.as_tensor(step_t, device=timesteps.device)).nonzero().flatten().tolist()
        if not found:
            return None
        idx = found[1] if len(found) > 1 else found[0]
    if not 0 <= idx < min(len(timesteps), len(sigmas)):
        return None
    alpha_t, sigma_t = to_alpha_sigma(sigmas[idx].detach().to(dtype))
    return alpha_t.reshape(()), sigma_t.reshape(())


def _check_integer_labels(y: torch.Tensor) -> None:
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim > 1:
        raise ValueError(f"class labels must be an int or integer labels [B], got dtype {y.dtype}, "
                         f"shape {tuple(y.shape)}")


def _labels_for_batch(y: torch.Tensor, batch: int, integer: bool = True) -> torch.Tensor:
    """Class labels (one for all, or [batch]) as [batch]: long if ``integer`` (checked), else as given."""
    if integer:
        _check_integer_labels(y)
        y = y.long()
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape[0] != batch:
        raise ValueError(f"{y.shape[0]} class labels for a batch of {batch}: give one label per sample "
                         "(repeat them to batch_size) or one int for all")
    return y


def _view_into(t: torch.Tensor, table: torch.Tensor | None) -> bool:
    """Whether every element of t is an element of the contiguous ``table`` (t a view of it: scheduler.timesteps[i]);
    host metadata only."""
    if table is None or t.dtype != table.dtype or t.device != table.device or any(st < 0 for st in t.stride()):
        return False
    if t.untyped_storage().data_ptr() != table.untyped_storage().data_ptr():
        return False
    lo = t.storage_offset()
    hi = lo + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return table.storage_offset() <= lo and hi < table.storage_offset() + table.numel()


def _first_timestep(t):
    """A step's timestep as one value (diffusers passes one t for the whole batch)."""
    return t.reshape(-1)[0] if isinstance(t, torch.Tensor) and t.ndim > 0 else t


def _checked_prediction_type(scheduler) -> str:
    pt = _prediction_type(scheduler)
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"scheduler prediction_type {pt!r} is not supported: expected one of {PREDICTION_TYPES}")
    return pt


def _check_output_shape(model_output, x) -> int:
    """x's channel count C, after checking model_output is [B, C or 2C, ...] like x."""
    if not isinstance(model_output, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise TypeError("model_output and x must be tensors")
    c = x.shape[1] if x.ndim > 1 else None
    if c is None or model_output.shape[0] != x.shape[0] or model_output.shape[2:] != x.shape[2:] \
            or model_output.shape[1] not in (c, 2 * c):
        raise ValueError(f"model_output {tuple(model_output.shape)} does not match x {tuple(x.shape)} "
                         "(expected [B, C or 2C, ...])")
    return c


def _own_config(scheduler, name: str, default=None):
    """config.<name> where the scheduler's class takes that setting, else ``default``: from_config of another
    scheduler's config keeps its explicit keys (DPM-Solver made from a clip_sample=True DDPM config says
    clip_sample=True, but never clips)."""
    params = _init_params(type(scheduler))
    takes = params is None or name in params
    return getattr(getattr(scheduler, "config", None), name, default) if takes else default


_INIT_PARAMS: "weakref.WeakKeyDictionary[type, frozenset | None]" = weakref.WeakKeyDictionary()


def _init_params(cls: type) -> frozenset | None:
    """The names ``cls.__init__`` takes (None where it has no signature), computed once per class: _own_config
    runs several times a step, and inspect.signature is slow."""
    try:
        return _INIT_PARAMS[cls]
    except KeyError:
        pass
    try:
        params = frozenset(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        params = None
    _INIT_PARAMS[cls] = params
    return params


def _own_setting(scheduler, name: str) -> bool:
    return bool(_own_config(scheduler, name, False))


# schedulers that take clip_sample (CogVideoX's default True) but whose step never clips
_NEVER_CLIPS = frozenset({"TCDScheduler", "CogVideoXDDIMScheduler"})


def _applied_setting(scheduler, name: str) -> bool:
    """An x0 limit (clip_sample / thresholding) the scheduler has set and applies (subclasses as their base)."""
    if name == "clip_sample" and any(c.__name__ in _NEVER_CLIPS for c in type(scheduler).__mro__):
        return False
    return _own_setting(scheduler, name)


def _thresholds(scheduler) -> bool:
    return _applied_setting(scheduler, "thresholding") and hasattr(scheduler, "_threshold_sample")


def _limits_x0(scheduler) -> bool:
    """Whether the scheduler's step clips or thresholds its predicted x0 (after any guidance added)."""
    return _thresholds(scheduler) or _applied_setting(scheduler, "clip_sample")


def _limit_x0(scheduler, x0: torch.Tensor) -> torch.Tensor:
    """x0 limited as the scheduler's step would: dynamic thresholding if enabled, else clipped."""
    if _thresholds(scheduler):
        return scheduler._threshold_sample(x0).to(x0.dtype)
    rng = float(getattr(scheduler.config, "clip_sample_range", 1.0))
    return x0.clamp(-rng, rng)


def _unlimited_copy(scheduler):
    """A copy of the scheduler that neither clips nor thresholds x0."""
    off = {k: False for k in ("clip_sample", "thresholding") if k in scheduler.config}
    return type(scheduler).from_config(scheduler.config, **off)


def _fusable_resnet(block) -> bool:
    """A ResnetBlock2D the fused forward reproduces: plain GroupNorms, SiLU, plain convs, a time
    embedding projection, "default" or "scale_shift" time-embedding norm."""
    from ..models.adm import _PLAIN_CONVS

    return (type(block).__name__ == "ResnetBlock2D" and type(block).__module__.startswith("diffusers")
            and type(getattr(block, "norm1", None)) is torch.nn.GroupNorm
            and type(getattr(block, "norm2", None)) is torch.nn.GroupNorm
            and isinstance(getattr(block, "nonlinearity", None), torch.nn.SiLU)
            and type(getattr(block, "conv1", None)) in _PLAIN_CONVS and type(getattr(block, "conv2", None)) in _PLAIN_CONVS
            and getattr(block, "time_embedding_norm", None) in ("default", "scale_shift")
            and getattr(block, "time_emb_proj", None) is not None)


def fuse_norm_act(unet: torch.nn.Module, enabled: bool = True) -> int:
    """Fuse (or, with ``enabled=False``, unfuse) every ResnetBlock2D of the diffusers model ``unet`` in place
    (module docstring); returns how many blocks now run fused. Blocks of other kinds, or with norms,
    activations or convs the fused forward does not cover, keep their forward. Same math as the
    modules (statistics and activation in float32, one rounding to the torso's dtype); without
    autograd recording the Triton ops run on CUDA, else their PyTorch references."""
    import types

    count = 0
    for m in unet.modules():
        if not _fusable_resnet(m):
            continue
        if enabled:
            m.forward = types.MethodType(_fused_resnet_forward, m)
            count += 1
        else:
            m.__dict__.pop("forward", None)
    return count


def _fused_resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with each norm (+ time embedding) + SiLU one op and the conv
    biases added by the next op (the second norm's in_bias; the residual add)."""
    from ..models.adm import _conv_without_bias, _fused_residual, _sum_bias
    from ..ops.norm_act import group_norm_act

    def norm(n, h, **kw):
        return group_norm_act(h, n.num_groups, n.weight, n.bias, n.eps, **kw)

    x = input_tensor
    h = norm(self.norm1, x)
    if self.upsample is not None:
        if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails with large batches
            x, h = x.contiguous(), h.contiguous()
        x, h = self.upsample(x), self.upsample(h)
    elif self.downsample is not None:
        x, h = self.downsample(x), self.downsample(h)
    h, b1 = _conv_without_bias(self.conv1, h)
    if temb is not None:
        temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
    if self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        scale, shift = torch.chunk(temb, 2, dim=1)
        h = norm(self.norm2, h, scale=scale, shift=shift, in_bias=b1)
    else:
        h = norm(self.norm2, h, in_bias=_sum_bias(temb, b1))
    h, b2 = _conv_without_bias(self.conv2, self.dropout(h))
    b_skip = None
    if self.conv_shortcut is not None:
        x, b_skip = _conv_without_bias(self.conv_shortcut, x.contiguous() if self.training else x)
    out = _fused_residual(h, x, _sum_bias(b2, b_skip))
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _inverts(scheduler) -> bool:
    """An inversion scheduler (DDIMInverseScheduler, DPMSolverMultistepInverseScheduler; subclasses too)."""
    return any(c.__name__.endswith("InverseScheduler") for c in type(scheduler).__mro__)


def _check_step_takes_a_plain_sample(scheduler) -> None:
    """The loop calls scheduler.step(model_output, t, x, [eta, generator]): a scheduler whose step needs
    more (RePaint's original_image and mask: inpainting) is refused by name, before sampling."""
    if not callable(getattr(scheduler, "step", None)):  # ScoreSdeVe: step_pred / step_correct
        raise ValueError(f"{type(scheduler).__name__} has no step(model_output, timestep, sample): PPAPGuidedPipeline "
                         "runs schedulers that step that way; use a DDPM-family scheduler (DDPM, DDIM, DPM-Solver, ...)")
    if _inverts(scheduler):
        raise ValueError(f"{type(scheduler).__name__} steps from an image towards noise (inversion): "
                         "PPAPGuidedPipeline samples from noise; use DDIMScheduler / DPMSolverMultistepScheduler")
    params = inspect.signature(scheduler.step).parameters.values()
    needed = [p.name for p in list(params)[3:] if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if needed:
        raise ValueError(f"{type(scheduler).__name__}.step needs {needed} besides (model_output, timestep, sample): "
                         "PPAPGuidedPipeline runs unconditional sampling loops; use a DDPM-family scheduler "
                         "(DDPM, DDIM, DPM-Solver, Euler, ...)")


def _check_variance_channels(scheduler, out: torch.Tensor, x: torch.Tensor) -> None:
    """A denoiser output of 2C channels (eps and a learned variance) goes to a scheduler that splits it off
    (variance_type 'learned' / 'learned_range'); others failed inside their step with a broadcast error."""
    c, vt = x.shape[1], _own_config(scheduler, "variance_type")
    if out.shape[1] == 2 * c and vt in ("learned", "learned_range"):
        return
    what = "eps and a learned variance" if out.shape[1] == 2 * c else "not the sample's channel count"
    raise ValueError(f"the denoiser returns {out.shape[1]} channels for a {c}-channel sample ({what}), but "
                     f"{type(scheduler).__name__} (variance_type={vt!r}) steps with {c}: give a 2C denoiser a scheduler "
                     "with variance_type='learned_range' (DDPM, DPM-Solver), or a denoiser returning its first C channels")


def _step_kwargs(scheduler, eta, generator) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


class _GuidedPipelineBody:
    """A ``diffusers.DiffusionPipeline`` (unconditional, class- or text-conditional sampler) with PPAP guidance.

    ``PPAPGuidedPipeline(unet, scheduler, guide)(batch_size, num_inference_steps, generator)`` runs
    ``scheduler`` on ``unet`` (a diffusers UNet2DModel, or any ``denoiser(x, t)`` returning a tensor
    or an object with ``.sample``) with the score correction of :class:`PPAPGuidance` at every step.
    With ``guide=None`` or ``guidance_scale=0`` it is the plain DDPM/DDIM pipeline loop.

    It is a DiffusionPipeline: ``unet`` and ``scheduler`` are its registered components
    (``pipe.components``, ``save_pretrained``, ``from_pretrained(path, guide=...)``,
    ``from_pipe(ddpm_pipeline, guide=...)``, ``set_progress_bar_config``); the guide is not a
    component (it is not saved with the pipeline: keep it with :func:`ppap_fast.experts.save_experts`).
    ``guide`` may be a :class:`PPAPGuidance` (its fast options kept: ``PPAPGuidance(guide, channels_last=True,
    guide_autocast=torch.bfloat16)``; its ``scale`` multiplies ``guidance_scale``); a plain guide gets
    ``PPAPGuidance(guide)``'s defaults. ``image_shape``: (C, H, W) of the samples (default: the UNet's config).
    """

    def __init__(self, unet, scheduler, guide: Callable | None = None, image_shape: tuple | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.guidance = guide if guide is None or isinstance(guide, PPAPGuidance) else PPAPGuidance(guide)
        if image_shape is not None:  # (H, W) made [B, H, W] samples (rows read as channels), 8.5 was truncated
            image_shape = tuple(image_shape)
            if len(image_shape) != 3 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                                                for s in image_shape):
                raise ValueError(f"image_shape must be (C, H, W): three positive ints, got {image_shape!r}")
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    @property
    def device(self) -> torch.device:
        p = next(iter(self.unet.parameters()), None) if hasattr(self.unet, "parameters") else None
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(iter(self.unet.parameters()), None) if hasattr(self.unet, "parameters") else None
        return p.dtype if p is not None else torch.float32

    def to(self, *args, **kwargs):
        if isinstance(self.unet, torch.nn.Module) or not hasattr(self.unet, "to"):
            return super().to(*args, **kwargs)
        self.unet.to(*args, **kwargs)
        return self

    def _shape(self, batch_size):
        if self.image_shape is not None:
            return (batch_size, *self.image_shape)
        cfg = getattr(self.unet, "config", None)
        size = getattr(cfg, "sample_size", None)
        chans = getattr(cfg, "in_channels", None)
        if size is None or chans is None:
            raise ValueError("cannot infer the image shape from the denoiser: pass image_shape=(C, H, W)")
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, chans, *size)

    _callback_tensor_inputs = ["latents"]

    def _class_embedding(self):
        """The denoiser's class embedding when it is class-conditional (num_class_embeds / class_embed_type)."""
        return getattr(self.unet, "class_embedding", None) if isinstance(self.unet, torch.nn.Module) else None

    def _unet_class_labels(self, class_labels, batch_size: int, device):
        """class_labels as the class-conditional denoiser takes them ([batch_size]), None if it is not one."""
        emb = self._class_embedding()
        if emb is None:
            return None
        if class_labels is None:
            raise ValueError(f"the denoiser is class-conditional (class embedding {type(emb).__name__}): pass "
                             "class_labels=<one int or [batch_size] labels>")
        y = torch.as_tensor(class_labels)
        integer = isinstance(emb, torch.nn.Embedding)
        if integer:
            _check_integer_labels(y)
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= emb.num_embeddings):
                raise ValueError(f"class labels must lie in 0..{emb.num_embeddings - 1} (the denoiser's "
                                 f"num_class_embeds={emb.num_embeddings}), got {y.tolist()}")
        return _labels_for_batch(y, batch_size, integer).to(device)

    def _text_width(self):
        """(config key, width) of the text states the denoiser takes: encoder_hid_dim (IF: projected to
        cross_attention_dim inside) or cross_attention_dim (UNet2DConditionModel); (None, None) without."""
        cfg = getattr(self.unet, "config", None)
        for key in ("encoder_hid_dim", "cross_attention_dim"):
            if getattr(cfg, key, None) is not None:
                return key, getattr(cfg, key)
        return None, None

    def _text_conditioning(self, prompt_embeds, negative_prompt_embeds, cfg_scale: float, batch_size: int, device):
        """(encoder_hidden_states of the text, of the negative text or None, cfg_scale) for _denoise, or None
        without prompt_embeds. Classifier-free guidance runs where cfg_scale > 1 (as diffusers' pipelines)."""
        key, width = self._text_width()
        if prompt_embeds is None:
            if width is not None:
                raise ValueError(f"the denoiser is text-conditional ({key}={width}): pass "
                                 "prompt_embeds=<[1 or batch_size, tokens, width] text-encoder states>")
            if negative_prompt_embeds is not None:
                raise ValueError("negative_prompt_embeds given without prompt_embeds")
            if cfg_scale != 1:
                raise ValueError("cfg_scale (classifier-free guidance) needs prompt_embeds and negative_prompt_embeds")
            return None
        cfg = getattr(self.unet, "config", None)
        if cfg is not None and width is None:
            raise ValueError(f"prompt_embeds given, but the denoiser ({type(self.unet).__name__}) takes no text "
                             "conditioning (its config has no cross_attention_dim)")
        cond = self._embeds_for_batch(prompt_embeds, "prompt_embeds", batch_size, key, width, device)
        if cfg_scale <= 1:
            if negative_prompt_embeds is not None:  # else silently unused
                raise ValueError(f"negative_prompt_embeds given with cfg_scale={cfg_scale}: classifier-free guidance "
                                 "runs where cfg_scale > 1 (as diffusers' pipelines); pass cfg_scale > 1 or drop them")
            return cond, None, cfg_scale
        if negative_prompt_embeds is None:
            raise ValueError(f"cfg_scale={cfg_scale} (classifier-free guidance) needs negative_prompt_embeds: the "
                             "text encoder's states of the negative (or empty) prompt")
        uncond = self._embeds_for_batch(negative_prompt_embeds, "negative_prompt_embeds", batch_size, key, width,
                                        device)
        if uncond.shape != cond.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} and prompt_embeds "
                             f"{tuple(prompt_embeds.shape)} must have the same tokens and width")
        return cond, uncond, cfg_scale

    def _embeds_for_batch(self, e, name: str, batch_size: int, key, width, device):
        if not isinstance(e, torch.Tensor) or e.dim() != 3 or e.shape[0] not in (1, batch_size):
            raise ValueError(f"{name} must be a [1 or batch_size={batch_size}, tokens, width] tensor, got "
                             f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
        if isinstance(width, int) and e.shape[-1] != width:
            raise ValueError(f"{name} width {e.shape[-1]} != the denoiser's {key} {width}")
        if not e.is_floating_point() or not bool(torch.isfinite(e).all()):
            raise ValueError(f"{name} must be finite floating-point states")
        return e.to(device=device, dtype=self.dtype).expand(batch_size, *e.shape[1:])

    def _denoise(self, x, t, class_labels=None, text=None):
        kw = {} if class_labels is None else {"class_labels": class_labels}
        if text is None:
            return denoiser_output(self.unet(x, t, **kw))
        cond, uncond, cfg_scale = text
        if uncond is None:
            return denoiser_output(self.unet(x, t, encoder_hidden_states=cond, **kw))
        # classifier-free guidance as diffusers' IF / Stable Diffusion pipelines: one forward of [uncond; cond],
        # the eps channels combined, a learned variance (2C channels: IF) taken from the text half
        if class_labels is not None:
            kw["class_labels"] = torch.cat([class_labels, class_labels])
        out = denoiser_output(self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond]), **kw))
        out_uncond, out_text = out.chunk(2)
        c = x.shape[1]
        eps_uncond, eps_text = out_uncond[:, :c], out_text[:, :c]
        eps = eps_uncond + cfg_scale * (eps_text - eps_uncond)
        return torch.cat([eps, out_text[:, c:]], dim=1) if out.shape[1] > c else eps

    @property
    def interrupt(self) -> bool:
        """diffusers' flag: a callback setting ``pipe._interrupt = True`` skips the remaining steps."""
        return getattr(self, "_interrupt", False)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 50, generator=None, eta: float = 0.0,
                 guidance_scale: float = 1.0, output_type: str = "pil", return_dict: bool = True,
                 latents: torch.Tensor | None = None, callback: Callable | None = None, class_labels=None,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, cfg_scale: float = 1.0):
        """Sample ``batch_size`` images. output_type: "pil" (1 or 3 channels), "np" (NHWC in [0, 1]), "pt" (NCHW
        in [0, 1]; both warn for other than 1 or 3 channels), "latent" (the final x itself, [-1, 1] for a pixel
        model; "raw" is the same). ``latents``: the
        starting noise (default randn(generator)). ``class_labels``: one int or [batch_size] labels: they
        condition a class-conditional denoiser (num_class_embeds / class_embed_type; required there) and
        replace the guide's class target (a ClassGuide / X0HatGuide) for this call.
        A text-conditional denoiser (a UNet2DConditionModel: DeepFloyd IF's stage I, a GLIDE-like model) takes
        ``prompt_embeds`` ([1 or batch_size, tokens, cross_attention_dim], the text encoder's states: this
        pipeline has no text encoder) as its encoder_hidden_states; ``cfg_scale`` > 1 adds classifier-free
        guidance against ``negative_prompt_embeds`` as diffusers' IF / Stable Diffusion pipelines do (one
        forward of both halves, eps combined, a learned variance from the text half), and the PPAP guidance
        (``guidance_scale``) corrects that combined prediction.
        After each step, as diffusers' pipelines: ``callback_on_step_end(pipe, i, t, callback_kwargs)``
        (a function or a diffusers PipelineCallback), callback_kwargs holding the tensors named in
        ``callback_on_step_end_tensor_inputs`` (default and only ["latents"]: x after the step); a dict it
        returns may replace "latents"; setting ``pipe._interrupt = True`` there skips the remaining steps (the
        images are the latents so far). The older ``callback(i, t, x)`` works too.
        ``num_inference_steps``: the scheduler's steps; ``eta``: DDIM's eta (passed to schedulers that take it).
        Returns ImagePipelineOutput(images=...) or, with ``return_dict=False``, (images,)."""
        from diffusers.utils.torch_utils import randn_tensor

        self._interrupt = False
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        # numbers.Integral: a numpy int was refused; a bool is no count
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        # 0 divides by zero in set_timesteps; a negative count gives no timesteps: the noise came back as images
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        batch_size, num_inference_steps = int(batch_size), int(num_inference_steps)
        if isinstance(generator, tuple):  # diffusers' randn_tensor takes a list only (AttributeError on a tuple)
            generator = list(generator)
        if isinstance(generator, list) and len(generator) != batch_size:  # IndexError, or extras ignored
            raise ValueError(f"{len(generator)} generators for a batch of {batch_size}: give one per sample, or one "
                             "torch.Generator for the whole batch")
        tensor_inputs = getattr(callback_on_step_end, "tensor_inputs", None)  # a diffusers PipelineCallback's
        if not isinstance(tensor_inputs, (list, tuple)):
            tensor_inputs = callback_on_step_end_tensor_inputs
        tensor_inputs = ["latents"] if tensor_inputs is None else list(tensor_inputs)
        unknown = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available: choose from "
                             f"{self._callback_tensor_inputs}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable(pipe, i, t, callback_kwargs)")
        sched, device = self.scheduler, self.device
        _check_step_takes_a_plain_sample(sched)
        guidance_scale = _finite_scale(guidance_scale, "guidance_scale")
        if self.guidance is None and guidance_scale not in (0.0, 1.0):  # unguided images came back without a word
            raise ValueError(f"guidance_scale={guidance_scale} given to a pipeline without a guide: pass guide=... "
                             "(cfg_scale is the classifier-free guidance of a text-conditional denoiser)")
        if self.guidance is not None:  # a PPAPGuidance's own scale multiplies (it was silently replaced)
            guidance_scale = guidance_scale * self.guidance.scale
        guided = self.guidance is not None and guidance_scale != 0
        if guided:  # at scale 0 it samples unguided: any scheduler the unguided pipeline runs (EDM, flow matching)
            _checked_prediction_type(sched)
            self.guidance._abar(sched, device)  # rejects schedulers it cannot guide before sampling
        shape = self._shape(batch_size)
        _check_image_channels(output_type, shape[1])
        unet_labels = self._unet_class_labels(class_labels, batch_size, device)
        text = self._text_conditioning(prompt_embeds, negative_prompt_embeds, _finite_scale(cfg_scale, "cfg_scale"),
                                       batch_size, device)
        guide_labels = None
        if class_labels is not None:
            from ppap_fast.guidance import has_class_target

            if self.guidance is None and unet_labels is None:
                raise ValueError("class_labels given to a pipeline without a guide or a class-conditional "
                                 "denoiser: pass guide=...")
            if self.guidance is not None and (unet_labels is None or has_class_target(self.guidance.guide)):
                guide_labels = self.guidance._target(class_labels, torch.empty(batch_size, 0, device=device))
        if self.guidance is not None:  # a guide target of another length failed only after the first UNet forward
            from ppap_fast.guidance import check_guide_batch

            check_guide_batch(self.guidance.guide, batch_size, class_target_given=guide_labels is not None,
                              x_dim=len(shape))
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=self.dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):  # NaN images otherwise
                raise ValueError("latents must be finite floating-point noise (they hold NaN / Inf or are not "
                                 "floating point)")
            x = latents.to(device=device, dtype=self.dtype)
        sched.set_timesteps(num_inference_steps)  # host timesteps, as diffusers' DDPM/DDIM pipelines: the
        # guide then knows each step's band without a device read (merged experts)
        # after set_timesteps: a sigma-space scheduler's first sigma depends on it; flow matching has none (1)
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        if "eta" in inspect.signature(sched.step).parameters:  # DDIM: an infinite eta made NaN images silently
            from ppap_fast.sampling import _check_eta

            _check_eta(eta)
        elif eta_value(eta) != 0:  # it was ignored without a word
            warnings.warn(f"eta={eta!r} is ignored: {type(sched).__name__}.step takes no eta (DDIM's noise level; "
                          "DDIMScheduler takes it)", UserWarning, stacklevel=3)  # past torch.no_grad's wrapper
        extra = _step_kwargs(sched, eta, generator)
        step_sched = sched
        clip_first = guided and _limits_x0(sched)
        if clip_first:  # guided-diffusion's order: clip (threshold) x0, then add the guidance (not clipped again)
            step_sched = _unlimited_copy(sched)
            step_sched.set_timesteps(num_inference_steps)
        # every step reads its sigma / step index from the scheduler that steps (the user's one does not
        # when a copy steps: its index never advances, and repeated timesteps (Heun) are ambiguous)
        takes_prev = "prev_timestep" in inspect.signature(step_sched.step).parameters
        first_bad = FirstNonFinite(device)
        try:
            for i, t in enumerate(self.progress_bar(step_sched.timesteps)):
                if self.interrupt:  # set by a callback (pipe._interrupt = True): the rest of the steps is skipped
                    continue
                inp = step_sched.scale_model_input(x, t) if hasattr(step_sched, "scale_model_input") else x
                out = self._denoise(inp, t, unet_labels, text)
                if isinstance(out, torch.Tensor) and out.ndim > 1 and out.shape[1] != x.shape[1]:
                    _check_variance_channels(step_sched, out, x)
                first_bad.see("the denoiser's output", out, i, t)
                if guided:
                    if clip_first:
                        out = self.guidance._clip_first(out, x, t, step_sched, sched)
                    out = self.guidance.correct(out, x, t, step_sched, scale=guidance_scale, target=guide_labels)
                    first_bad.see("the guided output (the guidance)", out, i, t)
                if takes_prev:  # UnCLIP: without it each step went from t to t - 1 only (noise came back)
                    extra["prev_timestep"] = step_sched.timesteps[i + 1] if i + 1 < len(step_sched.timesteps) else None
                x = step_sched.step(out, t, x, **extra).prev_sample
                first_bad.see("the scheduler's step", x, i, t)
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {k: x for k in tensor_inputs})  # "latents" only
                    new = outputs.get("latents", x) if isinstance(outputs, dict) else x
                    if not isinstance(new, torch.Tensor) or new.shape != x.shape:
                        raise ValueError(f"callback_on_step_end returned latents {getattr(new, 'shape', type(new))}, "
                                         f"expected a tensor of shape {tuple(x.shape)}")
                    x = new.to(device=x.device, dtype=x.dtype)
                if callback is not None:
                    callback(i, t, x)
        finally:  # the copy's abar table (cached by id) goes with it
            if step_sched is not sched and self.guidance is not None:
                self.guidance._forget(step_sched)
        bad = int((~torch.isfinite(x.flatten(1)).all(1)).sum())  # one host read, after the last step
        if bad:  # "pil" / "np" would show them black, with no error
            warnings.warn(f"{bad} of {x.shape[0]} images hold NaN/Inf: {first_bad.describe(len(step_sched.timesteps))} "
                          "(a half-precision UNet overflowing? a guidance_scale too large?)",
                          RuntimeWarning, stacklevel=3)  # past torch.no_grad's wrapper: the caller's line
        if output_type in ("latent", "raw"):
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    from diffusers.utils import numpy_to_pil

                    images = numpy_to_pil(images)
        if not return_dict:
            return (images,)
        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

        return ImagePipelineOutput(images=images)


def _check_image_channels(output_type: str, channels: int) -> None:
    """"pil" images of another channel count than 1 or 3 (a latent UNet's 4: the pipeline has no VAE) came back
    as RGBA / LA pictures; "np" / "pt" warn (diffusers' image processors return any channel count)."""
    if output_type in ("latent", "raw") or channels in (1, 3):
        return
    what = (f"the pipeline's x has {channels} channels, not 1 or 3 (a latent UNet? this pipeline has no VAE to "
            "decode it)")
    if output_type == "pil":
        raise ValueError(f"output_type='pil': {what}: use output_type='latent' and decode it yourself")
    warnings.warn(f"output_type={output_type!r}: {what}: it is mapped to [0, 1] and clamped as an image; "
                  "output_type='latent' returns it as it is", UserWarning, stacklevel=4)  # the caller's line


def _pipeline_class():
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise ImportError("PPAPGuidedPipeline needs diffusers (pip install diffusers); PPAPGuidance works "
                          "without it") from e
    from diffusers import SchedulerMixin, UNet2DConditionModel, UNet2DModel

    def __init__(self, unet, scheduler, guide=None, image_shape=None):
        _GuidedPipelineBody.__init__(self, unet, scheduler, guide, image_shape)

    # real types (not strings): from_pipe keeps a source pipeline's model only if its type is listed here
    __init__.__annotations__ = {"unet": Union[UNet2DModel, UNet2DConditionModel, torch.nn.Module],
                                "scheduler": SchedulerMixin, "guide": Optional[Callable],
                                "image_shape": Optional[tuple]}
    return type("PPAPGuidedPipeline", (_GuidedPipelineBody, DiffusionPipeline),
                {"__module__": __name__, "__qualname__": "PPAPGuidedPipeline", "__init__": __init__,
                 "__doc__": _GuidedPipelineBody.__doc__, "model_cpu_offload_seq": "unet"})


def __getattr__(name):
    # the DiffusionPipeline subclass is made on first use: importing this module never imports diffusers
    if name == "PPAPGuidedPipeline":
        cls = globals()["PPAPGuidedPipeline"] = _pipeline_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
