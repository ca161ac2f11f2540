"""Real-scale figures (issue #5): whole guided sampling runs and data-free generation throughput.

cuda: ADM-256 uncond (random weights; the preset's fp16 torso) + torchvision ResNet50 PPAP-10
(random experts), guided DDIM-25 at batch 32 on the fast path (merged experts, bf16 guide,
fast_sampling.recommended_options: fused norms in channels_last; CUDA graphs) and, in the same
run, unguided: images/s, peak memory, MFU against the card's dense bf16 peak (FLOPs counted with torch's FlopCounterMode: 25 x (denoiser forward +
expert forward and input backward)). Data-free generation throughput: bench_generate.py.
cpu: the same code on tiny models, so the suite stays tested; its figures are only indicative.

Ratios: ``sample_guided_vs_unguided`` (whole 25-step run, same batch; 1.0 = guidance is free) and
``sample_swap_vs_cache`` (merge_mode "swap" vs "cache"; the row also has the memory each keeps).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import _denoiser_flops, _guide_flops, _peak, _randomise_bank  # noqa: E402
from timing import timed_ms  # noqa: E402

from ppap_fast.experts import ExpertBank  # noqa: E402
from ppap_fast.fast_sampling import FastGuidedSampler, recommended_options  # noqa: E402
from ppap_fast.guidance import ClassGuide  # noqa: E402
from ppap_fast.models.adm import ADMUNet  # noqa: E402
from ppap_fast.schedule import Schedule  # noqa: E402

N_EXPERTS, TARGET, SCALE = 10, 1, 10.0


def _models(cuda: bool):
    torch.manual_seed(0)
    if cuda:
        import torchvision

        model = ADMUNet.from_config("256x256_diffusion_uncond")
        net = torchvision.models.resnet50(weights=None)
        return model, net, (32, 3, 256, 256), "adm256_uncond+resnet50_ppap10", "adm:256x256_diffusion_uncond"
    from ppap_fast.models.tiny import TinyResNet

    model = ADMUNet(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                    attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, use_scale_shift_norm=True,
                    resblock_updown=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:  # zero-initialised output convs: give the run something to do
                p.normal_(0, 0.02)
    net = TinyResNet(widths=(8, 16), layers=(1, 1), in_channels=3, num_classes=10)
    return model, net, (4, 3, 16, 16), "tiny_adm16+tinyresnet_ppap10", "random-conv"


def _timed(fn, device) -> float:
    return timed_ms(fn, device) / 1e3


def _sampling_rows(device: str, quick: bool, emit=None):
    cuda = device == "cuda"
    model, net, shape, name, _ = _models(cuda)
    model = model.to(device).eval().requires_grad_(False)
    bank = _randomise_bank(ExpertBank(net, "resnet", n_experts=N_EXPERTS), 0.01).to(device)
    sched = Schedule.create("linear", 1000, "ddim25").to(device)
    opts = dict(guide_autocast=torch.bfloat16, cuda_graph=True, **recommended_options(model, device)) if cuda else {}
    guided = FastGuidedSampler(model, sched, guide=ClassGuide(bank, TARGET, scale=SCALE), **opts)
    unguided = FastGuidedSampler(model, sched, **{k: v for k, v in opts.items() if k != "guide_autocast"})
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    guided.sample(x_T)  # warm-up: merges, graph captures
    unguided.sample(x_T)
    reps = 1 if quick else 3
    t_g = min(_timed(lambda: guided.sample(x_T), device) for _ in range(reps))
    t_u = min(_timed(lambda: unguided.sample(x_T), device) for _ in range(reps))
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    out = guided.sample(x_T)
    if not torch.isfinite(out).all():
        raise AssertionError("guided sampling produced non-finite images")

    t_dev = torch.full((shape[0],), 480, device=device, dtype=torch.long)
    f_model = _denoiser_flops(model, x_T, t_dev)
    f_guide = _guide_flops(bank.merged(2).to(device).eval(), x_T, TARGET)
    steps = len(sched.timestep_map)
    flops = steps * (f_model + f_guide) if f_model and f_guide else None
    peak = _peak(device)
    row = {"bench": "guided_sampling_ddim25", "config": name, "shape": list(shape), "device": device,
           "steps": steps, "fast_options": {k: str(v) for k, v in opts.items()},
           "applied_options": {k: str(v) for k, v in guided.applied_options.items()},
           "guided_s": round(t_g, 4), "unguided_s": round(t_u, 4),
           "guided_images_per_s": round(shape[0] / t_g, 3), "unguided_images_per_s": round(shape[0] / t_u, 3),
           "peak_memory_gib": None if peak_gib is None else round(peak_gib, 3),
           "flops_per_run": flops, "achieved_tflops": None if flops is None else round(flops / t_g / 1e12, 2),
           "mfu_vs_dense_bf16_peak": None if (flops is None or peak is None) else round(flops / t_g / peak, 4)}
    ratios = {"sample_guided_vs_unguided": round(t_g / t_u, 4)}
    if emit is not None:  # kept if the merge-mode runs below do not finish in time
        emit([row], ratios)
    del guided, unguided
    swap_row = _merge_mode_rows(model, bank, sched, opts, x_T, device, reps)
    ratios["sample_swap_vs_cache"] = round(swap_row["swap_s"] / swap_row["cache_s"], 4)
    return [row, swap_row], ratios


def _merge_mode_rows(model, bank, sched, opts, x_T, device, reps):
    """merge_mode "cache" (one merged expert and, with CUDA graphs, one graph per band) vs "swap"
    (one copy, weights swapped in place): seconds per run and device memory each keeps."""
    import gc

    cuda = device == "cuda"
    row = {"bench": "guided_sampling_merge_modes", "shape": list(x_T.shape), "device": device}
    for mode in ("cache", "swap"):
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved()
        s = FastGuidedSampler(model, sched, guide=ClassGuide(bank, TARGET, scale=SCALE), merge_mode=mode, **opts)
        s.sample(x_T)
        row[f"{mode}_s"] = round(min(_timed(lambda: s.sample(x_T), device) for _ in range(reps)), 4)
        row[f"{mode}_held_gib"] = round((torch.cuda.memory_reserved() - before) / 2**30, 3) if cuda else None
        del s
    return row


def run(device: str = "cpu", quick: bool = False, emit=None) -> dict:
    rows, ratios = _sampling_rows(device, quick, emit)
    return {"rows": rows, "ratios": ratios}
