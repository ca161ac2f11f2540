"""Guides: one contract, ``guide(x_t, t) -> grad`` of the guidance objective wrt x_t.

* ``x_t``: the noisy sample [B, C, H, W] (diffusion range [-1, 1]);
* ``t``: ORIGINAL timesteps, long [B] (or an int); an ExpertBank routes each sample by it;
* the result is ``scale * d/dx_t sum_b objective_b`` (the scale is already applied), detached,
  same shape and dtype as x_t. ``guide(x_t, t)`` is what ``ppap_fast.sampling`` calls;
  :func:`as_cond_fn` adapts a guide to guided-diffusion's ``cond_fn(x, t, y=None, **kw)``.

The gradient is taken with ``torch.autograd.grad`` on a fresh leaf ``x_t.detach().requires_grad_()``
(the guide's own parameters get no ``.grad``). No host synchronisation happens apart from the
optional finite check.

``nonfinite`` (every guide):
  "raise" (default): a NaN/Inf in the gradient raises RuntimeError naming the guide (this reads
      one bool on the host: a sync on accelerators, so not for CUDA-graph capture);
  "zero": the gradient of a sample that holds any NaN/Inf is replaced by zeros (no sync);
  "ignore": no check.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NONFINITE_MODES = ("raise", "zero", "ignore")


# ----------------------------------------------------------------------------- input transform
class InputTransform(nn.Module):
    """Differentiable map from the diffusion range [-1, 1] to a model's input.

    ``(x + 1) / 2`` -> optional bilinear resize to ``size`` -> optional ``(x - mean) / std``.
    With ``mean=std=None`` the [0, 1] image is returned (after resizing).
    """

    def __init__(self, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 size: int | tuple | None = None, antialias: bool | str = False):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
        if antialias not in (True, False, "auto"):
            raise ValueError(f"antialias must be True, False or 'auto', got {antialias!r}")
        self.antialias = antialias  # "auto": only when a side shrinks 2x or more (below that bilinear reads
        # every input pixel; from 2x on, without antialiasing, whole rows and columns get no gradient)
        if mean is not None:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1), persistent=False)
        else:
            self.mean = self.std = None

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"InputTransform expects images [B, C, H, W], got shape {tuple(x.shape)}")
        y = (x + 1) * 0.5
        if self.size is not None and tuple(y.shape[-2:]) != self.size:
            aa = self.antialias if self.antialias != "auto" else any(
                s >= 2 * o for s, o in zip(y.shape[-2:], self.size))
            y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False, antialias=aa)
        if self.mean is not None:
            if self.mean.shape[1] != y.shape[1]:
                raise ValueError(f"InputTransform has {self.mean.shape[1]} channel statistics, input has "
                                 f"{y.shape[1]} channels")
            y = (y - self.mean.to(y.device, y.dtype)) / self.std.to(y.device, y.dtype)
        return y


def input_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=None, antialias: bool | str = False) -> InputTransform:
    """[-1, 1] -> model normalisation (mean/std, ImageNet by default) and resolution (bilinear)."""
    return InputTransform(mean, std, size, antialias)


# ----------------------------------------------------------------------------- helpers
def _primary(out):
    """A model's main output: ``out['out']`` for dict outputs (torchvision segmentation), ``out[0]`` for tuples."""
    if isinstance(out, dict):
        if "out" not in out:
            raise ValueError(f"model returned a dict without an 'out' entry (keys {sorted(out)})")
        return out["out"]
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _to_model_dtype(model, h):
    """Cast the network input to the dtype of the network's floating parameters (a bf16/fp16 guide network
    with the sampler's float32 x_t); the cast is differentiable, so the gradient comes back in x_t's dtype."""
    if isinstance(model, nn.Module) and isinstance(h, torch.Tensor):
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        if p is not None and h.dtype != p.dtype:
            return h.to(p.dtype)
    return h


def _is_bank(model) -> bool:
    from ppap_fast.experts import ExpertBank

    return isinstance(model, ExpertBank)


