"""All experts in one pass over a mixed-timestep batch == each expert trained on its own samples."""
import pytest
import torch
import torch.nn.functional as F

from ppap_fast.experts import ExpertBank
from ppap_fast.models.tiny import TinyResNet

from _util import rel_err


def _bank(n_experts, seed=0):
    torch.manual_seed(seed)
    model = TinyResNet(widths=(8, 16), layers=(1, 1), in_channels=1, num_classes=5).double()
    bank = ExpertBank(model, placement="resnet", n_experts=n_experts, r=4, alpha=2).double()
    with torch.no_grad():  # non-zero LoRA B so every LoRA path carries gradient both ways
        for name, p in bank.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return bank.train()


def _kd(student, teacher):
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher / 0.25, -1), log_target=True, reduction="sum")


@pytest.mark.parametrize("t", [
    torch.tensor([5, 950, 420, 10, 610, 999, 333, 200]),   # random mix
    torch.tensor([100, 120, 5, 150, 199, 0, 42, 77]),      # all in expert 0, others empty
])
def test_onepass_equals_per_expert_passes(t):
    n = 5
    x = torch.randn(t.numel(), 1, 16, 16, dtype=torch.float64)
    teacher = torch.randn(t.numel(), 5, dtype=torch.float64)
    one = _bank(n)
    loss = _kd(one(x, t), teacher)
    loss.backward()
    grads_one = {k: p.grad.clone() for k, p in one.named_parameters() if p.requires_grad}

    sep = _bank(n)
    expert = t // (1000 // n)
    total = 0.0
    for e in range(n):
        rows = (expert == e).nonzero().flatten()
        if rows.numel() == 0:
            continue
        part = _kd(sep(x[rows], t[rows]), teacher[rows])
        part.backward()
        total += part.item()
    assert abs(loss.item() - total) <= 1e-10 * max(1.0, abs(total))
    checked = 0
    for k, p in sep.named_parameters():
        if not p.requires_grad:
            continue
        g_sep = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.isfinite(grads_one[k]).all()
        assert rel_err(grads_one[k], g_sep) <= 1e-10 or (g_sep.abs().max() == 0 and grads_one[k].abs().max() == 0), k
        checked += 1
    assert checked > 0
    # per-expert running BN statistics follow the same samples
    for (k, b1), (_, b2) in zip(one.named_buffers(), sep.named_buffers()):
        assert torch.allclose(b1, b2, rtol=1e-10, atol=1e-12), k


def test_onepass_on_the_implicit_kernels_equals_per_expert_passes(monkeypatch):
    """The same equivalence through the implicit conv LoRA kernels: one pass of a float32 bank whose
    loralib convs run as the equal block-diagonal factorised LoRA on Triton (interpreter on CPU) vs
    each expert's own float64 reference passes; every gradient within float32 rounding."""
    import functools
    import os

    from ppap_fast.ops import lora as L

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = torch.tensor([5, 950, 420, 10, 610, 333])
    n = 5
    x = torch.randn(t.numel(), 1, 6, 6, dtype=torch.float64)  # small: the interpreter runs every program
    teacher = torch.randn(t.numel(), 5, dtype=torch.float64)

    sep = _bank(n)
    expert = t // (1000 // n)
    for e in range(n):
        rows = (expert == e).nonzero().flatten()
        if rows.numel():
            _kd(sep(x[rows], t[rows]), teacher[rows]).backward()

    monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", "factorised")
    monkeypatch.setattr(L, "lora_conv2d", functools.partial(L.lora_conv2d, backend="triton"))
    one = _bank(n).float().to(dev)
    _kd(one(x.float().to(dev), t.to(dev)), teacher.float().to(dev)).backward()
    assert L.last_backend["lora_conv2d/a_stage"] == "implicit"
    g_one = {k: p.grad for k, p in one.named_parameters() if p.requires_grad}
    floor = 1e-3 * max(float(p.grad.norm()) for p in sep.parameters() if p.grad is not None)
    checked = 0
    for k, p in sep.named_parameters():
        if not p.requires_grad:
            continue
        g_sep = p.grad if p.grad is not None else torch.zeros_like(p)
        diff = float((g_one[k].double().cpu() - g_sep).norm())
        assert diff <= 1e-4 * max(float(g_sep.norm()), floor), (k, diff, float(g_sep.norm()))
        checked += "lora_A" in k and g_sep.abs().max() > 0
    assert checked > 0


