"""Multi-expert LoRA benchmark: our routed op vs a per-expert Python loop, the frozen
base layer alone, and peft's mixed-batch forward (``adapter_names=``).

Entry point for the lead's runner: ``run(device, quick) -> {"rows": [...], "ratios": {...}}``.
Also ``python benchmarks/bench_lora.py [--device cuda] [--quick]`` prints a table;
``TRITON_INTERPRET=1 python benchmarks/bench_lora.py --device cpu --launches`` prints the per-call
launch accounting (``count_ops``). Conv rows compare a_stage="stacked" (default), "fused",
"implicit" (cuDNN base conv + one implicit-GEMM Triton kernel per direction for the LoRA share) and
"grouped"; "cuda_full" rows (CUDA backward) appear when that backend is available, "cpp" rows (the
same math as C++ autograd Functions: one Python -> C++ call per layer, on CPU and CUDA) when the
extension has them.

Layers (mixed batch, random expert per sample, rank 16, scale 0.5, N = 5 and 10):
  * resnet50 layer3 conv2: 3x3 conv 256->256 at 14x14
  * resnet50 layer3 conv1: 1x1 conv 1024->256 at 14x14
  * DeiT-S attn.qkv: linear 384->1152 over L=197 tokens
Times are medians (ms) of several reps, with torch.cuda.synchronize around each. The segment
metadata (sort by expert) is built once per batch, as ExpertBank does for all its layers, outside
the per-layer times: its own cost is the "segments(once per batch)" row.
On CUDA, "[cudagraph]" rows time the forward, and the forward + backward, captured in a CUDA graph
(GPU time without Python / launch overhead), the cost a graphed
training step (distill's default on one GPU) pays: ratio lora_fwdbwd_graph_vs_base_graph; its
_b2b twin (rows' fwdbwd_b2b_ms) times replays issued back to back, without the per-replay sync.
Ratios are ours / other (below 1 means ours is faster), geometric means over
layers and N:
  lora_fwd_vs_peft     forward, ours vs peft mixed-batch forward (peft: eval mode, no grad)
  lora_fwdbwd_vs_loop  forward+backward (dx, dA, dB), ours vs per-expert loop
  lora_fwdbwd_vs_base  forward+backward, ours vs the frozen base layer alone (dx only; the faster of
                       its NCHW and channels_last rows where both are timed)
  lora_implicit_vs_stacked (CUDA, conv layers; lora_graph_implicit_vs_stacked in CUDA graphs): fwd+bwd
                       on Triton, a_stage="implicit" vs the default "stacked"
  lora_graph_in_base_vs_base_graph (CUDA, conv layers, channels_last, in CUDA graphs): fwd+bwd of
                       a_stage="in_base" (base conv and LoRA in the same Triton kernels) vs the frozen base
                       layer (the faster of NCHW / channels_last cuDNN); lora_graph_in_base_vs_implicit: vs the
                       implicit A stage in channels_last; conv_triton_vs_cudnn_graph: those kernels with no LoRA
                       (a plain conv, dx only) vs cuDNN in channels_last: how far the Triton conv itself is.
                       Each with the launchers' tiles and with ALT_TILES (rows "tiles=..."); the best counts.
                       lora_linear_graph_in_base_vs_base_graph: the same for the linear layer (DeiT-S qkv;
                       PPAP_BENCH_LORA_LAYERS must keep it); lora_linear_graph_in_base_vs_default: vs its
                       default Triton path
  loralib_factorised_vs_delta (CUDA, conv layers; + _graph_ in CUDA graphs): fwd+bwd of a loralib-layout
                       layer as the equal rank r*k*k factorised LoRA (implicit, a_blocks=k) vs its dense
                       per-expert deltas (lora_conv2d_delta)
On CUDA the Triton layer's and the base layer's rows also hold the profile of one eager fwd+bwd
(``fwdbwd_profile_top``: top kernels and ops); at the first N the graphed rows in GRAPH_PROFILED hold
the kernels of one graph replay (``fwdbwd_graph_profile_top``: GPU time per kernel, no host). PPAP_BENCH_LORA_LAYERS="3x3,qkv" keeps the layers
whose name contains one of the words (a short GPU call).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ppap_fast.ops import lora as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import back_to_back_ms, geomean, median_ms, profile_top  # noqa: E402


def _configs(device: str, quick: bool):
    big = device == "cuda"
    S = 64 if big else 4
    sp = 14 if big else 7
    cfgs = [
        dict(name="resnet50.layer3.conv2 3x3 256->256", kind="conv", S=S, cin=256 if big else 64,
             cout=256 if big else 64, k=3, pad=1, H=sp),
        dict(name="resnet50.layer3.conv1 1x1 1024->256", kind="conv", S=S, cin=1024 if big else 128,
             cout=256 if big else 64, k=1, pad=0, H=sp),
        dict(name="deit_s.qkv 384->1152 L=197", kind="linear", S=S if big else 2, K=384, O=1152, L=197 if big else 50),
    ]
    if quick and not big:
        cfgs = [cfgs[0], cfgs[2]]
    only = [w for w in os.environ.get("PPAP_BENCH_LORA_LAYERS", "").split(",") if w.strip()]
    if only:  # e.g. "3x3": the layers whose name contains one of the comma-separated words
        cfgs = [c for c in cfgs if any(w.strip() in c["name"] for w in only)]
        if not cfgs:
            raise ValueError(f"PPAP_BENCH_LORA_LAYERS={os.environ['PPAP_BENCH_LORA_LAYERS']!r} matches no layer")
    return cfgs


def _make(cfg, N, r, device, dtype, gen):
    mk = lambda *s: (torch.randn(*s, generator=gen) * 0.1).to(device, dtype)  # noqa: E731
    S = cfg["S"]
    idx = torch.randint(0, N, (S,), generator=gen).to(device)
    if cfg["kind"] == "linear":
        x = mk(S, cfg["L"], cfg["K"])
        W, b = mk(cfg["O"], cfg["K"]), mk(cfg["O"])
        A, B = mk(N, r, cfg["K"]), mk(N, cfg["O"], r)
        eb = mk(N, cfg["O"])
    else:
        x = mk(S, cfg["cin"], cfg["H"], cfg["H"])
        W, b = mk(cfg["cout"], cfg["cin"], cfg["k"], cfg["k"]), None
        A, B = mk(N, r, cfg["cin"], cfg["k"], cfg["k"]), mk(N, cfg["cout"], r)
        eb = mk(N, cfg["cout"])
    return x, W, b, A, B, eb, idx


def _loop(cfg, x, W, b, A, B, eb, idx, scale):
    """Per-expert Python loop: base layer on the whole batch, then each expert's samples."""
    N = A.shape[0]
    if cfg["kind"] == "linear":
        y = F.linear(x, W, b)
        for e in range(N):
            sel = (idx == e).nonzero().flatten()
            if sel.numel() == 0:
                continue
            xe = x.index_select(0, sel)
            d = scale * F.linear(F.linear(xe, A[e]), B[e]) + eb[e]
            y = y.index_add(0, sel, d)
        return y
    y = F.conv2d(x, W, b, 1, cfg["pad"])
    for e in range(N):
        sel = (idx == e).nonzero().flatten()
        if sel.numel() == 0:
            continue
        xe = x.index_select(0, sel)
        h = F.conv2d(xe, A[e], None, 1, cfg["pad"])
        d = scale * F.conv2d(h, B[e][:, :, None, None]) + eb[e][:, None, None]
        y = y.index_add(0, sel, d)
    return y


