import math
import re

import numpy as np
import pytest
import torch

from ppap_fast import fast_sampling, ops, sampling
from ppap_fast.ops.update import MODES
from ppap_fast.sampling import ddim_step, ddpm_step, eps_correction, sample_loop
from ppap_fast.schedule import Schedule
from ppap_fast.testing import check_guided_golden

from _util import assert_no_host_sync, capture_cuda_graph, requires_cuda


# ----------------------------------------------------------------- golden parity

@pytest.fixture(scope="module")
def golden(fixtures_dir, one_thread):
    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    return g, check_guided_golden(fixtures_dir / "guided_steps_golden.pt")


def test_golden_covers_every_recorded_tensor(golden):
    g, errs = golden
    recorded = [k for k, v in g.items() if isinstance(v, torch.Tensor) and k not in
                ("W", "y", "x_T", "noise", "ddim_timestep_map", "ddpm_timestep_map", "base_betas")]
    assert set(recorded) <= set(errs), set(recorded) - set(errs)
    assert sum(k.startswith("ddim25_guided_trajectory_step") for k in errs) == 25
    assert sum(k.startswith("ddim25_unguided_trajectory_step") for k in errs) == 25


def _golden_tol(key, g, device="cpu"):
    """Tolerance of check_guided_golden's key `key`, the same for every sampler path."""
    if key.endswith("_from_recorded_inputs"):
        # the update alone on the golden's own model outputs and gradient: float32 rounding only,
        # 4 ulp of the tensor's largest value (seen on the CPU: <= 1 ulp with every guided_update backend)
        ref = g[key.removesuffix("_from_recorded_inputs")]
        scale = max(1.0, float(ref.abs().max()))
        if device != "cpu" and "pred_xstart" in key:
            # pred_xstart = x / sqrt(abar) - sqrt(1 / abar - 1) eps at t = 960 / 999: terms ~100x the result, so
            # an ulp of theirs is ~100 of its. On an H100 (torch 2.11) 3.0-4.5e-5 (guided DDIM) and 3.8e-6 /
            # 6.9e-6 (unguided) off the golden where the CPU is within 1 ulp (not pinned down which op rounds
            # otherwise there): 4 ulp of the largest term
            sched, step = re.match(r"(ddim|ddpm)_step(\d+)_", key).groups()
            abar = float(g[f"{sched}_alphas_cumprod"][int(step)])
            scale = max(scale, float(g["x_T"].abs().max()) / abar ** 0.5)
        return 4 * torch.finfo(torch.float32).eps * scale
    if "trajectory" in key or "final" in key:
        return 5e-4
    # <= 1e-4, or 4x the golden's own fp32-vs-fp64 deviation where the formula amplifies
    # fp32 error (pred_xstart at t=960/999 is sqrt(1/abar-1) ~ 100x the eps error).
    return max(1e-4, 4 * g["fp64_vs_fp32_maxabs"].get(key, 0.0))


def _golden_failures(errs, g, device="cpu"):
    return {k: (e, _golden_tol(k, g, device)) for k, e in errs.items()
            if not (math.isfinite(e) and e <= _golden_tol(k, g, device))}


def test_golden_single_steps(golden):
    g, errs = golden
    steps = {k: e for k, e in errs.items() if not ("trajectory" in k or "final" in k)}
    assert sum(k.endswith("_from_recorded_inputs") for k in steps) == 9
    bad = _golden_failures(steps, g)
    assert not bad, bad


def test_golden_trajectories(golden):
    _, errs = golden
    traj = {k: e for k, e in errs.items() if "trajectory" in k or "final" in k}
    assert len(traj) == 2 * 25 + 4
    bad = {k: e for k, e in traj.items() if not (math.isfinite(e) and e <= 5e-4)}
    assert not bad, bad


# ----------------------------------------------------------------- golden parity of the fast path

FAST_GOLDEN_BACKENDS = ["reference", "cpp", "triton"]  # the guided_update backends that run on the CPU
NOT_ON_FAST_PATH = ("log_variance",)  # the fused update returns (x_prev, pred_xstart) only


@pytest.fixture
def fused_update_runs(monkeypatch):
    """Spy on the fast sampler's fused update: the allocator is NaN-poisoned before each call (an output
    element the kernel skips stays NaN, and NaN never passes), and the backend that ran is recorded."""
    real, ran = fast_sampling.guided_update, []

    def spy(x, *args, **kwargs):
        poison = [torch.full_like(x, float("nan")) for _ in range(8)]  # freed blocks of the outputs' size
        del poison
        out = real(x, *args, **kwargs)
        ran.append(ops.last_backend("guided_update"))
        return out

    monkeypatch.setattr(fast_sampling, "guided_update", spy)
    return ran


def _skip_unless_cpu_backend(backend):
    why = ops.backend_report("cpu")["ops"]["guided_update"]["available"].get(backend, "not registered")
    if why != "ok":
        pytest.skip(f"guided_update backend {backend!r} cannot run on the CPU here: {why}")


