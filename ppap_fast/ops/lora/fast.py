"""Fast (segment-based) multi-expert LoRA ops as ``torch.autograd.Function``s.

Forward uses the SGMV shrink/expand kernels (Triton, or the CUDA ones when
``fwd="cuda"`` / ``"cuda_full"``); backward uses the Triton kernels on transposed views,
or with ``fwd="cuda_full"`` the CUDA shrink/expand on contiguous transposed weights and the
CUDA seg_outer (the scale folded into the expand / seg_outer alpha instead of dh):

    y   = x W^T + b + eb[e] + s * (x A_e^T) B_e^T       h  = x A_e^T           (shrink)
    dh  = s * dy B_e                                    (shrink with B_e^T as the weight)
    dx  = dy W + dh A_e                                 (expand with A_e^T, added into dy W)
    dA_e = dh_e^T x_e,  dB_e = s * dy_e^T h_e,  deb_e = sum of dy_e   (segment outer products)

W and the shared bias are frozen: their gradients are never computed.

Convolutions (factorised layout): the A stage (a conv with the base conv's
geometry, r output channels per expert) runs as ONE cuDNN conv with every
expert's A stacked (N*r output channels), followed by a per-sample gather of the
sample's own r channels; autograd (cuDNN) gives its dx and dA. Why: it is
sync-free, graph-capturable and uses the fastest conv kernels available; the
extra work is N*r/C_out of the base conv (e.g. 5*16/256 = 0.31x for a ResNet 3x3
conv at N=5), cheaper than im2col + SGMV, whose unfold traffic is k*k times the
input (9x for 3x3) and which cannot use implicit-GEMM conv kernels. The B stage
(grouped 1x1 conv = per-expert linear over channels, block-diagonal for
groups > 1) is an SGMV expand that reads the NCHW output as rows in place and
adds into the base conv output; its backward is shrink + segment outer product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._kernel_util import autocast_input, first_order_only, new_buffer, on_device
from . import triton_kernels as tk
from . import reference
from .reference import block_diag_B, stacked_expert_conv  # noqa: F401  (pure torch; block_diag_B also for cpp)
from .segments import Segments, saved_for_backward
from .triton_conv import IN_BASE_MAX_RANK


def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """Buffers the kernels fully overwrite. With POISON on (tests), they start as NaN."""
    return new_buffer(shape, dtype or like.dtype, like.device, POISON or tk.POISON)


POISON = False


def _fwd_kernels(fwd: str):
    if fwd in ("cuda", "cuda_full"):
        from . import cuda_ops

        return cuda_ops.sgmv_shrink, cuda_ops.sgmv_expand
    return tk.sgmv_shrink, tk.sgmv_expand


def _cuda_seg_outer(u, v, seg: Segments, alpha: float, out_dtype: torch.dtype, N: int):
    """CUDA seg_outer into a new [N, P, Q] tensor of out_dtype (u's dtype or float32 directly,
    any other dtype through a float32 buffer)."""
    from . import cuda_ops

    direct = out_dtype in (u.dtype, torch.float32)
    out = _alloc((N, u.shape[2], v.shape[2]), u, dtype=out_dtype if direct else torch.float32)
    cuda_ops.seg_outer(u, v, out, seg.sorted_idx, seg.offsets, alpha, 0)
    return out if direct else out.to(out_dtype)


def _expert_bias_grad(dy3: torch.Tensor, expert_idx: torch.Tensor, N: int, like: torch.Tensor):
    """dy3 [S, M, C] (any strides) -> [N, C]: the per-sample sums of each expert's samples; sync-free.
    On the CPU index_add (it adds in sample order); elsewhere, or with deterministic algorithms on, a
    masked sum over S (fixed order, bitwise reproducible; index_add on CUDA adds with atomics)."""
    per_sample = dy3.sum(dim=1, dtype=torch.float32)
    if dy3.device.type == "cpu" and not torch.are_deterministic_algorithms_enabled():
        g = torch.zeros((N, per_sample.shape[1]), dtype=torch.float32, device=dy3.device)
        g.index_add_(0, expert_idx, per_sample)
    else:  # where, not a 0/1 product: a non-finite sum stays in its own expert's row
        experts = torch.arange(N, device=expert_idx.device, dtype=expert_idx.dtype)
        mine = (expert_idx.unsqueeze(0) == experts.unsqueeze(1)).unsqueeze(2)  # [N, S, 1]
        g = torch.where(mine, per_sample.unsqueeze(0), 0.0).sum(dim=1)
    return g.to(like.dtype)


def _b_bias_grads(dy3, h3, seg: Segments, s: float, N: int, b_dt, eb_dt, need_b: bool, need_eb: bool,
                  cuda: bool):
    """The B-stage grads of every Function: dB_e = s * dy_e^T h_e ([N, C, r] of b_dt; CUDA or
    Triton seg_outer) and deb_e = sum of dy_e (eb_dt); None where not needed."""
    dB = deb = None
    if need_b:
        if cuda:
            dB = _cuda_seg_outer(dy3, h3, seg, s, b_dt, N)
        else:  # Triton: deb from the same kernel (the row sums of dy beside dB)
            dB = _alloc((N, dy3.shape[2], h3.shape[2]), dy3, dtype=b_dt)
            if need_eb:
                deb = _alloc((N, dy3.shape[2]), dy3, dtype=eb_dt if eb_dt in (torch.float32, dy3.dtype)
                             else torch.float32)
            tk.seg_outer(dy3, h3, dB, seg.sorted_idx, seg.offsets, s, u_sum=deb)
            if deb is not None and deb.dtype != eb_dt:
                deb = deb.to(eb_dt)
    if need_eb and deb is None:
        deb = _expert_bias_grad(dy3, seg.expert_idx, N, torch.empty(0, dtype=eb_dt))
    return dB, deb


# =============================================================================== linear
FUSED_LINEAR_MIN_ROWS = 16  # rows per sample from which the Triton forward runs as one per-sample kernel


def _rows_as_map(t3: torch.Tensor) -> torch.Tensor:
    """A [S, M, C] row tensor as the [S, C, 1, M] map view conv_lora_fwd reads (1x1 taps, no copy)."""
    return t3.transpose(1, 2).unsqueeze(2)


class LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, bias, A, B, expert_bias, seg: Segments, scale: float, fwd: str):
        S = x.shape[0]
        K = x.shape[-1]
        N, R, _ = A.shape
        NOUT = W.shape[0]
        cdt = x.dtype
        Wc = W.detach().to(cdt)
        Ac, Bc = A.detach().to(cdt), B.detach().to(cdt)
        x3 = x.reshape(S, -1, K)
        M = x3.shape[1]
        y = F.linear(x, Wc, None if bias is None else bias.detach().to(cdt))
        y3 = y.view(S, M, NOUT)
        shrink, expand = _fwd_kernels(fwd)
        h = _alloc((S, M, R), x)
        if fwd in ("cuda", "cuda_full"):
            shrink(x3, Ac, h, seg.sorted_idx, seg.offsets)
            expand(h, Bc, y3, seg.sorted_idx, seg.offsets, float(scale))
            if expert_bias is not None:
                y3 += expert_bias.detach().to(cdt)[seg.expert_idx].unsqueeze(1)
        elif M >= FUSED_LINEAR_MIN_ROWS:  # one kernel: h = x A_e^T and y += s h B_e^T (+ eb) per row tile
            tk.conv_lora_fwd(_rows_as_map(x3), Ac.unsqueeze(-1).unsqueeze(-1), Bc, _rows_as_map(y3), seg.expert_idx,
                             scale, expert_bias=None if expert_bias is None else expert_bias.detach(),
                             h_out=_rows_as_map(h))
        else:
            tk.sgmv_expand(tk.sgmv_shrink(x3, Ac, h, seg.sorted_idx, seg.offsets), Bc, y3, seg.sorted_idx,
                           seg.offsets, scale, bias=None if expert_bias is None else expert_bias.detach(),
                           accumulate=True)
        ctx.save_for_backward(x3, Wc, Ac, Bc, h, *saved_for_backward(seg))
        ctx.seg = seg
        ctx.scale = scale
        ctx.cuda_bwd = fwd == "cuda_full"
        ctx.meta = (x.shape, A.dtype, B.dtype, expert_bias is not None, None if expert_bias is None else expert_bias.dtype)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x3, Wc, Ac, Bc, h = ctx.saved_tensors[:5]  # (the rest: seg's, for autograd's in-place check)
        seg: Segments = ctx.seg
        s = ctx.scale
        x_shape, a_dt, b_dt, has_eb, eb_dt = ctx.meta
        S, M, K = x3.shape
        N, R, _ = Ac.shape
        NOUT = Wc.shape[0]
        dy3 = dy.reshape(S, M, NOUT)
        if dy3.dtype != x3.dtype:
            dy3 = dy3.to(x3.dtype)
        need_x, _, _, need_a, need_b, need_eb = ctx.needs_input_grad[:6]
        dx = dA = None
        if ctx.cuda_bwd:
            from . import cuda_ops

            # dh0 = dy B_e (unscaled: s is applied by the expand and by dA's alpha)
            if need_x or need_a:
                dh0 = _alloc((S, M, R), x3)
                cuda_ops.sgmv_shrink(dy3, Bc.transpose(1, 2).contiguous(), dh0, seg.sorted_idx, seg.offsets)
                if need_x:
                    dx = torch.matmul(dy3, Wc)
                    cuda_ops.sgmv_expand(dh0, Ac.transpose(1, 2).contiguous(), dx, seg.sorted_idx, seg.offsets, s)
                    dx = dx.view(x_shape)
                if need_a:
                    dA = _cuda_seg_outer(dh0, x3, seg, s, a_dt, N)
            dB, deb = _b_bias_grads(dy3, h, seg, s, N, b_dt, eb_dt, need_b, has_eb and need_eb, True)
            return dx, None, None, dA, dB, deb, None, None, None
        if need_x or need_a:
            dh = _alloc((S, M, R), x3)
            tk.sgmv_shrink(dy3, Bc.transpose(1, 2), dh, seg.sorted_idx, seg.offsets, s)
            if need_x and getattr(ctx, "in_base", False):  # dy W + dh A_e in one in-base dgrad kernel
                from . import triton_conv as tc

                dx = _alloc((S, M, K), x3)
                tc.conv_base_lora_dgrad(_rows_as_map(dy3), Wc[:, :, None, None], _rows_as_map(dx), seg.sorted_idx,
                                        seg.offsets, dh=_rows_as_map(dh), A=Ac[..., None, None])
                dx = dx.view(x_shape)
            elif need_x:
                dx = torch.matmul(dy3, Wc)  # [S, M, K] dense base part
                tk.sgmv_expand(dh, Ac.transpose(1, 2), dx, seg.sorted_idx, seg.offsets, 1.0, accumulate=True)
                dx = dx.view(x_shape)
            if need_a:
                dA = _alloc((N, R, K), x3, dtype=a_dt)
                tk.seg_outer(dh, x3, dA, seg.sorted_idx, seg.offsets, 1.0)
        dB, deb = _b_bias_grads(dy3, h, seg, s, N, b_dt, eb_dt, need_b, has_eb and need_eb, False)
        return dx, None, None, dA, dB, deb, None, None, None


def _in_base_bias(bias, n: int):
    """bias [n] (detached; the public ops refuse other shapes) as the contiguous vector the in-base kernels read
    at bias + o: they take no stride (a strided bias, e.g. a column of a table, read other values)."""
    if bias is None:
        return None
    assert tuple(bias.shape) == (n,), (tuple(bias.shape), n)
    return bias.detach().contiguous()


class LoraLinearInBaseFn(LoraLinearFn):
    """in_base for a linear layer (r <= 64): the rows as a 1 x M map and W as a 1x1 conv through the
    in-base kernels (triton_conv.py), every operand read in place. Forward one kernel (x tiles feed W
    and the tile's expert's A; y and h written); backward LoraLinearFn's Triton one with dx = dy W +
    dh A_e in one ``conv_base_lora_dgrad``."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, expert_bias, seg: Segments, scale: float, fwd: str):
        from . import triton_conv as tc

        S, K = x.shape[0], x.shape[-1]
        N, R, _ = A.shape
        NOUT = W.shape[0]
        cdt = x.dtype
        Wc, Ac, Bc = W.detach().to(cdt), A.detach().to(cdt), B.detach().to(cdt)
        x3 = x.reshape(S, -1, K)
        M = x3.shape[1]
        y3 = _alloc((S, M, NOUT), x)
        h = _alloc((S, M, R), x)
        tc.conv_base_lora_fwd(_rows_as_map(x3), Wc[:, :, None, None], _rows_as_map(y3), seg.sorted_idx, seg.offsets,
                              bias=_in_base_bias(bias, NOUT), A=Ac[..., None, None], B=Bc,
                              scale=scale, expert_bias=None if expert_bias is None else expert_bias.detach(),
                              h_out=_rows_as_map(h))
        ctx.save_for_backward(x3, Wc, Ac, Bc, h, *saved_for_backward(seg))
        ctx.seg, ctx.scale, ctx.cuda_bwd, ctx.in_base = seg, scale, False, True
        ctx.meta = (x.shape, A.dtype, B.dtype, expert_bias is not None, None if expert_bias is None else expert_bias.dtype)
        return y3.view(*x.shape[:-1], NOUT)


def lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias=None, seg: Segments | None = None,
                fwd: str = "triton", a_stage: str = "default"):
    with on_device(x):  # Triton launches on the current device: make it x's
        return _lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias, seg, fwd, a_stage)


def _lora_linear(x, W, bias, A, B, expert_idx, scale, expert_bias, seg, fwd, a_stage):
    from .segments import build_segments

    seg = seg if seg is not None else build_segments(expert_idx, A.shape[0])
    x, no_autocast = autocast_input(x)
    with no_autocast:
        if a_stage == "in_base" and A.shape[1] <= IN_BASE_MAX_RANK:
            return LoraLinearInBaseFn.apply(x, W, bias, A, B, expert_bias, seg, float(scale), fwd)
        return LoraLinearFn.apply(x, W, bias, A, B, expert_bias, seg, float(scale), fwd)


# =============================================================================== conv
def stacked_a_conv(x, A, expert_idx, stride, padding, dilation, groups):
    """One conv with every expert's A stacked, then each sample keeps its own expert's
    channels. A [N, r, C_in/g, kh, kw] -> h [S, r, Ho, Wo]. Differentiable (autograd)."""
    return stacked_expert_conv(x, A, expert_idx, stride, padding, dilation, groups)


def grouped_a_conv(x, A, expert_idx, stride, padding, dilation, groups):
    """Per-sample A conv as one grouped conv (S*g groups): exact FLOPs, no N-fold waste."""
    S, C_in, H, Wd = x.shape
    N, r = A.shape[:2]
    Ai = A[expert_idx].to(x.dtype).reshape(S * r, *A.shape[2:])
    h = F.conv2d(x.reshape(1, S * C_in, H, Wd), Ai, None, stride, padding, dilation, groups * S)
    return h.view(S, r, h.shape[-2], h.shape[-1])