def _check_scale(scale):
    if isinstance(scale, torch.Tensor):
        if scale.dim() > 1 or scale.is_complex():
            raise ValueError(f"scale must be a number or a [B] tensor, got shape {tuple(scale.shape)}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


class Guide:
    """Base class: subclasses implement ``objective(x, t) -> [B]`` (per-sample, unscaled)."""

    name = "guide"

    def __init__(self, scale=1.0, nonfinite: str = "raise"):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        self.scale = _check_scale(scale)
        self.nonfinite = nonfinite

    # -- input checks (shapes and dtypes only: no host syncs)
    def _check_inputs(self, x, t):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{self.name}: x_t must be a floating tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 2:
            raise ValueError(f"{self.name}: x_t must be batched [B, ...], got shape {tuple(x.shape)}")
        B = x.shape[0]
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise ValueError(f"{self.name}: t must be an int or an integer tensor [B], got {type(t).__name__}")
        if isinstance(t, int):
            t = torch.full((B,), t, dtype=torch.long, device=x.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{self.name}: t must hold integer original timesteps, got dtype {t.dtype}")
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"{self.name}: t must have shape [{B}], got {tuple(t.shape)}")
        return x, t.to(x.device)

    def objective(self, x, t) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scaled_sum(self, per_sample):
        if per_sample.dim() != 1:
            raise RuntimeError(f"{self.name}: objective must be per-sample [B], got {tuple(per_sample.shape)}")
        s = self.scale
        if isinstance(s, torch.Tensor):
            s = s.to(per_sample.device, per_sample.dtype)
        return (per_sample * s).sum()

    def _finite(self, g):
        return check_finite(g, self.nonfinite, self.name)

    def _warn_train_mode(self):
        """A guide network with BatchNorm / Dropout in train mode: batch statistics (a sample's gradient depends on
        the rest of the batch) and running statistics overwritten by every guided step. Warned once."""
        if getattr(self, "_train_warned", False):
            return
        model = getattr(self, "model", None) or getattr(self, "classifier", None)
        if isinstance(model, nn.Module) and any(
                m.training for m in model.modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout)) or type(m).__name__ == "ExpertBatchNorm"):
            import warnings

            warnings.warn(f"{self.name}: the guide's model is in train mode (BatchNorm uses batch statistics and "
                          "sampling overwrites its running statistics); call model.eval() before sampling",
                          RuntimeWarning, stacklevel=3)
            self._train_warned = True

    def __call__(self, x_t, t, **kw):
        return self._finite(self._grad(x_t, t, **kw))

    def _grad(self, x_t, t, **kw):
        """The scaled gradient before the non-finite policy."""
        x_t, t = self._check_inputs(x_t, t)
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.name}: guidance needs autograd (the gradient wrt x_t), which "
                               "torch.inference_mode() disables: sample under torch.no_grad() instead")
        self._warn_train_mode()
        x = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            obj = self._scaled_sum(self.objective(x, t, **kw))
            (g,) = torch.autograd.grad(obj, x, allow_unused=True)
        if g is None:
            g = torch.zeros_like(x)
        return g.detach()


def check_finite(g: torch.Tensor, mode: str, name: str) -> torch.Tensor:
    """Apply the non-finite policy: "ignore", "zero" (drop the bad samples' guidance) or "raise"."""
    if mode == "ignore":
        return g
    if mode == "zero":
        ok = torch.isfinite(g).flatten(1).all(1).view(-1, *([1] * (g.dim() - 1)))
        return torch.where(ok, g, torch.zeros_like(g))
    msg = f"{name}: the guidance gradient holds NaN/Inf (nonfinite='raise'; use 'zero' to drop such samples' guidance)"
    if g.device.type != "cpu":  # no host sync: a device-side assert (fatal to the CUDA context)
        torch._assert_async(torch.isfinite(g).all(), msg)
    elif not bool(torch.isfinite(g).all()):
        raise RuntimeError(msg)
    return g