def _ours(cfg, backend, a_stage="stacked", seg=None):
    """Our op; ``seg``: segment metadata built once per batch (as ExpertBank does for all its layers)."""
    def f(x, W, b, A, B, eb, idx, scale):
        if cfg["kind"] == "linear":
            return L.lora_linear(x, W, b, A, B, idx, scale, eb, backend=backend, segments=seg,
                                 a_stage="in_base" if a_stage == "in_base" else "default")
        return L.lora_conv2d(x, W, b, A, B, idx, scale, 1, cfg["pad"], expert_bias=eb, backend=backend,
                             a_stage=a_stage, segments=seg)
    return f


def _loralib(cfg, route, N, r, device, dtype, gen, seg=None):
    """A loralib-layout conv LoRA layer (A_l [r*k, C_in*k], B_l [C_out*k, r*k], its own leaves with
    grads; the A, B passed in are ignored): route "delta" = dense per-expert deltas through
    lora_conv2d_delta (what a loralib bank runs by default), "factorised" = the equal rank r*k*k
    factorised LoRA through the implicit A stage with a_blocks=k (PPAP_FAST_LORALIB_CONV=factorised)."""
    from ppap_fast.ops.lora.reference import loralib_conv_as_factorised, loralib_conv_delta

    k, cin, cout = cfg["k"], cfg["cin"], cfg["cout"]
    A_l = (torch.randn(N, r * k, cin * k, generator=gen) * 0.05).to(device, dtype).requires_grad_(True)
    B_l = (torch.randn(N, cout * k, r * k, generator=gen) * 0.05).to(device, dtype).requires_grad_(True)

    def f(x, W, b, A, B, eb, idx, scale):
        if route == "delta":
            delta = loralib_conv_delta(A_l, B_l, cout, cin, k, scale)
            return L.lora_conv2d_delta(x, W, b, delta, idx, 1, cfg["pad"], expert_bias=eb)
        Af, Bf = loralib_conv_as_factorised(A_l, B_l, cin, k, k)
        return L.lora_conv2d(x, W, b, Af, Bf, idx, scale, 1, cfg["pad"], expert_bias=eb, backend="triton",
                             a_stage="implicit", a_blocks=k, segments=seg)
    f.lora_leaves = (A_l, B_l)
    return f


