"""ops.norm_act.group_norm_act: fused GroupNorm (+ scale/shift) + SiLU. Reference vs the unfused torch
composition; Triton (CPU interpreter, small shapes; CUDA marked ``cuda``) vs float64, poisoned
outputs, NCHW and channels_last, large means."""
import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ppap_fast import ops
from ppap_fast.ops import norm_act as GA

from _util import LaunchRecorder, assert_grid_within_cuda_limits, poisoned_kernels, rel_err, requires_cuda

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(GA):
        yield


def _case(shape, G, gen, dtype, *, affine=True, scale_shift=True, mean=0.0, channels_last=False, device="cpu"):
    B, C = shape[:2]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + mean).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(C, generator=gen, dtype=torch.float64) if affine else None
    sc = torch.randn(B, C, generator=gen, dtype=torch.float64) * 0.3 if scale_shift else None
    sh = torch.randn(B, C, generator=gen, dtype=torch.float64) if scale_shift else None
    mv = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return x.to(device), mv(w, torch.float32), mv(b, torch.float32), mv(sc, dtype), mv(sh, dtype)


def _want(x, G, w, b, sc, sh, silu):
    up = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    return GA.group_norm_act_reference(up(x), G, up(w), up(b), 1e-5, up(sc), up(sh), silu)


def test_reference_is_the_unfused_composition():
    gen = torch.Generator().manual_seed(0)
    x, w, b, sc, sh = _case((3, 8, 5, 4), 4, gen, torch.float32)
    h = F.group_norm(x, 4, w, b, 1e-5) * (1 + sc[:, :, None, None]) + sh[:, :, None, None]
    assert torch.allclose(GA.group_norm_act_reference(x, 4, w, b, 1e-5, sc, sh), F.silu(h), atol=1e-6)
    assert torch.allclose(GA.group_norm_act_reference(x, 4, w, b, 1e-5, silu=False), F.group_norm(x, 4, w, b, 1e-5))
    # half input: statistics and activation in float32, one rounding at the end (GroupNorm32 + SiLU)
    xh = x.half()
    got = GA.group_norm_act_reference(xh, 4, w, b, 1e-5)
    assert got.dtype == torch.float16 and torch.equal(got, F.silu(F.group_norm(xh.float(), 4, w, b, 1e-5)).half())


