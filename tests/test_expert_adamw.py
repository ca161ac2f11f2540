"""ExpertAdamW: torch.optim.AdamW on stacked [N, ...] tensors with one step count per expert."""
import io

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from ppap_fast.experts import ExpertAdamW

from _util import requires_cuda

N = 5
MASKS = [[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 1, 1, 0, 1], [1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]


def _params(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, 4, 3, generator=g, dtype=dtype).to(device).requires_grad_(),
            torch.randn(N, 6, generator=g, dtype=dtype).to(device).requires_grad_()]


def _grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]


def _set_lr(opt, lr):
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _run(opt, params, steps, masks=None, first=0):
    for k in range(first, first + steps):
        for p, g in zip(params, _grads(params, k)):
            p.grad = g
        _set_lr(opt, 1e-2 * (1 - k / 20))
        if masks is None:
            opt.step()
        else:
            opt.step(torch.tensor(masks[k], dtype=torch.bool, device=params[0].device))


@pytest.mark.parametrize("path", ["foreach", "concatenated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("lr_tensor", [False, True])
def test_every_expert_stepping_equals_torch_adamw(dtype, amsgrad, lr_tensor, path, monkeypatch):
    """All experts sampled at every step: torch.optim.AdamW's parameters and state; bitwise for a
    float32 lr and parameters (CPU), else within 1e-6 (float64 bias corrections: 1 ulp). Both step
    paths: CPU's foreach ops, CUDA's concatenation (run here on CPU)."""
    if path == "concatenated":
        monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    ref, mine = _params(dtype), _params(dtype)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
    lr = torch.tensor(1e-2) if lr_tensor else 1e-2
    opt = ExpertAdamW(mine, N, lr=lr, weight_decay=0.05, amsgrad=amsgrad)
    _run(torch_opt, ref, 8)
    _run(opt, mine, 4)
    _run(opt, mine, 4, [[True] * N] * 8, first=4)  # an all-True mask is the same as none
    exact = dtype == torch.float32 and not lr_tensor
    for i, (a, b) in enumerate(zip(mine, ref)):
        assert torch.isfinite(a).all()
        assert not torch.equal(a, _params(dtype)[i])  # it moved
        for x, y in [(a, b)] + [(opt.state[a][k], torch_opt.state[b][k]) for k in torch_opt.state[b] if k != "step"]:
            if exact:
                assert torch.equal(x, y)
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        assert opt.state[a]["step"].tolist() == [8.0] * N and float(torch_opt.state[b]["step"]) == 8.0


def _trained_alone(n, mine, masks, dtype, **adamw_kw):
    """Expert n's slices of _params(dtype) stepped by their own torch.optim.AdamW (lr 1e-2, weight decay
    0.05, _run's lr schedule) at the steps whose mask samples n, on the gradients _run gave ``mine``:
    (parameters, optimizer)."""
    ref = [p[n].detach().clone().requires_grad_() for p in _params(dtype)]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05, **adamw_kw)
    for k, m in enumerate(masks):
        if m[n]:
            for r, g in zip(ref, _grads(mine, k)):
                r.grad = g[n]
            _set_lr(torch_opt, 1e-2 * (1 - k / 20))
            torch_opt.step()
    return ref, torch_opt


def test_each_expert_steps_as_its_own_adamw():
    """Random masks: expert n's slices equal a torch.optim.AdamW stepped only when n is sampled (its
    own step count); an expert never sampled keeps its parameters and zero moments."""
    masks = MASKS[1:5]  # expert 3 never sampled, no expert at the last step
    mine = _params(torch.float64)
    opt = ExpertAdamW(mine, N, lr=1e-2, weight_decay=0.05, amsgrad=True)
    _run(opt, mine, len(masks), masks)
    for n in range(N):
        ref, torch_opt = _trained_alone(n, mine, masks, torch.float64, amsgrad=True)
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a[n], b, rtol=1e-12, atol=1e-15)
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                want = torch_opt.state[b][k] if b in torch_opt.state else torch.zeros_like(b)
                torch.testing.assert_close(opt.state[a][k][n], want, rtol=1e-12, atol=1e-15)
        assert opt.state[mine[0]]["step"][n] == sum(m[n] for m in masks)


