"""The generic placement on timm / torchvision models whose norms are subclasses with their own forward:
timm's BatchNormAct2d (efficientnet) and LayerNorm2d (timm and torchvision convnext). The bank refused them
(ValueError), so these off-the-shelf models needed a hand-filtered placement."""
import copy
from collections import Counter

import pytest
import torch

from ppap_fast.experts import ExpertBank, load_experts, save_experts
from ppap_fast.experts.bank import ExpertBatchNorm, ExpertLayerNorm

from _util import randomise_bank

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")

def bit_resnetv2():
    """A small BiT ResNetV2: StdConv2d convolutions, GroupNormAct norms."""
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1, 1, 1], channels=(128, 128, 256, 256), stem_chs=32, num_classes=10)


MODELS = {
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0", pretrained=False),
    "timm_tf_efficientnet_b0": lambda: timm.create_model("tf_efficientnet_b0", pretrained=False),
    "timm_bit_resnetv2": bit_resnetv2,
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False),
    "torchvision_convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
}
SPECIAL = {"timm_efficientnet_b0": "BatchNormAct2d", "timm_tf_efficientnet_b0": "BatchNormAct2d",
           "timm_bit_resnetv2": "GroupNormAct", "timm_convnext_atto": "LayerNorm2d",
           "torchvision_convnext_tiny": "LayerNorm2d"}


def make(name):
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    bank = randomise_bank(ExpertBank(model, "generic", n_experts=2, num_timesteps=10)).eval()
    return model, bank


def expert_copy(model, bank, n):
    """A deep copy of ``model`` (its own classes and forwards) holding expert ``n``'s parameters."""
    ref = copy.deepcopy(model)
    for name, m in bank.routed_modules():
        if isinstance(m, (ExpertBatchNorm, ExpertLayerNorm)):
            state = {k.removeprefix("expert_"): getattr(m, k)[n] for k in m.per_expert}
        else:
            state = m.to_plain(n).state_dict()
        ref.get_submodule(name).load_state_dict(state)
    return ref


