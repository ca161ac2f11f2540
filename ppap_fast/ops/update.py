"""Fused guided reverse update: x_t, eps, (v), grad, noise -> x_{t-1}, pred_x0 in one pass.

Semantics are guided-diffusion's (see ppap_fast.sampling): DDIM with
`condition_score` (eps re-derived from the clipped x0-hat, eps' = eps -
sqrt(1-abar) grad, x0-hat re-predicted from eps' without re-clipping) and DDPM
with `condition_mean` (mean + Sigma grad) for fixed or learned-range variance.
All per-step scalars come from one float32 table indexed on the device by the
per-sample step index, so a whole batch may mix timesteps and nothing syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ppap_fast.ops import _ext, _registry
from ppap_fast.ops._kernel_util import on_device
from ppap_fast.schedule import Schedule

OP = "guided_update"
MODES = {"ddim": 0, "ddpm_fixed": 1, "ddpm_learned": 2}
COLS = 8


@dataclass(frozen=True)
class UpdateTable:
    """Per-step coefficients for one sampler on one schedule (made by build_table).

    coefs: float64 [T, 8], what the reference reads; mode: the sampler (MODES); coefs_f32: the same in
    float32, what the kernels read (None: made from coefs)."""

    coefs: torch.Tensor  # (T, 8) float64, what the reference uses
    mode: int
    coefs_f32: torch.Tensor | None = None  # the same, float32, what the kernels read

    def __post_init__(self):
        if self.coefs.ndim != 2 or self.coefs.shape[1] != COLS:
            raise ValueError(f"coefs must have shape (T, {COLS}), got {tuple(self.coefs.shape)}")
        if self.coefs_f32 is None:
            object.__setattr__(self, "coefs_f32", self.coefs.float().contiguous())

    def to(self, device) -> "UpdateTable":
        """This table's coefficients on device."""
        return UpdateTable(self.coefs.to(device), self.mode, self.coefs_f32.to(device))


def build_table(schedule: Schedule, sampler: str = "ddim", eta: float = 0.0,
                var_type: str = "learned_range") -> UpdateTable:
    """Coefficient table of schedule's steps for `sampler` in {"ddim", "ddpm"}; eta: DDIM's noise
    (0: deterministic); var_type for DDPM: "learned_range" (model gives v), "fixed_small" or "fixed_large"."""
    s = schedule.to("cpu")
    n = s.num_timesteps
    c = torch.zeros(n, COLS, dtype=torch.float64)
    c[:, 0] = s.sqrt_recip_alphas_cumprod
    c[:, 1] = s.sqrt_recipm1_alphas_cumprod
    nonzero = (torch.arange(n) != 0).double()
    if sampler == "ddim":
        from ..sampling import _check_eta

        eta = _check_eta(eta)
        acp, prev = s.alphas_cumprod, s.alphas_cumprod_prev
        sigma = eta * ((1 - prev) / (1 - acp)).sqrt() * (1 - acp / prev).sqrt()
        c[:, 2] = s.sqrt_one_minus_alphas_cumprod
        c[:, 3] = prev.sqrt()
        c[:, 4] = (1 - prev - sigma**2).clamp_min(0).sqrt()
        c[:, 5] = sigma * nonzero
        mode = MODES["ddim"]
    elif sampler == "ddpm":
        c[:, 2] = s.posterior_mean_coef1
        c[:, 3] = s.posterior_mean_coef2
        c[:, 6] = nonzero
        if var_type == "learned_range":
            c[:, 4] = s.log_betas
            c[:, 5] = s.posterior_log_variance_clipped
            mode = MODES["ddpm_learned"]
        elif var_type == "fixed_small":
            # log of the UNclipped posterior variance: condition_mean's grad variance is 0 at index 0 (log -inf,
            # exp -> 0, as the reference); elsewhere it equals the clipped log-variance (index 0 draws no noise)
            c[:, 4] = s.posterior_variance.log()
            mode = MODES["ddpm_fixed"]
        elif var_type == "fixed_large":
            c[:, 4] = s.fixed_large_variance().log()
            mode = MODES["ddpm_fixed"]
        else:
            raise ValueError(f"unknown var_type {var_type!r}: expected learned_range, fixed_small or fixed_large")
    else:
        raise ValueError(f"unknown sampler {sampler!r}: expected 'ddim' or 'ddpm'")
    return UpdateTable(c, mode).to(schedule.device)