def test_state_dict_round_trip_resumes_bitwise():
    a = _params()
    opt_a = ExpertAdamW(a, N, lr=1e-2, weight_decay=0.05, amsgrad=True)
    _run(opt_a, a, 3, MASKS)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = ExpertAdamW(b, N, lr=0.5, weight_decay=0.05, amsgrad=True)  # lr comes from the state
    opt_b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert opt_b.state[b[0]]["step"].dtype == torch.float32 and opt_b.state[b[0]]["step"].shape == (N,)
    _run(opt_a, a, 3, MASKS, first=3)
    _run(opt_b, b, 3, MASKS, first=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert all(torch.equal(opt_a.state[x][k], opt_b.state[y][k]) for k in opt_a.state[x])


def test_refuses_a_torch_adamw_state_and_bad_inputs():
    ps = _params()
    torch_opt = torch.optim.AdamW(ps, lr=1e-2)
    _run(torch_opt, ps, 1)
    opt = ExpertAdamW(ps, N)
    with pytest.raises(ValueError, match=r"step count of shape \(\), not one per expert \[5\]"):
        opt.load_state_dict(torch_opt.state_dict())
    with pytest.raises(ValueError, match=r"stacked per-expert tensors \[4, \.\.\.\]; got one of shape \(5, 4, 3\)"):
        ExpertAdamW(ps, 4)
    with pytest.raises(ValueError, match="n_experts"):
        ExpertAdamW(ps, 0)
    with pytest.raises(ValueError, match="learning rate"):
        ExpertAdamW(ps, N, lr=-1.0)
    for bad in (torch.ones(N), torch.ones(N + 1, dtype=torch.bool), [True] * N):
        with pytest.raises(ValueError, match=r"sampled must be a bool tensor \[5\]"):
            opt.step(bad)


def test_a_refused_param_group_is_not_kept():
    """add_param_group raised on a tensor of another N but kept its group: the next step failed in a broadcast."""
    ps = _params()
    opt = ExpertAdamW(ps, N, lr=1e-2)
    other = torch.randn(N + 1, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"stacked per-expert tensors \[5, \.\.\.\]; got one of shape \(6, 4\)"):
        opt.add_param_group({"params": [other]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == ps
    other.grad = torch.ones_like(other)
    before = [p.detach().clone() for p in ps]
    _run(opt, ps, 1)
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(ps, before))


@pytest.mark.parametrize("lr", [-1.0, float("nan")])
def test_refuses_a_negative_or_nan_tensor_lr(lr):
    """A tensor lr skipped the range check of a float one (torch.optim.AdamW checks both)."""
    with pytest.raises(ValueError, match=r"invalid learning rate: (-1\.0|nan)"):
        ExpertAdamW(_params(), N, lr=torch.tensor(lr))


@pytest.mark.parametrize("as_keyword", [False, True])
def test_step_takes_a_closure_as_torch_optimizers_do(as_keyword):
    """step(closure) was refused ('sampled must be a bool tensor ..., got function'), step(closure=...) a
    TypeError: training loops written for torch.optim (LBFGS-style closures, Lightning) could not use it."""
    ref, mine = _params(), _params()
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.05)
    opt = ExpertAdamW(mine, N, lr=1e-2, weight_decay=0.05)

    def closure_of(o, ps):
        def closure():
            o.zero_grad()
            loss = sum((p * torch.arange(p.numel(), dtype=p.dtype).view(p.shape)).sin().sum() for p in ps)
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        want = torch_opt.step(closure_of(torch_opt, ref))
        got = opt.step(closure=closure_of(opt, mine)) if as_keyword else opt.step(closure_of(opt, mine))
        assert torch.isfinite(got) and torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(mine, ref))
    assert opt.step() is None