def _base(cfg):
    def f(x, W, b, A, B, eb, idx, scale):
        if cfg["kind"] == "linear":
            return F.linear(x, W, b)
        return F.conv2d(x, W, b, 1, cfg["pad"])
    return f


class _TritonPlainConv(torch.autograd.Function):
    """The in-base kernels with no LoRA (conv_base_lora_fwd / _dgrad, A None): the Triton implicit-GEMM
    conv alone, to set against cuDNN (input gradient only, W frozen)."""

    @staticmethod
    def forward(ctx, x, W, b, pad):
        from ppap_fast.ops.lora import triton_conv as tc
        from ppap_fast.ops.lora.fast import _conv_format

        S, _, H, Wd = x.shape
        k = W.shape[-1]
        Ho, Wo = H + 2 * pad - k + 1, Wd + 2 * pad - k + 1
        ctx.pad, ctx.xshape, ctx.fmt = pad, x.shape, _conv_format(x)
        y = torch.empty(S, W.shape[0], Ho, Wo, device=x.device, dtype=x.dtype).contiguous(memory_format=ctx.fmt)
        ctx.seg = L.build_segments(torch.zeros(S, dtype=torch.long, device=x.device), 1)
        tc.conv_base_lora_fwd(x, tc.weight_for_tiles(W), y, ctx.seg.sorted_idx, ctx.seg.offsets, 1, pad, 1, b)
        ctx.save_for_backward(W)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ppap_fast.ops.lora import triton_conv as tc

        (W,) = ctx.saved_tensors
        dx = torch.empty(ctx.xshape, device=dy.device, dtype=dy.dtype).contiguous(memory_format=ctx.fmt)
        tc.conv_base_lora_dgrad(dy, tc.weight_for_tiles(W), dx, ctx.seg.sorted_idx, ctx.seg.offsets, 1, ctx.pad, 1)
        return dx, None, None, None


def _triton_plain(cfg):
    def f(x, W, b, A, B, eb, idx, scale):
        return _TritonPlainConv.apply(x, W, b, cfg["pad"])
    return f


# the in-base kernels' other tilings (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), beside the launchers'
# 128x128x64: at 64 x 14 x 14 pixels and 256 channels, 392 programs (~3 waves on 132 SMs, little tail)
# and 98 (one N tile over all 256 channels: the LoRA's A columns computed once per pixel tile)
ALT_TILES = ((64, 128, 64, 4, 4), (128, 256, 64, 8, 3))


def _tiles_tag(t) -> str:
    return "x".join(map(str, t[:3]))


def _tiles_of(vname: str):
    """The tiling a row names ("tiles=64x128x64"), else the launchers' own."""
    import contextlib

    for t in ALT_TILES:
        if f"tiles={_tiles_tag(t)}" in vname:
            from ppap_fast.ops.lora import triton_conv as tc

            return tc.tiles(*t)
    return contextlib.nullcontext()


def _frozen_only(vname: str) -> bool:
    """Variants timed like the frozen base layer: the gradient of x only."""
    return vname.startswith("base") or vname.startswith("triton_conv")


def _peft_forward(cfg, W, b, A, B, idx, scale, device, dtype):
    """A peft model with N adapters holding the same A/B; returns fn(x) running the mixed batch."""
    try:
        import peft
        from peft import LoraConfig
    except Exception as exc:  # pragma: no cover
        return None, f"peft not importable: {exc}"
    N, r = A.shape[:2]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if cfg["kind"] == "linear":
                self.layer = nn.Linear(cfg["K"], cfg["O"], bias=b is not None)
            else:
                self.layer = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], padding=cfg["pad"], bias=b is not None)

        def forward(self, x):
            return self.layer(x)

    try:
        net = Net().to(device, dtype)
        with torch.no_grad():
            net.layer.weight.copy_(W)
            if b is not None:
                net.layer.bias.copy_(b)
        conf = LoraConfig(r=r, lora_alpha=scale * r, target_modules=["layer"], lora_dropout=0.0)
        pm = peft.get_peft_model(net, conf, adapter_name="e0")
        for e in range(1, N):
            pm.add_adapter(f"e{e}", conf)
        lay = pm.base_model.model.layer
        with torch.no_grad():
            for e in range(N):
                la, lb = lay.lora_A[f"e{e}"].weight, lay.lora_B[f"e{e}"].weight
                la.copy_(A[e].reshape(la.shape))
                lb.copy_(B[e].reshape(lb.shape))
        pm.eval()
        names = [f"e{int(i)}" for i in idx.tolist()]

        def fn(x):
            with torch.no_grad():
                return pm(x, adapter_names=names)
        return fn, None
    except Exception as exc:
        return None, f"peft mixed batch failed: {type(exc).__name__}: {exc}"


