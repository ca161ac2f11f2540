"""Single-expert LoRA layers: merge == unmerged, loralib golden, gradcheck, bad input."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppap_fast.experts.lora import LoRAConv2d, LoRALinear

from _util import rel

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def randomise(layer, std=0.3):
    with torch.no_grad():
        layer.lora_A.normal_(0, std)
        layer.lora_B.normal_(0, std)
    return layer


CONVS = {
    "1x1": dict(in_channels=8, out_channels=12, kernel_size=1),
    "3x3_s2": dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, bias=True),
    "7x7_stem": dict(in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3),
    "dilated": dict(in_channels=8, out_channels=8, kernel_size=3, padding=2, dilation=2, bias=True),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
    "grouped": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4, bias=True),
    "nonsquare": dict(in_channels=4, out_channels=6, kernel_size=(3, 1), padding=(1, 0)),
}


def _explicit_delta(layer):
    """Delta computed independently of the module's own code (loops over groups)."""
    W = layer.weight
    if layer.layout == "loralib":
        return (layer.lora_B @ layer.lora_A).reshape(W.shape) * layer.alpha / layer.r
    g = layer.groups
    c_out, cin_g = W.shape[:2]
    R = layer.lora_A.shape[0]
    out = torch.empty_like(W)
    for j in range(g):
        A_j = layer.lora_A[j * R // g:(j + 1) * R // g].reshape(R // g, -1)
        B_j = layer.lora_B[j * c_out // g:(j + 1) * c_out // g]
        out[j * c_out // g:(j + 1) * c_out // g] = (B_j @ A_j).reshape(c_out // g, cin_g, *W.shape[2:])
    return out * layer.alpha / layer.r


@pytest.mark.parametrize("layout", ["factorised", "loralib"])
@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv_merge_equals_unmerged(case, layout):
    base = nn.Conv2d(**CONVS[case]).to(D)
    layer = randomise(LoRAConv2d(base, r=2, alpha=3, layout=layout))
    assert layer.delta_weight().shape == base.weight.shape
    x = torch.randn(2, base.in_channels, 9, 10, dtype=D)
    y = layer(x)
    # unmerged forward == conv with the explicitly built effective weight
    ref = F.conv2d(x, base.weight + _explicit_delta(layer), base.bias, base.stride, base.padding, base.dilation,
                   base.groups)
    assert rel(y, ref) < 1e-12
    assert rel(y, base(x)) > 1e-3  # the adapter does something
    W0 = layer.weight.clone()
    layer.merge()
    assert layer.merged
    assert rel(layer(x), y) < 1e-12
    layer.unmerge()
    assert rel(layer.weight, W0) < 1e-14 and rel(layer(x), y) < 1e-12


def test_factorised_shapes_rank_per_group():
    layer = LoRAConv2d(nn.Conv2d(8, 8, 3, padding=1, groups=8), r=2, layout="factorised")
    assert layer.lora_A.shape == (16, 1, 3, 3) and layer.lora_B.shape == (8, 2)
    layer = LoRAConv2d(nn.Conv2d(16, 32, 3), r=16, layout="loralib")
    assert layer.lora_A.shape == (48, 48) and layer.lora_B.shape == (96, 48)


def test_linear_merge_and_scale():
    base = nn.Linear(7, 5).to(D)
    layer = randomise(LoRALinear(base, r=4, alpha=2))
    x = torch.randn(3, 2, 7, dtype=D)
    y = layer(x)
    # the scale alpha/r IS applied (the official LoRA linear drops it)
    expect = base(x) + 0.5 * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert rel(y, expect) < 1e-13
    assert rel(y, base(x) + (x @ layer.lora_A.T) @ layer.lora_B.T) > 1e-3
    layer.merge(safe_merge=True)
    assert rel(layer(x), y) < 1e-13
    layer.unmerge()
    assert rel(layer.weight, base.weight) < 1e-14


@pytest.mark.parametrize("make", [lambda: LoRALinear(nn.Linear(7, 5).to(D), r=4, alpha=2),
                                  lambda: LoRAConv2d(nn.Conv2d(7, 6, 3, padding=1).to(D), r=4, alpha=2)])
def test_state_dict_of_a_merged_layer_loads_as_the_same_function(make):
    """merge() then state_dict(): the merged weight was saved without the flag, so a fresh layer added the
    delta a second time (silently another function)."""
    layer = randomise(make())
    x = torch.randn(2, 7, 5, 5, dtype=D) if isinstance(layer, LoRAConv2d) else torch.randn(3, 7, dtype=D)
    y = layer(x)
    layer.merge()
    sd = layer.state_dict()
    assert layer.merged and rel(layer(x), y) < 1e-13  # saving leaves the merged layer as it was
    fresh = make()
    fresh.load_state_dict(sd)
    assert rel(fresh(x), y) < 1e-13
    fresh.merge()
    assert rel(fresh(x), y) < 1e-13
    layer.load_state_dict(sd)  # into the merged layer: the loaded, unmerged weight
    assert not layer.merged and rel(layer(x), y) < 1e-13


def test_fresh_adapter_is_identity():
    base = nn.Conv2d(4, 6, 3, padding=1)
    layer = LoRAConv2d(base, r=4, layout="factorised")
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(layer(x), base(x))
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad


def test_safe_merge_rejects_nan():
    layer = randomise(LoRALinear(nn.Linear(4, 4), r=2, alpha=2))
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    W0 = layer.weight.clone()
    with pytest.raises(ValueError, match="not finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, W0)


def _golden_cases(fixtures_dir):
    g = torch.load(fixtures_dir / "ppap_loraconv_golden.pt")
    return [g] + list(g["extra_cases"])


def test_loralib_golden(fixtures_dir):
    for case in _golden_cases(fixtures_dir):
        c = case["conv"]
        base = nn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"], c["stride"], c["padding"],
                         c["dilation"], c["groups"], bias=c["bias"])
        layer = LoRAConv2d(base, r=case["r"], alpha=case["lora_alpha"], layout="loralib")
        sd = case["state_dict"]
        assert layer.scale == case["scaling"] == 0.5
        with torch.no_grad():
            layer.weight.copy_(sd["conv.weight"])
            layer.lora_A.copy_(sd["lora_A"])
            layer.lora_B.copy_(sd["lora_B"])
        x = case["x"]
        assert rel(layer.delta_weight(), case["delta_weight"]) < 1e-6
        assert rel(layer(x), case["out_train"]) < 1e-5
        layer.merge()
        assert rel(layer.weight, case["merged_weight"]) < 1e-6
        assert rel(layer(x), case["out_eval_merged"]) < 1e-5
        layer.unmerge()
        with torch.no_grad():
            layer.lora_B.zero_()
        assert rel(layer(x), case["out_base_only"]) < 1e-5


@pytest.mark.parametrize("layout", ["factorised", "loralib"])
def test_gradcheck_conv(layout):
    layer = randomise(LoRAConv2d(nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True).to(D), r=2, alpha=1,
                                 layout=layout))
    x = torch.randn(1, 2, 5, 5, dtype=D, requires_grad=True)
    A, B = layer.lora_A, layer.lora_B

    def f(x, A, B):
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))

    assert torch.autograd.gradcheck(f, (x, A, B))