class LoraConvBFn(torch.autograd.Function):
    """y = conv(x, W, bias) + scale * B_e h + eb[e], with h [S, r, Ho, Wo] given (A stage done)."""

    @staticmethod
    def forward(ctx, x, h, Bd, expert_bias, W, bias, seg: Segments, scale, stride, padding, dilation, groups, fwd):
        cdt = x.dtype
        Wc = W.detach().to(cdt)
        y = F.conv2d(x, Wc, None if bias is None else bias.detach().to(cdt), stride, padding, dilation, groups)
        S, C_out, Ho, Wo = y.shape
        P = Ho * Wo
        r = h.shape[1]
        y3 = y.view(S, C_out, P).transpose(1, 2)
        hc = h.contiguous()
        h3 = hc.view(S, r, P).transpose(1, 2)
        Bc = Bd.detach().to(cdt)
        if fwd in ("cuda", "cuda_full"):
            from . import cuda_ops

            cuda_ops.sgmv_expand(h3, Bc, y3, seg.sorted_idx, seg.offsets, float(scale))
            if expert_bias is not None:
                y += expert_bias.detach().to(cdt)[seg.expert_idx][:, :, None, None]
        else:
            tk.sgmv_expand(h3, Bc, y3, seg.sorted_idx, seg.offsets, scale,
                           bias=None if expert_bias is None else expert_bias.detach(), accumulate=True)
        ctx.save_for_backward(x, hc, Bc, Wc, *saved_for_backward(seg))
        ctx.seg, ctx.scale = seg, scale
        ctx.geom = (stride, padding, dilation, groups)
        ctx.cuda_bwd = fwd == "cuda_full"
        ctx.meta = (Bd.dtype, expert_bias is not None, None if expert_bias is None else expert_bias.dtype)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, hc, Bc, Wc = ctx.saved_tensors[:4]
        seg, s = ctx.seg, ctx.scale
        stride, padding, dilation, groups = ctx.geom
        b_dt, has_eb, eb_dt = ctx.meta
        dy = dy.contiguous()
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        S, C_out, Ho, Wo = dy.shape
        P = Ho * Wo
        r = hc.shape[1]
        N = Bc.shape[0]
        dy3 = dy.view(S, C_out, P).transpose(1, 2)
        h3 = hc.view(S, r, P).transpose(1, 2)
        need_x, need_h, need_b, need_eb = ctx.needs_input_grad[:4]
        dx = dh = None
        if need_x:
            dx = torch.ops.aten.convolution_backward(
                dy, x, Wc, None, _pair(stride), _pair(padding), _pair(dilation), False, [0, 0], groups,
                [True, False, False])[0]
        if need_h:
            dh = _alloc((S, r, Ho, Wo), x)
            dh3 = dh.view(S, r, P).transpose(1, 2)
            if ctx.cuda_bwd:
                from . import cuda_ops

                Bts = torch.empty((N, r, C_out), dtype=Bc.dtype, device=Bc.device)
                torch.mul(Bc.transpose(1, 2), s, out=Bts)  # s B^T, contiguous, one kernel
                cuda_ops.sgmv_shrink(dy3, Bts, dh3, seg.sorted_idx, seg.offsets)
            else:
                tk.sgmv_shrink(dy3, Bc.transpose(1, 2), dh3, seg.sorted_idx, seg.offsets, s)
        dB, deb = _b_bias_grads(dy3, h3, seg, s, N, b_dt, eb_dt, need_b, has_eb and need_eb, ctx.cuda_bwd)
        return dx, dh, dB, deb, None, None, None, None, None, None, None, None, None


