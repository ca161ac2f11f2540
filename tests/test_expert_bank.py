"""ExpertBank: band routing, per-sample experts, merged(n) with BN folding, counts, checkpoints."""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ppap_fast.experts import (ExpertBank, LoRAConv2d, Placement, check_ppap_checkpoint_manifest,
                               export_ppap_checkpoint, import_ppap_checkpoint, load_experts, load_experts_into,
                               make_placement, save_experts)
from ppap_fast.experts.bank import RoutedConv2d, _Routed

from _util import randomise_bank, randomise_bn, rel

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """conv->bn, depthwise conv->bn, GroupNorm, LayerNorm, Linear head: every routed type."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=True)
        self.bn2 = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.proj = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.gn(F.relu(self.bn2(self.dw(x))))
        x = x.mean((2, 3))
        return self.head(self.ln(self.proj(x)))


def small_resnet(block=Bottleneck):
    return randomise_bn(ResNet(block, [1, 1, 1, 1], num_classes=10)).to(D)


# ----------------------------------------------------------------------------- routing
def test_band_edges():
    bank = ExpertBank(Tiny(), "generic", n_experts=5)
    t = torch.tensor([0, 199, 200, 399, 400, 999])
    assert bank.expert_index(t).tolist() == [0, 0, 1, 1, 2, 4]
    assert bank.bands[1] == (200, 400)
    assert int(bank.expert_index(999)) == 4 and int(bank.expert_index(torch.tensor(200))) == 1  # was a shape error
    for bad in (torch.tensor([1000]), torch.tensor([-1]), torch.tensor([5, 1000])):
        with pytest.raises(ValueError, match="out of range"):
            bank.expert_index(bad)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        bank(x, torch.tensor([3, 1000]))
    with pytest.raises(ValueError, match="integer"):
        bank(x, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="shape"):
        bank(x, torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="shape"):
        bank(x, torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match="exactly one"):
        bank(x)
    with pytest.raises(ValueError, match="out of range"):
        bank(x, expert_idx=5)
    with pytest.raises(ValueError, match="dtype"):
        bank(x.double(), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="floating"):
        bank(x.long(), torch.tensor([3, 4]))


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="ExpertBank wraps an nn.Module"):  # was an AttributeError in the rule
        ExpertBank(lambda x: x, "generic", n_experts=5)


def test_n_must_divide_T():
    with pytest.raises(ValueError, match="divide"):
        ExpertBank(Tiny(), "generic", n_experts=3)
    assert ExpertBank(Tiny(), "generic", n_experts=3, num_timesteps=999).bands[2] == (666, 999)


def test_fresh_bank_equals_base_model():
    model = Tiny().eval()
    bank = ExpertBank(model, "generic", n_experts=4).eval()
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(bank(x, torch.tensor([0, 500, 999])), model(x), atol=1e-6, rtol=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # the original model is not frozen by the bank


@pytest.mark.parametrize("dtype,tol", [(D, 1e-12), (torch.float32, 1e-5)])  # fp32 takes the ops' fast CPU paths
@pytest.mark.parametrize("layout", ["factorised", "loralib"])
def test_mixed_batch_equals_each_sample_alone(layout, dtype, tol):
    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5, layout=layout).to(dtype)).eval()
    x = torch.randn(6, 3, 8, 8, dtype=dtype)
    t = torch.tensor([999, 0, 200, 199, 650, 401])
    y = bank(x, t)
    for i in range(6):
        yi = bank(x[i:i + 1], t[i:i + 1])
        assert rel(y[i:i + 1], yi) < tol
    if dtype != D:
        return
    # experts differ
    assert rel(bank(x[:1], expert_idx=0), bank(x[:1], expert_idx=1)) > 1e-3
    # expert_idx and t routes agree
    assert rel(bank(x, expert_idx=t // 200), y) == 0.0


@pytest.mark.parametrize("dtype,tol", [(D, 1e-12), (torch.float32, 1e-5)])
def test_train_mode_bn_uses_per_expert_batch_stats(dtype, tol):
    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=2).to(dtype)).train()
    x = torch.randn(6, 3, 8, 8, dtype=dtype)
    t = torch.tensor([10, 900, 20, 800, 30, 700])
    rm0 = bank.model.bn1.running_mean.clone()
    y = bank(x, t)
    sel0, sel1 = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    rm_mixed = bank.model.bn1.running_mean.clone()
    with torch.no_grad():
        bank.model.bn1.running_mean.copy_(rm0)
    y0 = bank(x[sel0], t[sel0])
    y1 = bank(x[sel1], t[sel1])
    assert rel(y[sel0], y0) < tol and rel(y[sel1], y1) < tol
    assert rel(bank.model.bn1.running_mean, rm_mixed) < tol
    assert (bank.model.bn1.num_batches_tracked >= 1).all()


@pytest.mark.parametrize("kind,shape", [(nn.BatchNorm1d, (5,)), (nn.BatchNorm2d, (5, 1, 1))])
def test_train_mode_bn_keeps_stats_of_an_expert_with_one_value_per_channel(kind, shape):
    """An expert with one value per channel ([S, C] features, or 1x1 maps: a ResNet's last stage on 32x32 images)
    has no variance to estimate (nn.BatchNorm raises): its running statistics stay as they were, where they
    were pulled towards a variance of 0; the other experts' update as nn.BatchNorm's."""
    model = nn.Sequential(kind(5))
    bank = randomise_bank(ExpertBank(model, Placement(norm=("0",)), n_experts=2).to(D)).train()
    m = bank.model[0]
    before = {k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")}
    x = torch.randn(4, *shape, dtype=D) * 2 + 1
    idx = torch.tensor([1, 0, 1, 1])  # expert 0: one sample
    y = bank(x, expert_idx=idx)
    assert torch.isfinite(y).all()
    for k, v in before.items():
        assert torch.equal(getattr(m, k)[0], v[0]), k
    ref = kind(5).to(D).train()
    with torch.no_grad():
        ref.weight.copy_(m.expert_weight[1]), ref.bias.copy_(m.expert_bias[1])
        ref.running_mean.copy_(before["running_mean"][1]), ref.running_var.copy_(before["running_var"][1])
    want = ref(x[idx == 1])
    assert rel(y[idx == 1], want) < 1e-12
    assert rel(m.running_mean[1], ref.running_mean) < 1e-12 and rel(m.running_var[1], ref.running_var) < 1e-12
    assert int(m.num_batches_tracked[1]) == int(before["num_batches_tracked"][1]) + 1


def test_a_batch_norm_call_the_op_refuses_counts_no_batch():
    """num_batches_tracked was bumped before expert_batch_norm checked x: a refused call had counted."""
    bank = ExpertBank(nn.Sequential(nn.BatchNorm2d(5)), Placement(norm=("0",)), n_experts=2).to(D).train()
    m = bank.model[0]
    before = {k: getattr(m, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")}
    with pytest.raises(ValueError, match=r"expert_batch_norm: weight must be \[N, 4\]"):
        bank(torch.randn(4, 4, 3, 3, dtype=D), expert_idx=torch.tensor([0, 1, 1, 0]))
    for k, v in before.items():
        assert torch.equal(getattr(m, k), v), k
    y = bank(torch.randn(4, 5, 3, 3, dtype=D), expert_idx=torch.tensor([0, 1, 1, 1]))
    assert torch.isfinite(y).all() and m.num_batches_tracked.tolist() == [1, 1]


def test_gradients_stay_in_the_routed_expert():
    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5).to(D)).eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    bank(x, torch.tensor([250, 399])).sum().backward()
    for p in bank.parameters_to_train():
        assert p.grad is not None
        assert p.grad[[0, 2, 3, 4]].abs().sum() == 0
    assert bank.model.conv1.lora_A.grad[1].abs().sum() > 0
    assert all(p.grad is None for p in bank.model.parameters() if not p.requires_grad)


def test_works_under_torch_func():
    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5).to(D)).eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    t = torch.tensor([5, 905])
    params = {k: v.detach() + 0.0 for k, v in bank.named_parameters()}
    out = torch.func.functional_call(bank, params, (x, t))
    assert rel(out, bank(x, t)) == 0.0
    g = torch.func.grad(lambda xx: bank(xx, t).logsumexp(-1).sum())(x)
    xx = x.clone().requires_grad_()
    (g2,) = torch.autograd.grad(bank(xx, t).logsumexp(-1).sum(), xx)
    assert rel(g, g2) < 1e-12


def test_routed_module_outside_bank_and_two_banks():
    b1 = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5))
    b2 = ExpertBank(Tiny(), "generic", n_experts=2)
    with pytest.raises(RuntimeError, match="outside"):
        b1.model(torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    y1 = b1(x, torch.tensor([1, 999]))
    b2(x, torch.tensor([1, 999]))
    assert torch.equal(b1(x, torch.tensor([1, 999])), y1)
    assert b1._router.idx is None and b2._router.idx is None


def test_routed_conv_matches_single_expert_layer():
    for layout in ("factorised", "loralib"):
        base = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).to(D)
        bank = randomise_bank(ExpertBank(nn.Sequential(base), Placement(lora=("0",), r=2, alpha=3, layout=layout),
                                         n_experts=2).to(D))
        single = LoRAConv2d(base, r=2, alpha=3, layout=layout)
        with torch.no_grad():
            single.lora_A.copy_(bank.model[0].lora_A[1])
            single.lora_B.copy_(bank.model[0].lora_B[1])
        x = torch.randn(2, 4, 7, 7, dtype=D)
        assert rel(bank(x, expert_idx=1), single(x)) < 1e-12


@pytest.mark.parametrize("layout,route", [("factorised", None), ("loralib", "delta"), ("loralib", "factorised"),
                                          ("loralib", "lowrank")])
def test_same_padding_with_an_even_kernel_routes_as_the_model_copy(monkeypatch, layout, route):
    """padding='same' with an even effective kernel (asymmetric) was accepted at construction, then the LoRA ops
    refused it at the first forward, naming no module; the routed conv pads x as F.conv2d does (odd pixel
    right / bottom): each expert equals its merged model copy (nn.Conv2d(padding='same')) in float64."""
    from ppap_fast.ops.lora import vectorized as V

    if route is not None:
        monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", route)
    lowrank_calls = []
    real_lowrank = V.loralib_conv2d_lowrank
    monkeypatch.setattr(V, "loralib_conv2d_lowrank", lambda *a, **k: lowrank_calls.append(1) or real_lowrank(*a, **k))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 4, 7, 6, generator=g, dtype=D)
    idx = torch.tensor([0, 1, 1, 0])
    for kernel, dilation in ((4, 1), ((2, 3), 1), ((3, 2), (2, 3))):
        base = nn.Conv2d(4, 32, kernel, padding="same", dilation=dilation).to(D)
        bank = randomise_bank(ExpertBank(nn.Sequential(base), Placement(lora=("0",), r=1, alpha=3, layout=layout),
                                         n_experts=2).to(D))
        y = bank(x, expert_idx=idx)
        assert y.shape == (4, 32, 7, 6) and torch.isfinite(y).all()
        for n in (0, 1):
            merged = bank.merged(n)
            assert merged[0].padding == "same"
            assert rel(y[idx == n], merged(x[idx == n])) < 1e-12, (kernel, dilation, n)
    assert bool(lowrank_calls) == (route == "lowrank")


# ----------------------------------------------------------------------------- merged(n)
@pytest.mark.parametrize("builder,rule,layout", [
    (lambda: small_resnet(Bottleneck), "resnet", "loralib"),
    (lambda: small_resnet(BasicBlock), "resnet", "factorised"),
    (lambda: Tiny().to(D), "generic", "factorised"),
    (lambda: Tiny().to(D), "generic", "loralib"),
])
def test_merged_equals_expert_in_eval(builder, rule, layout):
    model = builder()
    bank = randomise_bank(ExpertBank(model, rule, n_experts=5, layout=layout, r=4, alpha=2), std=0.05).eval()
    if rule == "generic":
        randomise_bank(bank)
    x = torch.randn(2, 3, 32, 32, dtype=D)
    for n in (0, 3):
        m = bank.merged(n)
        assert not any(isinstance(mod, _Routed) for mod in m.modules())
        n_bn = sum(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())
        n_bn_before = sum(isinstance(mod, nn.BatchNorm2d) for mod in model.modules())
        assert n_bn < n_bn_before  # conv->bn pairs were folded
        ref = bank(x, expert_idx=n)
        assert rel(m(x), ref) < 1e-10
        assert not m.training
    assert rel(bank.merged(0)(x), bank.merged(3)(x)) > 1e-4


def test_fold_batchnorm_folds_eval_mode_norms_only():
    # the docstring says eval-mode BatchNorms; a model in train mode had its (batch-statistics) norms folded
    # with their running statistics, changing its output
    from ppap_fast.experts import fold_batchnorm_

    model = randomise_bn(small_resnet(BasicBlock)).train()
    x = torch.randn(4, 3, 32, 32, dtype=D)
    want = model(x)
    assert fold_batchnorm_(model) == [] and rel(model(x), want) < 1e-12
    model.eval()
    want = model(x)
    assert fold_batchnorm_(model) and rel(model(x), want) < 1e-10


def test_mobilenet_v2_depthwise_merged():
    model = randomise_bn(torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.25)).to(D)
    bank = randomise_bank(ExpertBank(model, "mobilenet_v2", n_experts=2), std=0.05).eval()
    assert any(isinstance(m, RoutedConv2d) and m.groups > 1 for m in bank.modules())
    x = torch.randn(2, 3, 32, 32, dtype=D)
    assert rel(bank.merged(1)(x), bank(x, expert_idx=1)) < 1e-10


def test_mobilenet_v2_placement_refuses_other_nets():
    with pytest.raises(ValueError, match="not a MobileNetV2.*generic"):
        make_placement("mobilenet_v2", torchvision.models.resnet18(weights=None))
    net = torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.25)
    net.features[-1][0] = nn.Conv2d(net.features[-1][0].in_channels, 1280, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="1x1 head conv"):
        make_placement("mobilenet_v2", net)
    ok = make_placement("mobilenet_v2", torchvision.models.mobilenet_v2(weights=None, width_mult=0.25))
    assert ok.lora[-1] != "features.18.0" and "features.17.conv.2" in ok.lora


# ----------------------------------------------------------------------------- counts
def test_resnet50_trainable_count_matches_official():
    model = torchvision.models.resnet50(weights=None)
    bank = ExpertBank(model, "resnet", n_experts=5)
    rep = bank.parameter_report()
    assert rep["per_expert"] == 1_459_632
    assert rep["total_trainable"] == 5 * 1_459_632
    assert rep["base_parameters"] == 25_557_032
    assert abs(rep["fraction_of_base_total"] - 0.286) < 0.001  # the paper's 28.6 %
    assert len(bank.placement.lora) == 33
    assert "fc" not in bank.placement.bias and "layer1.0.conv3" not in bank.placement.lora
    full = make_placement("resnet", model, official=False)
    assert ExpertBank(model, full, 5).num_trainable_parameters(0) > 1_459_632


def test_deit_small_count():
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    bank = ExpertBank(model, "deit", n_experts=5)
    assert len(bank.placement.lora) == 24
    assert bank.num_trainable_parameters(3) == 494_824  # ~0.49M per expert


# ----------------------------------------------------------------------------- state dicts and checkpoints
def test_expert_state_dict_roundtrip_and_strict():
    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=4))
    sd = bank.expert_state_dict(2)
    assert "bn1.running_mean" in sd and "conv1.lora_A" in sd
    bank.load_expert_state_dict(0, sd)
    x = torch.randn(2, 3, 8, 8)
    bank.eval()
    assert torch.equal(bank(x, expert_idx=0), bank(x, expert_idx=2))
    with pytest.raises(ValueError, match="conv1.lora_B"):
        bank.load_expert_state_dict(1, {k: v for k, v in sd.items() if k != "conv1.lora_B"})
    with pytest.raises(ValueError, match="bogus"):
        bank.load_expert_state_dict(1, {**sd, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        bank.load_expert_state_dict(1, {**sd, "conv1.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match="out of range"):
        bank.expert_state_dict(4)



@pytest.mark.parametrize("count", [2.5, float("nan")])
def test_a_non_integer_step_count_is_refused_not_truncated(count):
    """A float num_batches_tracked (a state_dict cast with .float()) was copied into the long buffer: 2.5 -> 2."""
    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=4))
    sd = bank.expert_state_dict(2)
    before = bank.expert_state_dict(1)
    with pytest.raises(ValueError, match=r"expert 1 state_dict cannot be loaded into this bank: "
                                         r"\['bn1.num_batches_tracked \(non-integer values for torch.int64\)'\]"):
        bank.load_expert_state_dict(1, {**sd, "bn1.num_batches_tracked": torch.tensor(count)})
    assert all(torch.equal(bank.expert_state_dict(1)[k], v) for k, v in before.items())
    bank.load_expert_state_dict(1, {**sd, "bn1.num_batches_tracked": torch.tensor(7.0)})  # integral: loads
    assert int(bank.expert_state_dict(1)["bn1.num_batches_tracked"]) == 7

def test_checkpoint_roundtrip_and_strict(tmp_path):
    base = Tiny()
    bank = randomise_bank(ExpertBank(base, "generic", n_experts=5, arch="tiny")).eval()
    save_experts(bank, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["n_experts"] == 5 and cfg["bands"][1] == [200, 400] and cfg["arch"] == "tiny"
    assert cfg["layout"] == "factorised" and cfg["r"] == bank.placement.r
    loaded = load_experts(tmp_path / "ck", base).eval()
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 450, 999])
    assert torch.equal(loaded(x, t), bank(x, t))
    # config mismatch
    other = ExpertBank(Tiny(), "generic", n_experts=4, num_timesteps=1000)
    with pytest.raises(ValueError, match="n_experts"):
        load_experts_into(other, tmp_path / "ck")
    # missing / unexpected keys
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ck" / "experts.safetensors"
    tensors = load_file(str(f))
    save_file({k: v for k, v in tensors.items() if k != "ln.expert_bias"}, str(f))
    with pytest.raises(ValueError, match="ln.expert_bias"):
        load_experts(tmp_path / "ck", Tiny())
    save_file({**tensors, "extra.key": torch.zeros(2)}, str(f))
    with pytest.raises(ValueError, match="extra.key"):
        load_experts(tmp_path / "ck", Tiny())
    # with base weights
    save_experts(bank, tmp_path / "ck2", include_base=True)
    fresh = load_experts(tmp_path / "ck2", Tiny()).eval()
    assert torch.equal(fresh(x, t), bank(x, t))


def test_ppap_manifest_check(fixtures_dir):
    rep = check_ppap_checkpoint_manifest(fixtures_dir / "ppap_resnet50_lora_keys.json")
    assert rep["entries"] == 386 and rep["trainable_per_expert"] == 1_459_632


def test_ppap_import_strict_and_base_check(fixtures_dir):
    # a small ResNet keeps it cheap: export one expert, import into a fresh bank
    model = small_resnet()
    bank = randomise_bank(ExpertBank(model, "resnet", n_experts=5), std=0.05).eval()
    sd = export_ppap_checkpoint(bank, 3)
    assert "resnet.conv1.conv.weight" in sd and "resnet.layer1.0.conv2.lora_A" in sd
    other = ExpertBank(model, "resnet", n_experts=5).eval()
    import_ppap_checkpoint(other, 0, sd)  # same base weights: base="check" passes
    x = torch.randn(1, 3, 32, 32, dtype=D)
    assert rel(other(x, expert_idx=0), bank(x, expert_idx=3)) < 1e-12
    with pytest.raises(ValueError, match="missing keys.*resnet.layer1.0.conv1.lora_A"):
        import_ppap_checkpoint(other, 1, {k: v for k, v in sd.items() if k != "resnet.layer1.0.conv1.lora_A"})
    with pytest.raises(ValueError, match="unexpected keys.*resnet.extra"):
        import_ppap_checkpoint(other, 1, {**sd, "resnet.extra": torch.zeros(1)})
    wrong = dict(sd)
    wrong["resnet.layer1.0.conv3.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        import_ppap_checkpoint(other, 1, wrong)
    changed = dict(sd)
    changed["resnet.fc.weight"] = sd["resnet.fc.weight"] + 1
    with pytest.raises(ValueError, match="base weights differ"):
        import_ppap_checkpoint(other, 1, changed)
    nan = dict(sd)
    nan["resnet.conv1.lora_B"] = sd["resnet.conv1.lora_B"] * float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        import_ppap_checkpoint(other, 1, nan)
    fact = ExpertBank(model, "resnet", n_experts=5, layout="factorised")
    with pytest.raises(ValueError, match="loralib"):
        import_ppap_checkpoint(fact, 0, sd)


def test_generic_placement_finds_the_head_that_produces_the_output():
    """The generic rule took the LAST registered Linear as the classifier head (no LoRA): a model that registers its
    head first got LoRA on the head and none on an inner Linear."""
    from ppap_fast.experts.placement import generic_placement

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(6, 4)
            self.conv = nn.Conv2d(3, 8, 3)
            self.proj = nn.Linear(8, 6)

        def forward(self, x):
            return self.head(F.relu(self.proj(self.conv(x).mean((2, 3))))).flatten(1)

    p = generic_placement(HeadFirst())
    assert p.lora == ("conv", "proj") and p.bias == ("head", "conv", "proj")  # the head: shared weight, expert bias
    assert generic_placement(Tiny()).lora == ("conv1", "dw", "proj")  # head registered last: as before

    class WithOptions(HeadFirst):  # optional arguments traced as their defaults
        def forward(self, x, features=False, scale=None):
            return self.proj(x) if features else super().forward(x if scale is None else x * scale)

    assert generic_placement(WithOptions()).lora == ("conv", "proj")

    class ConvHead(HeadFirst):  # a dense output: no Linear is the classifier
        def forward(self, x):
            return self.conv(x) * self.proj(self.head(torch.ones(4, 6))).mean()

    assert generic_placement(ConvHead()).lora == ("head", "conv", "proj")

    class Untraceable(HeadFirst):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    with pytest.warns(UserWarning, match=r"cannot trace Untraceable.*last registered Linear 'proj'"):
        assert generic_placement(Untraceable()).lora == ("head", "conv")


def test_multihead_attention_out_proj_is_never_silently_unrouted():
    from ppap_fast.experts.placement import Placement, generic_placement

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.mha(h, h, h)[0].mean(1))

    p = generic_placement(WithMHA())
    assert "mha.out_proj" not in p.lora + p.bias and "inp" in p.lora
    bank = randomise_bank(ExpertBank(WithMHA(), "generic", n_experts=5)).eval()
    x = torch.randn(2, 3, 4)
    e0, e1 = bank(x, expert_idx=torch.tensor([0, 0])), bank(x, expert_idx=torch.tensor([1, 1]))
    assert torch.isfinite(e0).all() and torch.isfinite(e1).all() and not torch.equal(e0, e1)
    with pytest.raises(ValueError, match=r"mha\.out_proj.*reads out_proj's weight"):
        ExpertBank(WithMHA(), Placement(("inp", "mha.out_proj"), (), (), 4, 4, "factorised", "custom"), n_experts=5)


def test_torch_transformer_layers_are_refused_not_half_routed():
    from ppap_fast.experts.placement import generic_placement

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(self.inp(x)).mean(1))

    assert "enc.linear1" in generic_placement(Enc()).lora
    with pytest.raises(ValueError, match=r"inside \['enc'\].*Transformer\*Layer"):
        ExpertBank(Enc(), "generic", n_experts=5)


class HalfTorso(nn.Module):
    """An fp16 conv torso with ADM's GroupNorm32 (float32 statistics, result cast back)."""

    def __init__(self):
        super().__init__()
        from ppap_fast.models.adm import GroupNorm32

        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.norm = GroupNorm32(32, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        h = self.norm(self.conv(x))
        return self.head(F.silu(h).float().mean((2, 3)))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_groupnorm32_keeps_float32_statistics(backend):
    from ppap_fast import ops
    from ppap_fast.models.adm import GroupNorm32

    torch.manual_seed(0)
    model = HalfTorso().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.5)
    model.conv.half()
    bank = ExpertBank(model, Placement(norm=("norm",), bias=("head",)), n_experts=4).eval()
    x = (torch.randn(4, 3, 9, 9) * 30 + 50).half()  # large mean: fp16 statistics lose digits
    want = model(x)
    ops.set_backend(backend)
    try:
        got = bank(x, torch.tensor([0, 400, 700, 999]))
    finally:
        ops.set_backend(None)
    assert got.dtype == want.dtype and rel(got.double(), want.double()) < 2e-6  # fp16 statistics: 6e-5
    plain = bank.merged(1)
    assert isinstance(plain.norm, GroupNorm32)  # merged experts keep the float32 norm too
    assert rel(plain(x).double(), want.double()) < 2e-6


def test_factorised_bank_trains_the_same_on_the_cpp_backend(monkeypatch):
    """A factorised bank (Tiny: conv, depthwise conv, linears) with its LoRA layers on the cpp backend
    (PPAP_FAST_LORA_CPP=1) takes the same AdamW steps as with the reference ops."""
    from ppap_fast.ops import lora as L
    from ppap_fast.ops.lora import cpp

    if cpp.why_unavailable(torch.device("cpu"), D) is not None:
        pytest.skip(cpp.why_unavailable(torch.device("cpu"), D))
    torch.manual_seed(0)
    start = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5, layout="factorised").to(D)).train()
    x, t = torch.randn(6, 3, 8, 8, dtype=D), torch.tensor([999, 0, 200, 199, 650, 401])
    target = torch.randn(6, 4, dtype=D)
    banks = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("PPAP_FAST_LORA_CPP", flag)
        bank = ExpertBank(Tiny(), "generic", n_experts=5, layout="factorised").to(D).train()
        bank.load_state_dict(start.state_dict())
        opt = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(bank(x, t), target).backward()
            opt.step()
        assert L.last_backend["lora_conv2d"] == ("cpp" if flag == "1" else "reference")
        assert L.last_backend["lora_linear"] == ("cpp" if flag == "1" else "reference")
        banks[flag] = bank
    ref, got = banks["0"].state_dict(), banks["1"].state_dict()
    moved = 0
    for k, v in ref.items():
        if v.is_floating_point():
            assert rel(got[k], v) < 1e-10, k
            moved += int(not torch.equal(v, start.state_dict()[k]))
    assert moved > 5  # the steps changed the experts


