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

import contextlib
import math
import numbers
import re
import threading
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experts.bank import as_int_or_tensor
from .ops.lora.segments import _version

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
                 size: int | tuple | None = None, antialias: bool | str = "auto"):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        if mean is not None and len(mean) != len(std):  # a 1-value std was broadcast over a 3-value mean
            raise ValueError(f"mean and std must have one value per channel each, got {len(mean)} and {len(std)}")
        self.size = _check_size(size)
        if antialias not in (True, False, "auto"):
            raise ValueError(f"antialias must be True, False or 'auto', got {antialias!r}")
        # "auto": only when a side shrinks 2x or more (below that bilinear reads every input pixel; from 2x on,
        # without antialiasing, whole rows and columns get no gradient). 1 / numpy True are stored as True (JSON)
        self.antialias = antialias if isinstance(antialias, str) else bool(antialias)
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
            if aa and y.device.type == "cpu" and y.dtype in (torch.float16, torch.bfloat16):
                # the CPU antialiased kernel has no half / bfloat16 (NotImplementedError): resize in float32
                y = F.interpolate(y.float(), size=self.size, mode="bilinear", align_corners=False,
                                  antialias=True).to(y.dtype)
            else:
                y = F.interpolate(y, size=self.size, mode="bilinear", align_corners=False, antialias=aa)
        if self.mean is not None:
            if self.mean.shape[1] != y.shape[1]:
                raise ValueError(f"InputTransform has {self.mean.shape[1]} channel statistics, input has "
                                 f"{y.shape[1]} channels")
            mean, std = self._stats_on(y)
            y = (y - mean) / std
        return y

    def _stats_on(self, y):
        """mean and std in y's dtype on y's device. On another device than the buffers (a transform left
        on the CPU guiding a CUDA model) the copies are kept, not made at every call: a copy per step
        synced the host and made CUDA-graph capture of a guided step fail (eager fallback). Refreshed when
        the buffers move or change in place."""
        if self.mean.device == y.device or torch.compiler.is_compiling():
            return self.mean.to(y.device, y.dtype), self.std.to(y.device, y.dtype)
        from .ops.lora.segments import _version

        key = (y.device, y.dtype)
        stamp = tuple((t.data_ptr(), t.device, _version(t)) for t in (self.mean, self.std))
        cache = self.__dict__.setdefault("_stats_cache", {})
        hit = cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = cache[key] = (stamp, self.mean.to(y.device, y.dtype), self.std.to(y.device, y.dtype))
        return hit[1], hit[2]


def _check_size(size):
    """``size`` as (H, W) or None; a positive int is square."""
    def positive_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0

    if size is None:
        return None
    pair = (size, size) if positive_int(size) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(positive_int(v) for v in pair):
        raise ValueError(f"size must be a positive int or an (H, W) pair of them, got {size!r}")
    return tuple(int(v) for v in pair)


def input_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD, size=None, antialias: bool | str = "auto") -> InputTransform:
    """[-1, 1] -> model normalisation (mean/std, ImageNet by default) and resolution (bilinear to ``size``, an
    int or (H, W); None keeps it). ``antialias``: True, False or "auto" (the default, as the model registry: only
    where a side shrinks 2x or more; unantialiased, 512 -> 224 left ~23% of x_t without gradient)."""
    return InputTransform(mean, std, size, antialias)


# ----------------------------------------------------------------------------- helpers
CLASS_OUTPUT_KEYS = ("out", "logits")  # torchvision segmentation's dict, Hugging Face ModelOutput
DEPTH_OUTPUT_KEYS = ("predicted_depth", "out", "logits")  # Hugging Face depth estimators first
DENOISER_OUTPUT_KEYS = ("sample", "out")  # diffusers UNet2DOutput


def _primary(out, keys: Sequence[str] = CLASS_OUTPUT_KEYS, name: str = "guide"):
    """A network's main output: a tensor as it is; the first of ``keys`` present in a mapping (a
    transformers ``ModelOutput`` is one) or as an attribute of an object (a namedtuple's field first);
    else a tuple's / list's first element. Anything else is a ValueError naming its type."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        picked = next((out[k] for k in keys if out.get(k) is not None), None)
    else:
        picked = next((v for v in (getattr(out, k, None) for k in keys) if v is not None), None)
        if picked is None and isinstance(out, (tuple, list)) and len(out):
            picked = out[0]
    if not isinstance(picked, torch.Tensor):
        found = f" (keys {sorted(map(str, out))})" if isinstance(out, Mapping) else ""
        raise ValueError(f"{name}: cannot read the network output of type {type(out).__name__}{found}: expected a "
                         f"tensor, a tuple / list (its first element), or a mapping / object with a tensor "
                         f"{' or '.join(map(repr, keys))}")
    return picked


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


def check_per_sample(value, batch: int, name: str, what: str = "scale") -> None:
    """A [n] tensor ``value`` (a guide's scale, a composition's weight) must have one value or one per sample."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() != 1 and value.shape[0] != batch:
        raise ValueError(f"{name}: {what} has {value.shape[0]} per-sample values for a batch of {batch}: give one "
                         f"{what} or one per sample")


