"""Guided eps correction (ops.guided_eps): every backend against float64, the eager formula, NaN, bad input."""
import zlib

import pytest
import torch

from ppap_fast import ops
from ppap_fast.ops import eps_correction as ge

from _util import LaunchRecorder, assert_chunked_launches_cover, poison_allocator, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _backends_for(device):
    rep = ops.backend_report(device)["ops"]["guided_eps"]["available"]
    return [b for b, why in rep.items() if why == "ok"]


def _eager(model_output, grad, coef, channels):
    """What PPAPGuidance.correct computed before the op (coef [B, 1, ...]); float64 math for float64."""
    work = torch.float64 if model_output.dtype == torch.float64 else torch.float32
    new = (model_output[:, :channels].to(work) - coef.to(work) * grad.to(work)).to(model_output.dtype)
    return new if model_output.shape[1] == channels else torch.cat([new, model_output[:, channels:]], 1)


def _case(gen, B, C, extra, spatial, dtype, device):
    """model_output and grad as channel slices of wider tensors (batch stride != per-sample size), a
    per-sample coef with a zero, negative and large values."""
    wide = torch.randn(B, 2 * C + extra + 1, *spatial, generator=gen, dtype=torch.float64) * 3
    mo = wide[:, 1:1 + C + extra]
    grad = torch.randn(B, C + 2, *spatial, generator=gen, dtype=torch.float64)[:, :C]
    coef = torch.randn(B, generator=gen, dtype=torch.float64) * 2
    coef[0] = 0.0
    return (mo.to(device=device, dtype=dtype), grad.to(device=device, dtype=dtype),
            coef.float().to(device))


def _check_against_float64(got, mo, grad, coef, C, what):
    """Every channel: head within rounding of the float64 result (from the same rounded inputs), the
    rest bit-equal to model_output; never NaN."""
    assert got.shape == mo.shape and got.dtype == mo.dtype and got.is_contiguous(), what
    c64 = coef.double().cpu().view(-1, *([1] * (mo.ndim - 1)))
    head, g = mo[:, :C].double().cpu(), grad.double().cpu()
    want = head - c64 * g
    # one ulp of the dtype (the interpreter's bf16 conversion truncates) + float32 math under cancellation
    eps_out, eps_math = torch.finfo(mo.dtype).eps, torch.finfo(torch.float64 if mo.dtype == torch.float64
                                                                else torch.float32).eps
    tol = eps_out * want.abs() + 4 * eps_math * (head.abs() + (c64 * g).abs())
    err = (got[:, :C].double().cpu() - want).abs()
    assert bool((err <= tol).all()), f"{what}: max err {float((err - tol).max())} over tol"
    assert torch.equal(got[:, C:].cpu(), mo[:, C:].cpu()), f"{what}: variance channels not copied"


@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_match_float64(dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(str(dtype).encode()))  # same cases every run
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checked = set()
    for device in devices:
        for backend in _backends_for(device):
            for extra_channels in (False, True):
                for spatial in ((5, 7), (9,)):  # 4-D and 3-D
                    B, C = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
                    mo, grad, coef = _case(gen, B, C, C if extra_channels else 0, spatial, dtype, device)
                    for coef_shape in ((B,), (B,) + (1,) * (mo.ndim - 1)):
                        poison_allocator(device)
                        got = ops.guided_eps(mo, grad, coef.view(coef_shape), C, backend=backend)
                        assert ops.last_backend("guided_eps") == backend
                        assert got.data_ptr() != mo.data_ptr()
                        _check_against_float64(got, mo, grad, coef, C,
                                               f"{backend}/{device}/{dtype} B={B} C={C} extra={extra_channels} "
                                               f"spatial={spatial} coef{coef_shape}")
                        checked.add(backend)
    assert {"reference", "triton"} <= checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_grad_in_float32_and_scalar_coef(dtype):
    """grad in float32 under a half / float64 output (the guide's dtype may differ) and one coef for
    the whole batch (shape () or (1,)): as the eager formula."""
    gen = torch.Generator().manual_seed(3)
    mo = torch.randn(3, 4, 2, 5, generator=gen).to(dtype)
    grad = torch.randn(3, 2, 2, 5, generator=gen)
    for coef in (torch.tensor(0.7), torch.tensor([-1.3])):
        want = _eager(mo, grad, coef.view(-1, 1, 1, 1), 2)
        for backend in _backends_for("cpu"):
            got = ops.guided_eps(mo, grad, coef, 2, backend=backend)
            torch.testing.assert_close(got, want, rtol=torch.finfo(dtype).eps, atol=0, msg=backend)


