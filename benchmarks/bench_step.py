"""One guided DDIM step: a model of the official stack vs ppap_fast's FastGuidedSampler.

reference: what the official PPAP / guided-diffusion code does per step, modelled faithfully:
    eager denoiser (its own NCHW copy: fp16 torso on CUDA as use_fp16 gives, guided-diffusion's
    einsum attention with a float32 softmax, GroupNorm32 then SiLU), eager fp32 guide, the
    unmerged LoRA ExpertBank (routed layers), the expert picked
    by reading t[0] on the host (.item()), the step-index tensor built on the host
    (th.tensor([i] * B)), timestep_map copied to the device for every wrapped model / cond_fn
    call, and every schedule lookup copying a whole numpy table host-to-device
    (_extract_into_tensor), unfused condition_score + DDIM arithmetic (p_mean_variance incl. the
    learned-range variance it computes and DDIM does not use).
fast: FastGuidedSampler.step: the denoiser with SDPA attention, merged expert (LoRA merged, BN
    folded), device tables, fused update;
    on CUDA also bf16 autocast for the guide, fast_sampling.recommended_options (ADM's GroupNorm +
    SiLU fused, channels_last, cuDNN's algorithm timing before capture; the denoiser its own copy)
    and one CUDA graph for the whole step;
    on CPU also torch.compile (inductor) of the denoiser (with freezing and the C++ wrapper) and of
    the guide's forward + input-backward (merged expert in channels_last), all fp32. Compilation happens in the first (parity-checked) step,
    timed on its own as fast_first_step_s; the ratios are steady state, after warm-up.

Ratios (time ratios, below 1 = first faster; the median over rounds of the ratio measured within
one round, the variants being timed round-robin, which keeps load drift out on shared CPUs):
    step_fast_vs_reference      guided step, fast / reference
    step_guided_vs_unguided     fast guided step / fast unguided step (cost of guidance)
    step_fast_vs_reference_deit_s, step_guided_vs_unguided_deit_s
                                the same with a DeiT-S PPAP-5 guide (resized to 224 by its input
                                transform; row key deit_s), CUDA by default (PPAP_BENCH_STEP_DEIT=1
                                on CPU: a tiny timm ViT)
    step_compiled_vs_reference  CUDA only (unless PPAP_SKIP_COMPILE=1): the fast step with the
                                denoiser compiled (inductor; no fused norms) in channels_last,
                                compile time apart
    step_overlap_vs_reference   CUDA only: the fast step with overlap_guide (the guide on a side
                                stream while the denoiser runs); step_overlap_vs_fast = it / step_fast_vs_reference
                                (a pending default of recommended_options)
    step_compiled_guide_vs_reference  CUDA only (PPAP_BENCH_STEP_COMPILE_GUIDE=0 skips it): the fast step
                                with compile_guide; step_compiled_guide_vs_fast likewise
    step_guided_vs_unguided_overlap, step_guided_vs_unguided_compiled_guide
                                the variant over the main rounds' fast unguided step (through the
                                reference's time in each: different phases)
    step_unfused_vs_reference   CUDA only: the fast step without the fused norms, channels_last
                                (the fast path's options before recommended_options)
    step_nchw_vs_reference      CUDA only: unfused and NCHW (PPAP_BENCH_STEP_OLD_PATHS=0 skips these two)
    ``fast_fallbacks`` (row) / ``fallbacks`` (phase): the options asked that did not run (applied_options after
    fallbacks, e.g. a failed capture or compile); a variant with any, or main fast steps with any, gives no
    step_<variant>_vs_reference / _vs_fast / guided_vs_unguided_<variant> ratio (the phase keeps its figures).
    The CUDA-only variants (own model copies) run one at a time after the main rounds, each timed
    round-robin with the reference and freed after (row keys fast_overlap, fast_compiled_guide, fast_compiled,
    fast_unfused, fast_nchw:
    ms, mfu, rel_err, first_step_s, peak_gib, profile_top; an error is recorded there instead of failing
    the suite). On CUDA ``fast_profile_top`` and each variant's ``profile_top``: the top kernels of one
    step by device time (a graph replay: kernel names only); ``fast_op_profile_top`` and the compiled
    variant's ``op_profile_top``: the top aten ops of one step run without its CUDA graph (other
    options kept), with input shapes, dtypes and the kernels each launched (which op a kernel is);
    ``guide_op_profile_top`` the same for the guide alone (merged expert forward + input backward).
On CUDA rows also hold the FLOPs of a step (FlopCounterMode), achieved TFLOP/s and MFU vs the
card's dense fp16/bf16 peak (floor = FLOPs / peak).

CPU: tiny ADM (32x32) + TinyResNet bank, batch 4 (seconds). CUDA: ADM-256 uncond preset (random
weights, fp16 torso) + torchvision ResNet50 PPAP-5 bank (random), batch 32.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppap_fast.experts import ExpertBank  # noqa: E402
from ppap_fast.fast_sampling import FastGuidedSampler, FastSamplingWarning, recommended_options  # noqa: E402
from ppap_fast.guidance import ClassGuide  # noqa: E402
from ppap_fast.models import ADMUNet  # noqa: E402
from ppap_fast.schedule import Schedule  # noqa: E402
from timing import profile_top, round_robin_ms  # noqa: E402

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


# ----------------------------------------------------------------------------- the reference stack
class ReferenceStack:
    """The official per-step code path (guided-diffusion SpacedDiffusion + PPAP cond_fn), eager fp32."""

    def __init__(self, model, bank, target: int, scale: float, schedule: Schedule, device, transform=None):
        self.model, self.bank, self.target, self.scale, self.device = model, bank, target, scale, device
        self.transform = transform  # e.g. DeiT's resize to 224 + ImageNet normalisation
        s = schedule.to("cpu")
        self.np = {k: getattr(s, k).numpy() for k in (
            "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
            "posterior_log_variance_clipped", "log_betas", "posterior_mean_coef1", "posterior_mean_coef2")}
        self.timestep_map = [int(v) for v in s.timestep_map]

    def _extract(self, name, t, shape):  # guided-diffusion _extract_into_tensor
        res = torch.from_numpy(self.np[name]).to(device=t.device)[t].float()
        while len(res.shape) < len(shape):
            res = res[..., None]
        return res.expand(shape)

    def _map(self, ts):  # _WrappedModel: a fresh map tensor on every call
        return torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)[ts]

    def cond_fn(self, x, t):
        t0 = int(self._map(t)[0].item())  # official: the whole batch goes to the expert of t[0]
        expert = t0 // self.bank.band
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.bank(x_in if self.transform is None else self.transform(x_in), expert_idx=expert)
            logp = F.log_softmax(logits, dim=-1)[range(len(logits)), torch.full((len(logits),), self.target,
                                                                                    device=x.device)]
            return torch.autograd.grad(logp.sum(), x_in)[0] * self.scale

    def step(self, x, i, guided=True):
        shape = x.shape
        t = torch.tensor([i] * shape[0], device=self.device)  # p_sample_loop / ddim_sample_loop
        with torch.no_grad():
            out = self.model(x, self._map(t))
        c = shape[1]
        eps, v = out[:, :c], (out[:, c:] if out.shape[1] == 2 * c else None)
        if v is not None:  # p_mean_variance computes the learned-range variance on every step
            min_log = self._extract("posterior_log_variance_clipped", t, shape)
            max_log = self._extract("log_betas", t, shape)
            frac = (v + 1) / 2
            _ = torch.exp(frac * max_log + (1 - frac) * min_log)
        pred = (self._extract("sqrt_recip_alphas_cumprod", t, shape) * x
                - self._extract("sqrt_recipm1_alphas_cumprod", t, shape) * eps).clamp(-1, 1)
        _ = (self._extract("posterior_mean_coef1", t, shape) * pred + self._extract("posterior_mean_coef2", t, shape) * x)
        alpha_bar = self._extract("alphas_cumprod", t, shape)
        eps = (self._extract("sqrt_recip_alphas_cumprod", t, shape) * x - pred) / \
            self._extract("sqrt_recipm1_alphas_cumprod", t, shape)
        if guided:  # condition_score
            eps = eps - (1 - alpha_bar).sqrt() * self.cond_fn(x, t)
            pred = (self._extract("sqrt_recip_alphas_cumprod", t, shape) * x
                    - self._extract("sqrt_recipm1_alphas_cumprod", t, shape) * eps)
            eps = (self._extract("sqrt_recip_alphas_cumprod", t, shape) * x - pred) / \
                self._extract("sqrt_recipm1_alphas_cumprod", t, shape)
        alpha_bar = self._extract("alphas_cumprod", t, shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, shape)
        return pred * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev).sqrt() * eps


# ----------------------------------------------------------------------------- configs
def _randomise_bank(bank, std):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in bank.per_expert_state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.randn(t.shape, generator=g).to(t.device, t.dtype)
            if name.endswith("running_var"):
                t.copy_(1 + 0.2 * r.abs())
            elif name.endswith("running_mean"):
                t.copy_(0.1 * r)
            elif "expert_weight" in name:
                t.add_(0.05 * r)
            else:
                t.add_(std * r)
    return bank.eval()


def _setup(device):
    torch.manual_seed(0)
    if device == "cuda":
        model = ADMUNet.from_config("256x256_diffusion_uncond").to(device).eval()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        bank = _randomise_bank(ExpertBank(net, "resnet", n_experts=5), 0.01).to(device)
        shape, name = (32, 3, 256, 256), "adm256_uncond+resnet50_ppap5"
    else:
        from ppap_fast.models.tiny import TinyResNet

        model = ADMUNet(image_size=32, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                        attention_resolutions=(4,), channel_mult=(1, 2, 2), num_heads=2, use_scale_shift_norm=True,
                        resblock_updown=True)
        with torch.no_grad():
            for p in model.parameters():
                if p.abs().max() == 0:
                    p.normal_(0, 0.02)
        model = model.eval()
        net = TinyResNet(widths=(16, 32, 64), layers=(1, 1, 1), in_channels=3, num_classes=10)
        bank = _randomise_bank(ExpertBank(net, "resnet", n_experts=5), 0.05)
        shape, name = (4, 3, 32, 32), "tiny_adm32+tinyresnet_ppap5"
    model.requires_grad_(False)
    return model, bank, shape, name


def _deit_setup(device):
    """DeiT-S PPAP-5 bank (random, timm) guiding through its transform (resize to 224, ImageNet
    normalisation) on CUDA; a tiny timm ViT (patch 8, 32x32 input) with the same placement on CPU."""
    from ppap_fast.models.registry import build_guide_model

    torch.manual_seed(1)
    if device == "cuda":
        gm = build_guide_model("deit_s")
        bank, tf, name = gm.bank(n_experts=5), gm.transform, "deit_s_ppap5@224"
    else:
        import timm

        net = timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                            num_classes=10)
        bank = ExpertBank(net.eval().requires_grad_(False), "deit", n_experts=5).eval()
        from ppap_fast.guidance import input_transform

        tf, name = input_transform(size=32), "tiny_vit32_ppap5"
    # the transform on the bank's device: CPU mean / std buffers would be copied to the GPU every
    # step (a host sync, and a CUDA-graph capture failure that leaves the fast step eager)
    return _randomise_bank(bank, 0.01 if device == "cuda" else 0.05).to(device), tf.to(device), name


def _guide_phase(setup, ref_model, fast_model, sched, x, i, target, scale, fast_opts, unguided_opts,
                 device, reps, warm) -> dict:
    """Another guide on the same denoiser (e.g. DeiT-S): its reference stack, its fast guided step and
    the fast unguided step timed round-robin; the samplers are freed after. An error is recorded."""
    res, samplers = {}, []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peak_gib: this phase's
    try:
        bank, tf, res["config"] = setup(device)
        guide = ClassGuide(bank, target, scale=scale, input_transform=tf)
        ref = ReferenceStack(ref_model, bank, target, scale, sched, device, transform=tf)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FastSamplingWarning)
            samplers = [FastGuidedSampler(fast_model, sched, guide=guide, **fast_opts),
                        FastGuidedSampler(fast_model, sched, **unguided_opts)]
            with torch.no_grad():
                want = ref.step(x, i)
            t0 = time.perf_counter()
            got = samplers[0].step(x, i)[0]
            samplers[1].step(x, i)
            if device == "cuda":
                torch.cuda.synchronize()
            res["first_step_s"] = round(time.perf_counter() - t0, 1)
            res["rel_err"] = float(f"{_rel(got, want):.3e}")
        res["warnings"] = _step_warnings(caught)
        ms, rounds = _interleaved_ms({"ref": lambda: ref.step(x, i), "fast": lambda: samplers[0].step(x, i),
                                      "fast_u": lambda: samplers[1].step(x, i)}, device, reps, warm)
        res.update(reference_ms=round(ms["ref"], 3), fast_ms=round(ms["fast"], 3),
                   fast_unguided_ms=round(ms["fast_u"], 3),
                   fast_vs_reference=round(_ratio(rounds, "fast", "ref"), 4),
                   guided_vs_unguided=round(_ratio(rounds, "fast", "fast_u"), 4),
                   fallbacks=_fallbacks(fast_opts, samplers[0])
                   + [f"unguided:{k}" for k in _fallbacks(unguided_opts, samplers[1])])
        fl_g = _guide_flops(_seq(tf, bank.merged(int(sched.timestep_map[i]) // bank.band).to(device)), x, target)
        if fl_g:
            res["guide_gflop"] = round(fl_g / 1e9, 3)
        if device == "cuda":
            res["fast_profile_top"] = _step_profile(samplers[0], x, i, device)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        samplers = None
        _end_phase(res, device)
    return res


def _end_phase(res: dict, device: str) -> None:
    """After a phase dropped its samplers: free their memory (graph pools) and record the peak."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)


