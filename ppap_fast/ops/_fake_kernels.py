"""Fake (meta) kernels of the extension's ops, so FakeTensor tracing and torch.compile can run them.

Each returns what the real kernel returns, with its shapes, dtypes and strides, and checks the
arguments' metadata as the kernel does (values, e.g. idx ranges, are not visible here). The
segment ops write their ``out`` argument in place and return nothing. lora_linear_cpp /
lora_conv2d_cpp are CompositeImplicitAutograd (C++ autograd Functions made of ATen calls and the
segment ops, called through the dispatcher): they decompose while tracing and need no fake kernel.
"""
from __future__ import annotations

import torch

_GUIDED_UPDATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REGISTERED: list[str] = []  # the ops given a fake kernel
_DONE = False  # register() ran (registering twice raises)


def _contiguous_within_a_sample(t) -> bool:
    """t[0].is_contiguous() (the kernel's per-sample layout: any batch stride), True for an empty batch."""
    return t.shape[0] == 0 or t[0].is_contiguous()


def _guided_update_fake(x, eps, v, grad, noise, idx, coefs, mode, clip_denoised):
    from ppap_fast.ops.update import COLS as GUIDED_UPDATE_COLS  # the table's columns (kGuidedUpdateCols)

    # the checks (and messages) of check_guided_update_args in csrc/ops.cpp, in its order
    torch._check(0 <= mode <= 2,
                 lambda: f"guided_update: mode must be 0 (ddim), 1 (ddpm fixed) or 2 (ddpm learned), got {mode}")
    torch._check(x.dim() >= 1 and x.is_contiguous(), lambda: "guided_update: x must be contiguous with a batch dim")
    for name, t in (("eps", eps), ("v", v), ("grad", grad), ("noise", noise)):
        if t is None:
            continue
        torch._check(t.dim() == x.dim() and t.shape[0] == x.shape[0],
                     lambda: f"guided_update: {name} must have x's batch size and rank")
        torch._check(t.shape[1:] == x.shape[1:],
                     lambda: f"guided_update: {name} shape {list(t.shape)} does not match x {list(x.shape)}")
        torch._check(t.dtype == x.dtype, lambda: f"guided_update: {name} dtype differs from x")
        torch._check(t.device == x.device, lambda: f"guided_update: {name} is on another device than x")
        torch._check(_contiguous_within_a_sample(t),
                     lambda: f"guided_update: {name} must be contiguous within a sample")
    torch._check(mode != 2 or v is not None, lambda: "guided_update: mode 2 (learned range) needs v")
    torch._check(idx.dim() == 1 and idx.shape[0] == x.shape[0] and idx.dtype == torch.long and idx.device == x.device
                 and idx.is_contiguous(),
                 lambda: "guided_update: idx must be a contiguous long tensor of shape (B,) on x's device")
    coef_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    torch._check(coefs.dim() == 2 and coefs.shape[1] == GUIDED_UPDATE_COLS and coefs.dtype == coef_dtype
                 and coefs.is_contiguous() and coefs.device == x.device,
                 lambda: f"guided_update: coefs must be a contiguous (T, {GUIDED_UPDATE_COLS}) table on x's device, "
                         "float64 for float64 x, else float32")
    torch._check(x.dtype in _GUIDED_UPDATE_DTYPES,  # the kernels' dtype dispatch
                 lambda: f"guided_update: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return torch.empty_like(x), torch.empty_like(x)


def _guided_eps_fake(model_output, grad, coef, channels):
    # the checks (and messages) of check_guided_eps_args in csrc/ops.cpp, in its order
    mo = model_output
    torch._check(mo.dim() >= 2, lambda: f"guided_eps: model_output must be [B, C, ...], got {list(mo.shape)}")
    torch._check(mo.dtype in _GUIDED_UPDATE_DTYPES,
                 lambda: f"guided_eps: model_output must be float16, bfloat16, float32 or float64, got {mo.dtype}")
    torch._check(1 <= channels <= mo.shape[1],
                 lambda: f"guided_eps: channels must lie in [1, {mo.shape[1]}], got {channels}")
    torch._check(_contiguous_within_a_sample(mo), lambda: "guided_eps: model_output must be contiguous within a sample")
    torch._check(grad.dim() == mo.dim() and grad.shape[0] == mo.shape[0] and grad.shape[1] == channels
                 and grad.shape[2:] == mo.shape[2:],
                 lambda: f"guided_eps: grad must be [B, channels, ...] of model_output {list(mo.shape)}, "
                         f"got {list(grad.shape)}")
    torch._check(grad.dtype in (mo.dtype, torch.float32),
                 lambda: f"guided_eps: grad must have model_output's dtype or float32, got {grad.dtype}")
    torch._check(grad.device == mo.device, lambda: "guided_eps: grad is on another device than model_output")
    torch._check(_contiguous_within_a_sample(grad), lambda: "guided_eps: grad must be contiguous within a sample")
    coef_dtype = torch.float64 if mo.dtype == torch.float64 else torch.float32
    torch._check(coef.dim() == 1 and coef.shape[0] == mo.shape[0] and coef.dtype == coef_dtype and coef.is_contiguous()
                 and coef.device == mo.device,
                 lambda: "guided_eps: coef must be a contiguous (B,) tensor on model_output's device, float64 for "
                         "float64 model_output, else float32")
    return torch.empty(mo.shape, dtype=mo.dtype, device=mo.device)


def _check_segment_args(op, x, w, out, sorted_idx, offsets):
    torch._check(x.dim() == 3 and w.dim() == 3 and out.dim() == 3,
                 lambda: f"{op}: x, weight and out must be 3-D, got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{tuple(out.shape)}")
    torch._check(sorted_idx.dim() == 1 and sorted_idx.shape[0] == x.shape[0], lambda: f"{op}: sorted_idx must be [S]")
    torch._check(offsets.dim() == 1 and offsets.shape[0] == w.shape[0] + 1, lambda: f"{op}: offsets must be [N+1]")


def _sgmv_shrink_fake(x, A, out, sorted_idx, offsets):
    _check_segment_args("lora_sgmv_shrink", x, A, out, sorted_idx, offsets)


def _sgmv_expand_fake(h, B, out, sorted_idx, offsets, scale):
    _check_segment_args("lora_sgmv_expand", h, B, out, sorted_idx, offsets)


def _seg_outer_fake(u, v, out, sorted_idx, offsets, alpha, split):
    torch._check(u.dim() == 3 and v.dim() == 3 and out.dim() == 3 and u.shape[:2] == v.shape[:2],
                 lambda: f"lora_seg_outer: u [S, M, P], v [S, M, Q], out [N, P, Q], got {tuple(u.shape)}, "
                         f"{tuple(v.shape)}, {tuple(out.shape)}")


FAKES = {
    "guided_update": _guided_update_fake,
    "guided_eps": _guided_eps_fake,
    "lora_sgmv_shrink": _sgmv_shrink_fake,
    "lora_sgmv_expand": _sgmv_expand_fake,
    "lora_seg_outer": _seg_outer_fake,
}


def register() -> list[str]:
    """Give each op of FAKES that the loaded extension defines its fake kernel (skips ops an older
    build lacks and, defensively, CompositeImplicitAutograd ones, which decompose instead)."""
    global _DONE
    if _DONE:
        return _REGISTERED
    _DONE = True
    for name, fn in FAKES.items():
        qualname = f"ppap_fast::{name}"
        if not hasattr(torch.ops.ppap_fast, name):  # e.g. lora_seg_outer in builds made before it
            continue
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeImplicitAutograd"):
            continue
        torch.library.register_fake(qualname, fn)
        _REGISTERED.append(name)
    return _REGISTERED