@pytest.mark.parametrize("backend", FAST_GOLDEN_BACKENDS)
def test_golden_fast_path(fixtures_dir, one_thread, fused_update_runs, backend):
    """FastGuidedSampler.step / fast_sample_loop with the fused update against the official goldens:
    DDIM (eta 0, condition_score) and learned-range DDPM (condition_mean) steps, both 25-step DDIM
    trajectories step by step, and the steps on the golden's recorded model outputs and gradient."""
    _skip_unless_cpu_backend(backend)
    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    errs = check_guided_golden(fixtures_dir / "guided_steps_golden.pt", impl="fast", backend=backend)
    assert len(fused_update_runs) >= 2 * 25 and set(fused_update_runs) == {backend}
    recorded = [k for k, v in g.items() if isinstance(v, torch.Tensor) and k not in
                ("W", "y", "x_T", "noise", "ddim_timestep_map", "ddpm_timestep_map", "base_betas")]
    missing = {k for k in recorded if k not in errs and not k.endswith(NOT_ON_FAST_PATH)}
    assert not missing, missing
    assert sum(k.endswith("_from_recorded_inputs") for k in errs) == 8
    assert sum(k.startswith("ddim25_guided_trajectory_step") for k in errs) == 25
    bad = _golden_failures(errs, g)
    assert not bad, bad


def test_golden_fast_path_catches_a_perturbed_update(fixtures_dir, one_thread, monkeypatch):
    # the fused update off by 1e-3 at DDIM index 12 only: exactly those steps and trajectory entries fail
    real = fast_sampling.guided_update

    def off_at_ddim_index12(x, eps, idx, table, **kwargs):
        sample, pred = real(x, eps, idx, table, **kwargs)
        if table.mode == MODES["ddim"]:
            sample = sample + 1e-3 * (idx == 12).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return sample, pred

    monkeypatch.setattr(fast_sampling, "guided_update", off_at_ddim_index12)
    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    errs = check_guided_golden(fixtures_dir / "guided_steps_golden.pt", impl="fast", backend="reference")
    want = {f"ddim_step12_{kind}_sample" for kind in ("guided", "unguided")}
    for kind in ("guided", "unguided"):
        want |= {f"ddim25_{kind}_trajectory", f"ddim25_{kind}_final"}
        want |= {f"ddim25_{kind}_trajectory_step{k}" for k in range(12, 25)}  # entry k: after index 24 - k
    assert set(_golden_failures(errs, g)) == want


def test_check_guided_golden_refuses_bad_options(fixtures_dir):
    path = fixtures_dir / "guided_steps_golden.pt"
    with pytest.raises(ValueError, match="impl must be one of"):
        check_guided_golden(path, impl="fused")
    with pytest.raises(ValueError, match="impl='fast' only"):
        check_guided_golden(path, backend="cpp")
    with pytest.raises(ValueError, match=r"may not set \['eta'\]"):
        check_guided_golden(path, impl="fast", fast_options={"eta": 0.5})


def test_golden_guidance_is_visible(golden):
    # guided and unguided differ far more than our error, so dropping guidance would fail
    g, errs = golden
    for k in ("ddim_step24", "ddpm_step49"):
        assert (g[f"{k}_guided_sample"] - g[f"{k}_unguided_sample"]).abs().max() > 100 * errs[f"{k}_guided_sample"]


# ----------------------------------------------------------------- formulas (fp64, independent)

class FakeModel:
    """Deterministic eps/v model that records the timesteps it sees."""

    def __init__(self, learned=True, scale=1.0):
        self.learned, self.scale, self.seen = learned, scale, []

    def __call__(self, x, t):
        self.seen.append(t.clone())
        tt = t.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        eps = self.scale * (0.7 * x + 0.3 * torch.sin(x * 3 + tt / 100))
        if not self.learned:
            return eps
        return torch.cat([eps, torch.tanh(x - 0.2)], dim=1)


def _tables(s, i):
    f = lambda tab: tab[i].item()  # noqa: E731
    return dict(abar=f(s.alphas_cumprod), abar_prev=f(s.alphas_cumprod_prev), beta=f(s.betas),
                post_var=f(s.posterior_variance), post_logc=f(s.posterior_log_variance_clipped),
                c1=f(s.posterior_mean_coef1), c2=f(s.posterior_mean_coef2))


def _lin_guide(scale=2.0):
    w = torch.randn(5, 3 * 4 * 4, dtype=torch.float64)
    calls = []

    def guide(x, t):
        calls.append(t.clone())
        x = x.detach().requires_grad_(True)
        lp = torch.log_softmax(x.flatten(1) @ w.T, -1)[:, 1].sum()
        return torch.autograd.grad(lp, x)[0] * scale

    return guide, calls


@pytest.mark.parametrize("i", [0, 7, 49])
@pytest.mark.parametrize("guided", [False, True])
def test_ddpm_step_formula(i, guided):
    s = Schedule.create("linear", 1000, "50")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 1.5
    noise = torch.randn_like(x)
    model = FakeModel()
    guide, calls = _lin_guide()
    out = ddpm_step(model, x, i, s, guide=guide if guided else None, noise=noise)
    T = _tables(s, i)
    t_orig = s.timestep_map[i].item()
    mo = model(x, torch.full((2,), t_orig))
    eps, v = mo[:, :3], mo[:, 3:]
    x0 = ((1 / T["abar"]) ** 0.5 * x - (1 / T["abar"] - 1) ** 0.5 * eps).clamp(-1, 1)
    mean = T["c1"] * x0 + T["c2"] * x
    frac = (v + 1) / 2
    log_var = frac * math.log(T["beta"]) + (1 - frac) * T["post_logc"]
    if guided:
        mean = mean + log_var.exp() * guide(x, torch.full((2,), t_orig))
    sample = mean + (0.0 if i == 0 else 1.0) * (0.5 * log_var).exp() * noise
    torch.testing.assert_close(out.pred_xstart, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_variance, log_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.sample, sample, rtol=1e-12, atol=1e-12)
    assert all(int(t.unique()) == t_orig for t in model.seen)  # original timestep, not the index
    if guided:
        assert int(calls[0].unique()) == t_orig


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_fixed_variances(var_type):
    s = Schedule.create("linear", 1000, "50")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for i in (0, 1, 30):
        out = ddpm_step(FakeModel(learned=False), x, i, s, var_type=var_type, noise=torch.zeros_like(x))
        if var_type == "fixed_small":
            expected = s.posterior_log_variance_clipped[i]
        else:
            expected = math.log(s.posterior_variance[1] if i == 0 else s.betas[i])
        torch.testing.assert_close(out.log_variance, torch.full_like(x, float(expected)), rtol=1e-12, atol=0)
    # default for a C-channel output is guided-diffusion's FIXED_LARGE
    d = ddpm_step(FakeModel(learned=False), x, 30, s, noise=torch.zeros_like(x))
    assert float(d.log_variance[0, 0, 0, 0]) == pytest.approx(math.log(s.betas[30]), rel=1e-12)


