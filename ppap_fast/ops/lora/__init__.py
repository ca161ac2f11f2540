"""Multi-expert LoRA / bias / norm ops for PPAP expert banks.

Public ops (the signatures are fixed; every op also takes ``backend=``):

    lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias=None)
    lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride=1, padding=0, dilation=1, groups=1, expert_bias=None)
    lora_conv2d_delta(x, W, bias, delta, expert_idx, stride=1, padding=0, dilation=1, groups=1, expert_bias=None)
    loralib_conv_delta(A_l, B_l, C_out, C_in_per_group, k, scale)
    lora_conv_delta(A, B, groups=1)          # factorised layout -> dense delta (merge)
    build_segments(expert_idx, num_experts)  # device-side sort-by-expert metadata

Backends, picked per call by device and availability in the order below unless
``backend=`` names one (an unavailable one raises ``BackendUnavailableError``
with the reason); ``last_backend[op]`` records which ran:

    lora_linear, lora_conv2d : "cuda_full" (CUDA forward AND backward kernels) > "cuda" (CUDA SGMV
                               forward + Triton backward) > "triton" > "reference";
                               PPAP_FAST_LORA_CUDA_BWD=0 takes "cuda_full" out of the auto order
                               (verified on an H100: parity tests pass, fwd+bwd the fastest in 5 of
                               6 benchmark layers; benchmarks/NOTES.md). "cpp" (cuda_full's math as
                               C++ autograd Functions, CPU and CUDA: one Python -> C++ call per
                               layer) goes first with PPAP_FAST_LORA_CPP=1, else on request only;
                               prefer_backend(name) puts one first for a block (GraphedTrainStep:
                               "triton", the fastest inside CUDA graphs on an H100)
    lora_conv2d_delta : CUDA: "stacked" (one dense conv over every expert's W + delta stacked, N x
                        the FLOPs, no per-sample weight copies; 0.51x the grouped conv's time in an
                        H100 distillation step); CPU: "vectorized" (the per-sample grouped conv) >
                        "reference"; PPAP_FAST_LORA_DELTA=stacked|grouped overrides

Per-expert norms (BatchNorm / LayerNorm / GroupNorm) live in :mod:`ppap_fast.ops.norm`.

Triton runs on CUDA tensors, and on CPU only under TRITON_INTERPRET=1 (and only
when asked for explicitly there). Fast paths take fp32/fp16/bf16; other dtypes
(e.g. float64) go to the reference under automatic choice.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, Optional

import torch

from . import reference
from .reference import lora_conv_delta, loralib_conv_delta
from .segments import Segments, build_segments, check_segments

__all__ = [
    "lora_linear", "lora_conv2d", "lora_conv2d_delta",
    "loralib_conv_delta", "lora_conv_delta", "build_segments", "Segments", "last_backend",
    "available_backends", "BackendUnavailableError", "reference", "prefer_backend",
]

last_backend: Dict[str, Optional[str]] = {}

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


from .. import _registry  # noqa: E402  (a global set_backend reaches these ops too)
from .._registry import BackendUnavailableError  # noqa: E402  one error type for every op

# ----------------------------------------------------------------------------- availability
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return f"triton not importable ({type(exc).__name__}: {exc})"
    return None


def _why_not_triton(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    err = _triton_import_error()
    if err:
        return err
    if dtype not in _FAST_DTYPES:
        return f"dtype {dtype} not supported by the Triton kernels (fp32/fp16/bf16 only)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU"


def _why_not_cuda(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return "the cuda path runs on CUDA tensors only"
    t = _why_not_triton(device, dtype)  # backward uses the Triton kernels
    if t:
        return f"cuda forward needs Triton for the backward: {t}"
    from . import cuda_ops

    return cuda_ops.why_unavailable()


def _why_not_cuda_full(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    why = _why_not_cuda(device, dtype)
    if why:
        return why
    from . import cuda_ops

    return cuda_ops.why_unavailable(backward=True)


def _why_not_cpp(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    from . import cpp

    return cpp.why_unavailable(device, dtype)


def _why_not_vectorized(device, dtype):
    return None


def _why_not_reference(device, dtype):
    return None


_CHECKS: Dict[str, Callable] = {
    "cuda": _why_not_cuda, "cuda_full": _why_not_cuda_full, "cpp": _why_not_cpp, "triton": _why_not_triton,
    "vectorized": _why_not_vectorized, "stacked": _why_not_vectorized, "reference": _why_not_reference,
}
_ORDER = {
    "lora_linear": ("cpp", "cuda_full", "cuda", "triton", "reference"),
    "lora_conv2d": ("cpp", "cuda_full", "cuda", "triton", "reference"),
    "lora_conv2d_delta": ("vectorized", "stacked", "reference"),
}


def available_backends(op: str, device, dtype=torch.float32) -> Dict[str, str]:
    """backend -> "ok" or the reason it cannot run op ("lora_linear", "lora_conv2d", "lora_conv2d_delta") for
    (device, dtype)."""
    device = torch.device(device)
    return {b: (_CHECKS[b](device, dtype) or "ok") for b in _ORDER[op]}


def _cpp_in_auto() -> bool:
    """The cpp backend is picked automatically only with PPAP_FAST_LORA_CPP=1. On an H100 its parity
    tests pass and it is the fastest eager fwd+bwd per layer (host time), but whole distillation
    steps (GPU-bound) gained nothing (1.09x and 0.96x the automatic backend); on CPU it is not faster
    than the reference in general (faster at batch 4, 1.4-1.9x slower at batch 32)."""
    return os.environ.get("PPAP_FAST_LORA_CPP") == "1"


_preferred: list = []  # prefer_backend's stack


def check_backend_name(name: str) -> None:
    """ValueError unless ``name`` is a LoRA backend (any op's)."""
    if name not in _CHECKS:
        raise ValueError(f"unknown LoRA backend {name!r}; expected one of {sorted(_CHECKS)}")


@contextlib.contextmanager
def prefer_backend(name: str):
    """Within the block, the automatic choice of lora_linear / lora_conv2d tries ``name`` first where
    it can run (Triton only on CUDA tensors); an explicit ``backend=``, PPAP_LORA_BACKEND or
    ``ops.set_backend`` still wins. ``train_graph.GraphedTrainStep`` runs its warm-up and capture
    under ``prefer_backend("triton")``: inside CUDA graphs (no host time) Triton's fwd+bwd was the
    fastest in all six H100 layer rows (conv 0.29-0.34 vs 0.38-0.45 ms, DeiT-S qkv 0.18 vs 0.88-0.97 ms)."""
    check_backend_name(name)
    _preferred.append(name)
    try:
        yield
    finally:
        _preferred.pop()


def _env_backend(op: str) -> Optional[str]:
    """PPAP_LORA_BACKEND where ``op`` has that backend: a global choice, as ops.set_backend (it named one
    op's backend, e.g. "cpp", and the others raised "has no backend"); an unknown name raises."""
    env = os.environ.get("PPAP_LORA_BACKEND") or None
    if env in (None, "auto"):
        return env
    if env not in _CHECKS:
        raise ValueError(f"PPAP_LORA_BACKEND={env!r} is no LoRA backend; expected one of {sorted(_CHECKS)}")
    return env if env in _ORDER[op] else None


def _pick(op: str, x: torch.Tensor, backend: Optional[str], skip: tuple = ()) -> str:
    order = _ORDER[op]
    backend = backend or _env_backend(op)
    if backend is None and _registry.forced() in order:  # ops.set_backend(name): the ops that have it
        backend = _registry.forced()
    if backend not in (None, "auto"):
        if backend not in order:
            raise BackendUnavailableError(f"op {op!r} has no backend {backend!r}; it has {order}")
        why = _CHECKS[backend](x.device, x.dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend {backend!r} for {op!r} on {x.device}/{x.dtype}: {why}")
        last_backend[op] = backend
        return backend
    if os.environ.get("PPAP_FAST_LORA_CUDA_BWD") == "0":  # opt out of the CUDA backward
        order = tuple(b for b in order if b != "cuda_full")
    preferred = _preferred[-1] if _preferred and _preferred[-1] in order and _preferred[-1] not in skip else None
    if preferred:
        order = (preferred,) + tuple(b for b in order if b != preferred)
    for b in order:
        if b == "triton" and x.device.type != "cuda":
            continue  # interpreter: explicit request only
        if b == "cpp" and b != preferred and (b in skip or not _cpp_in_auto()):
            continue
        if _CHECKS[b](x.device, x.dtype) is None:
            last_backend[op] = b
            return b
    raise BackendUnavailableError(f"no backend of {op!r} can run on {x.device}")  # pragma: no cover


def _check_idx(expert_idx: torch.Tensor, S: int, N: int, device: torch.device):
    if not isinstance(expert_idx, torch.Tensor):  # a list / array: a bare AttributeError on .dim()
        raise TypeError(f"expert_idx must be an int64 or int32 tensor [S], got {type(expert_idx).__name__} "
                        "(convert it with torch.as_tensor)")
    if expert_idx.device != device:  # the kernels would read it at a pointer of the wrong device; no range check
        raise ValueError(f"expert_idx is on {expert_idx.device}, x on {device}: move it with "
                         f"expert_idx.to({str(device)!r})")
    if expert_idx.dim() != 1 or expert_idx.shape[0] != S:
        raise ValueError(f"expert_idx must be [S]={S}, got {tuple(expert_idx.shape)}")
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"expert_idx must be an int64 or int32 tensor, got {expert_idx.dtype}")
    # range check needs a host sync: CPU only, never during CUDA graph capture nor while compiling
    # (data-dependent: a graph break)
    if expert_idx.device.type == "cpu" and S > 0 and not torch.compiler.is_compiling():
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"expert_idx values must lie in [0, {N}), got range [{lo}, {hi}]")


