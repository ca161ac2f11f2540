"""Fake (meta) kernels of the extension's ops: FakeTensor outputs match the real CPU kernels'
shape / dtype / stride, torch.library.opcheck passes, and torch.compile(fullgraph=True) traces the
public ops on the cpp backend and matches eager."""
from __future__ import annotations

import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ppap_fast.ops import _ext
from ppap_fast.ops import lora as L
from ppap_fast.ops import update as gu
from ppap_fast.ops.lora import cpp as CPP
from ppap_fast.ops.lora.segments import build_segments
from ppap_fast.schedule import Schedule

pytestmark = pytest.mark.skipif(not _ext.extension_loaded(), reason=f"extension not loaded ({_ext.EXTENSION_ERROR})")

NAN = float("nan")
SEGMENT_OPS = ("lora_sgmv_shrink", "lora_sgmv_expand", "lora_seg_outer")
COMPOSITE_OPS = ("lora_linear_cpp", "lora_conv2d_cpp")


@pytest.fixture(autouse=True)
def _poison(one_thread):
    old = CPP.POISON
    CPP.POISON = True  # the cpp LoRA ops' scratch buffers start as NaN
    yield
    CPP.POISON = old


def _op(name):
    if not hasattr(torch.ops.ppap_fast, name):
        pytest.skip(f"the loaded extension has no ppap_fast::{name} (built before it)")
    return getattr(torch.ops.ppap_fast, name).default


def _meta(t):
    return (tuple(t.shape), t.dtype, t.stride())


