"""CUDA SGMV kernels (kernels/lora_sgmv.cu), reached one of two ways:

1. Registered by the project extension (csrc/) as
       torch.ops.ppap_fast.lora_sgmv_shrink(Tensor x, Tensor A, Tensor(a!) out, Tensor sorted_idx, Tensor offsets) -> ()
       torch.ops.ppap_fast.lora_sgmv_expand(Tensor h, Tensor B, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float scale) -> ()
       torch.ops.ppap_fast.lora_seg_outer(Tensor u, Tensor v, Tensor(a!) out, Tensor sorted_idx, Tensor offsets, float alpha, int split) -> ()
   wrapping ``launch_sgmv_shrink`` / ``launch_sgmv_expand`` / ``launch_seg_outer`` from
   kernels/lora_kernels.cuh on the current stream.
2. Or JIT-built from kernels/lora_sgmv.cu + kernels/lora_sgmv_bind.cu with
   ``load_jit()`` (torch.utils.cpp_extension.load; needs nvcc; automatic when the
   environment variable PPAP_LORA_JIT=1 is set).

Argument order and semantics are exactly those of the Python fallbacks
``triton_kernels.sgmv_shrink(x, w, out, sorted_idx, offsets)`` (scale 1) and
``triton_kernels.sgmv_expand(h, w, out, sorted_idx, offsets, scale)`` (accumulate) and
``triton_kernels.seg_outer(u, v, out, sorted_idx, offsets, alpha, split)`` (split <= 0: auto);
``reference.sgmv_shrink / sgmv_expand / seg_outer`` are the pure-torch contract.
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
    try:  # an extension built before the backward kernels has no seg_outer
        outer = ns.lora_seg_outer
        if not torch._C._dispatch_has_kernel_for_dispatch_key("ppap_fast::lora_seg_outer", "CUDA"):
            outer = None
    except (AttributeError, RuntimeError):
        outer = None
    return ops + (outer,)


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


_RESOLVED = None  # the kernels once found: registered ops cannot go away, so later calls skip the lookup


def _ops():
    global _RESOLVED
    if _RESOLVED is not None:
        return _RESOLVED
    reg = _registered()
    if reg is not None and reg[2] is not None:
        _RESOLVED = reg
        return reg
    if reg is not None:
        return reg
    if _JIT is None and _JIT_ERROR is None and os.environ.get("PPAP_LORA_JIT") == "1" and torch.cuda.is_available():
        try:
            load_jit()
        except Exception:
            pass
    if _JIT is not None:
        _RESOLVED = _JIT.sgmv_shrink, _JIT.sgmv_expand, _JIT.seg_outer
        return _RESOLVED
    return None


def why_unavailable(backward: bool = False) -> Optional[str]:
    """None when the forward kernels (and with ``backward``, seg_outer too) can run."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    ops = _ops()
    if ops is None:
        extra = f" (JIT build failed: {_JIT_ERROR})" if _JIT_ERROR else ""
        return ("CUDA SGMV kernels not loaded: neither torch.ops.ppap_fast.lora_sgmv_* is registered nor the "
                "JIT extension built (call ppap_fast.ops.lora.cuda_ops.load_jit() or set PPAP_LORA_JIT=1)" + extra)
    if backward and ops[2] is None:
        return "the loaded extension has no lora_seg_outer (built before the CUDA backward): rebuild it"
    return None


def sgmv_shrink(x, A, out, sorted_idx, offsets):
    """out[s, m, :] = x[s, m, :] @ A[e(s)].T (written); x [S, M, K], A [N, R, K], out [S, M, R]."""
    _ops()[0](x, A, out, sorted_idx, offsets)
    return out


def sgmv_expand(h, B, out, sorted_idx, offsets, scale):
    """out[s, m, :] += scale * h[s, m, :] @ B[e(s)].T; h [S, M, R], B [N, NOUT, R], out [S, M, NOUT]."""
    _ops()[1](h, B, out, sorted_idx, offsets, float(scale))
    return out


def seg_outer(u, v, out, sorted_idx, offsets, alpha=1.0, split=0):
    """out[e] = alpha * U_e^T V_e over segment e's rows (written; zeros for empty experts);
    u [S, M, P], v [S, M, Q], out [N, P, Q] (u's dtype or float32). split <= 0: from the shapes."""
    _ops()[2](u, v, out, sorted_idx, offsets, float(alpha), int(split))
    return out