def test_learned_range_endpoints():
    s = Schedule.create("linear", 1000, "50")
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    idx = torch.tensor([20])
    for v, expected in ((1.0, s.log_betas[20]), (-1.0, s.posterior_log_variance_clipped[20])):
        _, lv = sampling.model_variance(torch.full_like(x, v), x, idx, s)
        torch.testing.assert_close(lv, torch.full_like(x, float(expected)))


@pytest.mark.parametrize("i", [0, 12, 24])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_formula(i, guided, eta):
    s = Schedule.create("linear", 1000, "ddim25")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 1.5
    noise = torch.randn_like(x)
    model = FakeModel(scale=3.0)  # pushes pred_xstart outside [-1, 1] so clipping matters
    guide, _ = _lin_guide(scale=40.0)
    out = ddim_step(model, x, i, s, guide=guide if guided else None, eta=eta, noise=noise)
    T = _tables(s, i)
    t_orig = torch.full((2,), s.timestep_map[i].item())
    eps_raw = model(x, t_orig)[:, :3]
    ra, rm1 = (1 / T["abar"]) ** 0.5, (1 / T["abar"] - 1) ** 0.5
    x0 = (ra * x - rm1 * eps_raw).clamp(-1, 1)
    eps = (ra * x - x0) / rm1  # re-derived from the clipped x0
    if guided:
        eps = eps - (1 - T["abar"]) ** 0.5 * guide(x, t_orig)
        x0 = ra * x - rm1 * eps  # not re-clipped
    sigma = eta * ((1 - T["abar_prev"]) / (1 - T["abar"])) ** 0.5 * (1 - T["abar"] / T["abar_prev"]) ** 0.5
    sample = x0 * T["abar_prev"] ** 0.5 + (1 - T["abar_prev"] - sigma ** 2) ** 0.5 * eps
    if i != 0:
        sample = sample + sigma * noise
    torch.testing.assert_close(out.pred_xstart, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.sample, sample, rtol=1e-10, atol=1e-10)
    if guided and i > 0:
        assert out.pred_xstart.abs().max() > 1.0  # the guided x0 is left unclipped


def test_ddim_clip_denoised_false_uses_raw_eps():
    s = Schedule.create("linear", 1000, "ddim25")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 2
    model = FakeModel(scale=3.0)
    out = ddim_step(model, x, 20, s, clip_denoised=False)
    eps = model(x, torch.full((2,), 800))[:, :3]
    torch.testing.assert_close(out.eps, eps, rtol=1e-10, atol=1e-10)
    assert out.pred_xstart.abs().max() > 1


def test_eps_correction_and_grad_equals_guide():
    s = Schedule.create("linear", 1000, "ddim25")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    guide, _ = _lin_guide()
    grad = guide(x, torch.zeros(2, dtype=torch.long))
    a = ddim_step(FakeModel(), x, 10, s, guide=guide)
    b = ddim_step(FakeModel(), x, 10, s, grad=grad)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.grad, grad)
    eps = torch.randn_like(x)
    abar = s.alphas_cumprod[torch.tensor([10, 3])]
    expected = eps - (1 - abar).sqrt().view(2, 1, 1, 1) * grad
    torch.testing.assert_close(eps_correction(eps, grad, abar), expected)
    torch.testing.assert_close(eps_correction(eps, grad, 0.25), eps - math.sqrt(0.75) * grad)
    # a grad of one sample, or an abar table of another length, broadcast along the wrong dims silently
    with pytest.raises(ValueError, match=r"grad must have the shape of eps \(2, 3, 4, 4\)"):
        eps_correction(eps, grad[0], abar)
    for bad in (s.alphas_cumprod[:4], abar[:, None]):
        with pytest.raises(ValueError, match="alphas_cumprod_t must be a float, \\[B\\] or"):
            eps_correction(eps, grad, bad)
    c = ddpm_step(FakeModel(), x, 10, s, grad=grad, noise=torch.zeros_like(x))
    d = ddpm_step(FakeModel(), x, 10, s, guide=guide, noise=torch.zeros_like(x))
    assert torch.equal(c.sample, d.sample)


def test_model_output_and_mixed_index_batch():
    s = Schedule.create("linear", 1000, "50")
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x)
    model = FakeModel()
    idx = torch.tensor([0, 25, 49])
    mixed = ddpm_step(model, x, idx, s, noise=noise)
    for b, i in enumerate(idx.tolist()):
        single = ddpm_step(model, x[b:b + 1], i, s, noise=noise[b:b + 1])
        torch.testing.assert_close(mixed.sample[b:b + 1], single.sample, rtol=1e-12, atol=1e-12)
    mo = model(x, s.timestep_map[idx])
    pre = ddpm_step(None, x, idx, s, model_output=mo, noise=noise)
    assert torch.equal(pre.sample, mixed.sample)


# ----------------------------------------------------------------- loops

