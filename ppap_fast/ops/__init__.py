"""Ops with a pure-PyTorch reference beside each fast path (cuda / cpp / triton).

`backend_report()` tells which paths can run here and which ran last;
`set_backend(name)` forces one (an unavailable one raises BackendUnavailableError).
"""
import torch

from ppap_fast.ops import _ext
from ppap_fast.ops import norm  # noqa: F401  registers the expert_*_norm ops
from ppap_fast.ops.norm_act import group_norm_act, group_norm_act_reference
from ppap_fast.ops.out_head import group_norm_silu_conv3x3, group_norm_silu_conv3x3_reference
from ppap_fast.ops.residual import bias_residual_add, bias_residual_add_reference
from ppap_fast.ops.resample import (avg_pool2x, avg_pool2x_reference, upsample_nearest2x,
                                   upsample_nearest2x_reference)
from ppap_fast.ops.concat import cat_channels, cat_channels_reference
from ppap_fast.ops.channel_sums import ChannelSums
from ppap_fast.ops._registry import BACKENDS, BackendUnavailableError, last_backend, set_backend
from ppap_fast.ops._registry import report as _report
from ppap_fast.ops.update import UpdateTable, build_table, guided_update, guided_update_reference
from ppap_fast.ops.eps_correction import guided_eps, guided_eps_reference


def backend_report(device=None) -> dict:
    """Extension/Triton status and, per op, which backends can run on `device` (float32)."""
    from ppap_fast.ops import lora

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # registry ops: guided_update, guided_eps, expert_*_norm, group_norm_act, group_norm_silu_conv3x3,
    # bias_residual_add, resample, cat_channels
    ops = _report(device)
    for name in ("lora_linear", "lora_conv2d", "lora_conv2d_delta"):
        ops[name] = {"available": lora.available_backends(name, device), "last": lora.last_backend.get(name)}
    return {
        "extension": "loaded" if _ext.extension_loaded() else f"missing ({_ext.EXTENSION_ERROR})",
        "extension_cuda": _ext.extension_has_cuda(),
        "triton": "ok" if _ext.TRITON_ERROR is None else _ext.TRITON_ERROR,
        "triton_interpret": _ext.triton_interpreting(),
        "ops": ops,
    }


__all__ = [
    "BACKENDS", "BackendUnavailableError", "backend_report", "last_backend", "set_backend",
    "UpdateTable", "build_table", "guided_update", "guided_update_reference", "guided_eps", "guided_eps_reference",
    "group_norm_act", "group_norm_act_reference", "group_norm_silu_conv3x3", "group_norm_silu_conv3x3_reference",
    "bias_residual_add", "bias_residual_add_reference",
    "upsample_nearest2x", "upsample_nearest2x_reference", "avg_pool2x", "avg_pool2x_reference",
    "cat_channels", "cat_channels_reference", "ChannelSums",
]