def _check_conv_input(op: str, x):
    """x [S, C_in, H, W]: an unbatched [C_in, H, W] ran as F.conv2d's unbatched input (its channels taken for the
    batch by the expert index, torch's error naming a made-up shape)."""
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [S, C_in, H, W], got {tuple(x.shape)} (unsqueeze(0) a single sample)")


def _check_bias(op: str, bias, c_out: int):
    """bias exactly [C_out] (F.conv2d's rule) for every op and path: the in-base kernels read bias[o] of any shape,
    past its end; F.linear broadcast a [1] / [1, C_out] bias and raised torch's expand error for a wrong length."""
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{op}: bias must be [C_out] = [{c_out}], got {tuple(bias.shape)}; pass a 1-D bias of "
                         f"length {c_out} (or None)")


_FROZEN_WARNED: set = set()  # (op, name) pairs already warned about


def _warn_if_frozen_wants_grad(op: str, W, bias):
    """W and the shared bias are frozen (every backend detaches them): one that requires grad silently got no gradient.
    A warning, once per op and tensor: a model unfrozen with requires_grad_(True) still trains its LoRA."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("W", W), ("bias", bias)):
        if t is not None and t.requires_grad and (op, name) not in _FROZEN_WARNED:
            _FROZEN_WARNED.add((op, name))
            warnings.warn(f"{op}: {name} requires grad, but the base weight and bias are frozen (detached: {name} gets "
                          f"no gradient); call {name}.requires_grad_(False) (warned once)", UserWarning, stacklevel=3)


def _check_expert_bias(expert_bias, N: int, c_out: int):
    if expert_bias is not None and tuple(expert_bias.shape) != (N, c_out):
        raise ValueError(f"expert_bias must be [N, C_out] = [{N}, {c_out}], got {tuple(expert_bias.shape)}")


def _check_dtypes(op: str, **tensors):
    """One floating dtype for the tensors given (x first; None: absent): x, W, A, B (or delta), bias, expert_bias
    (backends disagreed: a bare torch error, a silent promotion or a silent cast); under torch.autocast the ops
    compute in the autocast dtype, so mixed inputs are fine there."""
    x = tensors["x"]
    if torch.is_autocast_enabled(x.device.type):
        return
    for t in tensors.values():
        if t is not None and t.dtype != x.dtype:
            break
    else:
        return
    names = [k for k, t in tensors.items() if t is not None]
    got = ", ".join(f"{k} {tensors[k].dtype}" for k in names)
    raise TypeError(f"{op}: {', '.join(names[:-1])} and {names[-1]} must have one dtype, got {got}; cast them "
                    f"(or run under torch.autocast)")


def _fold_scale(B, scale):
    """The fast paths take scale as a float: a tensor scale goes into B instead (B * scale, differentiable,
    then scale 1), so autograd gives d(scale) = <dB', B> from their dB', and the scale is never read on the
    host (float() of a CUDA tensor: a device sync per layer call, an error under CUDA graph capture)."""
    if isinstance(scale, torch.Tensor):
        return B * scale.reshape(()).to(B.dtype), 1.0
    return B, scale


# ----------------------------------------------------------------------------- ops
def lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias=None, *, backend=None, segments=None,
                a_stage=None):
    """x [S, ..., in] -> x W^T + bias + expert_bias[e] + scale (x A_e^T) B_e^T, e = expert_idx[s].

    W [out, in] and bias are frozen (no gradient on any backend; one that requires grad: a warning, once);
    A [N, r, in], B [N, out, r], expert_bias [N, out] | None.
    ``segments``: a ``build_segments(expert_idx, N)`` result to reuse across layers (a stale one is refused:
    segments.check_segments). ``a_stage``
    (None: PPAP_FAST_LORA_A_STAGE): "in_base" runs the base GEMM and the LoRA in the same Triton kernels
    (r <= 64; the conv A stage's kernels, the rows as a 1 x M map), "auto" times that against the default
    path on the first call with each key; "default" or any other conv A stage name: the default path.
    ``last_backend["lora_linear/a_stage"]`` says which ran ("default" or "in_base"). backend: None / "auto"
    (automatic), "cpp", "cuda_full", "cuda", "triton" or "reference".
    """
    if x.dim() < 2:  # [in]: its length was taken for the batch ("expert_idx must be [S]=in")
        raise ValueError(f"lora_linear: x must be [S, ..., in] (a batch dimension first), got {tuple(x.shape)}")
    N, r, K = A.shape
    if W.shape[1] != K or x.shape[-1] != K or B.shape != (N, W.shape[0], r):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    _check_dtypes("lora_linear", x=x, W=W, A=A, B=B, bias=bias, expert_bias=expert_bias)
    _check_idx(expert_idx, x.shape[0], N, x.device)
    _check_bias("lora_linear", bias, W.shape[0])
    _warn_if_frozen_wants_grad("lora_linear", W, bias)
    _check_expert_bias(expert_bias, N, W.shape[0])
    if segments is not None:
        check_segments(segments, expert_idx, N)
    if x.shape[0] == 0:  # empty batch: the fast paths view x as [S, -1, K]; the reference handles it
        last_backend["lora_linear"] = last_backend["lora_linear/a_stage"] = "reference"
        return reference.lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias)
    explicit_stage = a_stage is not None
    stage = "default" if a_stage == "default" else _resolve_a_stage(a_stage)
    b = _pick("lora_linear", x, backend, skip=("cpp",) if stage in ("in_base", "auto") else ())
    if b != "reference":
        B, scale = _fold_scale(B, scale)
    if b in ("reference", "cpp") or stage not in ("in_base", "auto") or r > _in_base_max_rank():
        stage = "default"
    elif stage == "auto":
        stage = _auto_linear_stage(x, W, bias, A, B, expert_idx, scale, expert_bias, b, segments)
    last_backend["lora_linear/a_stage"] = "reference" if b == "reference" else stage
    if b == "reference":
        return reference.lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias)
    if b == "cpp":
        if explicit_stage and a_stage == "in_base":
            raise ValueError("backend 'cpp' runs the default linear path only, got a_stage='in_base'")
        from . import cpp

        return cpp.lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias, seg=segments)
    from . import fast

    return fast.lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias, seg=segments, fwd=b, a_stage=stage)


def _in_base_max_rank() -> int:
    """The in-base kernels' rank limit; 0 without Triton (a CUDA-only build: the default path runs)."""
    if _triton_import_error() is not None:
        return 0
    from .triton_conv import IN_BASE_MAX_RANK

    return IN_BASE_MAX_RANK


def _auto_linear_stage(x, W, bias, A, B, expert_idx, scale, expert_bias, b, segments):
    """a_stage="auto" for a linear layer: "default" or "in_base", timed once per key (autotune.py)."""
    from . import autotune, fast

    need = autotune.grads_wanted(x, A, B, expert_bias)
    seg = segments if segments is not None else build_segments(expert_idx, A.shape[0])
    run = autotune.runner(lambda stage, xs, As, Bs, ebs: fast.lora_linear(
        xs, W, bias, As, Bs, expert_idx, scale, ebs, seg=seg, fwd=b, a_stage=stage), (x, A, B, expert_bias), need)
    key = ("linear",) + autotune.key_for(x, W, A, B, expert_bias, 1, 0, 1, 1, b, 1, need)
    return autotune.choose(run, key, ("default", "in_base"), x.device)


def lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride=1, padding=0, dilation=1, groups=1,
                expert_bias=None, *, backend=None, segments=None, a_stage=None, a_blocks=1):
    """conv(x, W, bias) + expert_bias[e] + scale * B_e(A_e(x)), e = expert_idx[s] for sample s of x
    [S, C_in, H, W]; the base conv's stride, padding, dilation and groups as F.conv2d's; A [N, r, C_in/g, kh, kw]
    (a conv with the base geometry and groups), B [N, C_out, r/g] (grouped 1x1 conv). See fast.py for the
    strategy. backend and segments as lora_linear's.
    ``a_stage``: "stacked" (default), "fused" (base + stacked A in one conv; groups == 1, else it runs
    "stacked"), "implicit" (cuDNN base conv + one Triton implicit-GEMM kernel for the whole LoRA share in
    each direction; groups == 1 and r <= 256, else "stacked"), "in_base" (the base conv and its LoRA in the
    same Triton implicit-GEMM kernels, forward and input gradient; groups == 1, r <= 64 and a_blocks == 1,
    else "implicit"), "grouped" or "auto" (the fastest of stacked / implicit / in_base for this call's shapes,
    timed on the first call with them and cached: ops/lora/autotune.py); None: PPAP_FAST_LORA_A_STAGE,
    else "stacked". ``last_backend["lora_conv2d/a_stage"]`` says which A stage ran. ``a_blocks`` > 1
    declares A block diagonal over its flat (C_in/g, kh, kw) columns (``a_blocks`` blocks of r/a_blocks
    rank rows; reference.loralib_conv_as_factorised builds one): the implicit A stage then skips the
    zero blocks and reports their entries' gradient as 0 (structural zeros); other paths use A as given."""
    _check_conv_input("lora_conv2d", x)
    explicit_stage = a_stage is not None
    a_stage = _resolve_a_stage(a_stage)
    N, r = A.shape[:2]
    if r % groups or B.shape != (N, W.shape[0], r // groups) or A.shape[2:] != W.shape[1:]:
        raise ValueError(f"shape mismatch: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, groups {groups}")
    flat_cols = A.shape[2] * A.shape[3] * A.shape[4]
    if not isinstance(a_blocks, int) or a_blocks < 1 or r % a_blocks or flat_cols % a_blocks:
        raise ValueError(f"a_blocks must be a positive int dividing the rank {r} and the flat A columns {flat_cols}, "
                         f"got {a_blocks!r}")
    _check_dtypes("lora_conv2d", x=x, W=W, A=A, B=B, bias=bias, expert_bias=expert_bias)
    _check_idx(expert_idx, x.shape[0], N, x.device)
    _check_bias("lora_conv2d", bias, W.shape[0])
    _warn_if_frozen_wants_grad("lora_conv2d", W, bias)
    _check_expert_bias(expert_bias, N, W.shape[0])
    if segments is not None:
        check_segments(segments, expert_idx, N)
    padding = _resolve_padding("lora_conv2d", padding, W.shape[-2:], dilation, stride)
    if x.shape[0] == 0:  # empty batch: the fast paths assume S > 0; the reference handles it
        last_backend["lora_conv2d"] = last_backend["lora_conv2d/a_stage"] = "reference"
        return reference.lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups,
                                     expert_bias)
    b = _pick("lora_conv2d", x, backend, skip=("cpp",) if a_stage != "stacked" else ())
    if b != "reference":
        B, scale = _fold_scale(B, scale)
    if b == "cpp" and (not explicit_stage or a_stage == "auto"):  # the environment's A stage is a preference
        a_stage = "stacked"
    if a_stage == "auto":
        a_stage = _auto_a_stage(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups, expert_bias,
                                b, segments, a_blocks)
    ran = _effective_a_stage(a_stage, b, groups, r, a_blocks)
    if ran == "fused" and b != "cpp":
        from . import fast

        if not fast.fused_fits(x, W, A, stride, padding, dilation):
            ran = "stacked"  # the fused conv output would pass the element limit: fast runs stacked
    last_backend["lora_conv2d/a_stage"] = ran
    if b == "reference":
        return reference.lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups,
                                     expert_bias)
    if b == "cpp":
        if a_stage != "stacked":
            raise ValueError(f"backend 'cpp' runs a_stage='stacked' only, got a_stage={a_stage!r}")
        from . import cpp

        return cpp.lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups, expert_bias,
                               seg=segments)
    from . import fast

    return fast.lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups, expert_bias,
                            seg=segments, fwd=b, a_stage=a_stage, a_blocks=a_blocks)


