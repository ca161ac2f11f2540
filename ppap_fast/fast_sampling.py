"""Fast guided sampling: denoiser + guide forward/backward + the fused guided update, per step.

One guided step of :class:`FastGuidedSampler` is

    eps(, v) = denoiser(x_t, t)                       (no grad; optionally compiled, channels_last)
    grad     = d/dx_t guide objective at x_t          (expert merged for the step's band, or routed
                                                       per sample; optional autocast / compile)
    x_{t-1}, x0_hat = ppap_fast.ops.guided_update(x_t, eps, idx, table, v, grad, noise)

with the semantics of :func:`ppap_fast.sampling.sample_loop` (guided-diffusion's ``condition_score``
for DDIM, ``condition_mean`` for DDPM): with the same x_T and the same noise the results agree
within float32 rounding (see tests/test_fast_sampling.py).

Nothing in a step reads a value on the host: the per-sample step index is a long tensor on the
device, the update's coefficient table and ``timestep_map`` live on the device, finite checks use
``torch._assert_async`` on accelerators, and the ExpertBank's host-side range checks are switched
off for the step (indices are validated once, before the step). That is what lets
``cuda_graph=True`` capture the whole step (denoiser + guide + update) on CUDA.

Experts for sampling
--------------------
A PPAP guide (a :class:`ppap_fast.guidance.Guide` whose ``model`` is an :class:`ExpertBank`, or a
:class:`ComposedGuide` of such guides) is run, for a step whose samples all share one step index
(``step(x, int)``, what ``sample`` does), with ``bank.merged(n)`` for the expert ``n`` of that
step's band: LoRA merged into the weights, BatchNorm folded into the convs, no routing (plain
dense layers, the fastest the backbone can be). ``merge_mode="cache"`` (default) builds merged
copies lazily, one per band seen, and keeps them (N copies of the backbone at most; with
``cuda_graph`` one captured step per band; the graphs share one memory pool). ``merge_mode="swap"``
keeps ONE merged copy per bank and copies the next band's merged weights into it in place when
the band changes (N-1 re-merges per sampling run; one graph serves every band since the
parameters keep their addresses): the memory of one backbone and one graph. A batch that mixes step indices (``step(x, idx)``
with a [B] tensor: several requests at different steps served together) routes each sample
through the bank by index instead. ``merge_experts=False`` always routes. A bank in train mode (or
a BatchNorm / Dropout in it: ``bank.model.train()``) is never merged (merging equals the bank in
eval mode only): the mode is read at every step, so a bank
switched to train mode after the sampler was built is routed per sample (as the plain guide would
run it, with a FastSamplingWarning) until ``bank.eval()``, which merges again. A bank's weights
changed after merging are re-merged at the next step when the change bumped a tensor's version
counter or replaced a tensor (in-place writes, loads, ``.to``); torch.optim's ``fused=True``
optimizers write without either: call ``refresh_experts()`` after stepping one.

Options (all off by default; each falls back to the eager path with a warning when it cannot run)
--------------------------------------------------------------------------------------------------
* ``channels_last``: denoiser and merged experts in channels_last memory format (the denoiser's
  parameters are converted in place).
* ``guide_autocast``: torch.float16 / torch.bfloat16 autocast for the guide's forward and backward
  (the gradient comes back in x's dtype). ``model_autocast``: the same for the denoiser's forward (a
  float32 diffusers UNet on a GPU; its output comes back in x's dtype; ADM's ``use_fp16`` torso needs
  none).
* ``compile_guide``: torch.compile of the guide's forward + input-backward (``torch.func.grad``);
  ``compile_model``: torch.compile of the denoiser. ``compile_kwargs`` go to torch.compile.
  ``compile_freeze``: the denoiser is compiled with inductor freezing (its weights become constants
  of the graph: folded, and on CPU prepacked for oneDNN convolutions; the model's weights must not
  change afterwards). An ADMUNet compiled so for CPU computes its large maps' GroupNorm statistics
  per channel (``set_group_norm_stats("channel")``: faster inductor code in the channels-last
  layout freezing gives) and is compiled with inductor's C++ wrapper (the graph's kernel and oneDNN
  calls made from C++). The first call compiles; for the CPU benchmark's tiny ADM + TinyResNet on a
  shared 2-core box that took about 45-55 s with freezing and the C++ wrapper (35 s without it),
  60-75 s cold without freezing, under 20 s from inductor's on-disk cache. Worth it for long runs
  only: it saves about 15-20 ms per step there.
  A compile/trace failure (at the first call) warns once and the eager path is used from then on.
  Merged experts are compiled (one graph per band: with more than 8 bands raise
  ``torch._dynamo.config.recompile_limit``), on the CPU in channels_last (their weights and the
  guide's input); a routed bank (mixed batches) runs eagerly.
* ``cuda_graph``: capture each distinct step (one graph per merged expert, one for routed batches,
  per shape) with static buffers and replay it. Only on CUDA; elsewhere it warns once and runs
  eagerly. A sampler's graphs share one memory pool (they never run at the same time; a graph's
  output may be reused by another graph's replay, so ``step`` returns copies and ``sample`` copies
  x into the next graph's input before replaying it): one activation set for all of them (with a
  pool per graph, ADM-256 + ResNet50 PPAP-10 at batch 32 ran an H100 out of memory at 62 GiB of
  graph pools).
* ``fuse_norm_act``: an ADMUNet runs each ResBlock's GroupNorm (+ scale-shift) + SiLU as one op
  (:func:`ppap_fast.ops.group_norm_act`, Triton on CUDA; ``model.fuse_norm_act()``, in place), and
  its 2x up / down sampling and decoder skip concatenations through :mod:`ppap_fast.ops.resample` and
  :func:`ppap_fast.ops.cat_channels` (Triton on channels_last CUDA tensors).
  Skipped with ``compile_model`` (inductor fuses them); other models warn and run unchanged.
* ``cudnn_benchmark``: on CUDA, ``torch.backends.cudnn.benchmark`` is on during the sampler's steps
  (restored after each): cuDNN times its convolution algorithms once per shape (with ``cuda_graph``
  in the warm-up before capture) instead of taking its heuristic's pick. Elsewhere it warns and does nothing.
* ``overlap_guide``: on CUDA, run the guide (it reads only x_t) on a side stream concurrently with
  the denoiser (the fork/join is captured too); it helps where the denoiser leaves the GPU idle
  (small batches). Elsewhere it warns (at construction) and does nothing. (Written for CUDA; its test
  is skipped without a GPU.)
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from . import guidance as _gd
from .ops import build_table, guided_update
from .ops.lora.segments import _version
from .ops.update import MODES as _MODES
from .sampling import (NONFINITE_MODES, _index_tensor, call_denoiser, check_model_kwargs_batch,
                       check_model_kwargs_mapping, check_sampler_options, denoiser_output, eta_value, initial_noise)
from .schedule import Schedule, check_trained_schedule

MERGE_MODES = ("cache", "swap")

__all__ = ["FastGuidedSampler", "FastGuide", "FastSamplingWarning", "fast_sample_loop", "guide_banks",
           "recommended_options"]


def recommended_options(model, device, *, compile_model: bool = False, fuse_norm_act: bool | None = None) -> dict:
    """The denoiser options the fast path should use on ``device`` (``FastGuidedSampler(**...)``), as
    measured on an H100 with ADM-256 at batch 32 (benchmarks/NOTES.md): on CUDA the fused GroupNorm +
    SiLU where the model has it (``fuse_norm_act``; 252 ms a guided step vs 571 ms unfused), in
    channels_last only when fused or compiled (eager unfused, channels_last made the denoiser slower:
    568 vs 415 ms, from GroupNorm's casts and layout copies), and cuDNN's algorithm timing. On the
    CPU, with ``compile_model``: inductor freezing (``compile_freeze``; oneDNN-prepacked convolutions,
    faster to compile too: the CPU benchmark's fast step, 0.60 of the reference). ``fuse_norm_act``
    True / False overrides the automatic choice."""
    cuda = torch.device(device).type == "cuda"
    can_fuse = callable(getattr(model, "fuse_norm_act", None)) and not compile_model
    fuse = (cuda and can_fuse) if fuse_norm_act is None else bool(fuse_norm_act)
    return {"compile_model": bool(compile_model), "fuse_norm_act": fuse,
            "channels_last": cuda and ((fuse and can_fuse) or compile_model),
            "cudnn_benchmark": cuda, "compile_freeze": torch.device(device).type == "cpu" and bool(compile_model)}


class FastSamplingWarning(UserWarning):
    """An optional speed-up (compile, CUDA graph, merging) could not be used; the eager path runs."""


def _compile(fn, **kwargs):
    """torch.compile (a seam for tests)."""
    return torch.compile(fn, **kwargs)


# ----------------------------------------------------------------------------- guide plumbing
def _bank_of(guide):
    from .experts import ExpertBank

    model = getattr(guide, "model", None)
    if isinstance(guide, _gd.Guide) and isinstance(model, ExpertBank) and getattr(guide, "pass_t", False):
        return model
    return None


def guide_banks(guide, through_fast: bool = False) -> list:
    """The ExpertBanks a guide routes through (its own, or those of a ComposedGuide's parts); ``through_fast``:
    also those of a FastGuide's guide (for the checks against a schedule)."""
    if through_fast and isinstance(guide, FastGuide):
        return guide_banks(guide.source, True)
    if isinstance(guide, _gd.ComposedGuide):
        out = []
        for g, _ in guide.guides:
            for b in guide_banks(g, through_fast):
                if all(b is not o for o in out):
                    out.append(b)
        return out
    b = _bank_of(guide)
    return [] if b is None else [b]


def _wrapped_banks(guide) -> bool:
    """Whether a FastGuide (the guide, or a part of a ComposedGuide) hides banks it would merge."""
    if isinstance(guide, FastGuide):
        return bool(guide.banks) and guide._merge_wanted
    return isinstance(guide, _gd.ComposedGuide) and any(_wrapped_banks(g) for g, _ in guide.guides)


def _x0hat_guides(guide) -> list:
    if isinstance(guide, FastGuide):
        return _x0hat_guides(guide.source)
    if isinstance(guide, _gd.ComposedGuide):
        return [x for g, _ in guide.guides for x in _x0hat_guides(g)]
    return [guide] if isinstance(guide, _gd.X0HatGuide) else []


def check_guide_timesteps(guide, num_timesteps: int, schedule=None) -> None:
    """The guide's ExpertBanks must split, and an X0HatGuide's alphas_cumprod cover, the schedule's own T:
    with a shorter schedule a bank's steps silently reached only its first experts (T=500 with a T=1000 bank:
    experts 0-2 of 5) and x0-hat took another schedule's abar; with a longer one they left the bank. A guide
    given as a FastGuide is checked too (it was not). With ``schedule`` (a possibly respaced Schedule) an
    X0HatGuide's table must also hold its values (a cosine table under a linear sampler: x0-hat silently wrong)."""
    for g in _x0hat_guides(guide):
        if g.acp.numel() != num_timesteps:
            raise ValueError(f"the schedule has T={num_timesteps} base timesteps, but the X0HatGuide's alphas_cumprod "
                             f"has {g.acp.numel()}: give it the base table of this schedule (Schedule.create(name, "
                             f"{num_timesteps}))")
        if schedule is not None:
            own = schedule.alphas_cumprod.detach().cpu().double()
            if not torch.allclose(g.acp[schedule.timestep_map.cpu()], own, rtol=1e-4, atol=1e-7):
                raise ValueError("the X0HatGuide's alphas_cumprod is not the sampler schedule's (another beta "
                                 "schedule): x0-hat would use the wrong abar_t; give it the base table of this "
                                 f"schedule (Schedule.create(name, {num_timesteps}))")
    for b in guide_banks(guide, through_fast=True):
        if b.num_timesteps != num_timesteps:
            raise ValueError(f"the schedule has T={num_timesteps} base timesteps, but an ExpertBank of the guide splits "
                             f"T={b.num_timesteps} into its experts' bands, which would route the steps to the wrong "
                             f"experts: use a schedule of {b.num_timesteps} base steps (Schedule.create(name, "
                             f"{b.num_timesteps}, respacing)), or a bank trained for this schedule")


@contextlib.contextmanager
def _no_host_checks(banks):
    """Switch off the banks' host-side range checks (indices were validated before the step)."""
    old = [b.check_inputs for b in banks]
    try:
        for b in banks:
            b.check_inputs = False
        yield
    finally:
        for b, o in zip(banks, old):
            b.check_inputs = o


def _on_device(guide, device, seen: dict | None = None):
    """A shallow copy of a guide whose tensor targets already sit on `device` (no per-step H2D copy); ``seen``
    records the copies made (as ``_sync_view`` does: an in-place change is copied into them)."""
    if isinstance(guide, _gd.ComposedGuide):  # its parts' targets too (they were copied at every step)
        parts = [(_on_device(g, device, seen), w) for g, w in guide.guides]
        if all(p is g for (p, _), (g, _) in zip(parts, guide.guides)):
            return guide
        guide = copy.copy(guide)
        guide.guides = parts
        return guide
    moved = {}
    tgt = getattr(guide, "target", None)
    if isinstance(tgt, _gd._ClassTarget) and isinstance(tgt.target, torch.Tensor) and tgt.target.device != device:
        moved["target"] = (tgt.target, copy.copy(tgt))
        moved["target"][1].target = tgt.target.to(device)
    tmap = getattr(guide, "target_map", None)
    if isinstance(guide, _gd._DenseGuide) and isinstance(tmap, torch.Tensor) and tmap.device != device:
        moved["target_map"] = (tmap, tmap.to(device))
    if not moved:
        return guide
    guide = copy.copy(guide)
    for k, (src, val) in moved.items():
        setattr(guide, k, val)
        if seen is not None:
            seen[(id(guide), k)] = (src, _version(src), val)
    return guide


def _tensor_slots(module) -> list:
    """(registry, name) of every parameter and buffer of ``module``: the tensor found there now (a replaced one too)."""
    return [(d, k) for m in module.modules() for d in (m._parameters, m._buffers) for k in d]


def _same_layout(a, b) -> bool:
    """Whether two modules' state tensors have the same names, shapes, dtypes and devices."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        (v.shape, v.dtype, v.device) == (sb[k].shape, sb[k].dtype, sb[k].device) for k, v in sa.items())


def _copy_state(dst, src) -> None:
    """Copy ``src``'s state tensors into ``dst``'s in place (same layout: captured graphs keep reading them)."""
    state = src.state_dict()
    for name, t in dst.state_dict().items():
        t.copy_(state[name])


def _channels_last_model(model) -> bool:
    """Whether a module's 4-D weights are in channels_last (and some not also NCHW-contiguous)."""
    if not isinstance(model, torch.nn.Module):
        return False
    ws = [p for p in model.parameters() if p.dim() == 4]
    return bool(ws) and all(w.is_contiguous(memory_format=torch.channels_last) for w in ws) \
        and any(not w.is_contiguous() for w in ws)


_PARTS_CHANGED = ("the ComposedGuide's list of guides changed (a part added, removed or replaced) after a FastGuide / "
                  "FastGuidedSampler / PPAPGuidance was built on it: build a new one for the new list (weights, and a "
                  "part's scale or target, may change in place)")


def _parts(g) -> tuple:
    """A ComposedGuide's parts, nested (the objects: a part added, removed or replaced is told by identity)."""
    return tuple((p, _parts(p)) for p, _ in g.guides) if isinstance(g, _gd.ComposedGuide) else ()


def _same_parts(rec: tuple, g) -> bool:
    if not isinstance(g, _gd.ComposedGuide):
        return not rec
    return len(g.guides) == len(rec) and all(p is q and _same_parts(sub, q) for (p, sub), (q, _) in zip(rec, g.guides))


class _GradRunner:
    """grad = scale * d/dx objective for one guide variant (merged expert n, or routed)."""

    def __init__(self, guide, opts: "_Opts", banks, cpu_channels_last: bool = False, path: tuple = ()):
        self.guide, self.opts, self.banks = guide, opts, banks
        self.path = path  # position in a ComposedGuide: the runners of every band at one path run one sub-guide
        # merged experts compiled on the CPU run in channels_last (FastGuide._merged_model converts them;
        # a plain classifier of a ComposedGuide keeps its layout)
        self.cpu_channels_last = bool(cpu_channels_last) and _channels_last_model(getattr(guide, "model", None))
        self.children = None
        if isinstance(guide, _gd.ComposedGuide):
            self.children = [(_GradRunner(g, opts, banks, cpu_channels_last, path + (i,)), w)
                             for i, (g, w) in enumerate(guide.guides)]
        self._compiled = None
        # A routed bank is not compiled: its router's per-forward state does not trace under torch.func.
        self._compile_ok = opts.compile_guide and isinstance(guide, _gd.Guide) and _bank_of(guide) is None
        plain = ("plain guide warned", path)  # once, not again for each band's merged variant
        if opts.compile_guide and not isinstance(guide, (_gd.Guide, _gd.ComposedGuide)) and plain not in opts.state:
            opts.state.add(plain)
            warnings.warn(f"compile_guide: the guide ({type(guide).__name__}) is a plain callable, not a ppap_fast "
                          "Guide whose objective can be compiled; running it eagerly", FastSamplingWarning,
                          stacklevel=4)

    def _ctx(self, device):
        return _autocast(device, self.opts.guide_autocast)

    def _input(self, x):
        x = x.detach()
        cpu_cl = self.cpu_channels_last and self._compile_ok and x.device.type == "cpu"
        if (self.opts.channels_last or cpu_cl) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _eager(self, x, t, **kw):
        g_obj = self.guide
        xl = self._input(x).requires_grad_(True)
        with torch.enable_grad(), self._ctx(x.device):
            try:
                obj = g_obj._objective_sum(g_obj.objective(xl, t, **kw))
            except RuntimeError as e:
                _gd._raise_explained(g_obj, x, e)
                raise
        return g_obj._apply_scale(_gd.grad_wrt_input(obj, xl, g_obj.name))

    def _functional(self, x, t, **kw):
        g_obj, ctx = self.guide, self._ctx

        def objective(xx, tt):
            with ctx(xx.device):
                obj = g_obj._objective_sum(g_obj.objective(xx, tt, **kw)).float()
            if not obj.requires_grad:  # under torch.func.grad: obj does not depend on xx (its gradient was all zeros)
                _gd.grad_wrt_input(obj, xx, g_obj.name)  # raises its ValueError
            return obj

        return g_obj._apply_scale(torch.func.grad(objective)(self._input(x), t))

    def __call__(self, x, t, checked: bool = True, target=None):
        """``target``: overrides the class target of the (sub-)guides that have one (as ComposedGuide's)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("guidance needs autograd (the gradient wrt x_t), which torch.inference_mode() "
                               "disables: sample under torch.no_grad() instead")
        if self.children is not None:  # weights read now (not at construction): the guide's may have changed
            parts = self.guide.guides
            if len(parts) != len(self.children) or any(c.guide is not g
                                                       for (c, _), (g, _) in zip(self.children, parts)):
                raise ValueError(_PARTS_CHANGED)  # zip left an appended part out silently (or ran a replaced one)
            # children left at "raise" must not raise before a lenient policy: this one's, or (checked=False)
            # a lenient outer composition's
            lenient = not checked or self.guide.nonfinite != "raise"
            total = _gd.weighted_grad_sum(
                (child(x, t, checked=not (lenient and getattr(child.guide, "nonfinite", None) == "raise"),
                       target=target), w)
                for (child, _), (_, w) in zip(self.children, parts))
            return _gd.check_finite(total, self.guide.nonfinite, self.guide.name) if checked else total
        if not isinstance(self.guide, _gd.Guide):  # an opaque callable guide(x_t, t) -> grad
            # a FastGuide of a ClassGuide takes the target override too (it was dropped silently)
            kw = {"target": target} if target is not None and _gd.has_class_target(self.guide) else {}
            with torch.enable_grad(), self._ctx(x.device):  # autocast and channels_last apply (they were ignored)
                return _gd.call_guide(self.guide, self._input(x), t, **kw)
        kw = {"target": target} if target is not None and _gd.has_class_target(self.guide) else {}
        with _no_host_checks(self.banks):
            g = None
            failed = ("guide compile failed", self.path)
            if self._compile_ok and failed in self.opts.state:  # another band's compile of it failed: not retried
                self._compile_ok = False
            compile_exc = None
            ready = True
            if self._compile_ok and kw:  # a per-call target's range is read here, on the host, not in the trace
                ct = getattr(self.guide, "target", None)
                tgt = ct.precheck(target) if isinstance(ct, _gd._ClassTarget) else target
                ready = tgt is not None  # None: class count unknown until the guide has run (eagerly, below)
                kw = {"target": tgt} if ready else kw
            if self._compile_ok and ready:
                try:
                    if self._compiled is None:
                        self._compiled = _compile(self._functional, **self.opts.compile_kwargs)
                    with _gd.prechecked_targets():
                        g = self._compiled(x, t, **kw)
                except Exception as exc:  # noqa: BLE001 - any compile/trace error -> eager
                    compile_exc, g = exc, None
            if compile_exc is not None:
                # the guide's own error (e.g. out-of-range labels) raises here too: not a failed compile
                g = self._eager(x, t, **kw)
                self._compile_ok = False
                self.opts.state.add(failed)
                warnings.warn(f"torch.compile of the guide failed ({type(compile_exc).__name__}: "
                              f"{str(compile_exc).splitlines()[0] if str(compile_exc) else ''}); using the eager "
                              "guide", FastSamplingWarning, stacklevel=3)
            if g is None:
                g = self._eager(x, t, **kw)
        g = g.detach().to(x.dtype)
        return _gd.check_finite(g, self.guide.nonfinite, self.guide.name) if checked else g


@contextlib.contextmanager
def _freezing(on: bool, cpu: bool = False):
    """Inductor freezing for what compiles (or recompiles) inside; torch.compile's ``options`` do
    not reach it, so the global config is patched for the call. On the CPU also inductor's C++
    wrapper: the frozen graph's ~400 kernel and oneDNN calls made from C++, not Python (the CPU
    benchmark's denoiser: 0.97 of the Python wrapper's time, ~20 s more compile)."""
    if not on:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True, cpp_wrapper=bool(cpu)):
        yield


def _denoiser_compile_kwargs(model, opts: "_Opts") -> dict:
    """torch.compile kwargs for the denoiser; with compile_freeze an ADMUNet on the CPU takes
    per-channel GroupNorm statistics. (Its module guards stay: skipping them made a second frozen
    model of the same class run the first one's graph, weights included.)"""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters()) if isinstance(model, torch.nn.Module) else False
    if opts.compile_freeze and on_cpu and callable(getattr(model, "set_group_norm_stats", None)):
        model.set_group_norm_stats("channel")
    return dict(opts.compile_kwargs)


class _ModelRunner:
    def __init__(self, model, opts: "_Opts", model_kwargs):
        check_model_kwargs_mapping(model_kwargs)  # dict() failed unreadably
        self.model, self.opts, self.kwargs = model, opts, dict(model_kwargs or {})
        self._compiled = None
        self._compile_ok = opts.compile_model
        self._batch_checked = None

    def _check_batch(self, b: int) -> None:
        check_model_kwargs_batch(self.kwargs, b)  # once per batch size
        self._batch_checked = b

    def __call__(self, x, t):
        if x.shape[0] != self._batch_checked:
            self._check_batch(x.shape[0])
        if self.opts.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(x.device, self.opts.model_autocast):
            failure = None
            if self._compile_ok:
                try:
                    if self._compiled is None:
                        self._compiled = _compile(self.model, **_denoiser_compile_kwargs(self.model, self.opts))
                    with _freezing(self.opts.compile_freeze, cpu=x.device.type == "cpu"):
                        return denoiser_output(self._compiled(x, t, **self.kwargs))
                except Exception as exc:  # noqa: BLE001
                    # the message only: the exception's frames would hold the failed call's tensors
                    failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out = denoiser_output(call_denoiser(self.model, x, t, self.kwargs))
            if failure is not None:  # the eager run succeeded: the model's own error (bad model_kwargs) raised above
                self._compile_ok = False
                warnings.warn(f"torch.compile of the denoiser failed ({failure}); using the eager denoiser",
                              FastSamplingWarning, stacklevel=3)
            return out


def _flag(value, name: str) -> bool:
    """An on/off option as a bool; a string ("false" is truthy) or another non-boolean value is refused."""
    if value is None or isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    import numpy as np

    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def _autocast_dtype(dtype, name):
    if dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be None, torch.float16 or torch.bfloat16, got {dtype!r}")
    return dtype


def _check_cuda_visible(device: torch.device) -> None:
    """device='cuda' without a GPU raised torch's 'Found no NVIDIA driver' from deep inside."""
    if device.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RuntimeError(f"device={str(device)!r}: torch sees no CUDA device (no GPU or driver visible); "
                           f"use device='cpu'")
    if device.index is not None and device.index >= count:
        raise RuntimeError(f"device={str(device)!r}: torch sees {count} CUDA device(s) (cuda:0 to cuda:{count - 1})")


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    # no weight-cast cache: a cache filled during CUDA-graph capture would be reused outside it
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


class _Opts:
    def __init__(self, channels_last, guide_autocast, compile_guide, compile_model, compile_kwargs,
                 compile_freeze=False, model_autocast=None):
        self.channels_last = _flag(channels_last, "channels_last")
        self.guide_autocast = _autocast_dtype(guide_autocast, "guide_autocast")
        self.model_autocast = _autocast_dtype(model_autocast, "model_autocast")
        self.compile_guide = _flag(compile_guide, "compile_guide")
        self.compile_model = _flag(compile_model, "compile_model")
        if compile_kwargs is not None and not isinstance(compile_kwargs, Mapping):  # dict() failed unreadably
            raise TypeError(f"compile_kwargs must be a dict of torch.compile keyword arguments (e.g. {{'mode': "
                            f"'max-autotune'}}), got {type(compile_kwargs).__name__}")
        self.compile_kwargs = dict(compile_kwargs or {})
        self.compile_freeze = _flag(compile_freeze, "compile_freeze")
        self.state: set = set()  # shared by the runners of one sampler / FastGuide: failures, once-only warnings


def _guide_state(g, device=None, versions: bool = True) -> tuple:
    """What a guide's gradient depends on besides its network, as host values (no device read): scalar
    attributes (scale, ...), the identity and in-place version of tensors (targets), ComposedGuide weights.
    An inference tensor keeps no version: its in-place changes are not seen (assign a new tensor instead).
    A tensor already on ``device`` counts by identity only: the views share it and a captured step reads it
    at every replay, so an in-place change (the CLI's per-batch targets) needs no sync and no new graphs.
    ``versions=False``: no target's version (what is left when only off-device targets changed in place)."""
    if isinstance(g, _gd.ComposedGuide):
        return (id(g), g.nonfinite, tuple((_guide_state(c, device, versions), _tensor_state(w, device))
                                          for c, w in g.guides))
    out = []
    for k, v in vars(g).items():
        if k.startswith("_"):  # private caches and once-only flags
            continue
        if isinstance(v, _gd._ClassTarget):
            v = v.target
        if isinstance(v, torch.Tensor):
            on = device is not None and v.device == device
            moved = not versions and k in ("target", "target_map")  # copied into the views' device copies
            out.append((k, id(v)) if on or moved else (k, id(v), _version(v)))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out.append((k, v))
        else:
            out.append((k, id(v)))
    return tuple(out)


def _tensor_state(v, device):
    """A per-sample weight as a comparable host value: a tensor by identity (and version, off ``device``); compared
    by value, a [B] tensor raised "Boolean value of Tensor ... is ambiguous"."""
    if not isinstance(v, torch.Tensor):
        return v
    return (id(v),) if device is not None and v.device == device else (id(v), _version(v))


def _sync_view(view, src, device, seen: dict, follow_model: bool = False, fresh: list | None = None):
    """Make ``view`` (a shallow copy of guide ``src`` that owns a merged model and / or on-device targets)
    read every other attribute from ``src`` as it is now (scale, target, nonfinite, ComposedGuide weights);
    ``follow_model``: its network too (a view that only moved the targets owns no model of its own).
    An off-device target changed in place is copied into the view's device copy (captured steps read it there);
    ``fresh`` gets the name of each target that needed a new device tensor instead."""
    if view is src:
        return
    if isinstance(src, _gd.ComposedGuide):
        if len(view.guides) != len(src.guides):
            raise ValueError(_PARTS_CHANGED)
        view.nonfinite = src.nonfinite
        for (v, _), (g, _) in zip(view.guides, src.guides):
            _sync_view(v, g, device, seen, follow_model, fresh)
        view.guides = [(v, w) for (v, _), (_, w) in zip(view.guides, src.guides)]
        return
    keep = ("model", "pass_t") if not follow_model and view.__dict__.get("model") is not src.__dict__.get("model") \
        else ()
    for k, val in vars(src).items():
        if k in keep:
            continue
        if device is not None and k in ("target", "target_map"):
            tens = val.target if isinstance(val, _gd._ClassTarget) else val
            if isinstance(tens, torch.Tensor) and tens.device != device:  # one H2D copy per change, not per step
                ck = (id(view), k)
                old = seen.get(ck)
                if old is None or old[0] is not tens or old[1] != _version(tens):
                    prev = None if old is None or view.__dict__.get(k) is not old[2] else \
                        (old[2].target if isinstance(old[2], _gd._ClassTarget) else old[2])
                    if isinstance(prev, torch.Tensor) and prev.shape == tens.shape and prev.dtype == tens.dtype \
                            and not prev.is_inference():
                        moved = prev.copy_(tens)  # same address: the captured steps stay valid
                    else:
                        moved = tens.to(device)
                        if fresh is not None:
                            fresh.append(k)
                    if isinstance(val, _gd._ClassTarget):
                        moved_val = copy.copy(val)
                        moved_val.target = moved
                    else:
                        moved_val = moved
                    seen[ck] = (tens, _version(tens), moved_val)
                val = seen[ck][2]
        setattr(view, k, val)


class _Graph:
    __slots__ = ("graph", "x", "idx", "noise", "out")


class FastGuide:
    """``guide(x_t, t) -> grad`` with the sampling-time speed-ups of this module, usable alone.

    ``fast(x, t, t_host=None)``: t the original timesteps (long [B] on x's device, or an int). When
    every sample is at the same original timestep and the caller knows it on the host (``t_host``,
    an int; e.g. the loop's counter or a CPU scheduler timestep; an int t is its own), a PPAP guide
    runs with the merged experts of that band; otherwise it routes per sample through its
    ExpertBank(s). Other guides run as they are (with autocast / channels_last / compile as configured).
    """

    def __init__(self, guide: Callable, device=None, *, merge_experts: bool = True, channels_last: bool = False,
                 guide_autocast: torch.dtype | None = None, compile_guide: bool = False,
                 compile_kwargs: Mapping | None = None, opts: "_Opts | None" = None, merge_mode: str = "cache",
                 _stacklevel: int = 2):
        if not callable(guide):
            raise TypeError(f"guide must be callable guide(x_t, t), got {type(guide).__name__}")
        if merge_mode not in MERGE_MODES:
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        self.merge_mode = merge_mode
        self.opts = opts if opts is not None else _Opts(channels_last, guide_autocast, compile_guide, False,
                                                        compile_kwargs)
        self.device = None if device is None else torch.device(device)
        self.source = guide
        self._moved: dict = {}
        self.guide = guide if self.device is None else _on_device(guide, self.device, self._moved)
        self.banks = guide_banks(self.guide)
        self._merge_wanted = _flag(merge_experts, "merge_experts")
        self._merge_requested = bool(merge_experts) and bool(self.banks)
        self._train_mode_warned = False
        self._dependent = self._mode_dependent()
        if self._merge_requested and self._bank_training():
            warnings.warn("an ExpertBank (or a BatchNorm / Dropout in it) is in train mode: merged experts equal the "
                          "bank in eval mode only; routing per sample instead of merging (call bank.eval() to merge)",
                          FastSamplingWarning, stacklevel=_stacklevel)
            self._train_mode_warned = True
        if self.opts.compile_guide and self.banks and not merge_experts:  # it was ignored silently
            warnings.warn("compile_guide: with merge_experts=False the guide's ExpertBank routes per sample, which runs "
                          "eagerly (only merged experts are compiled)", FastSamplingWarning, stacklevel=_stacklevel)
        self._merged_models: dict = {}
        self._loaded: dict = {}  # swap mode: id(bank) -> expert whose weights the merged copy holds
        self._variants: dict = {}
        self._routed = _GradRunner(self.guide, self.opts, self.banks)
        self.swaps = 0
        # in-place changes of a bank's tensors (load_experts_into, training) bump their version counters
        self._bank_tensors = {id(b): _tensor_slots(b) for b in self.banks}
        self._versions = self._bank_versions()
        self._state = _guide_state(self.source, self.device)
        self._layout = _guide_state(self.source, self.device, versions=False)
        self._parts = _parts(self.source)
        self._modes = self._bank_modes()
        self.generation = 0  # bumped when the guide or its banks changed (CUDA graphs of old ones are stale)
        self.num_timesteps: int | None = None  # the sampler's base T: a guide changed later is checked against it
        self._synced_for_runner = False  # key() synced this step: the runner() that follows skips its sync

    @property
    def merge_experts(self) -> bool:
        """Whether steps run merged experts now: requested, and no bank in train mode (read every step)."""
        return self._merge_requested and not self._bank_training()

    def _mode_dependent(self) -> list:
        return [m for b in self.banks for m in b.modules() if _gd._depends_on_train_mode(m)]

    def _bank_training(self) -> bool:
        """A bank in train mode, or a BatchNorm / Dropout in one (``bank.model.train()`` leaves ``bank.training``
        False; merged experts were used, the guide's own warning only)."""
        return any(b.training for b in self.banks) or any(m.training for m in self._dependent)

    def _cpu_channels_last(self, model) -> bool:
        """A merged expert compiled for the CPU runs in channels_last: inductor's forward + input-backward
        of the CPU benchmark's TinyResNet took 0.80 of the NCHW time (benchmarks/NOTES.md)."""
        return self.opts.compile_guide and all(p.device.type == "cpu" for p in model.parameters())

    def key(self, t_host: int | None, runner_follows: bool = False) -> tuple | None:
        """Merged-variant key (expert id per bank) for original timestep t_host; None = routed.
        ``runner_follows``: the caller calls runner() next, in the same step (which then skips its sync)."""
        self.sync()  # the bands of the banks the guide holds now (a bank replaced since: its old bands chose)
        self._synced_for_runner = runner_follows  # a key() alone left the next step's runner() unsynced
        if self._merge_requested and self._bank_training():
            if not self._train_mode_warned:
                warnings.warn("an ExpertBank was switched to train mode after this sampler was built: its merged "
                              "experts equal the bank in eval mode only, so steps route per sample through the "
                              "bank in train mode (as the guide itself runs) until bank.eval(), which merges "
                              "again", FastSamplingWarning, stacklevel=4)
                self._train_mode_warned = True
            return None
        self._train_mode_warned = False  # warned again at the next switch
        if t_host is None or not self.merge_experts:
            return None
        t_host = int(t_host)
        for b in self.banks:  # it failed as "expert -1 out of range", naming no timestep
            if not 0 <= t_host < b.num_timesteps:
                raise ValueError(f"timestep {t_host} out of range [0, {b.num_timesteps}) of the guide's ExpertBank")
        return tuple(t_host // b.band for b in self.banks)

    def _merged_model(self, bank, n):
        key = (id(bank), n) if self.merge_mode == "cache" else id(bank)
        m = self._merged_models.get(key)
        if m is None:
            m = bank.merged(n)
            if self.opts.channels_last or self._cpu_channels_last(m):
                m = m.to(memory_format=torch.channels_last)
            self._merged_models[key] = m
            self._loaded[id(bank)] = n
        return m

    @torch.no_grad()
    def _swap_to(self, key):
        """swap mode: make each bank's single merged copy hold the experts of ``key`` (in place)."""
        for bank, n in zip(self.banks, key):
            m = self._merged_models.get(id(bank))
            if m is None or self._loaded[id(bank)] == n:
                continue
            _copy_state(m, bank.merged(n))
            self._loaded[id(bank)] = n
            self.swaps += 1

    def variant_key(self, key):
        """Key of the runner (and captured graph) serving expert key ``key``: one for all bands in swap mode."""
        return key if key is None or self.merge_mode == "cache" else "swap"

    def _merge(self, guide, experts: dict):
        if isinstance(guide, _gd.ComposedGuide):
            new = copy.copy(guide)
            new.guides = [(self._merge(g, experts), w) for g, w in guide.guides]
            return new
        bank = _bank_of(guide)
        if bank is None:
            return guide
        new = copy.copy(guide)
        new.model = self._merged_model(bank, experts[id(bank)])
        new.pass_t = False
        return new

    def _bank_modes(self) -> tuple:
        """(module identity, train mode) of every module of the banks: a module replaced is seen too."""
        return tuple((id(m), m.training) for b in self.banks for m in b.modules())

    def _bank_versions(self) -> dict:
        """Per bank, each tensor's identity, storage, dtype and version: new tensors (load_state_dict(assign=True),
        ``p.data = ...``, ``bank.double()``) change it as in-place writes do."""
        return {k: tuple((id(t), t.data_ptr(), t.dtype, _version(t)) for d, name in slots
                         if (t := d[name]) is not None)
                for k, slots in self._bank_tensors.items()}

    def sync(self) -> None:
        """Follow changes of the user's guide since the last step: its scale, targets or ComposedGuide
        weights (copied into the device / merged views), and its banks' weights (merged copies re-merged in
        place: parameter addresses kept) or train / eval modes. Host-side checks only; ``generation``
        counts the changes (captured CUDA graphs of an older one are dropped)."""
        if not _same_parts(self._parts, self.source):
            self._parts_changed()
            return
        state, versions, modes = _guide_state(self.source, self.device), self._bank_versions(), self._bank_modes()
        if state == self._state and versions == self._versions and modes == self._modes:
            return
        if state != self._state and self.num_timesteps is not None:  # before anything is taken over
            check_guide_timesteps(self.source, self.num_timesteps)
        layout = _guide_state(self.source, self.device, versions=False)
        targets_only = layout == self._layout and versions == self._versions and modes == self._modes
        old_modes, self._modes = self._modes, modes  # a graph captured in the other mode (BatchNorm, Dropout) is stale
        self._state, self._layout = state, layout
        fresh: list = []
        _sync_view(self.guide, self.source, self.device, self._moved, follow_model=True, fresh=fresh)
        if [id(b) for b in guide_banks(self.guide)] != [id(b) for b in self.banks]:
            self._reset_banks()  # guide.model = another bank: the merged experts were the old bank's, silently
            self.generation += 1
            return
        if [i for i, _ in modes] != [i for i, _ in old_modes]:  # bank.model.fc = ...: its tensors were not followed
            self._reset_banks()
            self.generation += 1
            return
        for v in self._variants.values():
            _sync_view(v.guide, self.guide, None, self._moved)
        changed = {k for k, n in versions.items() if n != self._versions[k]}
        self._versions = versions
        if changed:
            self._refresh_merged(changed)
        if not (targets_only and not fresh):  # off-device targets copied in place only: the graphs stay valid
            self.generation += 1

    def refresh_experts(self) -> None:
        """Merge every expert again from the banks as they are now (for writes that leave the tensors' version
        counters as they were: torch.optim's fused=True optimizers); captured CUDA graphs are dropped."""
        self._reset_banks()
        self.generation += 1

    def _parts_changed(self) -> None:
        """A ComposedGuide part added, removed or replaced: the runners (and merged views) are built anew from the
        guide as it is (they ran the old parts: a merged view took the new part's attributes onto the old one),
        with the parts' targets moved to the device once, as at construction (else copied at every step)."""
        if self.num_timesteps is not None:
            check_guide_timesteps(self.source, self.num_timesteps)
        self._parts = _parts(self.source)
        if self.device is not None:  # a new view: the old one's device copies are the old parts'
            self._moved = {}
            self.guide = _on_device(self.source, self.device, self._moved)
        self._reset_banks()
        self._state = _guide_state(self.source, self.device)
        self._layout = _guide_state(self.source, self.device, versions=False)
        self.generation += 1

    def _reset_banks(self) -> None:
        """Drop the merged copies and runners of the banks the guide held before, for the ones it holds now."""
        self.banks = guide_banks(self.guide)
        self._merge_requested = self._merge_wanted and bool(self.banks)
        self._merged_models, self._loaded, self._variants = {}, {}, {}
        self._routed = _GradRunner(self.guide, self.opts, self.banks)
        self._bank_tensors = {id(b): _tensor_slots(b) for b in self.banks}
        self._versions, self._modes = self._bank_versions(), self._bank_modes()
        self._dependent = self._mode_dependent()
        self._train_mode_warned = False

    @torch.no_grad()
    def _refresh_merged(self, changed: set) -> None:
        for bank in self.banks:
            if id(bank) not in changed:
                continue
            copies = [(key, m) for key, m in self._merged_models.items()
                      if key == id(bank) or (isinstance(key, tuple) and key[0] == id(bank))]
            for key, m in copies:
                n = key[1] if isinstance(key, tuple) else self._loaded.get(id(bank))
                src = bank.merged(0 if n is None else n)
                if not _same_layout(m, src):  # a dtype / device / shape change: copy_ would keep the old one
                    self._reset_banks()
                    return
                if self.merge_mode == "swap":
                    self._loaded[id(bank)] = None  # the next _swap_to copies the new weights in
                    continue
                _copy_state(m, src)

    def runner(self, key):
        """The grad runner for a merged key, or the routed runner for key None."""
        if not self._synced_for_runner:
            self.sync()
        self._synced_for_runner = False
        _gd.warn_train_mode(self.source, stacklevel=4)
        if key is None:
            return self._routed
        vkey = self.variant_key(key)
        v = self._variants.get(vkey)
        if v is None:
            experts = {id(b): n for b, n in zip(self.banks, key)}
            v = _GradRunner(self._merge(self.guide, experts), self.opts, [], cpu_channels_last=self.opts.compile_guide)
            self._variants[vkey] = v
        if self.merge_mode == "swap":
            self._swap_to(key)
        return v

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_host: int | None = None, target=None) -> torch.Tensor:
        """``target``: overrides the class target of a ClassGuide / X0HatGuide (and of a ComposedGuide's ones).
        ``t_host`` must be every sample's t: checked when t is an int or on the CPU (a GPU t would cost a sync)."""
        t, t_host = _gd.as_int_or_tensor(t), _gd.as_int_or_tensor(t_host)
        if isinstance(t, torch.Tensor):  # the merged path reads t unchecked (an X0HatGuide indexes its table by it)
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"FastGuide: t must hold integer original timesteps, got dtype {t.dtype}")
            if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != x.shape[0]):
                raise ValueError(f"FastGuide: t must be an int or a tensor [{x.shape[0]}] (one timestep per sample), "
                                 f"got shape {tuple(t.shape)}")
        if isinstance(t, int) and not isinstance(t, bool):  # the guides' objectives index by a tensor t
            if t_host is None:  # an int t is known on the host: the merged expert (it routed per sample)
                t_host = t
            elif isinstance(t_host, int) and t_host != t:  # host-only: checked on every device
                _t_host_mismatch(t_host, [t])
            t = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if t_host is not None and isinstance(t, torch.Tensor) and t.device.type == "cpu" and bool((t != t_host).any()):
            _t_host_mismatch(t_host, t.unique().tolist()[:5])
        return self.runner(self.key(t_host, runner_follows=True))(x, t, target=target)


def _t_host_mismatch(t_host, held: list):
    raise ValueError(f"FastGuide: t_host={t_host} but t holds {held}; t_host selects the merged expert, so it must "
                     "equal every sample's t (or pass t_host=None to route by t)")


# ----------------------------------------------------------------------------- the sampler
class FastGuidedSampler:
    """Guided DDIM / DDPM sampling with the fused update and sampling-time expert merging.

    Args:
        model: denoiser ``model(x, t, **model_kwargs) -> eps`` ([B, C] or [B, 2C] channels), t the
            original timesteps (long [B]); it runs under no_grad.
        schedule: the (respaced) :class:`Schedule`; moved to ``device`` (default: its own device).
        sampler: "ddim" (``eta``; condition_score) or "ddpm" (``var_type``; condition_mean).
        guide: None, or ``guide(x_t, t) -> grad`` (scale included); PPAP guides are merged per band.
        var_type: DDPM variance: None (fixed_large for C outputs, learned_range for 2C, as the
            reference), "learned_range", "fixed_small" or "fixed_large".
        nonfinite_grad: "raise" | "zero" | "ignore", as ``sampling.sample_loop`` (raise is a
            device-side assert on accelerators).
        backend: guided_update backend (None = fastest available).
        clip_denoised: clamp x0_hat to [-1, 1] (as ``sample_loop``).
        See the module docstring for merge_experts, merge_mode, channels_last, guide_autocast, model_autocast,
        compile_guide, compile_model, compile_kwargs, compile_freeze, cuda_graph, overlap_guide, fuse_norm_act,
        cudnn_benchmark.

    The attribute ``applied_options`` holds the options in effect (after fallbacks so far).
    """

    def __init__(self, model: Callable, schedule: Schedule, *, sampler: str = "ddim", guide: Callable | None = None,
                 eta: float = 0.0, var_type: str | None = None, clip_denoised: bool = True,
                 model_kwargs: Mapping[str, Any] | None = None, nonfinite_grad: str = "raise",
                 merge_experts: bool = True, channels_last: bool = False, guide_autocast: torch.dtype | None = None,
                 compile_guide: bool = False, compile_model: bool = False, compile_kwargs: Mapping | None = None,
                 compile_freeze: bool = False, cuda_graph: bool = False, overlap_guide: bool = False,
                 backend: str | None = None, device=None, merge_mode: str = "cache", fuse_norm_act: bool = False,
                 cudnn_benchmark: bool = False, model_autocast: torch.dtype | None = None):
        check_sampler_options(sampler, eta, var_type)
        flags = dict(merge_experts=merge_experts, channels_last=channels_last, compile_guide=compile_guide,
                     compile_model=compile_model, compile_freeze=compile_freeze, cuda_graph=cuda_graph,
                     overlap_guide=overlap_guide, fuse_norm_act=fuse_norm_act, cudnn_benchmark=cudnn_benchmark)
        for name, v in flags.items():
            _flag(v, name)  # cuda_graph="false" ran as True
        if nonfinite_grad not in NONFINITE_MODES:
            raise ValueError(f"nonfinite_grad must be one of {NONFINITE_MODES}, got {nonfinite_grad!r}")
        if merge_mode not in MERGE_MODES:  # also without a guide (it was checked only with one)
            raise ValueError(f"merge_mode must be one of {MERGE_MODES}, got {merge_mode!r}")
        if compile_freeze and not compile_model:
            raise ValueError("compile_freeze freezes the compiled denoiser: it needs compile_model=True")
        if var_type not in (None, "learned_range", "fixed_small", "fixed_large"):
            raise ValueError(f"var_type must be None, 'learned_range', 'fixed_small' or 'fixed_large' for the fused "
                             f"update, got {var_type!r} (use ppap_fast.sampling for 'learned')")
        if guide is not None and not callable(guide):
            raise TypeError(f"guide must be callable guide(x_t, t), got {type(guide).__name__}")
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
        check_trained_schedule(model, schedule)
        if device is not None:
            _check_cuda_visible(torch.device(device))
        self._fused_norm_act = False
        self.schedule = schedule.to(torch.device(device) if device is not None else schedule.device)
        self.device = self.schedule.device  # indexed ("cuda:0"), so that it compares equal to x.device
        self.sampler, self.eta, self.var_type = sampler, eta_value(eta), var_type
        self.clip_denoised, self.nonfinite_grad, self.backend = clip_denoised, nonfinite_grad, backend
        self.opts = _Opts(channels_last, guide_autocast, compile_guide, compile_model, compile_kwargs, compile_freeze,
                          model_autocast)
        if self.opts.channels_last and isinstance(model, torch.nn.Module):
            model.to(memory_format=torch.channels_last)
        if fuse_norm_act:
            if compile_model:
                warnings.warn("fuse_norm_act is skipped with compile_model: inductor fuses the norms itself",
                              FastSamplingWarning, stacklevel=2)
            elif callable(getattr(model, "fuse_norm_act", None)):
                model.fuse_norm_act()  # in place, like channels_last
                self._fused_norm_act = True
            else:
                warnings.warn(f"fuse_norm_act: {type(model).__name__} has no fuse_norm_act() (ADMUNet has); "
                              "running it as it is", FastSamplingWarning, stacklevel=2)
        self.model = model
        self._denoise = _ModelRunner(model, self.opts, model_kwargs)
        self._tmap = self.schedule.timestep_map.to(self.device)
        self._tmap_host = [int(v) for v in schedule.timestep_map.cpu().tolist()]  # once, at construction
        if sampler == "ddim":
            self._tables = {None: build_table(self.schedule, "ddim", eta=self.eta)}
        else:
            kinds = [var_type] if var_type is not None else ["fixed_large", "learned_range"]
            self._tables = {k: build_table(self.schedule, "ddpm", var_type=k) for k in kinds}
        self._steps_cache: dict = {}
        # guide variants
        self.fast_guide = None if guide is None else FastGuide(guide, self.device, merge_experts=merge_experts,
                                                                opts=self.opts, merge_mode=merge_mode,
                                                                _stacklevel=3)
        self.guide = None if guide is None else self.fast_guide.guide
        unused = [k for k, v in (("guide_autocast", guide_autocast), ("compile_guide", compile_guide),
                                 ("overlap_guide", overlap_guide)) if guide is None and v]
        if unused:  # they were ignored without a word
            warnings.warn(f"{', '.join(unused)} configure{'s' if len(unused) == 1 else ''} the guide, but this sampler "
                          "has none (guide=None): ignored", FastSamplingWarning, stacklevel=2)
        # once here: the steps run with the banks' host-side range checks off
        if guide is not None:
            check_guide_timesteps(self.fast_guide.guide, self.schedule.original_num_timesteps, self.schedule)
            self.fast_guide.num_timesteps = self.schedule.original_num_timesteps
            if merge_experts and _wrapped_banks(guide):  # was silent
                warnings.warn("the guide is (or holds) a FastGuide: the sampler calls it without the step's timestep "
                              "on the host, so its ExpertBank routes per sample and no merged expert runs; pass the "
                              "guide it wraps (.source) to merge the experts", FastSamplingWarning, stacklevel=2)
        # CUDA graphs
        self.cuda_graph = bool(cuda_graph)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self.overlap_guide = bool(overlap_guide)
        if self.device.type != "cuda" and self.overlap_guide and guide is not None:  # was ignored without a word
            warnings.warn(f"overlap_guide=True needs a CUDA device (a side stream for the guide), but the sampler runs "
                          f"on {self.device.type}: the guide runs after the denoiser", FastSamplingWarning,
                          stacklevel=2)
        if self.device.type != "cuda" and self.cudnn_benchmark:
            warnings.warn(f"cudnn_benchmark=True needs a CUDA device (cuDNN's algorithm timing), but the sampler runs "
                          f"on {self.device.type}: ignored", FastSamplingWarning, stacklevel=2)
        self._graph_warned = False
        if self.device.type != "cuda" and self.cuda_graph:  # warned at the first step only
            warnings.warn(f"cuda_graph=True: CUDA-graph capture needs a CUDA device, but the sampler runs on "
                          f"{self.device.type}: the guided step runs eagerly", FastSamplingWarning, stacklevel=2)
            self._graph_warned = True
        self._side_stream = None
        self._graphs: dict = {}
        self._graph_generation = 0
        self._graph_pool = None  # one memory pool for every graph of this sampler
        self._autocast_warned = False

    @property
    def applied_options(self) -> dict:
        """The on/off options and autocast dtypes in effect now: those asked for that apply here and have not
        fallen back (e.g. cuda_graph False off CUDA or after a failed capture, fuse_norm_act False with
        compile_model or a model without fuse_norm_act, compile_model False after a failed compile)."""
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        guided = self.fast_guide is not None
        compiled = self.opts.compile_model and self._denoise._compile_ok
        guide_failed = any(isinstance(k, tuple) and k[0] in ("guide compile failed", "plain guide warned")
                           for k in self.opts.state)
        return {"merge_experts": self.merge_experts, "channels_last": self.opts.channels_last,
                "guide_autocast": self.opts.guide_autocast if guided else None,
                "model_autocast": self.opts.model_autocast,
                "compile_guide": self.opts.compile_guide and guided and not guide_failed
                and (self.merge_experts or not self.banks),  # a routed bank runs eagerly
                "compile_model": compiled, "compile_freeze": compiled and self.opts.compile_freeze,
                "cuda_graph": self.cuda_graph and cuda, "overlap_guide": self.overlap_guide and cuda and guided,
                "fuse_norm_act": self._fused_norm_act, "cudnn_benchmark": self.cudnn_benchmark and cuda}

    # -- guide variants --------------------------------------------------------------------
    @property
    def banks(self) -> list:
        return [] if self.fast_guide is None else self.fast_guide.banks

    @property
    def merge_experts(self) -> bool:
        return self.fast_guide is not None and self.fast_guide.merge_experts

    @property
    def _variants(self) -> dict:
        return {} if self.fast_guide is None else self.fast_guide._variants

    @property
    def _merged_models(self) -> dict:
        return {} if self.fast_guide is None else self.fast_guide._merged_models

    def refresh_experts(self) -> None:
        """Merge the guide's experts again from its banks as they are now: see :meth:`FastGuide.refresh_experts`."""
        if self.fast_guide is not None:
            self.fast_guide.refresh_experts()

    def expert_key(self, index: int) -> tuple | None:
        """Host-side key of the merged guide for step index `index` (expert id per bank)."""
        if self.fast_guide is None:
            return None
        return self.fast_guide.key(self._tmap_host[index])

    def _guide_off(self) -> bool:
        """No guide, or one that adds nothing (scale 0): the step runs unguided, exactly as without a guide."""
        return self.guide is None or _gd.guidance_is_off(self.fast_guide.source)

    def _variant(self, key):
        return self.fast_guide.runner(key)

    # -- one step ------------------------------------------------------------------------
    def _step_indices(self, b: int) -> torch.Tensor:
        """[N, B] long on the device, row i = i (built once per batch size, on the device)."""
        t = self._steps_cache.get(b)
        if t is None:
            n = self.schedule.num_timesteps
            t = torch.arange(n, device=self.device).view(n, 1).expand(n, b).contiguous()
            self._steps_cache[b] = t
        return t

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] == 0:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a floating tensor [B, C, ...] with B > 0, got {got}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the sampler runs on {self.device}")

    def _warn_autocast_unused(self, x):
        """Autocast lowers float32 ops only: with float64 x it changed nothing, without a word."""
        if x.dtype != torch.float64 or self._autocast_warned:
            return
        guide_dtype = self.opts.guide_autocast if self.guide is not None else None
        unused = [f"{k}={d}" for k, d in (("guide_autocast", guide_dtype), ("model_autocast", self.opts.model_autocast))
                  if d is not None]
        if unused:
            self._autocast_warned = True
            warnings.warn(f"{', '.join(unused)}: autocast lowers float32 ops only, so with float64 x it does nothing "
                          "(the step runs in float64); sample in float32 to use it", FastSamplingWarning, stacklevel=3)

    def _check_noise(self, noise, x):
        if noise is None:
            return None
        if not isinstance(noise, torch.Tensor) or noise.shape != x.shape or noise.device != x.device \
                or not noise.is_floating_point():
            raise ValueError(f"noise must be a floating tensor like x {tuple(x.shape)} on {x.device}")
        return noise.to(x.dtype)

    def _table(self, out_channels: int, c: int):
        if self.sampler == "ddim":
            return self._tables[None]
        vt = self.var_type or ("learned_range" if out_channels == 2 * c else "fixed_large")
        if vt == "learned_range" and out_channels != 2 * c:
            raise ValueError("var_type='learned_range' needs a 2C-channel model output (eps and v)")
        return self._tables[vt]

    def _guide_grad(self, runner, x, t):
        grad = runner(x, t)
        if not isinstance(grad, torch.Tensor) or grad.shape != x.shape:
            _gd.raise_if_network(runner.guide, None, f" (it returned {tuple(getattr(grad, 'shape', ()))}, not a "
                                 "gradient shaped like x_t)")
            raise ValueError(f"the guide must return a gradient shaped like x {tuple(x.shape)}, got "
                             f"{getattr(grad, 'shape', type(grad).__name__)}")
        grad = grad.detach().to(x.dtype)
        if self.nonfinite_grad == "zero":
            grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))
        elif self.nonfinite_grad == "raise":
            _gd.check_finite(grad, "raise", "grad (guidance gradient)")
        return grad

    def _core(self, x, idx, runner, noise):
        """The whole step on device tensors: graph-capturable."""
        t = self._tmap[idx]
        grad = None
        overlap = self.overlap_guide and runner is not None and x.device.type == "cuda"
        if overlap:  # the guide reads only x_t: run it on a side stream while the denoiser runs
            cur = torch.cuda.current_stream(x.device)
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=x.device)
            side = self._side_stream
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                grad = self._guide_grad(runner, x, t)
        out = self._denoise(x, t)
        if overlap:
            cur.wait_stream(side)
            if not torch.cuda.is_current_stream_capturing():  # a graph's private pool keeps it alive
                grad.record_stream(cur)
        c = x.shape[1]
        if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] \
                or out.shape[1] not in (c, 2 * c):
            raise ValueError(f"the denoiser must return [B, {c} or {2 * c}, ...] for x {tuple(x.shape)}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        out = out.to(x.dtype)
        table = self._table(out.shape[1], c)
        eps = out[:, :c]
        learned = self.sampler == "ddpm" and out.shape[1] == 2 * c and table.mode == _MODES["ddpm_learned"]
        v = out[:, c:] if learned else None
        if runner is not None and grad is None:
            grad = self._guide_grad(runner, x, t)
        return guided_update(x, eps, idx, table, v=v, grad=grad, noise=noise, clip_denoised=self.clip_denoised,
                             backend=self.backend, check_range=False)  # idx range-checked by _index

    def _index(self, index, x, guided: bool = True) -> tuple[torch.Tensor, object]:
        """(idx [B] long on the device, variant key); key None = route per sample, or no guide runs (``guided``
        False: no key taken, so no runner() is told to skip its sync)."""
        index = _gd.as_int_or_tensor(index)
        if isinstance(index, int) and not isinstance(index, bool):
            n = self.schedule.num_timesteps
            if not 0 <= index < n:
                raise ValueError(f"index {index} out of range [0, {n})")
            key = self.fast_guide.key(self._tmap_host[index], runner_follows=True) if guided else None
            return self._step_indices(x.shape[0])[index], key
        return _index_tensor(index, x, self.schedule).contiguous(), None

    def step(self, x: torch.Tensor, index, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One guided step from ``x`` (x_t) -> (x_prev, pred_xstart).

        index: an int (all samples at that step: merged expert) or a long [B] tensor of per-sample
        step indices (a mixed batch: per-sample routing through the bank). noise: the step's noise
        for DDPM / DDIM with eta > 0 (default randn(generator)); ignored for DDIM with eta = 0.
        """
        self._check_x(x)
        self._warn_autocast_unused(x)
        guided = not self._guide_off()
        idx, key = self._index(index, x, guided)
        noise = self._noise(x, noise, generator)
        runner = self._variant(key) if guided else None
        s, p = self._run(x, idx, key, runner, noise)
        return (s.clone(), p.clone()) if self._graph_ok(x) else (s, p)

    @property
    def needs_noise(self) -> bool:
        return self.sampler == "ddpm" or self.eta > 0

    def _noise(self, x, noise, generator):
        if not self.needs_noise:
            return None
        if noise is None:
            return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self._check_noise(noise, x)

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _graph_ok(self, x) -> bool:
        if not self.cuda_graph:
            return False
        if x.device.type != "cuda" or not torch.cuda.is_available():
            if not self._graph_warned:
                warnings.warn(f"cuda_graph=True: CUDA-graph capture needs a CUDA device, but x is on "
                              f"{x.device.type}; running the guided step eagerly", FastSamplingWarning, stacklevel=3)
                self._graph_warned = True
            return False
        return True

    def _run(self, x, idx, key, runner, noise):
        if self.cudnn_benchmark and x.device.type == "cuda":
            with _cudnn_benchmark():
                return self._run_graph_or_eager(x, idx, key, runner, noise)
        return self._run_graph_or_eager(x, idx, key, runner, noise)

    def _run_graph_or_eager(self, x, idx, key, runner, noise):
        if not self._graph_ok(x):
            return self._core(x, idx, runner, noise)
        with torch.cuda.device(x.device):  # capture and replay use the current device's streams
            return self._run_graph(x, idx, key, runner, noise)

    def _run_graph(self, x, idx, key, runner, noise):
        vkey = key if self.fast_guide is None else self.fast_guide.variant_key(key)
        gen = 0 if self.fast_guide is None else self.fast_guide.generation
        if gen != self._graph_generation:  # the guide changed: graphs captured with its old state are stale
            self._graphs.clear()
            # their pool goes with them: capturing into a pool whose graphs are all gone trips PyTorch's
            # allocator (use_count > 0 INTERNAL ASSERT on an H100, torch 2.11)
            self._graph_pool = None
            self._graph_generation = gen
        gkey = (vkey, runner is None, tuple(x.shape), x.dtype, noise is not None)
        g = self._graphs.get(gkey)
        if g is None:
            try:
                g = self._capture(x, idx, runner, noise)
            except Exception as exc:  # noqa: BLE001
                self.cuda_graph = False
                warnings.warn(f"CUDA-graph capture of the guided step failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); running eagerly from now on",
                              FastSamplingWarning, stacklevel=3)
                return self._core(x, idx, runner, noise)
            self._graphs[gkey] = g
        g.x.copy_(x)
        g.idx.copy_(idx)
        if noise is not None:
            g.noise.copy_(noise)
        g.graph.replay()
        return g.out

    def _capture(self, x, idx, runner, noise):
        from .train_graph import capture_after_warmup

        g = _Graph()
        g.x, g.idx = x.clone(), idx.clone()
        g.noise = None if noise is None else noise.clone()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        g.graph, g.out = capture_after_warmup(lambda: self._core(g.x, g.idx, runner, g.noise), 3,
                                              pool=self._graph_pool, device=x.device)
        return g

    # -- the loop -------------------------------------------------------------------------------
    def sample(self, shape_or_x: Sequence[int] | torch.Tensor, *, generator: torch.Generator | None = None,
               noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None, dtype: torch.dtype | None = None,
               return_trajectory: bool = False, progress: bool = False,
               callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None):
        """All steps N-1..0 from x_T (given, or randn(shape, generator)), as ``sampling.sample_loop``.

        Random numbers are drawn in the reference's order (x_T, then one noise tensor per step
        when the sampler needs noise), so the same generator seed gives the same result.
        callback(index, x_prev, pred_xstart). Returns x_0, or (x_0, trajectory [N, *x.shape]).
        ``shape_or_x``, ``noise_fn``, ``dtype``, ``return_trajectory``, ``progress``: as ``sample_loop``.
        """
        x = initial_noise(shape_or_x, generator, self.device, dtype)
        self._check_x(x)
        self._warn_autocast_unused(x)
        if isinstance(shape_or_x, torch.Tensor) and not bool(torch.isfinite(x).all()):
            raise ValueError(f"x_T has {int((~torch.isfinite(x)).sum())} non-finite values")
        x = x.detach()  # an x_T requiring grad chained every step into one autograd graph (sample_loop: no_grad)
        if self.guide is not None:
            _gd.check_guide_batch(self.guide, x.shape[0], x_dim=x.dim())
        steps = range(self.schedule.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{self.sampler} sampling (fast)")
        graphs = self._graph_ok(x)
        traj = []
        for i in steps:
            noise = None
            if self.needs_noise:
                noise = noise_fn(i, x) if noise_fn is not None else None
                noise = self._noise(x, noise, generator)
            guided = not self._guide_off()
            idx, key = self._index(i, x, guided)
            runner = self._variant(key) if guided else None
            x, pred = self._run(x, idx, key, runner, noise)
            if callback is not None:  # a graph's outputs are overwritten by the next replay: copies, as step gives
                callback(i, *((x.clone(), pred.clone()) if graphs else (x, pred)))
            if return_trajectory:
                traj.append(x.clone() if graphs else x)
        if graphs:
            x = x.clone()
        bad = int((~torch.isfinite(x.flatten(1)).all(1)).sum())  # one host read, after the last step (as sample_loop)
        if bad:  # NaN samples came back without a word
            warnings.warn(f"FastGuidedSampler.sample: {bad} of {x.shape[0]} samples hold NaN/Inf (a half-precision "
                          "model overflowing? a guidance scale too large? sampling.sample_loop names the stage and "
                          "step that went non-finite first)", RuntimeWarning, stacklevel=2)
        return (x, torch.stack(traj)) if return_trajectory else x


@contextlib.contextmanager
def _cudnn_benchmark():
    """torch.backends.cudnn.benchmark on for the block (cuDNN times its algorithms per shape; with
    cuda_graph the warm-up before capture does it), restored after."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def fast_sample_loop(model: Callable, shape_or_x, schedule: Schedule, *, sampler: str = "ddim",
                     guide: Callable | None = None, generator: torch.Generator | None = None,
                     noise_fn=None, return_trajectory: bool = False, dtype: torch.dtype | None = None,
                     progress: bool = False, **options):
    """Drop-in for ``sampling.sample_loop`` on the fast path (options: see FastGuidedSampler); sample_loop's
    ``callback(i, StepOutput)`` and ``denoised_fn`` have no fast equivalent and raise a TypeError.
    ``model``, ``shape_or_x``, ``schedule``, ``sampler``, ``guide``, ``generator``, ``noise_fn``, ``dtype``,
    ``return_trajectory``, ``progress``: as :func:`ppap_fast.sampling.sample_loop`."""
    if "callback" in options:  # the fused step makes no StepOutput
        raise TypeError("fast_sample_loop takes no callback (sample_loop's callback(i, StepOutput)): use "
                        "FastGuidedSampler(model, schedule, ...).sample(shape, callback=lambda i, x, pred_x0: ...)")
    if "denoised_fn" in options:
        raise TypeError("fast_sample_loop has no denoised_fn (the fused update clips x0 itself): use "
                        "sampling.sample_loop for it")
    s = FastGuidedSampler(model, schedule, sampler=sampler, guide=guide, **options)
    return s.sample(shape_or_x, generator=generator, noise_fn=noise_fn, return_trajectory=return_trajectory,
                    dtype=dtype, progress=progress)
