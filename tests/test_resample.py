"""ops.resample: nearest 2x upsampling and 2x2 average pooling (ADM's Upsample / Downsample on the fast
path). Triton (CPU interpreter, tiny shapes; CUDA marked ``cuda``) against F.interpolate / F.avg_pool2d
bit for bit, poisoned outputs; the reference where the kernels do not apply; a fused ADM through them."""
import pytest
import torch
import torch.nn.functional as F

from ppap_fast import ops
from ppap_fast.ops import resample as RS

from _util import (LaunchRecorder, assert_grid_within_cuda_limits, capture_cuda_graph, poisoned_kernels,
                   randn_channels_last as _cl, requires_cuda, tiny_adm)

pytestmark = pytest.mark.usefixtures("one_thread")

# (B, C, H, W): odd C, C past one channel block (8 under the interpreter) and not a multiple of it,
# B*H*W past one pixel block (16), H != W, size-1 dims
SHAPES = [(2, 5, 4, 6), (3, 19, 2, 4), (1, 40, 6, 2), (2, 3, 1, 1), (1, 1, 8, 10), (4, 9, 2, 2)]


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(RS):
        yield


def _assert_pool_matches(got, want):
    """Bit for bit, except that the interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to
    nearest, as PyTorch): there within one bf16 step of PyTorch's result."""
    assert torch.isfinite(got).all(), "unwritten (NaN) elements"
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        step = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert ((got.float() - want.float()).abs() <= step).all()
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_upsample_is_interpolate_bitwise(shape, dtype):
    x = _cl(shape, dtype, sum(shape))
    got = RS.upsample_nearest2x(x, backend="triton")
    assert ops.last_backend(RS.UPSAMPLE_OP) == "triton"
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    assert torch.isfinite(got).all() and torch.equal(got, F.interpolate(x, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] % 2 == 0 and s[3] % 2 == 0])
def test_triton_avg_pool_is_avg_pool2d_bitwise(shape, dtype):
    x = _cl(shape, dtype, sum(shape) + 1) * 3 + 1  # sums whose rounding depends on the order
    x = x.contiguous(memory_format=torch.channels_last)
    got = RS.avg_pool2x(x, backend="triton")
    assert ops.last_backend(RS.POOL_OP) == "triton"
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    _assert_pool_matches(got, F.avg_pool2d(x, 2, 2))


def test_pool_sums_in_pytorchs_order():
    """Four fp32 values whose sum depends on the order: ((a + b) + c) + d as PyTorch's kernels."""
    big, one = 2.0 ** 24, 1.0  # 2^24 + 1 rounds back to 2^24
    x = torch.tensor([one, big, one, -big]).reshape(1, 1, 2, 2).contiguous(memory_format=torch.channels_last)
    want = F.avg_pool2d(x, 2, 2)
    assert want.item() == 0.0  # (1 + 2^24) + 1 - 2^24: 0, not the exact 0.5
    assert torch.equal(RS.avg_pool2x(x, backend="triton"), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pool_of_negative_zeros_is_positive_zero_as_pytorchs(dtype):
    """PyTorch's sum starts at +0: four -0.0 average to +0.0 (a sum started at the first input: -0.0)."""
    x = torch.tensor([-0.0, -0.0, -0.0, -0.0, -0.0, 1.0, -0.0, -1.0], dtype=dtype)
    x = x.reshape(1, 2, 2, 2).permute(0, 3, 1, 2)  # [1, 2, 2, 2] channels_last: channel 0 all -0.0
    assert x.is_contiguous(memory_format=torch.channels_last)
    want = F.avg_pool2d(x, 2, 2)
    got = RS.avg_pool2x(x, backend="triton")
    assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want)), (got, want)
    assert not torch.signbit(want).any()  # the case tested: +0.0