def _check_scale(scale):
    if isinstance(scale, torch.Tensor):
        if scale.dim() > 1 or scale.is_complex():
            raise ValueError(f"scale must be a number or a [B] tensor, got shape {tuple(scale.shape)}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


_CONV_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")


def _networks(guide):
    nets = (getattr(guide, a, None) for a in ("model", "classifier", "denoiser"))
    return [m for m in nets if isinstance(m, nn.Module)]


def _raise_explained(guide, x, err: RuntimeError) -> None:
    """Turn the errors of a guide network fed the wrong x_t (another device, another channel count) into one
    line naming the fix; return for any other error."""
    name = getattr(guide, "name", type(guide).__name__)
    for net in _networks(guide):
        p = next(iter(net.parameters()), None)
        if p is not None and p.device != x.device:
            raise ValueError(f"{name}: the guide's network ({type(net).__name__}) is on {p.device} but x_t is on "
                             f"{x.device}: move it with .to({str(x.device)!r}) (or sample on {p.device})") from err
    _raise_channel_mismatch(name, x, err)


def _raise_channel_mismatch(name, x, err: RuntimeError) -> None:
    """Turn a conv's channel-count error inside the guide's network into one line naming the fix."""
    m = _CONV_CHANNELS.search(str(err))
    if m is None:
        return
    want, got = int(m.group(1)), int(m.group(2))
    hint = (f"e.g. input_transform=lambda x: x.expand(-1, {want}, -1, -1) (grey to {want} channels)" if got == 1
            else f"e.g. input_transform=lambda x: x.mean(1, keepdim=True) ({got} channels to grey)" if want == 1
            else "pass an input_transform that maps x_t to the network's channels")
    raise ValueError(f"{name}: x_t {tuple(x.shape)} reaches a conv of the guide's network with {got} channels, "
                     f"but it takes {want}: the guide must see images shaped like its training data; {hint}") from err


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
        t = as_int_or_tensor(t)
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

    def _objective_sum(self, per_sample):
        """sum_b objective_b, unscaled: the scale multiplies its gradient (:meth:`_apply_scale`); applied before
        the backward, a half network's backward overflowed at large scales (1e5) though the gradient was finite."""
        if per_sample.dim() != 1:
            raise RuntimeError(f"{self.name}: objective must be per-sample [B], got {tuple(per_sample.shape)}")
        check_per_sample(self.scale, per_sample.shape[0], self.name)
        return per_sample.sum()

    def _apply_scale(self, g):
        """scale * g (d/dx of :meth:`_objective_sum`), in float32 at least, returned in g's dtype; a [B] scale
        multiplies each sample's gradient (each sample's objective depends on its own x only)."""
        s, dtype = self.scale, torch.promote_types(g.dtype, torch.float32)
        if isinstance(s, torch.Tensor):
            s = s.to(g.device, dtype).view(-1, *([1] * (g.dim() - 1)))
        return (g.to(dtype) * s).to(g.dtype)

    def _finite(self, g):
        return check_finite(g, self.nonfinite, self.name)

    def _warn_train_mode(self, stacklevel: int = 3):
        """A guide network (X0HatGuide's denoiser too) with BatchNorm / Dropout / DropPath in train mode: batch
        statistics (a sample's gradient depends on the rest of the batch), running statistics overwritten by every
        guided step, random dropout masks. Warned once. The networks' mode-dependent submodules are listed once
        (per set of networks); their ``training`` flags are read every call, so a later ``.train()`` is seen."""
        if getattr(self, "_train_warned", False):
            return
        nets = _networks(self)
        cached = getattr(self, "_mode_dependent", None)
        if cached is None or len(cached[0]) != len(nets) or any(a is not b for a, b in zip(cached[0], nets)):
            cached = self._mode_dependent = (nets, [m for net in nets for m in net.modules()
                                                    if _depends_on_train_mode(m)])
        if any(m.training for m in cached[1]):
            import warnings

            warnings.warn(f"{self.name}: a guide network is in train mode (BatchNorm uses batch statistics and "
                          "sampling overwrites its running statistics; Dropout / DropPath make the guidance random); "
                          "call .eval() on the guide's networks before sampling", RuntimeWarning, stacklevel=stacklevel)
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
            try:
                obj = self._objective_sum(self.objective(x, t, **kw))
            except RuntimeError as e:
                _raise_explained(self, x, e)
                raise
            g = grad_wrt_input(obj, x, self.name)
        return self._apply_scale(g.detach())


def grad_wrt_input(obj: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """d obj / d x; a ValueError where obj does not reach x through autograd (the guidance was silently zero, or
    autograd's "element 0 of tensors does not require grad")."""
    g = torch.autograd.grad(obj, x, allow_unused=True)[0] if obj.requires_grad else None
    if g is None:
        raise ValueError(f"{name}: the guidance objective does not depend on x_t through autograd (the network "
                         "detaches its input, or runs it under torch.no_grad() or outside torch, e.g. NumPy / PIL): "
                         "keep the path from its input to its output differentiable")
    return g


def _depends_on_train_mode(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) or \
        type(m).__name__ in ("ExpertBatchNorm", "DropPath", "StochasticDepth")


def warn_train_mode(guide, stacklevel: int = 3) -> None:
    """The train-mode warning of ``guide``'s networks (a ComposedGuide's sub-guides'), as a call would give."""
    if isinstance(guide, Guide):
        guide._warn_train_mode(stacklevel + 1)
    elif isinstance(guide, ComposedGuide):
        for g, _ in guide.guides:
            warn_train_mode(g, stacklevel + 1)


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
        if isinstance(target, numbers.Integral) and not isinstance(target, bool):
            target = int(target)  # numpy ints too
        elif type(target).__module__ == "numpy" and hasattr(target, "dtype") and target.dtype.kind in "iu":
            target = torch.as_tensor(target, dtype=torch.long)  # a numpy array of class ids
        if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor)):
            raise ValueError(f"{name}: target must be an int or an integer tensor / array [B], got "
                             f"{type(target).__name__}")
        if isinstance(target, torch.Tensor):
            if target.is_floating_point() or target.dtype == torch.bool or target.dim() > 1:
                raise ValueError(f"{name}: target must be an integer tensor [B], got {target.dtype} "
                                 f"{tuple(target.shape)}")
            lo, hi = (int(target.min()), int(target.max())) if target.numel() else (0, 0)
        else:
            lo = hi = target
        self.target, self.lo, self.hi = target, lo, hi
        self.checked = False
        self.k = None  # the class count last checked against
        self.own_k = None  # the class count this target was last checked against
        if lo < 0:
            raise ValueError(f"{name}: target {lo} is negative")
        if num_classes is not None:
            self._check(num_classes)

    def _check(self, k):
        if self.hi >= k:
            raise ValueError(f"{self.name}: target class {self.hi} is out of range for a model with {k} classes")
        self.checked, self.k, self.own_k = True, k, k

    def _checked_override(self, override, k: int):
        """A per-call target checked like the own one; the last tensor checked is remembered (while unchanged in
        place), so a loop passing the same labels every step reads their range once, not once per step (a sync)."""
        if getattr(_PRECHECKED, "on", False) and torch.compiler.is_compiling() and getattr(self, "k", None) == k:
            return override  # checked by precheck() on the host before the compiled guide: no read in the graph
        cached = getattr(self, "_override", None)
        if cached is not None and cached[0] is override and cached[1] == k and cached[2] == _version(override):
            return cached[3]
        if not torch.compiler.is_compiling():
            self.k = k  # the count is known, even where these labels fail it
        tgt = _ClassTarget(override, k, self.name).target
        if isinstance(override, torch.Tensor) and not torch.compiler.is_compiling() and _version(override) is not None:
            self._override = (override, k, _version(override), tgt)
        return tgt

    def precheck(self, override):
        """A per-call target checked on the host before a compiled guide runs (its trace cannot read the labels'
        range: a graph break): the target to pass it, or None while the class count is unknown (run it eagerly
        once). A tensor is read once while unchanged, as in ``select``."""
        k = getattr(self, "k", None)
        return None if k is None else self._checked_override(override, k)

    def select(self, logits, override=None):
        if logits.dim() != 2:
            raise ValueError(f"{self.name}: classifier output must be logits [B, K], got {tuple(logits.shape)}")
        if logits.shape[1] == 1:  # log_softmax over one class is 0: the guidance was silently zero
            raise ValueError(f"{self.name}: logits {tuple(logits.shape)} have one class, whose log-probability is "
                             "constant (no guidance); for a binary classifier with one sigmoid logit l, make the model "
                             "return the two-class logits torch.cat([torch.zeros_like(l), l], 1)")
        tgt = self.target if override is None else self._checked_override(override, logits.shape[1])
        if override is None and self.own_k != logits.shape[1]:  # num_classes= may be another K
            self._check(logits.shape[1])
        B = logits.shape[0]
        if isinstance(tgt, int):
            idx = torch.full((B, 1), tgt, dtype=torch.long, device=logits.device)
        else:
            tgt = _autograd_usable(tgt.to(logits.device, torch.long))
            if tgt.dim() == 0:
                tgt = tgt.expand(B)
            if tgt.shape != (B,):
                raise ValueError(f"{self.name}: target has shape {tuple(tgt.shape)}, batch is {B}")
            idx = tgt.view(B, 1)
        # float32 at least: in a bfloat16 network's dtype the log-probabilities were 0.4-2% off
        return F.log_softmax(_loss_dtype(logits), dim=-1).gather(1, idx).squeeze(1)