def _check(x, eps, v, grad, noise, idx, table, check_range=True):
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not x.is_floating_point():
        raise ValueError("x must be a floating tensor with a batch dimension")
    for name, t in (("eps", eps), ("v", v), ("grad", grad), ("noise", noise)):
        if t is None:
            continue
        if t.shape != x.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match x {tuple(x.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got {t.dtype}, {t.device}")
    if table.mode == MODES["ddpm_learned"] and v is None:
        raise ValueError("learned-range DDPM needs v (the model's variance channels)")
    if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.shape[0] != x.shape[0] \
            or idx.dtype not in (torch.int64, torch.int32) or idx.device != x.device:  # a list: AttributeError
        got = (f"{idx.dtype} {tuple(idx.shape)} on {idx.device}" if isinstance(idx, torch.Tensor)
               else type(idx).__name__)
        raise ValueError(f"idx must be an int64 or int32 tensor of shape ({x.shape[0]},) on {x.device}, got {got}")
    if table.coefs.device != x.device:
        raise ValueError(f"table is on {table.coefs.device}, x on {x.device}: call table.to(device)")
    # step range: a host sync, so CPU only (the CUDA and Triton kernels clamp; the reference would wrap -1);
    # not while compiling (data-dependent: a graph break; the cpp kernel checks idx itself)
    if check_range and idx.device.type == "cpu" and idx.numel() and not torch.compiler.is_compiling():
        lo, hi, T = int(idx.min()), int(idx.max()), table.coefs.shape[0]
        if lo < 0 or hi >= T:
            raise ValueError(f"idx values must lie in [0, {T}) (the table's steps), got range [{lo}, {hi}]")


def guided_update_reference(x, eps, idx, table, v=None, grad=None, noise=None, clip_denoised=True):
    """Pure-PyTorch guided_update (same x, eps, idx, table, v, grad, noise, clip_denoised); math in x's
    dtype, float32 for half types."""
    out_dtype = x.dtype
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    shape = (-1,) + (1,) * (x.ndim - 1)
    c = table.coefs[idx].to(work)
    col = [c[:, k].view(shape) for k in range(COLS)]
    x, eps = x.to(work), eps.to(work)
    pred = col[0] * x - col[1] * eps
    if clip_denoised:
        pred = pred.clamp(-1, 1)
    if table.mode == MODES["ddim"]:
        e = (col[0] * x - pred) / col[1]
        if grad is not None:
            e = e - col[2] * grad.to(work)
            pred = col[0] * x - col[1] * e
        sample = pred * col[3] + col[4] * e
        if noise is not None:
            sample = sample + col[5] * noise.to(work)
    else:
        mean = col[2] * pred + col[3] * x
        if table.mode == MODES["ddpm_learned"]:
            frac = (v.to(work) + 1) / 2
            log_var = frac * col[4] + (1 - frac) * col[5]
        else:
            log_var = col[4].expand_as(x)
        if grad is not None:
            mean = mean + log_var.exp() * grad.to(work)
        sample = mean if noise is None else mean + col[6] * (0.5 * log_var).exp() * noise.to(work)
    return sample.to(out_dtype), pred.to(out_dtype)


def _per_sample_contiguous(t):
    if t is None or t.shape[0] == 0 or t[0].is_contiguous():
        return t
    return t.contiguous()


def _native(x, eps, idx, table, v=None, grad=None, noise=None, clip_denoised=True):
    x = x.contiguous()
    eps, v, grad, noise = (_per_sample_contiguous(t) for t in (eps, v, grad, noise))
    idx = idx.long()  # the C++ / CUDA op reads int64 (the reference and Triton read int32 as it is)
    return torch.ops.ppap_fast.guided_update(x, eps, v, grad, noise, idx, table.coefs if x.dtype == torch.float64 else table.coefs_f32,
                                             table.mode, clip_denoised)


def guided_update(x, eps, idx, table: UpdateTable, v=None, grad=None, noise=None,
                  clip_denoised: bool = True, backend: str | None = None, check_range: bool = True):
    """One guided reverse step of x [B, ...] for each sample at its own step index idx[b] of table.

    eps: the predicted noise; v: the learned-variance output (DDPM "learned_range"); eps and v may be channel
    slices of the model output (contiguous per sample). grad: the guidance gradient (None: unguided);
    noise: the step's noise (None: none); clip_denoised clamps pred_xstart to [-1, 1].
    Returns (x_prev, pred_xstart). backend: None/"auto", "cuda", "cpp", "triton", "reference";
    the kernels are forward-only: with an input that requires grad under autograd the automatic
    choice is the reference (a kernel asked for then raises).
    ``check_range=False`` skips the CPU range check of idx (a host read; for callers that built idx
    from the table themselves, as the fast sampler).
    """
    _check(x, eps, v, grad, noise, idx, table, check_range)
    idx = idx.contiguous()  # the cpp / cuda / triton kernels read idx[b] at idx's data pointer + b
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, eps, v, grad, noise)):
        # the kernels' outputs would keep no graph to the inputs (no gradient, silently)
        fn = _registry.select_gated(OP, x, backend, (x.dtype,), "is forward-only (an input requires grad)")
        return fn(x, eps, idx, table, v=v, grad=grad, noise=noise, clip_denoised=clip_denoised)
    if backend in (None, "auto") and x.is_cuda and _registry.forced() is None:
        pick = auto_cuda_backend(x.dtype, x.numel())
        if _registry.why_unavailable(OP, pick, x.device) is None:
            backend = pick
    fn = _registry.select(OP, x.device, backend)
    return fn(x, eps, idx, table, v=v, grad=grad, noise=noise, clip_denoised=clip_denoised)


# H100 (benchmarks/NOTES.md, bench_update, 12 rows): the CUDA kernel was faster only for fp16/bf16 at
# batch 32 x 3 x 256^2 (6.3M elements: 0.037-0.048 vs 0.048-0.077 ms); Triton for fp32 at batch 32
# and 256 and for bf16 at batch 256 (50M: 0.20-0.23 vs 0.27-0.35 ms, 0.83-1.0 of HBM vs 0.63-0.73).
CUDA_HALF_MAX_NUMEL = 1 << 24


def auto_cuda_backend(dtype: torch.dtype, numel: int) -> str:
    """The automatic choice on CUDA: the measured-faster kernel for this dtype and size."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "cuda"  # float64: the Triton kernel computes in float32
    half = dtype != torch.float32
    return "cuda" if half and numel <= CUDA_HALF_MAX_NUMEL else "triton"


def _triton(x, *args, **kwargs):
    from ppap_fast.ops.update_triton import guided_update_triton

    with on_device(x):  # Triton launches on the current device: make it x's
        return guided_update_triton(x, *args, **kwargs)


_registry.register(OP, "reference", guided_update_reference, _ext.reference_unavailable)
_registry.register(OP, "cpp", _native, _ext.cpp_unavailable)
_registry.register(OP, "cuda", _native, _ext.cuda_unavailable)
_registry.register(OP, "triton", _triton, _ext.triton_unavailable)