def _keep_conv_ctx(ctx, seg, scale, geom, fwd, A, B, expert_bias):
    """What the backward of an A-stage Function (fused, implicit) reads besides its saved tensors."""
    ctx.seg, ctx.scale, ctx.geom = seg, scale, geom
    ctx.cuda_bwd = fwd == "cuda_full"
    ctx.meta = (A.dtype, B.dtype, expert_bias is not None, None if expert_bias is None else expert_bias.dtype)


def _conv_format(t: torch.Tensor):
    """The memory format a conv output over t has (channels_last stays channels_last)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _alloc_fmt(shape, like: torch.Tensor, fmt) -> torch.Tensor:
    return _alloc(shape, like).contiguous(memory_format=fmt) if fmt != torch.contiguous_format else _alloc(shape, like)


class LoraConvFusedFn(torch.autograd.Function):
    """a_stage="fused" (groups == 1): the base conv and the stacked A conv are ONE conv with
    weight [W; A_0; ...; A_{N-1}] (C_out + N*r output channels). One Triton expand then reads the
    base channels (as its accumulate source) and each sample's own expert's r channels (expert
    stride), writes y (a fresh tensor in the conv's memory format: no split copy) with the LoRA
    term and both biases, and copies the compact h for the backward.
    Backward: G = [dy | dh_stacked] (dh written by one shrink into the sample's own expert's
    channels, zeros into the others), ONE convolution_backward for dx with the same weight, one
    weight-grad over G's stacked channels for dA, seg_outer for dB."""

    @staticmethod
    def forward(ctx, x, A, B, expert_bias, W, bias, seg: Segments, scale, stride, padding, dilation, fwd):
        cdt = x.dtype
        N, r = A.shape[:2]
        C_out = W.shape[0]
        Wcat = torch.cat([W.detach().to(cdt), A.detach().to(cdt).reshape(N * r, *A.shape[2:])])
        out = F.conv2d(x, Wcat, None, stride, padding, dilation, 1)
        S, _, Ho, Wo = out.shape
        P = Ho * Wo
        o3 = out.flatten(2).transpose(1, 2)  # [S, P, C_out + N*r], a view in either memory format
        y = _alloc_fmt((S, C_out, Ho, Wo), x, _conv_format(out))
        hc = _alloc((S, r, Ho, Wo), x)
        Bc = B.detach().to(cdt)
        eb = None if expert_bias is None else expert_bias.detach()
        if bias is not None:  # base bias folded into the per-expert bias (alone: a stride-0 view)
            bb = bias.detach()
            eb = bb.expand(N, C_out) if eb is None else eb + bb
        tk.sgmv_expand(o3[:, :, C_out:C_out + r], Bc, y.flatten(2).transpose(1, 2), seg.sorted_idx, seg.offsets,
                       scale, bias=eb, accumulate=True, src=o3[:, :, :C_out], h_expert_stride=r * o3.stride(2),
                       h_out=hc.view(S, r, P).transpose(1, 2))
        ctx.save_for_backward(x, hc, Bc, Wcat, *saved_for_backward(seg))
        _keep_conv_ctx(ctx, seg, scale, (stride, padding, dilation), fwd, A, B, expert_bias)
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, hc, Bc, Wcat = ctx.saved_tensors[:4]
        seg, s = ctx.seg, ctx.scale
        stride, padding, dilation = ctx.geom
        a_dt, b_dt, has_eb, eb_dt = ctx.meta
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        S, C_out, Ho, Wo = dy.shape
        P = Ho * Wo
        r = hc.shape[1]
        N = Bc.shape[0]
        dy3 = dy.flatten(2).transpose(1, 2)
        h3 = hc.view(S, r, P).transpose(1, 2)
        need_x, need_a, need_b, need_eb = ctx.needs_input_grad[:4]
        dx = dA = None
        geo = (_pair(stride), _pair(padding), _pair(dilation), False, [0, 0], 1)
        if need_x or need_a:
            G = _alloc_fmt((S, C_out + N * r, Ho, Wo), x, _conv_format(x))
            G[:, :C_out].copy_(dy)
            g3 = G.flatten(2).transpose(1, 2)
            tk.sgmv_shrink(dy3, Bc.transpose(1, 2), g3[:, :, C_out:C_out + r], seg.sorted_idx, seg.offsets, s,
                           out_expert_stride=r * g3.stride(2), zero_others=True)
            if need_x:
                dx = torch.ops.aten.convolution_backward(G, x, Wcat, None, *geo, [True, False, False])[0]
            if need_a:
                dA = torch.ops.aten.convolution_backward(G[:, C_out:], x, Wcat[C_out:], None, *geo,
                                                         [False, True, False])[1]
                dA = dA.reshape(N, r, *dA.shape[1:]).to(a_dt)
        dB, deb = _b_bias_grads(dy3, h3, seg, s, N, b_dt, eb_dt, need_b, has_eb and need_eb, ctx.cuda_bwd)
        return dx, dA, dB, deb, None, None, None, None, None, None, None, None


class LoraConvImplicitFn(torch.autograd.Function):
    """a_stage="implicit" (groups == 1): the base conv is cuDNN's; the whole LoRA share is ONE
    Triton kernel per direction, no N-fold stacked A conv and no h round trip before the expand:
    forward ``conv_lora_fwd`` (h = conv(x, A_e) as an implicit GEMM over the sample's own expert
    only, then y += s B_e h + eb[e] for every output channel, h kept for dB); backward dh = s B_e^T dy
    (one shrink), dx = cuDNN dgrad + ``conv_lora_dgrad`` (conv_transpose(dh, A_e) added in place),
    dA by ``conv_lora_wgrad`` (each expert's weight gradient over its own samples: exact FLOPs, no
    N-fold stacked gradient), dB by seg_outer."""

    @staticmethod
    def forward(ctx, x, A, B, expert_bias, W, bias, seg: Segments, scale, stride, padding, dilation, fwd,
                a_blocks=1):
        from .triton_conv import lora_a_for_tiles

        cdt = x.dtype
        N, r = A.shape[:2]
        Wc = W.detach().to(cdt)
        # A with the rank contiguous ([N, kh, kw, C, R] in memory): the forward's [C, R] and the dgrad's
        # [R, C] tiles load whole rank rows (vector loads the pipeliner can make asynchronous) instead of
        # elements kh*kw apart; one small copy per forward, shared with the backward
        Ac, Bc = lora_a_for_tiles(A.detach(), cdt), B.detach().to(cdt)
        y = F.conv2d(x, Wc, None if bias is None else bias.detach().to(cdt), stride, padding, dilation, 1)
        S, C_out, Ho, Wo = y.shape
        hc = _alloc((S, r, Ho, Wo), x)
        tk.conv_lora_fwd(x, Ac, Bc, y, seg.expert_idx, scale, stride, padding, dilation,
                         None if expert_bias is None else expert_bias.detach(), hc, a_blocks=a_blocks)
        ctx.save_for_backward(x, hc, Ac, Bc, Wc, *saved_for_backward(seg))
        _keep_conv_ctx(ctx, seg, scale, (stride, padding, dilation), fwd, A, B, expert_bias)
        ctx.a_blocks = a_blocks
        return y

    @staticmethod
    @first_order_only
    def backward(ctx, dy):
        x, hc, Ac, Bc, Wc = ctx.saved_tensors[:5]
        seg, s = ctx.seg, ctx.scale
        stride, padding, dilation = ctx.geom
        a_dt, b_dt, has_eb, eb_dt = ctx.meta
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        S, C_out, Ho, Wo = dy.shape
        N, r = Ac.shape[:2]
        dy3 = dy.flatten(2).transpose(1, 2)
        h3 = hc.flatten(2).transpose(1, 2)
        need_x, need_a, need_b, need_eb = ctx.needs_input_grad[:4]
        dx = dA = None
        if need_x or need_a:
            fmt = _conv_format(x)
            dh = _alloc_fmt((S, r, Ho, Wo), x, fmt)
            tk.sgmv_shrink(dy3, Bc.transpose(1, 2), dh.flatten(2).transpose(1, 2), seg.sorted_idx, seg.offsets, s)
            if need_x and getattr(ctx, "in_base", False) and tk._conv_geometry(stride, padding, dilation)[0] == (1, 1):
                from . import triton_conv as tc  # dy against W and dh against A_e in one dgrad GEMM

                dx = _alloc_fmt(tuple(x.shape), x, fmt)
                tc.conv_base_lora_dgrad(dy, Wc, dx, seg.sorted_idx, seg.offsets, stride, padding, dilation, dh, Ac)
            elif need_x:  # cuDNN's dgrad + the LoRA share (strided in_base too: most taps miss an input pixel)
                geo = (_pair(stride), _pair(padding), _pair(dilation), False, [0, 0], 1)
                dx = torch.ops.aten.convolution_backward(dy, x, Wc, None, *geo, [True, False, False])[0]
                tk.conv_lora_dgrad(dh, Ac, dx, seg.expert_idx, stride, padding, dilation, a_blocks=ctx.a_blocks)
            if need_a:
                direct = a_dt in (x.dtype, torch.float32)
                dA = _alloc(Ac.shape, x, dtype=a_dt if direct else torch.float32)
                tk.conv_lora_wgrad(x, dh, dA, seg.sorted_idx, seg.offsets, stride, padding, dilation,
                                   a_blocks=ctx.a_blocks)
                dA = dA if direct else dA.to(a_dt)
        dB, deb = _b_bias_grads(dy3, h3, seg, s, N, b_dt, eb_dt, need_b, has_eb and need_eb, ctx.cuda_bwd)
        return dx, dA, dB, deb, None, None, None, None, None, None, None, None, None


class LoraConvInBaseFn(LoraConvImplicitFn):
    """a_stage="in_base" (groups == 1, r <= 64): the base conv and its LoRA in the same Triton
    implicit-GEMM kernels (triton_conv.py): forward ``conv_base_lora_fwd`` (the x tiles feed W and
    the tile's expert's A; y and h written in x's memory format); backward LoraConvImplicitFn's with
    dx = ``conv_base_lora_dgrad`` (dy against W and dh against A_e in one GEMM; stride 1, else cuDNN
    dgrad + conv_lora_dgrad)."""

    @staticmethod
    def forward(ctx, x, A, B, expert_bias, W, bias, seg: Segments, scale, stride, padding, dilation, fwd,
                a_blocks=1):
        from . import triton_conv as tc

        cdt = x.dtype
        Wk = tc.weight_for_tiles(W.detach(), cdt)
        Ak, Bc = tc.lora_a_for_tiles(A.detach(), cdt), B.detach().to(cdt)
        (sh, sw), (ph, pw), (dh_, dw_) = tk._conv_geometry(stride, padding, dilation)
        S, _, H, Wd = x.shape
        C_out, _, KH, KW = W.shape
        Ho, Wo = (H + 2 * ph - dh_ * (KH - 1) - 1) // sh + 1, (Wd + 2 * pw - dw_ * (KW - 1) - 1) // sw + 1
        fmt = _conv_format(x)
        y = _alloc_fmt((S, C_out, Ho, Wo), x, fmt)
        hc = _alloc_fmt((S, A.shape[1], Ho, Wo), x, fmt)
        tc.conv_base_lora_fwd(x, Wk, y, seg.sorted_idx, seg.offsets, stride, padding, dilation,
                              _in_base_bias(bias, C_out), Ak, Bc, scale,
                              None if expert_bias is None else expert_bias.detach(), hc)
        ctx.save_for_backward(x, hc, Ak, Bc, Wk, *saved_for_backward(seg))
        _keep_conv_ctx(ctx, seg, scale, (stride, padding, dilation), fwd, A, B, expert_bias)
        ctx.a_blocks, ctx.in_base = 1, True
        return y


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)