def test_outside_the_kernels_the_reference_runs():
    """NCHW and odd H / W (pool) run the reference (auto, and with the global backend forced to triton: a
    model's NCHW tensors), as float64 and inputs requiring grad do automatically; an explicit
    backend="triton" says why it cannot; not 4-D raises."""
    ok = _cl((1, 4, 2, 2), torch.float32, 0)
    cases = [(RS.upsample_nearest2x, RS.UPSAMPLE_OP, torch.randn(2, 3, 4, 5), "channels_last"),
             (RS.avg_pool2x, RS.POOL_OP, torch.randn(2, 3, 4, 4), "channels_last"),
             (RS.avg_pool2x, RS.POOL_OP, _cl((2, 3, 5, 4), torch.float32, 1), "even H and W"),
             (RS.avg_pool2x, RS.POOL_OP, _cl((2, 3, 4, 3), torch.float32, 2), "even H and W"),
             (RS.upsample_nearest2x, RS.UPSAMPLE_OP, _cl((1, 3, 2, 2), torch.float64, 3), "float64")]
    ref = {RS.UPSAMPLE_OP: RS.upsample_nearest2x_reference, RS.POOL_OP: RS.avg_pool2x_reference}
    for fn, op, x, why in cases:
        for forced in (None, "triton") if x.dtype != torch.float64 else (None,):
            fn(ok, backend="triton")
            assert ops.last_backend(op) == "triton"
            ops.set_backend(forced)
            try:
                got = fn(x)
            finally:
                ops.set_backend(None)
            assert ops.last_backend(op) == "reference", (op, tuple(x.shape), forced)
            assert torch.equal(got, ref[op](x))
        with pytest.raises(ops.BackendUnavailableError, match=why):
            fn(x, backend="triton")
    xg = ok.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(RS.avg_pool2x(xg).sum(), xg)
    assert ops.last_backend(RS.POOL_OP) == "reference" and torch.equal(g, torch.full_like(g, 0.25))
    with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
        RS.upsample_nearest2x(xg, backend="triton")
    for fn in (RS.upsample_nearest2x, RS.avg_pool2x):
        with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
            fn(torch.randn(2, 3, 4))


def test_cpu_auto_is_the_reference():
    """On CPU the automatic choice is PyTorch's (Triton on CPU is the interpreter, only when asked for)."""
    x = _cl((2, 4, 4, 4), torch.float32, 5)
    assert torch.equal(RS.avg_pool2x(x), F.avg_pool2d(x, 2, 2)) and ops.last_backend(RS.POOL_OP) == "reference"
    assert RS.upsample_nearest2x(x).shape == (2, 4, 8, 8) and ops.last_backend(RS.UPSAMPLE_OP) == "reference"


def test_empty_batch():
    x = _cl((0, 4, 2, 2), torch.float32, 0)
    assert RS.upsample_nearest2x(x, backend="triton").shape == (0, 4, 4, 4)
    assert RS.avg_pool2x(x, backend="triton").shape == (0, 4, 1, 1)


def test_chunked_channel_blocks_match(monkeypatch):
    """Channel blocks on grid axis 1 in launches of at most 2 blocks (forced; C = 37: 5 blocks of 8,
    the last partial): every launch writes its own channels (poisoned output)."""
    from ppap_fast.ops import _kernel_util
    from ppap_fast.ops import resample_triton as RT

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 2)
    x = _cl((2, 37, 2, 4), torch.float16, 7)
    for name, fn, want in (("_upsample_nearest2x_kernel", RS.upsample_nearest2x,
                            F.interpolate(x, scale_factor=2, mode="nearest")),
                           ("_avg_pool2x_kernel", RS.avg_pool2x, F.avg_pool2d(x, 2, 2))):
        rec = LaunchRecorder(getattr(RT, name))
        monkeypatch.setattr(RT, name, rec)
        assert torch.equal(fn(x, backend="triton"), want), name
        assert [g[1] for g, _ in rec.launches] == [2, 2, 1], name


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    """More than 65535 channel blocks (grid axis 1): launches within CUDA's limits that cover every
    block once (grids recorded, nothing run)."""
    from ppap_fast.ops import resample_triton as RT

    C = 65537 * 8 - 3
    for name, fn in (("_upsample_nearest2x_kernel", RS.upsample_nearest2x), ("_avg_pool2x_kernel", RS.avg_pool2x)):
        rec = LaunchRecorder()
        monkeypatch.setattr(RT, name, rec)
        fn(torch.zeros(1, C, 2, 2).contiguous(memory_format=torch.channels_last), backend="triton")
        covered = []
        for grid, args in rec.launches:
            assert_grid_within_cuda_limits(grid)
            cb0 = args[-1]  # the last positional argument: the first channel block
            covered += range(cb0, cb0 + grid[1])
        assert len(rec.launches) == 2 and covered == list(range(65537)), name


