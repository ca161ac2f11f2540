"""Where a guided step's time goes: the denoiser alone (issue #4).

On an H100 the ADM-256 uncond step at batch 32 took 565 ms with the guide costing 7 ms of it
(benchmarks/NOTES.md), so ``step_fast_vs_reference`` and the MFU goal depend on the denoiser.
This suite times one denoiser forward (no grad) in the variants the fast path can choose and
profiles one forward (eager, fused and, on CUDA, compiled):

    nchw                 the model as built (ADM preset: fp16 torso, fp32 GroupNorm)
    channels_last        model and input in channels_last (the fast sampler's option)
    cudnn_benchmark      channels_last + torch.backends.cudnn.benchmark (CUDA only)
    fused_norm_act       cudnn_benchmark + ADMUNet.fuse_norm_act() (GroupNorm + scale-shift + SiLU as
                         one Triton op, the resampling and skip concatenations as Triton ops; CUDA only)
    compiled             channels_last (+ cudnn benchmark) + torch.compile (inductor, default mode);
                         compile time reported apart as ``compile_s``; skipped on CPU with --quick
                         and where PPAP_SKIP_COMPILE=1
    compiled_chstats     compiled, with ADMUNet.set_group_norm_stats("channel") (its own copy):
                         ``denoiser_compiled_chstats_vs_compiled`` decides whether compiled CUDA
                         denoisers take per-channel GroupNorm statistics as frozen CPU ones do

Rows: ms per forward, TFLOP/s and MFU against the card's dense bf16/fp16 peak (FLOPs from
FlopCounterMode), and the profiler's top ops by self device time (``profile_top``: name, ms,
share, calls). Ratios: ``denoiser_channels_last_vs_nchw``, ``denoiser_cudnn_benchmark_vs_default``,
``denoiser_fused_norm_act_vs_eager`` and ``denoiser_compiled_vs_eager`` (each vs the best of the
unfused eager variants), ``denoiser_channel_sums_vs_off`` (the fused ADM with / without the GroupNorm
statistics from the producers' channel sums); on CUDA also ``residual_fused_vs_eager`` (ops.bias_residual_add vs a
bias add then a residual add, ADM-256's largest activation) and ``resample_triton_vs_torch``
(ops.upsample_nearest2x / avg_pool2x vs F.interpolate / F.avg_pool2d at ADM-256's largest
resampling, geometric mean of the two), ``cat_triton_vs_torch`` (ops.cat_channels vs torch.cat at
ADM-256's largest decoder skip concatenation), ``gn_stats_split_vs_group`` and
``cl_tile_rows_vs_narrow`` (defaults switched before a GPU timed them), ``channel_sums_vs_separate`` (a
residual add + the next GroupNorm with the add writing the GroupNorm's channel sums vs its own statistics
pass: opt-in, PPAP_FAST_CHANNEL_SUMS), and each of those memory-bound
ops against a plain copy of the bytes it moves (``gn_vs_copy``, ``residual_vs_copy``, ``cat_vs_copy``,
``resample_up_vs_copy``, ``resample_pool_vs_copy``: 1 is copy speed); ``adm_conv_triton_vs_cudnn``: the
Triton implicit-GEMM conv vs cuDNN at ADM-256's largest 3x3 conv (whether a conv with the GroupNorm
fused into its loads could pay); ``out_head_half_vs_float``: the output head with its conv in fp16 vs
float32 / TF32 (ADMUNet.fuse_norm_act's half_out_conv, the default since the 2026-11-28 H100 run);
``out_head_fused_vs_half``: that half head as one op (ops.group_norm_silu_conv3x3: the normalised activation
never written; ADMUNet's fused_out_head, default on: revert above 1.03) vs the half head.

cuda: ADM-256 uncond preset, random weights, batch ``PPAP_DENOISER_BATCH`` (default 32), t = 480.
cpu: the tiny ADM-32 of bench_step at batch 4, so the suite stays tested.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_step import _denoiser_flops, _peak, _setup  # noqa: E402
from timing import error_text, median_ms, profile_top  # noqa: E402


def _median_ms(fn, device, reps, warmup=2):
    with torch.no_grad():
        return median_ms(fn, device, reps, warmup)


def _residual_ratio(row, batch, reps) -> float:
    """ops.bias_residual_add (one pass) vs PyTorch's conv-bias add then residual add, on ADM-256's
    largest activation ([batch, 256, 256, 256] fp16 channels_last); ms into row."""
    from ppap_fast.ops import bias_residual_add

    shp = (batch, 256, 256, 256)
    h, skip = (torch.randn(shp, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
               for _ in range(2))
    bias = torch.randn(256, device="cuda", dtype=torch.float16)
    fused = _median_ms(lambda: bias_residual_add(h, skip, bias), "cuda", reps)
    eager = _median_ms(lambda: skip + h.add(bias[:, None, None]), "cuda", reps)
    row["residual_fused_ms"], row["residual_eager_ms"] = round(fused, 3), round(eager, 3)
    return round(fused / eager, 4)


def _cl_half(device, *shape):
    """randn(shape) in fp16, channels_last: the fused ADM's activations."""
    return torch.randn(shape, device=device, dtype=torch.float16).contiguous(memory_format=torch.channels_last)