CASES = [((2, 32, 6, 5), 8), ((3, 16, 4, 4), 16), ((2, 24, 7, 3), 1), ((4, 20, 9), 5), ((3, 12), 3),
         ((1, 64, 3, 3), 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ci", range(len(CASES)))
def test_triton_matches_float64(ci, dtype):
    shape, G = CASES[ci]
    gen = torch.Generator().manual_seed(ci)
    flags = itertools.product([True, False], [True, False], [True, False],
                              [False, True] if len(shape) == 4 else [False])
    for affine, scale_shift, silu, cl in flags:
        x, w, b, sc, sh = _case(shape, G, gen, dtype, affine=affine, scale_shift=scale_shift, channels_last=cl)
        got = GA.group_norm_act(x, G, w, b, scale=sc, shift=sh, silu=silu, backend="triton")
        assert ops.last_backend(GA.OP) == "triton"
        assert got.dtype == dtype and got.shape == x.shape
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        err = rel_err(got, _want(x, G, w, b, sc, sh, silu))
        assert err <= TOL[dtype], f"{shape} G{G} affine={affine} ss={scale_shift} silu={silu} cl={cl}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_bias_is_added_before_the_statistics(dtype):
    """in_bias [C] (a conv's bias) or [B, C] (plus ADM's embedding) equals adding it to x first; an
    offset of ~40 checks the shifted statistics with it. Triton and the reference, both layouts."""
    gen = torch.Generator().manual_seed(9)
    for (shape, G), per_sample, cl in itertools.product(CASES[:4], [False, True], [False, True]):
        if cl and len(shape) != 4:
            continue
        x, w, b, sc, sh = _case(shape, G, gen, dtype, channels_last=cl)
        B, C = shape[:2]
        ib = (torch.randn((B, C) if per_sample else (C,), generator=gen, dtype=torch.float64) * 3 + 40).to(dtype)
        x_plus = x.double() + ib.double().reshape((-1, C) + (1,) * (len(shape) - 2))
        want = GA.group_norm_act_reference(x_plus, G, *(t.double() for t in (w, b)), 1e-5, sc.double(), sh.double())
        for backend in ("triton", "reference"):
            got = GA.group_norm_act(x, G, w, b, scale=sc, shift=sh, in_bias=ib, backend=backend)
            assert ops.last_backend(GA.OP) == backend and got.dtype == dtype
            err = rel_err(got, want)  # the reference is torch's fp32 GroupNorm: less exact at a large mean
            tol = 2 * TOL[dtype] if backend == "triton" else max(2 * TOL[dtype], 1e-4)
            assert err <= tol, f"{backend} {shape} per_sample={per_sample} cl={cl}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_precision_dtypes_agree_across_backends(dtype):
    """Half x with float32 weight / bias / scale / shift / in_bias: y in x's dtype on both backends; the
    reference's gradients in each input's own dtype."""
    gen = torch.Generator().manual_seed(4)
    x, w, b, sc, sh = _case((2, 16, 3, 5), 4, gen, dtype)
    sc, sh, ib = sc.float(), sh.float(), torch.randn(16, generator=gen)
    ys = {bk: GA.group_norm_act(x, 4, w, b, scale=sc, shift=sh, in_bias=ib, backend=bk)
          for bk in ("triton", "reference")}
    assert ys["triton"].dtype == ys["reference"].dtype == dtype
    assert rel_err(ys["triton"], ys["reference"]) <= 2 * TOL[dtype]
    ins = [t.clone().requires_grad_() for t in (x, w, b, sc, sh, ib)]
    y = GA.group_norm_act(ins[0], 4, *ins[1:3], scale=ins[3], shift=ins[4], in_bias=ins[5])
    grads = torch.autograd.grad(y, ins, torch.randn_like(y))
    assert [g.dtype for g in grads] == [t.dtype for t in ins]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_out_dtype_equals_upcasting_first(dtype):
    """out_dtype=float32 of a half x (ADM's output head: the torso's activation into the float32 out norm)
    is bit for bit the op on x upcast first, in x's memory format, on both backends, output poisoned;
    a float64 out_dtype runs the reference (explicit Triton refuses); a non-float one raises."""
    gen = torch.Generator().manual_seed(31)
    for cl in (False, True):
        x, w, b, sc, sh = _case((2, 72, 7, 9), 8, gen, dtype, channels_last=cl, mean=2.0)
        ib = torch.randn(72, generator=gen).to(dtype)
        for backend in ("triton", "reference"):
            got = GA.group_norm_act(x, 8, w, b, scale=sc, shift=sh, in_bias=ib, out_dtype=torch.float32,
                                    backend=backend)
            want = GA.group_norm_act(x.float(), 8, w, b, scale=sc, shift=sh, in_bias=ib, backend=backend)
            assert got.dtype == torch.float32 and torch.equal(got, want), (cl, backend)
            assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    got = GA.group_norm_act(x, 8, w, b, out_dtype=torch.float64)
    assert got.dtype == torch.float64 and ops.last_backend(GA.OP) == "reference"
    with pytest.raises(ops.BackendUnavailableError, match="out_dtype"):
        GA.group_norm_act(x, 8, w, b, out_dtype=torch.float64, backend="triton")
    with pytest.raises(ValueError, match="out_dtype"):
        GA.group_norm_act(x, 8, w, b, out_dtype=torch.int32)


def test_triton_statistics_hold_at_a_large_mean():
    gen = torch.Generator().manual_seed(5)
    for mean in (50.0, -300.0, 1e4):
        x, w, b, sc, sh = _case((2, 16, 8, 8), 4, gen, torch.float32, mean=mean)
        got = GA.group_norm_act(x, 4, w, b, scale=sc, shift=sh, backend="triton")
        assert rel_err(got, _want(x, 4, w, b, sc, sh, True)) < 1e-5, mean
    x = torch.full((2, 8, 3, 3), 7.0)  # constant groups: variance exactly 0, output = act(bias)
    got = GA.group_norm_act(x, 2, None, torch.ones(8), silu=False, backend="triton")
    assert torch.equal(got, torch.ones_like(x))


def test_scale_and_shift_as_adm_passes_them():
    """ADM hands scale/shift as [B, C, 1, 1] channel chunks of one [B, 2C, 1, 1] tensor."""
    gen = torch.Generator().manual_seed(2)
    x, w, b, _, _ = _case((3, 16, 4, 4), 8, gen, torch.float32)
    emb = torch.randn(3, 32, 1, 1, generator=gen)
    scale, shift = emb.chunk(2, dim=1)
    got = GA.group_norm_act(x, 8, w, b, scale=scale, shift=shift, backend="triton")
    want = F.silu(F.group_norm(x, 8, w, b) * (1 + scale) + shift)
    assert rel_err(got, want.double()) < 1e-6


def test_autograd_uses_the_reference_and_explicit_triton_refuses():
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = GA.group_norm_act(x, 4)
    assert ops.last_backend(GA.OP) == "reference"
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()
    with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
        GA.group_norm_act(x, 4, backend="triton")
    with torch.no_grad():
        GA.group_norm_act(x, 4, backend="triton")  # no autograd: fine
    with pytest.raises(ops.BackendUnavailableError, match="fp32/fp16/bf16"):
        GA.group_norm_act(torch.randn(2, 8, 3, dtype=torch.float64), 4, backend="triton")
    assert GA.group_norm_act(torch.randn(2, 8, 3, dtype=torch.float64), 4).dtype == torch.float64


@pytest.mark.parametrize("kw,msg", [
    (dict(num_groups=3), "positive divisor of C=8"),
    (dict(num_groups=0), "positive divisor"),
    (dict(weight=torch.ones(4)), r"weight must be \[8\]"),
    (dict(scale=torch.ones(2, 4)), r"scale must be \[B, C\]"),
    (dict(shift=torch.ones(3, 8)), r"shift must be \[B, C\]"),
    (dict(in_bias=torch.ones(3)), r"in_bias must be \[C\]"),
    (dict(in_bias=torch.ones(3, 8)), r"in_bias must be \[C\]"),
])
def test_bad_inputs(kw, msg):
    args = dict(num_groups=4)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        GA.group_norm_act(torch.randn(2, 8, 3, 3), **args)
    with pytest.raises(ValueError, match="must be"):
        GA.group_norm_act(torch.randn(8), 4)


def test_empty_batch():
    x = torch.randn(0, 8, 3, 3)
    assert GA.group_norm_act(x, 4, backend="triton").shape == x.shape


@pytest.mark.parametrize("shape", [(2, 8, 0, 3), (2, 8, 0), (2, 0, 3, 3)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_spatial_or_channels_give_an_empty_y_on_both_backends(shape, backend):
    C = shape[1]
    x = torch.randn(shape, dtype=torch.float16)
    kw = dict(weight=torch.ones(C), bias=torch.zeros(C), scale=torch.ones(2, C), shift=torch.ones(2, C))
    y = GA.group_norm_act(x, 4 if C else 1, **kw, out_dtype=torch.float32, backend=backend)
    assert (y.shape, y.dtype) == (x.shape, torch.float32)
    if backend == "reference":
        xg = x.float().requires_grad_()
        GA.group_norm_act(xg, 4 if C else 1, **kw).sum().backward()
        assert xg.grad.shape == x.shape


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_parity_layouts_and_graph(dtype):
    gen = torch.Generator().manual_seed(9)
    for (shape, G), cl in itertools.product([((4, 256, 32, 32), 32), ((2, 512, 16, 16), 32), ((3, 96, 7, 5), 8)],
                                            [False, True]):
        x, w, b, sc, sh = _case(shape, G, gen, dtype, channels_last=cl, device="cuda")
        got = GA.group_norm_act(x, G, w, b, scale=sc, shift=sh)  # auto: triton on CUDA
        assert ops.last_backend(GA.OP) == "triton"
        assert rel_err(got, _want(x, G, w, b, sc, sh, True)) <= TOL[dtype], (shape, cl)
    for cl in (False, True):  # channels_last: the split statistics' partial sums inside the graph
        x, w, b, sc, sh = _case((4, 64, 16, 16), 32, gen, dtype, channels_last=cl, device="cuda")
        out = GA.group_norm_act(x, 32, w, b, scale=sc, shift=sh)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = GA.group_norm_act(x, 32, w, b, scale=sc, shift=sh)
        x.copy_(x * 2 + 1)
        graph.replay()
        assert rel_err(static, _want(x, 32, w, b, sc, sh, True)) <= TOL[dtype] and not torch.equal(static, out), cl


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_size1_trailing_dim_with_other_stride(dtype):
    """x[..., 1:2] of [B, C, H, 3]: the last dim has size 1 and stride 1, the positions step by 3;
    the kernel used the last dim's stride (read the wrong elements)."""
    gen = torch.Generator().manual_seed(6)
    base = (torch.randn(2, 8, 5, 3, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)  # views in dtype:
    five = (torch.randn(2, 8, 5, 1, 3, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)  # .to() copies
    for v in (base[..., 1:2], five[..., 1], base.transpose(2, 3)[:, :, 1:2, :].transpose(2, 3)):
        x = v
        assert not x.is_contiguous()
        w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
        scale, shift = torch.randn(2, 8, generator=gen) * 0.3, torch.randn(2, 8, generator=gen)
        want = GA.group_norm_act_reference(x.double(), 4, w, b, 1e-5, scale, shift, True)
        got = ops.group_norm_act(x, 4, w, b, scale=scale, shift=shift, backend="triton")
        err = rel_err(got, want)
        assert err <= (2e-5 if dtype == torch.float32 else 3e-3), (tuple(x.stride()), err)


@pytest.mark.parametrize("make", [
    lambda g: torch.randn(2, 8, 1, 5, generator=g).permute(0, 1, 3, 2),  # [2, 8, 5, 1], strides (40, 5, 1, 5)
    lambda g: torch.randn(2, 8, 5, 3, generator=g)[..., :1],              # a slice: strides (120, 15, 3, 1)
    lambda g: torch.randn(2, 8, 1, 1, 5, generator=g).permute(0, 1, 4, 2, 3),
], ids=["permuted-contiguous", "sliced", "two-unit-dims"])
def test_triton_trailing_unit_spatial_dims(make):
    """A size-1 spatial dim's stride takes no part in the flattened position stride (it was read as the
    position stride: NaN / out-of-bounds reads and writes, a segfault under the interpreter)."""
    x = make(torch.Generator().manual_seed(0))
    y = GA.group_norm_act(x, 2, backend="triton")
    assert (y.double() - GA.group_norm_act_reference(x.double(), 2)).abs().max() < 1e-5


def test_triton_launch_grids_stay_within_cuda_limits_above_65535_samples(monkeypatch):
    """The apply kernel had the samples on grid axis 2, which CUDA caps at 65535: a batch of 70000
    failed to launch. Every launch must stay within the limits and the apply launches cover every
    sample once (grids recorded, nothing run: the interpreter would take minutes)."""
    from ppap_fast.ops import norm_act_triton as NT

    stats, apply, part, reduce = LaunchRecorder(), LaunchRecorder(), LaunchRecorder(), LaunchRecorder()
    monkeypatch.setattr(NT, "_gn_stats_kernel", stats)
    monkeypatch.setattr(NT, "_gn_apply_kernel", apply)
    monkeypatch.setattr(NT, "_gn_stats_cl_part_kernel", part)
    monkeypatch.setattr(NT, "_gn_stats_cl_reduce_kernel", reduce)
    B = 70000
    for x in (torch.zeros(B, 2, 3), torch.zeros(B, 2, 3).transpose(1, 2).contiguous().transpose(1, 2)):
        NT.group_norm_act(x, 1, None, None, 1e-5, None, None, True)  # NCHW, then channels fastest
    assert len(stats.launches) == 1 and len(reduce.launches) == 1
    for grid, args in stats.launches + apply.launches + part.launches + reduce.launches:
        assert_grid_within_cuda_limits(grid)
    # b0 follows x, y, shift, mean, rstd, w, b, scale, shift, in_bias, C, HW, Cg, G (apply: both runs)
    # / x, in_bias, part, C, HW, Cg (split statistics: the channels-fastest run)
    for rec, at, runs in ((apply, 14, 2), (part, 6, 1)):
        covered = Counter()
        for grid, args in rec.launches:
            covered.update(range(args[at], args[at] + grid[2]))
        assert sorted(covered) == list(range(B)) and set(covered.values()) == {runs}


def test_triton_chunked_launches_match_float64(monkeypatch):
    """The chunked launches (forced: at most 3 samples per launch, 7 samples, last chunk partial) with
    per-sample scale / shift, NCHW and channels_last, against the float64 reference; poisoned output."""
    from ppap_fast.ops import _kernel_util

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 3)
    assert len(_kernel_util.grid_chunks(7)) == 3
    gen = torch.Generator().manual_seed(3)
    for cl in (False, True):
        x, w, b, sc, sh = _case((7, 8, 3, 2), 4, gen, torch.float32, channels_last=cl)
        got = GA.group_norm_act(x, 4, w, b, scale=sc, shift=sh, backend="triton")
        assert rel_err(got, _want(x, 4, w, b, sc, sh, True)) <= TOL[torch.float32], f"channels_last={cl}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_split_statistics_match_float64_and_the_group_kernel(monkeypatch, dtype):
    """Channels-fastest x takes the split statistics (per-channel sums over position chunks, then a
    reduction per group): several channel blocks, groups of 9 channels straddling them, a partial last
    chunk, one chunk of several position tiles, an in_bias and a large mean; equal to float64 and to
    the one-program-per-group kernel (PPAP_FAST_GN_STATS=group)."""
    from ppap_fast.ops import norm_act_triton as NT

    gen = torch.Generator().manual_seed(11)
    shape, G = (2, 72, 7, 9), 8  # 72 channels: two blocks of 64; 63 positions: 4 tiles of 16
    part = LaunchRecorder(NT._gn_stats_cl_part_kernel)
    monkeypatch.setattr(NT, "_gn_stats_cl_part_kernel", part)
    for target, mean in ((2048, 0.0), (1, 30.0)):  # 4 chunks of one tile / one chunk of 4 tiles
        monkeypatch.setattr(NT, "_STATS_TARGET_PROGRAMS", target)
        x, w, b, sc, sh = _case(shape, G, gen, dtype, channels_last=True, mean=mean)
        ib = (torch.randn(shape[0], shape[1], generator=gen, dtype=torch.float64) + 5).to(dtype)
        n = len(part.launches)
        got = GA.group_norm_act(x, G, w, b, scale=sc, shift=sh, in_bias=ib, backend="triton")
        (grid, args), = part.launches[n:]
        assert grid[:2] == ((4, 2) if target > 1 else (1, 2)), grid
        x_plus = x.double() + ib.double()[:, :, None, None]
        want = GA.group_norm_act_reference(x_plus, G, w.double(), b.double(), 1e-5, sc.double(), sh.double())
        assert rel_err(got, want) <= 2 * TOL[dtype], (target, mean)
        monkeypatch.setattr(NT, "GN_STATS_CL", "group")
        old = GA.group_norm_act(x, G, w, b, scale=sc, shift=sh, in_bias=ib, backend="triton")
        monkeypatch.setattr(NT, "GN_STATS_CL", "split")
        assert len(part.launches) == n + 1  # the group kernel ran, not the split one
        assert rel_err(got, old) <= 2 * TOL[dtype]
    monkeypatch.setattr(NT, "GN_STATS_CL", "fast")
    with pytest.raises(ValueError, match="PPAP_FAST_GN_STATS"):
        GA.group_norm_act(x, G, w, b, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_channels_last_apply_tiles_rows_and_narrow_agree(monkeypatch, dtype):
    """The apply pass of channels-fastest x in both tilings (PPAP_FAST_CL_TILE): "rows" takes whole runs of
    channels (here two channel blocks, the last partial, and several position blocks), "narrow" the old
    32-channel tiles; same values as float64 and bit for bit as each other (the same per-element math).
    A bad mode raises."""
    from ppap_fast.ops import norm_act_triton as NT

    gen = torch.Generator().manual_seed(21)
    apply = LaunchRecorder(NT._gn_apply_kernel)
    monkeypatch.setattr(NT, "_gn_apply_kernel", apply)
    x, w, b, sc, sh = _case((2, 72, 7, 9), 8, gen, dtype, channels_last=True, mean=3.0)
    got = {}
    for mode in ("rows", "narrow"):
        monkeypatch.setattr(NT, "CL_TILE", mode)
        got[mode] = GA.group_norm_act(x, 8, w, b, scale=sc, shift=sh, backend="triton")
        assert rel_err(got[mode], _want(x, 8, w, b, sc, sh, True)) <= TOL[dtype], mode
    # 63 positions by 32 and 72 channels by 64 / positions by 64 and channels by 32
    assert [grid for grid, _ in apply.launches] == [(2, 2, 2), (1, 3, 2)]
    assert torch.equal(got["rows"], got["narrow"])
    monkeypatch.setattr(NT, "CL_TILE", "wide")
    with pytest.raises(ValueError, match="PPAP_FAST_CL_TILE"):
        GA.group_norm_act(x, 8, w, b, backend="triton")