def _seq(*mods):
    return torch.nn.Sequential(*[m for m in mods if m is not None])


def _peak(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    for k in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if k in name:
            return PEAK_TFLOPS[k] * 1e12
    return None


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _flops(fn) -> float | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            fn()
        return float(fc.get_total_flops())
    except Exception:  # noqa: BLE001 - an op the counter cannot see must not break the suite
        return None


def _denoiser_flops(model, x, t):
    def f():
        with torch.no_grad():
            model(x, t)
    return _flops(f)


def _guide_flops(net, x, target):
    """Forward + backward to the input of the merged expert (FlopCounterMode does not see
    autograd.grad on a leaf, so this runs .backward(); the parameters need no grad)."""
    def f():
        x_in = x.detach().requires_grad_(True)
        with torch.enable_grad():
            F.log_softmax(net(x_in), -1)[:, target].sum().backward()
    return _flops(f)


def _interleaved_ms(fns: dict, device: str, reps: int, warmup: int) -> tuple[dict, dict]:
    """Median ms of each callable, timed round-robin (timing.round_robin_ms), and the per-round times
    (for ratios taken within a round)."""
    import statistics

    times = round_robin_ms(fns, device, reps, warmup)
    return {k: statistics.median(v) for k, v in times.items()}, times


def _cuda_variants(model, sched, guide) -> dict:
    """CUDA-only fast variants, name -> (ratio name, builder, the options it asks for); ``model`` is the unfused
    NCHW denoiser.
    Each is built, parity-checked and timed against the reference in its own phase, then freed:
    every captured step holds its own graph pool of ADM-256 activations, and four at once (with what
    earlier suites left) ran an 80 GB H100 out of memory."""
    base = dict(guide_autocast=torch.bfloat16, cuda_graph=True, cudnn_benchmark=True)

    def with_option(**option):  # the fast step's options as the main rounds time it, plus one option
        return dict(guide_autocast=torch.bfloat16, cuda_graph=True, **option, **recommended_options(model, "cuda"))

    def fast_step_with(**option):  # ... on its own model copy
        return FastGuidedSampler(copy.deepcopy(model), sched, guide=guide, **with_option(**option))

    # the guide on a side stream while the denoiser runs; its forward + input-backward through inductor
    out = {"fast_overlap": ("step_overlap_vs_reference", lambda: fast_step_with(overlap_guide=True),
                            with_option(overlap_guide=True))}
    if os.environ.get("PPAP_BENCH_STEP_COMPILE_GUIDE", "1") == "1":
        out["fast_compiled_guide"] = ("step_compiled_guide_vs_reference", lambda: fast_step_with(compile_guide=True),
                                      with_option(compile_guide=True))
    if os.environ.get("PPAP_SKIP_COMPILE") != "1":  # inductor on the denoiser (fuses the norms itself)
        compiled = dict(compile_model=True, channels_last=True, **base)
        out["fast_compiled"] = ("step_compiled_vs_reference", lambda: FastGuidedSampler(
            copy.deepcopy(model), sched, guide=guide, **compiled), compiled)
    if os.environ.get("PPAP_BENCH_STEP_OLD_PATHS", "1") != "1":  # measured on 2026-11-28: a short call skips them
        return out
    # the fast step before recommended_options: unfused, channels_last
    unfused = dict(channels_last=True, **base)
    out["fast_unfused"] = ("step_unfused_vs_reference", lambda: FastGuidedSampler(
        copy.deepcopy(model), sched, guide=guide, **unfused), unfused)
    out["fast_nchw"] = ("step_nchw_vs_reference", lambda: FastGuidedSampler(
        copy.deepcopy(model), sched, guide=guide, **base), base)
    return out


def _variant_phase(build, x, i, want, ref, device, reps, warm, op_profile: bool = False, asked=None) -> dict:
    """Build one fast variant, check its first step against the reference step, time it round-robin
    with the reference; an error is recorded (a kernel or compile failing on this GPU must not cost
    the suite). The variant and its graph pool are freed before returning. ``op_profile``: also its
    eager op-level profile (``op_profile_top``, CUDA). ``asked``: its options, for ``fallbacks`` (_fallbacks)."""
    res, sampler = {}, None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FastSamplingWarning)
            t0 = time.perf_counter()
            sampler = build()
            got = sampler.step(x, i)[0]
            if device == "cuda":
                torch.cuda.synchronize()
            res["first_step_s"] = round(time.perf_counter() - t0, 1)
            res["rel_err"] = float(f"{_rel(got, want):.3e}")
            del got
        res["warnings"] = _step_warnings(caught)
        ms, rounds = _interleaved_ms({"ref": lambda: ref.step(x, i), "v": lambda: sampler.step(x, i)},
                                     device, reps, warm)
        res["ms"] = round(ms["v"], 3)
        res["ratio_vs_reference"] = round(_ratio(rounds, "v", "ref"), 4)
        res["applied_options"] = {k: str(v) for k, v in sampler.applied_options.items()}
        if asked is not None:
            res["fallbacks"] = _fallbacks(asked, sampler)
        if device == "cuda":
            res["profile_top"] = _step_profile(sampler, x, i, device)
            if op_profile:
                res["op_profile_top"] = _op_profile(sampler, x, i, device)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        sampler = None
        _end_phase(res, device)
    return res