def test_gradcheck_linear():
    layer = randomise(LoRALinear(nn.Linear(4, 3).to(D), r=2, alpha=1))
    x = torch.randn(2, 4, dtype=D, requires_grad=True)

    def f(x, A, B):
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))

    assert torch.autograd.gradcheck(f, (x, layer.lora_A, layer.lora_B))


def test_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        LoRAConv2d(nn.Conv2d(2, 2, 1), layout="peft")
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), r=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(2, 2), r=2, alpha=math.nan)
    with pytest.raises(TypeError, match="LoRALinear wraps nn.Linear, got Conv2d"):
        LoRALinear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        LoRAConv2d(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))


def test_rank_and_alpha_are_checked_as_a_placement_checks_them():
    """r=True was a rank-1 adapter, a NumPy int rank was refused, alpha=0 made an adapter that adds and learns
    nothing (Placement refuses all three the other way round)."""
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="LoRA rank r must be a positive int, got True"):
        LoRALinear(nn.Linear(2, 2), r=True)
    with pytest.raises(ValueError, match=r"LoRA alpha must be a finite non-zero number \(the scale alpha / r\), got 0"):
        LoRAConv2d(nn.Conv2d(2, 2, 1), r=2, alpha=0)
    layer = LoRALinear(nn.Linear(3, 4), r=np.int64(2), alpha=np.float32(3))
    assert type(layer.r) is int and type(layer.alpha) is float and layer.scale == 1.5
    assert layer.lora_A.shape == (2, 3) and layer.lora_B.shape == (4, 2)


def test_subclasses_with_their_own_forward_are_refused():
    """LoRAConv2d around timm's Conv2dSame / StdConv2d ran a plain conv: the dynamic padding or the weight
    standardisation was silently dropped (a fresh adapter differed from its base layer)."""
    timm_layers = pytest.importorskip("timm.layers")
    for base in (timm_layers.Conv2dSame(3, 4, 3, stride=2), timm_layers.StdConv2d(3, 4, 3)):
        x = torch.randn(2, 3, 9, 9)
        with pytest.raises(ValueError, match=rf"LoRAConv2d wraps a plain nn.Conv2d: {type(base).__name__} has its own "
                                             "forward, which the LoRA layer would not run"):
            LoRAConv2d(base, r=2)
        assert torch.isfinite(base(x)).all()

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="LoRALinear wraps a plain nn.Linear: Scaled has its own forward"):
        LoRALinear(Scaled(2, 2))
    named = LoRALinear(timm_layers.Linear(3, 2), r=2)  # timm's Linear computes nn.Linear's forward
    x = torch.randn(4, 3)
    assert torch.equal(named(x), F.linear(x, named.weight, named.bias))
