"""ops.cat_channels: channel concatenation of [B, C_i, H, W] tensors (ADM's decoder skips on the fast
path). Triton (CPU interpreter, tiny shapes; CUDA marked ``cuda``) against torch.cat bit for bit,
poisoned outputs; the reference where the kernel does not apply; a fused ADM through it."""
import pytest
import torch

from ppap_fast import ops
from ppap_fast.ops import concat as CC

from _util import (LaunchRecorder, assert_grid_within_cuda_limits, capture_cuda_graph, poisoned_kernels,
                   randn_channels_last as _cl, requires_cuda, TINY_ADM, tiny_adm)

pytestmark = pytest.mark.usefixtures("one_thread")

# ((B, H, W), channels of each input): odd C, C past one channel block (8 under the interpreter) and not
# a multiple of it, B*H*W past one pixel block (16), H != W, size-1 dims, one and three inputs
CASES = [((2, 4, 6), (5, 3)), ((3, 2, 4), (19, 8)), ((1, 6, 2), (40, 17)), ((2, 1, 1), (3, 1)),
         ((1, 8, 10), (1, 1)), ((4, 2, 3), (9, 2, 11)), ((2, 3, 3), (7,))]


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(CC):
        yield


def _inputs(bhw, chans, dtype, device="cpu"):
    B, H, W = bhw
    return [_cl((B, c, H, W), dtype, 7 * i + c + sum(bhw), device) for i, c in enumerate(chans)]


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bhw,chans", CASES)
def test_triton_cat_is_torch_cat_bitwise(bhw, chans, dtype):
    xs = _inputs(bhw, chans, dtype)
    got = CC.cat_channels(xs, backend="triton")
    assert ops.last_backend(CC.OP) == "triton"
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == dtype
    assert got.shape == (bhw[0], sum(chans), bhw[1], bhw[2])
    assert torch.isfinite(got).all() and torch.equal(got, torch.cat(xs, dim=1))


def test_special_values_copied_bit_for_bit():
    """-0, infinities, NaN (its payload too): a copy, compared as bits."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        a = _cl((2, 3, 2, 2), dtype, 1)
        b = torch.tensor([-0.0, float("inf"), float("-inf"), float("nan"), 1.0], dtype=dtype).repeat(8)
        _bits(b)[3] ^= 1  # another NaN payload (the top of the mantissa stays set)
        b = b.reshape(2, 5, 2, 2).contiguous(memory_format=torch.channels_last)
        got = CC.cat_channels((a, b), backend="triton")
        assert torch.equal(_bits(got), _bits(torch.cat([a, b], dim=1))), dtype


def test_outside_the_kernel_the_reference_runs():
    """NCHW, mixed layouts, mixed dtypes (torch.cat promotes) and float64 run the reference (auto, and
    with the global backend forced to triton: a model's NCHW tensors), as inputs requiring grad do
    automatically; an explicit backend="triton" says why it cannot."""
    ok = _inputs((1, 2, 2), (4, 3), torch.float32)
    nchw = [torch.randn(2, 3, 4, 5), torch.randn(2, 2, 4, 5)]
    cases = [(nchw, "channels_last"),
             ([_cl((2, 3, 4, 5), torch.float32, 0), nchw[1]], "channels_last"),
             ([_cl((2, 3, 4, 5), torch.float16, 1), _cl((2, 2, 4, 5), torch.float32, 2)], "one dtype"),
             ([_cl((1, 3, 2, 2), torch.float64, 3)] * 2, "float64")]
    for xs, why in cases:
        for forced in (None, "triton") if xs[0].dtype != torch.float64 else (None,):
            CC.cat_channels(ok, backend="triton")
            assert ops.last_backend(CC.OP) == "triton"
            ops.set_backend(forced)
            try:
                got = CC.cat_channels(xs)
            finally:
                ops.set_backend(None)
            assert ops.last_backend(CC.OP) == "reference", (why, forced)
            want = torch.cat(xs, dim=1)
            assert got.dtype == want.dtype and torch.equal(got, want)
        with pytest.raises(ops.BackendUnavailableError, match=why):
            CC.cat_channels(xs, backend="triton")
    xg = ok[0].clone().requires_grad_(True)
    (g,) = torch.autograd.grad((CC.cat_channels([xg, ok[1]]) * 2).sum(), xg)
    assert ops.last_backend(CC.OP) == "reference" and torch.equal(g, torch.full_like(g, 2.0))
    with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
        CC.cat_channels([ok[0], xg], backend="triton")


@pytest.mark.parametrize("backend", [None, "triton", "reference"])
def test_bad_inputs_raise_clearly(backend):
    a = _cl((2, 3, 4, 4), torch.float32, 0)
    for xs, err, msg in [([a, _cl((2, 3, 4, 5), torch.float32, 1)], ValueError, "share B, H and W"),
                         ([a, _cl((1, 3, 4, 4), torch.float32, 1)], ValueError, "share B, H and W"),
                         ([a, torch.randn(2, 3, 4)], ValueError, r"tensors\[1\] must be \[B, C, H, W\]"),
                         ([], ValueError, "at least one"),
                         (a, TypeError, "list or tuple"),
                         ([a, 1.0], TypeError, r"tensors\[1\] must be a tensor")]:
        with pytest.raises(err, match=msg):
            CC.cat_channels(xs, backend=backend)


def test_cpu_auto_is_the_reference():
    """On CPU the automatic choice is torch.cat (Triton on CPU is the interpreter, only when asked for)."""
    xs = _inputs((2, 4, 4), (4, 2), torch.float32)
    assert torch.equal(CC.cat_channels(xs), torch.cat(xs, dim=1)) and ops.last_backend(CC.OP) == "reference"


def test_empty_inputs():
    """No pixels, or an input without channels: the right shape, the other inputs' channels in place."""
    assert CC.cat_channels(_inputs((0, 2, 2), (4, 3), torch.float32), backend="triton").shape == (0, 7, 2, 2)
    xs = _inputs((2, 2, 3), (3, 0, 5), torch.float16)
    got = CC.cat_channels(xs, backend="triton")
    assert torch.isfinite(got).all() and torch.equal(got, torch.cat(xs, dim=1))


def test_chunked_channel_blocks_match(monkeypatch):
    """Channel blocks on grid axis 1 in launches of at most 2 blocks (forced; C = 37: 5 blocks of 8,
    the last partial; then C = 11: 2 blocks): every launch writes its own channels (poisoned output)."""
    from ppap_fast.ops import _kernel_util
    from ppap_fast.ops import concat_triton as CT

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 2)
    xs = _inputs((2, 2, 4), (37, 11), torch.float16)
    rec = LaunchRecorder(CT._cat_channels_kernel)
    monkeypatch.setattr(CT, "_cat_channels_kernel", rec)
    assert torch.equal(CC.cat_channels(xs, backend="triton"), torch.cat(xs, dim=1))
    assert [g[1] for g, _ in rec.launches] == [2, 2, 1, 2]


