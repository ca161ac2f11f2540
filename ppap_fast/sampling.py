"""Reference guided sampling with guided-diffusion's semantics, in pure PyTorch.

The fast path with the same semantics (fused update, merged experts, CUDA graphs) is
:class:`ppap_fast.fast_sampling.FastGuidedSampler` / ``fast_sample_loop``; tests check that it
equals ``sample_loop`` here.

Conventions
-----------
* `index` is the step index of the (possibly respaced) `Schedule`; the denoiser
  and the guide receive the original timestep `schedule.timestep_map[index]`
  (rescale_timesteps=False).
* A guide is a callable `guide(x_t, t_original) -> grad`: the gradient of the
  guidance log-likelihood wrt x_t, ALREADY multiplied by the guidance scale.
  It is called under `torch.enable_grad()`; its result is detached.
  Step functions take either `guide` or a precomputed `grad` tensor.
* Model output: C channels (eps) or 2C channels (eps, v). Variance types:
  "learned_range" (guided-diffusion LEARNED_RANGE, frac=(v+1)/2 between
  log beta_t and the clipped posterior log-variance), "learned" (v is the
  log-variance), "fixed_small" (posterior variance, clipped log; the variance is 0
  at the last step, so condition_mean does not guide it) and
  "fixed_large" (betas with posterior_variance[1] at index 0). Default: learned_range
  for 2C outputs, fixed_large for C outputs (guided-diffusion's defaults).
* No host syncs inside a step on accelerators: tables are indexed by device
  tensors (`schedule.extract`), masks are tensors, and checks on tensor values
  use `torch._assert_async` there (see `nonfinite_grad`). On CPU the same checks
  raise at once (a CPU "sync" is free).

nonfinite_grad: what to do when the guide's grad holds NaN/Inf.
  "raise" (default): CPU -> RuntimeError naming `grad`; accelerator ->
      torch._assert_async (no sync; a device-side assert that fails at the next
      sync and leaves the CUDA context unusable, so use "zero" in long-running services).
  "zero": non-finite elements are set to 0 (no sync); "ignore": no check (fastest).
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from .schedule import Schedule, check_trained_schedule, extract

__all__ = [
    "StepOutput",
    "Guide",
    "VAR_TYPES",
    "split_model_output",
    "predict_xstart_from_eps",
    "predict_eps_from_xstart",
    "q_posterior_mean",
    "model_variance",
    "p_mean_variance",
    "eps_correction",
    "denoiser_output",
    "compute_guidance",
    "ddpm_step",
    "ddim_step",
    "sample_loop",
]

Guide = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VAR_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
NONFINITE_MODES = ("raise", "zero", "ignore")


class StepOutput(NamedTuple):
    """Result of one step. For DDIM, `mean` is the deterministic part and `log_variance` is None."""

    sample: torch.Tensor
    pred_xstart: torch.Tensor
    mean: torch.Tensor
    log_variance: torch.Tensor | None
    eps: torch.Tensor  # eps used for the update (guided for DDIM)
    grad: torch.Tensor | None  # guidance gradient used (scale included), None if unguided


# --------------------------------------------------------------------------- checks

class FirstNonFinite:
    """The first step at which each stage of a sampling loop (denoiser, guidance, scheduler step) produced
    NaN / Inf, kept on the device (no host sync per step) and read once, after the loop, for the warning."""

    def __init__(self, device, stages: Sequence[str] = ()):
        # stage -> step index (-1: finite so far); ``stages`` in their order within a step, so that a stage first
        # seen late (a guide that returned None at first) still wins a tie with the stages it feeds
        self.device, self.timesteps = device, {}
        self.first = {s: torch.full((), -1, dtype=torch.long, device=device) for s in stages}

    def see(self, stage: str, value: torch.Tensor, i: int, t) -> None:
        step = self.first.setdefault(stage, torch.full((), -1, dtype=torch.long, device=self.device))
        bad = ~torch.isfinite(value).all().to(step.device)
        step.copy_(torch.where((step < 0) & bad, torch.full_like(step, i), step))
        self.timesteps[i] = t

    def describe(self, n_steps: int) -> str:
        seen = [(int(step), stage) for stage, step in self.first.items()]  # one small host read per stage
        hits = [(step, stage) for step, stage in seen if step >= 0]
        if not hits:
            return "no stage's output went non-finite (a callback replaced the latents?)"
        step, stage = min(hits, key=lambda h: h[0])  # min keeps the loop's order within a step
        ts = torch.as_tensor(self.timesteps[step]).flatten().tolist()
        shown = ts[0] if len(set(ts)) == 1 else ts  # a batch at one timestep: that timestep
        return f"{stage} went non-finite first, at step {step + 1} of {n_steps} (t={shown})"


def _check_schedule(schedule) -> None:
    if not isinstance(schedule, Schedule):  # a respacing string failed with "'str' object has no attribute 'device'"
        raise TypeError(f"schedule must be a Schedule (e.g. Schedule.create('linear', 1000, 'ddim25')), got "
                        f"{type(schedule).__name__}")


def sample_shape(shape) -> tuple:
    """The shape of x_T to draw, as ints (numpy ints too): (2.5, 3) was truncated to (2, 3) silently."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape_or_x must be x_T (a tensor) or a shape [B, C, ...], "
                        f"got {type(shape).__name__}") from None
    if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"the shape of x_T must be ints [B, C, ...], got {dims!r}")
    return tuple(int(d) for d in dims)


