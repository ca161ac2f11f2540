#!/usr/bin/env python3
"""Compile every Triton kernel of ppap_fast for a Hopper GPU (sm_90) without a GPU.

The CPU parity tests run the kernels under TRITON_INTERPRET=1, which accepts code a real
GPU compile rejects (tl.dot shape/dtype rules, bf16 dots, constexpr misuse, type promotion,
register / shared-memory limits). This tool finds those failures here instead of on rare
GPU time:

1. Record. Triton is imported WITHOUT the interpreter, so the kernels are real
   JITFunctions. Each kernel's ``run`` (what ``kernel[grid](...)`` calls) is replaced by
   a recorder that binds the arguments exactly as the CUDA launcher would for target
   sm_90 (Triton's own binder + ``_pack_args``: pointer dtypes, i32/i64 scalars,
   ints == 1 folded to constexprs, 16-divisibility, constexpr values, num_warps /
   num_stages) and returns without launching. The package's public ops
   (lora_linear, lora_conv2d, expert_batch/layer/group_norm, group_norm_act, group_norm_silu_conv3x3,
   bias_residual_add,
   upsample_nearest2x, avg_pool2x, cat_channels, guided_update, guided_eps) then run,
   forward and backward, on small CPU inputs in fp32, fp16 and bf16 with
   ``backend="triton"``: TRITON_INTERPRET=1 is set in os.environ during this phase only
   so that the dispatchers accept CPU tensors, while the kernel modules' ``_interpreting()``
   is patched to False so the launchers choose their GPU tile sizes (and their sm_count() to
   an H100's 132 SMs, for the row-split heuristics). The launch
   configurations therefore come from the launchers themselves, not from hand-written
   signatures. Every configuration with an fp32 dot (DOT_F32, PREC="ieee") is also
   compiled with PREC="tf32" (what the launchers pick on CUDA when
   torch.backends.cuda.matmul.allow_tf32 is on; CPU tensors never report is_cuda).
2. Compile each distinct configuration with ``triton.compile`` for
   ``GPUTarget("cuda", 90, 32)`` down to a cubin (Triton's bundled ptxas, or
   TRITON_PTXAS_PATH), then read registers / spills from ``cuobjdump
   --dump-resource-usage`` (spill = stack frame + local bytes; a warning, not a failure) and
   the dynamic shared memory from Triton's metadata, and from the PTX what the code does (column
   "code": wgmma / mma.sync / fma dots, TMA, the widest async copy in bytes; -v: all load widths).
   Failure: a compile error, shared memory > 227 KiB (sm_90's per-block opt-in limit),
   registers x threads > 64K, or a kernel that no scenario launched.

Usage: python3 tools/triton_compile_check.py [-j 2] [--quick] [--dtypes bf16,fp16]
       [--kernels NAME,...] [--ptx-only] [--json FILE] [-v]
Exit status 1 on any failure. Compiled kernels go to Triton's cache (TRITON_CACHE_DIR),
so reruns with unchanged kernels take seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

# The kernels must be compiled JITFunctions, not the interpreter's InterpretedFunctions:
# drop the interpreter before anything imports triton (tests/conftest.py sets it).
os.environ.pop("TRITON_INTERPRET", None)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # sm_90: 227 KiB of dynamic shared memory per block (opt-in)
MAX_REGS_PER_BLOCK = 65536
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# =============================================================================== discovery
def kernel_modules() -> list[str]:
    """Every ppap_fast module with a @triton.jit function."""
    mods = []
    for p in sorted((REPO / "ppap_fast").rglob("*.py")):
        if "@triton.jit" in p.read_text():
            mods.append(".".join(p.relative_to(REPO).with_suffix("").parts))
    return mods


def discover(mods):
    """(kernels, helpers): JITFunctions of the modules; a helper is one whose name another
    JITFunction's source calls (helpers are compiled inside the kernels that call them)."""
    fns = {}
    for m in mods:
        mod = importlib.import_module(m)
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == m:
                fns[f"{m}:{name}"] = obj
    called = set()
    for fn in fns.values():
        body = fn.src.split(":", 1)[1] if ":" in fn.src else fn.src
        called |= set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", body))
    kernels = {k: f for k, f in fns.items() if f.__name__ not in called}
    helpers = {k: f for k, f in fns.items() if f.__name__ in called}
    return kernels, helpers