def _torch_vs_triton(row, name, torch_fn, triton_fn, device, reps) -> float:
    """Whether triton_fn gives torch_fn's result bit for bit, their median ms (row keys name_bitwise,
    name_torch_ms, name_triton_ms), and the Triton / torch time ratio."""
    with torch.no_grad():
        row[f"{name}_bitwise"] = bool(torch.equal(torch_fn(), triton_fn()))
    ms_torch, ms_triton = _median_ms(torch_fn, device, reps), _median_ms(triton_fn, device, reps)
    row[f"{name}_torch_ms"], row[f"{name}_triton_ms"] = round(ms_torch, 3), round(ms_triton, 3)
    return ms_triton / ms_torch


def _resample_ratio(row, batch, reps, device="cuda", channels=256, size=256) -> float:
    """ops.upsample_nearest2x / avg_pool2x (Triton) vs F.interpolate / F.avg_pool2d at ADM-256's largest
    resampling ([batch, C, size/2, size/2] up, [batch, C, size, size] pooled; fp16 channels_last): median
    ms of each into row, whether the outputs are PyTorch's bit for bit, and the geometric mean of the two
    Triton / torch ratios."""
    import torch.nn.functional as F

    from ppap_fast.ops import resample

    small, big = _cl_half(device, batch, channels, size // 2, size // 2), _cl_half(device, batch, channels, size, size)
    up = _torch_vs_triton(row, "resample_up", lambda: F.interpolate(small, scale_factor=2, mode="nearest"),
                          lambda: resample.upsample_nearest2x(small, backend="triton"), device, reps)
    pool = _torch_vs_triton(row, "resample_pool", lambda: F.avg_pool2d(big, 2, 2),
                            lambda: resample.avg_pool2x(big, backend="triton"), device, reps)
    return round((up * pool) ** 0.5, 4)


def _gn_stats_ratio(row, batch, reps, device="cuda", channels=256, size=256) -> float:
    """group_norm_act (GroupNorm + SiLU, fp16 channels_last, ADM-256's largest map) with the split
    statistics (the default for channels-fastest x) vs one program per group (PPAP_FAST_GN_STATS=group):
    median ms of each into row, and their ratio."""
    from ppap_fast.ops import norm_act
    from ppap_fast.ops import norm_act_triton as NT

    x = _cl_half(device, batch, channels, size, size)
    w, b = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    before = NT.GN_STATS_CL
    ms = {}
    try:
        for mode in ("split", "group"):
            NT.GN_STATS_CL = mode
            ms[mode] = _median_ms(lambda: norm_act.group_norm_act(x, 32, w, b, backend="triton"), device, reps)
    finally:
        NT.GN_STATS_CL = before
    row["gn_stats_split_ms"], row["gn_stats_group_ms"] = round(ms["split"], 3), round(ms["group"], 3)
    return round(ms["split"] / ms["group"], 4)


def _cl_tile_ratio(row, batch, reps, device="cuda", channels=256, size=256) -> float:
    """group_norm_act (with ADM's scale-shift and SiLU) and bias_residual_add on ADM-256's largest map
    (fp16 channels_last) in the whole-row tiles (PPAP_FAST_CL_TILE=rows, the default) vs the 32-channel
    ones (narrow): median ms of each into row, the geometric mean of the two rows / narrow ratios."""
    from ppap_fast.ops import norm_act, residual
    from ppap_fast.ops import norm_act_triton as NT

    x, skip = _cl_half(device, batch, channels, size, size), _cl_half(device, batch, channels, size, size)
    w, b = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    sc, sh = (torch.randn(batch, channels, device=device, dtype=torch.float16) for _ in range(2))
    bias = torch.randn(channels, device=device, dtype=torch.float16)
    ops = {"gn": lambda: norm_act.group_norm_act(x, 32, w, b, scale=sc, shift=sh, backend="triton"),
           "residual": lambda: residual.bias_residual_add(x, skip, bias, backend="triton")}
    before, ms = NT.CL_TILE, {}
    try:
        for mode in ("rows", "narrow"):
            NT.CL_TILE = mode
            for op, fn in ops.items():
                ms[op, mode] = _median_ms(fn, device, reps)
                row[f"cl_tile_{op}_{mode}_ms"] = round(ms[op, mode], 3)
    finally:
        NT.CL_TILE = before
    return round((ms["gn", "rows"] / ms["gn", "narrow"] * ms["residual", "rows"] / ms["residual", "narrow"]) ** 0.5, 4)


def _channel_sums_ratio(row, batch, reps, device="cuda", channels=256, size=256) -> float:
    """A residual add then the GroupNorm + SiLU of its output (ADM's block boundary; fp16 channels_last,
    ADM-256's largest map): with the residual op writing the GroupNorm's channel sums (ops.channel_sums, opt-in:
    PPAP_FAST_CHANNEL_SUMS) vs the GroupNorm's own statistics pass: median ms of each into row, their ratio."""
    from ppap_fast.ops import norm_act, residual
    from ppap_fast.ops.channel_sums import ChannelSums

    h, skip = _cl_half(device, batch, channels, size, size), _cl_half(device, batch, channels, size, size)
    w, b = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    bias = torch.randn(channels, device=device, dtype=torch.float16)

    def separate():
        return norm_act.group_norm_act(residual.bias_residual_add(h, skip, bias, backend="triton"), 32, w, b,
                                       backend="triton")

    def with_sums():
        y = torch.empty_like(skip)
        sums = ChannelSums(y)
        residual.bias_residual_add(h, skip, bias, out=y, channel_sums=sums, backend="triton")
        return norm_act.group_norm_act(y, 32, w, b, channel_sums=sums, backend="triton")

    with torch.no_grad():
        a, c = separate().float(), with_sums().float()
        row["channel_sums_rel_diff"] = float(((a - c).norm() / a.norm()).item())
    ms_sep, ms_sums = _median_ms(separate, device, reps), _median_ms(with_sums, device, reps)
    row["channel_sums_separate_ms"], row["channel_sums_ms"] = round(ms_sep, 3), round(ms_sums, 3)
    return round(ms_sums / ms_sep, 4)


def _channel_sums_off_ratio(model, x, t, device, reps, row, record) -> float:
    """The fused ADM with the producers' channel sums (PPAP_FAST_CHANNEL_SUMS=1, recorded as fused_channel_sums)
    against it with every GroupNorm its own statistics pass (=0, fused_no_channel_sums), both set whatever the
    default is (off since 2026-11-28: row's fused_norm_act_ms is then the off run): the on / off ratio."""
    from ppap_fast.models import adm as ADM

    before = ADM.CHANNEL_SUMS
    try:
        for mode, variant in (("1", "fused_channel_sums"), ("0", "fused_no_channel_sums")):
            ADM.CHANNEL_SUMS = mode
            record(variant, _median_ms(lambda: model(x, t), device, reps))
    finally:
        ADM.CHANNEL_SUMS = before
    return round(row["fused_channel_sums_ms"] / row["fused_no_channel_sums_ms"], 4)


# the Triton implicit-GEMM conv's tilings timed at ADM's scale (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages):
# the launchers' default, then the best of bench_lora's at its 3x3 layer (each one more compile)
ADM_CONV_TILES = (None, (128, 256, 64, 8, 3))


def _adm_conv_ratio(row, batch, reps, device="cuda", channels=256, size=256) -> float:
    """The Triton implicit-GEMM conv (ops/lora/triton_conv.py with no LoRA: the kernels a conv with a
    fused GroupNorm prologue would grow from) vs cuDNN at ADM-256's most frequent conv (3x3, 256 -> 256
    channels at 256x256, fp16 channels_last; cudnn.benchmark as the caller set it): median ms of cuDNN and
    of each tiling into row, the best tiling's time / cuDNN's. Near 1, a conv that applies the previous
    GroupNorm + SiLU on its loads would save that pass (~0.6 ms a call at batch 32)."""
    import contextlib

    import torch.nn.functional as F

    from ppap_fast.ops import lora as L
    from ppap_fast.ops.lora import triton_conv as tc

    x = _cl_half(device, batch, channels, size, size)
    w = (torch.randn(channels, channels, 3, 3, device=device) / 48).to(torch.float16)
    wt = tc.weight_for_tiles(w)
    y = torch.empty_like(x)
    seg = L.build_segments(torch.zeros(batch, dtype=torch.long, device=device), 1)
    with torch.no_grad():
        row["adm_conv_cudnn_ms"] = round(_median_ms(lambda: F.conv2d(x, w, None, 1, 1), device, reps), 3)
        best = None
        for t in ADM_CONV_TILES:
            tag = "default" if t is None else "x".join(map(str, t[:3]))
            with contextlib.nullcontext() if t is None else tc.tiles(*t):
                ms = _median_ms(lambda: tc.conv_base_lora_fwd(x, wt, y, seg.sorted_idx, seg.offsets, 1, 1, 1), device,
                                reps)
            row[f"adm_conv_triton_{tag}_ms"] = round(ms, 3)
            best = ms if best is None else min(best, ms)
        ref = F.conv2d(x, w, None, 1, 1).float()
        row["adm_conv_triton_rel_err"] = float((y.float() - ref).norm() / ref.norm())
    return round(best / row["adm_conv_cudnn_ms"], 4)


def _out_head_ratio(row, batch, reps, device="cuda", channels=256, size=256, out_channels=6) -> float:
    """ADM-256's output head (out norm + SiLU, 3x3 conv to 6 channels) on the fp16 torso's last activation:
    the conv in fp16 (ADMUNet.fuse_norm_act(half_out_conv=True)) vs float32 (TF32 on a GPU, as cudnn.allow_tf32
    leaves it: stop 19's profile had it at 4.8 ms, a 256x32 tile for 6 channels): median ms of each and their
    relative difference into row, the half / float time ratio."""
    import torch.nn.functional as F

    from ppap_fast.ops import norm_act

    h = _cl_half(device, batch, channels, size, size)
    w, b = torch.rand(channels, device=device) + 0.5, torch.randn(channels, device=device)
    cw = (torch.randn(out_channels, channels, 3, 3, device=device) / 48).contiguous(memory_format=torch.channels_last)
    cb = torch.randn(out_channels, device=device)

    def head(half):
        if half:
            hn = norm_act.group_norm_act(h, 32, w, b)
            return F.conv2d(hn, cw.half(), cb.half(), 1, 1).float()
        return F.conv2d(norm_act.group_norm_act(h, 32, w, b, out_dtype=torch.float32), cw, cb, 1, 1)

    ms = {k: _median_ms(lambda: head(k), device, reps) for k in (True, False)}
    with torch.no_grad():
        a, ref = head(True), head(False)
        row["out_head_half_rel_diff"] = float((a - ref).norm() / ref.norm())
    row["out_head_half_ms"], row["out_head_float_ms"] = round(ms[True], 3), round(ms[False], 3)
    row["out_head_fused_ms"], row["out_head_fused_rel_diff"] = _out_head_fused(h, w, b, cw, cb, ref, device, reps)
    return round(ms[True] / ms[False], 4)


def _out_head_fused(h, w, b, cw, cb, ref, device, reps) -> tuple:
    """The same head as one op (ops.group_norm_silu_conv3x3, ADMUNet's fused_out_head): median ms and its
    relative difference from the float32 head."""
    from ppap_fast.ops import out_head

    def fused():
        return out_head.group_norm_silu_conv3x3(h, 32, w, b, conv_weight=cw, conv_bias=cb, out_dtype=torch.float32)

    ms = _median_ms(fused, device, reps)
    with torch.no_grad():
        got = fused()
    return round(ms, 3), float((got - ref).norm() / ref.norm())


# passes over one activation-sized tensor each op makes (a copy: 2, one read and one write), for
# time / (copy time of the same bytes): 1 means the op runs at copy speed
_PASSES = {"gn_vs_copy": ("gn_stats_split_ms", 3), "residual_vs_copy": ("residual_fused_ms", 3),
           "cat_vs_copy": ("cat_triton_ms", 4), "resample_up_vs_copy": ("resample_up_triton_ms", 1.25),
           "resample_pool_vs_copy": ("resample_pool_triton_ms", 1.25)}


def _vs_copy(row, batch, reps, device="cuda", channels=256, size=256) -> dict:
    """A plain copy of ADM-256's largest activation (``copy_ms``, into row) and each memory-bound op's
    time against a copy of the bytes it moves (``*_vs_copy``: its passes over the tensor / 2 copies),
    for the rows already in row."""
    x = _cl_half(device, batch, channels, size, size)
    y = torch.empty_like(x)
    copy = _median_ms(lambda: y.copy_(x), device, reps)
    row["copy_ms"] = round(copy, 3)
    return {name: round(row[key] / (copy * passes / 2), 4) for name, (key, passes) in _PASSES.items() if key in row}


def _cat_ratio(row, batch, reps, device="cuda", channels=256, size=256) -> float:
    """ops.cat_channels (Triton) vs torch.cat(dim=1) at ADM-256's largest decoder concatenation (two
    [batch, C, size, size] fp16 channels_last tensors): median ms of each into row, whether the outputs
    are torch.cat's bit for bit, and the Triton / torch ratio."""
    from ppap_fast.ops import concat

    xs = [_cl_half(device, batch, channels, size, size) for _ in range(2)]
    return round(_torch_vs_triton(row, "cat", lambda: torch.cat(xs, dim=1),
                                  lambda: concat.cat_channels(xs, backend="triton"), device, reps), 4)


def _fused_rows(model, x, t, device, reps, row, record, eager_best) -> dict:
    """The model with fuse_norm_act(): its time over eager_best and, for an ADM, the channel sums on / off. An
    error is recorded in row (``fused_norm_act_error``, ``channel_sums_off_error``: it cost the whole suite,
    the eager figures and the op rows after it); the model is left unfused."""
    ratios = {}
    try:
        model.fuse_norm_act()
        record("fused_norm_act", _median_ms(lambda: model(x, t), device, reps))
        ratios["denoiser_fused_norm_act_vs_eager"] = round(row["fused_norm_act_ms"] / eager_best, 4)
        row["fused_norm_act_profile_top"] = profile_top(lambda: model(x, t), device, k=8)
        if hasattr(model, "output_blocks"):  # ADM: the same without the producers' channel sums
            try:
                ratios["denoiser_channel_sums_vs_off"] = _channel_sums_off_ratio(model, x, t, device, reps, row,
                                                                                record)
            except Exception as exc:  # noqa: BLE001
                row["channel_sums_off_error"] = error_text(exc)
    except Exception as exc:  # noqa: BLE001
        row["fused_norm_act_error"] = error_text(exc)
    finally:
        model.fuse_norm_act(False)
    return ratios


def _out_head_ratios(row, batch, reps) -> dict:
    ratios = {"out_head_half_vs_float": _out_head_ratio(row, batch, reps)}
    ratios["out_head_fused_vs_half"] = round(row["out_head_fused_ms"] / row["out_head_half_ms"], 4)
    return ratios


def _cuda_op_ratios(row, batch, reps) -> dict:
    """The CUDA op rows, each on its own: one that raises (a kernel this GPU or Triton refuses) records
    ``<name>_error`` in row and costs only its own ratios (it cost the whole suite, out_head_fused_vs_half too)."""
    rows = (("residual_fused_vs_eager", lambda: {"residual_fused_vs_eager": _residual_ratio(row, batch, reps)}),
            ("resample_triton_vs_torch", lambda: {"resample_triton_vs_torch": _resample_ratio(row, batch, reps)}),
            ("cat_triton_vs_torch", lambda: {"cat_triton_vs_torch": _cat_ratio(row, batch, reps)}),
            ("gn_stats_split_vs_group", lambda: {"gn_stats_split_vs_group": _gn_stats_ratio(row, batch, reps)}),
            ("cl_tile_rows_vs_narrow", lambda: {"cl_tile_rows_vs_narrow": _cl_tile_ratio(row, batch, reps)}),
            ("channel_sums_vs_separate", lambda: {"channel_sums_vs_separate": _channel_sums_ratio(row, batch, reps)}),
            ("vs_copy", lambda: _vs_copy(row, batch, reps)),
            ("out_head", lambda: _out_head_ratios(row, batch, reps)),
            ("adm_conv_triton_vs_cudnn", lambda: {"adm_conv_triton_vs_cudnn": _adm_conv_ratio(row, batch, reps)}))
    ratios = {}
    for name, measure in rows:
        try:
            ratios.update(measure())
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_error"] = error_text(exc)
    return ratios


def _compile_timed(model, x, t, device):
    """torch.compile(model) and its first call (the compile), timed: (compiled, seconds)."""
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x, t)
    if device == "cuda":
        torch.cuda.synchronize()
    return compiled, round(time.perf_counter() - t0, 1)