def _check_x(x: torch.Tensor, schedule: Schedule, name: str = "x") -> None:
    _check_schedule(schedule)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [B, C, ...] with B > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.device != schedule.device:
        raise ValueError(f"{name} is on {x.device} but the schedule is on {schedule.device}; "
                         f"call schedule.to({name}.device)")


def _assert_tensor_true(cond: torch.Tensor, msg: str, exc=RuntimeError) -> None:
    """Raise at once on CPU; on accelerators enqueue a device-side assert (no host sync)."""
    if cond.device.type == "cpu":
        if not bool(cond):
            raise exc(msg)
    else:
        torch._assert_async(cond, msg)


def _index_tensor(index, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Step index as a long tensor [B] on the schedule's device, range-checked."""
    n, b = schedule.num_timesteps, x.shape[0]
    if isinstance(index, bool):
        raise TypeError("index must be an int or an integer tensor, got bool")
    if not isinstance(index, (int, torch.Tensor)):  # numpy ints -> int, other numpy values -> tensors
        from .experts.bank import as_int_or_tensor

        index = as_int_or_tensor(index, numpy_scalars_as_tensors=True)
    if isinstance(index, int):
        if not 0 <= index < n:
            raise ValueError(f"index {index} out of range [0, {n})")
        return torch.full((b,), index, dtype=torch.long, device=schedule.device)
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"index must be an int or an integer tensor, got {type(index).__name__}")
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer tensor, got {index.dtype}")
    if index.ndim == 0:
        index = index.expand(b)
    if index.shape != (b,):
        raise ValueError(f"index must be a scalar or have shape ({b},), got {tuple(index.shape)}")
    index = index.to(device=schedule.device, dtype=torch.long)
    _assert_tensor_true(((index >= 0) & (index < n)).all(), f"index out of range [0, {n})", ValueError)
    return index