def _step_profile(sampler, x, i, device, k: int = 15) -> list[dict]:
    """Top kernels of one (graph-replayed) step by device time: where a step's time goes beyond its
    FLOP floor. A profiler failure is recorded, not raised."""
    try:
        return profile_top(lambda: sampler.step(x, i), device, k=k)
    except Exception as exc:  # noqa: BLE001
        return [{"name": f"profile failed: {type(exc).__name__}: {exc}"[:80], "ms": 0.0, "share": 0.0, "calls": 0}]


def _op_profile(sampler, x, i, device, k: int = 15) -> list[dict]:
    """Top aten ops of one step by self device time, run eagerly (the sampler's CUDA graph off for
    the call, its other options kept), each with input shapes, dtypes and the kernels it launched:
    which op a kernel of the graph replay's profile is. A profiler failure is recorded, not raised."""
    graphed = sampler.cuda_graph
    sampler.cuda_graph = False
    try:
        return profile_top(lambda: sampler.step(x, i), device, k=k, by_shape=True)
    except Exception as exc:  # noqa: BLE001
        return [{"name": f"op profile failed: {type(exc).__name__}: {exc}"[:80], "ms": 0.0, "share": 0.0,
                 "calls": 0, "shapes": []}]
    finally:
        sampler.cuda_graph = graphed