# .on: set (by prechecked_targets) while a compiled guide runs with targets precheck()ed, per thread. Read with
# getattr(_PRECHECKED, "on", False): dynamo guards on that per calling thread (not on a class-level default)
_PRECHECKED = threading.local()


@contextlib.contextmanager
def prechecked_targets():
    """Per-call class targets passed in the block were checked by ``_ClassTarget.precheck``: a compiled guide's
    trace skips their range read (the class count it was checked against is compared in the trace)."""
    old, _PRECHECKED.on = getattr(_PRECHECKED, "on", False), True
    try:
        yield
    finally:
        _PRECHECKED.on = old


def _autograd_usable(t: torch.Tensor) -> torch.Tensor:
    """A target made under torch.inference_mode cannot be saved for backward: use a normal copy of it."""
    if torch.compiler.is_compiling() or not t.is_inference() or torch.is_inference_mode_enabled():
        return t
    return t.clone()


def _check_recorded_transform(model, transform, name) -> None:
    """Experts loaded from a checkpoint recording another input transform than ``transform`` (raw x_t vs
    normalised, other mean / std): refused, they never saw such inputs. Nothing recorded: not checked."""
    if not isinstance(getattr(model, "input_transform_record", None), dict):
        return
    from .experts.checkpoint import check_input_transform

    check_input_transform(model, transform, subject=f"{name}: these experts")


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
    ``input_transform``: e.g. :func:`input_transform` (the official PPAP experts take raw x_t: None); loaded
    experts recording another one (``bank.input_transform_record``) are refused.
    ``nonfinite``: "raise" | "zero" | "ignore" (see the module docstring).
    """

    name = "ClassGuide"

    def __init__(self, model, target, scale=1.0, input_transform: Callable | None = None,
                 pass_t: bool | None = None, num_classes: int | None = None, nonfinite: str = "raise"):
        super().__init__(scale, nonfinite)
        if not callable(model):
            raise ValueError(f"{self.name}: model must be callable")
        _check_recorded_transform(model, input_transform, self.name)
        self.model = model
        self.pass_t = _is_bank(model) if pass_t is None else bool(pass_t)
        self.transform = input_transform
        inner = model.model if _is_bank(model) else model
        self.target = _ClassTarget(target, _num_classes(model, num_classes) or _num_classes(inner, None), self.name)

    def logits(self, x, t):
        """The classifier's logits on ``x`` (x_t; ``t`` goes to an ExpertBank)."""
        h = _to_model_dtype(self.model, self.transform(x) if self.transform is not None else x)
        return _primary(self.model(h, t) if self.pass_t else self.model(h), CLASS_OUTPUT_KEYS, self.name)

    def objective(self, x, t, target=None):
        """Per-sample log p(target | ``x``, ``t``) [B]; ``target`` overrides the guide's own."""
        return self.target.select(self.logits(x, t), target)


