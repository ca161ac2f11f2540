"""export_peft: one expert -> a peft LoRA adapter that PeftModel.from_pretrained loads on the plain model."""
import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ppap_fast.experts import ExpertBank, Placement, export_peft

from _util import randomise_bank, randomise_bn, rel

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32, relative norm error


class ConvNet(nn.Module):
    """ResNet-like stem + block, a grouped and a depthwise conv, GroupNorm, a conv with bias."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.block.bn1 = nn.BatchNorm2d(16)
        self.block.conv2 = nn.Conv2d(16, 24, 3, padding=1, groups=4, bias=False)  # grouped
        self.block.bn2 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=True)  # depthwise, with bias
        self.gn = nn.GroupNorm(4, 24)
        self.pw = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.block.bn1(self.block.conv1(x)))
        x = F.relu(self.block.bn2(self.block.conv2(x)))
        x = self.gn(self.dw(x))
        x = self.pw(x).mean((2, 3))
        return self.fc(x)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(a @ v)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """DeiT-like names: blocks.i.attn.{qkv,proj} via an ``attn`` holder, LayerNorms, head."""

    def __init__(self, d=16, depth=2):
        super().__init__()
        self.patch = nn.Linear(12, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        for b in self.blocks:  # timm naming: blocks.i.attn.qkv / blocks.i.attn.proj
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = b.qkv, b.proj
            del b.qkv, b.proj
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        x = self.patch(x)
        for b in self.blocks:
            q, k, v = b.attn.qkv(b.norm1(x)).chunk(3, dim=-1)
            a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            x = x + b.attn.proj(a @ v)
            x = x + b.fc2(F.gelu(b.fc1(b.norm2(x))))
        return self.head(self.norm(x).mean(1))


def _load(plain, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about grouped-conv merging and lora_bias shapes
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(plain), str(path))
    return pm.eval()


def _roundtrip(bank, plain, x, tmp_path, base_model=None, experts=None):
    bank.eval()
    errs = []
    outs = []
    for n in experts if experts is not None else range(bank.n_experts):
        cfg = export_peft(bank, n, tmp_path / f"e{n}", base_model=base_model)
        with torch.no_grad():
            want = bank(x, expert_idx=n)
            got = _load(plain, tmp_path / f"e{n}")(x)
        errs.append(rel(got, want))
        outs.append(want)
    assert max(errs) < TOL, errs
    # the experts differ from each other and from the base: a no-op export could not pass
    with torch.no_grad():
        base = plain.eval()(x)
    assert min(rel(o, base) for o in outs) > 1e-2
    if len(outs) > 1:
        assert rel(outs[0], outs[1]) > 1e-2
    return cfg


@pytest.mark.parametrize("layout", ["factorised", "loralib"])
def test_convnet_roundtrip(tmp_path, layout):
    plain = randomise_bn(ConvNet(), affine=False)
    p = Placement(lora=("conv1", "block.conv1", "block.conv2", "dw", "pw", "fc"),
                  bias=("dw", "pw", "fc"), norm=("bn1", "block.bn1", "block.bn2", "gn"), r=2, alpha=3,
                  layout=layout)
    bank = randomise_bank(ExpertBank(plain, p, n_experts=4))
    x = torch.randn(2, 3, 8, 8)
    cfg = _roundtrip(bank, plain, x, tmp_path, base_model=plain)
    assert cfg["lora_bias"] is True
    assert sorted(cfg["modules_to_save"]) == sorted(p.norm)
    keys = json.loads((tmp_path / "e0" / "adapter_config.json").read_text())
    assert keys["peft_type"] == "LORA" and keys["use_rslora"] is False


def test_resnet18_roundtrip(tmp_path):
    tv = pytest.importorskip("torchvision")
    plain = randomise_bn(tv.models.resnet18(weights=None, num_classes=7), affine=False)
    bank = randomise_bank(ExpertBank(plain, "resnet", n_experts=4, r=4, alpha=2, layout="factorised"),
                          std=0.05)
    x = torch.randn(2, 3, 32, 32)
    cfg = _roundtrip(bank, plain, x, tmp_path, experts=[0, 3])
    # official resnet rule: LoRA convs have no bias, every BN (and downsample.1's bias + stats) is saved
    assert cfg["lora_bias"] is False
    assert "layer2.0.downsample.1" in cfg["modules_to_save"]


def test_resnet18_loralib_uses_rank_pattern(tmp_path):
    tv = pytest.importorskip("torchvision")
    plain = randomise_bn(tv.models.resnet18(weights=None, num_classes=7), affine=False)
    bank = randomise_bank(ExpertBank(plain, "resnet", n_experts=2, r=2, alpha=1, layout="loralib"), std=0.05)
    x = torch.randn(1, 3, 32, 32)
    cfg = _roundtrip(bank, plain, x, tmp_path)
    # 3x3 loralib rank r=2 -> r*kh*kh = 18 (or the dense C_out when smaller): per-module ranks
    assert cfg["rank_pattern"] and all(v in (18, 64) for v in cfg["rank_pattern"].values())


def test_linear_deit_like_roundtrip(tmp_path):
    plain = TinyViT()
    bank = randomise_bank(ExpertBank(plain, "deit", n_experts=5, r=4, alpha=8))
    x = torch.randn(3, 6, 12)
    cfg = _roundtrip(bank, plain, x, tmp_path, base_model=plain)
    # LoRA + per-expert bias on qkv/proj -> lora_bias; plain Linear/LayerNorm biases -> modules_to_save
    assert cfg["lora_bias"] is True
    assert "blocks.0.norm1" in cfg["modules_to_save"] and "head" in cfg["modules_to_save"]
    assert not any("attn" in m for m in cfg["modules_to_save"])


# ----------------------------------------------------------------------------- refusals
def test_lora_bias_needs_base_model(tmp_path):
    bank = ExpertBank(TinyViT(), "deit", n_experts=2)
    with pytest.raises(ValueError, match=r"call export_peft\(bank, 0, out_dir, base_model=model\)"):
        export_peft(bank, 0, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_lora_bias_refusal_of_a_generic_bank_is_one_line_naming_the_call(tmp_path):
    """The refusal listed every LoRA module with a per-expert bias (hundreds in a generic bank of a real model)
    and did not say which call to make."""
    plain = TinyViT(depth=4)
    bank = ExpertBank(plain, "generic", n_experts=2)
    biased = [k for k, m in bank.routed_modules() if getattr(m, "lora_A", None) is not None and m.expert_bias is not None]
    assert len(biased) == 17
    with pytest.raises(ValueError, match=r"^expert 1: 17 LoRA module\(s\) with a per-expert bias \(\['blocks\.0\.attn\.proj', "
                                         r"'blocks\.0\.attn\.qkv', 'blocks\.0\.fc1'\] \.\.\.\).* call "
                                         r"export_peft\(bank, 1, out_dir, base_model=model\) with the plain model "
                                         r"the bank was built from.*$") as e:
        export_peft(bank, 1, tmp_path / "a")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400 and not (tmp_path / "a").exists()
    cfg = export_peft(bank, 1, tmp_path / "b", base_model=plain)
    assert cfg["lora_bias"] is True and (tmp_path / "b" / "adapter_model.safetensors").is_file()


def test_dilated_conv_refused(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    bank = ExpertBank(m, Placement(lora=("0",), r=2, alpha=2), n_experts=2)
    with pytest.raises(ValueError, match=r"'?0'? \(Conv2d with dilation \(2, 2\)"):
        export_peft(bank, 1, tmp_path / "a")


@pytest.mark.parametrize("layout", ["factorised", "loralib"])
def test_dilated_1x1_conv_exported_exactly(tmp_path, layout):
    """A 1x1 conv with dilation > 1 was refused, though dilation has no effect on a 1x1 kernel."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, padding=1, dilation=2), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    m = m.double().eval()
    bank = randomise_bank(ExpertBank(m, Placement(lora=("0", "2"), bias=("0",), r=2, alpha=2, layout=layout),
                                     n_experts=2)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for n in range(2):
        export_peft(bank, n, tmp_path / f"e{n}", base_model=m)
        with torch.no_grad():
            want = bank(x, expert_idx=n)
            got = _load(m, tmp_path / f"e{n}")(x)
            base = m(x)
        assert got.dtype == torch.float64 and torch.isfinite(got).all()
        assert rel(got, want) < 1e-12 and rel(want, base) > 1e-2, (rel(got, want), rel(want, base))


def test_suffix_conflict_refused(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.proj = nn.Linear(4, 4)  # LoRA target
            self.proj = nn.LayerNorm(4)  # per-expert norm: peft's suffix match would also grab inner.proj

        def forward(self, x):
            return self.proj(self.inner.proj(x))

    bank = ExpertBank(M(), Placement(lora=("inner.proj",), norm=("proj",), r=2, alpha=2), n_experts=2)
    with pytest.raises(ValueError, match=r"LoRA modules it would not adapt: \['inner.proj'\]"):
        export_peft(bank, 0, tmp_path / "a")


def test_saved_name_matching_peft_own_submodules_refused(tmp_path):
    """peft adds lora_dropout / lora_A / ... under every LoRA target before it suffix-matches
    modules_to_save: a per-expert head named "out" would match "<target>.lora_dropout" (TypeError
    when peft loads the adapter). Refused up front, nothing written."""
    class Attn(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    class Net(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.embed, self.attn, self.norm, self.out = nn.Linear(12, d), Attn(d), nn.LayerNorm(d), nn.Linear(d, 4)

        def forward(self, x):
            h = self.embed(x)
            q, k, v = self.attn.qkv(h).chunk(3, -1)
            h = h + self.attn.proj(torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
            return self.out(self.norm(h).mean(1))

    plain = Net().eval()
    bank = ExpertBank(plain, "deit", n_experts=2, r=4, alpha=8).eval()
    with pytest.raises(ValueError, match=r"peft's own LoRA submodules it would match: .*lora_dropout"):
        export_peft(bank, 1, tmp_path / "a", base_model=plain)
    assert not (tmp_path / "a").exists()


def test_numpy_and_tensor_expert_indices():
    import numpy as np

    bank = ExpertBank(ConvNet(), Placement(lora=("conv1",), norm=("bn1",), r=2, alpha=2), n_experts=2)
    for n in (np.int64(1), torch.tensor(1)):
        assert bank.expert_state_dict(n).keys() == bank.expert_state_dict(1).keys()
    for bad in (True, 1.0, torch.tensor([1]), torch.tensor(1.0)):
        with pytest.raises(ValueError, match="integer index"):
            bank.expert_state_dict(bad)


def test_base_model_mismatch_refused(tmp_path):
    plain = TinyViT()
    bank = ExpertBank(plain, "deit", n_experts=2)
    other = copy.deepcopy(plain)
    with torch.no_grad():
        other.blocks[1].fc1.weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"blocks.1.fc1.weight: differs"):
        export_peft(bank, 0, tmp_path / "a", base_model=other)


def test_routed_base_model_refused(tmp_path):
    """base_model=bank.model passed the check, then crashed: 'NoneType' object has no attribute 'detach'
    (the routed modules keep no base bias where it is per expert); the error now says what to pass."""
    plain = TinyViT()
    bank = ExpertBank(plain, "deit", n_experts=2)
    for routed in (bank.model, bank):
        with pytest.raises(ValueError, match=r"routed modules \(\['(model\.)?patch', '(model\.)?blocks.0.norm1'.*"
                                             r"pass the plain \(un-routed\) model"):
            export_peft(bank, 0, tmp_path / "a", base_model=routed)
    assert not (tmp_path / "a").exists()
    export_peft(bank, 0, tmp_path / "a", base_model=plain)


def test_base_model_missing_weight_or_bias_refused(tmp_path):
    """A base module at a routed name without weight / with bias=None was a bare AttributeError."""
    plain = TinyViT()
    bank = ExpertBank(plain, "deit", n_experts=2)  # qkv: LoRA + per-expert bias; norm1: shared weight
    other = copy.deepcopy(plain)
    other.blocks[0].attn.qkv.bias = None  # the bank keeps only the per-expert bias here
    other.blocks[1].attn.proj = nn.Identity()
    other.blocks[1].norm1.weight = None
    with pytest.raises(ValueError, match=r"4 differences.*blocks.0.attn.qkv.bias: missing in base_model.*"
                                         r"blocks.1.norm1.weight: missing in base_model.*"
                                         r"blocks.1.attn.proj.weight: missing in base_model.*"
                                         r"blocks.1.attn.proj.bias: missing in base_model"):
        export_peft(bank, 0, tmp_path / "a", base_model=other)
    assert not (tmp_path / "a").exists()


def test_base_model_not_a_module_refused(tmp_path):
    """A state_dict as base_model was a bare AttributeError on named_modules."""
    plain = TinyViT()
    bank = ExpertBank(plain, "deit", n_experts=2)
    with pytest.raises(TypeError, match=r"base_model must be the plain nn.Module .* got OrderedDict"):
        export_peft(bank, 0, tmp_path / "a", base_model=plain.state_dict())
    assert not (tmp_path / "a").exists()


def test_bad_expert_and_nonfinite(tmp_path):
    plain = ConvNet()
    bank = ExpertBank(plain, Placement(lora=("conv1",), norm=("bn1",), r=2, alpha=2), n_experts=2)
    with pytest.raises(ValueError, match="out of range"):
        export_peft(bank, 2, tmp_path / "a")
    with torch.no_grad():
        bank.model.bn1.running_var[1, 0] = float("nan")
    export_peft(bank, 0, tmp_path / "a")  # expert 0 is finite
    with pytest.raises(ValueError, match="non-finite.*bn1.running_var"):
        export_peft(bank, 1, tmp_path / "b")


def test_output_that_is_a_file_is_named(tmp_path):
    """An existing file as out_dir (or a folder above it) was a bare FileExistsError / NotADirectoryError."""
    bank = ExpertBank(ConvNet(), Placement(lora=("conv1",), norm=("bn1",), r=2, alpha=2), n_experts=2)
    f = tmp_path / "adapter"
    f.write_text("keep")
    for out in (f, f / "sub"):
        with pytest.raises(ValueError, match=f"export_peft: {f} is a file, not a directory"):
            export_peft(bank, 0, out)
    assert f.read_text() == "keep"


# ----------------------------------------------------------------------------- CLI (shipped demo weights)
def test_cli_export_peft_shipped(tmp_path, capsys):
    from ppap_fast.cli import main
    from ppap_fast.demo import WEIGHTS_DIR
    from ppap_fast.experts import load_experts
    from ppap_fast.models.tiny import load_model

    out = tmp_path / "adapter"
    assert main(["--threads", "1", "export-peft", "--expert", "3", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["band"] == [600, 800]
    plain = load_model(WEIGHTS_DIR / "classifier.safetensors", "resnet").eval()
    bank = load_experts(WEIGHTS_DIR / "ppap5", plain).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        want = bank(x, expert_idx=3)
        got = _load(plain, out)(x)
        other = bank(x, expert_idx=0)
    assert rel(got, want) < TOL and rel(other, want) > 1e-3

    assert main(["--threads", "1", "export-peft", "--expert", "5", "--out", str(tmp_path / "bad")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("experts,base", [("seg_ppap5", "segnet"), ("semseg_ppap5", "semseg")])
def test_cli_export_peft_segmentation_experts(tmp_path, capsys, experts, base):
    """export-peft loaded classifier.safetensors as the base of every folder: the shipped seg_ppap5 failed with
    'placement names modules not in TinyResNet'; its base is the segnet (semseg_ppap5's: the semantic net)."""
    import warnings

    from ppap_fast.cli import main
    from ppap_fast.demo import WEIGHTS_DIR
    from ppap_fast.experts import load_experts
    from ppap_fast.models.tiny import load_model

    out = tmp_path / "adapter"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no experts loaded onto another net's weights
        assert main(["--threads", "1", "export-peft", "--experts-dir", str(WEIGHTS_DIR / experts), "--expert", "2",
                     "--out", str(out)]) == 0, capsys.readouterr().err
    plain = load_model(WEIGHTS_DIR / f"{base}.safetensors", "segnet").eval()
    bank = load_experts(WEIGHTS_DIR / experts, plain).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = bank(x, expert_idx=2)
        got = _load(plain, out)(x)
    assert rel(got, want) < TOL


def test_timm_conv2dsame_and_groupnormact_experts_roundtrip(tmp_path):
    """Experts on timm's Conv2dSame (tf_efficientnet) and GroupNormAct (BiT): peft builds its conv lora_A of the
    base layer's own class (Conv2dSame pads it alike) and saves GroupNormAct whole."""
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    plain = nn.Sequential(layers.Conv2dSame(3, 8, 3, stride=2), layers.GroupNormAct(8, num_groups=2),
                          layers.Conv2dSame(8, 8, 4, groups=4), layers.GroupNormAct(8, num_groups=4, act_layer="silu"),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 3)).eval()
    bank = randomise_bank(ExpertBank(plain, "generic", n_experts=2, num_timesteps=10))
    assert bank.placement.lora == ("0", "2") and bank.placement.norm == ("1", "3")
    for layout in ("factorised", "loralib"):
        bank = randomise_bank(ExpertBank(plain, "generic", n_experts=2, num_timesteps=10, layout=layout))
        _roundtrip(bank, plain, torch.randn(2, 3, 9, 9), tmp_path / layout, base_model=plain)


def test_base_model_without_a_shared_layer_refused(tmp_path):
    """Only the routed modules were looked up in base_model: one lacking a shared (un-routed) layer with weights
    passed the check, and peft then loaded the adapter on the wrong model."""
    plain = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    bank = ExpertBank(plain, Placement(lora=("0", "3"), r=2, alpha=2), n_experts=2)
    bank.model[1].register_buffer("cache", torch.ones(1), persistent=False)  # filled by a call: not the base's
    other = nn.Sequential(copy.deepcopy(plain[0]), nn.Identity(), nn.Identity(), copy.deepcopy(plain[3]))
    with pytest.raises(ValueError, match=r"^base_model is not the bank's frozen base model \(7 differences\): "
                                         r"\['1.weight: missing in base_model', '1.bias: missing in base_model', "
                                         r"'2.weight: missing in base_model', .*'2.num_batches_tracked: missing in "
                                         r"base_model'\]; pass the plain model the bank was built from$"):
        export_peft(bank, 0, tmp_path / "a", base_model=other)
    assert not (tmp_path / "a").exists()
    assert export_peft(bank, 0, tmp_path / "b", base_model=plain)["lora_bias"] is False