def test_refuses_the_state_of_another_bank():
    """A state of another N was blamed on torch.optim.AdamW; one of another rank (moments of other shapes)
    loaded and the next step failed in a broadcast ('size of tensor a (2) must match ... b (4)')."""
    ps = _params()
    opt = ExpertAdamW(ps, N)
    _run(opt, ps, 1)
    fewer = [p[:4].detach().clone().requires_grad_() for p in ps]
    with pytest.raises(ValueError, match=r"parameter 0 has step counts for 5 experts, this optimizer's bank has 4"):
        ExpertAdamW(fewer, 4).load_state_dict(opt.state_dict())
    wider = [torch.randn(N, 4, 5, requires_grad=True), torch.randn(N, 6, requires_grad=True)]
    other = ExpertAdamW(wider, N)
    with pytest.raises(ValueError, match=r"parameter 0 has moments of shapes \{'exp_avg': \(5, 4, 3\), 'exp_avg_sq': "
                                         r"\(5, 4, 3\)\} for a parameter of shape \(5, 4, 5\)"):
        other.load_state_dict(opt.state_dict())
    assert not other.state


class _PerTensorAdamW(ExpertAdamW):
    """The reference: ExpertAdamW's step one tensor at a time (~20 ops per tensor), as it was written."""

    @torch.no_grad()
    def step(self, sampled=None):
        on = torch.ones(self.n_experts, dtype=torch.bool) if sampled is None else sampled
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, amsgrad = group["lr"], group["eps"], group["weight_decay"], group["amsgrad"]
            for p in (q for q in group["params"] if q.grad is not None):
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros(self.n_experts)
                    for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
                        st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                on_p = on.view(-1, *([1] * (p.dim() - 1)))
                grad, exp_avg, exp_avg_sq, count = p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"]
                count.add_(on.to(count.dtype))
                t = count.double().clamp(min=1)
                step_size_neg = (-(lr / (1 - beta1 ** t))).to(p.dtype).view_as(on_p)
                bc2_sqrt = (1 - beta2 ** t).sqrt().to(p.dtype).view_as(on_p)
                new_avg = exp_avg.lerp(grad, 1 - beta1)
                new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                if amsgrad:
                    new_max = torch.maximum(st["max_exp_avg_sq"], new_avg_sq)
                    st["max_exp_avg_sq"].copy_(torch.where(on_p, new_max, st["max_exp_avg_sq"]))
                    denom = (new_max.sqrt() / bc2_sqrt).add_(eps)
                else:
                    denom = (new_avg_sq.sqrt() / bc2_sqrt).add_(eps)
                new_p = p.mul(1 - lr * wd) if wd != 0 else p.clone()
                new_p.add_(new_avg * step_size_neg / denom)
                p.copy_(torch.where(on_p, new_p, p))
                exp_avg.copy_(torch.where(on_p, new_avg, exp_avg))
                exp_avg_sq.copy_(torch.where(on_p, new_avg_sq, exp_avg_sq))