A_STAGES = ("stacked", "fused", "implicit", "in_base", "grouped", "auto")


def _auto_a_stage(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups, expert_bias, b, segments,
                  a_blocks):
    """a_stage="auto": the fastest applicable A stage for this call's key, timed once (autotune.py)."""
    if b == "reference" or _triton_import_error() is not None:  # the other stages are Triton kernels
        return "stacked"
    from . import autotune, fast

    r = A.shape[1]
    stages = list(dict.fromkeys(_effective_a_stage(s, b, groups, r, a_blocks) for s in autotune.CANDIDATES))
    if len(stages) == 1:
        return stages[0]
    need = autotune.grads_wanted(x, A, B, expert_bias)
    seg = segments if segments is not None else build_segments(expert_idx, A.shape[0])
    run = autotune.runner(lambda stage, xs, As, Bs, ebs: fast.lora_conv2d(
        xs, W, bias, As, Bs, expert_idx, scale, stride, padding, dilation, groups, ebs, seg=seg, fwd=b, a_stage=stage,
        a_blocks=a_blocks), (x, A, B, expert_bias), need)
    key = autotune.key_for(x, W, A, B, expert_bias, stride, padding, dilation, groups, b, a_blocks, need)
    return autotune.choose(run, key, stages, x.device)


