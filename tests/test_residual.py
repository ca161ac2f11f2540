"""ops.residual.bias_residual_add: h + skip + bias[c] in one pass. Reference vs the unfused torch sum;
Triton (CPU interpreter, small shapes; CUDA marked ``cuda``) vs float64, poisoned outputs, NCHW and
channels_last, mixed layouts of h and skip."""
import itertools

import pytest
import torch

from ppap_fast import ops
from ppap_fast.ops import residual as RA

from _util import LaunchRecorder, assert_grid_within_cuda_limits, capture_cuda_graph, poisoned_kernels, rel_err, requires_cuda

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(2, 24, 6, 5), (3, 8, 9), (2, 5), (1, 40, 3, 7), (2, 3, 17, 17)]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(RA):
        yield


def _inputs(shape, gen, dtype, h_cl=False, skip_cl=False, device="cpu"):
    h = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    skip = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    bias = torch.randn(shape[1], generator=gen, dtype=torch.float64).to(dtype)
    if h_cl:
        h = h.to(memory_format=torch.channels_last)
    if skip_cl:
        skip = skip.to(memory_format=torch.channels_last)
    return h.to(device), skip.to(device), bias.to(device)


def test_reference_is_the_unfused_sum():
    gen = torch.Generator().manual_seed(0)
    h, skip, bias = _inputs((2, 6, 4, 3), gen, torch.float32)
    assert torch.allclose(RA.bias_residual_add_reference(h, skip, bias), skip + h + bias[:, None, None], atol=1e-6)
    assert torch.equal(RA.bias_residual_add_reference(h, skip), h + skip)
    hh, sh = h.half(), skip.half()  # half: summed in float32, one rounding
    got = RA.bias_residual_add_reference(hh, sh, bias.half())
    assert got.dtype == torch.float16
    assert torch.equal(got, (hh.float() + sh.float() + bias.half().float()[:, None, None]).half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_float64(shape, dtype):
    gen = torch.Generator().manual_seed(len(shape) * 7 + shape[1])
    layouts = [False, True] if len(shape) == 4 else [False]
    for h_cl, skip_cl, with_bias in itertools.product(layouts, layouts, [True, False]):
        h, skip, bias = _inputs(shape, gen, dtype, h_cl, skip_cl)
        bias = bias if with_bias else None
        got = RA.bias_residual_add(h, skip, bias, backend="triton")
        assert ops.last_backend(RA.OP) == "triton"
        assert got.dtype == dtype and got.shape == h.shape
        assert got.stride() == skip.stride()  # the residual stream's layout
        want = RA.bias_residual_add_reference(h.double(), skip.double(), None if bias is None else bias.double())
        err = rel_err(got, want)
        assert err <= TOL[dtype], f"{shape} h_cl={h_cl} skip_cl={skip_cl} bias={with_bias}: {err:.2e}"


def test_non_flat_skip_and_mixed_dtypes():
    """A sliced (non-flattenable) skip is copied, an fp32 skip joins an fp16 h; y takes h's dtype."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 8, 5, 6, generator=gen).half()
    big = torch.randn(2, 8, 5, 12, generator=gen)
    skip, bias = big[..., ::2], torch.randn(8, generator=gen)
    got = RA.bias_residual_add(h, skip, bias, backend="triton")
    want = h.double() + skip.double() + bias.double()[:, None, None]
    assert got.dtype == torch.float16 and rel_err(got, want) < 1e-3


def test_output_follows_the_residual_stream_layout():
    """ADM attention: h from a Conv1d (contiguous [B, C, T]), skip a [B, C, H*W] view of a
    channels_last activation; y keeps the view's strides, so reshaping back gives channels_last."""
    gen = torch.Generator().manual_seed(4)
    act = torch.randn(2, 16, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    skip = act.reshape(2, 16, -1)
    h, bias = torch.randn(2, 16, 20, generator=gen), torch.randn(16, generator=gen)
    for backend in ("triton", "reference"):
        y = RA.bias_residual_add(h, skip, bias, backend=backend)
        assert y.stride() == skip.stride(), backend
        assert y.reshape(2, 16, 4, 5).is_contiguous(memory_format=torch.channels_last)
        assert rel_err(y, skip.double() + h.double() + bias.double()[:, None]) < 1e-6


def test_autograd_uses_the_reference_and_explicit_triton_refuses():
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    skip, bias = torch.randn(2, 4, 3, 3), torch.randn(4, requires_grad=True)
    y = RA.bias_residual_add(h, skip, bias)
    assert ops.last_backend(RA.OP) == "reference"
    gh, gb = torch.autograd.grad(y.square().sum(), (h, bias))
    assert torch.allclose(gh, 2 * y) and torch.allclose(gb, 2 * y.sum((0, 2, 3)))
    with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
        RA.bias_residual_add(h, skip, bias, backend="triton")
    with torch.no_grad():
        RA.bias_residual_add(h, skip, bias, backend="triton")


@pytest.mark.parametrize("args,msg", [
    (((2, 4, 3, 3), (2, 4, 3, 2), (4,)), "skip must have h's shape"),
    (((2, 4, 3, 3), (2, 4, 3, 3), (3,)), r"bias must be \[C\] = \[4\]"),
    (((4,), (4,), None), r"h must be \[B, C"),
])
def test_bad_inputs(args, msg):
    h, skip, b = (None if s is None else torch.randn(s) for s in args)
    with pytest.raises(ValueError, match=msg):
        RA.bias_residual_add(h, skip, b)


def test_empty_batch():
    h = torch.randn(0, 4, 3, 3)
    assert RA.bias_residual_add(h, h, torch.ones(4), backend="triton").shape == h.shape


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_parity_layouts_and_graph(dtype):
    gen = torch.Generator().manual_seed(11)
    for h_cl, skip_cl in itertools.product([False, True], [False, True]):
        h, skip, bias = _inputs((4, 64, 33, 31), gen, dtype, h_cl, skip_cl, device="cuda")
        got = RA.bias_residual_add(h, skip, bias)
        assert ops.last_backend(RA.OP) == "triton"
        want = RA.bias_residual_add_reference(h.double(), skip.double(), bias.double())
        assert rel_err(got, want) <= TOL[dtype], (h_cl, skip_cl)
    graph, out = capture_cuda_graph(lambda: RA.bias_residual_add(h, skip, bias))
    out.fill_(float("nan"))
    graph.replay()
    assert rel_err(out, want) <= TOL[dtype]
    buf = torch.full((4, 96, 33, 31), 2.0, dtype=dtype, device="cuda").contiguous(memory_format=torch.channels_last)
    assert RA.bias_residual_add(h, skip, bias, out=buf[:, :64]).data_ptr() == buf.data_ptr()  # into a concat buffer
    assert rel_err(buf[:, :64], want) <= TOL[dtype] and (buf[:, 64:] == 2).all()


def _size1_last_views(shape, gen, dtype):
    """Views whose last spatial dim has size 1 but a stride that is not the positions' step:
    x[..., 1:2] of [B, C, H, 3] (H steps by 3, W's stride 1), and [B, C, 1, W] / [B, C, H, 1, W] cousins."""
    B, C, H = shape
    base = torch.randn(B, C, H, 3, generator=gen, dtype=torch.float64).to(dtype)  # the views in dtype: .to()
    five = torch.randn(B, C, H, 1, 3, generator=gen, dtype=torch.float64).to(dtype)  # would copy them dense
    return [base[..., 1:2], five[..., 1], base.transpose(2, 3)[:, :, 1:2, :].transpose(2, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_size1_trailing_dim_with_other_stride(dtype):
    """_bcp_strides took the LAST dim's stride as the position stride even when that dim has size 1
    (so any stride): h = x[..., 1:2] read its H positions with stride 1 (wrong values)."""
    gen = torch.Generator().manual_seed(5)
    for h in _size1_last_views((2, 6, 5), gen, dtype):
        assert not h.is_contiguous()
        skip = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(dtype)
        bias = torch.randn(h.shape[1], generator=gen, dtype=torch.float64).to(dtype)
        want = h.double() + skip.double() + bias.double()[:, None, None]
        for a, b in ((h, skip), (skip, h)):
            got = ops.bias_residual_add(a, b, bias, backend="triton")
            err = rel_err(got, want)
            assert err <= TOL[dtype], (tuple(h.stride()), err)


def test_triton_trailing_unit_spatial_dim():
    """[B, C, H, 1] whose size-1 dim has a stride other than the position stride (a permuted [B, C, 1, W]
    is even is_contiguous()): the flattened position stride ignores it (it was used: wrong / out-of-bounds
    addresses)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 8, 1, 5, generator=g).permute(0, 1, 3, 2)
    skip = torch.randn(2, 8, 5, 3, generator=g)[..., :1]
    bias = torch.randn(8, generator=g)
    for a, b in ((h, skip), (skip, h)):
        y = RA.bias_residual_add(a, b, bias, backend="triton")
        want = RA.bias_residual_add_reference(a.double(), b.double(), bias.double())
        assert (y.double() - want).abs().max() < 1e-5


def test_triton_launch_grids_stay_within_cuda_limits_above_65535_samples(monkeypatch):
    """The samples sat on grid axis 2, which CUDA caps at 65535: a batch of 70000 failed to launch.
    Every launch must stay within the limits and the launches cover every sample once (grids
    recorded, nothing run: the interpreter would take minutes)."""
    from ppap_fast.ops import residual_triton as RT

    rec = LaunchRecorder()
    monkeypatch.setattr(RT, "_bias_residual_kernel", rec)
    B = 70000
    RT.bias_residual_add(torch.zeros(B, 2), torch.zeros(B, 2), None)
    covered = []
    for grid, args in rec.launches:
        assert_grid_within_cuda_limits(grid)
        b0 = args[6]  # after h, skip, bias, y, C, HW
        covered += range(b0, b0 + grid[2])
    assert covered == list(range(B))


def test_triton_chunked_launches_match_float64(monkeypatch):
    """The chunked launches (forced: at most 3 samples per launch, 7 samples, last chunk partial), with
    and without bias, NCHW and channels_last; poisoned output."""
    from ppap_fast.ops import _kernel_util

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 3)
    gen = torch.Generator().manual_seed(4)
    for cl, with_bias in itertools.product([False, True], [False, True]):
        h, skip, bias = _inputs((7, 5, 3, 2), gen, torch.float32, cl, cl)
        bias = bias if with_bias else None
        got = RA.bias_residual_add(h, skip, bias, backend="triton")
        want = RA.bias_residual_add_reference(h.double(), skip.double(), None if bias is None else bias.double())
        assert rel_err(got, want) <= TOL[torch.float32], f"channels_last={cl} bias={with_bias}"


def test_channels_last_tiles_rows_and_narrow_agree(monkeypatch):
    """Channels-fastest h in both tilings (PPAP_FAST_CL_TILE): "rows" (two channel blocks, the last partial,
    several position blocks) and "narrow"; float64's values, bit for bit each other's."""
    from ppap_fast.ops import norm_act_triton as NT
    from ppap_fast.ops import residual_triton as RT

    gen = torch.Generator().manual_seed(23)
    rec = LaunchRecorder(RT._bias_residual_kernel)
    monkeypatch.setattr(RT, "_bias_residual_kernel", rec)
    h, skip, bias = _inputs((2, 72, 7, 9), gen, torch.float16, True, True)
    want = RA.bias_residual_add_reference(h.double(), skip.double(), bias.double())
    got = {}
    for mode in ("rows", "narrow"):
        monkeypatch.setattr(NT, "CL_TILE", mode)
        got[mode] = RA.bias_residual_add(h, skip, bias, backend="triton")
        assert rel_err(got[mode], want) <= TOL[torch.float16], mode
    assert [grid for grid, _ in rec.launches] == [(2, 2, 2), (1, 3, 2)]
    assert torch.equal(got["rows"], got["narrow"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_writes_into_a_channel_slice_of_a_buffer(backend):
    """out= (ADM's decoder: a block's output straight into the next concatenation's buffer): written in place,
    returned, the rest of the buffer untouched, equal to the op's own output; a mismatched out raises."""
    gen = torch.Generator().manual_seed(29)
    h, skip, bias = _inputs((2, 24, 5, 3), gen, torch.float16, True, True)
    buf = torch.full((2, 40, 5, 3), 7.0, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    got = RA.bias_residual_add(h, skip, bias, out=buf[:, :24], backend=backend)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, RA.bias_residual_add(h, skip, bias, backend=backend))
    assert torch.equal(buf[:, 24:], torch.full((2, 16, 5, 3), 7.0, dtype=torch.float16))
    for bad, msg in ((buf[:, :20], "h's shape"), (buf[:, :24].float(), "float16 tensor"),
                     (torch.empty(2, 24, 3, 5, dtype=torch.float16).transpose(2, 3), "flatten")):
        with pytest.raises(ValueError, match=msg):
            RA.bias_residual_add(h, skip, bias, out=bad, backend=backend)