class _ClassTarget:
    """Target class ids (int or long [B]) checked against the number of classes once."""

    def __init__(self, target, num_classes, name):
        self.name = name
        if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)):
            raise ValueError(f"{name}: target must be an int or a long tensor [B], got {type(target).__name__}")
        if isinstance(target, torch.Tensor):
            if target.is_floating_point() or target.dtype == torch.bool or target.dim() > 1:
                raise ValueError(f"{name}: target must be an integer tensor [B], got {target.dtype} "
                                 f"{tuple(target.shape)}")
            lo, hi = (int(target.min()), int(target.max())) if target.numel() else (0, 0)
        else:
            lo = hi = target
        self.target, self.lo, self.hi = target, lo, hi
        self.checked = False
        if lo < 0:
            raise ValueError(f"{name}: target {lo} is negative")
        if num_classes is not None:
            self._check(num_classes)

    def _check(self, k):
        if self.hi >= k:
            raise ValueError(f"{self.name}: target class {self.hi} is out of range for a model with {k} classes")
        self.checked = True

    def select(self, logits, override=None):
        if logits.dim() != 2:
            raise ValueError(f"{self.name}: classifier output must be logits [B, K], got {tuple(logits.shape)}")
        tgt = self.target if override is None else _ClassTarget(override, logits.shape[1], self.name).target
        if override is None and not self.checked:
            self._check(logits.shape[1])
        B = logits.shape[0]
        if isinstance(tgt, int):
            idx = torch.full((B, 1), tgt, dtype=torch.long, device=logits.device)
        else:
            tgt = tgt.to(logits.device, torch.long)
            if tgt.dim() == 0:
                tgt = tgt.expand(B)
            if tgt.shape != (B,):
                raise ValueError(f"{self.name}: target has shape {tuple(tgt.shape)}, batch is {B}")
            idx = tgt.view(B, 1)
        return F.log_softmax(logits, dim=-1).gather(1, idx).squeeze(1)


def _num_classes(model, given):
    if given is not None:
        return int(given)
    k = getattr(model, "num_classes", None)
    return int(k) if isinstance(k, int) else None


# ----------------------------------------------------------------------------- guides
class ClassGuide(Guide):
    """``scale * grad_x sum_b log_softmax(model(T(x_t)))[b, target_b]``.

    ``model``: an ExpertBank (called as ``model(x, t)``: PPAP) or a plain classifier (the naive
    off-the-shelf baseline: ``t`` is ignored). ``pass_t`` overrides that choice.
    ``target``: an int or long [B]. Out-of-range targets raise ValueError at construction when
    the class count is known (``num_classes=`` or ``model.num_classes``), else at the first call.
    ``input_transform``: e.g. :func:`input_transform` (the official PPAP experts take raw x_t: None).
    """

    name = "ClassGuide"

    def __init__(self, model, target, scale=1.0, input_transform: Callable | None = None,
                 pass_t: bool | None = None, num_classes: int | None = None, nonfinite: str = "raise"):
        super().__init__(scale, nonfinite)
        if not callable(model):
            raise ValueError(f"{self.name}: model must be callable")
        self.model = model
        self.pass_t = _is_bank(model) if pass_t is None else bool(pass_t)
        self.transform = input_transform
        inner = model.model if _is_bank(model) else model
        self.target = _ClassTarget(target, _num_classes(model, num_classes) or _num_classes(inner, None), self.name)

    def logits(self, x, t):
        h = _to_model_dtype(self.model, self.transform(x) if self.transform is not None else x)
        return _primary(self.model(h, t) if self.pass_t else self.model(h))

    def objective(self, x, t, target=None):
        return self.target.select(self.logits(x, t), target)