def test_sample_loop_ddpm_matches_manual_chain():
    s = Schedule.create("linear", 1000, "10")
    model = FakeModel()
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    noises = {i: torch.randn_like(x_T) for i in range(10)}
    guide, calls = _lin_guide()
    final, traj = sample_loop(model, x_T, s, sampler="ddpm", guide=guide,
                              noise_fn=lambda i, x: noises[i], return_trajectory=True)
    x = x_T
    for k, i in enumerate(range(9, -1, -1)):
        x = ddpm_step(model, x, i, s, guide=guide, noise=noises[i]).sample
        torch.testing.assert_close(traj[k], x, rtol=0, atol=0)
    assert traj.shape == (10, 2, 3, 4, 4) and torch.equal(final, x)
    assert [int(c[0]) for c in calls[:10]] == s.timestep_map.flip(0).tolist()


def test_sample_loop_ddim_eta0_draws_no_noise_and_generator_reproducible():
    s = Schedule.create("linear", 1000, "ddim5")
    model = FakeModel()
    called = []
    out = sample_loop(model, (2, 3, 4, 4), s, generator=torch.Generator().manual_seed(3),
                      noise_fn=lambda i, x: called.append(i), dtype=torch.float64)
    assert not called and out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    again = sample_loop(model, (2, 3, 4, 4), s, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(out, again)
    a = sample_loop(model, (2, 3, 4, 4), s, sampler="ddpm", generator=torch.Generator().manual_seed(1))
    b = sample_loop(model, (2, 3, 4, 4), s, sampler="ddpm", generator=torch.Generator().manual_seed(2))
    assert (a - b).abs().max() > 1e-3


# ----------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("loop", [sample_loop, fast_sampling.fast_sample_loop])
def test_eta_and_var_type_belong_to_their_sampler(loop):
    """eta with DDPM and var_type with DDIM were ignored silently."""
    s = Schedule.create("linear", 1000, "ddim5")
    m = FakeModel()
    with pytest.raises(ValueError, match="eta=0.5 is DDIM's noise level"):
        loop(m, (2, 3, 4, 4), s, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="var_type='fixed_small' is DDPM's variance"):
        loop(m, (2, 3, 4, 4), s, sampler="ddim", var_type="fixed_small")
    assert loop(m, (2, 3, 4, 4), s, sampler="ddpm", var_type="fixed_small").shape == (2, 3, 4, 4)


@pytest.mark.parametrize("loop", [sample_loop, fast_sampling.fast_sample_loop])
def test_x_T_of_another_dtype_or_non_finite_is_named(loop):
    """A float64 x_T into a float32 UNet was the conv's bare dtype error; a NaN x_T without a guide gave
    NaN images."""
    s = Schedule.create("linear", 1000, "ddim5")
    net = torch.nn.Conv2d(3, 3, 3, padding=1)

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            return self.net(x)

    with pytest.raises(RuntimeError, match=r"x_t of dtype torch.float64, its weights are torch.float32.*"
                                           r"\(it raised: Input type"):
        loop(Denoiser(), torch.randn(2, 3, 8, 8, dtype=torch.float64), s)
    x = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(loop(Denoiser(), x, s)).all()
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="x_T has 1 non-finite values"):
        loop(Denoiser(), x, s)


