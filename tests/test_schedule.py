import math
from dataclasses import fields

import numpy as np
import pytest
import torch

from ppap_fast.schedule import Schedule, extract, get_named_beta_schedule, space_timesteps


def test_linear_betas_bitwise_numpy_linspace():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == torch.float64
    assert np.array_equal(b.numpy(), np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    b250 = get_named_beta_schedule("linear", 250)  # scaled by 1000/T
    assert np.array_equal(b250.numpy(), np.linspace(4e-4, 0.08, 250, dtype=np.float64))


def test_cosine_schedule():
    T = 1000
    b = get_named_beta_schedule("cosine", T)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    acp = torch.cumprod(1 - b, 0)
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(acp[:-1], expected, rtol=1e-10, atol=1e-12)
    assert b[-1] == 0.999  # max_beta clip
    assert bool((b > 0).all()) and bool((b[1:] >= b[:-1]).all())
    with pytest.raises(ValueError, match="schedule"):
        get_named_beta_schedule("quadratic", T)


def test_respacing_ddim25():
    steps = space_timesteps(1000, "ddim25")
    assert steps == list(range(0, 1000, 40)) and steps[-1] == 960 and len(steps) == 25
    s = Schedule.create("linear", 1000, "ddim25")
    assert s.timestep_map.tolist() == steps and s.num_timesteps == 25
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")  # no integer stride gives 600 steps
    for bad in ("abc", "ddimx", "10,,5"):  # int()'s "invalid literal" named neither the option nor its forms
        with pytest.raises(ValueError, match=f"respacing must be 'ddimN' or comma-separated step counts.*{bad!r}"):
            Schedule.create("linear", 1000, bad)
    with pytest.raises(ValueError, match="at least one step"):  # it said "timesteps must lie in [0, T)"
        Schedule.create("linear", 1000, "0")


def test_respacing_ddim1_names_the_single_step_spelling():
    """'ddim1' fails as in guided-diffusion (its strides stop at T - 1; only stride T gives one step) but the error
    did not say that '1' gives the single step."""
    with pytest.raises(ValueError, match=r"exactly 1 steps .* from 1000 \(strides stop at T - 1.*use respacing '1'"):
        Schedule.create("linear", 1000, "ddim1")
    assert Schedule.create("linear", 1000, "1").timestep_map.tolist() == [0]
    with pytest.raises(ValueError, match=r"^cannot create exactly 600 steps with an integer stride from 1000$"):
        space_timesteps(1000, "ddim600")  # other counts: the message as before


def test_respacing_sections():
    s250 = space_timesteps(1000, "250")
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    assert s250[:4] == [0, 4, 8, 12]  # stride 999/249 = 4.012, rounded
    s = space_timesteps(1000, "10,10,5")
    assert len(s) == 25
    assert s[:10] == list(range(0, 334, 37))  # section 0: [0, 334), stride 333/9 = 37
    assert s[10] == 334 and s[19] == 666  # section 1: [334, 667), ends at its last step
    assert s[20:] == [667, 750, 833, 916, 999]  # section 2: stride 332/4 = 83
    assert space_timesteps(1000, [10, 10, 5]) == s
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


def test_respaced_tables_consistent_with_base():
    base = Schedule.create("linear", 1000)
    s = Schedule.create("linear", 1000, "50")
    keep = s.timestep_map
    torch.testing.assert_close(s.alphas_cumprod, base.alphas_cumprod[keep], rtol=1e-13, atol=0)
    assert s.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=0, atol=0)
    # guided-diffusion's clipped log-variance: entry 0 takes entry 1
    assert s.posterior_log_variance_clipped[0] == math.log(s.posterior_variance[1])
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())
    assert s.original_num_timesteps == 1000


def test_tables_match_golden(fixtures_dir):
    g = torch.load(fixtures_dir / "guided_steps_golden.pt", weights_only=True)
    for name in ("ddim", "ddpm"):
        s = Schedule.create("linear", 1000, g[f"{name}_respacing"])
        assert torch.equal(s.timestep_map, g[f"{name}_timestep_map"])
        assert torch.equal(s.betas, g[f"{name}_betas"])
        assert torch.equal(s.alphas_cumprod, g[f"{name}_alphas_cumprod"])
    torch.testing.assert_close(get_named_beta_schedule("linear", 1000), g["base_betas"], rtol=0, atol=1e-15)


