"""Parity tests for ppap_fast.ops.lora: every fast path vs the float64 reference.

CPU: Triton runs under TRITON_INTERPRET=1 (set by conftest when no GPU) with tiny
shapes. CUDA (``pytest tests/test_lora_ops.py -m cuda``): the same fuzz on the
GPU for Triton and the CUDA SGMV forward, fp32/fp16/bf16, plus CUDA-graph capture.
Buffers the kernels write are POISONED with NaN first; NaN never passes.
"""
from __future__ import annotations

import os
import random
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from ppap_fast.ops import lora as L
from ppap_fast.ops.lora import fast, reference as R, triton_conv as TC, triton_kernels as TK
from ppap_fast.ops.lora import cpp as CPP
from ppap_fast.ops.lora.segments import build_segments

from _util import LaunchRecorder, assert_grid_within_cuda_limits, capture_cuda_graph

HAS_CUDA = torch.cuda.is_available()
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _poison_and_precision():
    old = (fast.POISON, TK.POISON, CPP.POISON, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    fast.POISON = TK.POISON = CPP.POISON = True
    torch.backends.cudnn.allow_tf32 = False  # fp32 parity: no TF32 convs in the base/A stage
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    fast.POISON, TK.POISON, CPP.POISON, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def assert_close(name, got, want, tol):
    err = rel_err(got, want)
    assert err == err and err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} (NaN fails)"


def _cuda_backend_ready() -> bool:
    if not HAS_CUDA:
        return False
    from ppap_fast.ops.lora import cuda_ops

    if cuda_ops._registered() is not None:
        return True
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return False
    cuda_ops.load_jit()  # a build failure with nvcc present is a test failure
    return True


def device_backends():
    """(device, backend) pairs with fast paths to test."""
    out = []
    if INTERP:
        out.append(pytest.param("cpu", "triton", id="cpu-triton"))
    out.append(pytest.param("cuda", "triton", id="cuda-triton", marks=cuda_only))
    out.append(pytest.param("cuda", "cuda", id="cuda-cuda", marks=cuda_only))
    out.append(pytest.param("cuda", "cuda_full", id="cuda-cuda_full", marks=cuda_only))  # CUDA backward
    out.append(pytest.param("cpu", "cpp", id="cpu-cpp"))  # C++ autograd over the segment ops
    out.append(pytest.param("cuda", "cpp", id="cuda-cpp", marks=cuda_only))
    return out


def _cpp_ready(device) -> bool:
    return CPP.why_unavailable(torch.device(device), torch.float32) is None


def _maybe_skip(device, backend, dtype):
    if backend == "cpp" and not _cpp_ready(device):
        pytest.skip(f"cpp backend: {CPP.why_unavailable(torch.device(device), dtype)}")
    if backend in ("cuda", "cuda_full") and not _cuda_backend_ready():
        pytest.skip("CUDA SGMV kernels neither registered nor buildable (no nvcc)")
    if backend == "cuda_full":
        from ppap_fast.ops.lora import cuda_ops

        # built with nvcc present, the backward kernels must be there: a stale build fails
        assert cuda_ops.why_unavailable(backward=True) is None, cuda_ops.why_unavailable(backward=True)
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 not exercised under the Triton interpreter")