def test_bad_inputs_raise():
    s = Schedule.create("linear", 1000, "ddim25")
    x = torch.randn(2, 3, 4, 4)
    m = FakeModel()
    with pytest.raises(ValueError, match="index"):
        ddim_step(m, x, 25, s)
    with pytest.raises(ValueError, match="index"):
        ddim_step(m, x, -1, s)
    with pytest.raises(ValueError, match="index"):
        ddim_step(m, x, torch.tensor([3, 25]), s)
    with pytest.raises(ValueError, match="index"):
        ddim_step(m, x, torch.tensor([1.0, 2.0]), s)
    with pytest.raises(ValueError, match="index"):
        ddim_step(m, x, torch.tensor([1, 2, 3]), s)
    with pytest.raises(ValueError, match="x must be floating"):
        ddim_step(m, x.long(), 3, s)
    with pytest.raises(ValueError, match="x must have shape"):
        ddim_step(m, torch.randn(3), 3, s)
    with pytest.raises(ValueError, match="model_output"):
        ddim_step(lambda x, t: torch.randn(2, 5, 4, 4), x, 3, s)
    with pytest.raises(ValueError, match="model_output"):
        ddpm_step(lambda x, t: torch.randn(2, 6, 4, 5), x, 3, s)
    with pytest.raises(ValueError, match="schedule"):
        ddim_step(m, x.to("meta"), 3, s)
    with pytest.raises(ValueError, match="grad"):
        ddim_step(m, x, 3, s, grad=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="grad"):
        ddim_step(m, x, 3, s, grad=torch.ones(2, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="either guide or grad"):
        ddim_step(m, x, 3, s, grad=torch.randn_like(x), guide=lambda x, t: x)
    with pytest.raises(ValueError, match="noise"):
        ddpm_step(m, x, 3, s, noise=torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="var_type"):
        ddpm_step(m, x, 3, s, var_type="fixed")
    with pytest.raises(ValueError, match="var_type"):
        ddpm_step(FakeModel(learned=False), x, 3, s, var_type="learned_range")
    with pytest.raises(ValueError, match="nonfinite_grad"):
        ddim_step(m, x, 3, s, nonfinite_grad="skip")
    with pytest.raises(ValueError, match="sampler"):
        sample_loop(m, x, s, sampler="euler")
    with pytest.raises(ValueError, match="eta"):
        ddim_step(m, x, 3, s, eta=float("nan"))
    for loop in (sample_loop, fast_sampling.fast_sample_loop):  # (2.5, 3, 4, 4) drew (2, 3, 4, 4) silently
        with pytest.raises(ValueError, match=r"the shape of x_T must be ints \[B, C, ...\], got \(2.5, 3, 4, 4\)"):
            loop(m, (2.5, 3, 4, 4), s)
        with pytest.raises(TypeError, match="shape_or_x must be x_T"):
            loop(m, 2, s)
    import numpy as np
    assert sample_loop(FakeModel(), np.array([2, 3, 4, 4]), s).shape == (2, 3, 4, 4)
    for bad in ("ddim25", None):  # "'str' object has no attribute 'device'"
        with pytest.raises(TypeError, match="schedule must be a Schedule"):
            sample_loop(m, (2, 3, 4, 4), bad)
        with pytest.raises(TypeError, match="schedule must be a Schedule"):
            ddpm_step(m, x, 3, bad)


@pytest.mark.parametrize("step", [ddim_step, ddpm_step])
def test_nonfinite_grad(step):
    s = Schedule.create("linear", 1000, "ddim25")
    x = torch.randn(2, 3, 4, 4)
    bad = torch.randn_like(x)
    bad[1, 0, 0, 0] = float("nan")
    bad[0, 2, 1, 1] = float("inf")
    kw = dict(noise=torch.zeros_like(x)) if step is ddpm_step else {}
    with pytest.raises(RuntimeError, match="grad"):
        step(FakeModel(), x, 5, s, grad=bad, **kw)
    with pytest.raises(RuntimeError, match="grad"):
        step(FakeModel(), x, 5, s, guide=lambda x, t: bad, **kw)
    zeroed = step(FakeModel(), x, 5, s, grad=bad, nonfinite_grad="zero", **kw)
    clean = torch.where(torch.isfinite(bad), bad, torch.zeros_like(bad))
    ref = step(FakeModel(), x, 5, s, grad=clean, **kw)
    assert torch.isfinite(zeroed.sample).all()
    assert torch.equal(zeroed.sample, ref.sample)
    ignored = step(FakeModel(), x, 5, s, grad=bad, nonfinite_grad="ignore", **kw)
    assert not torch.isfinite(ignored.sample).all()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_loop_warns_naming_the_stage_and_step_that_went_non_finite(sampler):
    import warnings

    s = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def overflowing(x, t):  # sample 1's output goes NaN from the third step on, as a half-precision UNet's can
        calls.append(int(t[0]))  # (an Inf eps is clipped away by clip_denoised: x0-hat saturates, DDIM stays finite)
        eps = FakeModel()(x, t)
        if len(calls) >= 3:
            eps[1] = float("nan")
        return eps

    gen = torch.Generator().manual_seed(1)
    with pytest.warns(RuntimeWarning, match=r"sample_loop: 1 of 3 samples hold NaN/Inf: the denoiser's output \(eps\) "
                                            rf"went non-finite first, at step 3 of 5 \(t={calls_t(s, 2)}\)") as rec:
        sample_loop(overflowing, x_T, s, sampler=sampler, generator=gen)
    assert rec[0].filename == __file__  # the caller's line
    late_nan = lambda x, t: torch.where(t[:, None, None, None] < 100, torch.full_like(x, float("nan")), 0 * x)
    with pytest.warns(RuntimeWarning, match=r"3 of 3 samples hold NaN/Inf: the guidance gradient went non-finite "
                                            rf"first, at step 5 of 5 \(t={calls_t(s, 4)}\)"):
        sample_loop(FakeModel(), x_T, s, sampler=sampler, guide=late_nan, nonfinite_grad="ignore", generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(sample_loop(FakeModel(), x_T, s, sampler=sampler, generator=gen)).all()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_loop_warning_blames_a_guide_that_gave_no_gradient_at_first(sampler):
    # no gradient (None) until t < 100, then NaN: the guidance stage is first seen at the step where it and the
    # eps / sample it feeds all go NaN; the warning must still name the guidance
    s = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    late = lambda x, t: None if int(t[0]) >= 100 else torch.full_like(x, float("nan"))
    with pytest.warns(RuntimeWarning, match=r"3 of 3 samples hold NaN/Inf: the guidance gradient went non-finite "
                                            rf"first, at step 5 of 5 \(t={calls_t(s, 4)}\)"):
        sample_loop(FakeModel(), x_T, s, sampler=sampler, guide=late, nonfinite_grad="ignore",
                    generator=torch.Generator().manual_seed(1))


def calls_t(s, k):
    """The original timestep of the k-th step of a sample_loop over s."""
    return int(s.timestep_map[s.num_timesteps - 1 - k])


# ----------------------------------------------------------------- CUDA: parity, no host syncs, graph capture

cuda = requires_cuda


@pytest.mark.cuda
@cuda
def test_golden_cuda(fixtures_dir, no_tf32):
    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    errs = check_guided_golden(fixtures_dir / "guided_steps_golden.pt", device="cuda")
    bad = _golden_failures(errs, g, "cuda")
    assert not bad, bad


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_golden_fast_path_cuda(fixtures_dir, no_tf32, backend):
    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    errs = check_guided_golden(fixtures_dir / "guided_steps_golden.pt", device="cuda", impl="fast", backend=backend)
    assert ops.last_backend("guided_update") == backend
    bad = _golden_failures(errs, g, "cuda")
    assert not bad, bad


def _cuda_setup(fixtures_dir):
    from ppap_fast.testing import linear_classifier_guide, load_golden_adm

    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    model = load_golden_adm(fixtures_dir / "adm_small_golden_1.pt", "cuda")
    guide = linear_classifier_guide(g["W"].cuda(), g["y"].cuda(), float(g["scale"]))
    return g["x_T"].cuda(), g["noise"].cuda(), model, guide


@pytest.mark.cuda
@cuda
def test_steps_do_not_sync_cuda(fixtures_dir):
    x, noise, model, guide = _cuda_setup(fixtures_dir)
    sd = Schedule.create("linear", 1000, "ddim25").to("cuda")
    sp = Schedule.create("linear", 1000, "50").to("cuda")
    idx = torch.tensor([12, 12], device="cuda")
    calls = [lambda: ddim_step(model, x, idx, sd, guide=guide),
             lambda: ddim_step(model, x, 24, sd, guide=guide, eta=0.5, noise=noise),
             lambda: ddpm_step(model, x, 49, sp, guide=guide, noise=noise),
             lambda: ddpm_step(model, x, idx, sp, guide=guide, noise=noise, nonfinite_grad="zero")]
    with torch.no_grad():
        assert_no_host_sync(calls)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("nonfinite_grad", ["zero", "raise"])
def test_guided_ddim_step_cuda_graph(fixtures_dir, nonfinite_grad):
    x, _, model, guide = _cuda_setup(fixtures_dir)
    s = Schedule.create("linear", 1000, "ddim25").to("cuda")
    static_x, static_idx = x.clone(), torch.full((2,), 20, device="cuda")

    def step():
        with torch.no_grad():
            return ddim_step(model, static_x, static_idx, s, guide=guide, nonfinite_grad=nonfinite_grad).sample

    graph, static_out = capture_cuda_graph(step, warmup=3)
    for i in (20, 5, 0):
        static_idx.fill_(i)
        static_x.copy_(x * (1 + i / 100))
        graph.replay()
        with torch.no_grad():
            ref = ddim_step(model, x * (1 + i / 100), i, s, guide=guide).sample
        torch.testing.assert_close(static_out, ref, rtol=1e-5, atol=1e-5)


def test_ddim_eta_one_few_steps_float32_stays_finite():
    # 1 - abar_prev - sigma^2 is ~4e-9 at t=999 after t=0: in float32 it cancelled below 0 (NaN samples)
    s = Schedule.create("linear", 1000, "2")
    gen = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    out = ddim_step(None, x, 1, s, eta=1.0, model_output=eps, noise=noise)
    want = ddim_step(None, x.double(), 1, s, eta=1.0, model_output=eps.double(), noise=noise.double())
    assert torch.isfinite(out.sample).all()
    torch.testing.assert_close(out.sample.double(), want.sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [ddim_step, ddpm_step])
def test_denoised_fn_must_keep_pred_xstarts_shape(step):
    # a denoised_fn returning [B, 1, H, W] was broadcast into the mean / eps of every channel, silently
    s = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"denoised_fn must return a tensor shaped like pred_xstart \(2, 3, 4, 4\)"):
        step(FakeModel(), x, 3, s, denoised_fn=lambda x0: x0.mean(1, keepdim=True))
    out = step(FakeModel(), x, 3, s, denoised_fn=lambda x0: 0.5 * x0.double())
    want = step(FakeModel(), x, 3, s, denoised_fn=lambda x0: 0.5 * x0)
    assert out.sample.dtype == x.dtype
    torch.testing.assert_close(out.pred_xstart, want.pred_xstart)


@pytest.mark.parametrize("learned", [False, True])
def test_ddpm_on_a_one_step_schedule(learned):
    # fixed_large reads posterior_variance[1], which a 1-step schedule lacks: sample_loop raised an IndexError,
    # the fast path a size mismatch (it builds the fixed_large table for C outputs whatever the model gives)
    s = Schedule.create("linear", 1000, "1")
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    guide = lambda x, t: torch.full_like(x, 0.5)
    ref = sample_loop(FakeModel(learned), x_T, s, sampler="ddpm", guide=guide)
    fast = fast_sampling.fast_sample_loop(FakeModel(learned), x_T, s, sampler="ddpm", guide=guide)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    if not learned:  # fixed_large at the only step: its beta scales the grad
        out = ddpm_step(FakeModel(False), x_T, 0, s, grad=torch.ones_like(x_T), var_type="fixed_large")
        unguided = ddpm_step(FakeModel(False), x_T, 0, s, var_type="fixed_large")
        torch.testing.assert_close(out.mean - unguided.mean, torch.full_like(x_T, float(s.betas[0])))


@pytest.mark.parametrize("eta", [float("inf"), float("-inf"), float("nan"), -0.5, "1"])
def test_eta_must_be_finite_nonnegative(eta):
    # eta=inf used to run and return NaN samples with no error
    s = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample_loop(lambda x, t: torch.zeros_like(x), x, s, eta=eta)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_step(None, x, 3, s, eta=eta, model_output=torch.zeros_like(x))
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ops.build_table(s, "ddim", eta=eta)


@pytest.mark.parametrize("eta", [np.float32(0.5), np.array(0.5), np.array([0.5]), torch.tensor([0.5])])
def test_eta_of_any_numeric_kind_samples_as_its_float(eta):
    # a numpy array eta was refused by one path and multiplied as an array by another
    assert sampling.eta_value(eta) == 0.5
    s = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.1 * x

    def run(loop, e):
        return loop(model, x, s, eta=e, generator=torch.Generator().manual_seed(1))

    for loop in (sample_loop, fast_sampling.fast_sample_loop):
        out = run(loop, eta)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, run(loop, 0.5), rtol=0, atol=0)
    got, want = ops.build_table(s, "ddim", eta=eta), ops.build_table(s, "ddim", eta=0.5)
    assert got.mode == want.mode
    torch.testing.assert_close(got.coefs, want.coefs, rtol=0, atol=0)