@pytest.mark.parametrize("backend", ["reference", "triton", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_loralib_bank_trains_the_same_through_the_factorised_route(monkeypatch, backend):
    """PPAP_FAST_LORALIB_CONV=factorised runs a loralib bank's convs (groups 1) as the exactly equal
    rank r*kh*kh factorised LoRA (implicit A stage; the depthwise conv keeps its deltas): the same
    outputs and the same gradient of every trainable parameter as the dense-delta route, and (float64)
    the same AdamW steps. Triton: its kernels under the interpreter, float32."""
    import os

    from ppap_fast.ops import lora as L

    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
        import functools

        monkeypatch.setattr(L, "lora_conv2d", functools.partial(L.lora_conv2d, backend="triton"))
    dt, tol = (D, 1e-10) if backend == "reference" else (torch.float32, 2e-5)
    dev = "cuda" if backend == "cuda" else "cpu"
    if dev == "cuda":  # fp32 parity: no TF32 in the convs / matmuls of either route
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(1)
    start = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5, layout="loralib").to(dt)).to(dev).train()
    x, t = torch.randn(6, 3, 8, 8, dtype=dt).to(dev), torch.tensor([999, 0, 200, 199, 650, 401]).to(dev)
    target = torch.randn(6, 4, dtype=dt).to(dev)
    runs = {}
    for route in ("delta", "factorised"):
        monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", route)
        bank = ExpertBank(Tiny(), "generic", n_experts=5, layout="loralib").to(dt).to(dev).train()
        bank.load_state_dict(start.state_dict())
        params = dict((n, p) for n, p in bank.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
        for step in range(3 if dt == D else 1):
            opt.zero_grad()
            y = bank(x, t)
            F.mse_loss(y, target).backward()
            if step == 0:
                runs[route] = (y.detach(), {n: p.grad.clone() for n, p in params.items()})
                if route == "factorised":
                    assert L.last_backend["lora_conv2d/a_stage"] == ("reference" if backend == "reference" else "implicit")
            opt.step()
        runs[route] += (bank.state_dict(),)
    (y_d, g_d, sd_d), (y_f, g_f, sd_f) = runs["delta"], runs["factorised"]
    assert rel(y_f, y_d) < tol
    assert "model.conv1.lora_A" in g_d
    floor = 1e-2 * max(float(g.norm()) for g in g_d.values())  # grads that are zero in exact arithmetic
    for n, g in g_d.items():  # (a conv bias before a train-mode BatchNorm) compare against the floor
        assert float((g_f[n] - g).norm()) <= 10 * tol * max(float(g.norm()), floor), n
    if dt == D:  # Adam normalises those zero-in-exact-arithmetic grads: compare the others' steps
        for k, v in sd_d.items():
            if v.is_floating_point() and not k.endswith("dw.expert_bias"):
                assert rel(sd_f[k], v) < tol, k
    monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", "dense")
    with pytest.raises(ValueError, match="PPAP_FAST_LORALIB_CONV"):
        bank(x, t)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_factorised_bank_in_channels_last_through_the_in_base_kernels(monkeypatch, device):
    """A factorised bank (3x3 and 1x1 convs at stride 1, BatchNorm) in channels_last with PPAP_FAST_LORA_A_STAGE=in_base (base conv and LoRA
    in the same Triton kernels; the input gradient through them at stride 1): the same output, input
    gradient and trainable-parameter gradients as the reference ops in NCHW (float32)."""
    import functools
    import os

    from ppap_fast.ops import lora as L
    from ppap_fast.ops.lora import triton_conv as TC

    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ran = []
    for name in ("conv_base_lora_fwd", "conv_base_lora_dgrad"):
        orig = getattr(TC, name)
        monkeypatch.setattr(TC, name, lambda *a, _f=orig, _n=name, **k: (ran.append(_n), _f(*a, **k))[1])
    torch.manual_seed(2)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                       nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(16, 10)))
    start = randomise_bank(ExpertBank(model, "generic", n_experts=5, layout="factorised"), std=0.05).train()
    x, t = torch.randn(4, 3, 6, 6), torch.tensor([999, 0, 650, 401])
    target = torch.randn(4, 10)
    runs = {}
    for route in ("reference", "in_base"):
        bank = ExpertBank(model, "generic", n_experts=5, layout="factorised").train()
        bank.load_state_dict(start.state_dict())
        bank = bank.to(device)
        xin = x.to(device)
        if route == "in_base":
            monkeypatch.setenv("PPAP_FAST_LORA_A_STAGE", "in_base")
            monkeypatch.setattr(L, "lora_conv2d", functools.partial(L.lora_conv2d, backend="triton"))
            assert bank.to(memory_format=torch.channels_last) is bank  # the 4-D weights (the 5-D A stays)
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in bank.parameters() if p.dim() == 4)
            xin = xin.contiguous(memory_format=torch.channels_last)
        xin = xin.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        params = dict((n, p) for n, p in bank.named_parameters() if p.requires_grad)
        y = bank(xin, t.to(device))
        F.mse_loss(y, target.to(device)).backward()
        runs[route] = (y.detach().cpu(), xin.grad.cpu(), {n: p.grad.detach().cpu() for n, p in params.items()})
    assert {"conv_base_lora_fwd", "conv_base_lora_dgrad"} <= set(ran), ran
    (y_r, dx_r, g_r), (y_b, dx_b, g_b) = runs["reference"], runs["in_base"]
    assert rel(y_b, y_r) < 2e-5 and rel(dx_b, dx_r) < 5e-5
    assert g_r.keys() == g_b.keys()
    floor = 1e-2 * max(float(g.norm()) for g in g_r.values())  # grads zero in exact arithmetic (a conv
    for n, g in g_r.items():  # bias before a train-mode BatchNorm) compare against the floor
        assert float((g_b[n] - g).norm()) <= 5e-5 * max(float(g.norm()), floor), n