def _guide_profile(sampler, x, i, device, k: int = 15) -> list[dict]:
    """Top aten ops of the step's guide alone (merged expert forward + backward to x_t, eager, the
    sampler's options), with shapes and kernels: where #4's guided / unguided gap goes."""
    try:
        idx, key = sampler._index(i, x)
        runner, t = sampler._variant(key), sampler._tmap[idx]
        return profile_top(lambda: sampler._guide_grad(runner, x, t), device, k=k, by_shape=True)
    except Exception as exc:  # noqa: BLE001
        return [{"name": f"guide profile failed: {type(exc).__name__}: {exc}"[:80], "ms": 0.0, "share": 0.0,
                 "calls": 0, "shapes": []}]


def _variant_ratios(variant: str, ratios: dict, unguided_vs_reference: float, fallbacks=()) -> dict:
    """Figures of a guide variant phase timed against the reference in its own rounds: vs the fast
    step (``step_<name>_vs_fast``) and its guided / unguided (``step_guided_vs_unguided_<name>``: the
    variant over the fast unguided step of the main rounds, both through the reference's time). None where
    ``fallbacks`` (options asked of the variant or of the main fast steps that did not run) is not empty."""
    name = variant.removeprefix("fast_")
    vs_ref = ratios.get(f"step_{name}_vs_reference")
    if name not in ("overlap", "compiled_guide") or vs_ref is None or fallbacks:
        return {}
    return {f"step_{name}_vs_fast": round(vs_ref / ratios["step_fast_vs_reference"], 4),
            f"step_guided_vs_unguided_{name}": round(vs_ref / unguided_vs_reference, 4)}