# graphed rows whose fwd+bwd replay is profiled (first N only): where the GPU time of a layer goes
GRAPH_PROFILED = ("ours[triton,cudagraph]", "ours[triton,a_stage=implicit,channels_last,cudagraph]",
                  "ours[triton,a_stage=in_base,channels_last,cudagraph]", "base[channels_last,cudagraph]",
                  "base[cudagraph]")


def _captured_ms(step, reps, grad: bool, profile: bool = False):
    """(median ms of ``step()`` captured in a CUDA graph (3 warm-up calls on a side stream first),
    None or why capture failed (reported, the benchmark goes on), the kernels of one replay when
    ``profile`` else [], mean ms of replays issued back to back: no per-replay sync, which adds
    10-20 us to both sides of the median)."""
    from ppap_fast.train_graph import capture_after_warmup

    try:
        with torch.set_grad_enabled(grad):
            g, _ = capture_after_warmup(step, 3)
        ms = median_ms(g.replay, "cuda", reps)
        b2b = back_to_back_ms(g.replay, "cuda", max(reps, 20))
        return ms, None, (profile_top(g.replay, "cuda", k=12) if profile else []), b2b
    except Exception as exc:  # pragma: no cover
        return None, f"graph capture failed: {type(exc).__name__}: {exc}", [], None


def _graphmedian_ms(fn, x, args, reps):
    """Median forward time of fn captured in a CUDA graph."""
    W, b, A, B, eb, idx, scale = args  # idx: the tensor the variants' segments were built from
    return _captured_ms(lambda: fn(x, W, b, A, B, eb, idx, scale), reps, grad=False)[:2]


def _fwdbwd_step(fn, x, args, base: bool):
    """One forward + backward of fn on its own leaves. expert_idx is the tensor passed in: the
    variants' segments were built from it (a copy is refused as stale segments, without a sync)."""
    W, b, A, B, eb, idx, scale = args
    xg = x.detach().clone().requires_grad_(True)
    Ag, Bg, ebg = (t.detach().clone().requires_grad_(True) for t in (A, B, eb))

    def step():
        if base:
            y = fn(xg, *args)
            return torch.autograd.grad(y, (xg,), torch.ones_like(y))
        y = fn(xg, W, b, Ag, Bg, ebg, idx, scale)
        ab = getattr(fn, "lora_leaves", (Ag, Bg))  # a layer with its own LoRA leaves (_loralib)
        return torch.autograd.grad(y, (xg, *ab, ebg), torch.ones_like(y))
    return step


def _graph_fwdbwd_ms(fn, x, args, reps, base: bool, profile: bool = False):
    """Median forward + backward (grads of x and, unless base, of A, B and the expert bias) captured
    in one CUDA graph: the GPU time a graphed training step pays for the layer."""
    return _captured_ms(_fwdbwd_step(fn, x, args, base), reps, grad=True, profile=profile)


# ----------------------------------------------------------------------------- launch accounting
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "lift_fresh", "detach", "_local_scalar_dense", "_unsafe_view"}