def test_batchnorms_no_expert_owns_stay_frozen_in_training():
    """A BatchNorm the placement does not route (affine=False under the generic rule) is part of the
    frozen base: training mode must not overwrite its running statistics."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    bank = ExpertBank(m, "generic", 5, 1000, r=2, alpha=1.0)
    before = bank.model[1].running_var.clone()
    bank.train()
    assert bank.training and not bank.model[1].training
    bank(torch.randn(10, 3, 8, 8) * 3, torch.randint(0, 1000, (10,)))
    assert torch.equal(bank.model[1].running_var, before)


def test_zero_lora_alpha_is_refused():
    """alpha 0 made the LoRA scale alpha / r zero: the adapters added nothing and never learned, silently."""
    with pytest.raises(ValueError, match="Placement.alpha must not be 0"):
        Placement(lora=("0",), r=2, alpha=0)
    assert Placement(lora=("0",), r=2, alpha=-1).scale == -0.5


@pytest.mark.parametrize("alpha", ["8", True, None])
def test_non_numeric_lora_alpha_is_refused(alpha):
    """alpha="8" was taken as 8.0 and alpha=True as 1.0, silently."""
    with pytest.raises(ValueError, match=rf"^Placement\.alpha must be a number \(the LoRA scale is alpha / r\), got "
                                         rf"{re.escape(repr(alpha))}$"):
        Placement(lora=("0",), r=2, alpha=alpha)
    assert Placement(lora=("0",), r=2, alpha=3).alpha == 3.0


def test_sync_batch_norm_left_shared_with_a_reason_that_fits():
    """The warning gave SyncBatchNorm the reason "own forward (e.g. timm StdConv2d's weight standardisation)"."""
    from ppap_fast.experts.placement import generic_placement

    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"^generic placement leaves 1 module\(s\) without experts \(shared, "
                                         r"frozen\): their class overrides the forward of the torch layer it "
                                         r"extends, .*"
                                         r"SyncBatchNorm syncs its training batch statistics across processes\): "
                                         r"\['1 \(SyncBatchNorm\)'\]$"):
        p = generic_placement(m)
    assert p.norm == () and p.lora == ("0",)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_non_finite_lora_alpha_is_refused_before_training(alpha, capsys):
    """alpha nan trained every step into NaN experts, refused only when saving them at the end."""
    with pytest.raises(ValueError, match="Placement.alpha must be a finite number"):
        Placement(lora=("0",), r=2, alpha=alpha)
    from ppap_fast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["distill", "--data", "d", "--alpha", str(alpha), "--out", "o"])
    assert e.value.code == 2 and "argument --alpha: must be a positive number" in capsys.readouterr().err
    from ppap_fast.distributed import main as dmain

    with pytest.raises(SystemExit) as e:
        dmain(["distill", "--data", "d", "--out", "o", "--teacher", "resnet18", "--lora-alpha", str(alpha)])
    assert e.value.code == 2 and "argument --lora-alpha: must be a finite number" in capsys.readouterr().err


class _LowrankNet(nn.Module):
    """Loralib convs of every lowrank case: a 5x5 stem and a 3x3 stride-2 conv whose C_in (3, 7) kh does not
    divide (channel windows with partial channels), 1x1, 3x1 with dilation and padding (12 channels: whole
    channel blocks), per-expert conv bias, BatchNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 7, 5, padding=2, bias=False)
        self.bn0 = nn.BatchNorm2d(7)
        self.c3 = nn.Conv2d(7, 9, 3, stride=2, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(9)
        self.c1 = nn.Conv2d(9, 12, 1, bias=False)
        self.c31 = nn.Conv2d(12, 7, (3, 1), padding=(2, 0), dilation=(2, 1), bias=True)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.c3(x)))
        x = self.c31(F.relu(self.c1(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("n", range(1, 11))
@pytest.mark.parametrize("a_stage", ["stacked", "own"])
def test_loralib_lowrank_route_equals_the_delta_route(monkeypatch, n, device, a_stage):
    """PPAP_FAST_LORALIB_CONV=lowrank (the base conv + the loralib LoRA's low-rank factors: no N-fold dense
    convs) gives the delta route's outputs, gradients of every trainable tensor and BatchNorm running
    statistics (float64 to 1e-10; float32 to 1e-5), for N = 1..10 with experts that have no sample, with
    either A stage (PPAP_FAST_LOWRANK_A: every expert stacked then gathered, or each sample's own)."""
    from ppap_fast.ops.lora import vectorized

    ran, stages = [], []
    for name in ("stacked", "own"):
        conv = getattr(vectorized, f"{name}_expert_conv")
        monkeypatch.setattr(vectorized, f"{name}_expert_conv",
                            lambda *a, _c=conv, _n=name, **k: stages.append(_n) or _c(*a, **k))
    monkeypatch.setenv("PPAP_FAST_LOWRANK_A", a_stage)
    real = vectorized.loralib_conv2d_lowrank
    monkeypatch.setattr(vectorized, "lowrank_is_cheaper", lambda *a: True)  # every conv: each case runs
    monkeypatch.setattr(vectorized, "loralib_conv2d_lowrank", lambda *a, **k: ran.append(a[1].shape) or real(*a, **k))
    torch.manual_seed(n)
    if device == "cuda":  # fp32 parity: no TF32 in the convs / matmuls of either route
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    idx = torch.tensor([0, n - 1, n - 1, n // 2, 0], device=device)  # experts 1.. n-2 but n // 2: no sample
    for dt, tol in ((D, 1e-10), (torch.float32, 1e-5)):
        start = randomise_bank(ExpertBank(_LowrankNet(), "generic", n_experts=n, num_timesteps=10 * n,
                                          layout="loralib").to(dt)).to(device).train()
        x = torch.randn(5, 3, 9, 11, dtype=dt).to(device)
        runs = {}
        for route in ("delta", "lowrank"):
            monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", route)
            bank = ExpertBank(_LowrankNet(), "generic", n_experts=n, num_timesteps=10 * n,
                              layout="loralib").to(dt).to(device).train()
            bank.load_state_dict(start.state_dict())
            ran.clear()
            y = bank(x, expert_idx=idx)
            (y.square().sum() + y.sum()).backward()
            runs[route] = (y.detach(), {k: p.grad for k, p in bank.named_parameters() if p.requires_grad},
                           {k: v for k, v in bank.state_dict().items() if "running" in k})
            assert len(ran) == (4 if route == "lowrank" else 0)
            if route == "lowrank":  # (the delta route may stack its dense convs too: CUDA's choice)
                assert set(stages) == {a_stage}
            stages.clear()
        (y_d, g_d, s_d), (y_l, g_l, s_l) = runs["delta"], runs["lowrank"]
        assert rel(y_l, y_d) < tol
        assert set(g_l) == set(g_d) and "model.c3.lora_A" in g_d
        floor = 1e-2 * max(float(g.norm()) for g in g_d.values())  # grads zero in exact arithmetic (a conv
        for k, g in g_d.items():  # bias before a train-mode BatchNorm) compare against the floor
            assert float((g_l[k] - g).norm()) <= tol * max(float(g.norm()), floor), k
        for k, v in s_d.items():
            assert rel(s_l[k], v) < tol, k


def test_loralib_lowrank_route_runs_where_it_saves_flops(monkeypatch):
    """PPAP_FAST_LORALIB_CONV=lowrank takes a conv through the low-rank factors only where that needs fewer
    multiply-adds than the N dense convs (vectorized.lowrank_is_cheaper): ResNet50 at N=5 and 10, every
    LoRA conv but the 7x7 stem on 3 channels; at N=1 the wide 3x3 convs of layer1/2 keep their deltas."""
    from ppap_fast.experts.placement import resnet_placement
    from ppap_fast.ops.lora.vectorized import lowrank_is_cheaper

    m = torchvision.models.resnet50()
    mods = dict(m.named_modules())

    def kept(n):
        return [k for k in resnet_placement(m).lora if not lowrank_is_cheaper(
            n, mods[k].out_channels, mods[k].in_channels, *mods[k].kernel_size, 16 * mods[k].kernel_size[0])]

    assert kept(5) == kept(10) == ["conv1"]
    assert set(kept(1)) == {"conv1", "layer1.0.conv1"} | {f"layer{s}.{b}.conv2" for s, nb in ((1, 3), (2, 4))
                                                           for b in range(nb)}
    from ppap_fast.ops.lora import vectorized

    ran = []
    real = vectorized.loralib_conv2d_lowrank
    monkeypatch.setattr(vectorized, "loralib_conv2d_lowrank", lambda *a, **k: ran.append(a[1].shape) or real(*a, **k))
    monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", "lowrank")
    bank = ExpertBank(_LowrankNet(), "generic", n_experts=10, num_timesteps=100, layout="loralib").train()
    bank(torch.randn(3, 3, 8, 8), expert_idx=torch.tensor([0, 9, 4]))
    assert [tuple(s[-2:]) for s in ran] == [(1, 1)]  # its narrow 5x5, 3x3, 3x1 convs (<= 12 channels): delta


def test_loralib_route_default_is_lowrank_on_a_cpu_only(monkeypatch):
    """Without PPAP_FAST_LORALIB_CONV a CPU bank's loralib convs take the low-rank route (measured faster
    there: bench_distill distill_resnet18_lowrank_vs_delta); other devices keep the delta route until a GPU
    times it; the variable overrides both."""
    from ppap_fast.experts.bank import loralib_conv_route
    from ppap_fast.ops.lora import vectorized

    monkeypatch.delenv("PPAP_FAST_LORALIB_CONV", raising=False)
    assert loralib_conv_route("cpu") == loralib_conv_route(torch.device("cpu")) == "lowrank"
    assert loralib_conv_route("cuda") == loralib_conv_route(None) == "delta"
    monkeypatch.setenv("PPAP_FAST_LORALIB_CONV", "delta")
    assert loralib_conv_route("cpu") == "delta"
    monkeypatch.delenv("PPAP_FAST_LORALIB_CONV")
    ran = []
    real = vectorized.loralib_conv2d_lowrank
    monkeypatch.setattr(vectorized, "loralib_conv2d_lowrank", lambda *a, **k: ran.append(a[1].shape) or real(*a, **k))
    bank = ExpertBank(_LowrankNet(), "generic", n_experts=10, num_timesteps=100, layout="loralib").train()
    bank(torch.randn(3, 3, 8, 8), expert_idx=torch.tensor([0, 9, 4]))
    assert [tuple(s[-2:]) for s in ran] == [(1, 1)]


def test_numpy_integer_counts_are_accepted():
    """n_experts / num_timesteps from numpy (a config array, np.arange) were refused as not int."""
    import numpy as np

    bank = ExpertBank(Tiny(), "generic", n_experts=np.int64(5), num_timesteps=np.int32(1000))
    assert type(bank.n_experts) is int and bank.n_experts == 5 and bank.expert_index(999) == 4
    with pytest.raises(ValueError, match="n_experts must be a positive int"):
        ExpertBank(Tiny(), "generic", n_experts=np.float64(5))



def test_an_unbatched_image_is_named():
    """x [C, H, W] (one image) failed deep in the LoRA conv ('not enough values to unpack')."""
    bank = ExpertBank(Tiny(), "generic", n_experts=2).eval()
    with pytest.raises(ValueError, match=r"x has shape \(3, 8, 8\).*x\[None\]"):
        bank(torch.randn(3, 8, 8), 5)
    assert bank(torch.randn(1, 3, 8, 8), 5).shape == (1, 4)


def test_numpy_integer_timesteps_route_as_ints():
    """bank(x, np.int64(t)) was refused ('got int64') where bank(x, t) works; numpy arrays act as tensors."""
    import numpy as np

    bank = randomise_bank(ExpertBank(Tiny(), "generic", n_experts=5)).eval()
    x = torch.randn(2, 3, 8, 8)
    want = bank(x, 500)
    for t in (np.int64(500), np.int32(500), np.array(500), np.array([500, 500])):
        assert torch.equal(bank(x, t), want)
    assert torch.equal(bank(x, expert_idx=np.int64(2)), bank(x, expert_idx=2))
    for bad in (np.float64(500), np.float32(500), np.bool_(True)):
        with pytest.raises(ValueError, match="t must be an int or an integer tensor"):
            bank(x, bad)
    with pytest.raises(ValueError, match="integer"):
        bank(x, np.array([500.0, 500.0]))


def test_layer_subclasses_with_their_own_forward_are_refused():
    """A Conv2d / BatchNorm2d / LayerNorm subclass with its own forward (timm's StdConv2d, BatchNormAct2d,
    LayerNorm2d) was replaced by a routed module computing the plain layer: a fresh bank silently differed
    from its base model (weight standardisation, the fused activation, the channel norm dropped)."""

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    class BNReLU(nn.BatchNorm2d):
        def forward(self, x):
            return F.relu(super().forward(x))

    class LN2d(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Named(nn.Conv2d):  # no forward of its own: routable
        pass

    for layer, placed in ((StdConv(3, 4, 3, padding=1), Placement(lora=("0",))), (BNReLU(3), Placement(norm=("0",))),
                          (LN2d(3), Placement(norm=("0",)))):
        with pytest.raises(ValueError, match=rf"'?0 \({type(layer).__name__}, an nn\.\w+ with its own forward"):
            ExpertBank(nn.Sequential(layer), placed, n_experts=2, num_timesteps=10)
        with pytest.warns(UserWarning, match=rf"generic placement leaves 1 module\(s\) without experts .*\['0 \("
                                             rf"{type(layer).__name__}\)'\]"):
            assert make_placement("generic", nn.Sequential(layer)).to_dict() == Placement(rule="generic", r=8).to_dict()
    m = nn.Sequential(Named(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(64, 2)).eval()
    bank = ExpertBank(m, "generic", n_experts=2, num_timesteps=10).eval()
    x = torch.randn(2, 3, 4, 4)
    assert "0" in bank.placement.lora and rel(bank(x, torch.tensor([0, 9])), m(x)) < 1e-6


def test_merged_groupnorm_subclass_with_other_constructor_arguments():
    """merged() rebuilt a GroupNorm subclass as cls(num_groups, num_channels): timm's GroupNorm takes
    (num_channels, num_groups), so merging its bank raised ('num_channels (2) must be divisible by num_groups (8)')."""

    class ChannelsFirstGN(nn.GroupNorm):  # timm.layers.GroupNorm's signature, nn.GroupNorm's forward
        def __init__(self, num_channels, num_groups=32, eps=1e-5, **kwargs):
            super().__init__(num_groups, num_channels, eps=eps, **kwargs)

    m = nn.Sequential(nn.Conv2d(3, 8, 1), ChannelsFirstGN(8, num_groups=2), nn.Flatten(), nn.Linear(128, 2)).eval()
    bank = randomise_bank(ExpertBank(m, "generic", n_experts=2, num_timesteps=10)).eval()
    x = torch.randn(2, 3, 4, 4)
    for n in range(2):
        plain = bank.merged(n)
        assert (plain[1].num_groups, plain[1].num_channels) == (2, 8)
        assert rel(plain(x), bank(x, expert_idx=n)) < 1e-5


def test_a_module_shared_under_two_names_is_refused_not_half_routed():
    """A Linear registered as both ``a`` and ``b`` was routed under ``a`` only: the calls through ``b`` ran
    the base weights without any expert, silently (and naming ``b`` said it was 'not in' the model)."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a
            self.act = nn.ReLU()
            self.act2 = self.act  # shared, but no expert on it: fine
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.act2(self.b(self.act(self.a(x)))))

    for placement in ("generic", Placement(lora=("b",), r=2, alpha=2)):
        with pytest.raises(ValueError, match=r"shares under several names \(\['a = b'\]\)"):
            ExpertBank(Shared(), placement, n_experts=2, num_timesteps=10)
    bank = ExpertBank(Shared(), Placement(bias=("head",)), n_experts=2, num_timesteps=10)
    assert bank(torch.randn(3, 4), expert_idx=1).shape == (3, 2)


def test_generic_rule_leaves_a_bias_free_layernorm_shared():
    """The generic rule put a LayerNorm(bias=False) in ``norm``, so the bank could not be built ('without
    affine parameters'); it now stays shared, and naming it asks for a bias."""
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, bias=False), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    with pytest.warns(UserWarning, match=r"leaves 1 layer\(s\) with weights shared .*\['1 \(LayerNorm without bias\)'\]"):
        bank = ExpertBank(m, "generic", n_experts=2, num_timesteps=10).eval()
    assert bank.placement.norm == ("2",) and type(bank.model[1]) is nn.LayerNorm
    x = torch.randn(3, 4)
    assert rel(bank(x, expert_idx=1), m(x)) < 1e-6
    with pytest.raises(ValueError, match=r"LayerNorm without a bias \(bias=False\)"):
        ExpertBank(m, Placement(norm=("1",)), n_experts=2, num_timesteps=10)


def test_a_new_bank_takes_the_mode_of_its_model():
    """The routed modules were made in train mode inside an eval model: a bank built (or load_experts'ed)
    around an eval classifier normalised by batch statistics and overwrote its experts' running statistics,
    and in a train-mode model the BatchNorms no expert owns updated the frozen base until .train() was called."""
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 600, 900])
    bank = randomise_bank(ExpertBank(randomise_bn(Tiny()).eval(), "generic", n_experts=5))
    assert not any(m.training for m in bank.modules())
    stats = {k: v.clone() for k, v in bank.named_buffers()}
    y = bank(x, t)
    assert all(torch.equal(v, stats[k]) for k, v in bank.named_buffers())
    assert rel(bank(x[:1], t[:1]), y[:1]) < 1e-5  # per sample: no batch statistics (expert 0 has two samples)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.Flatten(), nn.Linear(512, 4))
    bank = ExpertBank(m.train(), "generic", n_experts=5)
    assert bank.training and bank.model[0].training and not bank.model[1].training
    before = bank.model[1].running_mean.clone()
    bank(x * 3, t)
    assert torch.equal(bank.model[1].running_mean, before)


def test_a_module_the_bank_cannot_route_is_named():
    """'routed conv supports padding_mode='zeros' only' (or a BatchNorm without running statistics) did not say
    which of the model's modules the placement should leave out."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                      nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ValueError, match=r"cannot route '1' \(Conv2d\): routed conv supports padding_mode='zeros'"):
        ExpertBank(m, "generic", n_experts=2, num_timesteps=10)
    with pytest.raises(ValueError, match=r"cannot route '2' \(BatchNorm2d\): ExpertBatchNorm needs track_running"):
        ExpertBank(m, Placement(norm=("2",)), n_experts=2, num_timesteps=10)


def test_hooks_on_replaced_modules_are_named():
    """A forward hook on a module that gets experts stopped running in the bank, silently (it was replaced)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(x).relu())

    net = Net()
    net.a.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match=r"hooks registered on \['a'\] do not run in the bank") as rec:
        ExpertBank(net, Placement(lora=("a",), bias=("head",), r=2, alpha=2), n_experts=2, num_timesteps=10)
    assert rec[0].filename == __file__
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ExpertBank(net, Placement(bias=("head",)), n_experts=2, num_timesteps=10)  # a is kept: its hook runs


def test_generic_bank_leaves_a_head_with_its_own_forward_shared():
    """The head left out of LoRA still got a per-expert bias when it was a subclass with its own forward, which
    the bank then refused (the whole model could not get a generic bank)."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), Scaled(4, 2)).double().eval()
    with pytest.warns(UserWarning, match=r"generic placement leaves 1 module\(s\) without experts .*\['2 \(Scaled\)'\]"):
        bank = randomise_bank(ExpertBank(m, "generic", n_experts=2, num_timesteps=10)).eval()
    assert bank.placement.lora == ("0",) and bank.placement.bias == ("0",) and type(bank.model[2]) is Scaled
    x = torch.randn(3, 3, dtype=torch.float64)
    ref = copy.deepcopy(m)
    ref[0].load_state_dict(bank.model[0].to_plain(1).state_dict())
    y = bank(x, expert_idx=1)
    assert torch.isfinite(y).all() and rel(y, ref(x)) < 1e-12


def test_generic_placement_warns_of_every_layer_with_weights_it_leaves_shared():
    """ConvTranspose2d, Conv1d, InstanceNorm2d, Embedding and LayerNorm(bias=False) were left shared without a word
    (a ConvTranspose2d decoder got no expert); they are named in one warning, the rest gets its experts."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.up = nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 3, padding=1)
            self.bn, self.inorm = nn.BatchNorm2d(4), nn.InstanceNorm2d(4, affine=True)
            self.c1d, self.emb = nn.Conv1d(4, 4, 1), nn.Embedding(3, 4)
            self.ln_nobias, self.fc = nn.LayerNorm(4, bias=False), nn.Linear(4, 2)

        def forward(self, x):
            h = self.inorm(self.bn(self.up(self.conv(x))))
            h = self.c1d(h.flatten(2)).mean(2) + self.emb.weight[0]
            return self.fc(self.ln_nobias(h))

    torch.manual_seed(0)
    m = Net().double().eval()
    with pytest.warns(UserWarning, match=r"^generic placement leaves 5 layer\(s\) with weights shared and frozen .*"
                                         r"\['up \(ConvTranspose2d\)', 'inorm \(InstanceNorm2d\)', 'c1d \(Conv1d\)', "
                                         r"'emb \(Embedding\)', 'ln_nobias \(LayerNorm without bias\)'\]; give a "
                                         r"Placement to place experts yourself$") as w:
        bank = randomise_bank(ExpertBank(m, "generic", n_experts=2, num_timesteps=10)).eval()
    assert len(w) == 1
    p = bank.placement
    assert (p.lora, p.bias, p.norm) == (("conv",), ("conv", "fc"), ("bn",))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = copy.deepcopy(m)
    for name in ("conv", "bn", "fc"):
        setattr(ref, name, bank.model.get_submodule(name).to_plain(1))
    y = bank(x, expert_idx=1)
    assert torch.isfinite(y).all() and rel(y, ref(x)) < 1e-12 and rel(y, m(x)) > 1e-2


@pytest.mark.parametrize("field", ["lora", "bias", "norm"])
def test_placement_refuses_a_single_name_given_as_a_string(field):
    """Placement(lora="conv1") became ('c', 'o', 'n', 'v', '1'): the bank then named five modules not in the model."""
    with pytest.raises(ValueError, match=rf"^Placement\.{field} must be a list of module names, got the string "
                                         r"'conv1': write \('conv1',\)$"):
        Placement(**{field: "conv1"})
    with pytest.raises(ValueError, match=rf"^Placement\.{field} must be a list"):
        Placement.from_dict({**Placement().to_dict(), field: "conv1"})
    assert getattr(Placement(**{field: ["conv1"]}), field) == ("conv1",)