def test_launch_grids_stay_within_cuda_limits(monkeypatch):
    """More than 65535 channel blocks (grid axis 1) in each input: launches within CUDA's limits that
    cover every block of every input once, each at its input's channel offset (grids recorded, nothing run)."""
    from ppap_fast.ops import concat_triton as CT

    C0, C1 = 65537 * 8 - 3, 65536 * 8 + 1
    rec = LaunchRecorder()
    monkeypatch.setattr(CT, "_cat_channels_kernel", rec)
    zeros = [torch.zeros(1, c, 1, 2).contiguous(memory_format=torch.channels_last) for c in (C0, C1)]
    CC.cat_channels(zeros, backend="triton")
    covered = {}
    for grid, args in rec.launches:
        assert_grid_within_cuda_limits(grid)
        c, c_out, c_off, cb0 = args[3:7]  # x, y, NP, C, C_OUT, c_off, cb0
        assert c_out == C0 + C1 and c_off == {C0: 0, C1: C0}[c]
        covered.setdefault(c, []).extend(range(cb0, cb0 + grid[1]))
    assert len(rec.launches) == 4
    assert covered == {C0: list(range(65537)), C1: list(range(65537))}


# ------------------------------------------------------------------ ADM's fast path

ADM_TINY = dict(TINY_ADM, resblock_updown=True)


def _adm():
    return tiny_adm(resblock_updown=True)