# =============================================================================== recording
@dataclass
class Config:
    key: str
    kernel: str           # module:name
    fn: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: object       # CUDAOptions
    scenarios: list = field(default_factory=list)
    derived: str = ""     # e.g. "tf32 variant"
    result: dict = field(default_factory=dict)

    @property
    def name(self):
        return self.kernel.split(":")[1]

    def ptr_types(self):
        return sorted({v[1:] for v in self.signature.values() if isinstance(v, str) and v.startswith("*")})

    def label(self):
        names = list(self.signature)
        tl_const = {p.name for p in self.fn.params if p.is_constexpr}
        cx = " ".join(f"{names[p[0]]}={v}" for p, v in self.constexprs.items() if names[p[0]] in tl_const)
        ptrs = ",".join(f"{n.removesuffix('_ptr')}:{v[1:]}" for n, v in self.signature.items()
                        if isinstance(v, str) and v.startswith("*"))
        ones = ",".join(names[p[0]] for p, v in self.constexprs.items() if names[p[0]] not in tl_const)
        return f"{ptrs} | {cx} | w{self.options.num_warps} s{self.options.num_stages}" + (f" | =1: {ones}" if ones else "")

    def dtype_tag(self):
        fl = [t for t in ("bf16", "fp16", "fp32") if t in self.ptr_types()]
        return "/".join(fl) or "-"


class Recorder:
    def __init__(self, kernels, all_specializations=False):
        self.all_specializations = all_specializations
        self.backend = make_backend(TARGET)
        self.kernels = kernels
        self.configs: dict[str, Config] = {}
        self.launches = {k: 0 for k in kernels}
        self.scenario = "?"

    def install(self):
        for key, fn in self.kernels.items():
            fn.run = self._make_run(key, fn)

    def uninstall(self):
        for fn in self.kernels.values():
            fn.__dict__.pop("run", None)

    def _make_run(self, kkey, fn):
        binder = create_function_from_signature(fn.signature, fn.params, self.backend)

        def run(*args, grid, warmup, **kwargs):  # JITFunction.run, minus device, compile and launch
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            bound, spec, opts = binder(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, spec, opts)
            self.add(kkey, fn, signature, constexprs, attrs, options)
            self.launches[kkey] += 1
            return None

        return run

    def add(self, kkey, fn, signature, constexprs, attrs, options, derived=""):
        # Default key: the pointer dtypes, every constexpr (the kernel's own and the ints Triton
        # folds because they are 1, e.g. unit strides) and the options; the first-seen 16-divisibility
        # hints stand for the rest. all_specializations: the hints are part of the key too.
        key = (kkey, sorted(signature.items()), sorted(constexprs.items()), sorted(options.__dict__.items()))
        if self.all_specializations:
            key += (sorted(attrs.items()),)
        key = repr(key)
        cfg = self.configs.get(key)
        if cfg is None:
            cfg = self.configs[key] = Config(key, kkey, fn, signature, constexprs, attrs, options, derived=derived)
        if self.scenario not in cfg.scenarios:
            cfg.scenarios.append(self.scenario)

    def add_tf32_variants(self):
        for cfg in list(self.configs.values()):
            names = list(cfg.signature)
            cx = {names[p[0]]: (p, v) for p, v in cfg.constexprs.items()}
            # the LoRA launchers' _dot_cfg: fp32 operands -> DOT_F32 with PREC "tf32" when
            # torch.backends.cuda.matmul.allow_tf32 is on (CUDA tensors only), else "ieee"
            if cx.get("PREC", (None, None))[1] == "ieee" and cx.get("DOT_F32", (None, False))[1]:
                c2 = dict(cfg.constexprs)
                c2[cx["PREC"][0]] = "tf32"
                self.scenario = cfg.scenarios[0]
                self.add(cfg.kernel, cfg.fn, cfg.signature, c2, cfg.attrs, cfg.options, derived="tf32 variant")


H100_SMS = 132


@contextlib.contextmanager
def dispatch_as_interpreter(mods):
    """Dispatchers accept CPU tensors for backend="triton" only under TRITON_INTERPRET=1; the
    launchers must still choose as on an H100: the kernel modules' _interpreting() is patched
    to False (GPU tile sizes) and their sm_count() to 132 SMs (GPU row-split counts)."""
    patched = []
    for m in mods:
        mod = sys.modules[m]
        for name, repl in (("_interpreting", lambda: False), ("sm_count", lambda device, other: H100_SMS)):
            if hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, repl)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        for mod, name, f in patched:
            setattr(mod, name, f)


