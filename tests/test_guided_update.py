"""Fused guided update: every backend against the float64 reference."""
import itertools

import pytest
import torch

from ppap_fast import ops
from ppap_fast.ops import update as gu
from ppap_fast.schedule import Schedule

from _util import assert_close_rel, poison_allocator, rel_err

CONFIGS = [
    ("ddim", 0.0, "learned_range", "ddim25"),
    ("ddim", 0.7, "learned_range", "50"),
    ("ddpm", 0.0, "learned_range", "50"),
    ("ddpm", 0.0, "fixed_small", "250"),
    ("ddpm", 0.0, "fixed_large", None),
]
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
    gen = torch.Generator().manual_seed(hash((cfg, str(dtype))) % 2**31)
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
                assert_close_rel(got_s, want_s, TOL[dtype], what + " sample")
                assert_close_rel(got_p, want_p, TOL[dtype], what + " pred_xstart")
                checked += 1
    assert checked > 0, "no fast backend ran: the extension should be built in this environment"


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
        assert not torch.allclose(a, b)


def test_bad_inputs():
    sched = Schedule.create("linear", 1000, "ddim25")
    table = gu.build_table(sched, "ddim")
    x = torch.randn(2, 3, 4, 4)
    idx = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="eps shape"):
        ops.guided_update(x, torch.randn(2, 3, 4, 5), idx, table)
    with pytest.raises(ValueError, match="idx"):
        ops.guided_update(x, x, idx.int(), table)
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
        with pytest.raises(RuntimeError, match="outside"):
            ops.guided_update(x, x, torch.tensor([1, 25]), table, backend="cpp")


def test_backend_report_names_every_path():
    rep = ops.backend_report("cpu")
    assert set(rep["ops"]["guided_update"]["available"]) == {"reference", "cpp", "cuda", "triton"}
    assert rep["ops"]["guided_update"]["available"]["reference"] == "ok"
    with pytest.raises(ValueError):
        ops.set_backend("fastest")