def test_dtype_for_a_given_x_T_of_another_dtype_is_refused():
    # dtype= was ignored silently when x_T was given
    s = Schedule.create("linear", 1000, "ddim2")
    x = torch.randn(1, 3, 4, 4)
    model = lambda x, t: 0.1 * x
    for loop in (sample_loop, fast_sampling.fast_sample_loop):
        with pytest.raises(ValueError, match=r"dtype=torch.float64 is for a drawn x_T, but x_T was given in "
                                             r"torch.float32"):
            loop(model, x, s, dtype=torch.float64)
        assert loop(model, x, s, dtype=torch.float32).dtype == torch.float32  # the same dtype: fine
        assert loop(model, x.double(), s).dtype == torch.float64
        assert loop(model, (1, 3, 4, 4), s).dtype == torch.float32  # drawn: float32 by default
        assert loop(model, (1, 3, 4, 4), s, dtype=torch.float64).dtype == torch.float64


def test_eta_value_refuses_what_is_no_number():
    for bad in (True, "0.5", np.array([0.5, 0.5]), torch.tensor([0.5, 0.5]), np.array(["a"]), torch.tensor(True),
                None, complex(1, 0)):
        assert sampling.eta_value(bad) is None, bad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_first_non_finite_tracks_on_the_device_without_host_sync(device):
    stages = ("the guidance gradient", "the denoiser's output (eps)")
    tracker = sampling.FirstNonFinite(torch.device(device), stages)
    finite, bad = torch.ones(4, 3, device=device), torch.ones(4, 3, device=device)
    bad[2, 1] = float("nan")
    t = torch.tensor([500, 500], device=device)
    calls = [lambda: tracker.see(stages[0], finite, 0, t), lambda: tracker.see(stages[1], finite, 0, t),
             lambda: tracker.see(stages[1], bad, 1, t), lambda: tracker.see(stages[0], bad, 2, t)]
    if device == "cuda":
        assert_no_host_sync(calls)  # each see: device-side compare and copy only
    else:
        [c() for c in calls]
    assert all(v.device.type == device for v in tracker.first.values())
    assert [int(v) for v in tracker.first.values()] == [2, 1]
    assert tracker.describe(3) == "the denoiser's output (eps) went non-finite first, at step 2 of 3 (t=500)"
    tracker.see(stages[0], bad, 0, t)  # a stage keeps its first step
    assert [int(v) for v in tracker.first.values()] == [2, 1]
    mixed = sampling.FirstNonFinite(torch.device(device), stages)
    mixed.see(stages[0], bad, 0, torch.tensor([7, 9], device=device))  # a mixed-timestep batch: every t
    assert mixed.describe(3) == "the guidance gradient went non-finite first, at step 1 of 3 (t=[7, 9])"


