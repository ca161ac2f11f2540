"""ops.out_head.group_norm_silu_conv3x3: GroupNorm + SiLU + 3x3 conv to a few channels (ADM's output head
on its half torso). Reference vs an independent float64 composition; Triton (CPU interpreter, fp16;
CUDA marked ``cuda``: fp16 and bf16) vs float64 over random shapes, output widths, layouts and affine
/ bias mixes, outputs and the projection buffer poisoned; the fallbacks and bad input."""
import random

import pytest
import torch
import torch.nn.functional as F

from ppap_fast import ops
from ppap_fast.ops import _kernel_util
from ppap_fast.ops import norm_act as GA
from ppap_fast.ops import out_head as OH

from _util import poisoned_kernels, rel_err, requires_cuda

# x rounded to its dtype is the input of both; the normalised activation is rounded once to it (as the
# unfused head writes it), which dominates: fp16 ~5e-4 relative
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(OH, GA):
        yield


def _case(rng, gen, dtype, device="cpu", *, B=None, C=None, H=None, W=None, G=None, cout=None, affine=True,
          bias=True, mean=0.0, channels_last=True):
    G = G or rng.choice([1, 2, 4, 8])
    C = C or G * rng.choice([1, 2, 3, 5, 8])
    B, H, W = B or rng.randint(1, 3), H or rng.randint(1, 9), W or rng.randint(1, 9)
    cout = cout or rng.randint(1, OH.MAX_OUT_CHANNELS)
    x = (torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) * 2 + mean).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gw = (torch.rand(C, generator=gen) + 0.5) if affine else None
    gb = torch.randn(C, generator=gen) if affine else None
    w = torch.randn(cout, C, 3, 3, generator=gen) / (3 * C ** 0.5)
    b = torch.randn(cout, generator=gen) if bias else None
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return x.to(device), G, mv(gw), mv(gb), mv(w), mv(b)


def _want(x, G, gw, gb, w, b):
    """float64, composed from torch's modules (not the reference under test)."""
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    return F.conv2d(F.silu(F.group_norm(d(x), G, d(gw), d(gb), 1e-5)), d(w), d(b), padding=1)


def test_reference_is_the_half_head_of_the_modules():
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    x, G, gw, gb, w, b = _case(rng, gen, torch.float64, C=16, G=4, cout=6)
    got = OH.group_norm_silu_conv3x3_reference(x, G, gw.double(), gb.double(), 1e-5, w.double(), b.double())
    assert rel_err(got, _want(x, G, gw, gb, w, b)) < 1e-12
    xh = x.half()  # the half head: the norm written in fp16, the conv in fp16, then out_dtype
    h = GA.group_norm_act_reference(xh, G, gw, gb)
    assert h.dtype == torch.float16
    want = F.conv2d(h, w.half(), b.half(), padding=1).float()
    assert torch.equal(OH.group_norm_silu_conv3x3_reference(xh, G, gw, gb, 1e-5, w, b, torch.float32), want)