class X0HatGuide(Guide):
    """The "gradients on x0-hat" baseline: the clean classifier on the predicted clean image.

    ``x0_hat = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)`` with ``abar`` the BASE
    schedule's alphas_cumprod (length T, indexed by the original t); the result is
    ``scale * grad_{x_t} sum_b log p(target_b | x0_hat_b)``; ``alphas_cumprod`` may be given as an un-respaced
    :class:`~ppap_fast.schedule.Schedule`. Back-propagated through the denoiser
    (``through_denoiser=True``, the exact gradient; one extra UNet backward) or with eps
    detached (``False``: cheap, grad = scale * grad_{x0hat} / sqrt(abar)). A denoiser output
    with 2C channels (eps, v) is split and eps used; a diffusers-style output's ``.sample`` is read.
    ``target``, ``num_classes``, ``input_transform`` (applied to x0_hat), ``nonfinite``: as :class:`ClassGuide`.
    ``denoiser_kwargs``: extra keyword arguments of every ``denoiser(x_t, t, **denoiser_kwargs)`` call.
    """

    name = "X0HatGuide"

    def __init__(self, classifier, denoiser, alphas_cumprod, target, scale=1.0, through_denoiser: bool = True,
                 input_transform: Callable | None = None, num_classes: int | None = None,
                 denoiser_kwargs: dict | None = None, nonfinite: str = "raise"):
        super().__init__(scale, nonfinite)
        from ppap_fast.schedule import Schedule

        if isinstance(alphas_cumprod, Schedule):  # the base schedule's table; a respaced one lacks most of it
            if alphas_cumprod.num_timesteps != alphas_cumprod.original_num_timesteps:
                raise ValueError(f"{self.name}: alphas_cumprod must be the BASE schedule's table (length T, indexed by "
                                 f"the original t), got a respaced Schedule with {alphas_cumprod.num_timesteps} of "
                                 f"{alphas_cumprod.original_num_timesteps} steps: pass Schedule.create(name, "
                                 f"{alphas_cumprod.original_num_timesteps}) or its .alphas_cumprod")
            alphas_cumprod = alphas_cumprod.alphas_cumprod
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
        """The predicted clean image of ``x`` (x_t) at original timesteps ``t``."""
        if t.device.type == "cpu" and t.numel() and bool(((t < 0) | (t >= self.acp.numel())).any()):
            raise ValueError(f"{self.name}: t out of range [0, {self.acp.numel()})")
        h = _to_model_dtype(self.denoiser, x)  # a half x_t and a float32 denoiser (or the reverse)
        if self.through_denoiser:
            eps = _primary(self.denoiser(h, t, **self.denoiser_kwargs), DENOISER_OUTPUT_KEYS, self.name)
        else:
            with torch.no_grad():
                eps = _primary(self.denoiser(h.detach(), t, **self.denoiser_kwargs), DENOISER_OUTPUT_KEYS, self.name)
        C = x.shape[1]
        if eps.shape[1] == 2 * C:
            eps = eps[:, :C]
        if eps.shape != x.shape:
            raise ValueError(f"{self.name}: denoiser output {tuple(eps.shape)} does not match x_t {tuple(x.shape)} "
                             "(expected eps with C or 2C channels)")
        # fp32 at least: in fp16 abar near 1 rounds to 1, so 1 - abar = 0 and x0_hat = x at small t
        dtype = torch.promote_types(x.dtype, torch.float32)
        ab = self._table(x.device, dtype)[t].view(-1, *([1] * (x.dim() - 1)))
        return ((x.to(dtype) - (1 - ab).sqrt() * eps.to(dtype)) / ab.sqrt()).to(x.dtype)

    def objective(self, x, t, target=None):
        """Per-sample log p(target | x0_hat(``x``, ``t``)) [B]; ``target`` overrides the guide's own."""
        x0 = self.x0_hat(x, t)
        h = _to_model_dtype(self.classifier, self.transform(x0) if self.transform is not None else x0)
        return self.target.select(_primary(self.classifier(h), CLASS_OUTPUT_KEYS, self.name), target)


