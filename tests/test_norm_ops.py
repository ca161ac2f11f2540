"""Per-expert norm ops (ppap_fast.ops.norm: batch / layer / group norm): reference semantics vs
torch, Triton vs float64 reference.

CPU: Triton runs under TRITON_INTERPRET=1 (conftest) with small shapes, asked for explicitly.
CUDA (marked ``cuda``, run by benchmarks/gpu_check.sh): automatic dispatch, fp32 and fp16,
no host sync. Buffers the kernels write start as NaN; NaN never passes (rel_err -> inf).
"""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppap_fast import ops
from ppap_fast.experts import ExpertBank, Placement
from ppap_fast.ops import norm as NO
from ppap_fast.schedule import Schedule
from ppap_fast.ops.lora.segments import build_segments
from ppap_fast.ops.norm import reference as R
from ppap_fast.ops.norm import triton_kernels as TK

from _util import (LaunchRecorder, assert_grid_within_cuda_limits, assert_no_host_sync, poisoned_kernels, rel_err,
                   requires_cuda)

TOL = {torch.float32: 1e-5, torch.float16: 4e-3}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _poison():
    with poisoned_kernels(TK):
        yield


def _idx(S, N, mix, g):
    if mix == "one":
        return torch.full((S,), int(torch.randint(0, N, (1,), generator=g)), dtype=torch.long)
    if mix == "empty":  # only even experts have samples (N=1: the single expert)
        return torch.randint(0, (N + 1) // 2, (S,), generator=g) * 2 % max(N, 1)
    return torch.randint(0, N, (S,), generator=g)


def _check(name, got, want, tol):
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (NaN/inf fails)"


# ----------------------------------------------------------------------------- reference semantics
@pytest.mark.parametrize("shape", [(9, 5), (8, 5, 7), (7, 5, 3, 4)])
def test_reference_batch_norm_is_per_expert_nn_batchnorm(shape):
    """Each expert's samples: exactly nn.BatchNorm with that expert's parameters and stats."""
    D = torch.float64
    N, C = 4, shape[1]
    x = torch.randn(shape, dtype=D) * 2 + 1
    idx = torch.tensor([0, 2, 0, 2, 2, 0, 1, 2, 0][: shape[0]])  # expert 3 empty, expert 1 one sample
    w, b = torch.randn(N, C, dtype=D), torch.randn(N, C, dtype=D)
    rm, rv = torch.randn(N, C, dtype=D), torch.rand(N, C, dtype=D) + 0.5
    for training in (True, False):
        rm_, rv_ = rm.clone(), rv.clone()
        y = R.expert_batch_norm(x, idx, w, b, rm_, rv_, training, 0.1, 1e-5)
        for e in range(N):
            sel = idx == e
            if not sel.any():
                assert torch.equal(rm_[e], rm[e]) and torch.equal(rv_[e], rv[e])
                continue
            kind = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
            bn = kind(C, momentum=0.1, eps=1e-5).to(D).train(training)
            with torch.no_grad():
                bn.weight.copy_(w[e]), bn.bias.copy_(b[e])
                bn.running_mean.copy_(rm[e]), bn.running_var.copy_(rv[e])
            if training and x[sel].numel() // C == 1:
                assert torch.equal(rm_[e], rm[e]) and torch.equal(rv_[e], rv[e])  # nn.BatchNorm raises: stats kept
                continue
            want = bn(x[sel])
            assert torch.allclose(y[sel], want, atol=1e-12), (e, training)
            assert torch.allclose(rm_[e], bn.running_mean, atol=1e-12)
            assert torch.allclose(rv_[e], bn.running_var, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("spatial", [(), (1, 1), (1,)])
def test_batch_norm_updates_running_stats_only_of_experts_with_more_than_one_value(backend, spatial):
    """An expert with one value per channel has no variance to estimate (nn.BatchNorm raises): the op leaves its
    running statistics exactly as they were (they were pulled towards a variance of 0); an expert with no samples
    too; the others update as nn.BatchNorm's."""
    N, C = 3, 5
    x = torch.randn(4, C, *spatial) * 2 + 1
    idx = torch.tensor([1, 0, 1, 1])  # expert 0: one value per channel, expert 2: none
    w, b = torch.randn(N, C) * 0.5 + 1, torch.randn(N, C)
    rm, rv = torch.randn(N, C), torch.rand(N, C) + 0.5
    rm_, rv_ = rm.clone(), rv.clone()
    y = NO.expert_batch_norm(x, idx, w, b, rm_, rv_, True, 0.1, 1e-5, backend=backend)
    assert ops.last_backend("expert_batch_norm") == backend
    assert torch.isfinite(y).all()
    for e in (0, 2):
        assert torch.equal(rm_[e], rm[e]) and torch.equal(rv_[e], rv[e]), e
    bn = (nn.BatchNorm1d if len(spatial) < 2 else nn.BatchNorm2d)(C, momentum=0.1, eps=1e-5).train()
    with torch.no_grad():
        bn.weight.copy_(w[1]), bn.bias.copy_(b[1]), bn.running_mean.copy_(rm[1]), bn.running_var.copy_(rv[1])
    want = bn(x[idx == 1])
    _check("y", y[idx == 1], want, 1e-5)
    _check("running_mean", rm_[1], bn.running_mean, 1e-6)
    _check("running_var", rv_[1], bn.running_var, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_batch_norm_half_statistics_in_fp32(dtype):
    """Half-precision x (the CPU default backend): per-expert counts and sums are not kept in
    x's dtype (bf16 counts stop at 256, fp16 ones at 2048 / overflow), as nn.BatchNorm does."""
    S, C, N = 3000, 3, 2
    x = (torch.randn(S, C) * 2 + 3).to(dtype)
    idx = torch.zeros(S, dtype=torch.long)  # every sample on expert 0, expert 1 empty
    w, b = torch.ones(N, C, dtype=dtype), torch.zeros(N, C, dtype=dtype)
    rm, rv = torch.zeros(N, C, dtype=dtype), torch.ones(N, C, dtype=dtype)
    y = NO.expert_batch_norm(x, idx, w, b, rm, rv, True, 0.5, 1e-5)
    assert y.dtype == dtype
    bn = nn.BatchNorm1d(C, momentum=0.5)
    want = bn(x.float())
    assert (y.float() - want).abs().max() < 0.05
    assert torch.allclose(rm[0].float(), bn.running_mean, rtol=1e-2, atol=1e-2)
    assert torch.allclose(rv[0].float(), bn.running_var, rtol=1e-2, atol=1e-2)
    assert torch.equal(rm[1], torch.zeros(C, dtype=dtype)) and torch.equal(rv[1], torch.ones(C, dtype=dtype))


def test_reference_layer_norm_is_per_expert_layer_norm():
    D = torch.float64
    x = torch.randn(6, 3, 10, dtype=D)
    idx = torch.tensor([1, 0, 1, 1, 2, 0])
    w, b = torch.randn(3, 10, dtype=D), torch.randn(3, 10, dtype=D)
    y = R.expert_layer_norm(x, idx, w, b, 1e-6)
    for s in range(6):
        e = int(idx[s])
        assert torch.allclose(y[s], F.layer_norm(x[s], (10,), w[e], b[e], 1e-6), atol=1e-12)


# ----------------------------------------------------------------------------- Triton vs float64 reference
def _bn_case(seed):
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    N = rnd.choice([1, 2, 3, 5, 10])
    S = rnd.randint(1, 12)
    C = rnd.choice([3, 16, 20, 37])
    spatial = rnd.choice([(), (5,), (3, 4), (1, 1), (6, 7)])
    mix = ["random", "one", "empty"][seed % 3]
    return N, (S, C) + spatial, _idx(S, N, mix, g), g


def run_bn(seed, training, device="cpu", dtype=torch.float32, backend="triton", shared_weight=False):
    N, shape, idx, g = _bn_case(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype)
    w = torch.randn(N, C, generator=g) * 0.5 + 1
    b = torch.randn(N, C, generator=g)
    rm = torch.randn(N, C, generator=g)
    rv = torch.rand(N, C, generator=g) + 0.5
    dy = torch.randn(shape, generator=g).to(dtype)

    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    rm_r, rv_r = rm.double(), rv.double()
    w_in = wd[:1].expand(N, C) if shared_weight else wd
    y_r = R.expert_batch_norm(xd, idx, w_in, bd, rm_r, rv_r, training, 0.1, 1e-5)
    grads_r = torch.autograd.grad(y_r, (xd, bd) if shared_weight else (xd, wd, bd), dy.double())

    dev = dict(device=device)
    xg = x.to(**dev).requires_grad_()
    wg = w.to(**dev, dtype=dtype).requires_grad_(not shared_weight)
    bg = b.to(**dev, dtype=dtype).requires_grad_()
    rm_g, rv_g = rm.to(**dev, dtype=dtype), rv.to(**dev, dtype=dtype)
    w_in = wg[:1].expand(N, C) if shared_weight else wg
    y = NO.expert_batch_norm(xg, idx.to(device), w_in, bg, rm_g, rv_g, training, 0.1, 1e-5, backend=backend)
    assert ops.last_backend("expert_batch_norm") == (backend or "triton")
    grads = torch.autograd.grad(y, (xg, bg) if shared_weight else (xg, wg, bg), dy.to(device))
    tol = TOL[dtype]
    what = f"seed {seed} N={N} shape={shape} idx={idx.tolist()} training={training}"
    _check(f"y ({what})", y, y_r, tol)
    for name, a, r in zip(("dx", "db") if shared_weight else ("dx", "dw", "db"), grads, grads_r):
        _check(f"{name} ({what})", a, r, tol)
    _check(f"running_mean ({what})", rm_g, rm_r, tol)
    _check(f"running_var ({what})", rv_g, rv_r, tol)
    empty = torch.bincount(idx, minlength=N) == 0
    if empty.any():  # experts without samples: untouched stats, zero parameter gradients
        assert torch.equal(rm_g.cpu()[empty], rm.to(dtype)[empty])
        assert torch.equal(rv_g.cpu()[empty], rv.to(dtype)[empty])
        assert not grads[-1].cpu()[empty].any()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("seed", range(9))
def test_batch_norm_triton_vs_reference(seed, training):
    run_bn(seed, training)


def test_batch_norm_triton_shared_weight():
    run_bn(4, True, shared_weight=True)  # weight shared by experts (an expanded frozen view)


def _ln_case(seed):
    g = torch.Generator().manual_seed(100 + seed)
    rnd = random.Random(seed)
    N = rnd.choice([1, 2, 4, 7, 10])
    S = rnd.randint(1, 9)
    mid = rnd.choice([(), (3,), (2, 5)])
    D = rnd.choice([8, 16, 40, 100])  # 100 > the interpreter's 64-wide tile: the D loop
    mix = ["random", "one", "empty"][seed % 3]
    return N, (S,) + mid + (D,), _idx(S, N, mix, g), g


def _affine_parity(op, ref, fast, N, F, shape, g, device, dtype, backend, what):
    """Random x, per-expert affine w, b [N, F] and dy from g; y and dx, dw, db of
    fast(x, w, b) (on device, dtype) against ref(x, w, b) in float64."""
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    w = torch.randn(N, F, generator=g) * 0.5 + 1
    b = torch.randn(N, F, generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    y_r = ref(xd, wd, bd)
    grads_r = torch.autograd.grad(y_r, (xd, wd, bd), dy.double())
    xg = x.to(device).requires_grad_()
    wg, bg = (t.to(device, dtype).requires_grad_() for t in (w, b))
    y = fast(xg, wg, bg)
    assert ops.last_backend(op) == (backend or "triton")
    grads = torch.autograd.grad(y, (xg, wg, bg), dy.to(device))
    _check(f"y ({what})", y, y_r, TOL[dtype])
    for name, a, r in zip(("dx", "dw", "db"), grads, grads_r):
        _check(f"{name} ({what})", a, r, TOL[dtype])


def run_ln(seed, device="cpu", dtype=torch.float32, backend="triton"):
    N, shape, idx, g = _ln_case(seed)
    _affine_parity("expert_layer_norm", lambda x, w, b: R.expert_layer_norm(x, idx, w, b, 1e-5),
                   lambda x, w, b: NO.expert_layer_norm(x, idx.to(device), w, b, 1e-5, backend=backend),
                   N, shape[-1], shape, g, device, dtype, backend,
                   f"seed {seed} N={N} shape={shape} idx={idx.tolist()}")


@pytest.mark.parametrize("seed", range(8))
def test_layer_norm_triton_vs_reference(seed):
    run_ln(seed)


def test_reference_group_norm_is_per_expert_group_norm():
    D = torch.float64
    x = torch.randn(5, 6, 3, 2, dtype=D)
    idx = torch.tensor([2, 0, 2, 1, 0])
    w, b = torch.randn(3, 6, dtype=D), torch.randn(3, 6, dtype=D)
    y = R.expert_group_norm(x, idx, 3, w, b, 1e-6)
    for s in range(5):
        e = int(idx[s])
        assert torch.allclose(y[s:s + 1], F.group_norm(x[s:s + 1], 3, w[e], b[e], 1e-6), atol=1e-12)


def _gn_case(seed):
    g = torch.Generator().manual_seed(200 + seed)
    rnd = random.Random(seed)
    N = rnd.choice([1, 3, 6, 10])
    S = rnd.randint(1, 9)
    G, Cg = rnd.choice([(1, 5), (4, 4), (8, 2), (3, 2)])
    # Cg*P from 6 to 144 (> one 64-wide tile). Groups of 1 or 2 values are ill-conditioned
    # (dx is a cancellation to ~0), so no relative-error test is meaningful there.
    spatial = rnd.choice([(3,), (7,), (3, 5), (8, 9)])
    mix = ["random", "one", "empty"][seed % 3]
    return N, G, (S, G * Cg) + spatial, _idx(S, N, mix, g), g


def run_gn(seed, device="cpu", dtype=torch.float32, backend="triton"):
    N, G, shape, idx, g = _gn_case(seed)
    _affine_parity("expert_group_norm", lambda x, w, b: R.expert_group_norm(x, idx, G, w, b, 1e-5),
                   lambda x, w, b: NO.expert_group_norm(x, idx.to(device), G, w, b, 1e-5, backend=backend),
                   N, shape[1], shape, g, device, dtype, backend,
                   f"seed {seed} N={N} G={G} shape={shape} idx={idx.tolist()}")


@pytest.mark.parametrize("seed", range(8))
def test_group_norm_triton_vs_reference(seed):
    run_gn(seed)


@pytest.mark.parametrize("split", [2, 5])
def test_reductions_split_rows(monkeypatch, split):
    """Per-expert reductions with each expert's rows split over several programs (as on a GPU);
    splits with no rows must still write their (zero) partials."""
    monkeypatch.setattr(TK, "SPLIT", split)
    for seed in (0, 2, 4):
        run_bn(seed, True)
        run_ln(seed)
        run_gn(seed)
    run_bn(1, False)


# ----------------------------------------------------------------------------- dispatch, errors, the bank
def test_cpu_dispatch_and_dtypes():
    x, idx = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    w, b, rm, rv = torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    NO.expert_batch_norm(x, idx, w, b, rm, rv, True)
    assert ops.last_backend("expert_batch_norm") == "reference"  # CPU: Triton only when asked for
    NO.expert_layer_norm(x, idx, w, b)
    assert ops.last_backend("expert_layer_norm") == "reference"
    NO.expert_group_norm(x, idx, 3, w, b)
    assert ops.last_backend("expert_group_norm") == "reference"
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        NO.expert_layer_norm(x.double(), idx, w.double(), b.double(), backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        NO.expert_layer_norm(x, idx, w, b, backend="cuda")
    ops.set_backend("triton")  # forced for every op: float64 still refuses it
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        NO.expert_layer_norm(x.double(), idx, w.double(), b.double())
    report = ops.backend_report("cpu")["ops"]
    assert set(report["expert_batch_norm"]["available"]) == {"triton", "reference"}


def test_global_backend_only_concerns_ops_that_have_it():
    """set_backend("cpp") (guided_update's CPU kernel) must not break a bank's norms, which have no cpp path;
    an explicit backend= stays strict."""
    x, idx = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 1, 0])
    w, b, rm, rv = torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    try:
        ops.set_backend("cpp")
        NO.expert_batch_norm(x, idx, w, b, rm, rv, True)
        assert ops.last_backend("expert_batch_norm") == "reference"
        with pytest.raises(ops.BackendUnavailableError, match="no 'cpp' implementation"):
            NO.expert_batch_norm(x, idx, w, b, rm, rv, True, backend="cpp")
        sched = Schedule.create("linear", 1000, "ddim5")
        ops.guided_update(x, x, torch.tensor([1, 2, 3, 4]), ops.build_table(sched, "ddim"))
        assert ops.last_backend("guided_update") == "cpp"  # the op that has it still gets it
    finally:
        ops.set_backend(None)


def test_misspelt_ppap_fast_backend_is_refused_by_every_op():
    """PPAP_FAST_BACKEND=<a name no op has> matched no backend and was ignored silently (every op chose
    automatically); now each op raises, naming the variable. 'auto' still means the automatic choice."""
    import os
    import subprocess
    import sys

    script = """
import torch
from ppap_fast import ops
from ppap_fast.ops import lora, norm
from ppap_fast.schedule import Schedule
x, idx = torch.randn(2, 3, 4), torch.tensor([0, 1])
calls = {
    "norm": lambda: norm.expert_layer_norm(x, idx, torch.ones(2, 4), torch.zeros(2, 4)),
    "lora": lambda: lora.lora_linear(x, torch.randn(5, 4), None, torch.randn(2, 2, 4), torch.randn(2, 5, 2), idx, 1.0),
    "update": lambda: ops.guided_update(x, x, idx, ops.build_table(Schedule.create("linear", 1000, "ddim5"), "ddim")),
}
for name, call in calls.items():
    try:
        call()
        print(name, "ran")
    except ValueError as exc:
        print(name, "refused:", exc)
"""
    outs = {}
    for value in ("trtion", "auto"):
        env = dict(os.environ, PPAP_FAST_BACKEND=value)
        res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[value] = res.stdout.splitlines()
    msg = "refused: PPAP_FAST_BACKEND='trtion' is no backend; expected one of ('cuda', 'cpp', 'triton', 'reference') or 'auto'"
    assert outs["trtion"] == [f"{name} {msg}" for name in ("norm", "lora", "update")]
    assert outs["auto"] == ["norm ran", "lora ran", "update ran"]


def test_triton_layer_and_group_norm_run_in_fp32_under_autocast():
    """As torch.autocast does for layer_norm / group_norm on CUDA: float32 in, float32 out."""
    x, idx = torch.randn(4, 6, 5).bfloat16(), torch.tensor([0, 1, 1, 0])
    w, b = torch.randn(2, 5), torch.randn(2, 5)
    wg, bg = torch.randn(2, 6), torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ln = NO.expert_layer_norm(x, idx, w, b, backend="triton")
        y_gn = NO.expert_group_norm(x, idx, 3, wg, bg, backend="triton")
    assert y_ln.dtype == y_gn.dtype == torch.float32
    assert torch.equal(y_ln, NO.expert_layer_norm(x.float(), idx, w, b, backend="triton"))
    assert torch.equal(y_gn, NO.expert_group_norm(x.float(), idx, 3, wg, bg, backend="triton"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference follows torch.autocast too
        assert NO.expert_layer_norm(x, idx, w, b, backend="reference").dtype == torch.float32
        assert NO.expert_group_norm(x, idx, 3, wg, bg, backend="reference").dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["batch_train", "batch_eval", "layer", "group"])
def test_mixed_precision_dtypes_agree_across_backends(kind, dtype):
    """Half x, float32 parameters (a mixed-precision bank): every CPU backend returns x's dtype (as
    Triton and CUDA's nn.BatchNorm2d do), dx in x's dtype, dw / db in the parameters' (no cpp backend)."""
    x0 = (torch.randn(6, 8, 3, 4) * 2 + 1).to(dtype)
    idx = torch.tensor([0, 2, 2, 1, 0, 2])
    w0, b0 = torch.randn(3, 8) * 0.5 + 1, torch.randn(3, 8)
    got = {}
    for backend in ("reference", "triton"):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        if kind.startswith("batch"):
            y = NO.expert_batch_norm(x, idx, w, b, torch.zeros(3, 8), torch.ones(3, 8), kind == "batch_train",
                                     backend=backend)
        elif kind == "layer":
            y = NO.expert_layer_norm(x.transpose(1, 3), idx, w, b, backend=backend)
        else:
            y = NO.expert_group_norm(x, idx, 4, w, b, backend=backend)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn_like(y))
        assert (y.dtype, dx.dtype, dw.dtype, db.dtype) == (dtype, dtype, torch.float32, torch.float32), backend
        got[backend] = y
    _check("triton vs reference", got["triton"], got["reference"], 2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_bad_inputs():
    x, idx = torch.randn(4, 3, 2), torch.tensor([0, 1, 1, 0])
    w, b, rm, rv = torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="momentum=None"):
        NO.expert_batch_norm(x, idx, w, b, rm, rv, True, momentum=None)
    with pytest.raises(ValueError, match=r"running_var must be \[N, 3\]"):
        NO.expert_batch_norm(x, idx, w, b, rm, torch.ones(2, 4), True)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\)"):
        NO.expert_batch_norm(x, torch.tensor([0, 1, 2, 0]), w, b, rm, rv, True)
    with pytest.raises(ValueError, match=r"expert_idx must be \[S\]=4"):
        NO.expert_layer_norm(x, idx[:3], torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"bias must be \[N, 2\]"):
        NO.expert_layer_norm(x, idx, torch.ones(2, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="num_groups=2 must be a positive int dividing C=3"):
        NO.expert_group_norm(x, idx, 2, w, b)
    with pytest.raises(ValueError, match="segments were built for N=3"):
        seg = build_segments(idx, 3)
        NO.expert_layer_norm(x, idx, torch.ones(2, 2), torch.zeros(2, 2), backend="triton", segments=seg)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_stale_segments_are_refused(backend):
    """segments built for another expert_idx of the same length, or for this one before an in-place
    change, are refused (the Triton path routed by them: silently wrong); rebuilt, they run."""
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3, 6)
    idx = torch.tensor([0, 1, 1, 2])
    seg = build_segments(idx, 3)
    run = lambda i, s: NO.expert_layer_norm(x, i, w, b, backend=backend, segments=s)  # noqa: E731
    with pytest.raises(ValueError, match="stale"):
        run(torch.tensor([2, 2, 0, 1]), seg)  # another routing
    with pytest.raises(ValueError, match="stale"):
        NO.expert_batch_norm(x, torch.tensor([2, 2, 0, 1]), w, b, torch.zeros(3, 6), torch.ones(3, 6), True,
                             backend=backend, segments=seg)
    idx.copy_(torch.tensor([2, 0, 0, 1]))  # changed in place since build_segments
    with pytest.raises(ValueError, match="stale"):
        run(idx, seg)
    build_segments(idx, 3, out=seg)
    want = R.expert_layer_norm(x, idx, w, b)
    _check("rebuilt segments", run(idx, seg), want, 1e-6)
    _check("equal values, another tensor", run(idx.clone(), seg), want, 1e-6)
    _check("int32 index", run(idx.int(), build_segments(idx.int(), 3)), want, 1e-6)


@pytest.mark.parametrize("op", ["layer", "group", "batch_train", "batch_eval"])
@pytest.mark.parametrize("change", ["rebuilt", "idx_in_place"])
def test_segments_changed_between_forward_and_backward_are_refused(op, change):
    """The Triton Functions kept the segments as a plain ctx attribute: rebuilt in place
    (build_segments(out=), e.g. for the next micro-batch) or expert_idx changed in place after the
    forward, the backward silently routed the gradients by the new values (the reference raises
    autograd's in-place error there). Now autograd checks them as saved tensors: the same error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 3, generator=g, requires_grad=True)
    w, b = torch.randn(3, 4, generator=g, requires_grad=True), torch.randn(3, 4, generator=g)
    idx = torch.tensor([0, 1, 2, 0])
    seg = build_segments(idx, 3)
    call = {"layer": lambda: NO.expert_layer_norm(x, idx, w[:, :3], b[:, :3], backend="triton", segments=seg),
            "group": lambda: NO.expert_group_norm(x, idx, 2, w, b, backend="triton", segments=seg),
            "batch_train": lambda: NO.expert_batch_norm(x, idx, w, b, torch.zeros(3, 4), torch.ones(3, 4), True,
                                                        backend="triton", segments=seg),
            "batch_eval": lambda: NO.expert_batch_norm(x, idx, w, b, torch.zeros(3, 4), torch.ones(3, 4), False,
                                                       backend="triton", segments=seg)}[op]
    dx, dw = torch.autograd.grad(call().square().sum(), (x, w))  # unchanged: runs
    assert torch.isfinite(dx).all() and torch.isfinite(dw).all()
    y = call()
    if change == "rebuilt":
        build_segments(torch.tensor([2, 2, 1, 1]), 3, out=seg)
    else:
        idx.copy_(torch.tensor([2, 2, 1, 1]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.square().sum(), (x, w))


class _NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.gn = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.gn(self.bn(self.conv(x))).mean((2, 3))
        return self.head(self.ln(self.fc(h)))


def test_bank_uses_dispatched_norms():
    """A training step of a bank (BN + GN + LN routed) through Triton and through the reference, fp32,
    against the same step in float64: outputs, all per-expert gradients, running statistics."""
    torch.manual_seed(0)
    base = ExpertBank(_NormNet(), Placement(lora=("conv",), norm=("bn", "gn", "ln"), r=2, alpha=2), n_experts=5)
    with torch.no_grad():
        for t in base.parameters_to_train():
            t.normal_(0, 0.3).add_(1.0)
    x, t = torch.randn(7, 2, 4, 4), torch.tensor([0, 950, 10, 420, 430, 999, 5])  # experts 1, 3 empty
    results = {}
    for backend, dtype in (("reference", torch.float64), ("reference", torch.float32), ("triton", torch.float32)):
        bank = copy.deepcopy(base).to(dtype).train()
        ops.set_backend(backend)
        y = bank(x.to(dtype), t)
        assert ops.last_backend("expert_batch_norm") == backend
        assert ops.last_backend("expert_layer_norm") == backend
        assert ops.last_backend("expert_group_norm") == backend
        grads = torch.autograd.grad(y.square().sum(), bank.parameters_to_train())
        results[backend, dtype] = (y, grads, {k: v.clone() for k, v in bank.model.bn.state_dict().items()})
    ops.set_backend(None)
    y0, g0, s0 = results["reference", torch.float64]
    for key in (("reference", torch.float32), ("triton", torch.float32)):
        y1, g1, s1 = results[key]
        _check(f"{key} bank output", y1, y0, 2e-5)
        for a, r in zip(g1, g0):
            _check(f"{key} bank grad", a, r, 5e-5)
        for k in ("running_mean", "running_var"):
            _check(f"{key} {k}", s1[k], s0[k], 2e-5)
        assert s1["num_batches_tracked"].tolist() == [1, 0, 1, 0, 1]


# ----------------------------------------------------------------------------- CUDA (next GPU session)
@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("training", [True, False])
def test_cuda_batch_norm_parity(seed, dtype, training):
    run_bn(seed, training, device="cuda", dtype=dtype, backend=None)  # automatic choice: triton


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("run", [run_ln, run_gn], ids=["layer_norm", "group_norm"])
def test_cuda_row_norm_parity(run, seed, dtype):
    run(seed, device="cuda", dtype=dtype, backend=None)


@pytest.mark.cuda
@requires_cuda
def test_cuda_no_host_sync():
    dev = "cuda"
    N, C = 5, 32
    x = torch.randn(16, C, 8, 8, device=dev, requires_grad=True)
    idx = torch.randint(0, N, (16,), device=dev)
    w = torch.randn(N, C, device=dev, requires_grad=True)
    b = torch.randn(N, C, device=dev, requires_grad=True)
    rm, rv = torch.zeros(N, C, device=dev), torch.ones(N, C, device=dev)
    seg = build_segments(idx, N)
    xl = torch.randn(16, 10, C, device=dev, requires_grad=True)

    def bn_step():
        y = NO.expert_batch_norm(x, idx, w, b, rm, rv, True, segments=seg)
        y.backward(torch.ones_like(y))

    def ln_step():
        y = NO.expert_layer_norm(xl, idx, w, b, segments=seg)
        y.backward(torch.ones_like(y))

    def gn_step():
        y = NO.expert_group_norm(x, idx, 4, w, b, segments=seg)
        y.backward(torch.ones_like(y))

    assert_no_host_sync([bn_step, ln_step, gn_step, lambda: build_segments(idx, N)])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("training", [True, False])
def test_cuda_graph_capture(training):
    """Forward (with the running-stat update) captured once, replayed on new inputs."""
    dev, N, C = "cuda", 4, 24
    x = torch.randn(10, C, 5, 5, device=dev)
    idx = torch.tensor([0, 2, 2, 0, 3, 3, 3, 0, 2, 0], device=dev)  # expert 1 empty
    w, b = torch.randn(N, C, device=dev), torch.randn(N, C, device=dev)
    rm, rv = torch.zeros(N, C, device=dev), torch.ones(N, C, device=dev)
    seg = build_segments(idx, N)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        NO.expert_batch_norm(x, idx, w, b, rm.clone(), rv.clone(), training, segments=seg)  # compile
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = NO.expert_batch_norm(x, idx, w, b, rm, rv, training, segments=seg)
    rm.zero_(), rv.fill_(1.0)
    x.copy_(torch.randn_like(x) * 2 + 1)
    graph.replay()
    rm_r, rv_r = torch.zeros(N, C, dtype=torch.float64), torch.ones(N, C, dtype=torch.float64)
    want = R.expert_batch_norm(x.double().cpu(), idx.cpu(), w.double().cpu(), b.double().cpu(), rm_r, rv_r,
                               training, 0.1, 1e-5)
    _check("replayed y", y, want, TOL[torch.float32])
    _check("replayed running_var", rv, rv_r, TOL[torch.float32])
    _check("replayed running_mean", rm, rm_r, TOL[torch.float32])


def test_empty_batch():
    x = torch.randn(0, 5, 3, requires_grad=True)
    idx = torch.zeros(0, dtype=torch.long)
    w, b = torch.randn(2, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    rm, rv = torch.randn(2, 5), torch.rand(2, 5) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = NO.expert_batch_norm(x, idx, w, b, rm, rv, True, backend="triton")
    dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=False)
    assert y.shape == x.shape and dx.shape == x.shape
    assert not dw.any() and not db.any()  # poisoned buffers were fully written
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y = NO.expert_layer_norm(torch.randn(0, 3, 5), idx, w, b, backend="triton")
    assert y.shape == (0, 3, 5)
    xg = torch.randn(0, 5, 2, 2, requires_grad=True)
    y = NO.expert_group_norm(xg, idx, 5, w, b, backend="triton")
    dw, = torch.autograd.grad(y.sum(), (w,))
    assert y.shape == xg.shape and not dw.any()


@pytest.mark.parametrize("kind", ["batch", "layer", "group"])
def test_triton_output_takes_inplace_ops(kind):
    """ResNets apply ReLU(inplace=True) to BatchNorm's output: the Function's output must not be a view
    (autograd forbids modifying a custom Function's view output in place), and gradients stay exact."""
    g = torch.Generator().manual_seed(3)
    N, shape = 3, ((6, 4, 3, 5) if kind != "layer" else (6, 7, 8))
    idx = torch.randint(0, N, (shape[0],), generator=g)
    C = shape[-1] if kind == "layer" else shape[1]
    w, b = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    rm, rv = torch.zeros(N, C, dtype=torch.float64), torch.ones(N, C, dtype=torch.float64)

    def run(backend, dtype):
        xi, wi, bi = (t.to(dtype).requires_grad_(True) for t in (x, w, b))
        if kind == "batch":
            y = NO.expert_batch_norm(xi, idx, wi, bi, rm.to(dtype), rv.to(dtype), True, backend=backend)
        elif kind == "layer":
            y = NO.expert_layer_norm(xi, idx, wi, bi, backend=backend)
        else:
            y = NO.expert_group_norm(xi, idx, 2, wi, bi, backend=backend)
        y = F.relu(y, inplace=True) * 1.5
        return y, torch.autograd.grad(y.square().sum(), (xi, wi, bi))

    y, grads = run("triton", torch.float32)
    y_ref, grads_ref = run("reference", torch.float64)
    _check("y", y, y_ref, TOL[torch.float32])
    for name, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        _check(name, got, want, 1e-4)


def test_old_lora_names_of_the_norms_still_work_with_a_deprecation_warning():
    from ppap_fast.ops import lora as L

    for name in ("expert_batch_norm", "expert_layer_norm", "expert_group_norm"):
        with pytest.warns(DeprecationWarning, match=f"moved to ppap_fast.ops.norm.{name}"):
            assert getattr(L, name) is getattr(NO, name)
    with pytest.raises(AttributeError):
        L.no_such_op


@pytest.mark.parametrize("training", [False, True])
def test_batch_norm_strided_running_stats(training):
    """Running statistics that are strided views ([C, N] buffers transposed): eval's mean / rstd went
    to the kernels with those strides (read as contiguous [N, C]: wrong weight gradient)."""
    g = torch.Generator().manual_seed(0)
    S, N, C = 3, 2, 3
    x = torch.randn(S, C, 4, generator=g, dtype=torch.float64)
    idx = torch.tensor([0, 1, 1])
    w, b = torch.randn(N, C, generator=g, dtype=torch.float64), torch.randn(N, C, generator=g, dtype=torch.float64)
    rm0 = torch.randn(C, N, generator=g, dtype=torch.float64)
    rv0 = torch.rand(C, N, generator=g, dtype=torch.float64) + 0.5
    dy = torch.randn(S, C, 4, generator=g, dtype=torch.float64)

    def run(backend, dt):
        xs, ws, bs = (t.to(dt).requires_grad_() for t in (x, w, b))
        rm, rv = rm0.to(dt, copy=True).t(), rv0.to(dt, copy=True).t()  # [N, C], strides (1, N)
        y = NO.expert_batch_norm(xs, idx, ws, bs, rm, rv, training, backend=backend)
        return [y, *torch.autograd.grad(y, (xs, ws, bs), dy.to(dt)), rm, rv]

    want = run("reference", torch.float64)
    got = run("triton", torch.float32)
    for name, a, b_ in zip(["y", "dx", "dw", "db", "running_mean", "running_var"], got, want):
        _check(f"{name} training={training}", a, b_, TOL[torch.float32])


@pytest.mark.parametrize("op", ["batch", "layer", "group"])
def test_triton_double_backward_is_refused(op):
    """create_graph=True through the Triton norms (@once_differentiable) gave a dx whose graph led
    nowhere: a penalty on dx silently contributed nothing to the weight's gradient. Now it raises."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, generator=g).requires_grad_()
    idx = torch.tensor([0, 1, 1, 0])
    w = torch.randn(2, 6 if op != "layer" else 5, generator=g).requires_grad_()
    b = torch.randn(w.shape, generator=g)
    run = {"batch": lambda: NO.expert_batch_norm(x, idx, w, b, torch.zeros(2, 6), torch.ones(2, 6), True,
                                                 backend="triton"),
           "layer": lambda: NO.expert_layer_norm(x, idx, w, b, backend="triton"),
           "group": lambda: NO.expert_group_norm(x, idx, 3, w, b, backend="triton")}[op]
    y = run()
    with pytest.raises(RuntimeError, match="double backward"):
        dx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        torch.autograd.grad(y.sum() + dx.square().sum(), w)
    assert torch.autograd.grad(run().sum(), w)[0].shape == w.shape



def test_batch_norm_elementwise_grids_stay_within_cuda_limits_past_65535_position_blocks(monkeypatch):
    """bn_apply / bn_dx put the position blocks on grid axis 2, which CUDA caps at 65535: 4096x4096
    positions a sample with the GPU's 256-position blocks gave 65536. Grids recorded with the GPU's
    blocks, nothing run: one launch each, within the limits, covering every (position block, channel
    block, sample)."""
    monkeypatch.setattr(TK, "_interpreting", lambda: False)
    apply, dx = LaunchRecorder(), LaunchRecorder()
    monkeypatch.setattr(TK, "_bn_apply_kernel", apply)
    monkeypatch.setattr(TK, "_bn_dx_kernel", dx)
    S, C, P = 2, 40, 4096 * 4096  # 2 channel blocks of 32
    x3 = torch.zeros(1, 1, 1).expand(S, C, P)  # strides only: the launches run nothing
    idx, stats = torch.tensor([0, 1]), torch.zeros(2, C)
    with monkeypatch.context() as m:  # the outputs the launchers allocate: views of one element
        m.setattr(TK, "alloc", lambda shape, dtype, device: torch.zeros(1, dtype=dtype).expand(shape))
        TK.bn_apply(x3, idx, stats, stats, torch.float32)
        TK.bn_dx(x3, x3, idx, stats, stats, stats, stats, stats, True, torch.float32)
    for rec, s0_arg in ((apply, 5), (dx, 9)):  # s0: the launch's first sample
        assert len(rec.launches) == 1
        grid, args = rec.launches[0]
        assert_grid_within_cuda_limits(grid)
        assert grid == (P // 256, 2, S) and args[s0_arg] == 0


def test_batch_norm_elementwise_sample_chunks_match_float64(monkeypatch):
    """bn_apply / bn_dx with samples in launches of <= MAX_GRID_YZ (lowered to 2: 5 samples in 3 launches,
    the last partial), 2 channel blocks x 2 position blocks (40 channels, 90 positions under the
    interpreter), against float64; outputs poisoned (autouse fixture)."""
    from ppap_fast.ops import _kernel_util

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 2)
    recorders = [LaunchRecorder(getattr(TK, name)) for name in ("_bn_apply_kernel", "_bn_dx_kernel")]
    for name, rec in zip(("_bn_apply_kernel", "_bn_dx_kernel"), recorders):
        monkeypatch.setattr(TK, name, rec)
    g = torch.Generator().manual_seed(5)
    S, N, C, P = 5, 2, 40, 90
    x, dy = torch.randn(S, C, P, generator=g), torch.randn(S, C, P, generator=g)
    a, b, mean, k1, k2 = (torch.randn(N, C, generator=g) for _ in range(5))
    rstd = torch.rand(N, C, generator=g) + 0.5
    idx = torch.tensor([1, 0, 1, 1, 0])
    y = TK.bn_apply(x, idx, a, b, torch.float32)
    dx_train = TK.bn_dx(dy, x, idx, mean, rstd, a, k1, k2, True, torch.float32)
    dx_eval = TK.bn_dx(dy, x, idx, mean, rstd, a, k1, k2, False, torch.float32)
    assert [[grid[-1] for grid, _ in rec.launches] for rec in recorders] == [[2, 2, 1], [2, 2, 1] * 2]  # dx twice
    e = lambda t: t.double()[idx][:, :, None]  # noqa: E731  (per-sample [S, C, 1])
    xd, dyd = x.double(), dy.double()
    xhat = (xd - e(mean)) * e(rstd)
    _check("bn_apply", y, xd * e(a) + e(b), TOL[torch.float32])
    _check("bn_dx train", dx_train, e(a) * (dyd - e(k1) - xhat * e(k2)), TOL[torch.float32])
    _check("bn_dx eval", dx_eval, e(a) * dyd, TOL[torch.float32])


@pytest.mark.parametrize("kind", ["batch_train", "batch_eval", "group"])
def test_triton_keeps_a_channels_last_input_channels_last(kind):
    """A channels_last activation (a channels_last model) comes out channels_last, as from the reference and
    torch's norms: the next conv would otherwise convert it back. Values and gradients as the reference's."""
    g = torch.Generator().manual_seed(5)
    N, shape = 3, (6, 16, 5, 3)
    idx = torch.randint(0, N, (shape[0],), generator=g)
    w, b = torch.randn(N, 16, generator=g) + 1, torch.randn(N, 16, generator=g)
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)

    def run(backend, dtype):
        xi, wi, bi = (t.to(dtype).requires_grad_(True) for t in (x, w, b))
        if kind == "group":
            y = NO.expert_group_norm(xi, idx, 4, wi, bi, backend=backend)
        else:
            rm, rv = torch.randn(N, 16, generator=torch.Generator().manual_seed(1)), torch.ones(N, 16)
            y = NO.expert_batch_norm(xi, idx, wi, bi, rm.to(dtype), rv.to(dtype), kind == "batch_train",
                                     backend=backend)
        return y, torch.autograd.grad(y, (xi, wi, bi), dy.to(dtype))

    y, grads = run("triton", torch.float32)
    y_ref, grads_ref = run("reference", torch.float64)
    assert y_ref.is_contiguous(memory_format=torch.channels_last)
    assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    assert grads[0].is_contiguous(memory_format=torch.channels_last), grads[0].stride()
    _check("y", y, y_ref, TOL[torch.float32])
    for name, got, want in zip(("dx", "dw", "db"), grads, grads_ref):
        _check(name, got, want, 1e-4)