def _run_real_and_fake(op, args):
    """op on the real CPU tensors and on fake copies: (real result, fake result, real args, fake args)."""
    real_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    real = op(*real_args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    return real, fake, real_args, fake_args


def _update_args(dtype, mode, shape=(3, 2, 5, 4)):
    sampler, var = {0: ("ddim", "learned_range"), 1: ("ddpm", "fixed_small"), 2: ("ddpm", "learned_range")}[mode]
    table = gu.build_table(Schedule.create("linear", 1000, "10"), sampler, eta=0.5, var_type=var)
    gen = torch.Generator().manual_seed(mode)
    x, eps, v, grad, noise = (torch.randn(shape, generator=gen).to(dtype) for _ in range(5))
    idx = torch.tensor([0, 9, 4][: shape[0]])
    coefs = table.coefs if dtype == torch.float64 else table.coefs_f32
    return [x, eps, v if mode == 2 else None, grad, noise, idx, coefs, mode, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_guided_update_fake_matches_cpu(dtype, mode):
    real, fake, _, _ = _run_real_and_fake(_op("guided_update"), _update_args(dtype, mode))
    assert len(real) == len(fake) == 2
    for r, f in zip(real, fake):
        assert torch.isfinite(r.float()).all()
        assert _meta(f) == _meta(r)


def _row_strided(t):
    """t's values with a batch stride of two samples: each sample contiguous, the tensor not."""
    return torch.stack([t, torch.full_like(t, NAN)], 1)[:, 0]


def _channels_last(t):
    """t's values with each sample's channels innermost (not contiguous within a sample)."""
    return t.contiguous(memory_format=torch.channels_last)


# (argument index, how it is changed, the rejection's message, None: accepted), on _update_args(float32, 2)
_UPDATE_CASES = {
    "learned range without v": (2, lambda t: None, "needs v"),
    "mode 3": (7, lambda m: 3, "mode must be 0"),
    "x not contiguous": (0, _channels_last, "x must be contiguous with a batch dim"),
    "eps of another rank": (1, lambda t: t.flatten(2), "eps must have x's batch size and rank"),
    "grad of another shape": (3, lambda t: t.transpose(2, 3).contiguous(), r"grad shape \[3, 2, 4, 5\] does not match"),
    "noise of another dtype": (4, lambda t: t.double(), "noise dtype differs from x"),
    "v on another device": (2, lambda t: t.to("meta"), "v is on another device than x"),
    "eps channels last": (1, _channels_last, "eps must be contiguous within a sample"),
    "v channels last": (2, _channels_last, "v must be contiguous within a sample"),
    "grad channels last": (3, _channels_last, "grad must be contiguous within a sample"),
    "noise channels last": (4, _channels_last, "noise must be contiguous within a sample"),
    "eps, grad, noise batch-strided": ((1, 3, 4), _row_strided, None),
    "idx not contiguous": (5, lambda t: torch.stack([t, t], 1)[:, 0], "idx must be a contiguous long tensor"),
    "idx int32": (5, lambda t: t.int(), "idx must be a contiguous long tensor"),
    "idx on another device": (5, lambda t: t.to("meta"), "idx must be a contiguous long tensor"),
    "coefs not contiguous": (6, lambda t: t.t().contiguous().t(), "coefs must be a contiguous"),
    "coefs float64": (6, lambda t: t.double(), "coefs must be a contiguous"),
    "coefs on another device": (6, lambda t: t.to("meta"), "coefs must be a contiguous"),
}


@pytest.mark.parametrize("case", list(_UPDATE_CASES))
def test_guided_update_fake_rejects_what_the_kernel_rejects(case):
    """The fake kernel refuses (with the same message) what the CPU kernel refuses, and accepts what it
    accepts; the CPU kernel is called by its dispatch key (a meta argument would dispatch to the fake)."""
    where, change, message = _UPDATE_CASES[case]
    args = _update_args(torch.float32, 2)
    for i in where if isinstance(where, tuple) else (where,):
        args[i] = change(args[i])
    cpu_kernel = functools.partial(_op("guided_update").redispatch, torch._C.DispatchKeySet(torch._C.DispatchKey.CPU))
    mode = FakeTensorMode()
    with mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    if message is None:
        assert torch.isfinite(cpu_kernel(*args)[0]).all()
        with mode:
            assert _meta(_op("guided_update")(*fake_args)[0]) == _meta(args[0])
        return
    with pytest.raises(RuntimeError, match=message):
        cpu_kernel(*args)
    with mode, pytest.raises(RuntimeError, match=message):
        _op("guided_update")(*fake_args)


def test_guided_update_fake_rejects_integer_x():
    """The kernels dispatch on floating dtypes only."""
    args = _update_args(torch.float32, 1)
    args[:5] = [None if a is None else a.long() for a in args[:5]]
    with pytest.raises(RuntimeError, match="not implemented for 'Long'"):
        _op("guided_update")(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match="x must be float16, bfloat16, float32 or float64"):
        _op("guided_update")(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])



def _eps_args(dtype, extra=True):
    """guided_eps arguments: model_output [3, 2 + 2, 5, 4] as a channel slice (batch-strided), grad, coef."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(3, 6 if extra else 3, 5, 4, generator=gen).to(dtype)
    model_output = wide[:, 1:5] if extra else wide[:, 1:3]
    grad = torch.randn(3, 2, 5, 4, generator=gen).to(dtype)
    coef = torch.rand(3, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return [model_output, grad, coef, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("extra", [True, False])
def test_guided_eps_fake_matches_cpu(dtype, extra):
    real, fake, _, _ = _run_real_and_fake(_op("guided_eps"), _eps_args(dtype, extra))
    assert torch.isfinite(real.float()).all()
    assert _meta(fake) == _meta(real)


# (argument index, how it is changed, the rejection's message, None: accepted), on _eps_args(float32)
_EPS_CASES = {
    "1-D model_output": (0, lambda t: t[:, 0, 0, 0], r"model_output must be \[B, C, ...\]"),
    "model_output channels last": (0, _channels_last, "model_output must be contiguous within a sample"),
    "channels 0": (3, lambda c: 0, r"channels must lie in \[1, 4\]"),
    "channels 5": (3, lambda c: 5, r"channels must lie in \[1, 4\]"),
    "grad of other channels": (1, lambda t: torch.cat([t, t], 1), r"grad must be \[B, channels, ...\]"),
    "grad of another batch": (1, lambda t: t[:2], r"grad must be \[B, channels, ...\]"),
    "grad float64": (1, lambda t: t.double(), "grad must have model_output's dtype or float32"),
    "grad on another device": (1, lambda t: t.to("meta"), "grad is on another device"),
    "grad channels last": (1, _channels_last, "grad must be contiguous within a sample"),
    "grad batch-strided": (1, _row_strided, None),
    "coef float64": (2, lambda t: t.double(), "coef must be a contiguous"),
    "coef [B, 1]": (2, lambda t: t[:, None], "coef must be a contiguous"),
    "coef not contiguous": (2, lambda t: torch.stack([t, t], 1)[:, 0], "coef must be a contiguous"),
    "coef on another device": (2, lambda t: t.to("meta"), "coef must be a contiguous"),
}


@pytest.mark.parametrize("case", list(_EPS_CASES))
def test_guided_eps_fake_rejects_what_the_kernel_rejects(case):
    where, change, message = _EPS_CASES[case]
    args = _eps_args(torch.float32)
    args[where] = change(args[where])
    cpu_kernel = functools.partial(_op("guided_eps").redispatch, torch._C.DispatchKeySet(torch._C.DispatchKey.CPU))
    mode = FakeTensorMode()
    with mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    if message is None:
        real = cpu_kernel(*args)
        assert torch.isfinite(real).all()
        with mode:
            assert _meta(_op("guided_eps")(*fake_args)) == _meta(real)
        return
    with pytest.raises(RuntimeError, match=message):
        cpu_kernel(*args)
    with mode, pytest.raises(RuntimeError, match=message):
        _op("guided_eps")(*fake_args)

def _segment_args(name, dtype, S=4, M=3, K=5, R=2, N=3):
    gen = torch.Generator().manual_seed(0)
    seg = build_segments(torch.tensor([2, 0, 2, 1][:S]), N)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    if name == "lora_sgmv_shrink":
        return [rnd(S, M, K), rnd(N, R, K), torch.full((S, M, R), NAN, dtype=dtype), seg.sorted_idx, seg.offsets]
    if name == "lora_sgmv_expand":
        return [rnd(S, M, R), rnd(N, K, R), rnd(S, M, K), seg.sorted_idx, seg.offsets, 0.5]
    return [rnd(S, M, K), rnd(S, M, R), torch.full((N, K, R), NAN, dtype=torch.float32), seg.sorted_idx, seg.offsets,
            0.5, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SEGMENT_OPS)
def test_segment_op_fake_matches_cpu(name, dtype):
    """The segment ops write their out argument and return nothing, real and fake alike."""
    args = _segment_args(name, dtype)
    real, fake, real_args, fake_args = _run_real_and_fake(_op(name), args)
    assert real is None and fake is None
    assert torch.isfinite(real_args[2].float()).all()  # the poisoned out was written
    assert _meta(fake_args[2]) == _meta(real_args[2]) == _meta(args[2])


@pytest.mark.parametrize("name", SEGMENT_OPS)
def test_segment_op_fake_rejects_what_the_kernel_rejects(name):
    """Bad metadata fails while tracing, as it would at run time (torch's automatic fake kernel for
    ops returning nothing checks nothing)."""
    args = _segment_args(name, torch.float32)
    if name == "lora_seg_outer":
        args[1], message = args[1][:, :2], r"u \[S, M, P\], v \[S, M, Q\]"  # v's M differs from u's
    else:
        args[4], message = args[4][:-1], r"offsets must be \[N\+1\]"
    with pytest.raises(RuntimeError, match=message):
        _op(name)(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        _op(name)(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])


def _lora_linear_args(dtype, with_bias):
    gen = torch.Generator().manual_seed(1)
    S, M, K, R, N, O = 3, 2, 6, 2, 3, 5
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    seg = build_segments(torch.tensor([2, 0, 2]), N)
    return [rnd(S, M, K), rnd(O, K), rnd(O) if with_bias else None, rnd(N, R, K), rnd(N, O, R),
            rnd(N, O) if with_bias else None, seg.expert_idx, seg.sorted_idx, seg.offsets, 0.5, True]


def _lora_conv_args(dtype, channels_last, groups=1):
    gen = torch.Generator().manual_seed(2)
    S, C, H, N, r, O = 3, 4, 5, 3, 2, 6
    rnd = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    x = rnd(S, C, H, H)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seg = build_segments(torch.tensor([1, 1, 0]), N)
    return [x, rnd(O, C // groups, 3, 3), rnd(O), rnd(N, r, C // groups, 3, 3), rnd(N, O, r), rnd(N, O),
            seg.expert_idx, seg.sorted_idx, seg.offsets, 0.5, [1, 1], [1, 1], [1, 1], groups, True]


@pytest.mark.parametrize("case", ["linear-fp32", "linear-bf16-nobias", "conv-fp32", "conv-fp32-channels_last",
                                  "conv-bf16-groups2"])
def test_composite_lora_op_fake_matches_cpu(case):
    """lora_linear_cpp / lora_conv2d_cpp decompose (CompositeImplicitAutograd) under FakeTensorMode into
    ATen calls and the segment ops' fake kernels; before, they read offsets' data and failed."""
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    if case.startswith("linear"):
        op, args = _op("lora_linear_cpp"), _lora_linear_args(dtype, "nobias" not in case)
    else:
        groups = 2 if "groups2" in case else 1
        op, args = _op("lora_conv2d_cpp"), _lora_conv_args(dtype, "channels_last" in case, groups)
    real, fake, _, _ = _run_real_and_fake(op, args)
    assert torch.isfinite(real.float()).all()
    assert _meta(fake) == _meta(real)


def test_fake_kernels_registered_and_composites_left_alone():
    from ppap_fast.ops import _fake_kernels

    for name in ("guided_update", "guided_eps") + SEGMENT_OPS:
        if hasattr(torch.ops.ppap_fast, name):
            assert name in _fake_kernels.register(), name  # register() again: no second registration
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ppap_fast::{name}", "Meta"), name
    for name in COMPOSITE_OPS:
        if hasattr(torch.ops.ppap_fast, name):
            assert name not in _fake_kernels.register()
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ppap_fast::{name}", "CompositeImplicitAutograd")


@pytest.mark.parametrize("name", ("guided_update", "guided_eps") + SEGMENT_OPS)
def test_opcheck(name):
    if name == "guided_update":
        args = _update_args(torch.float32, 2)
    elif name == "guided_eps":
        args = _eps_args(torch.float32)
    else:
        args = _segment_args(name, torch.float32)
        if name != "lora_sgmv_expand":
            args[2].zero_()  # opcheck runs the op more than once: no NaN in what it compares
    torch.library.opcheck(_op(name), tuple(args))


# Not test_aot_dispatch_dynamic: the C++ autograd Functions read integer sizes, which symbolic
# shapes do not have (dynamic-shape compile of the cpp LoRA backend is unsupported).
COMPOSITE_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


@pytest.mark.parametrize("name", COMPOSITE_OPS)
def test_opcheck_composite_lora_ops(name):
    if name == "lora_linear_cpp":
        args = _lora_linear_args(torch.float32, True)
    else:
        args = _lora_conv_args(torch.float32, False)
    args[-1] = False  # no poison: opcheck compares outputs and gradients of repeated runs
    for i in (0, 3, 4, 5):  # x, A, B, expert_bias
        args[i] = args[i].requires_grad_()
    torch.library.opcheck(_op(name), tuple(args), test_utils=COMPOSITE_OPCHECK_UTILS)


# ----------------------------------------------------------------------------- torch.compile
def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)


def _assert_same(got, want):
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_compile_guided_update_cpp():
    x, eps, v, grad, noise, idx, _, _, _ = _update_args(torch.float32, 2)
    table = gu.build_table(Schedule.create("linear", 1000, "10"), "ddpm", var_type="learned_range")

    def step(x, eps, v, grad, noise, idx):
        return gu.guided_update(x, eps, idx, table, v=v, grad=grad, noise=noise, backend="cpp")

    want = step(x, eps, v, grad, noise, idx)
    got = _compile(step)(x, eps, v, grad, noise, idx)
    assert gu._registry.last_backend("guided_update") == "cpp"
    for g, w in zip(got, want):
        _assert_same(g, w)


def test_compile_lora_linear_cpp_forward_backward():
    x, W, bias, A, B, eb, idx, _, _, _, _ = _lora_linear_args(torch.float32, True)
    params = [t.clone().requires_grad_() for t in (x, A, B, eb)]

    def loss(x, A, B, eb, idx):
        y = L.lora_linear(x, W, bias, A, B, idx, 0.5, expert_bias=eb, backend="cpp")
        return y, (y * y).sum()

    def run(fn):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        y, total = fn(*leaves, idx)
        total.backward()
        return [y.detach()] + [p.grad for p in leaves]

    want = run(loss)
    got = run(_compile(loss))
    assert L.last_backend["lora_linear"] == "cpp"
    for g, w in zip(got, want):
        _assert_same(g, w)


def test_compile_lora_conv2d_cpp():
    x, W, bias, A, B, eb, idx, _, _, _, _, _, _, _, _ = _lora_conv_args(torch.float32, True)

    def conv(x, A, B, eb, idx):
        return L.lora_conv2d(x, W, bias, A, B, idx, 0.5, padding=1, expert_bias=eb, backend="cpp")

    with torch.no_grad():
        want = conv(x, A, B, eb, idx)
        got = _compile(conv)(x, A, B, eb, idx)
    assert L.last_backend["lora_conv2d"] == "cpp"
    assert got.stride() == want.stride()
    _assert_same(got, want)