def _step_warnings(caught) -> list:
    """First lines of the fast path's warnings among those caught: the sampler's fallbacks (FastSamplingWarning)
    and the model's (RuntimeWarning: ADMUNet's fused output head failing its check runs the unfused head)."""
    return [str(w.message).splitlines()[0] for w in caught
            if issubclass(w.category, (FastSamplingWarning, RuntimeWarning))]


def _fallbacks(asked: dict, sampler) -> list:
    """The on/off options asked for (True in ``asked``; merge_experts too where there is a guide: the sampler's
    default) that ``sampler`` does not run after its fallbacks (applied_options: e.g. a failed capture or compile)."""
    on = {k for k, v in asked.items() if v is True} | ({"merge_experts"} if sampler.fast_guide is not None else set())
    applied = sampler.applied_options
    return sorted(k for k in on if applied.get(k) is not True)


def _ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b) measured in the same round."""
    import statistics

    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def run(device: str = "cpu", quick: bool = False, emit=None) -> dict:
    if device == "cuda":
        return _run(device, quick, emit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small shared CPU boxes: one thread times steadier than oversubscribed ones
    try:
        return _run(device, quick, emit)
    finally:
        torch.set_num_threads(threads)


def _run(device: str, quick: bool, emit=None) -> dict:
    cuda = device == "cuda"
    model, bank, shape, name = _setup(device)
    sched = Schedule.create("linear", 1000, "ddim25").to(device)
    target, scale, i = 1, 10.0, 12  # step index 12 -> t = 480 (expert 2)
    guide = ClassGuide(bank, target, scale=scale)
    # the official denoiser: its own NCHW copy (the fast samplers convert theirs to channels_last in
    # place) with guided-diffusion's einsum attention (float32 softmax), GroupNorm32 then SiLU
    ref = ReferenceStack(copy.deepcopy(model).set_attention_backend("math"), bank, target, scale, sched, device)
    if cuda:  # the fast path as guided-sample runs it: fused GroupNorm + SiLU in channels_last (own copy)
        fast_model = copy.deepcopy(model)
        unguided_opts = {"cuda_graph": True, **recommended_options(fast_model, device)}
        fast_opts = dict(guide_autocast=torch.bfloat16, **unguided_opts)
    else:  # no channels_last on CPU: with the compiled, frozen denoiser it was slower (36.8 vs 34.7 ms a step)
        fast_model = model
        unguided_opts = dict(compile_model=True, compile_freeze=True)
        fast_opts = dict(compile_guide=True, **unguided_opts)
    fast = FastGuidedSampler(fast_model, sched, guide=guide, **fast_opts)
    fast_unguided = FastGuidedSampler(fast_model, sched, **unguided_opts)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)

    # equal math: the fast step reproduces the reference step (fp32 here; bf16 guide on CUDA)
    with torch.no_grad():
        want = ref.step(x, i)
    with warnings.catch_warnings(record=True) as caught:  # e.g. compile unavailable: eager, and say so
        warnings.simplefilter("always", FastSamplingWarning)
        t0 = time.perf_counter()
        got = fast.step(x, i)[0]
        first_s = time.perf_counter() - t0
        fast_unguided.step(x, i)
    fast_warnings = _step_warnings(caught)
    rel = _rel(got, want)
    if not cuda and not rel < 1e-4:
        raise AssertionError(f"fast step differs from the reference stack: rel err {rel:.2e}")

    reps = (5 if quick else 10) if cuda else (9 if quick else 25)  # CUDA quick: 3 gave unguided > guided (noise)
    warm = 2 if cuda else 1
    variants = {"ref": lambda: ref.step(x, i), "ref_u": lambda: ref.step(x, i, guided=False),
                "fast": lambda: fast.step(x, i), "fast_u": lambda: fast_unguided.step(x, i)}
    ms, rounds = _interleaved_ms(variants, device, reps, warm)
    t_ref, t_ref_u, t_fast, t_fast_u = ms["ref"], ms["ref_u"], ms["fast"], ms["fast_u"]
    ref_u_ratio = round(_ratio(rounds, "ref", "ref_u"), 4)
    unguided_vs_reference = _ratio(rounds, "fast_u", "ref")
    fast_fallbacks = _fallbacks(fast_opts, fast) + [f"unguided:{k}" for k in _fallbacks(unguided_opts, fast_unguided)]
    variants = fast_unguided = None  # frees its graph pool before the variant phases
    extras = _cuda_variants(model, sched, guide) if cuda else {}
    row = {"bench": "guided_ddim_step", "config": name, "shape": list(shape), "device": device,
           "threads": torch.get_num_threads() if not cuda else None, "reps": reps,
           "fast_options": {k: str(v) for k, v in fast_opts.items()},
           "applied_options": {k: str(v) for k, v in fast.applied_options.items()}, "fast_fallbacks": fast_fallbacks,
           "reference_ms": round(t_ref, 3), "reference_unguided_ms": round(t_ref_u, 3),
           "fast_ms": round(t_fast, 3), "fast_unguided_ms": round(t_fast_u, 3),
           "fast_vs_reference_rel_err": float(f"{rel:.3e}"), "fast_first_step_s": round(first_s, 2),
           "fast_warnings": fast_warnings}
    t_orig = sched.timestep_map[torch.full((shape[0],), i, device=device)]
    fl_u = _denoiser_flops(model, x, t_orig)
    fl_g = _guide_flops(bank.merged(int(sched.timestep_map[i]) // bank.band).to(device), x, target)
    fl = fl_u + fl_g if fl_u and fl_g else None
    if fl:
        row["step_gflop"] = round(fl / 1e9, 3)
        row["guide_gflop"] = round(fl_g / 1e9, 3)
        row["fast_tflops"] = round(fl / (t_fast * 1e-3) / 1e12, 4)
        peak = _peak(device)
        if peak:
            row["peak_tflops"] = peak / 1e12
            row["floor_ms"] = round(fl / peak * 1e3, 3)
            row["fast_mfu"] = round(fl / peak / (t_fast * 1e-3), 4)
            row["reference_mfu"] = round(fl / peak / (t_ref * 1e-3), 4)
    if cuda:
        row["fast_profile_top"] = _step_profile(fast, x, i, device)
        row["fast_op_profile_top"] = _op_profile(fast, x, i, device)
        row["guide_op_profile_top"] = _guide_profile(fast, x, i, device)
    ratios = {"step_fast_vs_reference": round(_ratio(rounds, "fast", "ref"), 4),
              "step_guided_vs_unguided": round(_ratio(rounds, "fast", "fast_u"), 4)}
    if emit is not None:  # the main figures survive a later phase that runs out of time
        emit(dict(row), dict(ratios))
    fast = got = None  # its graph pool (and a step output in it) is not needed by the phases below
    _end_phase({}, device)
    if os.environ.get("PPAP_BENCH_STEP_DEIT", "1" if cuda else "0") == "1":  # issue #4: DeiT-S experts too
        row["deit_s"] = res = _guide_phase(_deit_setup, ref.model, fast_model, sched, x, i, target, scale,
                                           fast_opts, unguided_opts, device, reps, warm)
        if "fast_ms" in res:
            ratios["step_fast_vs_reference_deit_s"] = res["fast_vs_reference"]
            ratios["step_guided_vs_unguided_deit_s"] = res["guided_vs_unguided"]
        if emit is not None:
            emit(dict(row), dict(ratios))
    for variant, (ratio_key, build, asked) in extras.items():  # one phase each, vs the reference in its rounds
        row[variant] = res = _variant_phase(build, x, i, want, ref, device, reps, warm,
                                            op_profile=variant == "fast_compiled", asked=asked)
        if "ms" in res:
            if not res.get("fallbacks"):  # else the row keeps it: not a figure of the variant its name says
                ratios[ratio_key] = res.pop("ratio_vs_reference")
            if fl and _peak(device):
                res["mfu"] = round(fl / _peak(device) / (res["ms"] * 1e-3), 4)
        ratios.update(_variant_ratios(variant, ratios, unguided_vs_reference, fast_fallbacks + res.get("fallbacks", [])))
        if emit is not None:
            emit(dict(row), dict(ratios))
    row["reference_guided_vs_unguided"] = ref_u_ratio
    if not all(math.isfinite(v) for v in ratios.values()):
        raise AssertionError(f"non-finite ratios {ratios}")
    return {"rows": [row], "ratios": ratios}


if __name__ == "__main__":
    import json

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", quick=True), indent=1))