def _compiled_chstats(model, x, t, device, reps, row, ratios, record) -> None:
    """The compiled variant again with the GroupNorm statistics per channel (its own copy)."""
    import copy

    try:
        compiled, row["compiled_chstats_compile_s"] = _compile_timed(
            copy.deepcopy(model).set_group_norm_stats("channel"), x, t, device)
        record("compiled_chstats", _median_ms(lambda: compiled(x, t), device, reps))
        ratios["denoiser_compiled_chstats_vs_compiled"] = round(row["compiled_chstats_ms"] / row["compiled_ms"], 4)
    except Exception as exc:  # noqa: BLE001
        row["compiled_chstats_error"] = error_text(exc)


def run(device: str = "cpu", quick: bool = False, emit=None) -> dict:
    cuda = device == "cuda"
    model, _, shape, name = _setup(device)
    if cuda:
        shape = (int(os.environ.get("PPAP_DENOISER_BATCH", 32)), *shape[1:])
    del _
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    t = torch.full((shape[0],), 480, device=device, dtype=torch.long)
    reps = (5 if quick else 10) if cuda else (3 if quick else 8)
    flops = _denoiser_flops(model, x, t)
    peak = _peak(device)
    row = {"bench": "denoiser_forward", "config": name.split("+")[0], "shape": list(shape), "device": device,
           "gflop": None if flops is None else round(flops / 1e9, 1), "reps": reps}

    def record(variant, ms):
        row[f"{variant}_ms"] = round(ms, 3)
        if flops:
            row[f"{variant}_tflops"] = round(flops / (ms * 1e-3) / 1e12, 2)
            if peak:
                row[f"{variant}_mfu"] = round(flops / (ms * 1e-3) / peak, 4)

    def emit_so_far():  # the figures so far survive a later variant that fails or runs out of time
        if emit is not None:
            emit(dict(row), dict(ratios))

    cudnn_before = torch.backends.cudnn.benchmark
    try:
        record("nchw", _median_ms(lambda: model(x, t), device, reps))
        model = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        record("channels_last", _median_ms(lambda: model(x_cl, t), device, reps))
        eager_best = min(row["nchw_ms"], row["channels_last_ms"])
        ratios = {"denoiser_channels_last_vs_nchw": round(row["channels_last_ms"] / row["nchw_ms"], 4)}
        if cuda:
            torch.backends.cudnn.benchmark = True
            record("cudnn_benchmark", _median_ms(lambda: model(x_cl, t), device, reps, warmup=3))
            ratios["denoiser_cudnn_benchmark_vs_default"] = round(row["cudnn_benchmark_ms"] / row["channels_last_ms"], 4)
            eager_best = min(eager_best, row["cudnn_benchmark_ms"])
            if hasattr(model, "fuse_norm_act"):  # ops.group_norm_act (Triton) in every ResBlock
                emit_so_far()  # the eager figures, before the fused path
                ratios.update(_fused_rows(model, x_cl, t, device, reps, row, record, eager_best))
        row["profile_top"] = profile_top(lambda: model(x_cl, t), device)
        if cuda:  # the fused path's residual, resampling and concatenation ops alone, at the top level's shapes
            emit_so_far()  # the denoiser's figures, before the op rows
            ratios.update(_cuda_op_ratios(row, shape[0], reps))
        emit_so_far()  # the eager figures, before the compile
        if os.environ.get("PPAP_SKIP_COMPILE") != "1" and (cuda or not quick):
            try:
                compiled, row["compile_s"] = _compile_timed(model, x_cl, t, device)
                record("compiled", _median_ms(lambda: compiled(x_cl, t), device, reps))
                ratios["denoiser_compiled_vs_eager"] = round(row["compiled_ms"] / eager_best, 4)
                if cuda:  # where the best variant's time goes (MFU goal: 0.5)
                    row["compiled_profile_top"] = profile_top(lambda: compiled(x_cl, t), device, k=10)
                compiled = None
                if hasattr(model, "set_group_norm_stats"):
                    emit_so_far()
                    _compiled_chstats(model, x_cl, t, device, reps, row, ratios, record)
            except Exception as exc:  # noqa: BLE001 - the eager figures stand; say why compile did not
                row["compile_error"] = error_text(exc)
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
    return {"rows": [row], "ratios": ratios}


if __name__ == "__main__":
    import json

    print(json.dumps(run(sys.argv[1] if len(sys.argv) > 1 else "cpu", quick=True), indent=1))