def max_err(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_generic_bank_equals_the_model_with_expert_parameters_in_eval(name):
    model, bank = make(name)
    routed = {type(model.get_submodule(n)).__name__ for n in bank.placement.norm}
    assert SPECIAL[name] in routed
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    refs = [expert_copy(model, bank, n).eval() for n in range(2)]
    with torch.no_grad():
        for n in range(2):
            assert max_err(bank(x, expert_idx=n), refs[n](x)) < 1e-12
        mixed = bank(x, expert_idx=torch.tensor([0, 1, 1]))
        assert max_err(mixed, torch.cat([refs[0](x[:1]), refs[1](x[1:])])) < 1e-12
        for n in range(2):
            unfolded = bank.merged(n, fold_bn=False)
            assert type(unfolded.get_submodule(bank.placement.norm[0])).__name__ in routed
            assert max_err(unfolded(x), bank(x, expert_idx=n)) < 1e-12
            assert max_err(bank.merged(n)(x), bank(x, expert_idx=n)) < 1e-12


def test_efficientnet_batchnormact_in_train_mode_matches_and_updates_only_its_expert():
    model, bank = make("timm_efficientnet_b0")
    ref = expert_copy(model, bank, 1).train()
    bank.train()
    stats0 = {k: v[0].clone() for k, v in bank.per_expert_state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    y = bank(x, expert_idx=1)
    torch.manual_seed(1)
    y_ref = ref(x)
    assert max_err(y, y_ref) < 1e-12
    y.square().sum().backward()
    y_ref.square().sum().backward()
    bn = "blocks.1.0.bn2"
    routed = bank.model.get_submodule(bn)
    plain = ref.get_submodule(bn)
    assert type(plain).__name__ == "BatchNormAct2d" and not isinstance(plain.act, torch.nn.Identity)
    assert max_err(routed.expert_bias.grad[1], plain.bias.grad) < 1e-10
    assert routed.expert_bias.grad[0].abs().max() == 0
    for k in ("running_mean", "running_var"):
        assert max_err(getattr(routed, k)[1], getattr(plain, k)) < 1e-12
        assert torch.equal(getattr(routed, k)[0], stats0[f"{bn}.{k}"])


@pytest.mark.parametrize("name", ["timm_efficientnet_b0", "torchvision_convnext_tiny", "timm_bit_resnetv2"])
def test_generic_bank_save_load_round_trip(name, tmp_path):
    model, bank = make(name)
    save_experts(bank, tmp_path / "experts")
    loaded = load_experts(tmp_path / "experts", model).eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for n in range(2):
            y = bank(x, expert_idx=n)
            assert torch.isfinite(y).all() and torch.equal(loaded(x, expert_idx=n), y)


def test_layernorm2d_expert_refuses_a_non_nchw_input_in_one_line():
    model, bank = make("timm_convnext_atto")
    norm = bank.model.get_submodule("stem.1")
    bank._router.set(torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"LayerNorm2d normalises the channels of \[B, C, H, W\] maps, got shape"):
        norm(torch.randn(2, 4, 40, dtype=torch.float64))


def test_merged_efficientnet_folds_its_batchnormact_into_the_convs():
    """merged() left every BatchNormAct2d unfolded (fx traced through it): fast sampling ran them all."""
    model, bank = make("timm_efficientnet_b0")
    merged = bank.merged(1)
    kinds = Counter(type(m).__name__ for m in merged.modules())
    assert kinds["BatchNormAct2d"] == 0 and kinds["DropAct"] == 49
    assert type(merged.bn1.act).__name__ == "SiLU"
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert max_err(merged(x), bank(x, expert_idx=1)) < 1e-12



@pytest.mark.parametrize("size", [32, 33])
def test_tf_efficientnet_conv2dsame_layers_get_experts_with_their_dynamic_padding(size):
    """The generic placement put LoRA on timm's Conv2dSame (TF 'same' padding computed per input size), which the
    bank then refused: tf_efficientnet could not get a generic bank. Now routed, padded as Conv2dSame pads."""
    model, bank = make("timm_tf_efficientnet_b0")
    same = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame")
    assert "conv_stem" in same and len(same) == 5 and set(same) <= set(bank.placement.lora)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        for n in range(2):
            ref = expert_copy(model, bank, n).eval()
            assert type(ref.conv_stem).__name__ == "Conv2dSame"
            y = bank(x, expert_idx=n)
            assert max_err(y, ref(x)) < 1e-12
            merged = bank.merged(n)
            kinds = Counter(type(m).__name__ for m in merged.modules())
            assert type(merged.conv_stem).__name__ == "Conv2dSame" and kinds["Conv2dSame"] == 5
            assert kinds["BatchNormAct2d"] == 0 and kinds["DropAct"] == 49  # folded into the convs, Conv2dSame's too
            assert max_err(merged(x), y) < 1e-12


def test_bit_resnetv2_groupnormact_gets_experts_and_stdconv2d_is_left_shared_with_a_warning():
    """StdConv2d (weight standardisation of W + delta would need the dense delta per expert) was placed by the
    generic rule, which the bank then refused: a BiT model could not get a generic bank at all."""
    torch.manual_seed(0)
    model = bit_resnetv2().double().eval()
    std = {n for n, m in model.named_modules() if type(m).__name__ == "StdConv2d"}
    gn_act = {n for n, m in model.named_modules() if type(m).__name__ == "GroupNormAct"}
    with pytest.warns(UserWarning, match=rf"generic placement leaves {len(std)} module\(s\) without experts .*StdConv2d "
                                         r"standardises its weight, .*across processes\): \['stem\.conv "
                                         r"\(StdConv2d\)'"):
        bank = randomise_bank(ExpertBank(model, "generic", n_experts=2, num_timesteps=10)).eval()
    p = bank.placement
    assert std.isdisjoint({*p.lora, *p.bias, *p.norm}) and gn_act == set(p.norm) and p.lora
    assert all(type(bank.model.get_submodule(n)).__name__ == "StdConv2d" for n in std)
    routed = bank.model.get_submodule("stages.0.blocks.0.norm1")
    assert not isinstance(routed.act, torch.nn.Identity) and type(bank.merged(0).stages[0].blocks[0].norm1).__name__ \
        == "GroupNormAct"


def test_bit_resnetv2_groupnormact_expert_gradients_in_train_mode():
    model, bank = make("timm_bit_resnetv2")
    bank.train()
    ref = expert_copy(model, bank, 1).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y, y_ref = bank(x, expert_idx=1), ref(x)
    assert max_err(y, y_ref) < 1e-12
    y.square().sum().backward()
    y_ref.square().sum().backward()
    name = "stages.1.blocks.0.norm2"
    routed, plain = bank.model.get_submodule(name), ref.get_submodule(name)
    assert type(plain).__name__ == "GroupNormAct" and isinstance(plain.act, torch.nn.ReLU)
    assert max_err(routed.expert_bias.grad[1], plain.bias.grad) < 1e-10
    assert max_err(routed.expert_weight.grad[1], plain.weight.grad) < 1e-10
    assert routed.expert_bias.grad[0].abs().max() == 0


def test_per_expert_bias_on_a_conv2dsame_pads_as_it():
    from ppap_fast.experts import Placement

    torch.manual_seed(0)
    model = torch.nn.Sequential(timm.layers.Conv2dSame(3, 4, 4, stride=2)).double().eval()
    bank = randomise_bank(ExpertBank(model, Placement(bias=("0",)), n_experts=2, num_timesteps=10)).eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref[0].bias.copy_(bank.model[0].expert_bias[1])
        y = bank(x, expert_idx=1)
        assert y.shape == (2, 4, 5, 5) and max_err(y, ref(x)) < 1e-12
        assert type(bank.merged(1)[0]).__name__ == "Conv2dSame" and max_err(bank.merged(1)(x), y) < 1e-12


def test_generic_placement_finds_a_timm_linear_head():
    """torch.fx traced through timm's Linear (a subclass with its own forward): the head search walked past its
    F.linear to the layer before it, so mobilenetv3's classifier got LoRA and the conv before it was taken for
    the head (a plain Sequential: its first Linear)."""
    from ppap_fast.experts.placement import generic_placement, output_linear

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), timm.layers.Linear(4, 2))
    assert output_linear(model) == (True, "2") and generic_placement(model).lora == ("0",)
    mnv3 = timm.create_model("mobilenetv3_small_050", pretrained=False)
    assert type(mnv3.classifier) is timm.layers.Linear
    assert output_linear(mnv3) == (True, "classifier")
    p = generic_placement(mnv3)
    assert "classifier" not in p.lora and "conv_head" in p.lora and "classifier" in p.bias