class X0HatGuide(Guide):
    """The "gradients on x0-hat" baseline: the clean classifier on the predicted clean image.

    ``x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)`` with ``abar`` the BASE
    schedule's alphas_cumprod (length T, indexed by the original t); the result is
    ``scale * grad_{x_t} sum_b log p(target_b | x0_hat_b)``, back-propagated through the denoiser
    (``through_denoiser=True``, the exact gradient; one extra UNet backward) or with eps
    detached (``False``: cheap, grad = scale * grad_{x0hat} / sqrt(abar)). A denoiser output
    with 2C channels (eps, v) is split and eps used.
    """

    name = "X0HatGuide"

    def __init__(self, classifier, denoiser, alphas_cumprod, target, scale=1.0, through_denoiser: bool = True,
                 input_transform: Callable | None = None, num_classes: int | None = None,
                 denoiser_kwargs: dict | None = None, nonfinite: str = "raise"):
        super().__init__(scale, nonfinite)
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if acp.dim() != 1 or acp.numel() == 0 or not torch.isfinite(acp).all() or (acp <= 0).any() or (acp > 1).any():
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1]")
        self.acp = acp
        self._acp_cache = {}
        self.classifier, self.denoiser = classifier, denoiser
        self.through_denoiser = through_denoiser
        self.transform = input_transform
        self.denoiser_kwargs = dict(denoiser_kwargs or {})
        self.target = _ClassTarget(target, _num_classes(classifier, num_classes), self.name)

    def _table(self, device, dtype):
        key = (device, dtype)
        if key not in self._acp_cache:
            self._acp_cache[key] = self.acp.to(device=device, dtype=dtype)
        return self._acp_cache[key]

    def x0_hat(self, x, t):
        if t.device.type == "cpu" and t.numel() and bool(((t < 0) | (t >= self.acp.numel())).any()):
            raise ValueError(f"{self.name}: t out of range [0, {self.acp.numel()})")
        if self.through_denoiser:
            eps = _primary(self.denoiser(x, t, **self.denoiser_kwargs))
        else:
            with torch.no_grad():
                eps = _primary(self.denoiser(x.detach(), t, **self.denoiser_kwargs))
        C = x.shape[1]
        if eps.shape[1] == 2 * C:
            eps = eps[:, :C]
        if eps.shape != x.shape:
            raise ValueError(f"{self.name}: denoiser output {tuple(eps.shape)} does not match x_t {tuple(x.shape)} "
                             "(expected eps with C or 2C channels)")
        ab = self._table(x.device, x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))
        return (x - (1 - ab).sqrt() * eps) / ab.sqrt()

    def objective(self, x, t, target=None):
        x0 = self.x0_hat(x, t)
        h = _to_model_dtype(self.classifier, self.transform(x0) if self.transform is not None else x0)
        return self.target.select(_primary(self.classifier(h)), target)


class _DenseGuide(Guide):
    def __init__(self, model, target_map, scale, input_transform, pass_t, nonfinite):
        super().__init__(scale, nonfinite)
        if not isinstance(target_map, torch.Tensor):
            raise ValueError(f"{self.name}: target must be a tensor, got {type(target_map).__name__}")
        self.model, self.target_map, self.transform = model, target_map, input_transform
        self.pass_t = _is_bank(model) if pass_t is None else bool(pass_t)

    def output(self, x, t):
        h = _to_model_dtype(self.model, self.transform(x) if self.transform is not None else x)
        return _primary(self.model(h, t) if self.pass_t else self.model(h))


class DenseRegressionGuide(_DenseGuide):
    """Depth-style guidance: ``scale * grad_x sum_b -mean_pixels (model(x)_b - target_b)^2``.

    ``target`` has the model output's shape [B, ...] or that shape without the batch dim
    (shared by all samples); any other shape is a ValueError naming both shapes.
    """

    name = "DenseRegressionGuide"

    def __init__(self, model, target, scale=1.0, input_transform=None, pass_t=None, nonfinite="raise"):
        super().__init__(model, target, scale, input_transform, pass_t, nonfinite)
        if not self.target_map.is_floating_point():
            raise ValueError(f"{self.name}: target map must be floating, got {self.target_map.dtype}")

    def objective(self, x, t):
        out = self.output(x, t)
        tgt = self.target_map.to(out.device, out.dtype)
        if tuple(tgt.shape) == tuple(out.shape[1:]):
            tgt = tgt.unsqueeze(0).expand_as(out)
        if tgt.shape != out.shape:
            raise ValueError(f"{self.name}: model output shape {tuple(out.shape)} does not match the target "
                             f"shape {tuple(self.target_map.shape)}")
        return -((out - tgt) ** 2).flatten(1).mean(1)


DepthGuide = DenseRegressionGuide