@pytest.mark.parametrize("seed", range(6))
def test_triton_matches_float64(seed):
    """Random shapes (1x1 to 9x9 images: the zero padding on every side), groups, 1 to 14 output channels,
    NCHW and channels_last, with and without affine / bias, a large mean in some; out_dtype float32 and
    the default (x's dtype)."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    dtype = torch.float16
    for i in range(3):
        cl, affine, bias = rng.random() < 0.7, rng.random() < 0.8, rng.random() < 0.7
        x, G, gw, gb, w, b = _case(rng, gen, dtype, affine=affine, bias=bias, channels_last=cl,
                                   mean=30.0 if rng.random() < 0.3 else 0.0)
        out_dtype = rng.choice([torch.float32, None])
        got = OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w, conv_bias=b, out_dtype=out_dtype,
                                         backend="triton")
        assert ops.last_backend(OH.OP) == "triton"
        assert got.dtype == (out_dtype or dtype) and got.shape == (x.shape[0], w.shape[0], *x.shape[2:])
        assert got.is_contiguous(memory_format=torch.channels_last if cl and x.shape[1] > 1 else torch.contiguous_format)
        err = rel_err(got, _want(x, G, gw, gb, w, b))
        label = f"{tuple(x.shape)} G{G} cout={w.shape[0]} cl={cl} affine={affine} bias={bias}"
        assert err <= TOL[dtype], f"{label}: {err:.2e}"
        ref = rel_err(OH.group_norm_silu_conv3x3_reference(x, G, gw, gb, 1e-5, w, b, torch.float32),
                      _want(x, G, gw, gb, w, b))
        assert err <= 1.5 * ref + 1e-4, f"{label}: fused {err:.2e} vs the half head's {ref:.2e}"


@pytest.mark.parametrize("seed", range(3))
def test_bf16_reference_matches_float64(seed):
    """bf16 on the CPU: the reference (the automatic choice there; no C++ path, and the Triton projection's
    bf16 tl.dot is not exercised under the interpreter) against float64 over random shapes, layouts, affine /
    bias mixes and a large mean, out_dtype float32 and the default (bf16): finite, in x's memory format."""
    gen, rng = torch.Generator().manual_seed(100 + seed), random.Random(100 + seed)
    dtype = torch.bfloat16
    for i in range(3):
        cl, affine, bias = rng.random() < 0.6, rng.random() < 0.8, rng.random() < 0.7
        x, G, gw, gb, w, b = _case(rng, gen, dtype, affine=affine, bias=bias, channels_last=cl,
                                   mean=30.0 if i == 0 else 0.0)
        out_dtype = rng.choice([torch.float32, None])
        got = OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w, conv_bias=b, out_dtype=out_dtype)
        assert ops.last_backend(OH.OP) == "reference"
        label = f"{tuple(x.shape)} G{G} cout={w.shape[0]} cl={cl} affine={affine} bias={bias} out={out_dtype}"
        assert got.dtype == (out_dtype or dtype) and got.shape == (x.shape[0], w.shape[0], *x.shape[2:]), label
        assert torch.isfinite(got).all(), label
        assert got.is_contiguous(memory_format=torch.channels_last if cl and x.shape[1] > 1 else torch.contiguous_format)
        err = rel_err(got, _want(x, G, gw, gb, w, b))
        assert err <= TOL[dtype], f"{label}: {err:.2e}"


def test_triton_several_channel_and_pixel_tiles_and_chunked_launches(monkeypatch):
    """ADM-like widths (the interpreter's 16-channel, 16-pixel tiles: 6 channel tiles, 5 pixel tiles),
    the samples launched in chunks of 2 (5 samples), against float64."""
    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 2)
    gen, rng = torch.Generator().manual_seed(7), random.Random(7)
    x, G, gw, gb, w, b = _case(rng, gen, torch.float16, B=5, C=96, H=7, W=11, G=32, cout=6)
    got = OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w, conv_bias=b, out_dtype=torch.float32,
                                     backend="triton")
    assert rel_err(got, _want(x, G, gw, gb, w, b)) <= TOL[torch.float16]


def test_the_projection_buffer_is_fully_written_before_it_is_read(monkeypatch):
    """Poisoned P (NaN): a tap read from a column or pixel the projection did not write would give NaN."""
    from ppap_fast.ops import out_head_triton as T

    seen = []
    real_empty = torch.empty

    def spying_empty(*a, **kw):
        t = real_empty(*a, **kw)
        if kw.get("dtype") == torch.float32 and len(a) == 1:
            seen.append(t)
        return t

    monkeypatch.setattr(T.torch, "empty", spying_empty)
    gen, rng = torch.Generator().manual_seed(3), random.Random(3)
    x, G, gw, gb, w, b = _case(rng, gen, torch.float16, B=2, C=8, H=3, W=4, G=2, cout=14)
    got = OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w, conv_bias=b, backend="triton")
    assert seen and all(torch.isfinite(p).all() for p in seen)  # every element overwritten
    assert torch.isfinite(got).all()