def resize_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest resize of an integer map [..., H, W] to ``size`` (pixel centres, as interpolate's
    'nearest-exact'; exact integer index arithmetic: labels are never mixed, ignore_index survives)."""
    (h, w), (ho, wo) = labels.shape[-2:], size

    def src(n_in, n_out):
        return ((2 * torch.arange(n_out, device=labels.device) + 1) * n_in // (2 * n_out)).clamp_max(n_in - 1)

    return labels[..., src(h, ho)[:, None], src(w, wo)]


def resize_values(values: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False, antialiased when shrinking) of a float map [..., H, W] to ``size``.
    Non-finite (invalid) pixels drop out of the interpolation weights (normalised: valid neighbours are averaged);
    an output pixel with no valid source is NaN."""
    lead, (h, w) = values.shape[:-2], values.shape[-2:]
    flat = values.reshape(-1, 1, h, w)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    valid = torch.isfinite(flat)

    def resize(v):
        return F.interpolate(v, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)

    num, den = resize(torch.where(valid, flat, 0.0)), resize(valid.to(flat.dtype))
    out = torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), float("nan"))
    return out.reshape(*lead, *size).to(values.dtype)


def _loss_dtype(out: torch.Tensor) -> torch.Tensor:
    """A dense guide's output in float32 at least: in a half network's float16 the pixel count (65536 at 256x256)
    and the summed loss overflow to inf, and the mean's gradient became exactly zero."""
    return out.to(torch.promote_types(out.dtype, torch.float32))


class _DenseGuide(Guide):
    output_keys = CLASS_OUTPUT_KEYS

    def __init__(self, model, target_map, scale, input_transform, pass_t, nonfinite):
        super().__init__(scale, nonfinite)
        if not isinstance(target_map, torch.Tensor):
            raise ValueError(f"{self.name}: target must be a tensor, got {type(target_map).__name__}")
        _check_recorded_transform(model, input_transform, self.name)
        self.model, self.target_map, self.transform = model, target_map, input_transform
        self.pass_t = _is_bank(model) if pass_t is None else bool(pass_t)

    def output(self, x, t):
        h = _to_model_dtype(self.model, self.transform(x) if self.transform is not None else x)
        return _primary(self.model(h, t) if self.pass_t else self.model(h), self.output_keys, self.name)

    def _aligned_target(self, out_shape):
        return self.target_map

    def _per_sample_target_dim(self, out_dim: int) -> int:
        """The rank of per-sample target maps [B, ...] for an output of rank ``out_dim``."""
        return out_dim

    def _target_for(self, out_shape, per_pixel_dims: int, resize, device):
        """The target map as [B, *out_shape[1 + per_pixel_dims:]] (logits' K is a per-pixel dim), its [H, W]
        resized to the output's where they differ (maps of rank >= 2 for outputs [B, ..., H, W])."""
        want = (out_shape[0], *out_shape[1 + per_pixel_dims:])
        tgt = _autograd_usable(self._aligned_target(out_shape).to(device))
        if tgt.dim() == len(want) and tgt.dim() >= 3 and tgt.shape[0] == 1 < want[0]:
            tgt = tgt[0]  # [1, ...]: one map shared by all samples
        shared = tgt.dim() == len(want) - 1
        per_sample = want[1:] if shared else want
        if tgt.dim() != len(per_sample) or tgt.shape[:-2] != per_sample[:-2]:
            raise ValueError(self._shape_error(out_shape))
        if tgt.shape[-2:] != per_sample[-2:]:
            if len(want) < 3 or tgt.dim() < 2:
                raise ValueError(self._shape_error(out_shape))
            tgt = resize(tgt, per_sample[-2:])
        return tgt.expand(want)