def test_step_index_takes_numpy_integers():
    """ddim_step / ddpm_step refused np.int64(2) ('got int64') where an int works; numpy int arrays act as tensors."""
    import numpy as np

    sched = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(3, 1, 4, 4)

    def model(x, t):
        return torch.zeros_like(x)

    noise = torch.randn_like(x)
    for step, kw in ((ddim_step, {}), (ddpm_step, {"noise": noise})):
        want = step(model, x, 2, sched, **kw).sample
        for idx in (np.int64(2), np.int32(2), np.full(3, 2, dtype=np.int64)):
            assert torch.equal(step(model, x, idx, sched, **kw).sample, want)
        with pytest.raises(ValueError, match="index must be an integer tensor"):
            step(model, x, np.full(3, 2.0), sched)
        with pytest.raises(ValueError, match=r"index 5 out of range \[0, 5\)"):
            step(model, x, np.int64(5), sched)


def test_step_index_numpy_values_go_through_the_guides_helper():
    """_index_tensor converted numpy values inline: a 0-d numpy int array took the tensor path ('index out of
    range' without the value) where experts.bank.as_int_or_tensor, used by FastGuidedSampler and the guides, makes
    it an int; numpy floats / bools still give the tensor dtype error."""
    import numpy as np

    sched = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(3, 1, 4, 4)

    def model(x, t):
        return torch.zeros_like(x)

    assert torch.equal(ddim_step(model, x, np.array(2), sched).sample, ddim_step(model, x, 2, sched).sample)
    for idx in (np.array(5), np.int64(5)):
        with pytest.raises(ValueError, match=r"index 5 out of range \[0, 5\)"):
            ddim_step(model, x, idx, sched)
    for idx, dt in ((np.float64(2), "float64"), (np.bool_(True), "bool"), (np.array(2.0), "float64")):
        with pytest.raises(ValueError, match=f"index must be an integer tensor, got torch.{dt}"):
            ddim_step(model, x, idx, sched)


def test_a_guide_that_never_gives_a_gradient_is_reported():
    """None is "no gradient at this step"; a guide returning it at every step sampled unguided without a word."""
    import warnings

    s = Schedule.create("linear", 1000, "ddim4")
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="the guide returned no gradient \\(None\\) at all 4 steps: the samples "
                                            "are unguided"):
        out = sample_loop(FakeModel(), x_T, s, guide=lambda x, t: None)
    assert torch.equal(out, sample_loop(FakeModel(), x_T, s))
    late = lambda x, t: None if int(t[0]) >= 300 else torch.zeros_like(x)  # guided at some steps: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_loop(FakeModel(), x_T, s, guide=late)


