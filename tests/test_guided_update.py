"""Fused guided update: every backend against the float64 reference."""
import itertools
import zlib

import os

import pytest
import torch

from ppap_fast import ops
from ppap_fast.ops import update as gu
from ppap_fast.schedule import Schedule

from _util import (LaunchRecorder, assert_chunked_launches_cover, assert_close_rel, poison_allocator, rel_err,
                   requires_cuda)

CONFIGS = [
    ("ddim", 0.0, "learned_range", "ddim25"),
    ("ddim", 0.7, "learned_range", "50"),
    ("ddpm", 0.0, "learned_range", "50"),
    ("ddpm", 0.0, "fixed_small", "250"),
    ("ddpm", 0.0, "fixed_large", None),
]
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _backends_for(device):
    rep = ops.backend_report(device)["ops"]["guided_update"]["available"]
    return [b for b, why in rep.items() if why == "ok" and b != "reference"]


def _case(sampler, eta, var_type, respacing, B, shape, device, gen, with_grad, with_noise, idx_kind):
    sched = Schedule.create("linear", 1000, respacing)
    table64 = gu.build_table(sched, sampler, eta, var_type)
    T = sched.num_timesteps
    if idx_kind == "mixed":
        idx = torch.randint(0, T, (B,), generator=gen)
        idx[0] = 0
        idx[-1] = T - 1
    else:
        idx = torch.full((B,), int(torch.randint(0, T, (1,), generator=gen)))
    # model output with 2C channels: eps and v as channel slices (non-contiguous batch stride)
    C = shape[0]
    out = torch.randn(B, 2 * C, *shape[1:], generator=gen, dtype=torch.float64)
    eps, v = out[:, :C], out[:, C:].tanh()
    x = torch.randn(B, *shape, generator=gen, dtype=torch.float64) * 1.5
    grad = torch.randn(B, *shape, generator=gen, dtype=torch.float64) * 0.3 if with_grad else None
    noise = torch.randn(B, *shape, generator=gen, dtype=torch.float64) if with_noise else None
    use_v = v if table64.mode == gu.MODES["ddpm_learned"] else None
    return table64, idx, x, eps, use_v, grad, noise


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-{c[2]}-eta{c[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_backends_match_reference(cfg, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((cfg, str(dtype))).encode()))  # same cases every run
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checked = 0
    for device in devices:
        for backend in _backends_for(device):
            if backend == "triton" and dtype == torch.float64:
                continue
            if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
                continue  # the interpreter has no faithful bf16
            for with_grad, with_noise, idx_kind in itertools.product([True, False], [True, False], ["mixed", "same"]):
                B = int(torch.randint(1, 6, (1,), generator=gen))
                shape = (int(torch.randint(1, 4, (1,), generator=gen)), 5, 7)
                table64, idx, x, eps, v, grad, noise = _case(*cfg, B, shape, device, gen, with_grad, with_noise, idx_kind)
                cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
                # the reference sees the same rounded inputs, computed in float64
                up = lambda t: None if t is None else cast(t).double().cpu()
                want_s, want_p = gu.guided_update_reference(up(x), up(eps), idx, table64, v=up(v), grad=up(grad),
                                                            noise=up(noise))
                table = table64.to(device)
                poison_allocator(device)
                got_s, got_p = ops.guided_update(cast(x), cast(eps), idx.to(device), table, v=cast(v),
                                                 grad=cast(grad), noise=cast(noise), backend=backend)
                assert ops.last_backend("guided_update") == backend
                assert got_s.dtype == dtype and got_s.device.type == device
                what = f"{backend}/{device}/{dtype} grad={with_grad} noise={with_noise} idx={idx_kind}"
                # the op may be as far from float64 as eager PyTorch in this dtype is (cancellation at large t
                # makes x0-hat ill-conditioned), within 2x, and never beyond TOL otherwise
                eager_s, eager_p = gu.guided_update_reference(cast(x), cast(eps), idx.to(device), table, v=cast(v),
                                                              grad=cast(grad), noise=cast(noise))
                assert_close_rel(got_s, want_s, max(TOL[dtype], 2 * rel_err(eager_s, want_s)), what + " sample")
                assert_close_rel(got_p, want_p, max(TOL[dtype], 2 * rel_err(eager_p, want_p)), what + " pred_xstart")
                checked += 1
    assert checked > 0, "no fast backend ran: the extension should be built in this environment"


@pytest.mark.parametrize("sampler,var_type", [("ddim", "learned_range"), ("ddpm", "learned_range")])
def test_int32_step_index_gives_the_int64_result_on_every_backend(sampler, var_type):
    """An int32 idx was refused ("idx must be a long tensor") while the LoRA and norm ops take an int32
    expert_idx; every backend (the C++ op reads int64: the wrapper converts) now gives the int64 result."""
    table = gu.build_table(Schedule.create("linear", 1000, "50"), sampler, eta=0.5, var_type=var_type)
    g = torch.Generator().manual_seed(3)
    x, eps, v, grad, noise = (torch.randn(4, 2, 3, 5, generator=g) for _ in range(5))
    v = v.tanh() if var_type == "learned_range" and sampler == "ddpm" else None
    idx = torch.tensor([0, 49, 7, 23])
    backends = ["reference"] + _backends_for("cpu")
    assert "cpp" in backends and ("triton" in backends or not INTERP), backends
    for backend in backends:
        want = ops.guided_update(x, eps, idx, table, v=v, grad=grad, noise=noise, backend=backend)
        got = ops.guided_update(x, eps, idx.int(), table, v=v, grad=grad, noise=noise, backend=backend)
        assert ops.last_backend("guided_update") == backend
        for a, b in zip(got, want):
            assert torch.isfinite(a).all() and torch.equal(a, b), backend
    xg = x.clone().requires_grad_()  # autograd: the reference, differentiable
    got = ops.guided_update(xg, eps, idx.int(), table, v=v, grad=grad, noise=noise)
    got[0].sum().backward()
    assert torch.equal(got[0].detach(), ops.guided_update(x, eps, idx, table, v=v, grad=grad, noise=noise,
                                                          backend="reference")[0])
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_reference_matches_closed_form_ddim_step():
    # one DDIM step written out from the formulas, in float64
    sched = Schedule.create("linear", 1000, "ddim25")
    table = gu.build_table(sched, "ddim", eta=0.0)
    i = 12
    idx = torch.tensor([i])
    x, eps, grad = (torch.randn(1, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    abar, abar_prev = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i]
    x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    e = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    e = e - (1 - abar).sqrt() * grad
    x0g = (x - (1 - abar).sqrt() * e) / abar.sqrt()
    want = abar_prev.sqrt() * x0g + (1 - abar_prev).sqrt() * e
    got, got_x0 = gu.guided_update_reference(x, eps, idx, table, grad=grad)
    assert rel_err(got, want) < 1e-12 and rel_err(got_x0, x0g) < 1e-12


def test_noise_is_masked_at_step_zero():
    sched = Schedule.create("linear", 1000, "50")
    for sampler, var in (("ddpm", "fixed_small"), ("ddim", "learned_range")):
        table = gu.build_table(sched, sampler, eta=1.0, var_type=var)
        x, eps, noise = (torch.randn(2, 1, 3, 3, dtype=torch.float64) for _ in range(3))
        idx = torch.tensor([0, 0])
        a, _ = gu.guided_update_reference(x, eps, idx, table, noise=noise)
        b, _ = gu.guided_update_reference(x, eps, idx, table)
        assert torch.equal(a, b)
        idx = torch.tensor([5, 5])
        a, _ = gu.guided_update_reference(x, eps, idx, table, noise=noise)
        b, _ = gu.guided_update_reference(x, eps, idx, table)
        assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.allclose(a, b)


def test_bad_inputs():
    sched = Schedule.create("linear", 1000, "ddim25")
    table = gu.build_table(sched, "ddim")
    x = torch.randn(2, 3, 4, 4)
    idx = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="eps shape"):
        ops.guided_update(x, torch.randn(2, 3, 4, 5), idx, table)
    with pytest.raises(ValueError, match=r"idx must be an int64 or int32 tensor .*got torch.int16 \(2,\) on cpu"):
        ops.guided_update(x, x, idx.short(), table)
    for bad in ([1, 2], (1, 2), 3):  # a bare AttributeError ('list' object has no attribute 'ndim') before
        with pytest.raises(ValueError, match=f"idx must be an int64 or int32 tensor .*got {type(bad).__name__}"):
            ops.guided_update(x, x, bad, table)
    with pytest.raises(ValueError, match="dtype"):
        ops.guided_update(x, x.double(), idx, table)
    with pytest.raises(ValueError, match="needs v"):
        ops.guided_update(x, x, idx, gu.build_table(sched, "ddpm", var_type="learned_range"))
    with pytest.raises(ValueError, match="unknown sampler"):
        gu.build_table(sched, "euler")
    with pytest.raises(ValueError, match="var_type"):
        gu.build_table(sched, "ddpm", var_type="weird")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.guided_update(x, x, idx, table, backend="cuda")
    if "cpp" in _backends_for("cpu"):
        with pytest.raises(ValueError, match="idx values"):  # the public op checks first (every CPU backend)
            ops.guided_update(x, x, torch.tensor([1, 25]), table, backend="cpp")
        with pytest.raises(RuntimeError, match="outside"):  # the raw op's own check
            torch.ops.ppap_fast.guided_update(x, x, None, None, None, torch.tensor([1, 25]), table.coefs_f32,
                                              table.mode, True)
        with pytest.raises(RuntimeError, match="contiguous"):  # the raw op (the public one makes idx contiguous)
            torch.ops.ppap_fast.guided_update(x, x, None, None, None, torch.tensor([1, 0, 2, 0])[::2],
                                              table.coefs_f32, table.mode, True)


def test_backend_report_names_every_path():
    rep = ops.backend_report("cpu")
    assert set(rep["ops"]["guided_update"]["available"]) == {"reference", "cpp", "cuda", "triton"}
    assert rep["ops"]["guided_update"]["available"]["reference"] == "ok"
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ops.set_backend("fastest")


def _fast_cpu_backends():
    return [b for b in _backends_for("cpu") if b != "triton"]  # the Triton interpreter is not a CPU kernel


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}-{c[2]}-eta{c[1]}")
@pytest.mark.parametrize("clip", [True, False])
def test_long_runs_and_no_clip_match_reference(cfg, clip):
    # samples long enough for the vectorised body of the CPU loop plus its remainder (3*37*41 = 4551
    # elements, not a multiple of any vector width), with and without clipping, float32
    gen = torch.Generator().manual_seed(7)
    backends = _fast_cpu_backends()
    if not backends:
        pytest.skip("no compiled CPU backend")
    for backend in backends:
        for with_grad, with_noise in itertools.product([True, False], [True, False]):
            table64, idx, x, eps, v, grad, noise = _case(*cfg, 3, (3, 37, 41), "cpu", gen, with_grad, with_noise,
                                                         "mixed")
            f32 = lambda t: None if t is None else t.float()
            up = lambda t: None if t is None else f32(t).double()
            want_s, want_p = gu.guided_update_reference(up(x), up(eps), idx, table64, v=up(v), grad=up(grad),
                                                        noise=up(noise), clip_denoised=clip)
            poison_allocator("cpu")
            got_s, got_p = ops.guided_update(f32(x), f32(eps), idx, table64, v=f32(v), grad=f32(grad),
                                             noise=f32(noise), clip_denoised=clip, backend=backend)
            what = f"{backend} clip={clip} grad={with_grad} noise={with_noise}"
            assert_close_rel(got_s, want_s, TOL[torch.float32], what + " sample")
            assert_close_rel(got_p, want_p, TOL[torch.float32], what + " pred_xstart")


