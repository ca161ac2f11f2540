"""Pure-PyTorch reference implementations of the PPAP multi-expert ops.

Straightforward on purpose: per-sample gathers or Python loops over experts.
Every fast path in this package is checked against these (in float64).

Conventions shared by all ops
-----------------------------
* The leading dimension of ``x`` is the sample dimension ``S``; ``expert_idx``
  is a long tensor ``[S]`` with values in ``[0, N)``. Every other leading
  dimension (tokens, pixels) belongs to that sample's expert.
* ``W`` (and the shared ``bias``) are frozen: they are detached, so no dense
  weight gradient is ever computed (the public ops warn, once, where one
  requires grad). Everything else is differentiable.
* ``scale`` multiplies only the LoRA term (alpha / r).
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

IntOr2 = Union[int, Tuple[int, int]]


def _pair(v: IntOr2) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _expand_rows(t: torch.Tensor, like: torch.Tensor, last_dim: int = -1) -> torch.Tensor:
    """[S, C] -> [S, 1, ..., 1, C] broadcastable against ``like`` ([S, ..., C])."""
    return t.view(t.shape[0], *([1] * (like.dim() - 2)), t.shape[-1])


# ----------------------------------------------------------------------------- linear
def lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias=None):
    """y = x @ W.T + bias + expert_bias[e] + scale * (x @ A[e].T) @ B[e].T, e = expert_idx[sample].

    x [S, ..., in], W [out, in], bias [out] | None, A [N, r, in], B [N, out, r],
    expert_idx [S] long, expert_bias [N, out] | None.
    """
    S = x.shape[0]
    y = F.linear(x, W.detach(), None if bias is None else bias.detach())
    x3 = x.reshape(S, math.prod(x.shape[1:-1]), x.shape[-1])  # [S, M, in] (no -1: S may be 0)
    h = torch.bmm(x3, A[expert_idx].transpose(1, 2))        # [S, M, r]
    d = torch.bmm(h, B[expert_idx].transpose(1, 2))         # [S, M, out]
    y = y + scale * d.view(*x.shape[:-1], W.shape[0])
    if expert_bias is not None:
        y = y + _expand_rows(expert_bias[expert_idx].to(y.dtype), y)  # autocast: y's dtype, as the fast paths
    return y


# ----------------------------------------------------------------------------- conv (factorised, peft-like layout)
def lora_conv_delta(A, B, groups: int = 1):
    """Dense weight delta of the factorised conv LoRA (without ``scale``).

    A [..., r, C_in/g, kh, kw], B [..., C_out, r/g]  ->  delta [..., C_out, C_in/g, kh, kw]
    where, per group g of groups, delta[g's out channels] = B_g @ A_g (A_g flattened over C_in/g*kh*kw).
    """
    lead = A.shape[:-4]
    r, cin_g, kh, kw = A.shape[-4:]
    c_out, rg = B.shape[-2:]
    if r % groups or c_out % groups or rg * groups != r:
        raise ValueError(f"bad grouped LoRA shapes: A {tuple(A.shape)}, B {tuple(B.shape)}, groups {groups}")
    Ag = A.reshape(*lead, groups, rg, cin_g * kh * kw)
    Bg = B.reshape(*lead, groups, c_out // groups, rg)
    return (Bg @ Ag).reshape(*lead, c_out, cin_g, kh, kw)


def lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride=1, padding=0, dilation=1, groups=1,
                expert_bias=None):
    """y = conv(x, W, bias) + expert_bias[e] + scale * B[e](A[e](x)).

    A [N, r, C_in/g, kh, kw]: a conv with the base conv's geometry and ``groups``;
    B [N, C_out, r/g]: a grouped 1x1 conv with the same ``groups``. Loops over experts.
    """
    y = F.conv2d(x, W.detach(), None if bias is None else bias.detach(), stride, padding, dilation, groups)
    N = A.shape[0]
    c_out, rg = B.shape[1], B.shape[2]
    parts = []
    order = []
    for e in range(N):
        sel = (expert_idx == e).nonzero().flatten()
        if sel.numel() == 0 and (e > 0 or x.shape[0] > 0):  # an empty batch keeps one (empty) part
            continue
        h = F.conv2d(x[sel], A[e], None, stride, padding, dilation, groups)
        d = F.conv2d(h, B[e].reshape(c_out, rg, 1, 1), None, 1, 0, 1, groups)
        parts.append(d)
        order.append(sel)
    d = torch.cat(parts)
    inv = torch.empty_like(expert_idx, dtype=torch.long)  # int32 ids too (index_put needs matching dtypes)
    perm = torch.cat(order)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    y = y + scale * d[inv]
    if expert_bias is not None:
        y = y + expert_bias[expert_idx].to(y.dtype)[:, :, None, None]  # autocast: y's dtype, as the fast paths
    return y


# ----------------------------------------------------------------------------- conv (loralib / official PPAP layout)
def loralib_conv_delta(A_l, B_l, C_out, C_in_per_group, k, scale):
    """loralib LoRA conv layout -> dense weight delta.

    A_l [..., r*k, C_in_per_group*k], B_l [..., C_out*k, r*k] (optional leading expert dim);
    delta = (B_l @ A_l).view(..., C_out, C_in_per_group, k, k) * scale.
    """
    lead = A_l.shape[:-2]
    return (B_l @ A_l).reshape(*lead, C_out, C_in_per_group, k, k) * scale


def loralib_conv_as_factorised(A_l, B_l, C_in, kh, kw):
    """The loralib conv layout (groups 1) as an exactly equal factorised LoRA of rank r*kh*kh.

    A_l [..., r*kh, C_in*kw], B_l [..., C_out*kh, r*kh] -> A [..., kh*r*kh, C_in, kh, kw] (kh copies
    of A_l on a block diagonal) and B [..., C_out, kh*r*kh], so that conv(x, (B_l @ A_l).view(W.shape))
    = B(A(x)) (A a conv with the base geometry, B a 1x1 conv). Why: row o*kh + q of B_l @ A_l holds
    the flat weight entries [q*C_in*kw, (q+1)*C_in*kw) of output channel o, so the delta splits into
    kh blocks of rank r*kh. Differentiable (the grads of A_l, B_l flow back through the copies)."""
    lead = A_l.shape[:-2]
    rk, cink = A_l.shape[-2:]
    if cink != C_in * kw or B_l.shape[-1] != rk or B_l.shape[-2] % kh:
        raise ValueError(f"not a loralib conv LoRA for C_in={C_in}, kernel {kh}x{kw}: A {tuple(A_l.shape)}, "
                         f"B {tuple(B_l.shape)}")
    eye = torch.eye(kh, dtype=A_l.dtype, device=A_l.device)
    A = torch.einsum("...jc,qp->...qjpc", A_l, eye).reshape(*lead, kh * rk, C_in, kh, kw)
    B = B_l.reshape(*lead, B_l.shape[-2] // kh, kh * rk)
    return A, B


def lora_conv2d_delta(x, W, bias, delta, expert_idx, stride=1, padding=0, dilation=1, groups=1,
                      expert_bias=None):
    """y = conv(x, W + delta[e], bias) + expert_bias[e]; delta [N, *W.shape]. Per-sample loop."""
    Wd = W.detach()
    b = None if bias is None else bias.detach()
    outs = [F.conv2d(x[s:s + 1], Wd + delta[expert_idx[s]], b, stride, padding, dilation, groups)
            for s in range(x.shape[0])]
    y = torch.cat(outs) if outs else F.conv2d(x, Wd + delta[:1].sum(0) * 0, b, stride, padding, dilation, groups)
    if expert_bias is not None:
        y = y + expert_bias[expert_idx].to(y.dtype)[:, :, None, None]  # autocast: y's dtype, as the fast paths
    return y


# cuDNN and kernels with 32-bit indexing fail or index wrong on tensors of 2^31 elements or more
MAX_INTERMEDIATE_NUMEL = 2**31 - 1


def conv_out_hw(hw, kernel_hw, stride, padding, dilation) -> Tuple[int, int]:
    """(Ho, Wo) of a conv over an (H, W) input (padding an int, a pair, 'valid' or 'same')."""
    if padding == "same":
        return tuple(hw)  # type: ignore[return-value]
    padding = 0 if padding == "valid" else padding
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    (H, W), (kh, kw) = hw, kernel_hw
    return (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def batch_chunk(S: int, numel_per_sample: int) -> int:
    """Samples per chunk that keep an intermediate of numel_per_sample elements per sample within
    MAX_INTERMEDIATE_NUMEL (S: no split needed; at least 1)."""
    return min(S, max(1, MAX_INTERMEDIATE_NUMEL // max(numel_per_sample, 1)))


def stacked_expert_conv(x, w_experts, expert_idx, stride, padding, dilation, groups):
    """ONE conv with every expert's weight stacked along the output channels, then each sample keeps
    its own expert's channels (one gather, any memory format). w_experts [N, C_o, C_in/g, kh, kw]
    -> [S, C_o, Ho, Wo]; differentiable (autograd); N times the FLOPs of one expert's conv.
    The stacked output [S, N*C_o, Ho, Wo] is N times the result (e.g. 96% of 2^31 elements for
    ResNet50's layer1 conv3 at batch 256, N = 10): past MAX_INTERMEDIATE_NUMEL the batch runs in chunks."""
    N, C_o = w_experts.shape[:2]
    cg = C_o // groups
    # stacked output channels ordered [g, N, C_o/g] so each conv group sees its own input group
    w = w_experts.reshape(N, groups, cg, *w_experts.shape[2:]).transpose(0, 1).reshape(
        groups * N * cg, *w_experts.shape[2:]).to(x.dtype)
    S = x.shape[0]
    Ho, Wo = conv_out_hw(x.shape[-2:], w_experts.shape[-2:], stride, padding, dilation)
    chunk = batch_chunk(S, N * C_o * Ho * Wo)

    def conv_gather(xc, idx):
        ys = F.conv2d(xc, w, None, stride, padding, dilation, groups)
        Sc, _, Hc, Wc = ys.shape
        sel = idx.view(Sc, 1, 1, 1, 1, 1).expand(Sc, groups, 1, cg, Hc, Wc)
        return ys.unflatten(1, (groups, N, cg)).gather(2, sel).reshape(Sc, C_o, Hc, Wc)

    if chunk >= S:
        return conv_gather(x, expert_idx)
    return torch.cat([conv_gather(x[i:i + chunk], expert_idx[i:i + chunk]) for i in range(0, S, chunk)])


def own_expert_conv(x, w_experts, expert_idx, stride, padding, dilation, groups):
    """stacked_expert_conv's result with each sample's own expert only: the samples as groups of ONE grouped
    conv (S*groups groups, each sample's weight gathered: [S, C_o, C_in/g, kh, kw]); 1/N of its FLOPs, no
    N-fold intermediate, differentiable (autograd: the weight gradient scatter-added to the experts)."""
    S, C_in = x.shape[:2]
    C_o = w_experts.shape[1]
    w = w_experts[expert_idx].to(x.dtype)  # [S, C_o, C_in/g, kh, kw]
    y = F.conv2d(x.reshape(1, S * C_in, *x.shape[2:]), w.reshape(S * C_o, *w.shape[2:]), None, stride, padding,
                 dilation, S * groups)
    return y.view(S, C_o, *y.shape[2:])


def block_diag_B(B: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1x1 conv weight B [N, C_out, r/g] -> dense block-diagonal [N, C_out, r] (differentiable)."""
    if groups == 1:
        return B
    N, C_out, rg = B.shape
    r = rg * groups
    rep = B.repeat(1, 1, groups)  # column j holds B[:, :, j % rg]
    og = torch.arange(C_out, device=B.device) // (C_out // groups)
    jg = torch.arange(r, device=B.device) // rg
    mask = (og[:, None] == jg[None, :]).to(B.dtype)
    return rep * mask


# ----------------------------------------------------------------------------- raw SGMV (kernel contract)
def _expert_of_sample(sorted_idx, offsets):
    N = offsets.numel() - 1
    counts = (offsets[1:] - offsets[:-1]).long()
    e_sorted = torch.repeat_interleave(torch.arange(N, device=offsets.device), counts)
    idx = torch.empty(sorted_idx.numel(), dtype=torch.long, device=sorted_idx.device)
    idx[sorted_idx.long()] = e_sorted
    return idx


def sgmv_shrink(x, A, out, sorted_idx, offsets):
    """Reference of launch_sgmv_shrink: out[s, m, :] = x[s, m, :] @ A[e(s)].T (written)."""
    idx = _expert_of_sample(sorted_idx, offsets)
    out.copy_(torch.bmm(x, A[idx].transpose(1, 2)))
    return out


def sgmv_expand(h, B, out, sorted_idx, offsets, scale):
    """Reference of launch_sgmv_expand: out[s, m, :] += scale * h[s, m, :] @ B[e(s)].T."""
    idx = _expert_of_sample(sorted_idx, offsets)
    out.add_(torch.bmm(h, B[idx].transpose(1, 2)), alpha=scale)
    return out


def seg_outer(u, v, out, sorted_idx, offsets, alpha=1.0, split=0):
    """Reference of launch_seg_outer: out[e] = alpha * sum over segment e's rows of u^T v
    (u [S, M, P], v [S, M, Q], out [N, P, Q]; written, zeros for empty experts; split ignored).
    The backward in these terms (dy [S, M, NOUT], h = x A_e^T):
      dh = s * shrink(dy, B^T), dx = dy W + expand(dh, A^T, 1), dA = seg_outer(dh, x), dB = seg_outer(dy, h, s)."""
    N = offsets.numel() - 1
    idx = _expert_of_sample(sorted_idx, offsets)
    per_sample = torch.bmm(u.transpose(1, 2).to(torch.float64), v.to(torch.float64))  # [S, P, Q]
    acc = torch.zeros((N,) + tuple(per_sample.shape[1:]), dtype=torch.float64, device=u.device)
    acc.index_add_(0, idx, per_sample)
    out.copy_(alpha * acc)
    return out


__all__ = [
    "block_diag_B", "sgmv_shrink", "sgmv_expand", "seg_outer",
    "lora_linear", "lora_conv2d", "lora_conv_delta", "loralib_conv_delta", "lora_conv2d_delta",
]