def test_fallbacks_and_bad_input():
    gen, rng = torch.Generator().manual_seed(5), random.Random(5)
    x, G, gw, gb, w, b = _case(rng, gen, torch.float16, C=8, G=2, cout=3)
    # automatic: the reference on the CPU; float32 x, 15 output channels and autograd take it everywhere
    y = OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w, conv_bias=b)
    assert ops.last_backend(OH.OP) == "reference" and y.dtype == torch.float16
    wide = torch.randn(15, 8, 3, 3)
    for kw, why in (({"x": x.float()}, r"takes fp16/bf16 x \(a half torso's head\), got torch.float32"),
                    ({"conv_weight": wide}, "at most 14 output channels"),
                    ({"conv_weight": w.clone().requires_grad_()}, "forward-only")):
        args = {"x": x, "conv_weight": w, **kw}
        OH.group_norm_silu_conv3x3(args["x"], G, gw, gb, conv_weight=args["conv_weight"])
        assert ops.last_backend(OH.OP) == "reference"
        with pytest.raises(ops.BackendUnavailableError, match=why):
            OH.group_norm_silu_conv3x3(args["x"], G, gw, gb, conv_weight=args["conv_weight"], backend="triton")
    with torch.no_grad():  # no autograd recording: the fast path may run
        OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w.clone().requires_grad_(), backend="triton")
    cases = [((x[0], G, gw, gb), dict(conv_weight=w), r"must be \[B, C, H, W\]"),
             ((x, 3, gw, gb), dict(conv_weight=w), "num_groups=3 must be a positive divisor of C=8"),
             ((x, G, gw[:4], gb), dict(conv_weight=w), r"norm_weight must be \[8\]"),
             ((x, G, gw, gb), dict(conv_weight=torch.randn(3, 8, 1, 1)), r"conv_weight must be \[C_out, 8, 3, 3\]"),
             ((x, G, gw, gb), dict(conv_weight=w, conv_bias=torch.randn(4)), r"conv_bias must be \[3\]"),
             ((x, G, gw, gb), dict(conv_weight=w, out_dtype=torch.int32), "out_dtype must be a floating"),
             ((x[:, :0], G, None, None), dict(conv_weight=w[:, :0], backend="triton"), "x has no channels")]
    cases += [((x[..., :0, :], G, gw, gb), dict(conv_weight=w, backend=be), "x has no pixels")
              for be in ("triton", "reference")]
    cases += [((x[..., :0], G, gw, gb), dict(conv_weight=w, backend=be), "x has no pixels")
              for be in ("triton", "reference")]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            OH.group_norm_silu_conv3x3(*args, **kw)
    empty = x[:0]
    assert OH.group_norm_silu_conv3x3(empty, G, gw, gb, conv_weight=w, backend="triton").shape == (0, 3, *x.shape[2:])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_matches_float64_at_adm_widths(dtype):
    """On the GPU's tiles: ADM-256's head widths (256 channels, 32 groups, 6 outputs) and random ones."""
    gen, rng = torch.Generator().manual_seed(11), random.Random(11)
    shapes = [dict(B=3, C=256, H=32, W=32, G=32, cout=6), dict(B=2, C=128, H=17, W=9, G=32, cout=3)]
    shapes += [dict() for _ in range(4)]
    for kw in shapes:
        x, G, gw, gb, w, b = _case(rng, gen, dtype, "cuda", **kw)
        got = OH.group_norm_silu_conv3x3(x, G, gw, gb, conv_weight=w, conv_bias=b, out_dtype=torch.float32)
        assert ops.last_backend(OH.OP) == "triton"
        err = rel_err(got, _want(x, G, gw, gb, w, b))
        assert err <= TOL[dtype], f"{tuple(x.shape)} G{G} cout={w.shape[0]}: {err:.2e}"


@requires_cuda
def test_cuda_graph_replay_follows_new_inputs():
    """Captured (statistics, packed weights, both passes), replayed on new values of the static input:
    equal to the eager op on those values."""
    gen, rng = torch.Generator().manual_seed(12), random.Random(12)
    x, G, gw, gb, w, b = _case(rng, gen, torch.float16, "cuda", B=2, C=64, H=16, W=16, G=32, cout=6)

    def head(inp):
        return OH.group_norm_silu_conv3x3(inp, G, gw, gb, conv_weight=w, conv_bias=b, out_dtype=torch.float32)

    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        head(static)  # warm-up (Triton compiles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = head(static)
    fresh = (torch.randn(x.shape, generator=gen) * 3 + 1).to("cuda", torch.float16).contiguous(
        memory_format=torch.channels_last)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    want = head(fresh)
    assert torch.isfinite(out).all() and torch.equal(out, want)