def _exp_probe(lv_hi, lv_lo, v, grad, noise):
    """Learned-range rows with x = eps = 0, so sample = exp(lv) * grad + exp(lv / 2) * noise exactly,
    lv = (v+1)/2 * lv_hi + (1 - (v+1)/2) * lv_lo: isolates the CPU loop's exp."""
    coefs = torch.zeros(1, gu.COLS, dtype=torch.float64)
    coefs[0, 4], coefs[0, 5], coefs[0, 6] = lv_hi, lv_lo, 1.0
    table = gu.UpdateTable(coefs, gu.MODES["ddpm_learned"])
    z = torch.zeros_like(v)
    return table, (z, z, torch.zeros(v.shape[0], dtype=torch.long), table), dict(v=v, grad=grad, noise=noise)


@pytest.mark.parametrize("which", ["grad", "noise", "both"])
def test_cpu_exp_over_the_float_range(which):
    # lv from -240 to 200 (lv / 2 from -120 to 100): denormal results, underflow to 0, overflow to inf, NaN in v
    v = torch.linspace(-1, 1, 20011, dtype=torch.float32).view(1, 1, 1, -1)
    v[..., 5] = float("nan")
    ones = torch.ones_like(v)
    grad = ones if which in ("grad", "both") else None
    noise = ones if which in ("noise", "both") else None
    table, args, kw = _exp_probe(200.0, -240.0, v, grad, noise)
    want, _ = gu.guided_update_reference(*args, **kw)  # torch.exp in float32
    for backend in _fast_cpu_backends() or pytest.skip("no compiled CPU backend"):
        poison_allocator("cpu")
        got, _ = ops.guided_update(*args, backend=backend, **kw)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got[..., 5]).all()
        assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got).any()
        assert torch.equal(got == 0, want == 0) and (got == 0).any()
        normal = torch.isfinite(want) & (want.abs() >= torch.finfo(torch.float32).tiny)
        rel = ((got[normal].double() - want[normal].double()).abs() / want[normal].double().abs()).max().item()
        assert rel < 6e-7, f"{backend}: exp relative error {rel:.2e}"  # a few float32 ulp
        sub = torch.isfinite(want) & ~normal
        assert sub.any() and (got[sub] - want[sub]).abs().max().item() <= 1e-44


