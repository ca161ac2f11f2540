"""ops.channel_sums: GroupNorm statistics gathered by the op that writes the GroupNorm's input
(bias_residual_add / cat_channels with channel_sums=, read by group_norm_act(channel_sums=)), and ADM's
fused model passing them from each residual add / decoder concatenation to the next GroupNorm.
Reference and Triton (CPU interpreter, small shapes; CUDA marked ``cuda``) against float64 GroupNorm,
poisoned outputs and sums."""
import math

import pytest
import torch

from ppap_fast import ops
from ppap_fast.models import ADMUNet
from ppap_fast.models import adm as ADM
from ppap_fast.ops import concat as CC
from ppap_fast.ops import norm_act as NA
from ppap_fast.ops import residual as RA
from ppap_fast.ops.channel_sums import ChannelSums, attached, fill_reference, group_stats_reference

from _util import poisoned_kernels, rel_err, requires_cuda

pytestmark = pytest.mark.usefixtures("one_thread")
CL = torch.channels_last
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(RA, CC, NA):
        yield


def _cl(t):
    return t.contiguous(memory_format=CL)


def _buffer_with_sums(gen, dtype, backend, B=3, c1=22, c2=42, H=17, W=19, mean=0.0, p_chunk=None, device="cpu"):
    """A decoder-like buffer: a residual add's output in channels [0, c1), a skip copied into the rest (a group of 16
    spans the boundary at c1=22); its sums filled by both ops. (buf, sums, buf's float64 copy)."""
    h = _cl(torch.randn(B, c1, H, W, generator=gen).to(dtype)).to(device)
    skip = _cl((torch.randn(B, c1, H, W, generator=gen) * 3 + mean).to(dtype)).to(device)
    bias = torch.randn(c1, generator=gen).to(dtype).to(device)
    other = _cl((torch.randn(B, c2, H, W, generator=gen) + 2 + mean).to(dtype)).to(device)
    buf = _cl(torch.full((B, c1 + c2, H, W), float("nan"), dtype=dtype, device=device))
    sums = ChannelSums(buf, p_chunk=p_chunk)
    got = RA.bias_residual_add(h, skip, bias, out=buf[:, :c1], channel_sums=sums, backend=backend)
    assert got.data_ptr() == buf.data_ptr() and not sums.complete_for(buf)  # the skip's channels not yet
    assert CC.cat_channels([other], out=buf, c_off=c1, channel_sums=sums, backend=backend) is buf
    assert sums.complete_for(buf) and ops.last_backend(CC.OP) == backend
    return buf, sums