def _mixed_params(n, seed=0):
    """Float32 tensors of several ranks (one channels_last) and a float64 one (its own dtype group)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(n, 8, 3, 3, 3), (n, 5), (n,), (n, 7, 2), (n, 4, 3, 2)]
    ps = [torch.randn(s, generator=g) for s in shapes]
    ps[4] = ps[4].contiguous(memory_format=torch.channels_last)
    ps.append(torch.randn(n, 6, generator=g, dtype=torch.float64))
    return [p.requires_grad_() for p in ps]


@pytest.mark.parametrize("path", ["foreach", "concatenated"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_step_equals_the_per_tensor_reference_bitwise(path, amsgrad, wd, monkeypatch):
    """Both step paths (CPU's foreach ops; CUDA's concatenation, run here on CPU) against the per-tensor
    reference: bitwise, for N=10 experts, random masks, a tensor lr, a parameter without a gradient
    at some steps (its counts fall behind the others'), mixed ranks, dtypes and memory formats."""
    if path == "concatenated":
        monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    n = 10
    mine, ref = _mixed_params(n), _mixed_params(n)
    opt = ExpertAdamW(mine, n, lr=torch.tensor(3e-2), weight_decay=wd, amsgrad=amsgrad)
    ref_opt = _PerTensorAdamW(ref, n, lr=torch.tensor(3e-2), weight_decay=wd, amsgrad=amsgrad)
    g = torch.Generator().manual_seed(7)
    for k in range(6):
        mask = torch.rand(n, generator=g) < 0.6
        for a, b in zip(mine, ref):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype)
            b.grad = a.grad.clone()
        if k in (1, 2):
            mine[1].grad = ref[1].grad = None
        opt.step(mask)
        ref_opt.step(mask)
    assert opt.state[mine[1]]["step"].tolist() != opt.state[mine[0]]["step"].tolist()
    for a, b, a0 in zip(mine, ref, _mixed_params(n)):
        assert torch.isfinite(a).all() and not torch.equal(a, a0)
        assert torch.equal(a, b) and a.stride() == b.stride()
        assert opt.state[a].keys() == ref_opt.state[b].keys()
        for k in opt.state[a]:
            assert torch.equal(opt.state[a][k], ref_opt.state[b][k]), k


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that are not views (each one kernel, or one loop of kernels for a foreach op)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["foreach", "concatenated"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_step_issues_the_same_ops_for_any_number_of_tensors(path, amsgrad, monkeypatch):
    """A step of 12 tensors issues the ops of a step of 2: ~45 on CUDA's path (run here on CPU), where
    stepping tensor by tensor issued ~20 per tensor (~5000 kernel launches for a ResNet-50 bank);
    CPU's foreach ops, all but the rows of the experts not sampled, kept and put back per tensor (and
    none of those when every expert steps)."""
    if path == "concatenated":
        monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    counted = []
    for count in (2, 12):
        g = torch.Generator().manual_seed(count)
        ps = [torch.randn(N, 3 + i, generator=g).requires_grad_() for i in range(count)]
        opt = ExpertAdamW(ps, N, lr=torch.tensor(1e-2), weight_decay=0.05, amsgrad=amsgrad)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(torch.tensor(MASKS[1], dtype=torch.bool))  # allocates the state
        with _CountOps() as ops:
            opt.step(torch.tensor(MASKS[2], dtype=torch.bool))
        per_tensor = ((torch.ops.aten.index_select.default, torch.ops.aten.index_copy_.default) if path == "foreach"
                      else (torch.ops.aten.where.self_out,))  # foreach: kept, then put back; else masked commits
        kept = sum(f in per_tensor for f in ops.ops)
        assert kept == (3 + amsgrad) * (2 * count if path == "foreach" else 1)
        counted.append(len(ops.ops) - kept)
        if path == "foreach":
            with _CountOps() as all_on:
                opt.step()
            assert not any(f in per_tensor for f in all_on.ops)
    assert counted[0] == counted[1] and counted[0] < 50, counted


class _CountTensorCalls(TorchFunctionMode):
    """Counts the torch calls made from Python that return tensors (ops and views, not attribute reads):
    each a trip through Python and the dispatcher, what an eager step's host time is made of."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, (list, tuple)) else [out]
        if getattr(func, "__name__", "") != "__get__" and any(isinstance(x, torch.Tensor) for x in results):
            self.calls.append(func)
        return out


@pytest.mark.parametrize("amsgrad", [False, True])
def test_concatenated_step_makes_the_same_python_calls_for_any_number_of_tensors(amsgrad, monkeypatch):
    """CUDA's path (run here on CPU), after its first step: the same torch calls from Python for 24
    tensors as for 2, none per tensor (it flattened each tensor's parameter, gradient and states and
    viewed them back at each step: ~1200 views for a ResNet-50 bank's 168 tensors, an eager step 2.5x
    torch's AdamW on an H100)."""
    monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    counted = []
    for count in (2, 24):
        g = torch.Generator().manual_seed(count)
        ps = [torch.randn(N, 3, 1 + i % 3, generator=g).requires_grad_() for i in range(count)]
        opt = ExpertAdamW(ps, N, lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step(torch.tensor(MASKS[1], dtype=torch.bool))  # allocates the state
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)  # new gradients, as after zero_grad(set_to_none=True)
        with _CountTensorCalls() as calls:
            opt.step(torch.tensor(MASKS[2], dtype=torch.bool))
        counted.append(len(calls.calls))
        assert torch.isfinite(ps[0]).all()
    assert counted[0] == counted[1] and counted[0] < 60, counted


@pytest.mark.parametrize("count", [1, 2])
def test_concatenated_step_leaves_the_gradients(count, monkeypatch):
    """The concatenated path spends its flattened gradients as a work buffer: a copy, also of a single
    tensor (whose flattening is a view of its gradient), so the gradients stay as torch's AdamW leaves them."""
    monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    ps = _params()[:count]
    opt = ExpertAdamW(ps, N, lr=1e-2, weight_decay=0.05)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    grads = [p.grad.clone() for p in ps]
    opt.step()
    opt.step(torch.tensor(MASKS[1], dtype=torch.bool))
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))