class DenseRegressionGuide(_DenseGuide):
    """Depth-style guidance: ``scale * grad_x sum_b -mean_valid_pixels (model(x)_b - target_b)^2``.

    ``target`` has the model output's shape [B, ..., H, W] or that shape without the batch dim (shared by
    all samples); a target map of another [H, W] (an image-resolution depth map, a network predicting at
    1/4 resolution) is resized to the output's, bilinearly (align_corners=False, antialiased when shrinking;
    see :func:`resize_values`). Any other mismatch (batch, channels) is a ValueError naming both shapes.
    A target with a leading 1, [1, ...], is also shared. A target without the batch dim whose first dim is both
    the batch size and the channel count (a [3, H, W] target for an output [3, 3, H, W]) is a ValueError: give
    [1, C, H, W] (shared) or [B, C, H, W] (per sample); a per-sample map [B, H, W] is only read for a
    one-channel output (below).
    Non-finite target pixels (NaN / Inf: invalid depth) do not count; a sample without a valid pixel gets no
    guidance (maps marking invalid pixels with 0 need ``target[target == 0] = nan``).
    A Hugging Face depth model's ``predicted_depth`` [B, H, W] is read (then give [B, H, W] or [H, W] targets).
    For a one-channel output [B, 1, H, W], a target without that channel ([H, W], or [B, H, W] with B > 1)
    is read as [1, H, W] / [B, 1, H, W].
    ``input_transform``, ``pass_t``, ``nonfinite``: as :class:`ClassGuide`.
    """

    name = "DenseRegressionGuide"
    output_keys = DEPTH_OUTPUT_KEYS

    def __init__(self, model, target, scale=1.0, input_transform=None, pass_t=None, nonfinite="raise"):
        super().__init__(model, target, scale, input_transform, pass_t, nonfinite)
        if not self.target_map.is_floating_point():
            raise ValueError(f"{self.name}: target map must be floating, got {self.target_map.dtype}")

    def _aligned_target(self, out_shape):
        tgt = self.target_map
        if len(out_shape) >= 4 and out_shape[1] == 1:
            if tgt.dim() == len(out_shape) - 2:
                return tgt.unsqueeze(0)
            if tgt.dim() == len(out_shape) - 1 and tgt.shape[0] == out_shape[0] > 1:
                return tgt.unsqueeze(1)
        return tgt

    def _shape_error(self, out_shape):
        return (f"{self.name}: model output shape {tuple(out_shape)} does not match the target shape "
                f"{tuple(self.target_map.shape)} (expected the output's shape, or without the batch dim; "
                "only [H, W] may differ)")

    def _check_unambiguous(self, out_shape):
        """A target of the output's rank minus one whose first dim is both the batch and the channel count:
        shared [C, H, W] or per-sample [B, H, W] cannot be told apart (it was read as shared)."""
        tgt = self.target_map
        B = out_shape[0]
        if len(out_shape) >= 4 and tgt.dim() == len(out_shape) - 1 and tgt.shape[0] == B == out_shape[1] > 1:
            raise ValueError(f"{self.name}: target {tuple(tgt.shape)} is ambiguous for the output {tuple(out_shape)} "
                             f"(batch and channels are both {B}): pass one map shared by all samples as "
                             f"[1, {B}, ...] (target[None]), or one map per sample as [B, C, ...]")

    def objective(self, x, t):
        """Per-sample -mean squared error of the model's output on ``x`` (``t``: for an ExpertBank) [B]."""
        out = _loss_dtype(self.output(x, t))
        self._check_unambiguous(out.shape)
        tgt = self._target_for(out.shape, 0, resize_values, out.device).to(out.dtype)
        valid = torch.isfinite(tgt)
        err = torch.where(valid, out - torch.where(valid, tgt, 0), 0) ** 2
        return -err.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1).to(err.dtype)


DepthGuide = DenseRegressionGuide


class SegmentationGuide(_DenseGuide):
    """``scale * grad_x sum_b -mean_valid_pixels CE(model(x)_b, target_b)``; ``ignore_index`` pixels
    do not count (a sample without a valid pixel gets no guidance). ``target``: integer labels [B, H, W] or
    [H, W] for logits [B, K, H', W']; labels of another size than the logits' (image-resolution labels, a network
    predicting at 1/4 resolution) are resized to it by nearest neighbour (:func:`resize_labels`).
    ``num_classes``: checks the labels at construction (else at the first call, against K).
    ``input_transform``, ``pass_t``, ``nonfinite``: as :class:`ClassGuide`."""

    name = "SegmentationGuide"

    def __init__(self, model, target, scale=1.0, input_transform=None, pass_t=None, ignore_index: int = -100,
                 num_classes: int | None = None, nonfinite="raise"):
        super().__init__(model, target, scale, input_transform, pass_t, nonfinite)
        if self.target_map.is_floating_point() or self.target_map.dtype == torch.bool:
            raise ValueError(f"{self.name}: target labels must be an integer tensor, got {self.target_map.dtype}")
        self.ignore_index = int(ignore_index)
        labels = self.target_map.long()  # a uint8 map compared with -100 wrapped it to 156 (label 156 unchecked)
        valid = labels[labels != self.ignore_index]
        self._hi = int(valid.max()) if valid.numel() else -1
        if valid.numel() and int(valid.min()) < 0:
            raise ValueError(f"{self.name}: negative label {int(valid.min())} (ignore_index is {self.ignore_index})")
        self._checked_k = None  # the class count last checked against
        if num_classes is not None:
            self._check_classes(int(num_classes))

    def _check_classes(self, k):
        if self._hi >= k:
            hint = " (255 marks void pixels in VOC / ADE20K / Cityscapes maps: pass ignore_index=255)" \
                if self._hi == 255 else ""
            raise ValueError(f"{self.name}: label {self._hi} is out of range for a model with {k} classes{hint}")
        self._checked_k = k

    def _per_sample_target_dim(self, out_dim: int) -> int:
        return out_dim - 1  # logits [B, K, H, W], labels [B, H, W]

    def _shape_error(self, out_shape):
        return (f"{self.name}: logits shape {tuple(out_shape)} does not match the label map shape "
                f"{tuple(self.target_map.shape)} (expected logits [B, K, ...] for labels [B, ...] or [...])")

    def objective(self, x, t):
        """Per-sample -mean cross-entropy of the model's logits on ``x`` (``t``: for an ExpertBank) [B]."""
        logits = self.output(x, t)
        if logits.dim() < 3:
            raise ValueError(self._shape_error(logits.shape))
        if logits.shape[1] == 1:  # cross-entropy over one class is 0: the guidance was silently zero
            raise ValueError(f"{self.name}: logits {tuple(logits.shape)} have one class, whose cross-entropy is "
                             "constant (no guidance); for a binary net with one sigmoid logit l, make the model "
                             "return the two-class logits torch.cat([torch.zeros_like(l), l], 1)")
        lab = self._target_for(logits.shape, 1, resize_labels, logits.device).long()
        if self._checked_k != logits.shape[1]:  # num_classes= may differ from the logits' K
            self._check_classes(logits.shape[1])
        ce = F.cross_entropy(_loss_dtype(logits), lab, ignore_index=self.ignore_index, reduction="none")
        valid = (lab != self.ignore_index).flatten(1).sum(1).clamp_min(1).to(ce.dtype)
        return -ce.flatten(1).sum(1) / valid