def test_parallel_chunks_split_samples():
    # more than one parallel_for chunk (grain 16384), chunk borders inside samples, 2 threads
    backends = _fast_cpu_backends()
    if not backends:
        pytest.skip("no compiled CPU backend")
    gen = torch.Generator().manual_seed(11)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for cfg in (CONFIGS[1], CONFIGS[2]):
            table64, idx, x, eps, v, grad, noise = _case(*cfg, 5, (3, 61, 67), "cpu", gen, True, True, "mixed")
            f32 = lambda t: None if t is None else t.float()
            up = lambda t: None if t is None else f32(t).double()
            want_s, want_p = gu.guided_update_reference(up(x), up(eps), idx, table64, v=up(v), grad=up(grad),
                                                        noise=up(noise))
            for backend in backends:
                poison_allocator("cpu")
                got_s, got_p = ops.guided_update(f32(x), f32(eps), idx, table64, v=f32(v), grad=f32(grad),
                                                 noise=f32(noise), backend=backend)
                assert_close_rel(got_s, want_s, TOL[torch.float32], f"{backend} {cfg[0]} sample")
                assert_close_rel(got_p, want_p, TOL[torch.float32], f"{backend} {cfg[0]} pred_xstart")
    finally:
        torch.set_num_threads(n)


def test_auto_cuda_backend_follows_the_h100_measurements():
    """Automatic choice on CUDA (bench_update on an H100): the CUDA kernel for fp16/bf16 up to 2^24
    elements, Triton for fp32 and for larger half batches, CUDA for float64 (Triton computes in fp32)."""
    from ppap_fast.ops.update import CUDA_HALF_MAX_NUMEL, auto_cuda_backend

    small, large = 32 * 3 * 256 * 256, 256 * 3 * 256 * 256
    assert small <= CUDA_HALF_MAX_NUMEL < large
    for dt in (torch.float16, torch.bfloat16):
        assert auto_cuda_backend(dt, small) == "cuda"
        assert auto_cuda_backend(dt, large) == "triton"
    assert auto_cuda_backend(torch.float32, small) == auto_cuda_backend(torch.float32, large) == "triton"
    assert auto_cuda_backend(torch.float64, small) == "cuda"


