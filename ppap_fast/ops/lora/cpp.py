"""Backend "cpp": the fast path's math (fast.py: LoraLinearFn, the stacked-A conv + LoraConvBFn)
as C++ autograd Functions in the extension (csrc/lora_autograd.cpp), so one eager call crosses
from Python to C++ once instead of once per op and kernel launch. The segment steps run the CUDA
SGMV / seg_outer kernels on CUDA tensors and ATen (one matmul per non-empty expert) on CPU ones.

    torch.ops.ppap_fast.lora_linear_cpp(x, W, bias, A, B, expert_bias, expert_idx, sorted_idx, offsets,
                                        scale, poison)
    torch.ops.ppap_fast.lora_conv2d_cpp(x, W, bias, A, B_dense, expert_bias, expert_idx, sorted_idx,
                                        offsets, scale, stride, padding, dilation, groups, poison)

The conv runs the "stacked" A stage (one conv with every expert's A, then each sample's own
channels gathered); a grouped B enters in its dense block-diagonal form (``reference.block_diag_B``,
differentiable in Python).
"""
from __future__ import annotations

import torch

from .._kernel_util import autocast_input
from .reference import batch_chunk, block_diag_B, conv_out_hw
from .segments import Segments, build_segments

POISON = False  # tests: buffers the ops fully overwrite start as NaN
_OPS_FOUND = False


def why_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    global _OPS_FOUND
    from .. import _ext

    if _ext._C is None:
        return f"extension ppap_fast._C not loaded ({_ext.EXTENSION_ERROR})"
    if not _OPS_FOUND:
        if not hasattr(torch.ops.ppap_fast, "lora_conv2d_cpp"):
            return "the loaded extension has no lora_*_cpp ops (built before them): rebuild it"
        _OPS_FOUND = True
    if device.type == "cuda" and not _ext.extension_has_cuda():
        return "extension was built without CUDA: the cpp backend runs on CPU tensors only"
    if device.type not in ("cpu", "cuda"):
        return f"the cpp backend runs on CPU or CUDA tensors, not {device.type}"
    if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"dtype {dtype} not supported (float32/64, float16, bfloat16)"
    return None


def _ints(v):
    return [v, v] if isinstance(v, int) else [int(a) for a in v]


def lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias=None, seg: Segments | None = None):
    seg = seg if seg is not None else build_segments(expert_idx, A.shape[0])
    x, no_autocast = autocast_input(x)
    with no_autocast:
        return torch.ops.ppap_fast.lora_linear_cpp(x, W, bias, A, B, expert_bias, seg.expert_idx, seg.sorted_idx,
                                                   seg.offsets, float(scale), POISON)


def lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride=1, padding=0, dilation=1, groups=1, expert_bias=None,
                seg: Segments | None = None):
    S = x.shape[0]
    Ho, Wo = conv_out_hw(x.shape[-2:], W.shape[-2:], stride, padding, dilation)
    chunk = batch_chunk(S, A.shape[0] * A.shape[1] * Ho * Wo)
    if chunk < S:  # the stacked A conv [S, N*r, Ho, Wo] (and its gradient) past 2^31 elements: batch chunks
        return torch.cat([lora_conv2d(x[i:i + chunk], W, bias, A, B, expert_idx[i:i + chunk], scale, stride, padding,
                                      dilation, groups, expert_bias) for i in range(0, S, chunk)])
    seg = seg if seg is not None else build_segments(expert_idx, A.shape[0])
    Bd = block_diag_B(B, groups)
    args = (W, bias, A, Bd, expert_bias, seg.expert_idx, seg.sorted_idx, seg.offsets, float(scale), _ints(stride),
            _ints(padding), _ints(dilation), int(groups), POISON)
    x, no_autocast = autocast_input(x)
    with no_autocast:
        return torch.ops.ppap_fast.lora_conv2d_cpp(x, *args)
