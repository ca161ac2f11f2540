"""Helpers shared by parity tests."""
from __future__ import annotations

import contextlib

import pytest
import torch

_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def requires_cuda(test):
    """Skip without CUDA, and mark ``cuda`` so that ``pytest -m cuda`` (benchmarks/gpu_check.sh) selects it."""
    return pytest.mark.cuda(_skip_without_cuda(test))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error of a against reference b, computed in float64. NaN/Inf -> inf."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    if a64.shape != b64.shape:
        raise AssertionError(f"shape {tuple(a64.shape)} != reference {tuple(b64.shape)}")
    if not torch.isfinite(a64).all():
        return float("inf")
    denom = b64.norm().item()
    return (a64 - b64).norm().item() / max(denom, 1e-30)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error of a against b; both must be finite."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close_rel(a, b, tol: float, what: str = ""):
    err = rel_err(a, b)
    assert tol == tol and tol < float("inf"), f"{what}: tolerance {tol} is not finite (a non-finite reference?)"
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison_allocator(device, nbytes: int = 64 << 20) -> None:
    """Fill and free NaN blocks so that the next allocations likely reuse NaN-filled memory: one large
    block, and two of every power-of-two size from 16 B to 16 MiB (one large block alone poisoned 4 of
    18 CPU outputs: glibc returns it to the OS; CUDA's caching allocator keeps blocks under 1 MiB in a
    separate pool)."""
    blocks = [torch.full((nbytes // 4,), float("nan"), dtype=torch.float32, device=device)]
    for k in range(4, 25):
        blocks += [torch.full(((1 << k) // 4 + 17,), float("nan"), dtype=torch.float32, device=device)
                   for _ in range(2)]
    del blocks


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def randomise_bank(bank, std: float = 0.2):
    """Random non-zero per-expert tensors (LoRA, biases, norm affine; positive running_var)."""
    with torch.no_grad():
        for name, t in bank.per_expert_state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            else:
                t.normal_(0, std)
    return bank


def randomise_bn(model, affine: bool = True):
    """Random running statistics of every nn.BatchNorm2d (so eval-mode BN is not ~identity) and,
    with affine, random weight and bias."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if affine:
                    m.weight.normal_(1, 0.3)
                    m.bias.normal_(0, 0.3)
    return model


def assert_no_host_sync(calls) -> None:
    """Run each callable once to warm up, then again with CUDA sync debugging set to error."""
    for c in calls:  # warm-up: lazy inits may sync
        c()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in calls:
            c()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def distill_crashing(monkeypatch, cfg, steps: int = 3) -> None:
    """Single-process D.distill(cfg) with the test kill switch: it must raise SimulatedCrash after
    `steps` steps; the step count is unset again afterwards (the scope stays 'raise')."""
    from ppap_fast import distributed as D

    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", str(steps))
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(D.SimulatedCrash):
        D.distill(cfg, D.DistEnv())
    monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")


@contextlib.contextmanager
def poisoned_kernels(*modules):
    """Buffers the kernels of ``modules`` fully overwrite start as NaN (their POISON flag) while
    inside; on the way out the flags come back and the global op backend is automatic again."""
    from ppap_fast import ops

    old = [m.POISON for m in modules]
    for m in modules:
        m.POISON = True
    try:
        yield
    finally:
        for m, v in zip(modules, old):
            m.POISON = v
        ops.set_backend(None)


def capture_cuda_graph(step, warmup: int = 2):
    """``step()`` run ``warmup`` times on a side stream (lazy init, autotuning, Triton compiles), then
    captured: (graph, what the captured call returned: static outputs that every replay rewrites)."""
    from ppap_fast.train_graph import capture_after_warmup

    return capture_after_warmup(step, warmup)


class LaunchRecorder:
    """Stands in for a Triton kernel (monkeypatched over it): records each launch's grid and
    arguments, runs nothing (checks launch grids at sizes the interpreter would take minutes for);
    with ``kernel``, also launches it (counts the launches of a run)."""

    def __init__(self, kernel=None):
        self.launches = []
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((tuple(grid), args))
            if self.kernel is not None:
                self.kernel[grid](*args, **kwargs)

        return launch


def assert_chunked_launches_cover(rec: "LaunchRecorder", n: int, axis: int = 1):
    """Every launch's grid is within CUDA's limits and the launches, each taking its first item as its
    last positional argument and grid[axis] items from there, cover items 0..n-1 once, in order."""
    assert rec.launches
    covered = []
    for grid, args in rec.launches:
        assert_grid_within_cuda_limits(grid)
        covered += range(args[-1], args[-1] + grid[axis])
    assert covered == list(range(n))


def assert_grid_within_cuda_limits(grid):
    """CUDA launch grids: axis 0 up to 2^31 - 1 blocks, axes 1 and 2 up to 65535."""
    assert 1 <= grid[0] <= 2**31 - 1 and all(1 <= g <= 65535 for g in grid[1:]), \
        f"grid {grid} exceeds CUDA's limits (2^31 - 1 on axis 0, 65535 on axes 1 and 2)"


def randn_channels_last(shape, dtype, seed, device="cpu"):
    """randn(shape) from its own seed, in dtype, channels_last (the fused ADM's activations)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device).contiguous(memory_format=torch.channels_last)


TINY_ADM = dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                attention_resolutions=(), channel_mult=(1, 2), use_scale_shift_norm=True)


def tiny_adm(**kw):
    """A tiny 2-level ADMUNet (TINY_ADM, overridden by kw), eval mode, every parameter nudged off its
    init (its output convs start at zero)."""
    from ppap_fast.models import ADMUNet

    torch.manual_seed(3)
    m = ADMUNet(**{**TINY_ADM, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # un-zero the output convs
    return m


def assert_removes_only_its_own_temporaries(folder, name: str, suffix: str, other_suffix: str, run):
    """Plants ``_atomic``-named temporaries of ``name`` (8 chars of [a-z0-9_], then ``suffix``) and a user's
    look-alikes (another tag or ``other_suffix``) in ``folder``, calls ``run()`` and checks only the first are
    gone; returns what ``run()`` returned."""
    ours = [f".{name}.abcd1234{suffix}.tmp", f".{name}.k2j4x_9z{suffix}.tmp"]
    theirs = [f".{name}.mine.tmp", f".{name}.abcd1234{other_suffix}.tmp", f".{name}.abcd12345{suffix}.tmp"]
    for n in ours + theirs:
        (folder / n).write_text("x")
    result = run()
    assert sorted(p.name for p in folder.glob("*.tmp")) == sorted(theirs)
    return result