def weighted_grad_sum(grads_and_weights):
    """sum_i w_i * grad_i; a tensor weight w_i [B] scales each sample's gradient."""
    total = None
    for gi, w in grads_and_weights:
        check_per_sample(w, gi.shape[0], "ComposedGuide", "weight")
        if isinstance(w, torch.Tensor):
            w = w.to(gi.device, gi.dtype).view(-1, *([1] * (gi.dim() - 1)))
        total = gi * w if total is None else total + gi * w
    return total


class ComposedGuide:
    """Sum of guides with weights: ``grad = sum_i w_i * guide_i(x_t, t)`` (each already scaled).

    ``guide(x_t, t, target=y)`` overrides the target of the sub-guides with a class target (ClassGuide,
    X0HatGuide, also inside nested ComposedGuides); dense guides keep their target maps.
    ``guides``: (guide, weight) pairs (a weight: a float or a per-sample tensor [B]) or plain guides (weight 1).
    ``nonfinite``: "raise" | "zero" | "ignore", applied to the sum (see the module docstring)."""

    name = "ComposedGuide"

    def __init__(self, guides: Sequence, nonfinite: str = "raise"):
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if callable(guides):
            raise ValueError(f"{self.name} takes a list of guides or (guide, weight) pairs, got one "
                             f"{type(guides).__name__}: pass [guide]")
        if isinstance(guides, Mapping):  # {guide: weight}: iterating gave the guides alone, weights dropped
            guides = list(guides.items())
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

    def _sub(self, g, x_t, t, target, lenient: bool):
        kw = {"target": target} if target is not None and has_class_target(g) else {}
        # a sub-guide (or nested composition) left at the default nonfinite="raise" must not raise before a
        # lenient composition ("zero" / "ignore") applies its own policy to the sum
        if lenient and isinstance(g, (Guide, ComposedGuide)) and g.nonfinite == "raise":
            return g._grad(x_t, t, **kw)
        return call_guide(g, x_t, t, **kw)

    def _sum(self, x_t, t, target, lenient: bool):
        return weighted_grad_sum((self._sub(g, x_t, t, target, lenient), w) for g, w in self.guides)

    def _grad(self, x_t, t, target=None):
        """The weighted sum before any non-finite policy (for a lenient outer composition)."""
        return self._sum(x_t, t, target, lenient=True)

    def __call__(self, x_t, t, target=None):
        return check_finite(self._sum(x_t, t, target, self.nonfinite != "raise"), self.nonfinite, self.name)


def has_class_target(guide) -> bool:
    """Whether ``guide(x_t, t, target=y)`` overrides a class target: a ClassGuide / X0HatGuide, or a
    ComposedGuide or :class:`ppap_fast.fast_sampling.FastGuide` holding one."""
    if isinstance(guide, (ClassGuide, X0HatGuide)):
        return True
    if isinstance(guide, ComposedGuide):
        return any(has_class_target(g) for g, _ in guide.guides)
    from .fast_sampling import FastGuide

    return isinstance(guide, FastGuide) and has_class_target(guide.source)


def guidance_is_off(guide) -> bool:
    """Whether ``guide`` adds nothing at any x_t, known on the host: a Guide whose scale is the number 0, or a
    ComposedGuide whose every part has weight 0 or is off (a FastGuide: its guide). Samplers then run the
    unguided step: DDIM's condition_score with a zero gradient re-derives x0-hat, which differs in rounding."""
    from .fast_sampling import FastGuide

    if isinstance(guide, FastGuide):
        return guidance_is_off(guide.source)
    if isinstance(guide, ComposedGuide):
        return all((not isinstance(w, torch.Tensor) and w == 0) or guidance_is_off(g) for g, w in guide.guides)
    return isinstance(guide, Guide) and not isinstance(guide.scale, torch.Tensor) and guide.scale == 0


def check_guide_batch(guide, batch: int, class_target_given: bool = False, x_dim: int = 4) -> None:
    """Raise ValueError, before any model runs, where a guide's own per-sample values cannot serve a batch of
    ``batch``: a class target [n] (unless ``class_target_given``: a target passed per call replaces it), a
    per-sample scale or a composition's weight [n], a dense guide's per-sample target maps [n, ...] (read as
    such for a dense output of x_t's rank ``x_dim``), with n != batch (before, the mismatch surfaced after the
    first denoiser forward)."""
    from .fast_sampling import FastGuide

    if isinstance(guide, FastGuide):
        return check_guide_batch(guide.source, batch, class_target_given, x_dim)
    if isinstance(guide, ComposedGuide):
        for g, w in guide.guides:
            check_per_sample(w, batch, guide.name, "weight")
            check_guide_batch(g, batch, class_target_given, x_dim)
        return
    if not isinstance(guide, Guide):
        return
    check_per_sample(guide.scale, batch, guide.name)
    if isinstance(guide, _DenseGuide):
        maps = guide.target_map
        if maps.dim() == guide._per_sample_target_dim(x_dim) and maps.shape[0] not in (1, batch):
            raise ValueError(f"{guide.name}: target {tuple(maps.shape)} holds {maps.shape[0]} per-sample maps for a "
                             f"batch of {batch}: give one map per sample, or one shared by all (without the batch "
                             "dim, or with a leading 1)")
    tgt = getattr(getattr(guide, "target", None), "target", None)
    if not class_target_given and isinstance(tgt, torch.Tensor) and tgt.dim() == 1 and tgt.shape[0] != batch:
        raise ValueError(f"{guide.name}: target has {tgt.shape[0]} class labels for a batch of {batch}: give one "
                         "label per sample, or one int for all")