def test_q_sample():
    s = Schedule.create("linear", 1000, "ddim25")
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    idx = torch.tensor([0, 12, 24])
    out = s.q_sample(x0, idx, noise)
    base_acp = Schedule.create("linear", 1000).alphas_cumprod
    a = base_acp[torch.tensor([0, 480, 960])].float().view(3, 1, 1, 1)  # respaced index -> original t
    torch.testing.assert_close(out, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert (out[2] - x0[2]).abs().mean() > 0.5  # t=960 is mostly noise
    with pytest.raises(ValueError, match="noise"):
        s.q_sample(x0, idx, torch.randn(2, 3, 8, 8))


def test_extract_and_to():
    s = Schedule.create("linear", 100)
    like = torch.zeros(2, 3, 4, 4)
    e = extract(s.betas, torch.tensor([0, 99]), like)
    assert e.shape == (2, 1, 1, 1) and e.dtype == torch.float32
    assert e[1].item() == pytest.approx(0.2 * 1.0, rel=1e-6)  # linear end scaled by 1000/100
    with pytest.raises(ValueError, match="t must have shape"):
        extract(s.betas, torch.tensor([1, 2, 3]), like)
    m = s.to("meta")
    assert m.betas.device.type == "meta" and m.timestep_map.device.type == "meta"
    # a dtype converted every table: the denoiser got float timesteps, the tables lost float64
    with pytest.raises(TypeError, match="Schedule.to takes a device, got the dtype torch.float32"):
        s.to(torch.float32)


def test_from_betas_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_betas(torch.tensor([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match="betas"):
        Schedule.from_betas(torch.tensor([[0.1]]))
    with pytest.raises(ValueError, match=r"betas must be a non-empty 1-D tensor with values in \(0, 1\)"):
        Schedule.from_betas(torch.tensor([0.1, 1.0]))  # alphas_cumprod 0: inf tables, every sample NaN
    with pytest.raises(ValueError, match="non-empty"):
        Schedule.from_betas(torch.tensor([]))  # a schedule of no steps: sampling returned x_T
    betas = torch.tensor([0.1, 0.2, 0.3])  # a timestep map that is no respacing of T = 10 (it was accepted)
    assert Schedule.from_betas(betas, [0, 4, 9], 10).timestep_map.tolist() == [0, 4, 9]
    for bad in ([0, 9, 4], [0, 4, 4], [-1, 4, 9], [0, 4, 10]):
        with pytest.raises(ValueError, match=r"timestep_map must be strictly increasing original timesteps in \[0, 10\)"):
            Schedule.from_betas(betas, bad, 10)


def test_linear_schedule_few_timesteps():
    # T = 20 made the last beta exactly 1 (alphas_cumprod 0): every sample came out NaN, blamed on the
    # denoiser; T < 20 said only 'betas must be ... in (0, 1]'
    for T in (1, 10, 20):
        with pytest.raises(ValueError, match=rf"linear schedule needs num_timesteps > 20 .*got {T}"):
            Schedule.create("linear", T)
    s = Schedule.create("linear", 21)
    assert bool(torch.isfinite(s.sqrt_recip_alphas_cumprod).all())
    assert Schedule.create("cosine", 10).num_timesteps == 10
    # a numpy int is an int; a bool is not
    s = Schedule.create("linear", np.int64(50), "10")
    assert s.num_timesteps == 10 and type(s.original_num_timesteps) is int
    with pytest.raises(ValueError, match="num_timesteps must be a positive int"):
        get_named_beta_schedule("linear", True)


def test_respacing_as_an_array():
    # np.array([5, 5]) failed with 'truth value of an array ... is ambiguous', a tensor as 'must be ints'
    want = Schedule.create("linear", 1000, "5,5").timestep_map.tolist()
    for r in (np.array([5, 5]), torch.tensor([5, 5]), (5, 5)):
        assert Schedule.create("linear", 1000, r).timestep_map.tolist() == want
    with pytest.raises(ValueError, match="section counts must be ints"):
        Schedule.create("linear", 1000, torch.tensor([5.0]))


def test_respaced_timesteps_must_be_ints():
    # 500.7 was truncated to 500 silently
    b = get_named_beta_schedule("linear", 1000)
    for ok in ([0, 500, 999], torch.tensor([0, 500, 999]), np.array([0, 500, 999])):
        assert Schedule.respaced(b, ok).timestep_map.tolist() == [0, 500, 999]
    with pytest.raises(ValueError, match="respaced timesteps must be ints"):
        Schedule.respaced(b, [0, 500.7, 999])
    with pytest.raises(ValueError, match="timestep_map must hold integer timesteps"):
        Schedule.from_betas(torch.tensor([0.1, 0.2]), [0, 4.5], 10)
    assert Schedule.from_betas(torch.tensor([0.1, 0.2]), np.array([0, 4]), 10).timestep_map.tolist() == [0, 4]


def test_respacing_as_int():
    # an int respacing raised "'int' object is not iterable"; it means the same as its string
    assert Schedule.create("linear", 1000, 25).timestep_map.tolist() == \
        Schedule.create("linear", 1000, "25").timestep_map.tolist()
    full = Schedule.create("linear", 1000, 1000)
    assert torch.equal(full.betas, Schedule.create("linear", 1000).betas)
    assert space_timesteps(1000, 10) == space_timesteps(1000, "10")
    with pytest.raises(ValueError, match="section counts must be ints"):
        Schedule.create("linear", 1000, [2.5])
    # a float (a config's 25.0) raised TypeError "'float' object is not iterable"
    for bad in (25.0, np.float64(25)):
        with pytest.raises(ValueError, match="respacing must be an int step count, 'ddimN' or comma-separated"):
            Schedule.create("linear", 1000, bad)


def test_q_sample_checks_t_and_x_start():
    # t = -1 silently read the last step's table; a float t or an integer x_start failed deep in indexing / randn
    s = Schedule.create("linear", 1000, "10")
    x0 = torch.zeros(2, 3)
    for bad in ([0, -1], [0, 10]):
        with pytest.raises(ValueError, match=r"t must be step indices in \[0, 10\)"):
            s.q_sample(x0, torch.tensor(bad))
    with pytest.raises(ValueError, match="t must hold integer step indices"):
        s.q_sample(x0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="x_start must be a floating tensor"):
        s.q_sample(x0.long(), torch.tensor([0, 1]))
    noise = torch.ones(2, 3)
    out = s.q_sample(x0, torch.tensor([0, 9]), noise)
    torch.testing.assert_close(out[:, 0].double(), s.sqrt_one_minus_alphas_cumprod[[0, 9]])


def test_schedule_names_come_from_one_list(monkeypatch):
    """guided-sample's --schedule choices and ADM flags' noise_schedule check each wrote ("linear", "cosine") out:
    both read schedule.SCHEDULE_NAMES, so a schedule added there is taken everywhere."""
    from ppap_fast import schedule
    from ppap_fast.cli import _parser
    from ppap_fast.models.adm import _flags_schedule

    assert _parser().parse_args(["guided-sample", "--out", "o.npz", "--schedule", "cosine"]).schedule == "cosine"
    with pytest.raises(ValueError, match=r"^noise_schedule='extra': ppap_fast samples the schedules "
                                         r"\['linear', 'cosine'\] only$"):
        _flags_schedule({"noise_schedule": "extra"})
    monkeypatch.setattr(schedule, "SCHEDULE_NAMES", ("linear", "cosine", "extra"))
    assert _parser().parse_args(["guided-sample", "--out", "o.npz", "--schedule", "extra"]).schedule == "extra"
    assert _flags_schedule({"noise_schedule": "extra", "diffusion_steps": "500"}) == ("extra", 500)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_a_respacing_that_keeps_every_step_is_the_base_schedule_bit_for_bit(name):
    """respacing=[1000] (a list) recomputed the betas from alphas_cumprod (1 - abar_t / abar_t-1): they differed from
    the base's in the last bit, while the string "1000" returned the base."""
    base = Schedule.create(name, 1000)
    for respacing in ("1000", 1000, [1000], (1000,), np.array([1000]), "ddim1000", "500,500", [500, 500]):
        s = Schedule.create(name, 1000, respacing)
        for f in fields(Schedule):
            a, b = getattr(s, f.name), getattr(base, f.name)
            assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(a, torch.Tensor) else a == b, \
                (respacing, f.name)
    s = Schedule.respaced(get_named_beta_schedule(name, 1000), range(1000))
    assert torch.equal(s.betas, base.betas) and torch.equal(s.posterior_log_variance_clipped,
                                                            base.posterior_log_variance_clipped)