def count_ops(kind: str, a_stage: str = "stacked", backend: str = "triton", N: int = 5, r: int = 16,
              device: str = "cpu"):
    """(forward, backward) Counters of what one call dispatches: every aten op that launches work
    (views and bare allocations left out), "triton" / "cuda_ext" kernel launches, "dgrad" /
    "wgrad" (convolution_backward calls computing dx / a weight grad) and "launches" (the total).
    On CPU use backend="triton" under TRITON_INTERPRET=1: the same Python path as on a GPU."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from ppap_fast.ops.lora import cuda_ops, fast
    from ppap_fast.ops.lora import triton_conv as tc
    from ppap_fast.ops.lora import triton_kernels as tk

    cur: List[Counter] = [Counter()]
    inside = [0]  # > 0 while in a wrapped kernel launcher or host-side check (their aten ops are not launches)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not (inside[0] or func.is_view or name in _NO_LAUNCH):
                cur[0]["aten::" + name] += 1
                cur[0]["launches"] += 1
                if name == "convolution_backward":
                    mask = args[-1]
                    cur[0]["dgrad"] += int(bool(mask[0]))
                    cur[0]["wgrad"] += int(bool(mask[1]))
            return func(*args, **(kwargs or {}))

    def wrap(mod, fname, key):
        orig = getattr(mod, fname)

        def f(*a, **k):
            if key:
                cur[0][key] += 1
                cur[0]["launches"] += 1
            inside[0] += 1
            try:
                return orig(*a, **k)
            finally:
                inside[0] -= 1
        return orig, f

    import ppap_fast.ops.lora as lora_pkg

    patches = [(lora_pkg, "_check_idx", None)]  # CPU-only host range check (skipped on CUDA)
    patches += [(tk, n, "triton") for n in ("sgmv_shrink", "sgmv_expand", "seg_outer", "conv_lora_fwd",
                                            "conv_lora_dgrad", "conv_lora_wgrad")]
    patches += [(tc, n, "triton") for n in ("conv_base_lora_fwd", "conv_base_lora_dgrad")]
    patches += [(cuda_ops, n, "cuda_ext") for n in ("sgmv_shrink", "sgmv_expand", "seg_outer")]
    saved = []
    for mod, n, key in patches:
        orig, f = wrap(mod, n, key)
        saved.append((mod, n, orig))
        setattr(mod, n, f)
    old_poison = fast.POISON, tk.POISON
    fast.POISON = tk.POISON = False
    try:
        cfg = dict(kind=kind, S=4, cin=16, cout=16, k=3, pad=1, H=6, K=16, O=24, L=5)
        x, W, b, A, B, eb, idx = _make(cfg, N, r, device, torch.float32, torch.Generator().manual_seed(0))
        x.requires_grad_(True)
        A.requires_grad_(True)
        B.requires_grad_(True)
        eb.requires_grad_(True)
        seg = L.build_segments(idx, N)  # built once per batch by an ExpertBank: not counted
        with Mode():
            if kind == "linear":
                y = L.lora_linear(x, W, b, A, B, idx, 0.5, eb, backend=backend, segments=seg)
            else:
                y = L.lora_conv2d(x, W, b, A, B, idx, 0.5, 1, 1, expert_bias=eb, backend=backend, segments=seg,
                                  a_stage=a_stage)
        fwd = cur[0]
        cur[0] = Counter()
        dy = torch.ones_like(y)
        with Mode():
            torch.autograd.grad(y, [x, A, B, eb], dy)
        return fwd, cur[0]
    finally:
        for mod, n, orig in saved:
            setattr(mod, n, orig)
        fast.POISON, tk.POISON = old_poison


def launch_table(backend: str = "triton", device: str = "cpu") -> List[Dict]:
    rows = []
    for kind, stage in (("linear", "-"), ("conv", "stacked"), ("conv", "fused"), ("conv", "implicit"),
                        ("conv", "in_base")):
        f, b = count_ops(kind, stage if kind == "conv" else "stacked", backend, device=device)
        rows.append(dict(kind=kind, a_stage=stage, backend=backend, fwd=f["launches"], bwd=b["launches"],
                         fwd_ops=dict(f), bwd_ops=dict(b)))
    return rows


def _ran(cfg) -> str:
    """What the last LoRA call ran: backend and A stage (ops.lora.last_backend), so that a row whose
    path fell back (an A stage degraded, the reference) says so in the JSON."""
    op = "lora_linear" if cfg["kind"] == "linear" else "lora_conv2d"
    return f"{L.last_backend.get(op)}/{L.last_backend.get(op + '/a_stage')}"


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def run(device: str = "cuda", quick: bool = False, emit=None) -> Dict:
    """``emit(rows, ratios)`` (benchmarks/run.py): called after every layer and N with the rows and
    ratios so far, so that a run killed at its time limit keeps them. A variant that raises records
    its error in its row (the other variants and ratios go on)."""
    device = "cuda" if (device == "cuda" and torch.cuda.is_available()) else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    reps = (5 if quick else 20) if device == "cuda" else (2 if quick else 5)
    gen = torch.Generator().manual_seed(0)
    rows: List[Dict] = []
    ratio_acc: Dict[str, List[float]] = {"lora_fwd_vs_peft": [], "lora_fwdbwd_vs_loop": [], "lora_fwdbwd_vs_base": [],
                                         "lora_fwdbwd_graph_vs_base_graph": []}
    avail = L.available_backends("lora_linear", device)
    ours_backends = ["auto"]
    if device == "cuda":
        ours_backends = ["triton"] + [be for be in ("cuda", "cuda_full") if avail[be] == "ok"]
    if avail["cpp"] == "ok":  # C++ autograd over the same kernels: one Python -> C++ call per layer
        ours_backends.append("cpp")
    Ns = [5] if (quick and device == "cpu") else [5, 10]
    r, scale = 16, 0.5
    for cfg in _configs(device, quick):
        for N in Ns:
            x, W, b, A, B, eb, idx = _make(cfg, N, r, device, dtype, gen)
            args = (W, b, A, B, eb, idx, scale)
            seg = L.build_segments(idx, N)
            t_seg = median_ms(lambda: L.build_segments(idx, N), device, reps)
            rows.append(dict(layer=cfg["name"], N=N, variant="segments(once per batch)", fwd_ms=round(t_seg, 4),
                             fwdbwd_ms=None, device=device, dtype=str(dtype).replace("torch.", "")))
            variants = {f"ours[{be}]": _ours(cfg, None if be == "auto" else be, seg=seg) for be in ours_backends}
            if cfg["kind"] == "conv" and device == "cuda":
                variants["ours[triton,a_stage=grouped]"] = _ours(cfg, "triton", "grouped", seg)
                for be in ours_backends:  # one conv for base + stacked A vs two (a_stage="stacked")
                    if be != "cpp":  # the cpp backend runs "stacked" only
                        variants[f"ours[{be},a_stage=fused]"] = _ours(cfg, be, "fused", seg)
                # cuDNN base conv + one implicit-GEMM Triton kernel per direction for the LoRA share
                variants["ours[triton,a_stage=implicit]"] = _ours(cfg, "triton", "implicit", seg)
                # channels_last (x and W): cuDNN's base alone, implicit, and the base conv with its LoRA in the
                # same Triton kernels (in_base), plus those kernels as a plain conv against cuDNN
                variants["ours[triton,a_stage=implicit,channels_last]"] = _ours(cfg, "triton", "implicit", seg)
                variants["ours[triton,a_stage=in_base,channels_last]"] = _ours(cfg, "triton", "in_base", seg)
                variants["base[channels_last]"] = _base(cfg)
                variants["triton_conv[plain,channels_last]"] = _triton_plain(cfg)
                for route in ("delta", "factorised"):  # the loralib layout: N dense deltas vs rank r*k*k
                    variants[f"loralib[{route}]"] = _loralib(cfg, route, N, r, device, dtype, gen, seg)
            if cfg["kind"] == "linear" and device == "cuda":  # the base GEMM and the LoRA in the in-base kernels
                variants["ours[triton,a_stage=in_base]"] = _ours(cfg, "triton", "in_base", seg)
            variants["loop"] = lambda *a, _c=cfg: _loop(_c, *a)
            variants["base"] = _base(cfg)
            x_cl, args_cl = x, args
            if cfg["kind"] == "conv":
                x_cl = x.contiguous(memory_format=torch.channels_last)
                args_cl = (W.contiguous(memory_format=torch.channels_last),) + args[1:]

            def inputs(vname):
                return (x_cl, args_cl) if "channels_last" in vname else (x, args)

            res = {}
            for vname, fn in variants.items():
                xv, av = inputs(vname)

                def fwd(fn=fn, xv=xv, av=av):
                    with torch.no_grad():
                        fn(xv, *av)

                def fwdbwd(fn=fn, vname=vname, xv=xv, av=av):
                    xg = xv.detach().requires_grad_(True)
                    if _frozen_only(vname):
                        y = fn(xg, *av)
                        y.backward(torch.ones_like(y))
                        return
                    Ag, Bg, ebg = (t.detach().requires_grad_(True) for t in (A, B, eb))
                    y = fn(xg, av[0], b, Ag, Bg, ebg, idx, scale)
                    y.backward(torch.ones_like(y))

                L.last_backend.pop("lora_linear", None), L.last_backend.pop("lora_conv2d", None)
                try:
                    t_f = median_ms(fwd, device, reps)
                    t_fb = median_ms(fwdbwd, device, reps)
                except Exception as exc:  # noqa: BLE001 - e.g. one kernel failing on this GPU: the others go on
                    rows.append(dict(layer=cfg["name"], N=N, variant=vname, fwd_ms=None, fwdbwd_ms=None,
                                     device=device, dtype=str(dtype).replace("torch.", ""), error=_error(exc)))
                    continue
                res[vname] = (t_f, t_fb)
                rows.append(dict(layer=cfg["name"], N=N, variant=vname, fwd_ms=round(t_f, 4),
                                 fwdbwd_ms=round(t_fb, 4), device=device, dtype=str(dtype).replace("torch.", "")))
                if vname.startswith(("ours", "loralib[factorised")):
                    rows[-1]["ran"] = _ran(cfg)
                if device == "cuda" and N == Ns[0] and vname in (
                        "ours[triton]", "ours[triton,a_stage=implicit]", "ours[triton,a_stage=in_base,channels_last]",
                        "base", "base[channels_last]"):  # where the time goes
                    try:
                        rows[-1]["fwdbwd_profile_top"] = profile_top(fwdbwd, device, k=12, grad=True)
                    except Exception as exc:  # noqa: BLE001
                        rows[-1]["fwdbwd_profile_error"] = _error(exc)
            if device == "cuda":  # GPU time without Python/launch overhead: captured forward and fwd+bwd
                graphed, graphed_b2b = {}, {}
                graph_variants = [("ours[triton,cudagraph]", _ours(cfg, "triton", seg=seg)),
                                  ("ours[auto,cudagraph]", _ours(cfg, None, seg=seg))]
                if "cpp" in ours_backends:
                    graph_variants.append(("ours[cpp,cudagraph]", _ours(cfg, "cpp", seg=seg)))
                if cfg["kind"] == "linear":
                    graph_variants.append(("ours[triton,a_stage=in_base,cudagraph]", _ours(cfg, "triton", "in_base", seg)))
                if cfg["kind"] == "conv":  # base + stacked A as one conv: fewer kernels where launches dominate
                    graph_variants.append(("ours[triton,a_stage=fused,cudagraph]", _ours(cfg, "triton", "fused", seg)))
                    graph_variants.append(("ours[triton,a_stage=implicit,cudagraph]",
                                           _ours(cfg, "triton", "implicit", seg)))
                    graph_variants += [
                        ("ours[triton,a_stage=implicit,channels_last,cudagraph]", _ours(cfg, "triton", "implicit", seg)),
                        ("ours[triton,a_stage=in_base,channels_last,cudagraph]", _ours(cfg, "triton", "in_base", seg)),
                        ("base[channels_last,cudagraph]", _base(cfg)),
                        ("triton_conv[plain,channels_last,cudagraph]", _triton_plain(cfg))]
                    for t in ALT_TILES if N == Ns[0] else ():  # the tilings at the first N only (GPU time)
                        graph_variants += [
                            (f"ours[triton,a_stage=in_base,channels_last,tiles={_tiles_tag(t)},cudagraph]",
                             _ours(cfg, "triton", "in_base", seg)),
                            (f"triton_conv[plain,channels_last,tiles={_tiles_tag(t)},cudagraph]", _triton_plain(cfg))]
                    for route in ("delta", "factorised"):
                        graph_variants.append((f"loralib[{route},cudagraph]",
                                               _loralib(cfg, route, N, r, device, dtype, gen, seg)))
                for vname, fn in graph_variants + [("base[cudagraph]", _base(cfg))]:
                    xv, av = inputs(vname)
                    L.last_backend.pop("lora_linear", None), L.last_backend.pop("lora_conv2d", None)
                    with _tiles_of(vname):  # captured with these tiles; replays need no Python
                        t_g, why = _graphmedian_ms(fn, xv, av, reps)
                        t_gb, why_b, prof, t_gb2b = _graph_fwdbwd_ms(fn, xv, av, reps, base=_frozen_only(vname),
                                                             profile=N == Ns[0] and vname in GRAPH_PROFILED)
                    graphed[vname] = t_gb
                    graphed_b2b[vname] = t_gb2b
                    rows.append(dict(layer=cfg["name"], N=N, variant=vname, fwd_ms=None if t_g is None else round(t_g, 4),
                                     fwdbwd_ms=None if t_gb is None else round(t_gb, 4),
                                     fwdbwd_b2b_ms=None if t_gb2b is None else round(t_gb2b, 4), device=device,
                                     dtype=str(dtype).replace("torch.", ""),
                                     **({"skipped": why or why_b} if (why or why_b) else {}),
                                     **({"ran": _ran(cfg)} if vname.startswith(("ours", "loralib[factorised")) else {}),
                                     **({"fwdbwd_graph_profile_top": prof} if prof else {})))
                ours_g = [v for k, v in graphed.items() if k.startswith("ours") and v]
                base_g = [v for k, v in graphed.items() if k.startswith("base") and v]  # NCHW or channels_last
                if ours_g and base_g:
                    ratio_acc["lora_fwdbwd_graph_vs_base_graph"].append(min(ours_g) / min(base_g))
                ours_b = [v for k, v in graphed_b2b.items() if k.startswith("ours") and v]
                base_b = [v for k, v in graphed_b2b.items() if k.startswith("base") and v]
                if ours_b and base_b:
                    ratio_acc.setdefault("lora_fwdbwd_graph_vs_base_graph_b2b", []).append(min(ours_b) / min(base_b))
                in_base_g = min((v for k, v in graphed.items() if k.startswith("ours[triton,a_stage=in_base") and v),
                                default=None)  # the better tiling
                if in_base_g and base_g:
                    name = "lora_graph_in_base_vs_base_graph" if cfg["kind"] == "conv" else \
                        "lora_linear_graph_in_base_vs_base_graph"
                    ratio_acc.setdefault(name, []).append(in_base_g / min(base_g))
                if in_base_g and cfg["kind"] == "linear" and graphed.get("ours[triton,cudagraph]"):
                    ratio_acc.setdefault("lora_linear_graph_in_base_vs_default", []).append(
                        in_base_g / graphed["ours[triton,cudagraph]"])
                if in_base_g and graphed.get("ours[triton,a_stage=implicit,channels_last,cudagraph]"):
                    ratio_acc.setdefault("lora_graph_in_base_vs_implicit", []).append(
                        in_base_g / graphed["ours[triton,a_stage=implicit,channels_last,cudagraph]"])
                plain_g = min((v for k, v in graphed.items() if k.startswith("triton_conv") and v), default=None)
                if plain_g and graphed.get("base[channels_last,cudagraph]"):
                    ratio_acc.setdefault("conv_triton_vs_cudnn_graph", []).append(
                        plain_g / graphed["base[channels_last,cudagraph]"])
                if graphed.get("ours[triton,a_stage=implicit,cudagraph]") and graphed.get("ours[triton,cudagraph]"):
                    ratio_acc.setdefault("lora_graph_implicit_vs_stacked", []).append(
                        graphed["ours[triton,a_stage=implicit,cudagraph]"] / graphed["ours[triton,cudagraph]"])
                if graphed.get("loralib[factorised,cudagraph]") and graphed.get("loralib[delta,cudagraph]"):
                    ratio_acc.setdefault("loralib_graph_factorised_vs_delta", []).append(
                        graphed["loralib[factorised,cudagraph]"] / graphed["loralib[delta,cudagraph]"])
            pf, why = _peft_forward(cfg, W, b, A, B, idx, scale, device, dtype)
            if pf is not None:
                try:
                    with torch.no_grad():  # same math? (peft has no per-expert bias)
                        mine = _ours(cfg, None if ours_backends[0] == "auto" else ours_backends[0])(
                            x, W, b, A, B, None, idx, scale).float()
                        theirs = pf(x).float()
                    check = float((mine - theirs).norm() / theirs.norm())
                    t_p = median_ms(lambda: pf(x), device, reps)
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(layer=cfg["name"], N=N, variant="peft(adapter_names)", error=_error(exc)))
                else:
                    res["peft"] = (t_p, float("nan"))
                    rows.append(dict(layer=cfg["name"], N=N, variant="peft(adapter_names)", fwd_ms=round(t_p, 4),
                                     fwdbwd_ms=None, device=device, dtype=str(dtype).replace("torch.", ""),
                                     rel_err_vs_ours=check))
            else:
                rows.append(dict(layer=cfg["name"], N=N, variant="peft(adapter_names)", skipped=why))
            if "ours[triton,a_stage=implicit]" in res and "ours[triton]" in res:  # implicit vs the default stacked
                ratio_acc.setdefault("lora_implicit_vs_stacked", []).append(
                    res["ours[triton,a_stage=implicit]"][1] / res["ours[triton]"][1])
            if "loralib[factorised]" in res and "loralib[delta]" in res:
                ratio_acc.setdefault("loralib_factorised_vs_delta", []).append(
                    res["loralib[factorised]"][1] / res["loralib[delta]"][1])
            ours = [v for k, v in res.items() if k.startswith("ours")]
            bases = [v[1] for k, v in res.items() if k.startswith("base")]
            if ours:  # every "ours" variant failing leaves these ratios out (the rows say why)
                best = min(ours, key=lambda t: t[1])
                if "peft" in res:
                    ratio_acc["lora_fwd_vs_peft"].append(best[0] / res["peft"][0])
                if "loop" in res:
                    ratio_acc["lora_fwdbwd_vs_loop"].append(best[1] / res["loop"][1])
                if bases:
                    ratio_acc["lora_fwdbwd_vs_base"].append(best[1] / min(bases))
            if emit is not None:
                emit(list(rows), {k: geomean(v) for k, v in ratio_acc.items() if v})
    ratios = {k: geomean(v) for k, v in ratio_acc.items() if v}
    return {"rows": rows, "ratios": ratios}


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--launches", action="store_true", help="print the per-call op/launch accounting only")
    a = p.parse_args()
    if a.launches:
        for row in launch_table("triton" if a.device == "cpu" else "cuda_full", a.device):
            print(json.dumps(row))
        raise SystemExit(0)
    out = run(a.device, a.quick)
    for row in out["rows"]:
        print(json.dumps(row))
    print(json.dumps(out["ratios"], indent=1))