def test_reference_and_cpp_are_the_eager_formula_bit_for_bit():
    """The CPU paths round as eager PyTorch (no FMA): PPAPGuidance.correct's results do not change."""
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        mo = torch.randn(4, 6, 8, 8, generator=gen).to(dtype)
        grad = torch.randn(4, 3, 8, 8, generator=gen).to(dtype)
        coef = torch.rand(4, 1, 1, 1, generator=gen)
        want = _eager(mo, grad, coef, 3)
        for backend in [b for b in _backends_for("cpu") if b in ("reference", "cpp")]:
            assert torch.equal(ops.guided_eps(mo, grad, coef, 3, backend=backend), want), (backend, dtype)


def test_nan_propagates_only_where_the_formula_does():
    nan, inf = float("nan"), float("inf")
    mo = torch.arange(3 * 4 * 2 * 3, dtype=torch.float32).view(3, 4, 2, 3) / 7
    grad = torch.ones(3, 2, 2, 3)
    mo[0, 0, 0, 0] = nan  # a corrected channel: that element only
    mo[0, 3, 1, 2] = nan  # a copied channel: that element only
    grad[1, 1, 0, 1] = nan
    grad[2, 0, 1, 1] = inf  # coef 0 there: 0 * inf is NaN in the formula too
    coef = torch.tensor([0.5, 2.0, 0.0])
    want = _eager(mo, grad, coef.view(-1, 1, 1, 1), 2)
    assert int(want.isnan().sum()) == 4
    for backend in _backends_for("cpu"):
        got = ops.guided_eps(mo, grad, coef, 2, backend=backend)
        assert torch.equal(got.isnan(), want.isnan()), backend
        torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-6, atol=0, msg=backend)
    coef_nan = torch.tensor([nan, 1.0, 1.0])  # a NaN coef: that sample's corrected channels only
    for backend in _backends_for("cpu"):
        got = ops.guided_eps(mo, grad.nan_to_num(posinf=1.0), coef_nan, 2, backend=backend)
        assert got[0, :2].isnan().all() and not got[1:, :2].isnan().any(), backend
        assert torch.equal(got[:, 2:].isnan(), mo[:, 2:].isnan()), backend


def test_triton_output_fully_written(monkeypatch):
    """Triton output allocated NaN-filled: every element is written (odd sizes, several blocks)."""
    from ppap_fast.ops import update_triton

    real_empty = torch.empty
    monkeypatch.setattr(update_triton.torch, "empty",
                        lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    gen = torch.Generator().manual_seed(2)
    mo, grad, coef = _case(gen, 3, 3, 3, (7, 11), torch.float32, "cpu")
    got = update_triton.guided_eps_triton(mo, grad, coef, 3, block=64)
    _check_against_float64(got, mo, grad, coef, 3, "triton, poisoned output")


def test_bad_inputs():
    mo, grad, coef = torch.zeros(2, 6, 3, 3), torch.zeros(2, 3, 3, 3), torch.zeros(2)
    bad = [
        (dict(model_output=torch.zeros(2)), "model_output must be"),
        (dict(model_output=torch.zeros(2, 6, 3, 3, dtype=torch.long)), "model_output must be"),
        (dict(channels=0), r"channels must be an int in \[1, 6\]"),
        (dict(channels=7), r"channels must be an int in \[1, 6\]"),
        (dict(channels=True), "channels must be an int"),
        (dict(grad=torch.zeros(2, 4, 3, 3)), r"grad must have shape \[B, channels, ...\] = \(2, 3, 3, 3\)"),
        (dict(grad=torch.zeros(1, 3, 3, 3)), "grad must have shape"),
        (dict(grad=torch.zeros(2, 3, 3, 3, dtype=torch.float16)), "grad must be on model_output's device"),
        (dict(coef=torch.zeros(3)), "coef must hold one value per sample"),
        (dict(coef=torch.zeros(2, 1, 1)), "coef must hold one value per sample"),
        (dict(coef=torch.zeros(2, 3, 1, 1)), "coef must hold one value per sample"),
        (dict(coef=torch.zeros(2, dtype=torch.long)), "coef must be a floating tensor"),
        (dict(coef=0.5), "coef must be a floating tensor"),
    ]
    if torch.cuda.is_available():
        bad.append((dict(grad=grad.cuda()), "grad must be on model_output's device"))
    for change, msg in bad:
        args = dict(model_output=mo, grad=grad, coef=coef, channels=3) | change
        with pytest.raises(ValueError, match=msg):
            ops.guided_eps(**args)
    if not torch.cuda.is_available():
        with pytest.raises(ops.BackendUnavailableError, match="cuda"):
            ops.guided_eps(mo, grad, coef, 3, backend="cuda")


def test_autograd_uses_the_reference():
    """The kernels are forward-only: under autograd the automatic choice is the reference (gradients
    flow as through the eager formula), and a kernel asked for by name is refused."""
    mo = torch.randn(2, 4, 3, requires_grad=True)
    grad = torch.randn(2, 2, 3)
    coef = torch.tensor([0.5, 2.0])
    ops.guided_eps(mo, grad, coef, 2).sum().backward()
    assert ops.last_backend("guided_eps") == "reference"
    assert torch.equal(mo.grad, torch.ones_like(mo))
    with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
        ops.guided_eps(mo, grad, coef, 2, backend="triton")
    with torch.no_grad():  # no autograd: the kernels run
        got = ops.guided_eps(mo, grad, coef, 2, backend="triton")
    torch.testing.assert_close(got, _eager(mo.detach(), grad, coef.view(-1, 1, 1), 2))


def test_triton_launch_grids_stay_within_cuda_limits_above_65535_samples(monkeypatch):
    from ppap_fast.ops import update_triton

    rec = LaunchRecorder()
    monkeypatch.setattr(update_triton, "_guided_eps_kernel", rec)
    B = 70000
    mo = torch.zeros(B, 2, 1)
    update_triton.guided_eps_triton(mo, mo[:, :1], torch.zeros(B), 1)
    assert_chunked_launches_cover(rec, B)


def test_triton_chunked_launches_match_reference(monkeypatch):
    """The chunked path (grid limit 7: 20 samples in 3 launches, the last partial), per-sample coefs."""
    from ppap_fast.ops import _kernel_util

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 7)
    assert len(_kernel_util.grid_chunks(20)) == 3
    gen = torch.Generator().manual_seed(4)
    mo, grad, coef = _case(gen, 20, 2, 2, (1, 3), torch.float32, "cpu")
    _check_against_float64(ops.guided_eps(mo, grad, coef, 2, backend="triton"), mo, grad, coef, 2, "chunked triton")