@pytest.mark.parametrize("backend", ["cpp", "reference", None])
def test_strided_and_expanded_idx(backend):
    """The kernels read idx[b] from its data pointer: a strided or expanded idx (e.g. the
    torch.tensor(t).expand(B) idiom) must give the reference's result, not other timesteps."""
    tab = gu.build_table(Schedule.create("linear", 50), "ddim")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    for idx in (torch.tensor([40, 0, 25, 0, 3, 0])[::2], torch.tensor(10).expand(3)):
        want, _ = gu.guided_update_reference(x, eps, idx.contiguous(), tab)
        got, _ = gu.guided_update(x, eps, idx, tab, backend=backend)
        assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("backend", [None, "reference", "cpp", "triton"])
@pytest.mark.parametrize("bad", [-1, 50, 10**6])
def test_out_of_range_idx_is_refused_on_cpu(backend, bad):
    """A step index outside the table: cpp raised, the reference wrapped -1 to the last step (silently
    wrong) and the Triton kernel read outside the table (garbage, or a crash for 10**6). Every backend
    now refuses it on CPU with one message; on CUDA the CUDA and Triton kernels clamp (no host sync)."""
    avail = ops.backend_report("cpu")["ops"]["guided_update"]["available"]
    if backend is not None and avail.get(backend) != "ok":
        pytest.skip(f"{backend}: {avail.get(backend)}")
    table = gu.build_table(Schedule.create("linear", 50), "ddim")
    x, eps = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, 50\)"):
        gu.guided_update(x, eps, torch.tensor([0, bad]), table, backend=backend)
    gu.guided_update(x, eps, torch.tensor([0, 49]), table, backend=backend)  # the edges still run