def _guided_diffusion_loop(x_T, noises, respacing, sampler, var_type, clip, eta, model, guide):
    """guided-diffusion's sampling loop in numpy float64, its tables rebuilt here from np.linspace (linear
    schedule over 1000 steps) and its respacing rules: independent of ppap_fast.schedule / sampling."""
    acp_base = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sizes, keep = [1000 // len(respacing) + (i < 1000 % len(respacing)) for i in range(len(respacing))], []
    for size, count, start in zip(sizes, respacing, np.cumsum([0] + sizes[:-1])):
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        keep += [int(start) + round(j * stride) for j in range(count)]
    keep = sorted(set(keep))
    ac = acp_base[keep]
    acp = np.append(1.0, ac[:-1])
    b = 1 - ac / acp
    pv = b * (1 - acp) / (1 - ac)
    pvl = np.log(np.append(pv[1], pv[1:]))
    x = x_T.numpy().copy()
    for i in range(len(keep) - 1, -1, -1):
        t = torch.full((x.shape[0],), keep[i])
        out = model(torch.from_numpy(x), t).numpy()
        c = x.shape[1]
        eps, v = out[:, :c], (out[:, c:] if out.shape[1] == 2 * c else None)
        x0 = np.sqrt(1 / ac[i]) * x - np.sqrt(1 / ac[i] - 1) * eps
        x0 = np.clip(x0, -1, 1) if clip else x0
        grad = None if guide is None else guide(torch.from_numpy(x), t).numpy()
        if sampler == "ddpm":
            log_var = {"learned_range": lambda: (v + 1) / 2 * np.log(b[i]) + (1 - v) / 2 * pvl[i],
                       "fixed_small": lambda: np.full_like(x, pvl[i]),
                       "fixed_large": lambda: np.full_like(x, np.log(np.append(pv[1], b[1:])[i]))}[var_type]()
            var = np.full_like(x, pv[i]) if var_type == "fixed_small" else np.exp(log_var)
            mean = b[i] * np.sqrt(acp[i]) / (1 - ac[i]) * x0 + (1 - acp[i]) * np.sqrt(1 - b[i]) / (1 - ac[i]) * x
            mean = mean if grad is None else mean + var * grad
            x = mean + (i != 0) * np.exp(0.5 * log_var) * noises[i]
        else:
            if grad is not None:
                e = (np.sqrt(1 / ac[i]) * x - x0) / np.sqrt(1 / ac[i] - 1) - np.sqrt(1 - ac[i]) * grad
                x0 = np.sqrt(1 / ac[i]) * x - np.sqrt(1 / ac[i] - 1) * e
            e = (np.sqrt(1 / ac[i]) * x - x0) / np.sqrt(1 / ac[i] - 1)
            sigma = eta * np.sqrt((1 - acp[i]) / (1 - ac[i])) * np.sqrt(1 - ac[i] / acp[i])
            x = x0 * np.sqrt(acp[i]) + np.sqrt(1 - acp[i] - sigma ** 2) * e + (i != 0) * sigma * noises[i]
    return torch.from_numpy(x)


@pytest.mark.parametrize("loop", [sample_loop, fast_sampling.fast_sample_loop])
@pytest.mark.parametrize("sampler,var_type,clip,eta,learned", [
    ("ddim", None, False, 0.0, True), ("ddim", None, True, 0.7, False), ("ddim", None, False, 1.0, True),
    ("ddpm", "learned_range", False, 0.0, True), ("ddpm", "fixed_small", True, 0.0, True),
    ("ddpm", "fixed_large", False, 0.0, False)])
def test_whole_loops_off_the_golden_match_guided_diffusions_formulas(one_thread, loop, sampler, var_type, clip,
                                                                      eta, learned):
    """The goldens cover 'ddim25' / '50', learned_range, clip_denoised and eta 0 only: section respacing, the
    fixed variances, clip_denoised=False, eta > 0 and C-channel models, guided, against a float64 re-derivation."""
    respacing = [5, 3, 2]  # "5,3,2": sections of 334, 333, 333 steps; 83.25 and 166.5 rounded
    s = Schedule.create("linear", 1000, ",".join(map(str, respacing)))
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen) * 1.5
    noises = {i: torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen) for i in range(s.num_timesteps)}
    model = FakeModel(learned=learned, scale=3.0)
    guide, _ = _lin_guide(scale=5.0)
    want = _guided_diffusion_loop(x_T, {i: n.numpy() for i, n in noises.items()}, respacing, sampler,
                                  var_type or ("learned_range" if learned else "fixed_large"), clip, eta, model, guide)
    got = loop(model, x_T.clone(), s, sampler=sampler, guide=guide, var_type=var_type, clip_denoised=clip, eta=eta,
               noise_fn=lambda i, x: noises[i])
    assert s.timestep_map.tolist() == [0, 83, 166, 250, 333, 334, 500, 666, 667, 999]
    assert torch.isfinite(want).all() and (want - x_T).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_model_kwargs_not_a_mapping_is_named_in_one_line():
    """model_kwargs=[...] raised 'list' object has no attribute 'items' (sample_loop) or Python's 'argument after **
    must be a mapping' (the steps); the message is the one FastGuidedSampler gives."""
    s = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(2, 3, 4, 4)
    msg = r"^model_kwargs must be a dict of the denoiser's keyword arguments \(e\.g\. \{'y': labels\}\), got list$"
    with pytest.raises(TypeError, match=msg):
        sample_loop(FakeModel(), x, s, model_kwargs=[("y", 1)])
    for step in (ddim_step, ddpm_step):
        with pytest.raises(TypeError, match=msg):
            step(FakeModel(), x, 3, s, model_kwargs=[1])