def _resolve_a_stage(a_stage):
    """An explicit a_stage, else PPAP_FAST_LORA_A_STAGE, else "stacked"; ValueError for other names."""
    if a_stage is None:
        a_stage = os.environ.get("PPAP_FAST_LORA_A_STAGE", "").strip().lower() or "stacked"
        where = "PPAP_FAST_LORA_A_STAGE"
    else:
        where = "a_stage"
    if a_stage not in A_STAGES:
        raise ValueError(f"{where} must be one of {A_STAGES}, got {a_stage!r}")
    return a_stage


def _effective_a_stage(a_stage, backend, groups, r, a_blocks=1):
    if backend == "reference":
        return "reference"
    if a_stage == "fused" and groups != 1:
        return "stacked"
    if a_stage == "in_base":
        if groups == 1 and a_blocks == 1 and r <= _in_base_max_rank():
            return a_stage
        a_stage = "implicit"
    if a_stage == "implicit":
        from .triton_kernels import IMPLICIT_MAX_RANK

        if groups != 1 or r // a_blocks > IMPLICIT_MAX_RANK:
            return "stacked"
    return a_stage


def _resolve_padding(op, padding, kernel_size, dilation, stride=1):
    """'valid' -> 0, 'same' -> the symmetric padding that keeps the size (odd kernels, stride 1 as F.conv2d);
    op names the caller in the errors."""
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    if padding != "same":
        raise ValueError(f"{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    if any(st != 1 for st in ((stride, stride) if isinstance(stride, int) else tuple(stride))):
        raise ValueError(f"{op}: padding='same' needs stride 1 (as F.conv2d), got stride={stride!r}: pad explicitly")
    dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    pads = []
    for k, d in zip(kernel_size, dil):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(f"{op}: padding='same' with an even effective kernel (dilation * (kernel - 1) = {total}) "
                             "is asymmetric: F.pad x yourself (the odd pixel right / bottom, as F.conv2d) and pass "
                             "padding=0")
        pads.append(total // 2)
    return tuple(pads)


_DELTA_CHOICES = {"stacked": "stacked", "grouped": None, "vectorized": None, "auto": None}


def _auto_delta_backend(x):
    """PPAP_FAST_LORA_DELTA=stacked|grouped, else "stacked" on CUDA (an H100 distillation step of a
    ResNet50 loralib bank took 0.51x the time of the grouped conv at N = 5 and 10; NOTES.md)."""
    choice = os.environ.get("PPAP_FAST_LORA_DELTA", "").strip().lower()
    if choice and choice not in _DELTA_CHOICES:
        raise ValueError(f"PPAP_FAST_LORA_DELTA must be one of {sorted(_DELTA_CHOICES)}, got {choice!r}")
    if choice:
        return _DELTA_CHOICES[choice]
    return "stacked" if x.is_cuda else None


def lora_conv2d_delta(x, W, bias, delta, expert_idx, stride=1, padding=0, dilation=1, groups=1, expert_bias=None,
                      *, backend=None):
    """conv(x, W + delta[e], bias) + expert_bias[e], e = expert_idx[s] for sample s of x; delta [N, *W.shape]
    (e.g. from loralib_conv_delta); stride, padding, dilation and groups as F.conv2d's. backend: None / "auto"
    (automatic), "vectorized", "stacked" or "reference"."""
    _check_conv_input("lora_conv2d_delta", x)
    if tuple(delta.shape[1:]) != tuple(W.shape):
        raise ValueError(f"delta must be [N, *W.shape], got {tuple(delta.shape)} for W {tuple(W.shape)}")
    _check_dtypes("lora_conv2d_delta", x=x, W=W, delta=delta, bias=bias, expert_bias=expert_bias)
    _check_idx(expert_idx, x.shape[0], delta.shape[0], x.device)
    _check_bias("lora_conv2d_delta", bias, W.shape[0])  # (the stacked path broadcast a [1] bias)
    _warn_if_frozen_wants_grad("lora_conv2d_delta", W, bias)
    _check_expert_bias(expert_bias, delta.shape[0], W.shape[0])
    padding = _resolve_padding("lora_conv2d_delta", padding, W.shape[-2:], dilation, stride)
    if x.shape[0] == 0:  # empty batch: the grouped conv would have S * groups = 0 groups
        last_backend["lora_conv2d_delta"] = "reference"
        return reference.lora_conv2d_delta(x, W, bias, delta, expert_idx, stride, padding, dilation, groups,
                                           expert_bias)
    if backend in (None, "auto") and _env_backend("lora_conv2d_delta") is None \
            and _registry.forced() not in _ORDER["lora_conv2d_delta"]:  # a global choice still wins
        backend = _auto_delta_backend(x)
    b = _pick("lora_conv2d_delta", x, backend)
    from . import vectorized

    impl = {"vectorized": vectorized.lora_conv2d_delta, "stacked": vectorized.lora_conv2d_delta_stacked}.get(
        b, reference.lora_conv2d_delta)
    return impl(x, W, bias, delta, expert_idx, stride, padding, dilation, groups, expert_bias)


_MOVED_TO_NORM = ("expert_batch_norm", "expert_layer_norm", "expert_group_norm")


def __getattr__(name: str):
    """The per-expert norms moved to :mod:`ppap_fast.ops.norm`; the old names still work, with a
    DeprecationWarning."""
    if name in _MOVED_TO_NORM:
        import warnings

        from .. import norm

        warnings.warn(f"ppap_fast.ops.lora.{name} moved to ppap_fast.ops.norm.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(norm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