def test_triton_clamps_an_index_outside_the_table():
    """The CUDA kernel clamps idx[b] to [0, T) (no host check: that would sync); the Triton one read the
    coefficient row at idx * 8 unchecked, past the table's end (stray memory, or an illegal address)."""
    sched = Schedule.create("linear", 1000, "ddim25")
    table = gu.build_table(sched, "ddim")
    T = sched.num_timesteps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    eps, grad = torch.randn_like(x), torch.randn_like(x)
    out = gu.guided_update(x, eps, torch.tensor([T + 1000, -7, 3]), table, grad=grad, backend="triton",
                          check_range=False)  # the CPU check off: the kernel itself (as on CUDA)
    want = gu.guided_update_reference(x, eps, torch.tensor([T - 1, 0, 3]), table, grad=grad)
    for a, b in zip(out, want):
        assert (a - b).abs().max() < 1e-5


def test_triton_launch_grids_stay_within_cuda_limits_above_65535_samples(monkeypatch):
    """Samples sat on grid axis 1, which CUDA caps at 65535: a batch of 70000 failed to launch. Every
    launch must keep axes 1 and 2 <= 65535, and the launches together must cover every sample once.
    (The interpreter takes minutes for 70000 programs: the grids are recorded here, the chunked
    results are checked against the reference below.)"""
    from ppap_fast.ops import update_triton

    rec = LaunchRecorder()
    monkeypatch.setattr(update_triton, "_guided_update_kernel", rec)
    B = 70000
    table = gu.build_table(Schedule.create("linear", 1000, "ddim25"), "ddim")
    x = torch.zeros(B, 1)
    update_triton.guided_update_triton(x, x, torch.zeros(B, dtype=torch.long), table)
    assert_chunked_launches_cover(rec, B)


def test_triton_chunked_launches_match_reference(monkeypatch):
    """The chunked path (forced with a grid limit of 7 samples: 20 samples in 3 launches, the last
    partial) against the float64 reference, mixed steps, grad and noise, outputs poisoned."""
    from ppap_fast.ops import _kernel_util

    monkeypatch.setattr(_kernel_util, "MAX_GRID_YZ", 7)
    assert len(_kernel_util.grid_chunks(20)) == 3
    gen = torch.Generator().manual_seed(5)
    for cfg in (CONFIGS[0], CONFIGS[2]):
        table64, idx, x, eps, v, grad, noise = _case(*cfg, 20, (2, 1, 3), "cpu", gen, True, True, "mixed")
        table = gu.UpdateTable(table64.coefs, table64.mode)
        with monkeypatch.context() as m:  # the outputs start as NaN
            m.setattr(torch, "empty_like", lambda t, **kw: torch.full_like(t, float("nan"), **kw))
            got = gu.guided_update(x.float(), eps.float(), idx, table, v=None if v is None else v.float(),
                                   grad=grad.float(), noise=noise.float(), backend="triton")
        want = gu.guided_update_reference(x, eps, idx, table64, v=v, grad=grad, noise=noise)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            assert_close_rel(g.double(), w, TOL[torch.float32] * 10, "chunked triton")