def expert_mix(rng: random.Random, S: int, N: int, kind: str) -> torch.Tensor:
    if kind == "one":
        return torch.full((S,), rng.randrange(N), dtype=torch.long)
    if kind == "empty":  # a strict subset of experts used (when N > 1)
        used = rng.sample(range(N), max(1, N // 2))
        return torch.tensor([rng.choice(used) for _ in range(S)], dtype=torch.long)
    return torch.tensor([rng.randrange(N) for _ in range(S)], dtype=torch.long)


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


# ============================================================================ segments
def test_build_segments_matches_python():
    rng = random.Random(5)
    for _ in range(20):
        N = rng.randint(1, 10)
        S = rng.randint(1, 30)
        idx = torch.tensor([rng.randrange(N) for _ in range(S)])
        seg = build_segments(idx, N)
        order = sorted(range(S), key=lambda i: (int(idx[i]), i))
        assert seg.sorted_idx.tolist() == order
        counts = [int((idx == e).sum()) for e in range(N)]
        assert seg.counts.tolist() == counts
        assert seg.offsets.tolist() == [sum(counts[:e]) for e in range(N + 1)]
        # reuse of fixed buffers gives the same answer for a new routing
        idx2 = torch.tensor([rng.randrange(N) for _ in range(S)])
        seg2 = build_segments(idx2, N, out=seg)
        assert seg2.sorted_idx.data_ptr() == seg.sorted_idx.data_ptr()
        assert seg2.offsets.tolist() == build_segments(idx2, N).offsets.tolist()


# ============================================================================ raw kernels
@pytest.mark.parametrize("device,backend", device_backends())
def test_sgmv_kernels_raw(device, backend):
    rng = random.Random(11)
    for dtype in _dtypes(device):
        _maybe_skip(device, backend, dtype)
        for case in range(3):
            N, S, M = rng.randint(1, 10), rng.randint(1, 6), rng.randint(1, 9)
            K, Rr, NO = rng.randint(1, 70), rng.randint(1, 32), rng.randint(1, 70)
            idx = expert_mix(rng, S, N, ["one", "empty", "rand"][case % 3]).to(device)
            seg = build_segments(idx, N)
            x = torch.randn(S, M, K, device=device).to(dtype)
            A = torch.randn(N, Rr, K, device=device).to(dtype)
            B = torch.randn(N, NO, Rr, device=device).to(dtype)
            h = torch.full((S, M, Rr), float("nan"), device=device, dtype=dtype)
            y0 = torch.randn(S, M, NO, device=device).to(dtype)
            y = y0.clone()
            if backend == "cuda":
                from ppap_fast.ops.lora import cuda_ops
                cuda_ops.sgmv_shrink(x, A, h, seg.sorted_idx, seg.offsets)
                cuda_ops.sgmv_expand(h, B, y, seg.sorted_idx, seg.offsets, 0.75)
            elif backend == "cpp":  # the registered ops: CPU version on CPU, CUDA kernels on CUDA
                torch.ops.ppap_fast.lora_sgmv_shrink(x, A, h, seg.sorted_idx, seg.offsets)
                torch.ops.ppap_fast.lora_sgmv_expand(h, B, y, seg.sorted_idx, seg.offsets, 0.75)
            else:
                TK.sgmv_shrink(x, A, h, seg.sorted_idx, seg.offsets)
                TK.sgmv_expand(h, B, y, seg.sorted_idx, seg.offsets, 0.75)
            ic = idx.cpu()
            h_ref = torch.bmm(x.cpu().double(), A.cpu().double()[ic].transpose(1, 2))
            y_ref = y0.cpu().double() + 0.75 * torch.bmm(h.cpu().double(), B.cpu().double()[ic].transpose(1, 2))
            assert_close(f"shrink {dtype}", h, h_ref, TOL[dtype])
            assert_close(f"expand {dtype}", y, y_ref, TOL[dtype])
            # the pure-torch reference of the raw kernel contract agrees too
            h_r = R.sgmv_shrink(x.cpu().double(), A.cpu().double(), torch.empty(S, M, Rr, dtype=torch.float64),
                                seg.sorted_idx.cpu(), seg.offsets.cpu())
            y_r = R.sgmv_expand(h.cpu().double(), B.cpu().double(), y0.cpu().double(), seg.sorted_idx.cpu(),
                                seg.offsets.cpu(), 0.75)
            assert_close("reference shrink", h_r, h_ref, 1e-12)
            assert_close("reference expand", y_r, y_ref, 1e-12)


def _triton_devices():
    return ([pytest.param("cpu", id="cpu")] if INTERP else []) + [pytest.param("cuda", id="cuda", marks=cuda_only)]


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("case", range(6))
def test_conv_lora_kernels_raw(device, case):
    """conv_lora_fwd / conv_lora_dgrad against per-sample torch convs (float64): asymmetric stride,
    padding and dilation, kernels 1/3/5/7, channels over several K / N tiles, rank up to 144 in the
    forward and above the dgrad's rank tile, both memory formats; h_out poisoned, y and dx updated
    in place."""
    rng = random.Random(100 + case)
    g = torch.Generator().manual_seed(case)
    for dtype in _dtypes(device) if device == "cuda" else [torch.float32]:
        k = [1, 3, 5, 7, 3, 3][case]
        st, pd, dl = (rng.choice([1, 2]), rng.choice([1, 2])), (rng.randint(0, 3), rng.randint(0, 2)), \
            ((1, 1) if k > 3 else (rng.choice([1, 2]), rng.choice([1, 2])))
        S, N, C, NOUT = rng.randint(1, 4), rng.randint(1, 6), rng.choice([3, 17, 40]), rng.choice([5, 33, 70])
        Rr = [16, 1, 5, 40, 144, 33][case]
        span = (k - 1) * max(dl) + 1
        H, W = rng.randint(span, span + 6), rng.randint(span, span + 5)
        fmt = torch.channels_last if case % 2 else torch.contiguous_format
        idx = torch.tensor([rng.randrange(N) for _ in range(S)])
        x = torch.randn(S, C, H, W, generator=g)
        A = torch.randn(N, Rr, C, k, k, generator=g) / (C * k * k) ** 0.5
        B = torch.randn(N, NOUT, Rr, generator=g) / Rr ** 0.5
        eb = torch.randn(N, NOUT, generator=g)
        Ho, Wo = F.conv2d(x, A[0], None, st, pd, dl).shape[2:]
        y0 = torch.randn(S, NOUT, Ho, Wo, generator=g)
        dh = torch.randn(S, N * Rr, Ho, Wo, generator=g)
        dx0 = torch.randn(S, C, H, W, generator=g)
        def on(t):
            return t.to(device, dtype).clone(memory_format=fmt) if t.dim() == 4 else t.to(device, dtype)
        y, dx, dhd = on(y0), on(dx0), on(dh)
        h = torch.full((S, Rr, Ho, Wo), float("nan"), device=device, dtype=dtype)
        TK.conv_lora_fwd(on(x), on(A), on(B), y, idx.to(device), 0.5, st, pd, dl, on(eb), h)
        TK.conv_lora_dgrad(dhd[:, :Rr], on(A), dx, idx.to(device), st, pd, dl, dh_expert_stride=Rr * dhd.stride(1))
        xd, Ad, Bd = (on(t).cpu().double() for t in (x, A, B))
        h_ref = torch.cat([F.conv2d(xd[i:i + 1], Ad[idx[i]], None, st, pd, dl) for i in range(S)])
        y_ref = on(y0).cpu().double() + 0.5 * torch.einsum("snr,srhw->snhw", Bd[idx], h.cpu().double()) \
            + on(eb).cpu().double()[idx][:, :, None, None]
        dx_ref = on(dx0).cpu().double().clone()
        for i in range(S):
            e = int(idx[i])
            xi = xd[i:i + 1].clone().requires_grad_()
            dx_ref[i] += torch.autograd.grad(F.conv2d(xi, Ad[e], None, st, pd, dl), xi,
                                             on(dh).cpu().double()[i:i + 1, e * Rr:(e + 1) * Rr])[0][0]
        tol = TOL[dtype] * 2
        assert_close(f"h {dtype}", h, h_ref, tol)
        assert_close(f"y {dtype}", y, y_ref, tol)
        assert_close(f"dx {dtype}", dx, dx_ref, tol)
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("case", range(6))
def test_conv_base_lora_kernels_raw(device, case):
    """conv_base_lora_fwd / conv_base_lora_dgrad (base conv + LoRA in one implicit GEMM) against
    float64 torch convs: asymmetric stride, padding and dilation, kernels 1/3/5, channels over
    several K tiles, rank 1..64, expert mixes with empty experts, both memory formats, with and
    without the LoRA (A None: the plain conv and its input gradient); y, h and dx poisoned."""
    rng = random.Random(700 + case)
    g = torch.Generator().manual_seed(70 + case)
    cuda_dtypes = _dtypes(device) if case in (0, 3) else [torch.float16]  # GPU time: each config compiles
    for dtype in cuda_dtypes if device == "cuda" else [torch.float32, torch.float16]:
        k = [3, 1, 5, 3, 3, 1][case]
        st, pd, dl = (rng.choice([1, 2]), rng.choice([1, 2])), (rng.randint(0, 2), rng.randint(0, 2)), \
            ((1, 1) if k != 3 else (rng.choice([1, 2]), rng.choice([1, 2])))
        S, N, C, NOUT = rng.randint(1, 5), rng.randint(1, 7), rng.choice([3, 17, 40]), rng.choice([5, 33, 70])
        Rr = [16, 1, 5, 64, 33, 0][case]
        span = (k - 1) * max(dl) + 1
        H, W = rng.randint(span, span + 5), rng.randint(span, span + 4)
        fmt = torch.channels_last if case % 2 else torch.contiguous_format
        idx = expert_mix(rng, S, N, ["one", "empty", "rand"][case % 3])
        x = torch.randn(S, C, H, W, generator=g)
        Wt = torch.randn(NOUT, C, k, k, generator=g) / (C * k * k) ** 0.5
        bias = torch.randn(NOUT, generator=g) if case % 3 else None
        A = torch.randn(N, Rr, C, k, k, generator=g) / (C * k * k) ** 0.5
        B = torch.randn(N, NOUT, Rr, generator=g) / max(Rr, 1) ** 0.5
        eb = torch.randn(N, NOUT, generator=g) if case != 2 else None
        Ho, Wo = F.conv2d(x, Wt, None, st, pd, dl).shape[2:]
        dy = torch.randn(S, NOUT, Ho, Wo, generator=g)
        dh = torch.randn(S, Rr, Ho, Wo, generator=g)

        def on(t):
            if t is None:
                return None
            return t.to(device, dtype).contiguous(memory_format=fmt) if t.dim() == 4 else t.to(device, dtype)

        seg = build_segments(idx.to(device), N)
        lora = Rr > 0
        y = on(torch.full((S, NOUT, Ho, Wo), float("nan")))
        h = on(torch.full((S, Rr, Ho, Wo), float("nan"))) if lora else None
        Wk = TC.weight_for_tiles(on(Wt))
        Ak = TC.lora_a_for_tiles(on(A)) if lora else None
        TC.conv_base_lora_fwd(on(x), Wk, y, seg.sorted_idx, seg.offsets, st, pd, dl, on(bias), Ak,
                              on(B) if lora else None, 0.5, on(eb), h)
        dx = on(torch.full((S, C, H, W), float("nan")))
        TC.conv_base_lora_dgrad(on(dy), Wk, dx, seg.sorted_idx, seg.offsets, st, pd, dl, on(dh) if lora else None, Ak)
        xd, Wd, Ad, Bd, dyd, dhd = (on(t).cpu().double() for t in (x, Wt, A, B, dy, dh))
        xr = xd.clone().requires_grad_()
        y_ref = F.conv2d(xr, Wd, None if bias is None else on(bias).cpu().double(), st, pd, dl)
        if eb is not None:
            y_ref = y_ref + on(eb).cpu().double()[idx][:, :, None, None]
        dx_ref = torch.autograd.grad(y_ref, xr, dyd)[0]
        if lora:
            h_ref = torch.cat([F.conv2d(xd[i:i + 1], Ad[idx[i]], None, st, pd, dl) for i in range(S)])
            y_ref = y_ref.detach() + 0.5 * torch.einsum("snr,srhw->snhw", Bd[idx], h.cpu().double())
            for i in range(S):
                xi = xd[i:i + 1].clone().requires_grad_()
                dx_ref[i] += torch.autograd.grad(F.conv2d(xi, Ad[idx[i]], None, st, pd, dl), xi, dhd[i:i + 1])[0][0]
            assert_close(f"h {dtype}", h, h_ref, TOL[dtype] * 2)
        assert_close(f"y {dtype}", y, y_ref, TOL[dtype] * 2)
        assert_close(f"dx {dtype}", dx, dx_ref, TOL[dtype] * 2)
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


def test_conv_base_lora_layout_helpers():
    """weight_for_tiles / lora_a_for_tiles: same values in the kernels' layouts and dtype, one copy at
    most, none (the same storage) when the input already has them."""
    A, W = torch.randn(2, 3, 4, 3, 3), torch.randn(5, 4, 3, 3)
    a = TC.lora_a_for_tiles(A, torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a.float(), A.half().float()) and a.stride(1) == 1
    assert TC.lora_a_for_tiles(a) is a and TC.lora_a_for_tiles(a, torch.float32) is not a
    w = TC.weight_for_tiles(W)
    assert torch.equal(w, W) and w.is_contiguous(memory_format=torch.channels_last)
    assert TC.weight_for_tiles(w).data_ptr() == w.data_ptr()


def test_conv_base_lora_bad_input():
    """The in-base kernels' launchers name what does not fit (before any launch)."""
    x, W, y = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.empty(2, 5, 4, 4)
    seg = build_segments(torch.tensor([0, 1]), 2)
    A, B = torch.randn(2, 3, 4, 3, 3), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="do not fit"):
        TC.conv_base_lora_fwd(x, torch.randn(5, 3, 3, 3), y, seg.sorted_idx, seg.offsets)
    with pytest.raises(ValueError, match="h_out"):
        TC.conv_base_lora_fwd(x, W, y, seg.sorted_idx, seg.offsets, A=A, B=B)
    with pytest.raises(ValueError, match="rank in one tile"):
        TC.conv_base_lora_fwd(x, W, y, seg.sorted_idx, seg.offsets, A=torch.randn(2, 65, 4, 3, 3),
                              B=torch.randn(2, 5, 65), h_out=torch.empty(2, 65, 4, 4))
    with pytest.raises(ValueError, match="do not fit W"):
        TC.conv_base_lora_fwd(x, W, y, seg.sorted_idx, seg.offsets, A=A, B=torch.randn(2, 6, 3),
                              h_out=torch.empty(2, 3, 4, 4))
    with pytest.raises(ValueError, match="dh must be"):
        TC.conv_base_lora_dgrad(torch.randn(2, 5, 4, 4), W, torch.empty(2, 4, 6, 6), seg.sorted_idx, seg.offsets, A=A)


@pytest.mark.parametrize("device,backend", [p for p in device_backends() if p.id != "cuda-cuda"])
@pytest.mark.parametrize("split", [None, 1, 3, 7])
def test_seg_outer_raw(device, backend, split):
    """Triton seg_outer, or (cuda_full) the CUDA one, incl. an fp32 out for fp16/bf16 inputs."""
    rng = random.Random(17 + (split or 0))
    for dtype in _dtypes(device):
        _maybe_skip(device, backend, dtype)
        for case in range(3):
            N, S, M = rng.randint(1, 10), rng.randint(1, 7), rng.randint(1, 40)
            P, Q = rng.randint(1, 40), rng.randint(1, 70)
            if case == 2:  # narrow P, wide Q (dA = dh^T x): Triton computes the transpose, no u_sum
                P, Q = rng.randint(1, 16), rng.randint(33, 70)
            idx = expert_mix(rng, S, N, ["one", "empty", "rand"][case % 3]).to(device)
            seg = build_segments(idx, N)
            u = torch.randn(S, P, M, device=device).to(dtype).transpose(1, 2)  # strided rows
            v = torch.randn(S, M, Q, device=device).to(dtype)
            out_dt = torch.float32 if (backend == "cuda_full" and case == 1) else dtype
            out = torch.full((N, P, Q), float("nan"), device=device, dtype=out_dt)
            if backend == "cuda_full":
                from ppap_fast.ops.lora import cuda_ops

                cuda_ops.seg_outer(u, v, out, seg.sorted_idx, seg.offsets, 1.5, split or 0)
            elif backend == "cpp":
                torch.ops.ppap_fast.lora_seg_outer(u, v, out, seg.sorted_idx, seg.offsets, 1.5, split or 0)
            else:  # the Triton kernel also gives each segment's row sums of u (the expert-bias grad)
                u_sum = None if case == 2 else torch.full((N, P), float("nan"), device=device,
                                                          dtype=torch.float32 if case == 1 else dtype)
                got = TK.seg_outer(u, v, out, seg.sorted_idx, seg.offsets, 1.5, split=split, u_sum=u_sum)
                assert got is out
            ic = idx.cpu()
            want = torch.zeros(N, P, Q, dtype=torch.float64).index_add_(
                0, ic, 1.5 * torch.bmm(u.cpu().double().transpose(1, 2), v.cpu().double()))
            assert_close(f"seg_outer split={split} {dtype}", out, want, TOL[dtype])
            if backend == "triton" and u_sum is not None:
                want_sum = torch.zeros(N, P, dtype=torch.float64).index_add_(0, ic, u.cpu().double().sum(1))
                assert_close(f"seg_outer u_sum split={split} {dtype}", u_sum, want_sum, TOL[dtype])
            for e in set(range(N)) - set(ic.tolist()):
                assert torch.count_nonzero(out[e]) == 0
            got_r = R.seg_outer(u.cpu().double(), v.cpu().double(), torch.empty(N, P, Q, dtype=torch.float64),
                                seg.sorted_idx.cpu(), seg.offsets.cpu(), 1.5)
            assert_close("reference seg_outer", got_r, want, 1e-12)


# ============================================================================ lora_linear
def _linear_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        N = rng.randint(1, 10)
        cases.append(dict(
            S=rng.randint(1, 6), L=rng.choice([None, 1, rng.randint(2, 9)]), K=rng.randint(3, 48),
            O=rng.randint(3, 48), N=N, r=rng.choice([1, 3, 8, 13, 16, 17, 32]), mix=["one", "empty", "rand"][i % 3],
            bias=rng.random() < 0.5, ebias=rng.random() < 0.7, scale=rng.choice([0.5, 1.0, 2.0]), seed=rng.randrange(10**6)))
    return cases


def _run_linear(c, device, backend, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    rng = random.Random(c["seed"])
    shape = (c["S"], c["K"]) if c["L"] is None else (c["S"], c["L"], c["K"])
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = mk(*shape)
    W = mk(c["O"], c["K"]) / c["K"] ** 0.5
    b = mk(c["O"]) if c["bias"] else None
    A = mk(c["N"], c["r"], c["K"]) / c["K"] ** 0.5
    B = mk(c["N"], c["O"], c["r"])
    eb = mk(c["N"], c["O"]) if c["ebias"] else None
    idx = expert_mix(rng, c["S"], c["N"], c["mix"])
    q = lambda t: None if t is None else t.to(dtype)  # noqa: E731  (round to dtype once)
    x, W, b, A, B, eb = map(q, (x, W, b, A, B, eb))
    dy = mk(*shape[:-1], c["O"]).to(dtype)

    def run(dev, dt, be):
        t = lambda v, grad=True: None if v is None else v.to(dev, dt).requires_grad_(grad)  # noqa: E731
        xs, As, Bs, ebs = t(x), t(A), t(B), t(eb)
        y = L.lora_linear(xs, t(W, False), t(b, False), As, Bs, idx.to(dev), c["scale"], ebs, backend=be)
        leaves = [v for v in (xs, As, Bs, ebs) if v is not None]
        grads = torch.autograd.grad(y, leaves, dy.to(dev, dt))
        return [y] + list(grads), leaves

    want, _ = run("cpu", torch.float64, "reference")
    got, leaves = run(device, dtype, backend)
    assert L.last_backend["lora_linear"] == backend
    names = ["y", "dx", "dA", "dB", "d_expert_bias"]
    for name, a, w in zip(names, got, want):
        assert a.dtype == dtype
        assert_close(f"{name} ({c})", a.cpu(), w, TOL[dtype])
    used = set(idx.tolist())
    for e in range(c["N"]):  # experts without samples get exactly zero grads
        if e not in used:
            assert torch.count_nonzero(got[2][e]) == 0 and torch.count_nonzero(got[3][e]) == 0


LINEAR_CASES = _linear_cases(15, 1234)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("ci", range(len(LINEAR_CASES)))
def test_lora_linear_parity(device, backend, ci):
    for dtype in _dtypes(device) if (device == "cuda" or ci % 3 == 0) else [torch.float32]:
        _maybe_skip(device, backend, dtype)
        _run_linear(LINEAR_CASES[ci], device, backend, dtype)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("ci", range(6))
def test_lora_linear_in_base_parity(device, ci, monkeypatch):
    """lora_linear with a_stage="in_base" (PPAP_FAST_LORA_A_STAGE): the base GEMM and the LoRA in the
    in-base kernels (rows as a 1 x M map), y and every grad vs float64, poisoned buffers; ranks over 64
    and the reference / cpp backends keep the default path."""
    c = LINEAR_CASES[ci]
    ran = []
    for name in ("conv_base_lora_fwd", "conv_base_lora_dgrad"):
        orig = getattr(TC, name)
        monkeypatch.setattr(TC, name, lambda *a, _f=orig, _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    monkeypatch.setenv("PPAP_FAST_LORA_A_STAGE", "in_base")
    for dtype in _dtypes(device) if (device == "cuda" and ci < 2) else [torch.float32]:
        _run_linear(c, device, "triton", dtype)
    assert L.last_backend["lora_linear/a_stage"] == "in_base"
    assert sorted(set(ran)) == ["conv_base_lora_dgrad", "conv_base_lora_fwd"], ran
    if ci == 0:
        x, W = torch.randn(2, 5, 8, device=device), torch.randn(6, 8, device=device)
        A, B, idx = torch.randn(2, 65, 8, device=device), torch.randn(2, 6, 65, device=device), torch.tensor([1, 0])
        L.lora_linear(x, W, None, A, B, idx.to(device), 0.5, backend="triton")  # rank 65: the default path
        assert L.last_backend["lora_linear/a_stage"] == "default"
        L.lora_linear(x.cpu(), W.cpu(), None, A[:, :4].cpu(), B[:, :, :4].cpu(), idx, 0.5, backend="reference")
        assert L.last_backend["lora_linear/a_stage"] == "reference"


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("case", range(5))
def test_conv_lora_wgrad_raw(device, case):
    """conv_lora_wgrad: each expert's A-conv weight gradient over its own samples vs per-sample torch
    weight grads summed per expert (float64); forced splits 1/3/7 and the automatic one, empty
    experts get exact zeros, the output is poisoned first."""
    rng = random.Random(300 + case)
    g = torch.Generator().manual_seed(case)
    for dtype in _dtypes(device) if device == "cuda" else [torch.float32]:
        k = [3, 1, 3, 5, 3][case]
        st, pd, dl = (rng.choice([1, 2]), rng.choice([1, 2])), (rng.randint(0, 2), rng.randint(0, 2)), \
            ((1, 1) if k != 3 else (rng.choice([1, 2]), rng.choice([1, 2])))
        S, N, Rr = rng.randint(1, 6), rng.randint(1, 7), [16, 5, 33, 70, 144][case]
        C = rng.choice([3, 17, 40]) if Rr < 64 else 5
        span = (k - 1) * max(dl) + 1
        H, W = rng.randint(span, span + 5), rng.randint(span, span + 4)
        idx = expert_mix(rng, S, N, ["one", "empty", "rand"][case % 3])
        x = torch.randn(S, C, H, W, generator=g)
        Ho, Wo = F.conv2d(x, torch.zeros(1, C, k, k), None, st, pd, dl).shape[2:]
        dh = torch.randn(S, Rr, Ho, Wo, generator=g)
        fmt = torch.channels_last if case % 2 else torch.contiguous_format
        xd, dhd = (t.to(device, dtype).contiguous(memory_format=fmt) for t in (x, dh))
        want = torch.zeros(N, Rr, C, k, k, dtype=torch.float64)
        for i in range(S):
            A0 = torch.zeros(Rr, C, k, k, dtype=torch.float64, requires_grad=True)
            o = F.conv2d(xd[i:i + 1].cpu().double(), A0, None, st, pd, dl)
            want[int(idx[i])] += torch.autograd.grad(o, A0, dhd[i:i + 1].cpu().double())[0]
        seg = build_segments(idx.to(device), N)
        for split in (None, 1, 3, 7) if (Rr < 64 or device == "cuda") else (None, 3):  # interpreter time
            out = torch.full((N, Rr, C, k, k), float("nan"), device=device, dtype=dtype)
            TK.conv_lora_wgrad(xd, dhd, out, seg.sorted_idx, seg.offsets, st, pd, dl, split=split)
            assert_close(f"dA split={split} {dtype}", out, want, TOL[dtype] * 2)
            for e in set(range(N)) - set(idx.tolist()):
                assert torch.count_nonzero(out[e]) == 0


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("kh,C,stride,fmt", [(3, 5, 1, "contiguous"), (3, 40, 2, "channels_last"),
                                            (1, 7, 1, "contiguous"), (5, 3, 1, "channels_last"),
                                            (3, 2, 1, "contiguous")])
def test_conv_lora_kernels_blocked(device, kh, C, stride, fmt):
    """The three implicit kernels with a_blocks = kh on a loralib-derived A (block diagonal, block
    boundaries inside channels when kh does not divide C): forward y/h and dgrad dx equal the dense
    kernels' (whose A zeros make them exact), wgrad equals the dense weight grad on the blocks and
    is 0 off them; poisoned h and dA."""
    rng = random.Random(kh * 100 + C)
    g = torch.Generator().manual_seed(kh * 7 + C)
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    for dtype in _dtypes(device) if device == "cuda" else [torch.float32]:
        S, N, NOUT = (5 if device == "cuda" else 3), 3, rng.choice([6, 70])
        ranks = [2, 5, 16] if device == "cuda" else [1, 2]  # rank r * kh * kh: interpreter time
        r = rng.choice([q for q in ranks if q * kh * kh <= TK.IMPLICIT_MAX_RANK])  # the dense run (a_blocks 1)
        A_l = torch.randn(N, r * kh, C * kh, generator=g) / (C * kh) ** 0.5
        B_l = torch.randn(N, NOUT * kh, r * kh, generator=g) / r ** 0.5
        A, B = R.loralib_conv_as_factorised(A_l, B_l, C, kh, kh)
        x = torch.randn(S, C, 7, 6, generator=g)
        idx = torch.tensor([rng.randrange(N) for _ in range(S)])
        geo = (stride, kh // 2, 1)
        Ho, Wo = F.conv2d(x, A[0], None, *geo).shape[2:]
        y0, dh = torch.randn(S, NOUT, Ho, Wo, generator=g), torch.randn(S, r * kh * kh, Ho, Wo, generator=g)
        def on(t):
            return t.to(device, dtype).clone(memory_format=mf) if t.dim() == 4 else t.to(device, dtype)
        xd, Ad, Bd, dhd, idd = on(x), on(A), on(B), on(dh), idx.to(device)
        seg = build_segments(idd, N)
        outs = {}
        for nb in (1, kh):
            y, h = on(y0), torch.full((S, r * kh * kh, Ho, Wo), float("nan"), device=device, dtype=dtype)
            TK.conv_lora_fwd(xd, Ad, Bd, y, idd, 0.5, *geo, h_out=h, a_blocks=nb)
            dx = on(torch.zeros_like(x))
            TK.conv_lora_dgrad(dhd, Ad, dx, idd, *geo, a_blocks=nb)
            dA = torch.full(tuple(A.shape), float("nan"), device=device, dtype=dtype)
            TK.conv_lora_wgrad(xd, dhd, dA, seg.sorted_idx, seg.offsets, *geo, a_blocks=nb)
            outs[nb] = (y, h, dx, dA)
        tol = TOL[dtype] * 2
        for name, a, b in zip(("y", "h", "dx"), outs[kh][:3], outs[1][:3]):
            assert_close(f"{name} blocked vs dense {dtype}", a, b, tol)
        on_block = R.loralib_conv_as_factorised(torch.ones(1, r * kh, C * kh), torch.ones(1, kh, r * kh), C, kh, kh)[0]
        on_block = on_block[0].bool().to(device)
        dA_b, dA_d = outs[kh][3], outs[1][3]
        assert torch.count_nonzero(dA_b[:, ~on_block]) == 0
        assert_close(f"dA on the blocks {dtype}", dA_b[:, on_block], dA_d[:, on_block], tol)


@pytest.mark.parametrize("device", _triton_devices())
@pytest.mark.parametrize("ci", range(4))
def test_lora_linear_fused_forward(device, ci, monkeypatch):
    """Triton linear with >= FUSED_LINEAR_MIN_ROWS tokens per sample: the forward is ONE per-sample
    kernel (conv_lora_fwd over the rows as a 1 x M map); parity of y and every grad, poisoned h."""
    rng = random.Random(77 + ci)
    c = dict(_linear_cases(1, 500 + ci)[0], L=fast.FUSED_LINEAR_MIN_ROWS + rng.randint(0, 30), K=rng.randint(3, 80),
             O=rng.randint(3, 80), r=[5, 16, 33, 64][ci])
    calls = []
    orig = TK.conv_lora_fwd
    monkeypatch.setattr(TK, "conv_lora_fwd", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    for dtype in _dtypes(device) if device == "cuda" else [torch.float32, torch.float16]:
        _run_linear(c, device, "triton", dtype)
    assert calls, "the fused linear forward did not run"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cuda_full_large_and_deterministic(kind):
    """cuda_full at sizes where seg_outer splits rows (auto split > 1 on any GPU with >= 16 SMs):
    parity vs float64 and bitwise-identical seg_outer grads over two runs (no atomics)."""
    _maybe_skip("cuda", "cuda_full", torch.float16)
    dev, N, S, r = "cuda", 7, 24, 13
    g = torch.Generator().manual_seed(9)
    idx = torch.tensor([0, 0, 0, 2, 2, 5, 6, 6, 6, 6, 6, 6] * 2)
    if kind == "linear":
        x, W = torch.randn(S, 40, 96, generator=g), torch.randn(80, 96, generator=g) / 10
        A, B = torch.randn(N, r, 96, generator=g) / 10, torch.randn(N, 80, r, generator=g)
        dy = torch.randn(S, 40, 80, generator=g)
        fn = lambda xs, As, Bs, Wd, be: L.lora_linear(xs, Wd, None, As, Bs, idx.to(xs.device), 0.5,  # noqa: E731
                                                      backend=be)
    else:
        x, W = torch.randn(S, 16, 12, 12, generator=g), torch.randn(24, 16, 3, 3, generator=g) / 12
        A, B = torch.randn(N, r, 16, 3, 3, generator=g) / 12, torch.randn(N, 24, r, generator=g)
        dy = torch.randn(S, 24, 12, 12, generator=g)
        fn = lambda xs, As, Bs, Wd, be: L.lora_conv2d(xs, Wd, None, As, Bs, idx.to(xs.device), 0.5,  # noqa: E731
                                                      padding=1, backend=be)
    ins = [t.double().requires_grad_() for t in (x, A, B)]
    want = [fn(*ins, W.double(), "reference")]
    want += list(torch.autograd.grad(want[0], ins, dy.double()))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        runs = []
        for _ in range(2):
            got = [t.to(dev, dtype).requires_grad_() for t in (x, A, B)]
            y = fn(*got, W.to(dev, dtype), "cuda_full")
            runs.append([y] + list(torch.autograd.grad(y, got, dy.to(dev, dtype))))
        assert L.last_backend["lora_" + ("linear" if kind == "linear" else "conv2d")] == "cuda_full"
        for name, a, w in zip(["y", "dx", "dA", "dB"], runs[0], want):
            assert_close(f"{kind} {name} {dtype}", a, w, TOL[dtype] * 2)
        ours = [2, 3] if kind == "linear" else [3]  # dA/dB from seg_outer (conv dA is cuDNN's wgrad)
        for i in ours:
            assert torch.equal(runs[0][i], runs[1][i]), "seg_outer is not run-to-run deterministic"


def test_lora_linear_reference_matches_dense_formula():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 10, dtype=torch.float64)
    W, b = torch.randn(7, 10, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    A, B = torch.randn(3, 4, 10, dtype=torch.float64), torch.randn(3, 7, 4, dtype=torch.float64)
    eb = torch.randn(3, 7, dtype=torch.float64)
    idx = torch.tensor([2, 0, 2, 1])
    y = R.lora_linear(x, W, b, A, B, idx, 0.5, eb)
    for s in range(4):
        e = int(idx[s])
        want = x[s] @ (W + 0.5 * B[e] @ A[e]).T + b + eb[e]
        assert torch.allclose(y[s], want, atol=1e-12)


# ============================================================================ lora_conv2d
def _conv_cases(n, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        depthwise = i % 4 == 3
        k = rng.choice([1, 3, 3, 7])
        cin = rng.choice([3, 4, 6]) if not depthwise else rng.choice([2, 3, 4])
        groups = cin if depthwise else 1
        cout = rng.choice([4, 5, 8]) if not depthwise else cin * rng.choice([1, 2])
        r = rng.choice([1, 5, 16, 17, 32]) if not depthwise else groups * rng.choice([1, 2])
        cases.append(dict(
            S=rng.randint(1, 4), cin=cin, cout=cout, k=k, stride=rng.choice([1, 2]), groups=groups,
            dil=rng.choice([1, 1, 2]) if k == 3 else 1, H=rng.randint(k, k + 4), N=rng.randint(1, 10), r=r,
            mix=["one", "empty", "rand"][i % 3], ebias=rng.random() < 0.7, bias=rng.random() < 0.5,
            a_stage=["stacked", "grouped"][i % 2], seed=rng.randrange(10**6)))
    return cases


def _run_conv(c, device, backend, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    rng = random.Random(c["seed"])
    mk = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cg = c["cin"] // c["groups"]
    fan = cg * c["k"] ** 2
    x = mk(c["S"], c["cin"], c["H"], c["H"] + 1)
    W = mk(c["cout"], cg, c["k"], c["k"]) / fan ** 0.5
    b = mk(c["cout"]) if c["bias"] else None
    A = mk(c["N"], c["r"], cg, c["k"], c["k"]) / fan ** 0.5
    B = mk(c["N"], c["cout"], c["r"] // c["groups"])
    eb = mk(c["N"], c["cout"]) if c["ebias"] else None
    idx = expert_mix(rng, c["S"], c["N"], c["mix"])
    pad = (c["k"] // 2) * c["dil"]
    q = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, W, b, A, B, eb = map(q, (x, W, b, A, B, eb))
    geo = (c["stride"], pad, c["dil"], c["groups"])
    out_shape = F.conv2d(x.float(), W.float(), None, *geo).shape
    dy = mk(*out_shape).to(dtype)

    def run(dev, dt, be, **kw):
        t = lambda v, grad=True: None if v is None else v.to(dev, dt).requires_grad_(grad)  # noqa: E731
        xs, As, Bs, ebs = t(x), t(A), t(B), t(eb)
        y = L.lora_conv2d(xs, t(W, False), t(b, False), As, Bs, idx.to(dev), 0.5, *geo, expert_bias=ebs,
                          backend=be, **kw)
        leaves = [v for v in (xs, As, Bs, ebs) if v is not None]
        return [y] + list(torch.autograd.grad(y, leaves, dy.to(dev, dt)))

    want = run("cpu", torch.float64, "reference")
    got = run(device, dtype, backend, a_stage="stacked" if backend == "cpp" else c["a_stage"])
    assert L.last_backend["lora_conv2d"] == backend
    for name, a, w in zip(["y", "dx", "dA", "dB", "d_expert_bias"], got, want):
        assert a.dtype == dtype
        assert_close(f"{name} ({c})", a.cpu(), w, TOL[dtype] * (2 if dtype != torch.float32 else 1))


CONV_CASES = _conv_cases(20, 4321)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("ci", range(len(CONV_CASES)))
def test_lora_conv2d_parity(device, backend, ci):
    for dtype in _dtypes(device) if (device == "cuda" or ci % 4 == 0) else [torch.float32]:
        _maybe_skip(device, backend, dtype)
        if device == "cpu" and dtype == torch.float16:
            continue  # CPU fp16 conv (base/A stage) is not what we test here
        _run_conv(CONV_CASES[ci], device, backend, dtype)


FUSED_CASES = [i for i in range(len(CONV_CASES)) if i % 4 != 3][:8] + [3]  # + one depthwise (falls back)
IN_BASE_CUDA_CASES = (1, 2, 6, 10)


def _not_cpp():  # the cpp backend runs a_stage="stacked" only (test_cpp_backend_rejects_other_a_stages)
    return [p for p in device_backends() if "cpp" not in p.id]


@pytest.mark.parametrize("device,backend", _not_cpp())
@pytest.mark.parametrize("a_stage,ci", [("fused", i) for i in FUSED_CASES] +
                         [("implicit", i) for i in range(len(CONV_CASES))] +  # all: kernels 1/3/7, stride, dilation
                         [("in_base", i) for i in range(len(CONV_CASES))])
def test_lora_conv2d_fused_parity(device, backend, ci, a_stage, monkeypatch):
    """a_stage="fused": one conv for base + stacked A, expand from the conv output, shrink into the
    stacked gradient; "implicit": cuDNN base conv + the implicit-GEMM LoRA kernels (forward, dgrad);
    "in_base": base conv and LoRA in the same Triton kernels (dgrad too at stride 1).
    y, G, h, dh and dx are poisoned buffers the kernels must fully write."""
    if a_stage == "in_base" and device == "cuda" and (backend != "triton" or ci not in IN_BASE_CUDA_CASES):
        pytest.skip("in_base on CUDA: the 'triton' backend (the same kernels run on every backend) and "
                    "IN_BASE_CUDA_CASES (kernels 1/3/7, stride 2, dilation 2, ranks 5-32: compile time)")
    c = dict(CONV_CASES[ci], a_stage=a_stage)
    ran = []
    spied = {(m, n): getattr(m, n) for m, n in [(TK, "conv_lora_fwd"), (TK, "conv_lora_dgrad"), (TK, "conv_lora_wgrad"),
                                                 (TC, "conv_base_lora_fwd"), (TC, "conv_base_lora_dgrad")]}
    for (m, n), f in spied.items():
        monkeypatch.setattr(m, n, lambda *a, _f=f, _n=n, **k: (ran.append(_n), _f(*a, **k))[1])
    for dtype in _dtypes(device) if device == "cuda" else [torch.float32]:
        _maybe_skip(device, backend, dtype)
        _run_conv(c, device, backend, dtype)
    want = []
    if c["groups"] == 1:  # depthwise runs the stacked path
        if a_stage == "implicit":
            want = ["conv_lora_dgrad", "conv_lora_fwd", "conv_lora_wgrad"]
        elif a_stage == "in_base":
            want = sorted(["conv_base_lora_fwd", "conv_lora_wgrad",
                           "conv_base_lora_dgrad" if c["stride"] == 1 else "conv_lora_dgrad"])
    assert sorted(set(ran)) == want, ran
    if want:
        assert L.last_backend["lora_conv2d/a_stage"] == a_stage


def _conv_formats_parity(device, backend, fmts, x, W, b, A, B, eb, idx, dy, **kw):
    """lora_conv2d (scale 0.5, stride 2, padding 1) with x and dy in each memory format of fmts:
    y and dx, dA, dB, deb against the float64 reference; returns the outputs y."""
    ins = [t.double().requires_grad_() for t in (x, A, B, eb)]
    bd = None if b is None else b.double()
    y_r = R.lora_conv2d(ins[0], W.double(), bd, ins[1], ins[2], idx, 0.5, 2, 1, expert_bias=ins[3])
    g_r = torch.autograd.grad(y_r, ins, dy.double())
    ys = []
    for fmt in fmts:
        got = [x.to(device).contiguous(memory_format=fmt).requires_grad_()] + \
            [t.to(device).requires_grad_() for t in (A, B, eb)]
        y = L.lora_conv2d(got[0], W.to(device), None if b is None else b.to(device), got[1], got[2],
                          idx.to(device), 0.5, 2, 1, expert_bias=got[3], backend=backend, **kw)
        g = torch.autograd.grad(y, got, dy.to(device).contiguous(memory_format=fmt))
        for n, a, w in zip(["y", "dx", "dA", "dB", "deb"], [y, *g], [y_r, *g_r]):
            assert_close(f"{fmt} {n}", a, w, TOL[torch.float32])
        ys.append(y)
    return ys


@pytest.mark.parametrize("device,backend", _not_cpp())
@pytest.mark.parametrize("a_stage", ["fused", "implicit", "in_base"])
def test_lora_conv2d_fused_layouts(device, backend, a_stage):
    """fused / implicit / in_base: y keeps x's memory format (channels_last in, channels_last out) and is
    contiguous in it."""
    _maybe_skip(device, backend, torch.float32)
    torch.manual_seed(6)
    N, S = 3, 4
    x = torch.randn(S, 5, 7, 6)
    W, b = torch.randn(6, 5, 3, 3) / 6, torch.randn(6)
    A, B, eb = torch.randn(N, 5, 5, 3, 3) / 6, torch.randn(N, 6, 5), torch.randn(N, 6)
    idx = torch.tensor([2, 0, 2, 2])
    dy = torch.randn(S, 6, 4, 3)
    fmts = (torch.contiguous_format, torch.channels_last)
    ys = _conv_formats_parity(device, backend, fmts, x, W, b, A, B, eb, idx, dy, a_stage=a_stage)
    for fmt, y in zip(fmts, ys):
        assert y.is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match="a_stage"):
        L.lora_conv2d(x.to(device), W.to(device), None, A.to(device), B.to(device), idx.to(device), 0.5,
                      backend=backend, a_stage="nope")


def test_launch_counts_fused_vs_stacked():
    """Op accounting on CPU (reference convs, Triton under the interpreter): the fused conv path
    runs one forward conv instead of two and one dgrad instead of two."""
    if not INTERP:
        pytest.skip("counts taken on the CPU interpreter path")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_lora import count_ops

    fwd_s, bwd_s = count_ops("conv", "stacked")
    fwd_f, bwd_f = count_ops("conv", "fused")
    assert fwd_s["aten::convolution"] == 2 and fwd_f["aten::convolution"] == 1
    assert bwd_s["aten::convolution_backward"] == 2 and bwd_f["aten::convolution_backward"] == 2
    assert bwd_f["dgrad"] == 1 and bwd_s["dgrad"] == 2
    fwd_i, bwd_i = count_ops("conv", "implicit")  # cuDNN base conv + one Triton kernel each way
    # + one copy of A into the rank-contiguous layout the kernels load as vectors (kept for the backward)
    assert fwd_i["aten::convolution"] == 1 and fwd_i["triton"] == 1 and fwd_i["aten::copy_"] == 1
    assert fwd_i["launches"] == 3
    assert bwd_i["dgrad"] == 1 and bwd_i["wgrad"] == 0 and bwd_i["triton"] == 4  # shrink, dgrad, wgrad, dB
    assert bwd_i["launches"] <= bwd_f["launches"]
    fwd_b, bwd_b = count_ops("conv", "in_base")  # base conv + LoRA in one Triton kernel each way (+ layout copies)
    assert fwd_b["triton"] == 1 and "aten::convolution" not in fwd_b
    assert bwd_b["triton"] == 4 and bwd_b["dgrad"] == 0 and bwd_b["launches"] == 4  # shrink, dgrad, wgrad, dB


def test_a_stage_auto_times_once_and_takes_the_fastest(monkeypatch):
    """a_stage="auto" (here via PPAP_FAST_LORA_A_STAGE): the first call with a new key times stacked /
    implicit / in_base (timer faked: implicit fastest) and runs the winner; later calls with that key
    time nothing; a stage that raises is never chosen; no-grad calls and other shapes are other keys;
    groups > 1 has one applicable stage and times nothing. Outputs equal the reference."""
    if not INTERP:
        pytest.skip("the Triton paths run on CPU under TRITON_INTERPRET=1 only")
    from ppap_fast.ops.lora import autotune

    autotune.clear_a_stage_choices()
    fake = {"stacked": 5.0, "implicit": 3.0, "in_base": 4.0}
    order, timed = [], []

    def fake_elapsed(fn, device):
        fn()
        timed.append(order[-1])
        return fake[order[-1]]

    choose = autotune.choose

    def spy_choose(run, key, stages, device):
        def tracked(stage):
            order.append(stage)
            run(stage)
        return choose(tracked, key, stages, device)

    monkeypatch.setattr(autotune, "_elapsed_ms", fake_elapsed)
    monkeypatch.setattr(autotune, "choose", spy_choose)
    monkeypatch.setenv("PPAP_FAST_LORA_A_STAGE", "auto")
    torch.manual_seed(4)
    x, W = torch.randn(3, 4, 6, 6), torch.randn(5, 4, 3, 3)
    A, B, idx = torch.randn(3, 2, 4, 3, 3), torch.randn(3, 5, 2), torch.tensor([2, 0, 2])
    want = R.lora_conv2d(x, W, None, A, B, idx, 0.5, 1, 1)
    xg, Ag = x.clone().requires_grad_(), A.clone().requires_grad_()
    y = L.lora_conv2d(xg, W, None, Ag, B, idx, 0.5, padding=1, backend="triton")
    assert L.last_backend["lora_conv2d/a_stage"] == "implicit"
    assert sorted(set(timed)) == ["implicit", "in_base", "stacked"] and len(timed) == 3 * autotune.REPS
    assert_close("auto y", y, want, 1e-5)
    (choice, times), = autotune.a_stage_choices().values()
    assert choice == "implicit" and times == fake
    n = len(timed)
    y2 = L.lora_conv2d(xg, W, None, Ag, B, idx, 0.5, padding=1, backend="triton")
    assert len(timed) == n and L.last_backend["lora_conv2d/a_stage"] == "implicit"
    y2.sum().backward()  # the chosen stage's backward
    assert xg.grad is not None and Ag.grad is not None
    with torch.no_grad():  # another key: which gradients are wanted
        L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend="triton")
    assert len(autotune.a_stage_choices()) == 2
    orig = TC.conv_base_lora_fwd
    monkeypatch.setattr(TC, "conv_base_lora_fwd", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    fake.update(implicit=6.0, in_base=1.0)  # in_base "fastest" but it fails: stacked wins
    L.lora_conv2d(x[:2], W, None, A, B, idx[:2], 0.5, padding=1, backend="triton")
    monkeypatch.setattr(TC, "conv_base_lora_fwd", orig)
    assert L.last_backend["lora_conv2d/a_stage"] == "stacked"
    assert [c for c, t in autotune.a_stage_choices().values() if t.get("in_base") == float("inf")] == ["stacked"]
    n = len(timed)
    Ag2, Bg2 = torch.randn(3, 2, 2, 3, 3), torch.randn(3, 4, 1)
    L.lora_conv2d(x, W[:4, :2].contiguous(), None, Ag2, Bg2, idx, 0.5, padding=1, groups=2, backend="triton")
    assert len(timed) == n and L.last_backend["lora_conv2d/a_stage"] == "stacked"
    fake.update(default=2.0, in_base=1.0)  # a linear layer: its default path vs in_base
    xl, Wl, Al, Bl = torch.randn(3, 7, 8), torch.randn(6, 8), torch.randn(3, 2, 8), torch.randn(3, 6, 2)
    yl = L.lora_linear(xl, Wl, None, Al, Bl, idx, 0.5, backend="triton")
    assert L.last_backend["lora_linear/a_stage"] == "in_base" and timed[-1] == "in_base"
    assert_close("auto linear", yl, R.lora_linear(xl, Wl, None, Al, Bl, idx, 0.5), 1e-5)
    autotune.clear_a_stage_choices()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # g2 captures no kernel: only the choice
def test_a_stage_auto_with_cuda_graphs():
    """On CUDA: warm-up calls before capture do the timing (events), the captured call reuses the
    choice and replays equal an eager call with the chosen stage; a key first met inside a capture
    times nothing, takes "stacked" and is not cached."""
    from ppap_fast.ops.lora import autotune

    autotune.clear_a_stage_choices()
    torch.manual_seed(5)
    dev = "cuda"
    x = torch.randn(8, 32, 14, 14, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    W = torch.randn(64, 32, 3, 3, device=dev, dtype=torch.float16) / 17
    A, B = torch.randn(5, 16, 32, 3, 3, device=dev, dtype=torch.float16) / 17, torch.randn(5, 64, 16, device=dev,
                                                                                             dtype=torch.float16)
    idx = torch.randint(0, 5, (8,), device=dev)
    seg = build_segments(idx, 5)

    def step():
        return L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, segments=seg, a_stage="auto")

    with torch.no_grad():
        g, y = capture_cuda_graph(step)
        (choice, times), = autotune.a_stage_choices().values()
        assert all(t == t for t in times.values()) and min(times.values()) == times[choice]
        g.replay()
        want = L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, segments=seg, a_stage=choice)
        assert torch.equal(y, want)
        stream = torch.cuda.Stream()
        g2 = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(g2):
            picked = autotune.choose(lambda s: None, ("fresh key",), ("stacked", "implicit"), x.device)
        assert picked == "stacked" and ("fresh key",) not in autotune.a_stage_choices()
    autotune.clear_a_stage_choices()


def test_a_stage_from_environment(monkeypatch):
    """PPAP_FAST_LORA_A_STAGE picks the A stage when the call names none; last_backend says which ran
    (groups > 1 falls back to stacked); a bad name is a clear error; cpp keeps stacked."""
    torch.manual_seed(3)
    x, W = torch.randn(2, 4, 6, 6), torch.randn(4, 4, 3, 3)
    A, B, idx = torch.randn(3, 2, 4, 3, 3), torch.randn(3, 4, 2), torch.tensor([2, 0])
    Ag, Bg = torch.randn(3, 2, 2, 3, 3), torch.randn(3, 4, 1)
    be = "triton" if INTERP else "reference"
    want = "implicit" if INTERP else "reference"
    monkeypatch.setenv("PPAP_FAST_LORA_A_STAGE", "implicit")
    y = L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend=be)
    assert L.last_backend["lora_conv2d/a_stage"] == want
    assert_close("env implicit", y, R.lora_conv2d(x, W, None, A, B, idx, 0.5, 1, 1), 1e-5)
    L.lora_conv2d(x, W[:, :2], None, Ag, Bg, idx, 0.5, padding=1, groups=2, backend=be)
    assert L.last_backend["lora_conv2d/a_stage"] == ("stacked" if INTERP else "reference")
    L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend=be, a_stage="stacked")  # the call wins
    assert L.last_backend["lora_conv2d/a_stage"] == ("stacked" if INTERP else "reference")
    if _cpp_ready("cpu"):
        L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend="cpp")
        assert L.last_backend["lora_conv2d/a_stage"] == "stacked"
    monkeypatch.setenv("PPAP_FAST_LORA_A_STAGE", "nope")
    with pytest.raises(ValueError, match="PPAP_FAST_LORA_A_STAGE"):
        L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend=be)


@pytest.mark.parametrize("kh,kw", [(1, 1), (3, 3), (5, 5), (3, 1), (2, 3)])
def test_loralib_conv_as_factorised_is_exact(kh, kw):
    """The loralib conv LoRA equals the factorised LoRA of rank r*kh*kh built from it: the same dense
    delta, the same conv output and the same grads of A_l, B_l (float64)."""
    torch.manual_seed(kh * 10 + kw)
    N, r, C_in, C_out = 3, 2, 5, 4
    A_l = torch.randn(N, r * kh, C_in * kw, dtype=torch.float64, requires_grad=True)
    B_l = torch.randn(N, C_out * kh, r * kh, dtype=torch.float64, requires_grad=True)
    A, B = R.loralib_conv_as_factorised(A_l, B_l, C_in, kh, kw)
    assert A.shape == (N, r * kh * kh, C_in, kh, kw) and B.shape == (N, C_out, r * kh * kh)
    delta = (B_l @ A_l).reshape(N, C_out, C_in, kh, kw)
    if kh == kw:
        assert_close("loralib_conv_delta", R.loralib_conv_delta(A_l, B_l, C_out, C_in, kh, 1.0), delta, 1e-15)
    assert_close("delta", R.lora_conv_delta(A, B), delta, 1e-13)
    x, W = torch.randn(4, C_in, 7, 6, dtype=torch.float64), torch.randn(C_out, C_in, kh, kw, dtype=torch.float64)
    idx = torch.tensor([2, 0, 2, 1])
    y_f = R.lora_conv2d(x, W, None, A, B, idx, 0.5, 1, (kh // 2, kw // 2))
    y_d = R.lora_conv2d_delta(x, W, None, 0.5 * delta, idx, 1, (kh // 2, kw // 2))
    assert_close("y", y_f, y_d, 1e-13)
    dy = torch.randn_like(y_d)
    g_f = torch.autograd.grad(y_f, [A_l, B_l], dy)
    g_d = torch.autograd.grad(y_d, [A_l, B_l], dy)
    for n, a, b in zip(("dA_l", "dB_l"), g_f, g_d):
        assert_close(n, a, b, 1e-12)
    with pytest.raises(ValueError, match="loralib"):
        R.loralib_conv_as_factorised(A_l, B_l, C_in + 1, kh, kw)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_factorised_delta_merges(groups):
    torch.manual_seed(groups)
    N, cin, cout, r, k = 3, 4, 8, 4 * groups, 3
    x = torch.randn(5, cin, 6, 6, dtype=torch.float64)
    W = torch.randn(cout, cin // groups, k, k, dtype=torch.float64)
    A = torch.randn(N, r, cin // groups, k, k, dtype=torch.float64)
    B = torch.randn(N, cout, r // groups, dtype=torch.float64)
    idx = torch.tensor([1, 0, 1, 2, 2])
    y = R.lora_conv2d(x, W, None, A, B, idx, 0.5, 2, 1, 1, groups)
    delta = 0.5 * L.lora_conv_delta(A, B, groups)
    assert delta.shape == (N,) + W.shape
    y2 = R.lora_conv2d_delta(x, W, None, delta, idx, 2, 1, 1, groups)
    assert_close("merged", y2, y, 1e-12)


# ============================================================================ loralib layout
def test_loralib_golden(fixtures_dir):
    d = torch.load(fixtures_dir / "ppap_loraconv_golden.pt")
    for c in [d] + list(d["extra_cases"]):
        sd, cv = c["state_dict"], c["conv"]
        k = cv["kernel_size"]
        delta = L.loralib_conv_delta(sd["lora_A"], sd["lora_B"], cv["out_channels"], cv["in_channels"], k,
                                     c["scaling"])
        assert_close("delta", delta, c["delta_weight"], 1e-6)
        assert_close("merged", sd["conv.weight"] + delta, c["merged_weight"], 1e-6)
        N = 3
        deltas = torch.stack([torch.zeros_like(delta), delta, -delta])
        idx = torch.tensor([1, 1])
        for be in ["vectorized", "reference"]:
            y = L.lora_conv2d_delta(c["x"], sd["conv.weight"], None, deltas, idx, cv["stride"], cv["padding"],
                                    backend=be)
            assert_close(f"out_train {be}", y, c["out_train"], 1e-5)
            y0 = L.lora_conv2d_delta(c["x"], sd["conv.weight"], None, deltas, torch.tensor([0, 0]), cv["stride"],
                                     cv["padding"], backend=be)
            assert_close(f"base {be}", y0, c["out_base_only"], 1e-5)
        assert N == deltas.shape[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("backend", ["vectorized", "stacked"])
def test_lora_conv2d_delta_vectorized(device, backend):
    rng = random.Random(3)
    for groups, cin, cout in [(1, 4, 6), (2, 4, 6), (4, 4, 8)]:
        N, S, k = rng.randint(1, 6), 5, 3
        torch.manual_seed(groups)
        x = torch.randn(S, cin, 7, 6)
        W = torch.randn(cout, cin // groups, k, k)
        delta = torch.randn(N, *W.shape) * 0.1
        eb = torch.randn(N, cout)
        idx = expert_mix(rng, S, N, "rand")
        want = [x.double().requires_grad_(), delta.double().requires_grad_(), eb.double().requires_grad_()]
        y_ref = R.lora_conv2d_delta(want[0], W.double(), None, want[1], idx, 2, 1, 1, groups, want[2])
        dy = torch.randn_like(y_ref)
        g_ref = torch.autograd.grad(y_ref, want, dy)
        got = [v.to(device).requires_grad_() for v in (x, delta, eb)]
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = [got[0].detach().contiguous(memory_format=fmt).requires_grad_(), *got[1:]]
            y = L.lora_conv2d_delta(got[0], W.to(device), None, got[1], idx.to(device), 2, 1, 1, groups, got[2],
                                    backend=backend)
            assert L.last_backend["lora_conv2d_delta"] == backend
            g = torch.autograd.grad(y, got, dy.to(device, y.dtype))
            for n, a, b in zip(["y", "dx", "ddelta", "deb"], [y, *g], [y_ref, *g_ref]):
                assert_close(f"{backend} {fmt} groups={groups} {n}", a.cpu(), b, 2e-5)


def test_lora_conv2d_delta_stacked_by_env_with_bias(monkeypatch):
    """PPAP_FAST_LORA_DELTA=stacked makes "stacked" the automatic choice; the shared bias is added once."""
    torch.manual_seed(5)
    N, S = 3, 4
    x, W, b = torch.randn(S, 3, 6, 6), torch.randn(5, 3, 3, 3), torch.randn(5)
    delta, idx = torch.randn(N, 5, 3, 3, 3) * 0.1, torch.tensor([2, 0, 2, 1])
    want = R.lora_conv2d_delta(x.double(), W.double(), b.double(), delta.double(), idx, 1, 1)
    monkeypatch.setenv("PPAP_FAST_LORA_DELTA", "stacked")
    y = L.lora_conv2d_delta(x, W, b, delta, idx, 1, 1)
    assert L.last_backend["lora_conv2d_delta"] == "stacked"
    assert_close("stacked with bias", y, want, 2e-5)
    monkeypatch.delenv("PPAP_FAST_LORA_DELTA")
    L.lora_conv2d_delta(x, W, b, delta, idx, 1, 1)
    assert L.last_backend["lora_conv2d_delta"] == "vectorized"
    monkeypatch.setenv("PPAP_FAST_LORA_DELTA", "stacks")
    with pytest.raises(ValueError, match="PPAP_FAST_LORA_DELTA"):
        L.lora_conv2d_delta(x, W, b, delta, idx, 1, 1)
    monkeypatch.setenv("PPAP_FAST_LORA_DELTA", "stacked")  # a global backend choice wins over it
    monkeypatch.setenv("PPAP_LORA_BACKEND", "reference")
    L.lora_conv2d_delta(x, W, b, delta, idx, 1, 1)
    assert L.last_backend["lora_conv2d_delta"] == "reference"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lora_conv2d_delta_auto_on_cuda_is_stacked(monkeypatch):
    """CUDA's automatic choice is the stacked conv; PPAP_FAST_LORA_DELTA=grouped brings back the grouped one."""
    torch.manual_seed(6)
    x, W, b = torch.randn(4, 3, 6, 6), torch.randn(5, 3, 3, 3), torch.randn(5)
    delta, idx = torch.randn(3, 5, 3, 3, 3) * 0.1, torch.tensor([2, 0, 2, 1])
    want = R.lora_conv2d_delta(x.double(), W.double(), b.double(), delta.double(), idx, 1, 1)
    monkeypatch.delenv("PPAP_FAST_LORA_DELTA", raising=False)
    for env, backend in ((None, "stacked"), ("grouped", "vectorized")):
        if env:
            monkeypatch.setenv("PPAP_FAST_LORA_DELTA", env)
        y = L.lora_conv2d_delta(*(v.cuda() for v in (x, W, b, delta, idx)), 1, 1)
        assert L.last_backend["lora_conv2d_delta"] == backend
        assert_close(f"{backend} on cuda", y.cpu(), want, 2e-5)


# ============================================================================ dispatch / bad input
def test_dispatch_reports_and_rejects(monkeypatch):
    x, W = torch.randn(2, 4), torch.randn(3, 4)
    A, B = torch.randn(2, 2, 4), torch.randn(2, 3, 2)
    idx = torch.tensor([0, 1])
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "reference"  # CPU: interpreter is never auto-picked
    with pytest.raises(L.BackendUnavailableError, match="no backend"):
        L.lora_linear(x, W, None, A, B, idx, 1.0, backend="nope")
    with pytest.raises(L.BackendUnavailableError, match="cuda"):
        L.lora_linear(x, W, None, A, B, idx, 1.0, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(L.BackendUnavailableError, match="TRITON_INTERPRET"):
        L.lora_linear(x, W, None, A, B, idx, 1.0, backend="triton")
    with pytest.raises(L.BackendUnavailableError, match="dtype"):
        L.lora_linear(x.double(), W.double(), None, A.double(), B.double(), idx, 1.0, backend="triton")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        L.lora_linear(x, W, None, A, B, torch.tensor([0, 2]), 1.0)
    with pytest.raises(ValueError, match="shape"):
        L.lora_linear(x, W, None, A, B[:, :2], idx, 1.0)
    with pytest.raises(ValueError, match="shape"):
        L.lora_conv2d(torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), None, torch.randn(2, 3, 4, 3, 3),
                      torch.randn(2, 6, 2), idx, 1.0)
    rep = L.available_backends("lora_linear", "cpu")
    assert rep["reference"] == "ok" and rep["cuda"] != "ok" and rep["cuda_full"] != "ok"
    with pytest.raises(L.BackendUnavailableError, match="cuda_full"):
        L.lora_linear(x, W, None, A, B, idx, 1.0, backend="cuda_full")
    monkeypatch.setenv("PPAP_FAST_LORA_CUDA_BWD", "0")  # opting out changes nothing where CUDA cannot run
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "reference"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_bwd_default_and_opt_out(monkeypatch):
    """Auto picks "cuda_full" (CUDA backward) by default and "cuda" (Triton backward) with
    PPAP_FAST_LORA_CUDA_BWD=0."""
    _maybe_skip("cuda", "cuda_full", torch.float32)
    x, W = torch.randn(2, 4, device="cuda"), torch.randn(3, 4, device="cuda")
    A, B = torch.randn(2, 2, 4, device="cuda"), torch.randn(2, 3, 2, device="cuda")
    idx = torch.tensor([0, 1], device="cuda")
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "cuda_full"
    monkeypatch.setenv("PPAP_FAST_LORA_CUDA_BWD", "0")
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "cuda"


@pytest.mark.parametrize("device,backend", device_backends())
def test_lora_conv2d_string_padding(device, backend):
    _maybe_skip(device, backend, torch.float32)
    torch.manual_seed(4)
    x, W = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    A, B = torch.randn(2, 2, 3, 3, 3), torch.randn(2, 4, 2)
    idx = torch.tensor([1, 0])
    for pad, num in (("same", 1), ("valid", 0)):
        y = L.lora_conv2d(x.to(device), W.to(device), None, A.to(device), B.to(device), idx.to(device), 0.5,
                          padding=pad, backend=backend)
        want = R.lora_conv2d(x.double(), W.double(), None, A.double(), B.double(), idx, 0.5, padding=num)
        assert_close(pad, y, want, TOL[torch.float32])
    with pytest.raises(ValueError, match="even"):
        L.lora_conv2d(x, torch.randn(4, 3, 2, 2), None, torch.randn(2, 2, 3, 2, 2), B, idx, 0.5, padding="same")


def _frozen_cases():
    """(op, backend, call(W, bias), W's shape) for every backend path of the three public ops on this machine."""
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([0, 1, 1])
    x, xc = torch.randn(3, 4, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    A, Ac = torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, 3, 3, generator=g)
    B, delta = torch.randn(2, 5, 2, generator=g), torch.randn(2, 5, 4, 3, 3, generator=g)
    for t in (A, Ac, B, delta):
        t.requires_grad_()
    fast_backends = (["cpp"] if _cpp_ready("cpu") else []) + (["triton"] if INTERP else [])
    for be in ["reference"] + fast_backends:
        yield "lora_linear", be, lambda W, b, be=be: L.lora_linear(x, W, b, A, B, idx, 0.5, backend=be), (5, 4)
        yield ("lora_conv2d", be, lambda W, b, be=be: L.lora_conv2d(xc, W, b, Ac, B, idx, 0.5, 1, 1, backend=be),
               (5, 4, 3, 3))
    for be in ("reference", "vectorized", "stacked"):
        yield ("lora_conv2d_delta", be, lambda W, b, be=be: L.lora_conv2d_delta(xc, W, b, delta, idx, 1, 1, backend=be),
               (5, 4, 3, 3))


def test_a_frozen_weight_or_bias_that_requires_grad_warns_once_on_every_backend(monkeypatch):
    """W and the shared bias are detached on every backend: one that requires grad silently got no gradient. It warns
    once per op and tensor (a model unfrozen with requires_grad_(True) still trains its LoRA), not under no_grad."""
    g = torch.Generator().manual_seed(6)
    cases = list(_frozen_cases())
    assert len(cases) >= 5
    for op, be, call, w_shape in cases:
        W, b = torch.randn(w_shape, generator=g), torch.randn(5, generator=g)
        want = call(W, b).detach()
        for name in ("W", "bias"):
            monkeypatch.setattr(L, "_FROZEN_WARNED", set())
            Wg, bg = W.clone().requires_grad_(name == "W"), b.clone().requires_grad_(name == "bias")
            hint = rf"^{op}: {name} requires grad, .* call {name}\.requires_grad_\(False\)"
            with pytest.warns(UserWarning, match=hint):
                y = call(Wg, bg)
            assert L.last_backend[op] == be and torch.isfinite(y).all() and torch.equal(y.detach(), want), (op, be)
            y.sum().backward()
            assert Wg.grad is None and bg.grad is None, (op, be, name)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                call(Wg, bg)  # warned once
                monkeypatch.setattr(L, "_FROZEN_WARNED", set())
                with torch.no_grad():
                    call(Wg, bg)  # no gradient asked for


# ============================================================================ CUDA graphs
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_cuda_graph_capture_lora_linear(backend):
    _maybe_skip("cuda", backend, torch.float32)
    dev = "cuda"
    N, S, Lq, K, O, r = 5, 6, 9, 64, 48, 16
    x = torch.randn(S, Lq, K, device=dev)
    W, A, B = torch.randn(O, K, device=dev), torch.randn(N, r, K, device=dev), torch.randn(N, O, r, device=dev)
    eb = torch.randn(N, O, device=dev)
    idx = torch.tensor([0, 3, 3, 1, 4, 0], device=dev)
    static_idx = idx.clone()
    seg = build_segments(static_idx, N)
    fast.POISON = TK.POISON = CPP.POISON = False
    def step():
        build_segments(static_idx, N, out=seg)
        return L.lora_linear(x, W, None, A, B, static_idx, 0.5, eb, backend=backend, segments=seg)

    graph, y = capture_cuda_graph(step)
    for new in ([4, 4, 4, 4, 4, 4], [1, 0, 2, 3, 2, 1]):
        static_idx.copy_(torch.tensor(new, device=dev))
        graph.replay()
        torch.cuda.synchronize()
        want = R.lora_linear(x.double(), W.double(), None, A.double(), B.double(), static_idx, 0.5, eb.double())
        assert_close(f"graph replay {new}", y, want, TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_capture_cpp_conv_fwd_bwd():
    """The cpp backend's conv forward AND backward captured in one CUDA graph (no host sync in
    either), replayed for new routings: y and every grad against the float64 reference."""
    _maybe_skip("cuda", "cpp", torch.float32)
    dev, N, S = "cuda", 4, 6
    fast.POISON = TK.POISON = CPP.POISON = False
    x = torch.randn(S, 8, 9, 9, device=dev, requires_grad=True)
    W = torch.randn(12, 8, 3, 3, device=dev) / 8
    A = (torch.randn(N, 5, 8, 3, 3, device=dev) / 8).requires_grad_()
    B = torch.randn(N, 12, 5, device=dev).requires_grad_()
    eb = torch.randn(N, 12, device=dev).requires_grad_()
    dy = torch.randn(S, 12, 9, 9, device=dev)
    static_idx = torch.tensor([0, 3, 3, 1, 2, 0], device=dev)
    seg = build_segments(static_idx, N)

    def step():
        build_segments(static_idx, N, out=seg)
        y = L.lora_conv2d(x, W, None, A, B, static_idx, 0.5, padding=1, expert_bias=eb, backend="cpp", segments=seg)
        return (y, *torch.autograd.grad(y, [x, A, B, eb], dy))

    graph, outs = capture_cuda_graph(step)
    for new in ([2, 2, 2, 2, 2, 2], [1, 0, 3, 3, 0, 1]):
        static_idx.copy_(torch.tensor(new, device=dev))
        graph.replay()
        torch.cuda.synchronize()
        ins = [t.detach().cpu().double().requires_grad_() for t in (x, A, B, eb)]
        y_r = R.lora_conv2d(ins[0], W.cpu().double(), None, ins[1], ins[2], torch.tensor(new), 0.5, padding=1,
                            expert_bias=ins[3])
        want = (y_r, *torch.autograd.grad(y_r, ins, dy.cpu().double()))
        for name, a, w in zip(["y", "dx", "dA", "dB", "deb"], outs, want):
            assert_close(f"graph replay {new} {name}", a, w, TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("split", [1, 3])
def test_cuda_graph_capture_seg_outer(split):
    """The CUDA backward kernels under graph capture (split > 1 allocates its workspace there)."""
    _maybe_skip("cuda", "cuda_full", torch.float32)
    from ppap_fast.ops.lora import cuda_ops

    dev, N, S, M, P, Q = "cuda", 4, 6, 33, 13, 40
    u, v = torch.randn(S, M, P, device=dev), torch.randn(S, M, Q, device=dev)
    static_idx = torch.tensor([0, 3, 3, 1, 1, 0], device=dev)
    seg = build_segments(static_idx, N)
    out = torch.full((N, P, Q), float("nan"), device=dev)
    def step():
        build_segments(static_idx, N, out=seg)
        cuda_ops.seg_outer(u, v, out, seg.sorted_idx, seg.offsets, 0.5, split)

    graph, _ = capture_cuda_graph(step, warmup=1)
    for new in ([2, 2, 2, 2, 2, 2], [1, 0, 3, 3, 0, 1]):
        static_idx.copy_(torch.tensor(new, device=dev))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.zeros(N, P, Q, dtype=torch.float64).index_add_(
            0, torch.tensor(new), 0.5 * torch.bmm(u.cpu().double().transpose(1, 2), v.cpu().double()))
        assert_close(f"graph seg_outer {new}", out, want, TOL[torch.float32])


# ============================================================================ layouts / AMP
@pytest.mark.parametrize("device,backend", device_backends())
def test_lora_conv2d_channels_last(device, backend):
    _maybe_skip(device, backend, torch.float32)
    torch.manual_seed(1)
    N, S = 4, 3
    x = torch.randn(S, 6, 7, 7)
    W = torch.randn(8, 6, 3, 3) / 8
    A, B = torch.randn(N, 5, 6, 3, 3) / 8, torch.randn(N, 8, 5)
    eb = torch.randn(N, 8)
    idx = torch.tensor([3, 0, 3])
    dy = torch.randn(S, 8, 4, 4)
    _conv_formats_parity(device, backend, (torch.channels_last,), x, W, None, A, B, eb, idx, dy)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_lora_linear_under_autocast():
    torch.manual_seed(2)
    N, dev = 3, "cuda"
    x = torch.randn(4, 5, 32, device=dev, requires_grad=True)
    W = torch.randn(24, 32, device=dev) / 6
    A = (torch.randn(N, 16, 32, device=dev) / 6).requires_grad_()
    B = torch.randn(N, 24, 16, device=dev).requires_grad_()
    idx = torch.tensor([2, 0, 2, 1], device=dev)
    with torch.autocast("cuda", dtype=torch.float16):
        y = L.lora_linear(x, W, None, A, B, idx, 0.5, backend="triton")
    assert y.dtype == torch.float16
    gx, gA, gB = torch.autograd.grad(y.float().sum(), [x, A, B])
    assert gx.dtype == x.dtype and gA.dtype == A.dtype and gB.dtype == B.dtype
    y_r = R.lora_linear(x.double(), W.double(), None, A.double(), B.double(), idx, 0.5)
    assert_close("autocast y", y, y_r, 5e-3)
    ins = [t.detach().double().requires_grad_() for t in (x, A, B)]
    g_r = torch.autograd.grad(R.lora_linear(ins[0], W.double(), None, ins[1], ins[2], idx, 0.5).sum(), ins)
    for n, a, b in zip(["dx", "dA", "dB"], [gx, gA, gB], g_r):
        assert_close(n, a, b, 5e-3)


# ============================================================================ cpp backend
CPU_FAST_BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not INTERP, reason="no interpreter"))]


def test_cpp_backend_auto_policy(monkeypatch):
    """Opt-in (PPAP_FAST_LORA_CPP=1) until a GPU run verifies it; on CPU it is slower than the
    per-expert reference (the stacked A conv does N times the A work), so never automatic there."""
    if not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B, idx = torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.tensor([0, 1, 1])
    monkeypatch.delenv("PPAP_FAST_LORA_CPP", raising=False)
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "reference"
    monkeypatch.setenv("PPAP_FAST_LORA_CPP", "1")
    L.lora_linear(x, W, None, A, B, idx, 1.0)
    assert L.last_backend["lora_linear"] == "cpp"
    xc, Wc = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    Ac, Bc = torch.randn(2, 2, 3, 3, 3), torch.randn(2, 4, 2)
    L.lora_conv2d(xc, Wc, None, Ac, Bc, idx[:2], 1.0, padding=1, a_stage="grouped")  # not "stacked": not cpp
    assert L.last_backend["lora_conv2d"] == "reference"
    assert L.available_backends("lora_conv2d", "cpu")["cpp"] == "ok"


def test_cpp_backend_rejects_other_a_stages():
    if not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    x, W = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    A, B, idx = torch.randn(2, 2, 3, 3, 3), torch.randn(2, 4, 2), torch.tensor([0, 1])
    for stage in ("fused", "grouped"):
        with pytest.raises(ValueError, match="stacked"):
            L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend="cpp", a_stage=stage)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        torch.ops.ppap_fast.lora_conv2d_cpp(x, W, None, A, B[:, :3], None, idx, *build_segments(idx, 2)[1:4:2],
                                            0.5, [1, 1], [1, 1], [1, 1], 1, False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_cpp_backend_partial_grads(device, kind):
    """Only some inputs need grads (a frozen input image, a frozen A): the C++ backward maps its
    inputs to autograd edges correctly with and without the optional biases."""
    _maybe_skip(device, "cpp", torch.float32)
    torch.manual_seed(8)
    N = 3
    idx = torch.tensor([2, 0, 2, 1])
    if kind == "linear":
        x, W, A, B = torch.randn(4, 6), torch.randn(5, 6), torch.randn(N, 2, 6), torch.randn(N, 5, 2)
        kw = {}
    else:
        x, W, A, B = torch.randn(4, 3, 5, 5), torch.randn(5, 3, 3, 3), torch.randn(N, 2, 3, 3, 3), torch.randn(N, 5, 2)
        kw = dict(padding=1)
    b, eb = torch.randn(5), torch.randn(N, 5)
    op = L.lora_linear if kind == "linear" else L.lora_conv2d
    for bias, ebias in ((None, None), (b, None), (None, eb), (b, eb)):
        for needs in ((False, False, True, True), (True, False, False, False), (False, True, False, False)):
            ins = [t.clone().requires_grad_(n) for t, n in zip((x, A, B, eb), needs)]
            want_ins = [t.double().detach().requires_grad_(n) for t, n in zip((x, A, B, eb), needs)]
            e_got = ins[3] if ebias is not None else None
            e_want = want_ins[3] if ebias is not None else None
            dev = lambda t: None if t is None else t.to(device)  # noqa: E731
            y = op(dev(ins[0]), dev(W), dev(bias), dev(ins[1]), dev(ins[2]), idx.to(device), 0.5,
                   expert_bias=dev(e_got), backend="cpp", **kw)
            ref = R.lora_linear if kind == "linear" else R.lora_conv2d
            y_r = ref(want_ins[0], W.double(), None if bias is None else bias.double(), want_ins[1], want_ins[2], idx,
                      0.5, expert_bias=e_want, **kw)
            assert_close(f"y {needs}", y, y_r, TOL[torch.float32])
            leaves = [t for t, n in zip(ins, needs) if n and (t is not ins[3] or ebias is not None)]
            leaves_r = [t for t, n in zip(want_ins, needs) if n and (t is not want_ins[3] or ebias is not None)]
            if not leaves:
                continue
            dy = torch.randn(y.shape)
            got = torch.autograd.grad(y, leaves, dy.to(device))
            want = torch.autograd.grad(y_r, leaves_r, dy.double())
            for a, w in zip(got, want):
                assert_close(f"grad {needs} bias={bias is not None} eb={ebias is not None}", a, w, TOL[torch.float32])


def test_cpp_backend_cpu_autocast():
    """Under autocast the cpp backend computes in the autocast dtype; grads come back in the
    parameters' dtypes."""
    if not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    torch.manual_seed(3)
    N = 3
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    W = torch.randn(8, 3, 3, 3) / 5
    A, B = (torch.randn(N, 4, 3, 3, 3) / 5).requires_grad_(), torch.randn(N, 8, 4).requires_grad_()
    idx = torch.tensor([1, 0, 2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = L.lora_conv2d(x, W, None, A, B, idx, 0.5, padding=1, backend="cpp")
    assert y.dtype == torch.bfloat16
    gx, gA, gB = torch.autograd.grad(y.float().sum(), [x, A, B])
    assert (gx.dtype, gA.dtype, gB.dtype) == (torch.float32,) * 3
    ins = [t.detach().double().requires_grad_() for t in (x, A, B)]
    y_r = R.lora_conv2d(ins[0], W.double(), None, ins[1], ins[2], idx, 0.5, padding=1)
    assert_close("autocast y", y, y_r, 3e-2)
    for n, a, w in zip(["dx", "dA", "dB"], [gx, gA, gB], torch.autograd.grad(y_r.sum(), ins)):
        assert_close(n, a, w, 3e-2)


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS)
def test_stale_segments_are_refused(backend):
    """segments built for another expert_idx of the same length, or for this one before an in-place
    change, are refused (the fast paths routed by them: silently wrong); rebuilt, they run."""
    _maybe_skip("cpu", backend, torch.float32)
    x, W, A, B = torch.randn(4, 16), torch.randn(16, 16), torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    xc, Wc, Ac = torch.randn(4, 3, 5, 5), torch.randn(16, 3, 3, 3), torch.randn(3, 16, 3, 3, 3)
    idx = torch.tensor([0, 1, 1, 2])
    seg = build_segments(idx, 3)
    lin = lambda i, s: L.lora_linear(x, W, None, A, B, i, 0.5, backend=backend, segments=s)  # noqa: E731
    conv = lambda i, s: L.lora_conv2d(xc, Wc, None, Ac, B, i, 0.5, padding=1, backend=backend,  # noqa: E731
                                      segments=s)
    other = torch.tensor([2, 2, 0, 1])
    for op in (lin, conv):
        with pytest.raises(ValueError, match="stale"):
            op(other, seg)
    idx.copy_(torch.tensor([2, 0, 0, 1]))  # changed in place since build_segments
    with pytest.raises(ValueError, match="stale"):
        lin(idx, seg)
    build_segments(idx, 3, out=seg)
    assert_close("rebuilt", lin(idx, seg), R.lora_linear(x, W, None, A, B, idx, 0.5), TOL[torch.float32])
    assert_close("rebuilt conv", conv(idx, seg), R.lora_conv2d(xc, Wc, None, Ac, B, idx, 0.5, padding=1),
                 TOL[torch.float32])
    with pytest.raises(ValueError, match="N=4"):
        lin(idx, build_segments(idx, 4))


@pytest.mark.parametrize("kind", ["linear", "linear_in_base", "implicit", "in_base", "fused", "stacked", "cpp_linear",
                                  "cpp_conv"])
@pytest.mark.parametrize("change", ["rebuilt", "idx_in_place"])
def test_segments_changed_between_forward_and_backward_are_refused(kind, change):
    """The Triton Functions kept the segments as a plain ctx attribute: rebuilt in place
    (build_segments(out=), e.g. for the next micro-batch) or expert_idx changed in place after the
    forward, the backward silently routed the gradients by the new values (every gradient off); the
    reference and the cpp backend raise autograd's in-place error there. Now the Triton paths do too."""
    backend = "cpp" if kind.startswith("cpp") else "triton"
    if backend == "triton" and not INTERP:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    if backend == "cpp" and not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    g = torch.Generator().manual_seed(0)
    N = 3
    idx = torch.tensor([0, 1, 2, 0])
    seg = build_segments(idx, N)
    B, eb = torch.randn(N, 6, 2, generator=g, requires_grad=True), torch.randn(N, 6, generator=g, requires_grad=True)
    if "linear" in kind:
        x, W = torch.randn(4, 20, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g)
        A = torch.randn(N, 2, 8, generator=g, requires_grad=True)
        kw = {"a_stage": "in_base"} if kind == "linear_in_base" else {}
        call = lambda: L.lora_linear(x, W, None, A, B, idx, 0.5, eb, backend=backend, segments=seg, **kw)  # noqa: E731
    else:
        x, W = torch.randn(4, 3, 5, 5, generator=g, requires_grad=True), torch.randn(6, 3, 3, 3, generator=g)
        A = torch.randn(N, 2, 3, 3, 3, generator=g, requires_grad=True)
        stage = "stacked" if kind == "cpp_conv" else kind
        call = lambda: L.lora_conv2d(x, W, None, A, B, idx, 0.5, 1, 1, expert_bias=eb,  # noqa: E731
                                     backend=backend, segments=seg, a_stage=stage)
    grads = torch.autograd.grad(call().square().sum(), (x, A, B, eb))  # unchanged: runs
    assert all(torch.isfinite(t).all() for t in grads)
    y = call()
    if change == "rebuilt":
        build_segments(torch.tensor([2, 2, 1, 1]), N, out=seg)
    else:
        idx.copy_(torch.tensor([2, 2, 1, 1]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.square().sum(), (x, A, B, eb))


def _bias_backends():
    out = [("reference", None)] + ([("cpp", None)] if _cpp_ready("cpu") else [])
    return out + ([("triton", st) for st in ("default", "stacked", "implicit", "in_base", "fused")] if INTERP else [])


def test_strided_bias_gives_the_reference_and_a_bias_not_c_out_is_refused_on_every_path():
    """The in-base kernels read bias[o] at its data pointer + o, without its stride: a [C_out] bias that is
    a strided view (a column of a table) gave other channels' values (off by 1.6 here, every other path
    exact), and a scalar / [1] linear bias read past its end. A bias not shaped [C_out] is refused by every
    op and path (lora_linear broadcast [1] / [1, C_out] and gave torch's expand error for a [5] of 6)."""
    g = torch.Generator().manual_seed(0)
    N, idx = 2, torch.tensor([1, 0, 1])
    x, W, A = torch.randn(3, 20, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(N, 2, 4, generator=g)
    B = torch.randn(N, 6, 2, generator=g)
    xc, Wc, Ac = torch.randn(3, 4, 5, 5, generator=g), torch.randn(6, 4, 3, 3, generator=g), \
        torch.randn(N, 2, 4, 3, 3, generator=g)
    strided = torch.randn(6, 3, generator=g)[:, 1]
    tail = torch.full((16,), 1e3)  # what a kernel reading past a short bias's end finds
    for be, st in _bias_backends():
        if st in (None, "default", "in_base"):
            kw = {} if st is None else {"a_stage": st}
            got = L.lora_linear(x, W, strided, A, B, idx, 0.5, backend=be, **kw)
            want = R.lora_linear(x.double(), W.double(), strided.double(), A.double(), B.double(), idx, 0.5)
            assert_close(f"linear {be} {st} strided bias", got, want, 2e-5)
            for bad in (tail[:5], tail[:1], tail[0], strided.view(1, 6)):
                with pytest.raises(ValueError, match=r"^lora_linear: bias must be \[C_out\] = \[6\], got "):
                    L.lora_linear(x, W, bad, A, B, idx, 0.5, backend=be, **kw)
        if st != "default":
            kw = {} if st is None else {"a_stage": st}
            got = L.lora_conv2d(xc, Wc, strided, Ac, B, idx, 0.5, 1, 1, backend=be, **kw)
            want = R.lora_conv2d(xc.double(), Wc.double(), strided.double(), Ac.double(), B.double(), idx, 0.5, 1, 1)
            assert_close(f"conv {be} {st} strided bias", got, want, 2e-5)
            for bad in (tail[:3], tail[:1], strided.view(1, 6)):
                with pytest.raises(ValueError, match=r"^lora_conv2d: bias must be \[C_out\] = \[6\]"):
                    L.lora_conv2d(xc, Wc, bad, Ac, B, idx, 0.5, 1, 1, backend=be, **kw)
    for be in ("reference", "vectorized", "stacked"):
        with pytest.raises(ValueError, match=r"bias must be \[C_out\] = \[6\]"):
            L.lora_conv2d_delta(xc, Wc, tail[:1], torch.randn(N, 6, 4, 3, 3), idx, 1, 1, backend=be)


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.skipif(not INTERP, reason="no interpreter")
def test_expert_bias_grad_deterministic_without_index_add(monkeypatch, deterministic_algorithms):
    """With deterministic algorithms on, deb (the fast path's per-expert bias gradient where seg_outer
    does not give it: B frozen) comes from a fixed-order reduction, not index_add (atomics on CUDA),
    and equals the reference; a non-finite dy stays in its own expert's row."""
    torch.manual_seed(3)
    N, idx = 4, torch.tensor([2, 0, 2, 3, 0, 2])  # expert 1 empty
    x, W, A, B = torch.randn(6, 3, 8), torch.randn(5, 8), torch.randn(N, 2, 8), torch.randn(N, 5, 2)
    eb = torch.randn(N, 5)
    seg = build_segments(idx, N)

    def no_index_add(*a, **k):
        raise AssertionError("index_add used with deterministic algorithms on")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_index_add)
    monkeypatch.setattr(torch.Tensor, "index_add", no_index_add)
    dy = torch.randn(6, 3, 5)
    ebg = eb.clone().requires_grad_()
    y = L.lora_linear(x, W, None, A, B, idx, 0.5, expert_bias=ebg, backend="triton", segments=seg)
    (deb,) = torch.autograd.grad(y, ebg, dy)
    want = torch.stack([dy[idx == e].sum(dim=(0, 1)) for e in range(N)])
    assert_close("deb", deb, want, TOL[torch.float32])
    assert torch.equal(deb[1], torch.zeros(5))
    dy[3, 0, 0] = float("inf")  # sample 3 is expert 3's only one
    g = fast._expert_bias_grad(dy, idx, N, torch.empty(0))
    assert torch.isinf(g[3, 0]) and torch.isfinite(g[[0, 1, 2]]).all()


def test_cpp_expert_bias_grad_deterministic_without_index_add(deterministic_algorithms):
    """The cpp backend's deb (C++: a profiler sees its ATen ops) under deterministic algorithms: no
    index_add (atomics on CUDA), the reference values."""
    _maybe_skip("cpu", "cpp", torch.float32)
    torch.manual_seed(4)
    N, idx = 4, torch.tensor([2, 0, 2, 3, 0, 2])
    x, W, A, B = torch.randn(6, 3, 8), torch.randn(5, 8), torch.randn(N, 2, 8), torch.randn(N, 5, 2)
    eb = torch.randn(N, 5)
    dy, seg = torch.randn(6, 3, 5), build_segments(idx, N)  # (its counts: an int index_add, exact)
    ebg = eb.clone().requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = L.lora_linear(x, W, None, A, B, idx, 0.5, expert_bias=ebg, backend="cpp", segments=seg)
        (deb,) = torch.autograd.grad(y, ebg, dy)
    ops = {e.name for e in prof.events()}
    assert not {"aten::index_add_", "aten::index_add"} & ops, sorted(o for o in ops if "index" in o)
    want = torch.stack([dy[idx == e].sum(dim=(0, 1)) for e in range(N)])
    assert_close("deb", deb, want, TOL[torch.float32])


def test_segments_of_another_tensor_refused_without_value_compare(monkeypatch):
    """Off the CPU (forced here) values are never compared (a host sync): segments passed with
    another expert_idx tensor of the same length, even an equal copy, are refused; the tensor they
    were built from (or a same-layout view of it) passes, an in-place change is caught by its version."""
    from ppap_fast.ops.lora import segments as S

    def no_value_compare(*a, **k):
        raise AssertionError("check_segments compared values (a host sync on CUDA)")

    idx = torch.tensor([0, 1, 1, 2])
    seg = build_segments(idx, 3)
    monkeypatch.setattr(S, "_values_comparable", lambda a, b: False, raising=False)
    monkeypatch.setattr(torch, "equal", no_value_compare)
    S.check_segments(seg, idx, 3)
    S.check_segments(seg, idx.view(4), 3)
    for other in (idx.clone(), torch.tensor([2, 2, 0, 1]), idx.to(torch.int32)):
        with pytest.raises(ValueError, match="another expert_idx tensor"):
            S.check_segments(seg, other, 3)
    with pytest.raises(ValueError, match="another expert_idx tensor"):  # through a public op
        L.lora_linear(torch.randn(4, 8), torch.randn(6, 8), None, torch.randn(3, 2, 8), torch.randn(3, 6, 2),
                      idx.clone(), 0.5, backend="reference", segments=seg)
    idx.add_(0)
    with pytest.raises(ValueError, match="stale"):
        S.check_segments(seg, idx, 3)


def _tensor_scale_case(kind):
    """A small mixed-expert LoRA linear / grouped conv case: N, idx, x, W, A, B, the op's kwargs, op, reference."""
    N, idx = 3, torch.tensor([2, 0, 2, 1])
    if kind == "linear":
        x, W, A, B, kw = torch.randn(4, 2, 6), torch.randn(5, 6), torch.randn(N, 2, 6), torch.randn(N, 5, 2), {}
    else:
        x, W, A, B = torch.randn(4, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.randn(N, 4, 2, 3, 3), torch.randn(N, 6, 2)
        kw = dict(padding=1, groups=2)
    op, ref = (L.lora_linear, R.lora_linear) if kind == "linear" else (L.lora_conv2d, R.lora_conv2d)
    return N, idx, x, W, A, B, kw, op, ref


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_tensor_scale_gets_its_gradient(kind, backend):
    """A tensor scale that requires grad (a learned LoRA scale): d(scale) as the reference gives it, no
    warning, with the other grads unchanged (it was dropped with a warning)."""
    _maybe_skip("cpu", backend, torch.float32)
    torch.manual_seed(5)
    N, idx, x, W, A, B, kw, op, ref = _tensor_scale_case(kind)
    eb, s = torch.randn(N, W.shape[0]), torch.tensor(0.7)
    ins = [t.clone().requires_grad_() for t in (x, A, B, eb, s)]
    ins_r = [t.double().requires_grad_() for t in (x, A, B, eb, s)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = op(ins[0], W, None, ins[1], ins[2], idx, ins[4], expert_bias=ins[3], backend=backend, **kw)
        y_r = ref(ins_r[0], W.double(), None, ins_r[1], ins_r[2], idx, ins_r[4], expert_bias=ins_r[3], **kw)
        assert_close("y", y, y_r, TOL[torch.float32])
        dy = torch.randn(y.shape)
        got = torch.autograd.grad(y, ins, dy)
    for name, a, w in zip(["dx", "dA", "dB", "deb", "dscale"], got, torch.autograd.grad(y_r, ins_r, dy.double())):
        assert a.dtype == torch.float32, name
        assert_close(name, a, w, TOL[torch.float32])
    # only the scale needs a gradient
    (gs,) = torch.autograd.grad(op(x, W, None, A, B, idx, ins[4], backend=backend, **kw), ins[4], dy)
    (gs_r,) = torch.autograd.grad(ref(x.double(), W.double(), None, A.double(), B.double(), idx, ins_r[4], **kw),
                                  ins_r[4], dy.double())
    assert_close("dscale alone", gs, gs_r, TOL[torch.float32])


@pytest.mark.parametrize("backend", CPU_FAST_BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("needs_grad", [False, True], ids=["plain", "learned-no_grad"])
def test_tensor_scale_is_not_read_on_the_host(kind, backend, needs_grad, monkeypatch):
    """A tensor scale with no gradient wanted (a plain one, or a learned one under no_grad, as when
    sampling) is folded into B, never read with float()/.item(): on CUDA each read was a device-to-host
    sync per layer call (and an error under CUDA graph capture); the result as the reference."""
    _maybe_skip("cpu", backend, torch.float32)
    torch.manual_seed(6)
    N, idx, x, W, A, B, kw, op, ref = _tensor_scale_case(kind)
    s = torch.tensor(0.7, requires_grad=needs_grad)
    reads = []
    for name in ("__float__", "item"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name):
            if self is s:
                reads.append(_name)
            return _orig(self, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with torch.no_grad():
        y = op(x, W, None, A, B, idx, s, backend=backend, **kw)
    assert L.last_backend[op.__name__] == backend
    assert reads == [], f"the scale tensor was read on the host: {reads}"
    y_r = ref(x.double(), W.double(), None, A.double(), B.double(), idx, s.detach().double(), **kw)
    assert_close("y", y, y_r, TOL[torch.float32])


def test_cpp_backend_refuses_double_backward():
    """Its backward is built from kernels without derivatives: create_graph=True raises instead of
    returning second-order grads that would be silently wrong."""
    if not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    x = torch.randn(3, 4, requires_grad=True)
    A, B = torch.randn(2, 2, 4, requires_grad=True), torch.randn(2, 5, 2, requires_grad=True)
    y = L.lora_linear(x, torch.randn(5, 4), None, A, B, torch.tensor([0, 1, 1]), 1.0, backend="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    y = L.lora_linear(x, torch.randn(5, 4), None, A, B, torch.tensor([0, 1, 1]), 1.0, backend="cpp")
    (gx,) = torch.autograd.grad(y.square().sum(), x)  # first order still works
    assert torch.isfinite(gx).all()


def test_global_set_backend_reaches_the_lora_ops():
    """ppap_fast.ops.set_backend(name) forces name on every op that has it, the LoRA ops included."""
    from ppap_fast import ops

    if not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B, idx = torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.tensor([0, 1, 1])
    try:
        ops.set_backend("cpp")
        L.lora_linear(x, W, None, A, B, idx, 1.0)
        assert L.last_backend["lora_linear"] == "cpp"
        L.lora_conv2d_delta(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), None, torch.randn(2, 4, 3, 3, 3),
                            idx[:2], padding=1)  # no cpp backend there: automatic choice
        assert L.last_backend["lora_conv2d_delta"] == "vectorized"
        ops.set_backend("reference")
        L.lora_linear(x, W, None, A, B, idx, 1.0)
        assert L.last_backend["lora_linear"] == "reference"
        assert L.lora_linear(x, W, None, A, B, idx, 1.0, backend="cpp") is not None  # explicit wins
        assert L.last_backend["lora_linear"] == "cpp"
    finally:
        ops.set_backend(None)


def test_lora_backend_environment_reaches_the_ops_that_have_it(monkeypatch):
    """PPAP_LORA_BACKEND, like ops.set_backend, applies to the LoRA ops that have the backend named:
    PPAP_LORA_BACKEND=cpp (or triton) made every lora_conv2d_delta (a loralib bank's routed conv) raise
    "op 'lora_conv2d_delta' has no backend 'cpp'", and =vectorized every lora_linear. A name that is no
    LoRA backend raises, naming the variable; an explicit backend= stays strict."""
    if not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    monkeypatch.delenv("PPAP_FAST_LORA_DELTA", raising=False)
    monkeypatch.delenv("PPAP_FAST_LORA_CPP", raising=False)
    x, W = torch.randn(3, 4), torch.randn(5, 4)
    A, B, idx = torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.tensor([0, 1, 1])
    xc, Wc, d = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    want = R.lora_conv2d_delta(xc, Wc, None, d, idx[:2], 1, 1)
    for env, linear, delta in (("cpp", "cpp", "vectorized"), ("vectorized", "reference", "vectorized"),
                               ("reference", "reference", "reference")):
        monkeypatch.setenv("PPAP_LORA_BACKEND", env)
        L.lora_linear(x, W, None, A, B, idx, 1.0)
        assert L.last_backend["lora_linear"] == linear, env
        got = L.lora_conv2d_delta(xc, Wc, None, d, idx[:2], padding=1)
        assert L.last_backend["lora_conv2d_delta"] == delta, env
        assert_close(f"delta under {env}", got, want, 1e-5)
    monkeypatch.setenv("PPAP_LORA_BACKEND", "cpp")
    with pytest.raises(L.BackendUnavailableError, match="has no backend 'cpp'"):
        L.lora_conv2d_delta(xc, Wc, None, d, idx[:2], padding=1, backend="cpp")
    monkeypatch.setenv("PPAP_LORA_BACKEND", "tritn")
    with pytest.raises(ValueError, match="PPAP_LORA_BACKEND='tritn' is no LoRA backend"):
        L.lora_linear(x, W, None, A, B, idx, 1.0)


def test_empty_batch_and_expert_bias_shape():
    """S = 0 gives empty outputs and gradients (as the wrapped layers do); an expert_bias not shaped
    [N, C_out] is refused up front (it failed later, or silently, depending on the routing)."""
    N, r, K, O = 3, 4, 5, 6
    idx0 = torch.zeros(0, dtype=torch.long)
    A = torch.randn(N, r, K, requires_grad=True)
    y = L.lora_linear(torch.randn(0, K), torch.randn(O, K), None, A, torch.randn(N, O, r), idx0, 0.5)
    assert y.shape == (0, O)
    y.sum().backward()
    assert A.grad is not None and not A.grad.any()
    Ac = torch.randn(N, r, K, 3, 3, requires_grad=True)
    y = L.lora_conv2d(torch.randn(0, K, 4, 4), torch.randn(O, K, 3, 3), None, Ac, torch.randn(N, O, r), idx0, 0.5,
                      padding=1)
    assert y.shape == (0, O, 4, 4)
    y.sum().backward()
    d = torch.randn(N, O, K, 3, 3, requires_grad=True)
    y = L.lora_conv2d_delta(torch.randn(0, K, 4, 4), torch.randn(O, K, 3, 3), None, d, idx0, padding=1)
    assert y.shape == (0, O, 4, 4)
    y.sum().backward()
    idx = torch.tensor([0, 2])
    for eb in (torch.randn(N - 1, O), torch.randn(N + 2, O), torch.randn(N * O)):
        with pytest.raises(ValueError, match="expert_bias must be"):
            L.lora_linear(torch.randn(2, K), torch.randn(O, K), None, A, torch.randn(N, O, r), idx, 0.5, eb)
        with pytest.raises(ValueError, match="expert_bias must be"):
            L.lora_conv2d(torch.randn(2, K, 4, 4), torch.randn(O, K, 3, 3), None, Ac, torch.randn(N, O, r), idx, 0.5,
                          padding=1, expert_bias=eb)


def test_expert_bank_takes_an_empty_batch():
    from ppap_fast.experts import ExpertBank
    from ppap_fast.models.tiny import TinyResNet

    bank = ExpertBank(TinyResNet(widths=(4, 8), layers=(1, 1), in_channels=1, num_classes=3), "resnet",
                      n_experts=4, r=2, alpha=1).eval()
    assert bank(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)).shape == (0, 3)


def _strided(idx):
    big = torch.full((2 * idx.numel(),), 7, dtype=idx.dtype)
    big[::2] = idx
    return big[::2]


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if INTERP else []))
@pytest.mark.parametrize("idx_kind", ["int32", "strided", "strided_int32"])
def test_expert_idx_int32_and_strided(backend, idx_kind):
    """expert_idx may be int32 and/or a strided view: the reference conv's inverse permutation took
    idx's dtype (int32: index_put dtype error), and the kernels that read expert_idx[s] directly
    (conv_lora_fwd: linear with >= 16 rows a sample, implicit / in_base convs) read a strided int64
    view as if contiguous (wrong experts)."""
    if backend == "cpp" and not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    idx = torch.tensor([0, 1, 1, 0])
    idx = {"int32": idx.int(), "strided": _strided(idx), "strided_int32": _strided(idx.int())}[idx_kind]
    S, N, K, O, r = 4, 2, 8, 6, 16
    x, W, A, B, eb = mk(S, 16, K), mk(O, K), mk(N, r, K), mk(N, O, r), mk(N, O)
    want = R.lora_linear(x, W, None, A, B, idx.long().contiguous(), 0.5, eb)
    t = lambda v: v.float().requires_grad_()  # noqa: E731
    leaves = [t(x), t(A), t(B), t(eb)]
    got = L.lora_linear(leaves[0], W.float(), None, leaves[1], leaves[2], idx, 0.5, leaves[3], backend=backend)
    assert_close(f"linear y {idx_kind}", got, want, 2e-5)
    xc, Wc, Ac, Bc = mk(S, 3, 6, 5), mk(4, 3, 3, 3), mk(N, 5, 3, 3, 3), mk(N, 4, 5)
    want = R.lora_conv2d(xc, Wc, None, Ac, Bc, idx.long().contiguous(), 0.5, 1, 1, 1, 1, eb[:, :4])
    stages = ["stacked"] if backend != "triton" else ["stacked", "implicit", "in_base"]
    for st in stages:
        kw = {} if backend == "reference" else {"a_stage": st}
        got = L.lora_conv2d(xc.float(), Wc.float(), None, Ac.float(), Bc.float(), idx, 0.5, 1, 1, 1, 1,
                            eb[:, :4].float(), backend=backend, **kw)
        assert_close(f"conv y {idx_kind} {st}", got, want, 2e-5)


@pytest.mark.parametrize("idx", [[0, 1], (0, 1), "ndarray", torch.tensor([0, 1], dtype=torch.uint8)],
                         ids=["list", "tuple", "ndarray", "uint8"])
def test_expert_idx_that_is_no_int_tensor_is_refused_by_name(idx):
    """expert_idx as a Python list / tuple / numpy array raised a bare AttributeError ('list' object has
    no attribute 'dim') in every public op taking it; a uint8 tensor was called "not an integer tensor"."""
    from ppap_fast.ops import norm as NM

    idx = __import__("numpy").array([0, 1]) if isinstance(idx, str) else idx
    N, K, O = 2, 4, 3
    x, xc = torch.randn(2, K), torch.randn(2, K, 4, 4)
    Wc = torch.randn(O, K, 3, 3)
    calls = {
        "lora_linear": lambda: L.lora_linear(x, torch.randn(O, K), None, torch.randn(N, 2, K), torch.randn(N, O, 2),
                                             idx, 1.0),
        "lora_conv2d": lambda: L.lora_conv2d(xc, Wc, None, torch.randn(N, 2, K, 3, 3), torch.randn(N, O, 2), idx,
                                             1.0, padding=1),
        "lora_conv2d_delta": lambda: L.lora_conv2d_delta(xc, Wc, None, torch.randn(N, O, K, 3, 3), idx, padding=1),
        "expert_layer_norm": lambda: NM.expert_layer_norm(x, idx, torch.ones(N, K), torch.zeros(N, K)),
        "expert_group_norm": lambda: NM.expert_group_norm(xc, idx, 2, torch.ones(N, K), torch.zeros(N, K)),
        "expert_batch_norm": lambda: NM.expert_batch_norm(xc, idx, torch.ones(N, K), torch.zeros(N, K),
                                                          torch.zeros(N, K), torch.ones(N, K), True),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="expert_idx must be an int64 or int32 tensor"):
            call()


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_expert_idx_on_another_device_than_x_is_refused(backend):
    """expert_idx on another device than x (here meta, as a CUDA index beside CPU x, or the reverse) skipped the
    CPU range check and ran: every op returned a CPU result without complaint (the kernels read the index at a
    pointer of the wrong device)."""
    from ppap_fast.ops import norm as NM

    if L.available_backends("lora_linear", "cpu")[backend] != "ok":
        pytest.skip(f"backend {backend!r} cannot run here")
    idx = torch.tensor([0, 1], device="meta")
    N, K, O = 2, 4, 3
    x, xc = torch.randn(2, K), torch.randn(2, K, 4, 4)
    Wc = torch.randn(O, K, 3, 3)
    norm_backend = "reference" if backend == "cpp" else backend
    calls = {
        "lora_linear": lambda: L.lora_linear(x, torch.randn(O, K), None, torch.randn(N, 2, K), torch.randn(N, O, 2),
                                             idx, 1.0, backend=backend),
        "lora_conv2d": lambda: L.lora_conv2d(xc, Wc, None, torch.randn(N, 2, K, 3, 3), torch.randn(N, O, 2), idx,
                                             1.0, padding=1, backend=backend),
        "lora_conv2d_delta": lambda: L.lora_conv2d_delta(xc, Wc, None, torch.randn(N, O, K, 3, 3), idx, padding=1),
        "expert_layer_norm": lambda: NM.expert_layer_norm(x, idx, torch.ones(N, K), torch.zeros(N, K),
                                                          backend=norm_backend),
        "expert_group_norm": lambda: NM.expert_group_norm(xc, idx, 2, torch.ones(N, K), torch.zeros(N, K),
                                                          backend=norm_backend),
        "expert_batch_norm": lambda: NM.expert_batch_norm(xc, idx, torch.ones(N, K), torch.zeros(N, K),
                                                          torch.zeros(N, K), torch.ones(N, K), True,
                                                          backend=norm_backend),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"expert_idx is on meta, x on cpu: move it with expert_idx.to\('cpu'\)"):
            call()


@pytest.mark.skipif(not INTERP, reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["linear", "stacked", "fused", "implicit"])
def test_triton_double_backward_is_refused(kind):
    """create_graph=True through the Triton LoRA paths (@once_differentiable): a gradient penalty's
    grad w.r.t. A came back silently without the penalty's share (66 vs 7e5 against the reference).
    Now it raises, as the cpp backend does."""
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 1, 1])
    if kind == "linear":
        x, W, A, B = (torch.randn(*s, generator=g) for s in ((3, 5, 8), (6, 8), (2, 4, 8), (2, 6, 4)))
        run = lambda xs, As: L.lora_linear(xs, W, None, As, B, idx, 1.0, backend="triton")  # noqa: E731
    else:
        x, W, A, B = (torch.randn(*s, generator=g) for s in ((3, 3, 5, 5), (4, 3, 3, 3), (2, 4, 3, 3, 3), (2, 4, 4)))
        run = lambda xs, As: L.lora_conv2d(xs, W, None, As, B, idx, 1.0, 1, 1,  # noqa: E731
                                           backend="triton", a_stage=kind)
    xs, As = x.clone().requires_grad_(), A.clone().requires_grad_()
    y = run(xs, As)
    with pytest.raises(RuntimeError, match="double backward"):
        dx, = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        torch.autograd.grad(y.sum() + dx.square().sum(), As)
    y = run(xs, As)  # first-order backward still works
    assert torch.autograd.grad(y.sum(), As)[0].shape == A.shape


def test_a_stage_auto_raises_device_faults():
    """A stage that cannot run is not chosen (inf), but a CUDA error (illegal address, device assert) is
    raised: it poisons the context for every later call, and was recorded as inf and hidden."""
    from ppap_fast.ops.lora import autotune

    autotune.clear_a_stage_choices()

    def run(exc):
        def stage(name):
            if name == "implicit":
                raise exc
        return stage

    cpu = torch.device("cpu")
    assert autotune.choose(run(RuntimeError("out of resources: shared memory")), ("k1",), autotune.CANDIDATES, cpu) \
        != "implicit"
    with pytest.raises(RuntimeError, match="illegal memory access"):
        autotune.choose(run(RuntimeError("CUDA error: an illegal memory access was encountered")), ("k2",),
                        autotune.CANDIDATES, cpu)
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None:
        with pytest.raises(accel):
            autotune.choose(run(accel("device-side assert triggered")), ("k3",), autotune.CANDIDATES, cpu)
    assert ("k2",) not in autotune.a_stage_choices()
    autotune.clear_a_stage_choices()


def _record_conv_outputs(monkeypatch):
    """Element counts of every F.conv2d output from here on (the stacked and fused convs call it)."""
    sizes, conv = [], F.conv2d

    def spy(*args, **kwargs):
        y = conv(*args, **kwargs)
        sizes.append(y.numel())
        return y

    monkeypatch.setattr(F, "conv2d", spy)
    return sizes


def test_stacked_delta_conv_splits_the_batch_past_the_element_limit(monkeypatch):
    """The stacked delta conv's [S, N*C_out, Ho, Wo] output reaches 96% of 2^31 elements for ResNet50's
    layer1 conv3 at batch 256, N = 10 (past 2^31 cuDNN / 32-bit kernels fail or index wrong). With the
    limit lowered to 1000 elements (432 per sample here, 2160 in all) the batch must run in chunks whose
    conv outputs stay within it, with forward and every gradient equal to the reference."""
    g = torch.Generator().manual_seed(11)
    N, S = 3, 5
    x = torch.randn(S, 3, 6, 6, generator=g, dtype=torch.float64)
    W, b = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    delta = torch.randn(N, 4, 3, 3, 3, generator=g, dtype=torch.float64) * 0.1
    eb = torch.randn(N, 4, generator=g, dtype=torch.float64)
    idx, dy = torch.tensor([2, 0, 2, 1, 0]), torch.randn(S, 4, 6, 6, generator=g, dtype=torch.float64)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, delta, eb)]
        y = fn(leaves[0], W, b, leaves[1], idx, 1, 1, 1, 1, leaves[2])
        return [y, *torch.autograd.grad(y, leaves, dy)]

    want = run(R.lora_conv2d_delta)
    monkeypatch.setattr(R, "MAX_INTERMEDIATE_NUMEL", 1000, raising=False)
    sizes = _record_conv_outputs(monkeypatch)
    got = run(lambda *a: L.lora_conv2d_delta(*a, backend="stacked"))
    assert L.last_backend["lora_conv2d_delta"] == "stacked"
    assert sizes and max(sizes) <= 1000, f"conv outputs of {sizes} elements exceed the limit of 1000"
    for name, a, w in zip(["y", "dx", "ddelta", "deb"], got, want):
        assert_close(f"chunked stacked delta conv {name}", a, w, 1e-12)


def _element_limit_case(seed: int):
    """A float64 lora_conv2d case (N=3 experts, S=5, rank 4, 3x3 conv 3->4 on 6x6) whose stacked A conv
    is [5, 12, 6, 6] (2160 elements): run(dev, dtype, **op_kwargs) -> [y, dx, dA, dB, deb]."""
    g = torch.Generator().manual_seed(seed)
    N, S, r = 3, 5, 4
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, W, b = mk(S, 3, 6, 6), mk(4, 3, 3, 3) / 3, mk(4)
    A, B, eb = mk(N, r, 3, 3, 3) / 3, mk(N, 4, r), mk(N, 4)
    idx, dy = torch.tensor([2, 0, 2, 1, 0]), mk(S, 4, 6, 6)

    def run(dev, dt, **kw):
        leaves = [t.to(dev, dt).clone().requires_grad_(True) for t in (x, A, B, eb)]
        y = L.lora_conv2d(leaves[0], W.to(dev, dt), b.to(dev, dt), leaves[1], leaves[2], idx.to(dev), 0.5, 1, 1,
                          expert_bias=leaves[3], **kw)
        return [y, *torch.autograd.grad(y, leaves, dy.to(dev, dt))]

    return run


@pytest.mark.skipif(not INTERP and not HAS_CUDA, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("a_stage", ["stacked", "fused"])
def test_lora_conv2d_stacked_a_splits_the_batch_past_the_element_limit(monkeypatch, a_stage):
    """lora_conv2d's N-fold A-stage tensors: the stacked A conv [S, N*r, Ho, Wo] (2160 elements here) and
    the fused [S, C_out + N*r, Ho, Wo] conv (2880). Past the limit (lowered to 1000) the stacked one runs
    in batch chunks and fused falls back to it; y and every gradient still match the reference (the
    fast path's buffers poisoned), and last_backend reports the stacked A stage that ran."""
    dev = "cuda" if HAS_CUDA else "cpu"
    run = _element_limit_case(12)
    want = run("cpu", torch.float64, backend="reference")
    monkeypatch.setattr(R, "MAX_INTERMEDIATE_NUMEL", 1000, raising=False)
    sizes = _record_conv_outputs(monkeypatch)
    got = run(dev, torch.float32, backend="triton", a_stage=a_stage)
    assert L.last_backend["lora_conv2d/a_stage"] == "stacked"  # fused fell back: it reported "fused"
    assert sizes and max(sizes) <= 1000, f"conv outputs of {sizes} elements exceed the limit of 1000"
    for name, a, w in zip(["y", "dx", "dA", "dB", "deb"], got, want):
        assert_close(f"{a_stage} chunked {name}", a.cpu(), w, TOL[torch.float32])


def test_cpp_lora_conv2d_splits_the_batch_past_the_element_limit(monkeypatch):
    """The cpp backend's C++ stacked A conv [S, N*r, Ho, Wo] (2160 elements here): past the limit
    (lowered to 1000) the batch goes to the C++ op in chunks of at most 1000 // 432 = 2 samples; y and
    every gradient match the reference."""
    _maybe_skip("cpu", "cpp", torch.float64)
    N, r = 3, 4
    run = _element_limit_case(13)
    want = run("cpu", torch.float64, backend="reference", a_stage="stacked")
    monkeypatch.setattr(R, "MAX_INTERMEDIATE_NUMEL", 1000, raising=False)
    batches, op = [], torch.ops.ppap_fast.lora_conv2d_cpp
    monkeypatch.setattr(torch.ops.ppap_fast, "lora_conv2d_cpp", lambda x, *a: (batches.append(x.shape[0]), op(x, *a))[1])
    got = run("cpu", torch.float64, backend="cpp", a_stage="stacked")
    assert batches and max(batches) * N * r * 36 <= 1000, f"C++ calls over batches {batches} exceed the limit"
    for name, a, w in zip(["y", "dx", "dA", "dB", "deb"], got, want):
        assert_close(f"cpp chunked {name}", a, w, 1e-10)



def test_implicit_conv_launch_grids_stay_within_cuda_limits_past_65535_pixel_tiles(monkeypatch):
    """conv_lora_fwd put the pixel tiles on grid axis 1, which CUDA caps at 65535: a 1024x1024 map with
    16-row tiles (the GPU's choice for fp32 and rank > 64) gave 65536; conv_lora_dgrad's 64-row tiles
    passed it at 2048x2048. Grids recorded with the GPU's tiles, nothing run (the interpreter would take
    minutes): one launch each (3 samples), within the limits, covering every (pixel tile, sample)."""
    monkeypatch.setattr(TK, "_interpreting", lambda: False)
    fwd, dgrad = LaunchRecorder(), LaunchRecorder()
    monkeypatch.setattr(TK, "_conv_lora_fwd_kernel", fwd)
    monkeypatch.setattr(TK, "_conv_lora_dgrad_kernel", dgrad)
    S, N, R = 3, 2, 128
    idx, A, B = torch.tensor([1, 0, 1]), torch.zeros(N, R, 1, 1, 1), torch.zeros(N, 1, R)
    big = lambda c, hw: torch.zeros(1, 1, 1, 1).expand(S, c, hw, hw)  # noqa: E731  (strides only)
    TK.conv_lora_fwd(big(1, 1024), A, B, big(1, 1024), idx, 1.0, h_out=big(R, 1024))
    TK.conv_lora_dgrad(big(R, 2048), A, big(1, 2048), idx)
    # (recorder, pixel tiles a sample, position of the first-sample argument s0)
    for rec, tiles, s0_arg in ((fwd, 1024 * 1024 // 16, 7), (dgrad, 2048 * 2048 // 64, 4)):
        assert len(rec.launches) == 1
        grid, args = rec.launches[0]
        assert_grid_within_cuda_limits(grid)
        assert grid[0] == tiles and grid[-1] == S and args[s0_arg] == 0


@pytest.mark.skipif(not INTERP and not HAS_CUDA, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_implicit_conv_sample_chunks_match_float64(monkeypatch):
    """Samples in launches of <= MAX_GRID_YZ (lowered to 2: 5 samples in 3 launches, the last partial), 4
    pixel tiles (9x7 map, 16-row tiles under the interpreter), 2 channel tiles in the dgrad, against
    per-sample float64 convs; h poisoned, y and dx accumulated in place."""
    from ppap_fast.ops import _kernel_util

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 2)
    recorders = [LaunchRecorder(getattr(TK, name)) for name in ("_conv_lora_fwd_kernel", "_conv_lora_dgrad_kernel")]
    for name, rec in zip(("_conv_lora_fwd_kernel", "_conv_lora_dgrad_kernel"), recorders):
        monkeypatch.setattr(TK, name, rec)
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(21)
    S, N, C, R, NOUT = 5, 2, 20, 6, 5
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, A, B, y0, dh, dx0 = mk(S, C, 9, 7), mk(N, R, C, 3, 3) / 8, mk(N, NOUT, R), mk(S, NOUT, 9, 7), \
        mk(S, R, 9, 7), mk(S, C, 9, 7)
    idx = torch.tensor([1, 0, 1, 1, 0])
    on = lambda t: t.to(dev, torch.float32)  # noqa: E731
    y, dx, h = on(y0), on(dx0), torch.full((S, R, 9, 7), float("nan"), device=dev)
    TK.conv_lora_fwd(on(x), on(A), on(B), y, idx.to(dev), 0.5, 1, 1, h_out=h)
    TK.conv_lora_dgrad(on(dh), on(A), dx, idx.to(dev), 1, 1)
    assert [[grid[-1] for grid, _ in rec.launches] for rec in recorders] == [[2, 2, 1] * 1] * 2
    h_ref = torch.cat([F.conv2d(x[i:i + 1], A[idx[i]], None, 1, 1) for i in range(S)])
    y_ref = y0 + 0.5 * torch.einsum("snr,srhw->snhw", B[idx], h_ref)
    dx_ref = dx0 + torch.cat([F.conv_transpose2d(dh[i:i + 1], A[idx[i]], None, 1, 1) for i in range(S)])
    for name, got, want in (("h", h, h_ref), ("y", y, y_ref), ("dx", dx, dx_ref)):
        assert_close(f"sample chunks {name}", got.cpu(), want, TOL[torch.float32])


def test_wgrad_auto_split_aims_at_programs_per_sm(monkeypatch):
    """conv_lora_wgrad's automatic split on a GPU: about WGRAD_PROGRAMS_PER_SM programs a SM (resnet50.layer3.conv2,
    N=5, 132 SMs: 180 tiles -> split 6; 2 a SM, the split before: 2), capped by 4 row tiles a program and 16;
    off the GPU 2 a SM whatever the setting. The launch uses it (grid axis 2 = taps x split)."""
    import types

    monkeypatch.setattr(TK, "_interpreting", lambda: False)
    monkeypatch.setattr(TK, "sm_count", lambda device, other: 132 if device.type == "cuda" else other)
    fake = lambda *shape: types.SimpleNamespace(shape=shape, device=torch.device("cuda"), dtype=torch.float16)  # noqa: E731
    x, dh, out = fake(64, 256, 14, 14), fake(64, 16, 14, 14), fake(5, 16, 256, 3, 3)
    assert TK.WGRAD_PROGRAMS_PER_SM == 8
    assert TK.wgrad_auto_split(x, dh, out) == 6 and TK.wgrad_auto_split(x, dh, out, per_sm=2) == 2
    assert TK.wgrad_auto_split(fake(64, 256, 2, 2), fake(64, 16, 2, 2), out) == 1  # 256 rows: few row tiles
    assert TK.wgrad_auto_split(x, dh, fake(5, 16, 64, 1, 1), per_sm=100) == 10  # rows / (64 x 5 x 4)
    monkeypatch.setattr(TK, "WGRAD_PROGRAMS_PER_SM", 64)
    cpu = lambda *shape: types.SimpleNamespace(shape=shape, device=torch.device("cpu"), dtype=torch.float16)  # noqa: E731
    assert TK.wgrad_auto_split(cpu(64, 256, 14, 14), cpu(64, 16, 14, 14), out) == 1  # 2 x 4 "SMs" / 180 tiles
    rec = LaunchRecorder()
    monkeypatch.setattr(TK, "_conv_lora_wgrad_kernel", rec)
    monkeypatch.setattr(TK, "wgrad_auto_split", lambda *a, **k: 3)
    xs, dhs = torch.randn(4, 8, 5, 5), torch.randn(4, 2, 5, 5)
    seg = build_segments(torch.tensor([0, 1, 1, 0]), 2)
    TK.conv_lora_wgrad(xs, dhs, torch.empty(2, 2, 8, 3, 3), seg.sorted_idx, seg.offsets, 1, 1, 1)
    (grid, _), = rec.launches
    assert grid[2] == 9 * 3


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if INTERP else []))
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float64)])
def test_mixed_dtypes_are_refused_by_every_backend(backend, x_dtype, w_dtype):
    """x fp16 with W fp32: the reference raised torch's bare dtype error, cpp promoted silently."""
    if backend == "cpp" and not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    idx = torch.tensor([0, 1])
    x, W, A, B = torch.randn(2, 8, dtype=x_dtype), torch.randn(6, 8), torch.randn(2, 4, 8), torch.randn(2, 6, 4)
    with pytest.raises(TypeError, match=rf"lora_linear: .*x {x_dtype}, W {w_dtype}, A {w_dtype}, B {w_dtype}"):
        L.lora_linear(x, W.to(w_dtype), None, A.to(w_dtype), B.to(w_dtype), idx, 0.5, backend=backend)
    with pytest.raises(TypeError, match=rf"x {x_dtype}, W {x_dtype}, A {w_dtype}, B {x_dtype}"):
        L.lora_linear(x, W.to(x_dtype), None, A.to(w_dtype), B.to(x_dtype), idx, 0.5, backend=backend)
    xc, Wc, Ac, Bc = torch.randn(2, 3, 6, 6, dtype=x_dtype), torch.randn(4, 3, 3, 3), torch.randn(2, 2, 3, 3, 3), \
        torch.randn(2, 4, 2)
    with pytest.raises(TypeError, match=rf"lora_conv2d: .*x {x_dtype}, W {w_dtype}, A {w_dtype}, B {w_dtype}"):
        L.lora_conv2d(xc, Wc.to(w_dtype), None, Ac.to(w_dtype), Bc.to(w_dtype), idx, 0.5, padding=1, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast computes in its dtype: mixed inputs are fine
        y = L.lora_linear(x.float(), W, None, A, B, idx, 0.5, backend=backend)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("op,backend", [("lora_linear", "reference"), ("lora_linear", "cpp"), ("lora_linear", "triton"),
                                        ("lora_conv2d", "reference"), ("lora_conv2d", "cpp"),
                                        ("lora_conv2d", "triton"), ("lora_conv2d_delta", "reference"),
                                        ("lora_conv2d_delta", "vectorized"), ("lora_conv2d_delta", "stacked")])
def test_expert_bias_keeps_the_autocast_dtype_on_every_backend(op, backend):
    """Under torch.autocast the fast paths return the autocast dtype; the reference (the automatic choice on
    CPU) added the float32 expert_bias after autocast's ops and returned float32 instead."""
    if backend == "cpp" and not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    if backend == "triton" and not INTERP:
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(7)
    idx = torch.tensor([2, 0, 2])
    eb = torch.randn(3, 4, generator=g)
    if op == "lora_linear":
        x, W, A, B = (torch.randn(*s, generator=g) for s in ((3, 2, 6), (4, 6), (3, 2, 6), (3, 4, 2)))
        run = lambda t, be: L.lora_linear(*t, idx, 0.5, eb.to(t[0].dtype), backend=be)  # noqa: E731
        args = (x, W, None, A, B)
    else:
        x, W, A, B, delta = (torch.randn(*s, generator=g) for s in ((3, 3, 5, 5), (4, 3, 3, 3), (3, 2, 3, 3, 3),
                                                                    (3, 4, 2), (3, 4, 3, 3, 3)))
        if op == "lora_conv2d":
            run = lambda t, be: L.lora_conv2d(*t, idx, 0.5, 1, 1, 1, 1, eb.to(t[0].dtype), backend=be)  # noqa: E731
            args = (x, W, None, A, B)
        else:
            run = lambda t, be: L.lora_conv2d_delta(*t, idx, 1, 1, 1, 1, eb.to(t[0].dtype), backend=be)  # noqa: E731
            args = (x, W, None, delta)
    want = run(tuple(None if t is None else t.double() for t in args), "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(args, backend)
    assert y.dtype == torch.bfloat16
    assert_close("autocast y", y, want, 3e-2)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_x_without_a_batch_dimension_is_refused(backend):
    """lora_linear with x [in] said "expert_idx must be [S]=in"; the convs with x [C_in, H, W] ran F.conv2d's
    unbatched form and failed in torch with a made-up input shape (or took C_in for the batch)."""
    if L.available_backends("lora_linear", "cpu")[backend] != "ok":
        pytest.skip(f"backend {backend!r} cannot run here")
    W, A, B = torch.randn(4, 6), torch.randn(2, 2, 6), torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match=r"lora_linear: x must be \[S, \.\.\., in\] .*got \(6,\)"):
        L.lora_linear(torch.randn(6), W, None, A, B, torch.tensor([0]), 0.5, backend=backend)
    xc, Wc, Ac, Bc = torch.randn(3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(2, 2, 3, 3, 3), torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match=r"lora_conv2d: x must be \[S, C_in, H, W\], got \(3, 5, 5\)"):
        L.lora_conv2d(xc, Wc, None, Ac, Bc, torch.tensor([0, 1, 1]), 0.5, 1, 1, backend=backend)
    with pytest.raises(ValueError, match=r"lora_conv2d_delta: x must be \[S, C_in, H, W\], got \(3, 5, 5\)"):
        L.lora_conv2d_delta(xc, Wc, None, torch.randn(2, 4, 3, 3, 3), torch.tensor([0, 1, 1]), 1, 1)


@pytest.mark.parametrize("op", ["lora_conv2d", "lora_conv2d_delta"])
def test_padding_same_with_stride_is_refused(op):
    """padding='same' with stride 2 was accepted (F.conv2d refuses it); 'valid' works, unknown strings refused;
    the errors (an even kernel's too) name the op."""
    torch.manual_seed(5)
    x, W, idx = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.tensor([1, 0])
    A, B = torch.randn(2, 2, 3, 3, 3), torch.randn(2, 4, 2)
    delta = torch.randn(2, 4, 3, 3, 3)

    def call(**kw):
        if op == "lora_conv2d":
            return L.lora_conv2d(x, W, None, A, B, idx, 0.5, **kw)
        return L.lora_conv2d_delta(x, W, None, delta, idx, **kw)

    for stride in (2, (1, 2)):
        stride_text = str(stride).replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(ValueError, match=op + r": padding='same' needs stride 1.*stride=" + stride_text):
            call(stride=stride, padding="same")
    assert torch.equal(call(stride=2, padding="valid"), call(stride=2, padding=0))
    assert call(stride=1, padding="same").shape[-2:] == (6, 6)
    with pytest.raises(ValueError, match=op + ": padding must be an int, a pair, 'same' or 'valid', got 'full'"):
        call(padding="full")
    W, A, delta = torch.randn(4, 3, 2, 3), torch.randn(2, 2, 3, 2, 3), torch.randn(2, 4, 3, 2, 3)
    with pytest.raises(ValueError, match=op + r": padding='same' with an even effective kernel .* F\.pad x yourself "
                       r"\(the odd pixel right / bottom, as F\.conv2d\) and pass padding=0"):
        call(padding="same")


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if INTERP else []))
@pytest.mark.parametrize("x_dtype,o_dtype", [(torch.float32, torch.float64), (torch.float16, torch.float32)])
def test_bias_and_expert_bias_of_another_dtype_are_refused(backend, x_dtype, o_dtype):
    """A bias / expert_bias in another dtype than x: the reference raised torch's bare error (bias) or promoted
    the output (expert_bias), cpp and triton cast silently."""
    if backend == "cpp" and not _cpp_ready("cpu"):
        pytest.skip("cpp backend unavailable")
    idx = torch.tensor([0, 1])
    x, W, A, B = (torch.randn(*s, dtype=x_dtype) for s in ((2, 8), (6, 8), (2, 4, 8), (2, 6, 4)))
    xc, Wc, Ac, Bc = (torch.randn(*s, dtype=x_dtype) for s in ((2, 3, 6, 6), (4, 3, 3, 3), (2, 2, 3, 3, 3), (2, 4, 2)))
    with pytest.raises(TypeError, match=rf"lora_linear: x, W, A, B and bias must .* B {x_dtype}, bias {o_dtype};"):
        L.lora_linear(x, W, torch.randn(6, dtype=o_dtype), A, B, idx, 0.5, backend=backend)
    with pytest.raises(TypeError, match=rf"lora_linear: .*B {x_dtype}, expert_bias {o_dtype};"):
        L.lora_linear(x, W, None, A, B, idx, 0.5, torch.randn(2, 6, dtype=o_dtype), backend=backend)
    with pytest.raises(TypeError, match=rf"lora_conv2d: .*B {x_dtype}, bias {o_dtype};"):
        L.lora_conv2d(xc, Wc, torch.randn(4, dtype=o_dtype), Ac, Bc, idx, 0.5, padding=1, backend=backend)
    with pytest.raises(TypeError, match=rf"lora_conv2d: .*B {x_dtype}, bias {x_dtype}, expert_bias {o_dtype};"):
        L.lora_conv2d(xc, Wc, torch.randn(4, dtype=x_dtype), Ac, Bc, idx, 0.5, padding=1,
                      expert_bias=torch.randn(2, 4, dtype=o_dtype), backend=backend)
    y = L.lora_linear(x, W, torch.randn(6, dtype=x_dtype), A, B, idx, 0.5, torch.randn(2, 6, dtype=x_dtype),
                      backend=backend)
    assert y.dtype == x_dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("backend", ["reference", "vectorized", "stacked"])
@pytest.mark.parametrize("o_dtype", [torch.float64, torch.float16])
def test_lora_conv2d_delta_refuses_mixed_dtypes(backend, o_dtype):
    """lora_conv2d_delta had no dtype check: the reference raised bare torch errors or promoted (W fp16 + delta
    fp32), vectorized / stacked cast W, bias, delta and expert_bias to x's dtype silently."""
    idx = torch.tensor([0, 1])
    x, W, delta = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 3, 3, 3)
    bias, eb = torch.randn(4), torch.randn(2, 4)
    cases = {"x": (x.to(o_dtype), W, delta, None, None), "W": (x, W.to(o_dtype), delta, None, None),
             "delta": (x, W, delta.to(o_dtype), None, None), "bias": (x, W, delta, bias.to(o_dtype), None),
             "expert_bias": (x, W, delta, bias, eb.to(o_dtype))}
    for name, (xx, ww, dd, bb, ee) in cases.items():
        with pytest.raises(TypeError, match=rf"lora_conv2d_delta: x, W.* one dtype, got (.*, )?{name} {o_dtype}"):
            L.lora_conv2d_delta(xx, ww, bb, dd, idx, padding=1, expert_bias=ee, backend=backend)
    y = L.lora_conv2d_delta(x, W, bias, delta, idx, padding=1, expert_bias=eb, backend=backend)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast computes in its dtype: mixed inputs are fine there
        y = L.lora_conv2d_delta(x, W.half(), bias, delta, idx, padding=1, expert_bias=eb, backend=backend)
    assert torch.isfinite(y).all()