def _want_sums(buf, p_chunk):
    ref = ChannelSums(buf, p_chunk=p_chunk)
    fill_reference(ref, buf, 0)
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("p_chunk", [None, 64, 48])  # the default (2 chunks here), 6, 7 (a chunk below the tile)
def test_producers_sum_what_they_wrote(backend, dtype, p_chunk):
    gen = torch.Generator().manual_seed(1)
    buf, sums = _buffer_with_sums(gen, dtype, backend, p_chunk=p_chunk)
    assert sums.chunks == {None: 2, 64: 6, 48: 7}[p_chunk]  # 17 * 19 = 323 positions
    want = _want_sums(buf, sums.p_chunk)
    assert torch.isfinite(sums.part).all() and torch.isfinite(sums.shift).all()
    assert torch.equal(sums.shift, buf[:, :, 0, 0].float())  # the stored value at position 0
    assert rel_err(sums.part, want.part) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_group_norm_from_sums_matches_float64(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    for mean in (0.0, 300.0):  # shifted sums: no cancellation at a large mean
        buf, sums = _buffer_with_sums(gen, dtype, backend, mean=mean, p_chunk=64)
        C = buf.shape[1]
        w, b = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
        scale, shift = torch.randn(3, C, generator=gen) * 0.1, torch.randn(3, C, generator=gen)
        for G, kw in ((16, {}), (8, dict(scale=scale, shift=shift, silu=False)), (64, {})):
            got = NA.group_norm_act(buf, G, w, b, channel_sums=sums, backend=backend, **kw)
            assert ops.last_backend(NA.OP) == backend and got.dtype == dtype and got.stride() == buf.stride()
            want = NA.group_norm_act_reference(buf.double(), G, w.double(), b.double(),
                                               **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
            err = rel_err(got, want)
            own = rel_err(NA.group_norm_act(buf, G, w, b, backend=backend, **kw), want)
            # finite: rel_err is inf for NaN, and inf <= 1.5 * inf passed a NaN output of both paths
            assert math.isfinite(err) and err <= max(TOL[dtype], 1.5 * own), \
                f"mean {mean} G {G}: {err:.2e} (own statistics {own:.2e})"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("hw", [(0, 19), (17, 0)])
def test_an_empty_target_gets_zero_sums_from_every_producer(backend, hw):
    """H * W = 0: the default p_chunk was 0 ("p_chunk must be a positive multiple of 16, got 0", none passed) and
    the reference producers indexed position 0. The sums of no positions are 0 (one chunk), written by both
    producers (the Triton concatenation left them poisoned, the residual add unmarked)."""
    gen = torch.Generator().manual_seed(8)
    buf, sums = _buffer_with_sums(gen, torch.float32, backend, H=hw[0], W=hw[1])
    B, C = buf.shape[:2]
    flat = buf.reshape(B, C, 0).double()  # plain torch: the sums over no positions
    want = torch.stack((flat.sum(-1), flat.square().sum(-1)), 1)[:, None].float()  # [B, K=1, 2, C]
    assert sums.chunks == 1 and sums.p_chunk > 0 and want.shape == (3, 1, 2, 64)
    assert torch.equal(sums.part, want) and torch.equal(sums.shift, torch.zeros(B, C))
    got = NA.group_norm_act(buf, 16, channel_sums=sums, backend=backend)
    assert got.shape == buf.shape and ops.last_backend(NA.OP) == backend


def test_group_stats_reference_is_the_group_moments():
    gen = torch.Generator().manual_seed(3)
    x = _cl(torch.randn(2, 12, 5, 7, generator=gen, dtype=torch.float64).float() * 2 + 7)
    sums = ChannelSums(x, p_chunk=16)
    fill_reference(sums, x, 0)
    kg, m1, var = group_stats_reference(sums, 3, 35)
    g = x.double().reshape(2, 3, -1)
    assert torch.allclose((kg + m1).double(), g.mean(-1), atol=1e-5)
    assert torch.allclose(var.double(), g.var(-1, unbiased=False), rtol=1e-4)
    assert torch.equal(kg, x[:, ::4, 0, 0])


def test_sums_are_refused_where_they_do_not_describe_x():
    gen = torch.Generator().manual_seed(4)
    buf, sums = _buffer_with_sums(gen, torch.float32, "reference")
    C = buf.shape[1]
    NA.group_norm_act(buf, 16, channel_sums=sums)  # fine
    with pytest.raises(ValueError, match="no in_bias"):
        NA.group_norm_act(buf, 16, in_bias=torch.zeros(C), channel_sums=sums)
    with pytest.raises(ValueError, match="do not describe x"):
        NA.group_norm_act(buf.clone(), 16, channel_sums=sums)  # another tensor
    with pytest.raises(TypeError, match="ChannelSums"):
        NA.group_norm_act(buf, 16, channel_sums=(sums.part, sums.shift))
    leaf = buf.detach().clone().requires_grad_(True)
    s2 = ChannelSums(leaf.detach())
    with pytest.raises(ValueError, match="describe|autograd"):
        NA.group_norm_act(leaf, 16, channel_sums=s2)
    buf.add_(1.0)  # modified after the sums were taken
    assert not sums.complete_for(buf) and attached(buf) is None
    with pytest.raises(ValueError, match="modified since"):
        NA.group_norm_act(buf, 16, channel_sums=sums)
    part = _cl(torch.zeros(2, 8, 3, 3))
    half = ChannelSums(part)
    RA.bias_residual_add(torch.ones(2, 4, 3, 3), torch.ones(2, 4, 3, 3), out=part[:, :4], channel_sums=half)
    assert not half.complete_for(part)  # channels 4.. never written
    with torch.inference_mode():
        inf = _cl(torch.zeros(1, 4, 2, 2))
        s3 = ChannelSums(inf)
        CC.cat_channels([_cl(torch.ones(1, 4, 2, 2))], out=inf, channel_sums=s3)
    assert not s3.complete_for(inf)  # no version to check against


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_sums_are_refused_after_a_write_they_did_not_see(backend):
    """x changed between two producers' writes (the earlier channels' sums stale), or rewritten by a Triton op
    without channel_sums (which must bump x's version, as copy_ does): the sums no longer count as complete."""
    gen = torch.Generator().manual_seed(7)
    buf, sums = _buffer_with_sums(gen, torch.float32, backend)
    c1 = 22
    buf[:, :c1].mul_(3.0)  # after the residual's sums: the skip copy below must not make them complete
    CC.cat_channels([_cl(torch.randn(3, 42, 17, 19, generator=gen))], out=buf, c_off=c1, channel_sums=sums,
                    backend=backend)
    assert not sums.complete_for(buf) and attached(buf) is None
    buf, sums = _buffer_with_sums(gen, torch.float32, backend)
    CC.cat_channels([_cl(torch.randn(3, 42, 17, 19, generator=gen) + 5)], out=buf, c_off=c1, backend=backend)
    assert not sums.complete_for(buf)
    buf, sums = _buffer_with_sums(gen, torch.float32, backend)
    h = _cl(torch.randn(3, c1, 17, 19, generator=gen))
    RA.bias_residual_add(h, h, out=buf[:, :c1], backend=backend)
    assert not sums.complete_for(buf)


def test_sums_are_refused_for_another_tensor_at_the_targets_address():
    """The target gone, another tensor at its address (the caching allocator's reuse; here the same storage
    under its own version counter) whose version happens to match: not the target's sums."""
    gen = torch.Generator().manual_seed(8)
    buf, sums = _buffer_with_sums(gen, torch.float32, "reference")
    x = torch.empty(0).set_(buf.untyped_storage(), buf.storage_offset(), buf.shape, buf.stride())
    del buf
    while x._version < sums._version:
        x.add_(1.0)  # new values, the target's version
    assert x._version == sums._version and x.is_contiguous(memory_format=CL)
    assert not sums.complete_for(x)


def test_bad_targets_and_outputs_raise():
    with pytest.raises(ValueError, match="channels_last"):
        ChannelSums(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="p_chunk"):
        ChannelSums(_cl(torch.zeros(1, 4, 2, 2)), p_chunk=20)
    buf = _cl(torch.zeros(2, 8, 3, 3))
    sums = ChannelSums(buf)
    h = torch.ones(2, 4, 3, 3)
    with pytest.raises(ValueError, match="needs out"):
        RA.bias_residual_add(h, h, channel_sums=sums)
    with pytest.raises(ValueError, match="not the sums' target"):
        RA.bias_residual_add(h, h, out=_cl(torch.zeros(2, 4, 3, 3)), channel_sums=sums)
    with pytest.raises(ValueError, match="needs out"):
        CC.cat_channels([_cl(h)], channel_sums=sums)
    with pytest.raises(TypeError, match="ChannelSums"):
        CC.cat_channels([_cl(h)], out=buf, channel_sums=object())
    assert sums.offset_of(buf[:, 4:]) == 4 and sums.offset_of(buf) == 0


# ------------------------------------------------------------------ ADM's fused path

SMALL = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=8,
             use_scale_shift_norm=True, resblock_updown=True)


def _adm(**kw):
    torch.manual_seed(3)
    m = ADMUNet(**{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.to(memory_format=CL)


class _NormCalls:
    """Records, per group_norm_act call, whether it got channel sums and whether it took in_bias / scale."""

    def __init__(self, monkeypatch):
        self.calls, real = [], NA.group_norm_act

        def rec(x, *a, channel_sums=None, **kw):
            plain = kw.get("in_bias") is None and kw.get("scale") is None
            self.calls.append((channel_sums is not None, plain))
            return real(x, *a, channel_sums=channel_sums, **kw)

        monkeypatch.setattr(NA, "group_norm_act", rec)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw", [{}, {"use_scale_shift_norm": False, "resblock_updown": False}])
def test_fused_adm_passes_sums_to_every_norm_after_a_residual_or_concatenation(backend, kw, monkeypatch):
    """PPAP_FAST_CHANNEL_SUMS=1 (CUDA's auto on the CPU): every plain GroupNorm but the first block's (after the
    input conv) and those after a standalone Downsample reads its statistics from the producer's sums; the
    output equals the model without them to rounding."""
    m = _adm(**kw).fuse_norm_act()
    x, t = _cl(torch.randn(2, 3, 16, 16)), torch.tensor([3, 800])
    norms = _NormCalls(monkeypatch)
    ops.set_backend(backend)
    try:
        with torch.no_grad():
            monkeypatch.setattr(ADM, "CHANNEL_SUMS", "0")
            want = m(x, t)
            assert not any(s for s, _ in norms.calls)
            norms.calls.clear()
            monkeypatch.setattr(ADM, "CHANNEL_SUMS", "1")
            got = m(x, t)
    finally:
        ops.set_backend(None)
    plain = [s for s, p in norms.calls if p]
    pooled = sum(isinstance(blk[0], ADM.Downsample) for blk in m.input_blocks)  # a standalone pool's output: none
    assert sum(plain) == len(plain) - 1 - pooled and plain[0] is False
    assert not any(s for s, p in norms.calls if not p)  # the out norms (in_bias / scale) compute their own
    assert torch.isfinite(got).all() and rel_err(got, want) < 2e-6


def test_cpu_auto_and_autograd_take_no_sums(monkeypatch):
    """Off by default; auto: only CUDA tensors carry sums (the reference producer costs more on the CPU than the
    pass it saves); with autograd recording none either (the reference path, sums are constants to autograd)."""
    m = _adm().fuse_norm_act()
    x, t = _cl(torch.randn(2, 3, 16, 16)), torch.tensor([3, 800])
    norms = _NormCalls(monkeypatch)
    assert ADM.CHANNEL_SUMS == "0"
    monkeypatch.setattr(ADM, "CHANNEL_SUMS", "auto")
    with torch.no_grad():
        m(x, t)
    assert norms.calls and not any(s for s, _ in norms.calls)
    monkeypatch.setattr(ADM, "CHANNEL_SUMS", "1")
    xg = x.clone().requires_grad_(True)
    norms.calls.clear()
    (g,) = torch.autograd.grad(m(xg, t).square().sum(), xg)
    assert norms.calls and not any(s for s, _ in norms.calls) and torch.isfinite(g).all()
    monkeypatch.setattr(ADM, "CHANNEL_SUMS", "yes")
    with torch.no_grad(), pytest.raises(ValueError, match="PPAP_FAST_CHANNEL_SUMS"):
        m(x, t)


# ------------------------------------------------------------------ CUDA

@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_sums_and_group_norm_match_float64(dtype):
    gen = torch.Generator().manual_seed(6)
    for p_chunk in (None, 256):
        buf, sums = _buffer_with_sums(gen, dtype, "triton", B=4, c1=96, c2=160, H=33, W=40, mean=20.0,
                                      p_chunk=p_chunk, device="cuda")
        want = _want_sums(buf, sums.p_chunk)
        assert torch.equal(sums.shift, buf[:, :, 0, 0].float()) and rel_err(sums.part, want.part) < 1e-5
        w, b = torch.randn(256, device="cuda"), torch.randn(256, device="cuda")
        got = NA.group_norm_act(buf, 32, w, b, channel_sums=sums)
        assert ops.last_backend(NA.OP) == "triton"
        ref = NA.group_norm_act_reference(buf.double(), 32, w.double(), b.double())
        err = rel_err(got, ref)
        assert math.isfinite(err) and err <= max(TOL[dtype], 1.5 * rel_err(NA.group_norm_act(buf, 32, w, b), ref))


@requires_cuda
def test_cuda_fused_adm_with_sums_equals_without(monkeypatch):
    m = _adm().cuda().half().fuse_norm_act()
    x, t = _cl(torch.randn(4, 3, 16, 16, device="cuda").half()), torch.tensor([3, 800, 10, 500], device="cuda")
    norms = _NormCalls(monkeypatch)
    with torch.no_grad():
        monkeypatch.setattr(ADM, "CHANNEL_SUMS", "0")
        want = m(x, t)
        monkeypatch.setattr(ADM, "CHANNEL_SUMS", "auto")
        norms.calls.clear()
        got = m(x, t)
    assert sum(s for s, _ in norms.calls) > 0
    assert torch.isfinite(got).all() and rel_err(got, want) < 2e-3