@requires_cuda
def test_cuda_backends_above_65535_samples():
    """On the GPU: the CUDA kernel refused a batch above 65535 (grid axis y) and the Triton one failed
    to launch; both now run it (samples looped / chunked) and match the reference, outputs poisoned."""
    B = 70000
    table64 = gu.build_table(Schedule.create("linear", 1000, "ddim25"), "ddim").to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, 1, 3, device="cuda", generator=gen)
    eps, grad = torch.randn_like(x), torch.randn_like(x)
    idx = torch.randint(0, 25, (B,), device="cuda", generator=gen)
    want = gu.guided_update_reference(x.double(), eps.double(), idx, table64, grad=grad.double())
    backends = [b for b in _backends_for("cuda") if b in ("cuda", "triton")]
    assert backends
    for backend in backends:
        poison_allocator("cuda")
        got = gu.guided_update(x, eps, idx, table64, grad=grad, backend=backend)
        for g, w in zip(got, want):
            assert_close_rel(g.double(), w, TOL[torch.float32] * 10, f"{backend} at B={B}")


def test_fixed_small_guidance_uses_the_unclipped_variance_at_step_zero():
    # condition_mean scales the grad by the posterior variance, which is 0 at index 0 (only its log is
    # clipped, for the noise): every backend must then leave the grad out, as ppap_fast.sampling does
    from ppap_fast.sampling import ddpm_step

    sched = Schedule.create("linear", 1000, "5")
    table = gu.build_table(sched, "ddpm", var_type="fixed_small")
    gen = torch.Generator().manual_seed(5)
    x, eps, grad, noise = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(4))
    grad = grad * 10
    idx = torch.tensor([0, 2, 0])
    want = torch.cat([ddpm_step(None, x[b:b + 1].double(), int(idx[b]), sched, model_output=eps[b:b + 1].double(),
                                grad=grad[b:b + 1].double(), noise=noise[b:b + 1].double(),
                                var_type="fixed_small").sample for b in range(3)])
    for backend in ["reference"] + _backends_for("cpu"):
        poison_allocator("cpu")
        got, _ = ops.guided_update(x, eps, idx, table, grad=grad, noise=noise, backend=backend)
        assert_close_rel(got, want, 2e-6, backend)


def test_autograd_uses_the_reference():
    """The kernels are forward-only: under autograd the automatic choice (cpp on CPU) returned outputs
    with requires_grad set but no graph to the inputs (x.grad stayed None, or a sum with other terms
    lost this step's share). Now the reference runs (exact gradients) and a kernel asked for by name
    is refused, as guided_eps and the other forward-only ops do."""
    table = gu.build_table(Schedule.create("linear", 50), "ddpm", var_type="learned_range")
    g = torch.Generator().manual_seed(0)
    x, eps, v, grad, noise = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(5))
    idx = torch.tensor([7, 30])
    for which in range(5):  # one input that requires grad at a time
        ins = [t.clone().requires_grad_(i == which) for i, t in enumerate((x, eps, v.tanh(), grad, noise))]
        want = torch.autograd.grad(sum(o.square().sum() for o in gu.guided_update_reference(
            ins[0], ins[1], idx, table, *ins[2:])), ins[which])[0]
        sample, pred = gu.guided_update(ins[0], ins[1], idx, table, *ins[2:])
        assert ops.last_backend("guided_update") == "reference"
        got = torch.autograd.grad(sample.square().sum() + pred.square().sum(), ins[which], allow_unused=True)[0]
        assert got is not None and rel_err(got, want) < 1e-12, which
    xs = x.clone().requires_grad_()
    for backend in _backends_for("cpu"):
        with pytest.raises(ops.BackendUnavailableError, match="forward-only"):
            gu.guided_update(xs, eps, idx, table, v, grad, noise, backend=backend)
    f32 = [t.float() for t in (xs, eps, v.tanh(), grad, noise)]  # float32: every kernel takes it
    want = gu.guided_update_reference(x, eps, idx, table, v.tanh(), grad, noise)[0]
    with torch.no_grad():  # no autograd: the kernels run
        for backend in _backends_for("cpu"):
            got, _ = gu.guided_update(f32[0], f32[1], idx, table, *f32[2:], backend=backend)
            assert ops.last_backend("guided_update") == backend
            assert rel_err(got, want) < 1e-5, backend