# =============================================================================== scenarios
def _p(*shape, dtype, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _backward(y):
    y.backward(torch.randn_like(y))


def scenarios(dtype):
    """(label, thunk) pairs that drive every kernel through the public ops on CPU inputs.
    Shapes are small but reach the launchers' tile-size caps (ranks up to 64, LN width 512,
    16x16 feature maps) and cover their flags (biases, strides, groups, a_stage, layouts,
    train/eval, input-only gradients)."""
    from ppap_fast.ops import lora, norm, update

    N = 3
    idx = torch.tensor([0, 2, 0, 1, 2, 0])
    S = idx.numel()
    out = []

    def add(label, f):
        out.append((label, f))

    # ------------------------------------------------------------------ LoRA linear
    for (shape, K, NOUT, r, bias, eb) in (((S, 16), 64, 96, 8, True, True), ((), 320, 320, 64, False, False),
                                          ((S, 7), 40, 24, 4, True, False)):
        def f(shape=shape, K=K, NOUT=NOUT, r=r, bias=bias, eb=eb):
            x = _p(*(shape or (S,)), K, dtype=dtype)
            W = torch.randn(NOUT, K, dtype=dtype)
            A, B = _p(N, r, K, dtype=dtype), _p(N, NOUT, r, dtype=dtype)
            e = _p(N, NOUT, dtype=dtype) if eb else None
            y = lora.lora_linear(x, W, torch.randn(NOUT, dtype=dtype) if bias else None, A, B, idx, 0.5, e,
                                 backend="triton")
            _backward(y)
            # guidance: gradient w.r.t. the input only (frozen experts)
            x2 = _p(*(shape or (S,)), K, dtype=dtype)
            _backward(lora.lora_linear(x2, W, None, A.detach(), B.detach(), idx, 0.5, backend="triton"))
            # the base GEMM and the LoRA in the in-base kernels
            x3 = _p(*(shape or (S,)), K, dtype=dtype)
            _backward(lora.lora_linear(x3, W, torch.randn(NOUT, dtype=dtype) if bias else None, A, B, idx, 0.5, e,
                                       backend="triton", a_stage="in_base"))
        add(f"lora_linear x{tuple(shape) or (S,)}x{K} out{NOUT} r{r} bias={bias} eb={eb}", f)

    # ------------------------------------------------------------------ LoRA conv2d
    convs = [  # C_in, C_out, k, stride, pad, groups, r, HW, channels_last, bias, eb
        (32, 64, 3, 1, 1, 1, 8, 16, False, True, True),
        (32, 64, 3, 1, 1, 1, 8, 16, True, True, False),
        (64, 64, 3, 2, 1, 2, 16, 16, False, False, True),
        (16, 32, 1, 1, 0, 1, 64, 8, False, True, False),
        (16, 32, 3, 1, 1, 1, 144, 8, True, False, True),  # loralib 3x3 as factorised: rank r * 9
        (64, 64, 3, 1, 1, 1, 16, 4, True, False, True),  # a 4x4 map (ResNet50 layer4 at 128px): 16-row tiles
        (256, 256, 3, 1, 1, 1, 16, 14, True, False, False),  # bench_lora's ResNet50 layer3 conv2, channels_last
        (256, 256, 3, 1, 1, 1, 16, 14, False, False, False),  # and NCHW (the distill step's format)
    ]
    for (ci, co, k, st, pd, g, r, hw, cl, bias, eb) in convs:
        for a_stage in ("stacked", "fused", "implicit", "in_base", "grouped"):
            def f(ci=ci, co=co, k=k, st=st, pd=pd, g=g, r=r, hw=hw, cl=cl, bias=bias, eb=eb, a_stage=a_stage):
                x = torch.randn(S, ci, hw, hw, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                W = torch.randn(co, ci // g, k, k, dtype=dtype)
                A, B = _p(N, r, ci // g, k, k, dtype=dtype), _p(N, co, r // g, dtype=dtype)
                e = _p(N, co, dtype=dtype) if eb else None
                y = lora.lora_conv2d(x, W, torch.randn(co, dtype=dtype) if bias else None, A, B, idx, 0.5,
                                     stride=st, padding=pd, groups=g, expert_bias=e, backend="triton",
                                     a_stage=a_stage)
                _backward(y)
                x2 = x.detach().clone().requires_grad_(True)
                _backward(lora.lora_conv2d(x2, W, None, A.detach(), B.detach(), idx, 0.5, stride=st, padding=pd,
                                           groups=g, backend="triton", a_stage=a_stage))
            add(f"lora_conv2d {ci}->{co} k{k} s{st} g{g} r{r} {hw}x{hw} cl={cl} {a_stage}", f)

    # ------------------------------------------------------------------ the in-base kernels directly (A None: a plain conv)
    for (ci, co, k, st, cl, bias, r) in ((64, 128, 3, 1, True, True, 0), (32, 64, 1, 2, False, False, 0),
                                         (256, 256, 3, 1, True, False, 16),  # + ResNet50 layer3's conv2
                                         (3, 64, 7, 2, True, False, 16),  # a stem: the forward's packed taps
                                         (64, 16, 3, 1, True, True, 8)):  # 16 outputs: the dgrad's packed taps
        def f(ci=ci, co=co, k=k, st=st, cl=cl, bias=bias, r=r):
            from ppap_fast.ops.lora import triton_conv as tc
            from ppap_fast.ops.lora.segments import build_segments

            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(S, ci, 16, 16, dtype=dtype).contiguous(memory_format=fmt)
            W = tc.weight_for_tiles(torch.randn(co, ci, k, k, dtype=dtype))
            seg = build_segments(torch.zeros(S, dtype=torch.long), 1)
            Ho = (16 + 2 * (k // 2) - k) // st + 1
            y = torch.empty(S, co, Ho, Ho, dtype=dtype).contiguous(memory_format=fmt)
            A = tc.lora_a_for_tiles(torch.randn(1, r, ci, k, k, dtype=dtype)) if r else None
            B = torch.randn(1, co, r, dtype=dtype) if r else None
            h = torch.empty(S, r, Ho, Ho, dtype=dtype).contiguous(memory_format=fmt) if r else None
            tc.conv_base_lora_fwd(x, W, y, seg.sorted_idx, seg.offsets, st, k // 2, 1,
                                  torch.randn(co, dtype=dtype) if bias else None, A, B, 0.5, None, h)
            tc.conv_base_lora_dgrad(torch.randn_like(y), W, torch.empty_like(x), seg.sorted_idx, seg.offsets, st, k // 2,
                                    1, h, A)
        add(f"conv_base_lora {ci}->{co} k{k} s{st} cl={cl} bias={bias} r{r}", f)
        for tiles in (((64, 128, 64, 4, 4), (128, 256, 64, 8, 3)) if r and dtype != torch.float32 else ()):
            def g(f=f, tiles=tiles):  # bench_lora's other tilings (ALT_TILES)
                from ppap_fast.ops.lora import triton_conv as tc

                with tc.tiles(*tiles):
                    f()
            add(f"conv_base_lora {ci}->{co} k{k} r{r} tiles {tiles}", g)

    # ------------------------------------------------------------------ loralib conv as a block-diagonal factorised LoRA
    for (ci, co, k, r, cl) in ((32, 64, 3, 16, True), (24, 16, 3, 4, False), (16, 32, 1, 8, False)):
        def f(ci=ci, co=co, k=k, r=r, cl=cl):
            from ppap_fast.ops.lora.reference import loralib_conv_as_factorised

            x = torch.randn(S, ci, 12, 12, dtype=dtype)
            x = (x.contiguous(memory_format=torch.channels_last) if cl else x).requires_grad_(True)
            A_l, B_l = _p(N, r * k, ci * k, dtype=dtype), _p(N, co * k, r * k, dtype=dtype)
            A, B = loralib_conv_as_factorised(A_l, B_l, ci, k, k)
            y = lora.lora_conv2d(x, torch.randn(co, ci, k, k, dtype=dtype), None, A, B, idx, 0.5, padding=k // 2,
                                 backend="triton", a_stage="implicit", a_blocks=k)
            _backward(y)
        add(f"lora_conv2d loralib-as-factorised {ci}->{co} k{k} r{r} cl={cl}", f)

    # ------------------------------------------------------------------ norms
    pdts = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
    for pdt in pdts:
        tag = "" if pdt == dtype else " fp32 params"
        for shape in ((S, 32, 16, 16), (S, 48), (S, 24, 5, 3)):
            for training in (True, False):
                def f(shape=shape, training=training, pdt=pdt):
                    C = shape[1]
                    x = _p(*shape, dtype=dtype)
                    w, b = _p(N, C, dtype=pdt), _p(N, C, dtype=pdt)
                    rm, rv = torch.zeros(N, C), torch.ones(N, C)
                    _backward(norm.expert_batch_norm(x, idx, w, b, rm, rv, training, backend="triton"))
                add(f"expert_batch_norm {shape} train={training}{tag}", f)
        for shape in ((S, 16, 512), (S, 40), (S, 4, 96)):
            def f(shape=shape, pdt=pdt):
                D = shape[-1]
                x = _p(*shape, dtype=dtype)
                _backward(norm.expert_layer_norm(x, idx, _p(N, D, dtype=pdt), _p(N, D, dtype=pdt), backend="triton"))
            add(f"expert_layer_norm {shape}{tag}", f)
        for shape, G in (((S, 64, 16, 16), 32), ((S, 32, 8, 8), 8), ((S, 12, 5, 3), 3)):
            def f(shape=shape, G=G, pdt=pdt):
                C = shape[1]
                x = _p(*shape, dtype=dtype)
                _backward(norm.expert_group_norm(x, idx, G, _p(N, C, dtype=pdt), _p(N, C, dtype=pdt),
                                                 backend="triton"))
            add(f"expert_group_norm {shape} G{G}{tag}", f)

    # ------------------------------------------------------------------ fused group norm + act
    from ppap_fast.ops import norm_act

    for shape, G, cl in (((2, 64, 16, 16), 32, False), ((2, 64, 16, 16), 32, True), ((2, 256, 16, 16), 32, True),
                         ((2, 24, 7), 3, False)):  # 256 channels_last: ADM's whole-row tiles
        for ss, silu, ib in ((True, True, "C"), (False, False, None), (False, True, "BC")):
            def f(shape=shape, G=G, cl=cl, ss=ss, silu=silu, ib=ib):
                B, C = shape[:2]
                x = torch.randn(*shape, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                w, b = (torch.randn(C) if ss else None), (torch.randn(C) if ss else None)
                sc, sh = (torch.randn(B, C, dtype=dtype) if ss else None), (torch.randn(B, C, dtype=dtype) if ss else None)
                in_bias = None if ib is None else torch.randn(*((C,) if ib == "C" else (B, C)), dtype=dtype)
                with torch.no_grad():
                    norm_act.group_norm_act(x, G, w, b, scale=sc, shift=sh, silu=silu, in_bias=in_bias,
                                            backend="triton")
            add(f"group_norm_act {shape} G{G} channels_last={cl} affine+scale_shift={ss} silu={silu} in_bias={ib}", f)
    # one element a group (C == G, one position): Cg and HW are both 1, which Triton folds to constexprs;
    # channels fastest (the split statistics) and a channel stride of 2 (the one-program-per-group kernel)
    for layout, make in (("channels fastest", lambda: torch.randn(2, 8, 1, 1, dtype=dtype)),
                         ("channel stride 2", lambda: torch.randn(2, 16, 1, dtype=dtype)[:, ::2])):
        def f(make=make):
            with torch.no_grad():
                norm_act.group_norm_act(make(), 8, backend="triton")
        add(f"group_norm_act one element a group, {layout}", f)

    # ------------------------------------------------------------------ output head (norm + SiLU + 3x3 conv)
    from ppap_fast.ops import out_head

    if dtype != torch.float32:  # half torsos only (float32 x takes the reference)
        for shape, G, cout, cl in (((2, 256, 16, 16), 32, 6, True), ((2, 64, 8, 8), 32, 3, True),
                                   ((2, 24, 5, 7), 3, 14, False)):  # ADM's heads; 126 columns; NCHW
            def f(shape=shape, G=G, cout=cout, cl=cl):
                C = shape[1]
                x = torch.randn(*shape, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    out_head.group_norm_silu_conv3x3(x, G, torch.randn(C), torch.randn(C),
                                                     conv_weight=torch.randn(cout, C, 3, 3),
                                                     conv_bias=torch.randn(cout), out_dtype=torch.float32,
                                                     backend="triton")
            add(f"group_norm_silu_conv3x3 {shape} G{G} cout={cout} channels_last={cl}", f)

    # ------------------------------------------------------------------ bias + residual add
    from ppap_fast.ops import concat, residual

    for shape, cl, has_bias in (((2, 64, 16, 16), True, True), ((2, 256, 16, 16), True, True), ((2, 64, 16, 16), False, False),
                                ((2, 24, 7), False, True)):
        def f(shape=shape, cl=cl, has_bias=has_bias):
            h, skip = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
            if cl:
                h, skip = (t.contiguous(memory_format=torch.channels_last) for t in (h, skip))
            with torch.no_grad():
                residual.bias_residual_add(h, skip, torch.randn(shape[1], dtype=dtype) if has_bias else None,
                                           backend="triton")
        add(f"bias_residual_add {shape} channels_last={cl} bias={has_bias}", f)

    # ------------------------------------------------------------------ channel sums (a GroupNorm's statistics
    # from the residual add / skip copy that wrote its input: ADM's decoder buffer)
    from ppap_fast.ops.channel_sums import ChannelSums

    for c1, c2, G in ((256, 256, 32), (64, 64, 32), (24, 40, 16)):  # ADM's widths, an unaligned split
        def f(c1=c1, c2=c2, G=G):
            cl = torch.channels_last
            h, skip = (torch.randn(2, c1, 16, 16, dtype=dtype).contiguous(memory_format=cl) for _ in range(2))
            other = torch.randn(2, c2, 16, 16, dtype=dtype).contiguous(memory_format=cl)
            buf = torch.empty(2, c1 + c2, 16, 16, dtype=dtype).contiguous(memory_format=cl)
            sums = ChannelSums(buf)
            with torch.no_grad():
                residual.bias_residual_add(h, skip, torch.randn(c1, dtype=dtype), out=buf[:, :c1], channel_sums=sums,
                                           backend="triton")
                concat.cat_channels([other], out=buf, c_off=c1, channel_sums=sums, backend="triton")
                norm_act.group_norm_act(buf, G, channel_sums=sums, backend="triton")
        add(f"channel sums {c1}+{c2} G{G}", f)

    # ------------------------------------------------------------------ resampling (ADM's Upsample / Downsample)
    from ppap_fast.ops import resample

    for shape in ((2, 256, 8, 8), (2, 37, 6, 4), (2, 3, 4, 4)):  # ADM's widths, an odd C, a narrow stem
        def f(shape=shape):
            x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                resample.upsample_nearest2x(x, backend="triton")
                resample.avg_pool2x(x, backend="triton")
        add(f"resample {shape} channels_last", f)

    # ------------------------------------------------------------------ channel concatenation (ADM's decoder skips)
    from ppap_fast.ops import concat

    for chans in ((256, 256), (512, 256), (37, 3, 16)):  # ADM's widths (aligned tiles), odd / unaligned ones
        def f(chans=chans):
            xs = [torch.randn(2, c, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last) for c in chans]
            with torch.no_grad():
                concat.cat_channels(xs, backend="triton")
        add(f"cat_channels {chans} channels_last", f)

    # ------------------------------------------------------------------ guided update
    B_, C_, H_ = 4, 3, 16
    steps = torch.tensor([0, 5, 9, 3])
    for mode in sorted(update.MODES.values()):
        for clip in (True, False):
            for has_grad, has_noise in ((True, True), (False, False), (True, False)):
                def f(mode=mode, clip=clip, has_grad=has_grad, has_noise=has_noise):
                    table = update.UpdateTable(torch.rand(10, update.COLS, dtype=torch.float64) + 0.5, mode)
                    x = torch.randn(B_, C_, H_, H_, dtype=dtype)
                    model_out = torch.randn(B_, 2 * C_, H_, H_, dtype=dtype)  # eps and v: channel slices
                    eps, v = model_out[:, :C_], (model_out[:, C_:] if mode == update.MODES["ddpm_learned"] else None)
                    update.guided_update(x, eps, steps, table, v=v,
                                         grad=torch.randn_like(x) if has_grad else None,
                                         noise=torch.randn_like(x) if has_noise else None,
                                         clip_denoised=clip, backend="triton")
                add(f"guided_update mode={mode} clip={clip} grad={has_grad} noise={has_noise}", f)

    # ------------------------------------------------------------------ guided eps correction (any scheduler)
    from ppap_fast.ops import eps_correction

    # with variance channels, eps only, a float32 grad
    eps_cases = [(2 * C_, dtype, dtype), (C_, dtype, dtype), (2 * C_, dtype, torch.float32)]
    if dtype == torch.float32:
        eps_cases.append((2 * C_, torch.float64, torch.float64))  # float64 math
    for width, out_dtype, grad_dtype in eps_cases:
        def f(width=width, out_dtype=out_dtype, grad_dtype=grad_dtype):
            model_out = torch.randn(B_, width, H_, H_, dtype=out_dtype)
            grad = torch.randn(B_, C_, H_, H_, dtype=grad_dtype)
            eps_correction.guided_eps(model_out, grad, torch.rand(B_), C_, backend="triton")
        add(f"guided_eps channels={C_}/{width} out={out_dtype} grad={grad_dtype}", f)
    return out


# =============================================================================== compiling
def _cuobjdump():
    tool = knobs.nvidia.cuobjdump.path if hasattr(knobs.nvidia, "cuobjdump") else None
    return tool if tool and os.path.exists(tool) else shutil.which("cuobjdump")


def _resource_usage(cubin: bytes):
    tool = _cuobjdump()
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", r.stdout)
    # Triton kernels make no calls: a stack frame is register spills (ptxas -v: "spill stores")
    return {"regs": int(m[1]), "spill_bytes": int(m[2]) + int(m[4]), "static_smem": int(m[3])} if m else {}


def asm_stats(asm: dict) -> dict:
    """What the generated code does with its loads and dots (read from the PTX): Hopper warpgroup MMA
    (wgmma) or the older mma.sync, async copies to shared memory by width in bytes (pipelined loads:
    16 is a full vector, 2 a single fp16), TMA loads, and plain global loads by vector width."""
    ptx = asm.get("ptx", "")
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    widths = {}
    for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global(?:\.L2::\w+)?\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx):
        w = int(m[1], 0)
        widths[w] = widths.get(w, 0) + 1
    loads = {}
    for m in re.finditer(r"ld\.global(?:\.[a-zA-Z0-9:_]+)*?(\.v[248])?\.(?:b|u|s|f)(\d+)", ptx):
        vec = int(m[1][2:]) if m[1] else 1
        key = vec * int(m[2]) // 8
        loads[key] = loads.get(key, 0) + 1
    return {"wgmma": len(re.findall(r"wgmma\.mma_async", ptx)), "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            "cp_async_bytes": dict(sorted(widths.items())), "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "ld_global_bytes": dict(sorted(loads.items())),
            # wgmma.wait_group N: N > 0 keeps MMAs in flight across K iterations (pipelined dots)
            "wgmma_wait_depths": sorted({int(d) for d in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})}


def code_tag(st: dict | None) -> str:
    """Short form of asm_stats for the table: the MMA kind and the widest async copy, e.g. "wgmma cp16"."""
    if not st:
        return "-"
    mma = "wgmma" if st["wgmma"] else "mma" if st["mma_sync"] else "fma"
    cp = max(st["cp_async_bytes"], default=0)
    return f"{mma}{' tma' if st['tma_loads'] else ''}{f' cp{cp}' if cp else ''}"


def compile_one(cfg: Config, ptx_only: bool) -> dict:
    t0 = time.time()
    res = {"ok": False}
    try:
        opts = dict(cfg.options.__dict__)
        src = ASTSource(cfg.fn, cfg.signature, cfg.constexprs, cfg.attrs)
        if ptx_only:
            res["note"] = "PTX only"
            ck = _compile_ptx_only(src, opts)
        else:
            ck = triton.compile(src, target=TARGET, options=opts)
        md = ck.metadata
        res.update(ok=True, smem=int(md.shared), num_warps=md.num_warps, num_stages=md.num_stages)
        if ck.asm.get("cubin"):
            res.update(_resource_usage(ck.asm["cubin"]))
        res["asm"] = asm_stats(ck.asm)
        problems = []
        if res["smem"] > MAX_SHARED:
            problems.append(f"shared memory {res['smem']} B > {MAX_SHARED} B")
        if "regs" in res and res["regs"] * 32 * md.num_warps > MAX_REGS_PER_BLOCK:
            problems.append(f"{res['regs']} registers x {32 * md.num_warps} threads > {MAX_REGS_PER_BLOCK}")
        if problems:
            res.update(ok=False, error="out of resources: " + "; ".join(problems))
    except Exception as exc:  # noqa: BLE001  report every failure, keep going
        msg = f"{type(exc).__name__}: {exc}"
        res["error"] = msg
        res["traceback"] = traceback.format_exc(limit=3)
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _compile_ptx_only(src, opts):
    """triton.compile with the cubin stage stubbed out (no usable ptxas): the pipeline still
    runs to PTX. main() points TRITON_CACHE_DIR at a throwaway folder in this mode, so the
    empty cubins never reach the real cache."""
    from triton.backends.nvidia.compiler import CUDABackend

    orig = CUDABackend.make_cubin
    CUDABackend.make_cubin = lambda self, src, metadata, opt, capability: b""
    try:
        return triton.compile(src, target=TARGET, options=opts)
    finally:
        CUDABackend.make_cubin = orig


def _ptxas_usable() -> str | None:
    try:
        tool = knobs.nvidia.ptxas.path
    except Exception:  # noqa: BLE001
        tool = None
    if not tool or not os.path.exists(tool):
        return None
    try:
        subprocess.run([tool, "--version"], check=True, capture_output=True)
    except Exception:  # noqa: BLE001
        return None
    return tool


_WORK: list = []


def _work(i_ptx):
    i, ptx_only = i_ptx
    return i, compile_one(_WORK[i], ptx_only)


# =============================================================================== main
def quick_subset(configs):
    """One configuration per kernel: a bf16 one (tensor-core dots) with the largest tiles."""
    best = {}
    for c in configs:
        names = list(c.signature)
        blocks = 1
        for p, v in c.constexprs.items():
            if names[p[0]].startswith("BLOCK") and isinstance(v, int):
                blocks *= v
        score = ("bf16" in c.ptr_types(), blocks)
        if c.kernel not in best or score > best[c.kernel][0]:
            best[c.kernel] = (score, c)
    return [c for _, c in best.values()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel compiles (processes)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16", help="scenario dtypes (fp32,fp16,bf16)")
    ap.add_argument("--kernels", default="", help="only these kernel names (comma separated)")
    ap.add_argument("--quick", action="store_true", help="one bf16 configuration per kernel (largest tiles)")
    ap.add_argument("--ptx-only", action="store_true", help="stop at PTX (no ptxas: no register counts)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--all-specializations", action="store_true",
                    help="also tell apart configurations by their 16-divisibility hints (more compiles)")
    ap.add_argument("--scenario", default="",
                    help="only scenarios whose label contains this (their own alignment hints: the 'code' column "
                         "of a configuration otherwise reflects the first scenario that launched it)")
    ap.add_argument("--list", action="store_true", help="record and list the configurations, compile nothing")
    ap.add_argument("-v", "--verbose", action="store_true", help="print full signatures and scenarios")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mods = kernel_modules()
    kernels, helpers = discover(mods)
    rec = Recorder(kernels, args.all_specializations)
    rec.install()
    scen_errors = []
    try:
        with dispatch_as_interpreter(mods):
            for dname in args.dtypes.split(","):
                dtype = DTYPES[dname.strip()]
                for label, f in scenarios(dtype):
                    if args.scenario and args.scenario not in label:
                        continue
                    rec.scenario = f"{dname}: {label}"
                    try:
                        f()
                    except Exception as exc:  # noqa: BLE001
                        scen_errors.append((rec.scenario, f"{type(exc).__name__}: {exc}"))
    finally:
        rec.uninstall()
    rec.add_tf32_variants()
    t_rec = time.time() - t0

    configs = list(rec.configs.values())
    if args.kernels:
        want = set(args.kernels.split(","))
        configs = [c for c in configs if c.name in want]
    if args.quick:
        configs = quick_subset(configs)
    configs.sort(key=lambda c: (c.kernel, c.dtype_tag(), c.label()))

    if args.list:
        for c in configs:
            print(f"{c.name:<24} {c.dtype_tag():<9} {c.label()}{' [' + c.derived + ']' if c.derived else ''}")
            if args.verbose:
                print(f"    {c.signature}\n    {c.scenarios}")
        for s, e in scen_errors:
            print(f"FAILED scenario {s}: {e}")
        print(f"{len(configs)} configurations; launches per kernel: {rec.launches} (record {t_rec:.1f} s)")
        return 1 if scen_errors else 0

    ptx_only = args.ptx_only
    if not ptx_only and not _ptxas_usable():
        print("warning: no usable ptxas (set TRITON_PTXAS_PATH): checking PTX generation only", file=sys.stderr)
        ptx_only = True

    if ptx_only:
        import atexit

        os.environ["TRITON_CACHE_DIR"] = tmp_cache = tempfile.mkdtemp(prefix="triton-ptx-only-")
        atexit.register(shutil.rmtree, tmp_cache, True)
    _WORK[:] = configs
    t1 = time.time()
    if args.jobs > 1 and len(configs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.jobs) as pool:
            for i, res in pool.imap_unordered(_work, [(i, ptx_only) for i in range(len(configs))]):
                configs[i].result = res
    else:
        for i, c in enumerate(configs):
            c.result = compile_one(c, ptx_only)
    t_comp = time.time() - t1

    # ------------------------------------------------------------------ report
    print(f"Triton {triton.__version__} -> {TARGET.backend} sm_{TARGET.arch} ({'PTX only' if ptx_only else 'cubin'}); "
          f"{len(kernels)} kernels, {len(helpers)} helpers in {', '.join(mods)}")
    hdr = f"{'kernel':<24} {'dtypes':<9} {'status':<6} {'regs':>4} {'spill':>5} {'smem':>7} {'code':<12} {'s':>5}  config"
    print(hdr)
    print("-" * len(hdr))
    for c in configs:
        r = c.result
        status = "ok" if r.get("ok") else "ERROR"
        cfg = c.label() + (f" [{c.derived}]" if c.derived else "")
        print(f"{c.name:<24} {c.dtype_tag():<9} {status:<6} {r.get('regs', '-'):>4} {r.get('spill_bytes', '-'):>5} "
              f"{r.get('smem', '-'):>7} {code_tag(r.get('asm')):<12} {r.get('seconds', 0):>5.1f}  {cfg}")
        if args.verbose:
            if r.get("asm"):
                print(f"    code: {r['asm']}")
            print(f"    signature: {c.signature}")
            print(f"    scenarios: {'; '.join(c.scenarios[:3])}{' ...' if len(c.scenarios) > 3 else ''}")
    failures = [c for c in configs if not c.result.get("ok")]
    uncovered = [k for k, n in rec.launches.items() if n == 0 and not args.scenario
                 and (not args.kernels or k.split(":")[1] in args.kernels.split(","))]
    spills = [c for c in configs if c.result.get("spill_bytes")]
    print()
    for c in failures:
        print(f"FAILED {c.name} [{c.label()}]{' [' + c.derived + ']' if c.derived else ''}")
        print(f"    from: {c.scenarios[0]}")
        print("    " + c.result.get("error", "?").strip().replace("\n", "\n    ")[:4000])
    for k in uncovered:
        print(f"FAILED {k}: no scenario launched this kernel (add one to tools/triton_compile_check.py)")
    for s, e in scen_errors:
        print(f"FAILED scenario {s}: {e}")
    for c in spills:
        print(f"warning: {c.name} [{c.label()}]{' [' + c.derived + ']' if c.derived else ''}: "
              f"{c.result['regs']} registers, {c.result['spill_bytes']} bytes of stack (register spills)")
    per_kernel = {}
    for c in configs:
        per_kernel.setdefault(c.name, [0, 0])
        per_kernel[c.name][0] += 1
        per_kernel[c.name][1] += 0 if c.result.get("ok") else 1
    n_bad = len(failures) + len(uncovered) + len(scen_errors)
    print(f"{len(configs)} configurations of {len(per_kernel)} kernels: {len(configs) - len(failures)} ok, "
          f"{len(failures)} failed; {len(uncovered)} kernels never launched; {len(scen_errors)} scenario errors "
          f"(record {t_rec:.1f} s, compile {t_comp:.1f} s, jobs {args.jobs})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "target": f"{TARGET.backend}:{TARGET.arch}", "ptx_only": ptx_only,
            "configs": [{"kernel": c.kernel, "dtypes": c.dtype_tag(), "config": c.label(), "derived": c.derived,
                         "signature": c.signature, "constexprs": {str(k): repr(v) for k, v in c.constexprs.items()},
                         "scenarios": c.scenarios, **{k: v for k, v in c.result.items() if k != "traceback"}}
                        for c in configs],
            "uncovered": uncovered, "scenario_errors": scen_errors}, indent=1, default=str))
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