def fused_fits(x, W, A, stride, padding, dilation) -> bool:
    """Whether the fused A stage's [S, C_out + N*r, Ho, Wo] conv output (and its gradient) stays within
    reference.MAX_INTERMEDIATE_NUMEL; else the stacked A stage runs (it splits the batch)."""
    Ho, Wo = reference.conv_out_hw(x.shape[-2:], W.shape[-2:], stride, padding, dilation)
    return x.shape[0] * (W.shape[0] + A.shape[0] * A.shape[1]) * Ho * Wo <= reference.MAX_INTERMEDIATE_NUMEL


def lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride=1, padding=0, dilation=1, groups=1,
                expert_bias=None, seg: Segments | None = None, fwd: str = "triton", a_stage: str = "stacked",
                a_blocks: int = 1):
    with on_device(x):  # Triton launches on the current device: make it x's
        return _lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups, expert_bias,
                            seg, fwd, a_stage, a_blocks)


def _lora_conv2d(x, W, bias, A, B, expert_idx, scale, stride, padding, dilation, groups, expert_bias, seg, fwd,
                 a_stage, a_blocks):
    from .segments import build_segments

    N = A.shape[0]
    seg = seg if seg is not None else build_segments(expert_idx, N)
    x, no_autocast = autocast_input(x)
    if a_stage == "in_base" and groups == 1 and a_blocks == 1 and A.shape[1] <= IN_BASE_MAX_RANK:
        with no_autocast:
            return LoraConvInBaseFn.apply(x, A, B, expert_bias, W, bias, seg, float(scale), stride, padding,
                                          dilation, fwd, 1)
    if a_stage == "in_base":  # a blocked A or a rank over the in-base tile: the implicit kernels
        a_stage = "implicit"
    if a_stage == "fused" and groups == 1 and fused_fits(x, W, A, stride, padding, dilation):
        with no_autocast:
            return LoraConvFusedFn.apply(x, A, B, expert_bias, W, bias, seg, float(scale), stride, padding,
                                         dilation, fwd)
    if a_stage == "implicit" and groups == 1 and A.shape[1] // a_blocks <= tk.IMPLICIT_MAX_RANK:
        with no_autocast:
            return LoraConvImplicitFn.apply(x, A, B, expert_bias, W, bias, seg, float(scale), stride, padding,
                                            dilation, fwd, int(a_blocks))
    if a_stage in ("stacked", "fused", "implicit"):  # fused / implicit otherwise run the stacked path
        h = stacked_a_conv(x, A, seg.expert_idx, stride, padding, dilation, groups)
    elif a_stage == "grouped":
        h = grouped_a_conv(x, A, seg.expert_idx, stride, padding, dilation, groups)
    else:
        raise ValueError(f"a_stage must be 'stacked', 'fused', 'implicit', 'in_base' or 'grouped', got {a_stage!r}")
    Bd = block_diag_B(B, groups)
    with no_autocast:
        return LoraConvBFn.apply(x, h, Bd, expert_bias, W, bias, seg, float(scale), stride, padding, dilation,
                                 groups, fwd)