def test_concatenated_step_writes_replaced_parameters_and_states(monkeypatch):
    """The concatenated path keeps views of the parameters and states between steps: after ``p.data``
    is replaced, a state tensor replaced, and load_state_dict (new state tensors), its steps land in the
    new tensors, bitwise as those of an optimizer whose tensors stayed (stale views would update memory
    nobody reads)."""
    monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    ref, mine = _params(), _params()
    ref_opt = ExpertAdamW(ref, N, lr=1e-2, weight_decay=0.05, amsgrad=True)
    opt = ExpertAdamW(mine, N, lr=1e-2, weight_decay=0.05, amsgrad=True)
    _run(ref_opt, ref, 2, MASKS)
    _run(opt, mine, 2, MASKS)
    mine[0].data = mine[0].data.clone()  # other memory
    _run(ref_opt, ref, 1, MASKS, first=2)
    _run(opt, mine, 1, MASKS, first=2)
    assert torch.equal(mine[0], ref[0])
    opt.state[mine[1]]["exp_avg_sq"] = opt.state[mine[1]]["exp_avg_sq"].clone()
    _run(ref_opt, ref, 1, MASKS, first=3)
    _run(opt, mine, 1, MASKS, first=3)
    assert torch.equal(opt.state[mine[1]]["exp_avg_sq"], ref_opt.state[ref[1]]["exp_avg_sq"])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    opt.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))  # new state tensors
    _run(ref_opt, ref, 2, MASKS, first=4)
    _run(opt, mine, 2, MASKS, first=4)
    for a, b, a0 in zip(mine, ref, _params()):
        assert torch.isfinite(a).all() and not torch.equal(a, a0)
        assert torch.equal(a, b)
        for k in ref_opt.state[b]:
            assert torch.equal(opt.state[a][k], ref_opt.state[b][k]), k