def test_fused_adm_concatenates_through_the_op(monkeypatch):
    """fuse_norm_act makes ADM's decoder join its skips through ops.cat_channels (the kernel launches
    once per decoder block: the skip, into the buffer the block before wrote), with the fused model's
    output unchanged bit for bit
    (channels_last, Triton forced, interpreted); fuse_norm_act(False) turns it off."""
    from ppap_fast.ops import concat_triton as CT

    m = _adm().to(memory_format=torch.channels_last)
    # batch 2: at batch 1 attention's output has batch stride C (passed on by the Triton residual op),
    # which makes torch.cat choose an NCHW output (the op's is channels_last): the next conv rounds otherwise
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500, 20])
    assert m.fuse_norm_act().fast_cat
    rec = LaunchRecorder(CT._cat_channels_kernel)
    monkeypatch.setattr(CT, "_cat_channels_kernel", rec)
    ops.set_backend("triton")
    try:
        with torch.no_grad():
            got = m(x, t)
            m.fast_cat = False  # the fused path as it was before the op
            want = m(x, t)
    finally:
        ops.set_backend(None)
    assert len(rec.launches) == len(m.output_blocks)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    m.fuse_norm_act()
    assert m.fuse_norm_act(False) is m and not m.fast_cat


def test_fused_adm_on_cpu_keeps_its_results():
    """CPU (no backend forced): the fused path's concatenation is torch.cat, NCHW and channels_last."""
    m = _adm()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 800])
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            m, x = m.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            want = m.fuse_norm_act()(x, t)
            assert ops.last_backend(CC.OP) == "reference"
            m.fast_cat = False
            assert torch.equal(m(x, t), want)


def test_fused_3d_adm_keeps_torch_cat():
    """A dims=3 ADM's 5-D activations are not the op's: fuse_norm_act leaves its decoder on torch.cat."""
    from ppap_fast.models import ADMUNet

    m = ADMUNet(**{**ADM_TINY, "resblock_updown": False}, dims=3).eval()
    assert not m.fuse_norm_act().fast_cat
    with torch.no_grad():
        assert m(torch.randn(1, 3, 2, 8, 8), torch.tensor([5])).shape == (1, 3, 2, 8, 8)


# ------------------------------------------------------------------ CUDA

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_parity_and_graph(dtype):
    """Bit for bit against torch.cat on the GPU: odd and unaligned C (the 1024-element tiles), ADM-like
    widths (aligned, 4096), many pixel blocks, three inputs; poisoned outputs; a captured graph replays."""
    for bhw, chans in (((3, 18, 10), (37, 5)), ((2, 32, 32), (256, 256)), ((2, 16, 16), (512, 256)),
                       ((5, 64, 2), (3, 16, 1)), ((1, 4, 6), (1000, 24))):
        xs = _inputs(bhw, chans, dtype, "cuda")
        got = CC.cat_channels(xs)
        assert ops.last_backend(CC.OP) == "triton"
        assert torch.isfinite(got).all() and torch.equal(got, torch.cat(xs, dim=1)), (bhw, chans)
    graph, out = capture_cuda_graph(lambda: CC.cat_channels(xs))
    out.fill_(float("nan"))
    graph.replay()
    assert torch.equal(out, torch.cat(xs, dim=1))
    skip = _inputs((2, 32, 32), (256,), dtype, "cuda")[0]  # ADM's decoder: the skip after h, in place
    buf = torch.full((2, 512, 32, 32), 3.0, dtype=dtype, device="cuda").contiguous(memory_format=torch.channels_last)
    assert CC.cat_channels([skip], out=buf, c_off=256) is buf and ops.last_backend(CC.OP) == "triton"
    assert torch.equal(buf[:, 256:], skip) and (buf[:, :256] == 3).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_out_and_offset_write_into_a_buffer(backend):
    """out= / c_off= (ADM's decoder: the skip copied after the block output already in the buffer): the
    tensors land at channels c_off.., the rest untouched, bit for bit torch.cat's slice; out returned;
    a c_off past the end or a mismatched out raises."""
    xs = _inputs((2, 3, 5), (7, 9), torch.float16)
    buf = torch.full((2, 20, 3, 5), 5.0, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    got = CC.cat_channels(xs, out=buf, c_off=3, backend=backend)
    assert got is buf and ops.last_backend(CC.OP) == backend
    assert torch.equal(_bits(buf[:, 3:19]), _bits(torch.cat(xs, 1)))
    assert (buf[:, :3] == 5).all() and (buf[:, 19:] == 5).all()
    for kw, msg in ((dict(out=buf, c_off=5), "must fit"), (dict(out=buf, c_off=-1), "must fit"),
                    (dict(out=buf[:, :, :2]), "B, H, W")):
        with pytest.raises(ValueError, match=msg):
            CC.cat_channels(xs, backend=backend, **kw)
    nchw = torch.zeros(2, 16, 3, 5, dtype=torch.float16)  # not the kernel's layout: the reference (auto)
    assert torch.equal(CC.cat_channels(xs, out=nchw), torch.cat(xs, 1)) and ops.last_backend(CC.OP) == "reference"