class SegmentationGuide(_DenseGuide):
    """``scale * grad_x sum_b -mean_valid_pixels CE(model(x)_b, labels_b)``; ``ignore_index`` pixels
    do not count. ``labels``: long [B, H, W] or [H, W] matching the logits [B, K, H, W]."""

    name = "SegmentationGuide"

    def __init__(self, model, target, scale=1.0, input_transform=None, pass_t=None, ignore_index: int = -100,
                 num_classes: int | None = None, nonfinite="raise"):
        super().__init__(model, target, scale, input_transform, pass_t, nonfinite)
        if self.target_map.is_floating_point() or self.target_map.dtype == torch.bool:
            raise ValueError(f"{self.name}: target labels must be an integer tensor, got {self.target_map.dtype}")
        self.ignore_index = int(ignore_index)
        valid = self.target_map[self.target_map != self.ignore_index]
        self._hi = int(valid.max()) if valid.numel() else -1
        if valid.numel() and int(valid.min()) < 0:
            raise ValueError(f"{self.name}: negative label {int(valid.min())} (ignore_index is {self.ignore_index})")
        self._checked = False
        if num_classes is not None:
            self._check_classes(int(num_classes))

    def _check_classes(self, k):
        if self._hi >= k:
            raise ValueError(f"{self.name}: label {self._hi} is out of range for a model with {k} classes")
        self._checked = True

    def objective(self, x, t):
        logits = self.output(x, t)
        lab = self.target_map.to(logits.device, torch.long)
        if lab.dim() == logits.dim() - 2:
            lab = lab.unsqueeze(0).expand(logits.shape[0], *lab.shape)
        if logits.dim() < 3 or tuple(lab.shape) != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"{self.name}: logits shape {tuple(logits.shape)} does not match the label map shape "
                             f"{tuple(self.target_map.shape)} (expected logits [B, K, *labels.shape[-2:]])")
        if not self._checked:
            self._check_classes(logits.shape[1])
        ce = F.cross_entropy(logits, lab, ignore_index=self.ignore_index, reduction="none")
        valid = (lab != self.ignore_index).flatten(1).sum(1).clamp_min(1).to(ce.dtype)
        return -ce.flatten(1).sum(1) / valid


def weighted_grad_sum(grads_and_weights):
    """sum_i w_i * grad_i; a tensor weight w_i [B] scales each sample's gradient."""
    total = None
    for gi, w in grads_and_weights:
        if isinstance(w, torch.Tensor):
            w = w.to(gi.device, gi.dtype).view(-1, *([1] * (gi.dim() - 1)))
        total = gi * w if total is None else total + gi * w
    return total


class ComposedGuide:
    """Sum of guides with weights: ``grad = sum_i w_i * guide_i(x_t, t)`` (each already scaled)."""

    name = "ComposedGuide"

    def __init__(self, guides: Sequence, nonfinite: str = "raise"):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        items = []
        for item in guides:
            g, w = item if isinstance(item, (tuple, list)) else (item, 1.0)
            if not callable(g):
                raise ValueError(f"{self.name}: {g!r} is not a guide")
            items.append((g, _check_scale(w)))
        if not items:
            raise ValueError(f"{self.name}: needs at least one guide")
        self.guides = items
        self.nonfinite = nonfinite

    def _sub(self, g, x_t, t):
        # a sub-guide left at the default nonfinite="raise" must not raise before a lenient composition
        # ("zero" / "ignore") applies its own policy to the sum
        if self.nonfinite != "raise" and isinstance(g, Guide) and g.nonfinite == "raise":
            return g._grad(x_t, t)
        return g(x_t, t)

    def __call__(self, x_t, t, **kw):
        return check_finite(weighted_grad_sum((self._sub(g, x_t, t), w) for g, w in self.guides), self.nonfinite,
                            self.name)


def as_cond_fn(guide) -> Callable:
    """guided-diffusion ``cond_fn(x, t, y=None, **kw)`` calling ``guide(x, t)``.

    ``y`` (guided-diffusion's class labels) overrides the target of a ClassGuide / X0HatGuide;
    other guides ignore it. ``t`` is the original timestep (SpacedDiffusion maps it)."""
    takes_y = isinstance(guide, (ClassGuide, X0HatGuide))

    def cond_fn(x, t, y=None, **kwargs):
        if y is not None and takes_y:
            return guide(x, t, target=y)
        return guide(x, t)

    return cond_fn


__all__ = ["Guide", "ClassGuide", "X0HatGuide", "DenseRegressionGuide", "DepthGuide", "SegmentationGuide",
           "ComposedGuide", "InputTransform", "input_transform", "as_cond_fn", "check_finite",
           "IMAGENET_MEAN", "IMAGENET_STD", "NONFINITE_MODES"]