@pytest.mark.parametrize("path", ["foreach", "concatenated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_reads_nothing_back_to_the_host(path, dtype, monkeypatch):
    """What a CUDA graph cannot capture: no .item() / bool() / float() / .cpu() / .tolist() in a step
    (tensor lr and a device mask, as the captured distillation step passes them); bf16: float32 update."""
    if path == "concatenated":
        monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    ps = _params(dtype)
    opt = ExpertAdamW(ps, N, lr=torch.tensor(1e-2), weight_decay=0.05, amsgrad=True)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    masks = [torch.tensor(m, dtype=torch.bool) for m in MASKS[:3]]

    def sync(*a, **k):
        raise AssertionError("host sync in ExpertAdamW.step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for m in masks:  # the first step allocates the state, later ones update it
        opt.step(m)
    monkeypatch.undo()
    assert opt.state[ps[0]]["step"].tolist() == [2.0, 2.0, 3.0, 1.0, 2.0]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_replays_in_a_cuda_graph(dtype):
    """Captured once (tensor lr, static mask and gradients) and replayed: the eager steps, bitwise
    (bf16: its float32 coefficients and update buffers allocated in the capture)."""
    eager, graphed = _params(dtype, device="cuda"), _params(dtype, device="cuda")
    opt_e = ExpertAdamW(eager, N, lr=torch.tensor(1e-2, device="cuda"), weight_decay=0.05)
    opt_g = ExpertAdamW(graphed, N, lr=torch.tensor(1e-2, device="cuda"), weight_decay=0.05)
    _run(opt_e, eager, len(MASKS), MASKS)
    mask = torch.ones(N, dtype=torch.bool, device="cuda")
    _run(opt_g, graphed, 1, MASKS)  # eager: allocates the state
    for p in graphed:
        p.grad = p.grad.clone()  # static gradient buffers
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step(mask)
    for k in range(1, len(MASKS)):
        for p, g in zip(graphed, _grads(graphed, k)):
            p.grad.copy_(g)
        mask.copy_(torch.tensor(MASKS[k], dtype=torch.bool))
        _set_lr(opt_g, 1e-2 * (1 - k / 20))
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b) and torch.equal(opt_g.state[a]["exp_avg_sq"], opt_e.state[b]["exp_avg_sq"])
    assert opt_g.state[graphed[0]]["step"].tolist() == [4.0, 4.0, 4.0, 2.0, 4.0]


@pytest.mark.parametrize("path", ["foreach", "concatenated"])
def test_one_element_lr_of_shape_1_steps_as_a_0dim_lr(path, monkeypatch):
    """A tensor lr of shape [1] (accepted: one element) steps as a 0-dim one on both paths
    (the foreach ops take only 0-dim tensor scalars: weight decay raised on CPU)."""
    if path == "concatenated":
        monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    ref, mine = _params(), _params()
    ref_opt = ExpertAdamW(ref, N, lr=torch.tensor(1e-2), weight_decay=0.05)
    opt = ExpertAdamW(mine, N, lr=torch.tensor([1e-2]), weight_decay=0.05)
    _run(ref_opt, ref, 3, MASKS)
    _run(opt, mine, 3, MASKS)
    for a, b in zip(ref, mine):
        assert torch.equal(a, b)


def test_owner_index_read_by_a_capture_is_kept_and_one_built_in_a_capture_not_cached(monkeypatch):
    """The concatenated path's cached index (CUDA graphs, simulated on CPU): an entry a capture read
    survives the cache's eviction (freed, a graph's replays would read reused memory), and one built
    during a capture is not cached (its values exist only at replay)."""
    import itertools

    monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    params = [torch.randn(N, k + 1).requires_grad_() for k in range(4)]
    opt = ExpertAdamW(params, N, lr=1e-2)

    def step(subset, capturing):
        monkeypatch.setattr(ExpertAdamW, "_capturing", staticmethod(lambda: capturing), raising=False)
        for i, p in enumerate(params):
            p.grad = torch.ones_like(p) if i in subset else None
        opt.step()

    step((0, 1, 2, 3), False)  # the eager warm-up step
    captured = opt._owner_cache[tuple((id(p), tuple(p.shape), p.device) for p in params)]
    step((0, 1, 2, 3), True)  # the capture reads it
    for subset in itertools.combinations(range(4), 2):  # 6 more lists, then 3 more: eviction
        step(subset, False)
    for subset in itertools.combinations(range(4), 3):
        step(subset, False)
    assert any(v is captured for v in opt._owner_cache.values())
    size = len(opt._owner_cache)
    step((0,), True)  # first seen inside a capture
    assert len(opt._owner_cache) == size
    assert all(torch.isfinite(p).all() for p in params)


def test_a_capture_reads_only_the_owner_index_kept_for_it(monkeypatch):
    """The concatenated path's cached views (:class:`_FlatPlan`) hold an owner index each, their cache
    cleared on its own schedule: after the owner index cache evicted one (its size counts the indexes
    kept for captures), a capture still finds that list's views, and must read the index that
    ``_owner_index`` keeps for the graph (or builds in the capture), not the evicted one (freed with the
    views later, the replays would read reused memory)."""
    import itertools

    monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    params = [torch.randn(N, k + 1).requires_grad_() for k in range(5)]
    opt = ExpertAdamW(params, N, lr=1e-2)
    handed, read = [], []
    owner_index, flat_plan = ExpertAdamW._owner_index, ExpertAdamW._flat_plan

    def spy_owner_index(self, ps):
        owner = owner_index(self, ps)
        if self._capturing():
            handed.append(owner)
        return owner

    def spy_flat_plan(self, ps, dsts):
        plan = flat_plan(self, ps, dsts)
        if self._capturing():
            read.append(plan.owner)
        return plan

    monkeypatch.setattr(ExpertAdamW, "_owner_index", spy_owner_index)
    monkeypatch.setattr(ExpertAdamW, "_flat_plan", spy_flat_plan)

    def step(subset, capturing):
        monkeypatch.setattr(ExpertAdamW, "_capturing", staticmethod(lambda: capturing), raising=False)
        for i, p in enumerate(params):
            p.grad = torch.ones_like(p) if i in subset else None
        opt.step()

    step((0,), False)
    step((0,), True)  # its owner index kept for the graph: the index cache now evicts earlier
    subsets = [s for r in (2, 3) for s in itertools.combinations(range(5), r)]
    for subset in subsets[:15]:
        step(subset, False)
    stale = [k for k, plan in opt._flat_plans.items()
             if not any(plan.owner is v for v in opt._owner_cache.values())]
    assert stale, "no cached views with an evicted owner index: the scenario needs more lists"
    step(next(s for s in subsets if tuple(id(params[j]) for j in s) == stale[0]), True)
    assert len(read) == 2 and all(any(r is h for h in handed) for r in read)
    assert all(torch.isfinite(p).all() for p in params)


def test_capture_refuses_a_tensor_lr_on_another_device(monkeypatch):
    """A CPU tensor lr with parameters elsewhere is a scalar read when the kernels are captured: the
    replays would ignore group["lr"].fill_; refused under capture (simulated: meta parameters)."""
    params = [torch.randn(N, 3, device="meta").requires_grad_()]
    params[0].grad = torch.randn(N, 3, device="meta")
    opt = ExpertAdamW(params, N, lr=torch.tensor(1e-2))
    opt.step()  # eager: the value is read at each call, fine
    monkeypatch.setattr(ExpertAdamW, "_capturing", staticmethod(lambda: True), raising=False)
    with pytest.raises(ValueError, match="cannot be captured"):
        opt.step()


@pytest.mark.parametrize("path", ["foreach", "concatenated"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_half_precision_experts_step_as_torch_adamw_bitwise(dtype, amsgrad, path, monkeypatch):
    """bf16 / fp16 parameters: each expert's slices equal torch.optim.AdamW(foreach=False) stepped on
    them alone, bitwise (its step size and bias correction float32, the update rounded once), all
    experts sampled for 3 steps, then random masks. Rounded to the parameter dtype, the coefficients
    were up to 0.4% off in bf16."""
    if path == "concatenated":
        monkeypatch.setattr(ExpertAdamW, "_foreach_device_types", ())
    masks = [[1] * N] * 3 + MASKS[1:4] + [[1] * N]
    mine = _params(dtype)
    opt = ExpertAdamW(mine, N, lr=1e-2, weight_decay=0.05, amsgrad=amsgrad)
    _run(opt, mine, len(masks), masks)
    for n in range(N):
        ref, torch_opt = _trained_alone(n, mine, masks, dtype, amsgrad=amsgrad, foreach=False)
        for a, b, a0 in zip(mine, ref, _params(dtype)):
            assert torch.isfinite(a[n]).all() and not torch.equal(a[n], a0[n])
            assert torch.equal(a[n], b), (n, (a[n] - b).abs().max())
            for k in torch_opt.state[b]:
                if k != "step":
                    assert torch.equal(opt.state[a][k][n], torch_opt.state[b][k]), k
        assert opt.state[mine[0]]["step"][n] == sum(m[n] for m in masks)


def test_takes_torch_adamws_harmless_implementation_options_and_refuses_the_others():
    """foreach= / fused= / capturable= / maximize= / differentiable= (as a training script passes them to
    torch.optim.AdamW) were Python's bare 'unexpected keyword argument' TypeError."""
    ref, mine = _params(), _params()
    opt = ExpertAdamW(mine, N, lr=1e-2, foreach=False, fused=None, capturable=True, maximize=False,
                      differentiable=False)
    _run(torch.optim.AdamW(ref, lr=1e-2, foreach=False), ref, 3)
    _run(opt, mine, 3)
    assert all(torch.isfinite(p).all() and torch.equal(p, r) for p, r in zip(mine, ref))
    for name, value, why in (("foreach", True, "foreach=False's results"), ("fused", True, "a few ops of its own"),
                             ("maximize", True, "negate the loss instead"), ("differentiable", True, "under no_grad")):
        msg = rf"ExpertAdamW does not support {name}={value} \(.*{why}\); leave {name} unset"
        with pytest.raises(ValueError, match=msg):
            ExpertAdamW(_params(), N, **{name: value})
        with pytest.raises(ValueError, match=msg):
            opt.add_param_group({"params": [torch.randn(N, 2, requires_grad=True)], name: value})
        assert len(opt.param_groups) == 1
