"""CUDA SGMV forward kernels (kernels/lora_sgmv.cu), reached one of two ways:

1. Registered by the project extension (lead's csrc/) as
       torch.ops.ppap_fast.lora_sgmv_shrink(Tensor x, Tensor A, Tensor(a!) out, Tensor sorted_idx, Tensor offsets) -> ()
       torch.ops.ppap_fast.lora_sgmv_expand(Tensor h, Tensor B, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float scale) -> ()
   wrapping ``launch_sgmv_shrink`` / ``launch_sgmv_expand`` from kernels/lora_kernels.cuh
   on the current stream.
2. Or JIT-built from kernels/lora_sgmv.cu + kernels/lora_sgmv_bind.cu with
   ``load_jit()`` (torch.utils.cpp_extension.load; needs nvcc; automatic when the
   environment variable PPAP_LORA_JIT=1 is set).

Argument order and semantics are exactly those of the Python fallbacks
``triton_kernels.sgmv_shrink(x, w, out, sorted_idx, offsets)`` (scale 1) and
``triton_kernels.sgmv_expand(h, w, out, sorted_idx, offsets, scale)`` (accumulate).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

_JIT = None
_JIT_ERROR: Optional[str] = None
REPO = Path(__file__).resolve().parents[3]


def _registered():
    """The ops from the project extension (importing ppap_fast._C registers them), if it
    was built with CUDA."""
    try:
        from ppap_fast.ops import _ext  # the lead's loader: imports ppap_fast._C when built

        if not _ext.extension_has_cuda():
            return None
    except Exception:
        pass
    try:
        ns = torch.ops.ppap_fast
        ops = ns.lora_sgmv_shrink, ns.lora_sgmv_expand
    except (AttributeError, RuntimeError):
        return None
    try:  # schema defined is not enough: a CUDA kernel must be registered for it
        if not torch._C._dispatch_has_kernel_for_dispatch_key("ppap_fast::lora_sgmv_shrink", "CUDA"):
            return None
    except Exception:
        pass
    return ops


def load_jit(verbose: bool = False):
    """Build (once) and load the standalone JIT extension. Returns the module or raises."""
    global _JIT, _JIT_ERROR
    if _JIT is not None:
        return _JIT
    from torch.utils.cpp_extension import load

    try:
        _JIT = load(
            name="ppap_lora_sgmv_jit",
            sources=[str(REPO / "kernels" / "lora_sgmv.cu"), str(REPO / "kernels" / "lora_sgmv_bind.cu")],
            extra_cuda_cflags=["-O3"],
            verbose=verbose,
        )
    except Exception as exc:
        _JIT_ERROR = f"{type(exc).__name__}: {exc}"
        raise
    return _JIT


def _ops():
    reg = _registered()
    if reg is not None:
        return reg
    if _JIT is None and _JIT_ERROR is None and os.environ.get("PPAP_LORA_JIT") == "1" and torch.cuda.is_available():
        try:
            load_jit()
        except Exception:
            pass
    if _JIT is not None:
        return _JIT.sgmv_shrink, _JIT.sgmv_expand
    return None


def why_unavailable() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _ops() is None:
        extra = f" (JIT build failed: {_JIT_ERROR})" if _JIT_ERROR else ""
        return ("CUDA SGMV kernels not loaded: neither torch.ops.ppap_fast.lora_sgmv_* is registered nor the "
                "JIT extension built (call ppap_fast.ops.lora.cuda_ops.load_jit() or set PPAP_LORA_JIT=1)" + extra)
    return None


def sgmv_shrink(x, A, out, sorted_idx, offsets):
    """out[s, m, :] = x[s, m, :] @ A[e(s)].T (written); x [S, M, K], A [N, R, K], out [S, M, R]."""
    shrink, _ = _ops()
    shrink(x, A, out, sorted_idx, offsets)
    return out


def sgmv_expand(h, B, out, sorted_idx, offsets, scale):
    """out[s, m, :] += scale * h[s, m, :] @ B[e(s)].T; h [S, M, R], B [N, NOUT, R], out [S, M, NOUT]."""
    _, expand = _ops()
    expand(h, B, out, sorted_idx, offsets, float(scale))
    return out