# ------------------------------------------------------------------ ADM's fast path

def _resamplers(m):
    from ppap_fast.models.adm import Downsample, Upsample

    return [b for b in m.modules() if isinstance(b, (Upsample, Downsample))]


@pytest.mark.parametrize("kw,launches", [
    ({"resblock_updown": True}, {"up": 2, "pool": 2}),  # ResBlocks' h and skip paths
    ({"conv_resample": False}, {"up": 1, "pool": 1}),  # standalone, conv-less
    ({"conv_resample": True}, {"up": 1, "pool": 0}),  # standalone: nearest 2x then conv; a strided conv down
])
def test_fused_adm_resamples_through_the_ops(monkeypatch, kw, launches):
    """fuse_norm_act makes ADM's Upsample / Downsample call ops.upsample_nearest2x / avg_pool2x (the
    kernels launch once per resampler), with the fused model's output unchanged bit for bit (channels_last,
    Triton forced, interpreted); fuse_norm_act(False) restores the modules."""
    from ppap_fast.ops import resample_triton as RT

    m = tiny_adm(**kw).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500])
    m.fuse_norm_act()
    assert all(b.fast_resample == (type(b).__name__ == "Upsample" or isinstance(b.op, torch.nn.AvgPool2d))
               for b in _resamplers(m))
    recs = {"up": LaunchRecorder(RT._upsample_nearest2x_kernel), "pool": LaunchRecorder(RT._avg_pool2x_kernel)}
    monkeypatch.setattr(RT, "_upsample_nearest2x_kernel", recs["up"])
    monkeypatch.setattr(RT, "_avg_pool2x_kernel", recs["pool"])
    ops.set_backend("triton")
    try:
        with torch.no_grad():
            got = m(x, t)
            for b in _resamplers(m):
                b.fast_resample = False  # the fused path as it was before the resample ops
            want = m(x, t)
    finally:
        ops.set_backend(None)
    assert {k: len(r.launches) for k, r in recs.items()} == launches
    assert torch.isfinite(got).all() and torch.equal(got, want)
    m.fuse_norm_act()
    assert m.fuse_norm_act(False) is m and not any(b.fast_resample for b in _resamplers(m))


def test_fused_adm_on_cpu_keeps_its_results():
    """CPU (no backend forced): the fused path's resampling is PyTorch's, NCHW and channels_last."""
    m = tiny_adm(resblock_updown=True)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 800])
    with torch.no_grad():
        want = m.fuse_norm_act()(x, t)
        for b in _resamplers(m):
            b.fast_resample = False
        assert torch.equal(m(x, t), want)
        m.fuse_norm_act()
        assert ops.last_backend(RS.UPSAMPLE_OP) == ops.last_backend(RS.POOL_OP) == "reference"
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        want = m(x, t)
        assert ops.last_backend(RS.POOL_OP) == "reference"
        for b in _resamplers(m):
            b.fast_resample = False
        assert torch.equal(m(x, t), want)


# ------------------------------------------------------------------ CUDA

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_parity_and_graph(dtype):
    """Bit for bit against PyTorch's CUDA kernels (every dtype: the GPU rounds as PyTorch), shapes with
    odd C, many pixel blocks, ADM-like widths; poisoned outputs; a captured graph replays."""
    for shape in ((3, 37, 18, 10), (2, 256, 32, 32), (5, 3, 64, 2), (1, 1000, 4, 6)):
        x = _cl(shape, dtype, sum(shape), "cuda") * 3 + 1
        up = RS.upsample_nearest2x(x)
        assert ops.last_backend(RS.UPSAMPLE_OP) == "triton"
        assert torch.equal(up, F.interpolate(x, scale_factor=2, mode="nearest")), shape
        pool = RS.avg_pool2x(x)
        assert ops.last_backend(RS.POOL_OP) == "triton"
        assert torch.equal(pool, F.avg_pool2d(x, 2, 2)), shape
    graph, out = capture_cuda_graph(lambda: RS.avg_pool2x(x))
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(out, F.avg_pool2d(x, 2, 2))