def test_step_sampled_experts_leaves_experts_without_samples_as_they_were():
    """AdamW with weight decay on the stacked [N, ...] tensors: an expert with no sample in the batch
    keeps its parameters and moments (trained separately, no step of its own would touch it); the
    sampled experts step exactly as a plain opt.step()."""
    n = 4
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    teacher = torch.randn(6, 5, dtype=torch.float64)
    mixed, no_expert_1 = torch.tensor([5, 400, 900, 10, 500, 990]), torch.tensor([5, 10, 900, 20, 990, 600])
    banks, opts = [], []
    for _ in range(2):
        b = _bank(n)
        banks.append(b)
        opts.append(torch.optim.AdamW(b.parameters_to_train(), lr=1e-2, weight_decay=0.05))
    for t in (mixed, no_expert_1):
        for b, o, masked in zip(banks, opts, (True, False)):
            o.zero_grad(set_to_none=True)
            _kd(b(x, t), teacher).backward()
            if not masked:
                o.step()
            elif t is no_expert_1:
                before = {k: v.clone() for k, v in b.expert_state_dict(1).items()}
                moments = {id(p): {k: v[1].clone() for k, v in o.state[p].items() if k != "step"}
                           for p in b.parameters_to_train()}
                b.step_sampled_experts(o, b.sampled_experts(t))
            else:
                b.step_sampled_experts(o, b.sampled_experts(t))
    masked, plain = banks
    assert masked.sampled_experts(no_expert_1).tolist() == [True, False, True, True]
    after = masked.expert_state_dict(1)
    assert all(torch.equal(after[k], before[k]) for k in before)
    for p in masked.parameters_to_train():
        assert all(torch.equal(opts[0].state[p][k][1], v) for k, v in moments[id(p)].items())
    moved = plain.expert_state_dict(1)
    assert any(not torch.equal(moved[k], before[k]) for k in before)  # what plain AdamW does
    for e in (0, 2, 3):
        a, b = masked.expert_state_dict(e), plain.expert_state_dict(e)
        assert all(torch.equal(a[k], b[k]) for k in a), e


def _datafree_set(tmp_path):
    from ppap_fast import distributed as D
    from ppap_fast.models.tiny import save_model

    torch.manual_seed(0)
    teacher = TinyResNet(widths=(4,), layers=(1,), in_channels=1, num_classes=3).eval()
    tfile = save_model(teacher, tmp_path / "t.safetensors")
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), num_images=6, shard_size=3, image_size=8, channels=1,
                                denoiser="random-conv", respacing="ddim5", seed=3, device="cpu",
                                teacher=f"tiny:{tfile}"), D.DistEnv())
    return teacher, tfile, data


def _untouched_experts(bank, teacher):
    """Experts whose per-expert BatchNorm weight is still the teacher's (the init of every expert)."""
    w = dict(bank.per_expert_state_dict())["bn1.expert_weight"]
    return sum(torch.equal(w[e], teacher.bn1.weight) for e in range(bank.n_experts))


def test_distillers_move_only_the_experts_their_batches_sample(tmp_path):
    """batch 1, 5 experts, 2 steps: at most 2 experts see a sample, the other 3 must stay at their
    init (AdamW's weight decay shrank every expert at every step before)."""
    from ppap_fast import distributed as D
    from ppap_fast.distill import distill_ppap

    teacher, tfile, data = _datafree_set(tmp_path)
    bank = distill_ppap(teacher, data, n_experts=5, r=2, alpha=2.0, steps=2, batch_size=1, progress=False)
    assert _untouched_experts(bank, teacher) >= 3
    bank = D.distill(D.DistillConfig(str(data), str(tmp_path / "out"), f"tiny:{tfile}", n_experts=5, r=2, alpha=2.0,
                                     steps=2, batch_size=1, lr=1e-2, warmup=1, device="cpu"), D.DistEnv())
    assert _untouched_experts(bank, teacher) >= 3


def test_ddp_ranks_agree_on_which_experts_step(tmp_path):
    """2 gloo ranks, batch 1 each: an expert sampled on one rank only gets the all-reduced gradient
    on both, so both must step it (a per-rank mask made the replicas diverge)."""
    from ppap_fast import distributed as D

    _, tfile, data = _datafree_set(tmp_path)
    cfg = D.DistillConfig(str(data), str(tmp_path / "out"), f"tiny:{tfile}", n_experts=5, r=2, alpha=2.0, steps=3,
                          batch_size=1, lr=1e-2, warmup=1, device="cpu")
    D.launch("distill", cfg, 2, threads=1, timeout_s=60)  # check_replicas_identical raises on divergence
    assert (tmp_path / "out" / "experts.safetensors").exists()