def raise_if_network(guide, err=None, what: str = "") -> None:
    """Raise a TypeError naming the fix when ``guide`` is a guide's network (a classifier, an ExpertBank) passed where
    a guide wrapping it belongs; return otherwise."""
    if isinstance(guide, nn.Module) and not isinstance(guide, (Guide, ComposedGuide)):
        name = type(guide).__name__
        raise TypeError(f"guide= takes a guide, guide(x_t, t) -> scale * grad log p, but got the network {name} "
                        f"itself{what}: wrap it, e.g. ClassGuide(model.eval(), target=..., scale=10.0) with model "
                        f"the {name}") from err


def call_guide(guide, x_t, t, **kw):
    """``guide(x_t, t, **kw)``; a network passed as the guide (it fails on the extra t, or returns logits) raises
    :func:`raise_if_network`'s TypeError instead of its own error or a result of the wrong shape."""
    try:
        g = guide(x_t, t, **kw)
    except TypeError as e:
        raise_if_network(guide, e)
        raise
    if isinstance(g, torch.Tensor) and g.shape != x_t.shape:
        raise_if_network(guide, None, f" (it returned {tuple(g.shape)}, not a gradient shaped like x_t)")
    return g


def as_cond_fn(guide, num_timesteps: int | None = None) -> Callable:
    """guided-diffusion ``cond_fn(x, t, y=None, **kw)`` calling ``guide(x, t)``.

    ``y`` (guided-diffusion's class labels) overrides the target of a ClassGuide / X0HatGuide, and of
    those sub-guides of a ComposedGuide (a FastGuide of either: the same); other guides, and a ComposedGuide's
    dense sub-guides, ignore it. ``t`` is the original timestep (SpacedDiffusion maps it).
    ``num_timesteps``: the diffusion's base T. Given, the guide's ExpertBanks / X0HatGuide tables are checked
    against it (a bank of another T routes to the wrong experts), and the float ``t * 1000 / T`` of a diffusion
    made with ``rescale_timesteps=True`` is mapped back to the original integer t."""
    from .integrations.diffusers import PPAPGuidance  # imports no diffusers

    if isinstance(guide, PPAPGuidance):  # it failed at the first call: "correct() missing 't' and 'scheduler'"
        raise TypeError("as_cond_fn takes a guide, guide(x_t, t) -> grad, but got a PPAPGuidance (the correction of a "
                        "diffusers scheduler's output): pass its guide, as_cond_fn(guidance.guide)")
    from .fast_sampling import FastGuide, check_guide_timesteps

    if num_timesteps is not None:
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, numbers.Integral) or num_timesteps <= 0:
            raise ValueError(f"as_cond_fn: num_timesteps must be the diffusion's base T (a positive int), got "
                             f"{num_timesteps!r}")
        num_timesteps = int(num_timesteps)
        check_guide_timesteps(guide, num_timesteps)
    integer_t = isinstance(guide, (Guide, ComposedGuide, FastGuide))  # these route / check by integer timesteps

    def cond_fn(x, t, y=None, **kwargs):
        if integer_t and isinstance(t, torch.Tensor) and t.is_floating_point():
            if num_timesteps is None:
                raise ValueError("cond_fn got float timesteps: guided-diffusion passes t * 1000 / T when the diffusion "
                                 "was made with rescale_timesteps=True, which a guide cannot route by without T: "
                                 "pass as_cond_fn(guide, num_timesteps=T), or create the diffusion with "
                                 "rescale_timesteps=False (the default) so cond_fn gets the original integer timesteps")
            t = original_timesteps(t, num_timesteps)
        if y is not None and has_class_target(guide):  # per call: a ComposedGuide's list may have gained a class part
            return guide(x, t, target=y)
        return call_guide(guide, x, t)

    return cond_fn


def original_timesteps(t_rescaled: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """guided-diffusion's rescaled ``t * 1000 / T`` (floats) back to the original integer t; values that are no such
    rescale (another T) raise (on accelerators a device-side assert: no host sync)."""
    from .sampling import _assert_tensor_true

    exact = t_rescaled.double() * (num_timesteps / 1000.0)
    t = exact.round()
    _assert_tensor_true(((exact - t).abs() <= 1e-3).all() & (t >= 0).all() & (t < num_timesteps).all(),
                        f"cond_fn got float timesteps that are not t * 1000 / T for integer t in [0, {num_timesteps}) "
                        f"(num_timesteps={num_timesteps}): pass the diffusion's base T", ValueError)
    return t.long()


__all__ = ["Guide", "ClassGuide", "X0HatGuide", "DenseRegressionGuide", "DepthGuide", "SegmentationGuide",
           "ComposedGuide", "InputTransform", "input_transform", "as_cond_fn", "original_timesteps", "check_finite",
           "has_class_target", "resize_labels", "resize_values", "warn_train_mode",
           "IMAGENET_MEAN", "IMAGENET_STD", "NONFINITE_MODES"]