@requires_cuda
def test_cuda_backends_above_65535_samples_and_graph_capture():
    """On the GPU: batches past grid axis y's 65535 (looped / chunked) match float64; the op captures in
    a CUDA graph (no host sync) and replays with new inputs."""
    B = 70000
    gen = torch.Generator(device="cuda").manual_seed(0)
    mo = torch.randn(B, 4, 3, device="cuda", generator=gen)
    grad = torch.randn(B, 2, 3, device="cuda", generator=gen)
    coef = torch.randn(B, 1, 1, device="cuda", generator=gen)
    backends = [b for b in _backends_for("cuda") if b in ("cuda", "triton")]
    assert backends
    for backend in backends:
        poison_allocator("cuda")
        _check_against_float64(ops.guided_eps(mo, grad, coef, 2, backend=backend), mo, grad, coef, 2, f"{backend} B={B}")
        small = [t[:5].clone() for t in (mo, grad, coef)]
        ops.guided_eps(*small, 2, backend=backend)  # compile / warm up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.guided_eps(*small, 2, backend=backend)
        for t in small:
            t.normal_(generator=gen)
        graph.replay()
        torch.cuda.synchronize()
        _check_against_float64(out, *small, 2, f"{backend} graph replay")


def test_ppap_guidance_correct_runs_the_op():
    """PPAPGuidance.correct corrects through ops.guided_eps, bit for bit the eager formula it replaced:
    learned variance, a half output with a float32 grad, a grad broadcast over the batch, zero coef
    below MIN_GUIDED_ABAR (t = 999 of a zero-terminal-SNR schedule)."""
    diffusers = pytest.importorskip("diffusers")
    from ppap_fast.integrations.diffusers import MIN_GUIDED_ABAR, PPAPGuidance
    from ppap_fast.ops import _registry

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, 4, generator=gen)
    t = torch.tensor([999, 500, 3])
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert abar[0] < MIN_GUIDED_ABAR
    coef = torch.where(abar >= MIN_GUIDED_ABAR, (1 - abar).sqrt(), torch.zeros_like(abar))
    guidance = PPAPGuidance(lambda x, t: torch.ones_like(x))
    for dtype, grad in ((torch.float32, torch.randn(3, 2, 4, 4, generator=gen)),
                        (torch.float16, torch.randn(3, 2, 4, 4, generator=gen)),
                        (torch.float32, torch.randn(1, 2, 4, 4, generator=gen))):
        model_output = torch.randn(3, 4, 4, 4, generator=gen).to(dtype)
        _registry._OPS["guided_eps"].last = None
        got = guidance.correct(model_output, x, t, sched, grad=grad)
        assert ops.last_backend("guided_eps") is not None
        assert torch.equal(got, _eager(model_output, grad, coef, 2)), (dtype, tuple(grad.shape))
    with pytest.raises(ValueError, match="takes no scale="):  # the scale was ignored silently
        guidance.correct(model_output, x, t, sched, grad=grad, scale=2.0)
