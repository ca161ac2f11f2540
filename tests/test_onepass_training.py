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