def _check_model_output(out: torch.Tensor, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model_output must be a tensor, got {type(out).__name__}")
    c = x.shape[1]
    if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] not in (c, 2 * c):
        raise ValueError(f"model_output must have shape [B, {c} or {2 * c}, ...] matching x {tuple(x.shape)}, "
                         f"got {tuple(out.shape)}")
    if not out.is_floating_point():
        raise ValueError(f"model_output must be floating point, got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"model_output is on {out.device} but x is on {x.device}")


def _check_grad(grad: torch.Tensor, x: torch.Tensor, nonfinite_grad: str) -> torch.Tensor:
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a tensor, got {type(grad).__name__}")
    if grad.shape != x.shape:
        raise ValueError(f"grad must have the shape of x {tuple(x.shape)}, got {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise ValueError(f"grad must be floating point, got {grad.dtype}")
    if grad.device != x.device:
        raise ValueError(f"grad is on {grad.device} but x is on {x.device}")
    grad = grad.detach().to(x.dtype)
    if nonfinite_grad == "raise":
        _assert_tensor_true(torch.isfinite(grad).all(), "grad (guidance gradient) contains NaN or Inf "
                            "(nonfinite_grad='raise'; use 'zero' to drop such elements)")
    elif nonfinite_grad == "zero":
        grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
    return grad


def eta_value(eta) -> float | None:
    """eta as a float: a real number (not bool), or a one-element real tensor / numpy array; else None.

    Reads a tensor once (a host value normally): call it once per sampling call, never per step."""
    if isinstance(eta, torch.Tensor):
        return float(eta) if eta.numel() == 1 and not eta.is_complex() and eta.dtype != torch.bool else None
    if type(eta).__module__ == "numpy" and getattr(eta, "size", None) == 1:
        return float(eta.item()) if eta.dtype.kind in "fiu" else None  # numpy scalars and one-element arrays
    if isinstance(eta, numbers.Real) and not isinstance(eta, bool):
        return float(eta)
    return None


def _check_eta(eta) -> float:
    """eta as a float; it must be a finite number >= 0: an infinite one turned every sample into NaN without an error."""
    v = eta_value(eta)
    if v is None or not (math.isfinite(v) and v >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}")
    return v


def check_sampler_options(sampler: str, eta, var_type) -> None:
    """The sampler, and that eta / var_type belong to it (each was ignored silently by the other)."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    eta = _check_eta(eta)
    if sampler == "ddpm" and eta != 0:
        raise ValueError(f"eta={eta} is DDIM's noise level: DDPM's comes from its variance (var_type); "
                         "use the ddim sampler with eta, or eta 0")
    if sampler == "ddim" and var_type is not None:
        raise ValueError(f"var_type={var_type!r} is DDPM's variance: DDIM's noise comes from eta; use the ddpm "
                         "sampler with var_type, or no var_type")


def _check_mode(nonfinite_grad: str) -> None:
    if nonfinite_grad not in NONFINITE_MODES:
        raise ValueError(f"nonfinite_grad must be one of {NONFINITE_MODES}, got {nonfinite_grad!r}")


# --------------------------------------------------------------------------- formulas

def split_model_output(model_output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eps, v) from a C- or 2C-channel output; v is None for C channels."""
    _check_model_output(model_output, x)
    model_output = model_output.to(x.dtype)
    c = x.shape[1]
    if model_output.shape[1] == c:
        return model_output, None
    return model_output[:, :c], model_output[:, c:]


def predict_xstart_from_eps(x: torch.Tensor, idx: torch.Tensor, eps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    return extract(schedule.sqrt_recip_alphas_cumprod, idx, x) * x - extract(schedule.sqrt_recipm1_alphas_cumprod, idx, x) * eps


def predict_eps_from_xstart(x: torch.Tensor, idx: torch.Tensor, pred_xstart: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    return (extract(schedule.sqrt_recip_alphas_cumprod, idx, x) * x - pred_xstart) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, idx, x)


def q_posterior_mean(x_start: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x_0)."""
    return extract(schedule.posterior_mean_coef1, idx, x) * x_start + extract(schedule.posterior_mean_coef2, idx, x) * x


def model_variance(v: torch.Tensor | None, x: torch.Tensor, idx: torch.Tensor, schedule: Schedule,
                   var_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, log_variance) per element, broadcastable against x."""
    if var_type is None:
        var_type = "fixed_large" if v is None else "learned_range"
    if var_type not in VAR_TYPES:
        raise ValueError(f"var_type must be one of {VAR_TYPES}, got {var_type!r}")
    if var_type in ("learned_range", "learned"):
        if v is None:
            raise ValueError(f"var_type={var_type!r} needs a 2C-channel model output (eps and v)")
        if var_type == "learned":
            return torch.exp(v), v
        min_log = extract(schedule.posterior_log_variance_clipped, idx, x)
        max_log = extract(schedule.log_betas, idx, x)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        return torch.exp(log_var), log_var
    if var_type == "fixed_small":
        var_tab, log_tab = schedule.posterior_variance, schedule.posterior_log_variance_clipped
    else:  # fixed_large: betas, with posterior_variance[1] at index 0 (a better log-likelihood, as in ADM)
        var_tab = schedule.fixed_large_variance()
        log_tab = var_tab.log()
    var, log_var = extract(var_tab, idx, x), extract(log_tab, idx, x)
    return var.expand_as(x), log_var.expand_as(x)


def p_mean_variance(model_output: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, schedule: Schedule,
                    clip_denoised: bool = True, var_type: str | None = None,
                    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """guided-diffusion p_mean_variance for eps-prediction: mean, variance, log_variance, pred_xstart, eps."""
    eps, v = split_model_output(model_output, x)
    var, log_var = model_variance(v, x, idx, schedule, var_type)
    pred_xstart = _process_xstart(predict_xstart_from_eps(x, idx, eps, schedule), clip_denoised, denoised_fn)
    mean = q_posterior_mean(pred_xstart, x, idx, schedule)
    return dict(mean=mean, variance=var, log_variance=log_var, pred_xstart=pred_xstart, eps=eps)


def _process_xstart(x0: torch.Tensor, clip_denoised: bool, denoised_fn) -> torch.Tensor:
    if denoised_fn is not None:
        out = denoised_fn(x0)
        if not isinstance(out, torch.Tensor) or out.shape != x0.shape:  # [B, 1, H, W] broadcast into the mean
            raise ValueError(f"denoised_fn must return a tensor shaped like pred_xstart {tuple(x0.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        x0 = out.to(x0.dtype)
    return x0.clamp(-1, 1) if clip_denoised else x0


def eps_correction(eps: torch.Tensor, grad: torch.Tensor, alphas_cumprod_t) -> torch.Tensor:
    """Score correction for any eps-prediction sampler: eps - sqrt(1 - abar_t) * grad.

    alphas_cumprod_t: a float or a tensor broadcastable against eps (e.g. [B,1,1,1]);
    grad already includes the guidance scale.
    """
    if not isinstance(grad, torch.Tensor) or grad.shape != eps.shape:  # [C, H, W] broadcast over the batch
        raise ValueError(f"grad must have the shape of eps {tuple(eps.shape)}, got "
                         f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
    abar = torch.as_tensor(alphas_cumprod_t, dtype=eps.dtype, device=eps.device)
    if abar.ndim == 1 and eps.ndim > 1 and abar.shape[0] == eps.shape[0]:
        abar = abar.view(-1, *([1] * (eps.ndim - 1)))
    if abar.numel() != 1 and (abar.ndim != eps.ndim or torch.broadcast_shapes(abar.shape, eps.shape) != eps.shape):
        # a [T] or [B, 1] table broadcast along the image's last dims instead of the batch
        raise ValueError(f"alphas_cumprod_t must be a float, [B] or [B, 1, ...] for eps {tuple(eps.shape)}, "
                         f"got shape {tuple(abar.shape)}")
    return eps - (1 - abar).sqrt() * grad


def compute_guidance(x: torch.Tensor, idx: torch.Tensor, schedule: Schedule, guide: Guide | None = None,
                     grad: torch.Tensor | None = None, nonfinite_grad: str = "raise") -> torch.Tensor | None:
    """The guidance gradient at x (from `grad` or by calling `guide(x, timestep_map[idx])`), checked."""
    if guide is not None and grad is not None:
        raise ValueError("pass either guide or grad, not both")
    if guide is not None:
        if not callable(guide):
            raise TypeError(f"guide must be callable guide(x_t, t), got {type(guide).__name__}")
        from .guidance import guidance_is_off

        if guidance_is_off(guide):  # exactly the unguided step
            return None
        if torch.is_inference_mode_enabled():
            raise RuntimeError("guidance needs autograd (the gradient wrt x_t), which torch.inference_mode() "
                               "disables: sample under torch.no_grad() instead")
        from .guidance import raise_if_network

        with torch.enable_grad():
            try:
                grad = guide(x, schedule.timestep_map[idx])
            except TypeError as e:
                raise_if_network(guide, e)
                raise
        if isinstance(grad, torch.Tensor) and grad.shape != x.shape:
            raise_if_network(guide, None, f" (it returned {tuple(grad.shape)}, not a gradient shaped like x_t)")
    if grad is None:
        return None
    return _check_grad(grad, x, nonfinite_grad)


def denoiser_output(out):
    """A denoiser's output tensor: the tensor itself, the ``.sample`` of a diffusers output (a
    UNet2DModel's UNet2DOutput), or the first element of a tuple (``return_dict=False``); anything
    else is returned as it is (and refused by the shape checks)."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def _weight_dtypes(model) -> set:
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return {p.dtype for p in params if p.is_floating_point()}


def check_model_kwargs_mapping(model_kwargs) -> None:
    """model_kwargs=[...] failed as Python's 'argument after ** must be a mapping'."""
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict of the denoiser's keyword arguments (e.g. {{'y': labels}}), "
                        f"got {type(model_kwargs).__name__}")


def check_model_kwargs_batch(model_kwargs: Mapping[str, Any] | None, batch: int) -> None:
    """A model_kwargs tensor of another batch size failed deep inside the model, or broadcast silently
    (y of batch 1: every sample got y[0]). Shapes only."""
    check_model_kwargs_mapping(model_kwargs)
    for k, v in (model_kwargs or {}).items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != batch:
            raise ValueError(f"model_kwargs[{k!r}] has batch size {v.shape[0]} (shape {tuple(v.shape)}), but x "
                             f"has {batch} samples: give one row per sample (e.g. {k}.expand({batch}, ...))")


def call_denoiser(model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Mapping[str, Any] | None = None):
    """``model(x, t, **model_kwargs)``; a RuntimeError of a model whose weights are all of another dtype than x
    (float64 x_T into a float32 UNet) is raised again naming both dtypes and the fix."""
    check_model_kwargs_mapping(model_kwargs)
    try:
        return model(x, t, **(model_kwargs or {}))
    except RuntimeError as e:
        weights = _weight_dtypes(model)
        if isinstance(e, torch.OutOfMemoryError) or not weights or x.dtype in weights:
            raise
        names = ", ".join(sorted(str(d) for d in weights))
        raise RuntimeError(f"the denoiser failed on x_t of dtype {x.dtype}, its weights are {names}: give x_T "
                           f"in the weights' dtype (sample_loop's dtype= or x_T.to(...)) or convert the denoiser "
                           f"(it raised: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def _run_model(model, model_output, x, idx, schedule, model_kwargs):
    if model_output is None:
        if model is None:
            raise ValueError("pass a model or a precomputed model_output")
        model_output = call_denoiser(model, x, schedule.timestep_map[idx], model_kwargs)
    elif model is not None:
        raise ValueError("pass either model or model_output, not both")
    return denoiser_output(model_output)


# --------------------------------------------------------------------------- steps

def ddpm_step(model: Callable | None, x: torch.Tensor, index, schedule: Schedule, *,
              guide: Guide | None = None, grad: torch.Tensor | None = None,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              clip_denoised: bool = True, var_type: str | None = None,
              model_output: torch.Tensor | None = None, model_kwargs: Mapping[str, Any] | None = None,
              denoised_fn: Callable | None = None, nonfinite_grad: str = "raise") -> StepOutput:
    """One ancestral step (guided-diffusion p_sample) with condition_mean guidance.

    mean' = mean + variance * grad; sample = mean' + (index != 0) * exp(log_var / 2) * noise.
    `noise` defaults to randn(generator); pass it to reproduce a run. The grad is
    taken at x (x_t), as guided-diffusion does. ``var_type``: see the module docstring (None: its default).
    Args (both steps): ``model(x, t, **model_kwargs)`` the denoiser, or None with ``model_output`` (its output
    already computed at x); ``x`` x_t [B, C, H, W]; ``index`` the step index of ``schedule`` (int or long [B]);
    ``guide`` or a precomputed ``grad`` (at most one; neither: unguided); ``noise`` / ``generator``: the step's
    noise; ``clip_denoised``: clamp pred_xstart to [-1, 1] after ``denoised_fn(pred_xstart)``;
    ``nonfinite_grad``: see the module docstring.
    """
    _check_mode(nonfinite_grad)
    _check_x(x, schedule)
    idx = _index_tensor(index, x, schedule)
    out = p_mean_variance(_run_model(model, model_output, x, idx, schedule, model_kwargs), x, idx, schedule,
                          clip_denoised, var_type, denoised_fn)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape or noise.device != x.device or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating tensor like x {tuple(x.shape)} on {x.device}, "
                         f"got {tuple(noise.shape)} {noise.dtype} on {noise.device}")
    g = compute_guidance(x, idx, schedule, guide, grad, nonfinite_grad)
    mean = out["mean"] if g is None else out["mean"] + out["variance"] * g
    nonzero = (idx != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise.to(x.dtype)
    return StepOutput(sample, out["pred_xstart"], mean, out["log_variance"], out["eps"], g)


def _ddim_sigma_and_dir(schedule: Schedule, idx: torch.Tensor, eta: float, x: torch.Tensor):
    """DDIM's sigma and sqrt(1 - abar_prev - sigma^2), computed on the schedule's float64 tables and then cast
    to x's dtype: in float32, 1 - abar_prev - sigma^2 (eta near 1, few steps) cancels below rounding and can
    turn negative (NaN)."""
    abar, abar_prev = schedule.alphas_cumprod[idx], schedule.alphas_cumprod_prev[idx]
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    dir_coef = (1 - abar_prev - sigma ** 2).clamp_min(0).sqrt()
    shape = (-1,) + (1,) * (x.ndim - 1)
    return sigma.to(x.dtype).view(shape), dir_coef.to(x.dtype).view(shape)


def ddim_step(model: Callable | None, x: torch.Tensor, index, schedule: Schedule, *,
              guide: Guide | None = None, grad: torch.Tensor | None = None, eta: float = 0.0,
              noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
              clip_denoised: bool = True, model_output: torch.Tensor | None = None,
              model_kwargs: Mapping[str, Any] | None = None, denoised_fn: Callable | None = None,
              nonfinite_grad: str = "raise") -> StepOutput:
    """One DDIM step (guided-diffusion ddim_sample) with condition_score guidance.

    eps is re-derived from the (clipped) pred_xstart; guided: eps' = eps - sqrt(1-abar)*grad
    and pred_xstart' = predicted from eps' without re-clipping. Then
    sample = pred_xstart' sqrt(abar_prev) + sqrt(1 - abar_prev - sigma^2) eps + (index != 0) sigma noise,
    sigma = eta sqrt((1-abar_prev)/(1-abar)) sqrt(1 - abar/abar_prev). With eta=0 no noise is drawn.
    The variance channels of the model output (if any) are not used. Arguments as :func:`ddpm_step`
    (model, x, index, schedule, guide, grad, noise, generator, clip_denoised, model_output, model_kwargs,
    denoised_fn, nonfinite_grad).
    """
    _check_mode(nonfinite_grad)
    eta = _check_eta(eta)
    _check_x(x, schedule)
    idx = _index_tensor(index, x, schedule)
    eps_model, _ = split_model_output(_run_model(model, model_output, x, idx, schedule, model_kwargs), x)
    pred_xstart = _process_xstart(predict_xstart_from_eps(x, idx, eps_model, schedule), clip_denoised, denoised_fn)
    abar = extract(schedule.alphas_cumprod, idx, x)
    abar_prev = extract(schedule.alphas_cumprod_prev, idx, x)
    g = compute_guidance(x, idx, schedule, guide, grad, nonfinite_grad)
    if g is not None:  # condition_score
        eps_g = eps_correction(predict_eps_from_xstart(x, idx, pred_xstart, schedule), g, abar)
        pred_xstart = predict_xstart_from_eps(x, idx, eps_g, schedule)
    eps = predict_eps_from_xstart(x, idx, pred_xstart, schedule)
    mean = pred_xstart * abar_prev.sqrt()
    if eta == 0:
        mean = mean + (1 - abar_prev).sqrt() * eps
        return StepOutput(mean, pred_xstart, mean, None, eps, g)
    sigma, dir_coef = _ddim_sigma_and_dir(schedule, idx, eta, x)
    mean = mean + dir_coef * eps
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif noise.shape != x.shape or noise.device != x.device or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating tensor like x {tuple(x.shape)} on {x.device}, "
                         f"got {tuple(noise.shape)} {noise.dtype} on {noise.device}")
    nonzero = (idx != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return StepOutput(mean + nonzero * sigma * noise.to(x.dtype), pred_xstart, mean, None, eps, g)


# --------------------------------------------------------------------------- loop

def initial_noise(shape_or_x, generator, device, dtype: torch.dtype | None) -> torch.Tensor:
    """x_T: the tensor given, or randn(shape) in ``dtype`` (float32 by default)."""
    if isinstance(shape_or_x, torch.Tensor):
        if dtype is not None and dtype != shape_or_x.dtype:  # it was ignored silently
            raise ValueError(f"dtype={dtype} is for a drawn x_T, but x_T was given in {shape_or_x.dtype}: "
                             f"pass x_T.to({dtype}) or leave dtype out")
        return shape_or_x
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):  # randn's error
        raise ValueError(f"dtype must be a floating torch.dtype for x_T (e.g. torch.float32), got {dtype!r}")
    return torch.randn(sample_shape(shape_or_x), generator=generator, device=device, dtype=dtype or torch.float32)


def sample_loop(model: Callable, shape_or_x: Sequence[int] | torch.Tensor, schedule: Schedule, *,
                sampler: str = "ddim", guide: Guide | None = None, eta: float = 0.0,
                clip_denoised: bool = True, var_type: str | None = None,
                noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                generator: torch.Generator | None = None, progress: bool = False,
                return_trajectory: bool = False, model_kwargs: Mapping[str, Any] | None = None,
                denoised_fn: Callable | None = None, nonfinite_grad: str = "raise",
                dtype: torch.dtype | None = None, callback: Callable[[int, StepOutput], None] | None = None):
    """Run all steps N-1..0 from x_T (given, or drawn with `generator` for a shape).

    sampler: "ddim" (eta, condition_score) or "ddpm" (ancestral, condition_mean).
    noise_fn(index, x) -> per-step noise (DDPM, or DDIM with eta > 0); default randn(generator).
    The model runs under torch.no_grad() (the guide re-enables grad for itself).
    Returns the final sample, or (final, trajectory [N, *x.shape]) with return_trajectory
    (entry k is the sample after the step at index N-1-k). Final samples holding NaN / Inf raise a
    RuntimeWarning naming the stage (guidance gradient, eps, step) and the step that went non-finite first.
    ``shape_or_x``: x_T, or the shape of one drawn in ``dtype`` (default float32) on ``schedule``'s device.
    ``clip_denoised``, ``var_type``, ``model_kwargs``, ``denoised_fn``, ``nonfinite_grad``: as :func:`ddpm_step`.
    ``progress``: a tqdm bar. ``callback(index, StepOutput)`` is called after each step.
    """
    check_sampler_options(sampler, eta, var_type)
    _check_schedule(schedule)
    check_trained_schedule(model, schedule)
    x = initial_noise(shape_or_x, generator, schedule.device, dtype)
    _check_x(x, schedule, "x_T")
    if isinstance(shape_or_x, torch.Tensor) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"x_T has {int((~torch.isfinite(x)).sum())} non-finite values")
    if guide is not None:
        from .fast_sampling import check_guide_timesteps
        from .guidance import check_guide_batch, guidance_is_off

        check_guide_timesteps(guide, schedule.original_num_timesteps, schedule)
        check_guide_batch(guide, x.shape[0], x_dim=x.dim())
    check_model_kwargs_batch(model_kwargs, x.shape[0])
    steps = range(schedule.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"{sampler} sampling")
    traj = []
    needs_noise = sampler == "ddpm" or eta > 0
    first_bad = FirstNonFinite(x.device, ("the guidance gradient", "the denoiser's output (eps)", "the step's sample"))
    guided_steps = 0
    with torch.no_grad():
        for i in steps:
            noise = noise_fn(i, x) if (noise_fn is not None and needs_noise) else None
            common = dict(guide=guide, noise=noise, generator=generator, clip_denoised=clip_denoised,
                          model_kwargs=model_kwargs, denoised_fn=denoised_fn, nonfinite_grad=nonfinite_grad)
            if sampler == "ddim":
                out = ddim_step(model, x, i, schedule, eta=eta, **common)
            else:
                out = ddpm_step(model, x, i, schedule, var_type=var_type, **common)
            x = out.sample
            k, t = schedule.num_timesteps - 1 - i, schedule.timestep_map[i]  # k-th step, original t
            if out.grad is not None:
                guided_steps += 1
                first_bad.see("the guidance gradient", out.grad, k, t)
            first_bad.see("the denoiser's output (eps)", out.eps, k, t)
            first_bad.see("the step's sample", x, k, t)
            if callback is not None:
                callback(i, out)
            if return_trajectory:
                traj.append(x)
    # None means "no gradient at this step": at every step, unguided (asked for, with a guide of scale 0)
    if guide is not None and not guided_steps and not guidance_is_off(guide):
        warnings.warn(f"sample_loop: the guide returned no gradient (None) at all {schedule.num_timesteps} steps: "
                      "the samples are unguided", RuntimeWarning, stacklevel=2)
    bad = int((~torch.isfinite(x.flatten(1)).all(1)).sum())  # one host read, after the last step
    if bad:
        warnings.warn(f"sample_loop: {bad} of {x.shape[0]} samples hold NaN/Inf: "
                      f"{first_bad.describe(schedule.num_timesteps)} (a half-precision model overflowing? a "
                      "guidance scale too large?)", RuntimeWarning, stacklevel=2)
    return (x, torch.stack(traj)) if return_trajectory else x
