import copy
import json
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from ppap_fast.models import ADM_PRESETS, ADMUNet
from ppap_fast.models.adm import qkv_attention
from ppap_fast.testing import check_adm_golden, check_adm_manifest

from _util import requires_cuda

SMALL = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=8,
             use_scale_shift_norm=True, resblock_updown=True)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_adm_golden(fixtures_dir, attention):
    err = check_adm_golden(fixtures_dir / "adm_small_golden_1.pt", attention=attention)
    assert math.isfinite(err) and err <= 1e-5, err


def test_adm_golden_strict_keys(fixtures_dir):
    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    model = ADMUNet.from_config(g["config"])
    assert list(model.state_dict()) == list(g["state_dict"])
    assert sum(p.numel() for p in model.parameters()) == g["num_params"] == 828358


def test_adm256_manifest(fixtures_dir):
    assert check_adm_manifest(fixtures_dir / "adm256_uncond_keys.json") == 552_814_086


def test_adm256_manifest_tampered_raises(fixtures_dir, tmp_path):
    m = json.loads((fixtures_dir / "adm256_uncond_keys.json").read_text())
    params = m["params"]
    params["middle_block.1.qkv.weight"] = [1, 2, 3]
    del params["out.2.bias"]
    params["extra.weight"] = [4]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(m))
    with pytest.raises(ValueError) as e:
        check_adm_manifest(p)
    msg = str(e.value)
    assert "middle_block.1.qkv.weight" in msg and "out.2.bias" in msg and "extra.weight" in msg

    # a wrong config (new attention order keeps shapes; channel count does not)
    m = json.loads((fixtures_dir / "adm256_uncond_keys.json").read_text())
    m["unet_kwargs"]["num_res_blocks"] = 3
    p.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="unexpected key"):
        check_adm_manifest(p)


def test_from_script_flags_matches_unet_kwargs(fixtures_dir):
    m = json.loads((fixtures_dir / "adm256_uncond_keys.json").read_text())
    a = ADMUNet.config_to_kwargs(m["config"])
    b = ADMUNet.config_to_kwargs(m["unet_kwargs"])
    assert a["attention_resolutions"] == (8, 16, 32)
    assert a["channel_mult"] == (1, 1, 2, 2, 4, 4) and a["out_channels"] == 6
    b = {k: (tuple(v) if isinstance(v, list) else v) for k, v in b.items()}
    assert b["num_heads_upsample"] == 4 and a["num_heads_upsample"] == -1  # -1 resolves to num_heads
    shared = set(a) & set(b) - {"num_heads_upsample"}
    assert len(shared) >= 15 and all(a[k] == b[k] for k in shared), {k: (a[k], b[k]) for k in shared}
    with pytest.raises(ValueError, match="unknown"):
        ADMUNet.config_to_kwargs({"model_channels": 8, "bogus": 1})
    assert ADMUNet.config_to_kwargs(ADM_PRESETS["256x256_diffusion_uncond"]) == a
    with torch.device("meta"):
        assert sum(p.numel() for p in ADMUNet.from_config("256x256_diffusion_uncond").parameters()) == 552_814_086


# guided-diffusion README flags of the public checkpoints; (tensors, parameters, sha256[:16] of the
# "key:(shape)" lines in state_dict order) of guided-diffusion's create_model for them (commit 22e0df8)
OFFICIAL_FLAGS = {
    "64x64_diffusion": (dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1,
                             image_size=64, learn_sigma=True, noise_schedule="cosine", num_channels=192,
                             num_head_channels=64, num_res_blocks=3, resblock_updown=True,
                             use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True),
                        (541, 295_904_454, "a48a5b95ed98ae0f")),
    "128x128_diffusion": (dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=128,
                               learn_sigma=True, noise_schedule="linear", num_channels=256, num_heads=4,
                               num_res_blocks=2, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True),
                          (493, 421_529_606, "f1123836c80c9c01")),
    "256x256_diffusion": (dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=256,
                               learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64,
                               num_res_blocks=2, resblock_updown=True, use_fp16=True, use_scale_shift_norm=True),
                          (567, 553_838_086, "a578ceeaaa7287ec")),
    "256x256_diffusion_uncond": (dict(ADM_PRESETS["256x256_diffusion_uncond"]), (566, 552_814_086, "7851a44e799b06ac")),
    "512x512_diffusion": (dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=512,
                               learn_sigma=True, noise_schedule="linear", num_channels=256, num_head_channels=64,
                               num_res_blocks=2, resblock_updown=True, use_fp16=False, use_scale_shift_norm=True),
                          (645, 558_997_638, "cddc1f38c482aa45")),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL_FLAGS))
def test_official_flags_build_the_official_key_layout(name):
    import hashlib

    flags, (n_tensors, n_params, digest) = OFFICIAL_FLAGS[name]
    with torch.device("meta"):
        model = ADMUNet.from_config(flags)
    sd = model.state_dict()
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sd.items())
    assert (len(sd), sum(v.numel() for v in sd.values())) == (n_tensors, n_params)
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == digest
    assert sd["out.2.weight"].shape[0] == 6 and ("label_emb.weight" in sd) == flags["class_cond"]
    half = {k for k, v in sd.items() if v.dtype == torch.float16}
    assert bool(half) == flags["use_fp16"] and all(k.startswith(("input_", "middle_", "output_")) for k in half)
    attn = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert attn and all(m.legacy != flags.get("use_new_attention_order", False) for m in attn)
    want_heads = (lambda c: c // 64) if "num_head_channels" in flags else (lambda c: flags["num_heads"])
    assert all(m.num_heads == want_heads(m.channels) for m in attn)


def test_script_flags_given_as_strings():
    # flags parsed from a MODEL_FLAGS string: "False" was truthy (new attention order: same keys, other outputs)
    from ppap_fast.models import adm_kwargs_from_flags

    flags = dict(image_size=64, num_channels=32, learn_sigma=True, class_cond=False, use_fp16=False,
                 use_new_attention_order=False, resblock_updown=True, use_scale_shift_norm=True)
    as_str = {k: str(v) for k, v in flags.items()}
    assert adm_kwargs_from_flags(as_str) == adm_kwargs_from_flags(flags)
    k = adm_kwargs_from_flags(dict(as_str, use_new_attention_order="false", learn_sigma="0", use_fp16="no"))
    assert k["use_new_attention_order"] is False and k["out_channels"] == 3 and k["use_fp16"] is False
    with pytest.raises(ValueError, match="class_cond='maybe'"):
        adm_kwargs_from_flags(dict(as_str, class_cond="maybe"))


def test_unet_kwargs_contradicting_class_cond_or_learn_sigma_are_refused(fixtures_dir):
    """UNetModel kwargs beside the script flags class_cond / learn_sigma: a contradiction was ignored silently
    (class_cond=True built an unconditional model; learn_sigma=True kept 3 output channels)."""
    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    cfg = g["config"]  # num_classes None, out_channels 6, learn_sigma True
    with pytest.raises(ValueError, match=r"class_cond=True contradicts num_classes=None: .*num_classes=1000"):
        ADMUNet.config_to_kwargs(dict(cfg, class_cond=True))
    with pytest.raises(ValueError, match=r"class_cond='False' contradicts num_classes=10: "):
        ADMUNet.config_to_kwargs(dict(cfg, class_cond="False", num_classes=10))
    with pytest.raises(ValueError, match=r"learn_sigma=True contradicts out_channels=3 .*out_channels=6"):
        ADMUNet.config_to_kwargs(dict(cfg, out_channels=3))
    with pytest.raises(ValueError, match=r"learn_sigma=False contradicts out_channels=6 .*out_channels=3"):
        ADMUNet.config_to_kwargs(dict(cfg, learn_sigma=False))
    kw = ADMUNet.config_to_kwargs(dict(cfg, class_cond="True", num_classes=1000))
    assert kw["num_classes"] == 1000 and kw["out_channels"] == 6
    assert ADMUNet.config_to_kwargs(dict(cfg, class_cond=False))["num_classes"] is None


def test_attention_resolutions_flag_forms():
    """An int flag (a YAML `attention_resolutions: 16`) failed with "'int' object is not iterable", "0" with
    ZeroDivisionError and "16;8" with int()'s message."""
    from ppap_fast.models import adm_kwargs_from_flags

    flags = dict(image_size=64, num_channels=32, use_fp16=False)
    assert adm_kwargs_from_flags(dict(flags, attention_resolutions=16))["attention_resolutions"] == (4,)
    assert adm_kwargs_from_flags(dict(flags, attention_resolutions=" 16, 8"))["attention_resolutions"] == (4, 8)
    assert adm_kwargs_from_flags(dict(flags, attention_resolutions=[32, 16]))["attention_resolutions"] == (2, 4)
    assert adm_kwargs_from_flags(dict(flags, attention_resolutions=""))["attention_resolutions"] == ()
    for bad in ("0", "16;8", "-8", [16.5]):
        with pytest.raises(ValueError, match=r"attention_resolutions=.* must be positive integer resolutions"):
            adm_kwargs_from_flags(dict(flags, attention_resolutions=bad))


def test_an_x0_predicting_config_is_refused():
    # predict_xstart=True was ignored: the model's x0 output was read as eps, silently
    from ppap_fast.models import ADMUNet

    flags = dict(image_size=64, num_channels=32, learn_sigma=False, use_fp16=False)
    for v in (True, "True", "1"):
        with pytest.raises(ValueError, match="predict_xstart=True: this model predicts x0"):
            ADMUNet.config_to_kwargs(dict(flags, predict_xstart=v))
    kwargs = ADMUNet.config_to_kwargs(dict(flags, predict_xstart="False"))
    with pytest.raises(ValueError, match="predict_xstart=True"):  # beside UNetModel kwargs too
        ADMUNet.config_to_kwargs(dict(kwargs, predict_xstart=True))
    assert ADMUNet.config_to_kwargs(dict(kwargs, predict_xstart=False)) == kwargs


def test_flags_noise_schedule_is_checked_against_the_sampling_schedule():
    """A user's flags dict with noise_schedule='cosine' (or other diffusion_steps) was ignored: the model sampled
    on a linear Schedule silently. The samplers refuse another schedule, respaced or not."""
    from ppap_fast.fast_sampling import FastGuidedSampler
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule

    flags = dict(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="", learn_sigma=False,
                 num_res_blocks=1, num_head_channels=8)
    torch.manual_seed(0)
    cos = ADMUNet.from_config(dict(flags, noise_schedule="cosine")).eval()
    x = torch.randn(1, 3, 16, 16)
    for sched in (Schedule.create("linear", 1000, "ddim2"), Schedule.create("cosine", 4000, "ddim2")):
        with pytest.raises(ValueError, match=r"cosine schedule over 1000 steps.*Schedule.create\('cosine', 1000"):
            sample_loop(cos, x, sched)
        with pytest.raises(ValueError, match="cosine schedule over 1000 steps"):
            FastGuidedSampler(cos, sched)
    ok = Schedule.create("cosine", 1000, "ddim2")
    assert torch.isfinite(sample_loop(cos, x, ok)).all()
    FastGuidedSampler(cos, Schedule.create("cosine", 1000))
    t4k = ADMUNet.from_config(dict(flags, diffusion_steps="4000"))  # script flags are strings
    assert t4k.trained_schedule == ("linear", 4000)
    with pytest.raises(ValueError, match="linear schedule over 4000 steps"):
        sample_loop(t4k, x, Schedule.create("linear", 1000, "ddim2"))
    assert ADMUNet.from_config(flags).trained_schedule is None  # nothing said: nothing checked
    with pytest.raises(ValueError, match="noise_schedule='sqrt'"):
        ADMUNet.from_config(dict(flags, noise_schedule="sqrt"))


def test_rescale_timesteps_flag_is_applied():
    """rescale_timesteps=True with diffusion_steps != 1000 was ignored: that model was trained on t * 1000 / T
    (guided-diffusion's _scale_timesteps, after mapping respaced indices to original t), but the samplers fed
    the original t. The model rescales it; a float (already rescaled) t is refused; T=1000 is unchanged."""
    from ppap_fast.models.adm import timestep_embedding
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule

    flags = dict(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions="", learn_sigma=False,
                 num_res_blocks=1, num_head_channels=8, diffusion_steps="4000")
    torch.manual_seed(0)
    plain = ADMUNet.from_config(flags).eval()
    with torch.no_grad():  # zero-initialised output convs would give 0 whatever t
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    resc = ADMUNet.from_config(dict(flags, rescale_timesteps="True")).eval()
    resc.load_state_dict(plain.state_dict())
    assert plain.timestep_scale is None and resc.timestep_scale == 0.25
    assert ADMUNet.from_config(dict(flags, diffusion_steps=1000, rescale_timesteps=True)).timestep_scale is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3999, 1234])
    with torch.no_grad():
        out = resc(x, t)
        torch.testing.assert_close(out, plain(x, t.float() * 0.25), rtol=0, atol=0)
        unscaled = plain(x, t)
        assert torch.isfinite(unscaled).all() and not torch.allclose(out, unscaled)
    with pytest.raises(ValueError, match="rescales timesteps itself"):
        resc(x, t.float() * 0.25)
    seen = []
    resc.time_embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    sched = Schedule.create("linear", 4000, "ddim2")
    with torch.no_grad():
        sample_loop(resc, x, sched)
    want = [timestep_embedding(t.float().expand(2) * 0.25, 32) for t in sched.timestep_map.flip(0)]
    assert len(seen) == len(want) == 2
    for a, b in zip(seen, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_adm_denoiser_refuses_another_schedule(tmp_path):
    # the preset's noise_schedule / diffusion_steps were not checked: a linear model sampled on cosine silently
    from ppap_fast.distributed import build_denoiser
    from ppap_fast.models.adm import check_preset_schedule

    ckpt = tmp_path / "missing.pt"  # refused before anything is built or read
    with pytest.raises(ValueError, match=r"linear schedule over 1000 steps; this run samples 'cosine'.*--schedule linear"):
        build_denoiser("adm:256x256_diffusion_uncond", ckpt, 3, "cpu", "cosine", 1000)
    with pytest.raises(ValueError, match=r"over 4000: pass --schedule linear --num-timesteps 1000"):
        build_denoiser("adm:256x256_diffusion_uncond", ckpt, 3, "cpu", "linear", 4000)
    check_preset_schedule("256x256_diffusion_uncond", "linear", None)  # guided-sample: 1000 steps
    check_preset_schedule("256x256_diffusion_uncond", "linear", 1000)


def test_from_checkpoint(fixtures_dir, tmp_path):
    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    torch.save(g["state_dict"], tmp_path / "ckpt.pt")
    m = ADMUNet.from_checkpoint(tmp_path / "ckpt.pt", g["config"])
    assert not m.training
    with torch.no_grad():
        torch.testing.assert_close(m(g["x"], g["t"]), g["out"], rtol=0, atol=1e-5)
    bad = dict(g["state_dict"])
    bad.pop("out.2.bias")
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt .*1 missing keys \['out\.2\.bias'\]"):  # CheckpointError
        ADMUNet.from_checkpoint(tmp_path / "bad.pt", g["config"])


def test_from_checkpoint_honours_map_location(fixtures_dir, tmp_path):
    """map_location was documented but ignored: the model stayed on the CPU."""
    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    torch.save(g["state_dict"], tmp_path / "ckpt.pt")
    m = ADMUNet.from_checkpoint(tmp_path / "ckpt.pt", g["config"], map_location="meta")
    tensors = list(m.parameters()) + list(m.buffers())
    assert tensors and all(p.device.type == "meta" for p in tensors) and not m.training
    with pytest.raises(TypeError, match=r"^map_location must be a device \(a str such as 'cuda' or a torch\.device\), "
                                        r"got dict$"):
        ADMUNet.from_checkpoint(tmp_path / "ckpt.pt", g["config"], map_location={"cuda:0": "cpu"})


def _legacy_ref(qkv, heads):
    # guided-diffusion QKVAttentionLegacy, written out with einsum
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)


def _new_ref(qkv, heads):
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    w = torch.einsum("bct,bcs->bts", q.reshape(bs * heads, ch, length), k.reshape(bs * heads, ch, length))
    w = torch.softmax(w / math.sqrt(ch), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v.reshape(bs * heads, ch, length)).reshape(bs, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sdpa", [True, False])
def test_qkv_attention_orders(legacy, sdpa):
    qkv = torch.randn(2, 3 * 4 * 8, 37, dtype=torch.float64)
    ref = (_legacy_ref if legacy else _new_ref)(qkv, 4)
    out = qkv_attention(qkv, 4, legacy=legacy, use_sdpa=sdpa)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    other = (_new_ref if legacy else _legacy_ref)(qkv, 4)
    assert (out - other).abs().max() > 1e-3  # the two orders really differ


@pytest.mark.parametrize("legacy", [True, False])
def test_sdpa_gets_channels_contiguous_heads(monkeypatch, legacy):
    """The fused SDPA kernels need a unit last-dim stride: q / k / v as transposed views (stride T) sent
    CUDA to the math path (float32 GEMMs for half inputs). Same result as the math path."""
    import torch.nn.functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        seen.append([t.stride(-1) for t in (q, k, v)])
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    qkv = torch.randn(2, 3 * 4 * 8, 37, dtype=torch.float64)
    out = qkv_attention(qkv, 4, legacy=legacy, use_sdpa=True)
    assert seen == [[1, 1, 1]]
    torch.testing.assert_close(out, qkv_attention(qkv, 4, legacy=legacy, use_sdpa=False), rtol=1e-10, atol=1e-10)


def test_fp16_conversion_matches_guided_diffusion_rule():
    model = ADMUNet(**SMALL, use_fp16=True)
    for name, p in model.named_parameters():
        torso_conv = name.startswith(("input_blocks", "middle_block", "output_blocks")) and _is_conv(model, name)
        assert p.dtype == (torch.float16 if torso_conv else torch.float32), name
    assert model.middle_block[1].qkv.weight.dtype == torch.float16
    assert model.time_embed[0].weight.dtype == model.out[2].weight.dtype == torch.float32
    assert model.middle_block[0].emb_layers[1].weight.dtype == torch.float32


def _is_conv(model, name):
    mod = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d))


def test_fp16_forward_close_to_fp32():
    torch.manual_seed(1)
    m32 = ADMUNet(**SMALL).eval()
    with torch.no_grad():
        for p in m32.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # un-zero the output convs
    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(m32.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        a, b = m32(x, t), m16(x, t)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    rel = (a - b).norm() / a.norm()
    assert 0 < rel < 5e-3, rel


def test_class_cond_and_bad_inputs():
    m = ADMUNet(**SMALL, num_classes=10).eval()
    assert m.label_emb.weight.shape == (10, 128)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        out = m(x, t, torch.tensor([1, 2]))
    assert out.shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="y"):
        m(x, t)
    u = ADMUNet(**SMALL)
    with pytest.raises(ValueError, match="x"):
        u(torch.randn(2, 4, 16, 16), t)
    with pytest.raises(ValueError, match="timesteps"):
        u(x, torch.tensor([1, 2, 3]))


def test_input_size_not_divisible_by_the_downsampling_is_refused():
    """A spatial size the UNet cannot halve at every level failed deep inside at a decoder torch.cat
    ('Sizes of tensors must match'), after most of the forward ran."""
    for updown in (True, False):  # stride-2 conv (ceil) and average pool (floor): both failed at the cat
        m = ADMUNet(**{**SMALL, "channel_mult": (1, 2, 2), "resblock_updown": updown}).eval()
        t = torch.tensor([1, 2])
        with torch.no_grad():
            with pytest.raises(ValueError, match=r"x's spatial size \(30, 36\) must be divisible by 4 .*2 times"):
                m(torch.randn(2, 3, 30, 36), t)
            with pytest.raises(ValueError, match=r"x's spatial size \(36, 35\) must be divisible by 4"):
                m(torch.randn(2, 3, 36, 35), t)
            out = m(torch.randn(2, 3, 36, 20), t)
        assert out.shape == (2, 6, 36, 20) and torch.isfinite(out).all()


def test_class_labels_are_checked():
    """Labels out of [0, num_classes) failed in nn.Embedding with 'index out of range in self' (on CUDA a
    device-side assert); float labels with the embedding's dtype message; a list with AttributeError."""
    m = _randomised(num_classes=10)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        for bad in ([1, 10], [-1, 3]):
            with pytest.raises(ValueError, match=r"y must be class indices in \[0, 10\), got min -?\d+ max \d+"):
                m(x, t, torch.tensor(bad))
        with pytest.raises(ValueError, match=r"y must hold integer class indices, got torch.float32"):
            m(x, t, torch.tensor([1.0, 2.0]))
        want = m(x, t, torch.tensor([0, 9]))
        assert torch.isfinite(want).all()
        torch.testing.assert_close(m(x, t, [0, 9]), want, rtol=0, atol=0)
        torch.testing.assert_close(m(x, t, torch.tensor([0, 9], dtype=torch.int32)), want, rtol=0, atol=0)


def test_attention_resolutions_flag_string_in_unet_kwargs_is_refused():
    """The script flag's string of resolutions among UNetModel kwargs: "16" was read character by character
    as the downsample rates (1, 6), silently another model, and "16,8" failed on int(','); both now say
    which rates to pass."""
    with pytest.raises(ValueError, match=r"attention_resolutions='16' is guided-diffusion's script flag.*\(1,\) here"):
        ADMUNet.from_config({**SMALL, "attention_resolutions": "16"})
    with pytest.raises(ValueError, match=r"'16,8'.*\(1, 2\) here"):
        ADMUNet(**{**SMALL, "attention_resolutions": "16,8"})
    assert ADMUNet(**SMALL).attention_resolutions == (2,)


def test_label_emb_changes_output():
    torch.manual_seed(2)
    m = ADMUNet(**SMALL, num_classes=10).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
        assert (m(x, t, torch.tensor([1])) - m(x, t, torch.tensor([2]))).abs().max() > 1e-4


cuda = requires_cuda


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_adm_golden_cuda(fixtures_dir, no_tf32, attention):
    err = check_adm_golden(fixtures_dir / "adm_small_golden_1.pt", device="cuda", attention=attention)
    assert math.isfinite(err) and err <= 2e-5, err


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adm_low_precision_torso_cuda(fixtures_dir, dtype):
    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    m = ADMUNet.from_config(g["config"]).convert_to_fp16(dtype)
    m.load_state_dict(g["state_dict"], strict=True)
    m = m.cuda().eval()
    with torch.no_grad():
        out = m(g["x"].cuda(), g["t"].cuda()).cpu()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = ((out - g["out"]).norm() / g["out"].norm()).item()
    assert rel < (5e-3 if dtype == torch.float16 else 3e-2), rel


def test_checkpoint_errors_name_the_file_and_keys(tmp_path):
    from ppap_fast.models.offtheshelf import CheckpointError

    cfg = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
               attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2)
    torch.manual_seed(0)
    m = ADMUNet(**cfg)
    f = tmp_path / "adm.pt"
    torch.save(m.state_dict(), f)
    loaded = ADMUNet.from_checkpoint(f, cfg)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"adm\.pt.*(different|variant).*shape mismatches"):
        ADMUNet.from_checkpoint(f, dict(cfg, model_channels=64))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra'\]"):
        torch.save({**m.state_dict(), "extra": torch.zeros(1)}, f)
        ADMUNet.from_checkpoint(f, cfg)
    raw = (tmp_path / "adm.pt").read_bytes()
    (tmp_path / "adm.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"adm\.pt .*truncated or corrupt"):
        ADMUNet.from_checkpoint(f, cfg)


def test_checkpoint_errors_name_learn_sigma_and_class_cond(tmp_path):
    # a learned-sigma head read "other output size (number of classes?)"; label_emb "depth / width"
    from ppap_fast.models.offtheshelf import CheckpointError

    flags = dict(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8", channel_mult="1,2",
                 learn_sigma=True)
    f, fc = tmp_path / "sigma.pt", tmp_path / "cond.pt"
    torch.save(ADMUNet.from_config(flags).state_dict(), f)
    torch.save(ADMUNet.from_config(dict(flags, class_cond=True)).state_dict(), fc)
    with pytest.raises(CheckpointError, match=r"sigma\.pt does not fit .*predicts eps and learned sigmas \(6 output "
                                              r"channels\), the model eps only \(3\): learn_sigma=True \(out_channels=6\)"):
        ADMUNet.from_checkpoint(f, dict(flags, learn_sigma=False))
    with pytest.raises(CheckpointError, match=r"cond\.pt does not fit .*class-conditional \(1000 classes\): "
                                              r"class_cond=True \(num_classes=1000\)"):
        ADMUNet.from_checkpoint(fc, flags)
    with pytest.raises(CheckpointError, match=r"unconditional \(no label_emb\): class_cond=False"):
        ADMUNet.from_checkpoint(f, dict(flags, class_cond=True))
    with pytest.raises(CheckpointError) as e:  # another width: the generic message, no learn_sigma note
        ADMUNet.from_checkpoint(f, dict(flags, num_channels=64))
    assert "learn_sigma" not in str(e.value) and "shape mismatches" in str(e.value)
    ADMUNet.from_checkpoint(fc, dict(flags, learn_sigma=False), out_channels=6, num_classes=1000)  # overrides fit


def _randomised(**kw):
    torch.manual_seed(3)
    m = ADMUNet(**{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # un-zero the output convs
    return m


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_is_the_hand_written_forward(scale_shift):
    m = _randomised(use_scale_shift_norm=scale_shift, resblock_updown=False)
    blk = m.output_blocks[0][0]  # 128 -> 64 channels: the 1x1 skip conv
    x, emb = torch.randn(2, 128, 8, 8), torch.randn(2, 128)
    p = dict(blk.named_parameters())
    h = F.conv2d(F.silu(F.group_norm(x, 32, p["in_layers.0.weight"], p["in_layers.0.bias"])),
                 p["in_layers.2.weight"], p["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), p["emb_layers.1.weight"], p["emb_layers.1.bias"])[:, :, None, None]
    n2 = lambda u: F.group_norm(u, 32, p["out_layers.0.weight"], p["out_layers.0.bias"])  # noqa: E731
    if scale_shift:  # FiLM: norm(h) * (1 + scale) + shift, scale first
        h = n2(h) * (1 + e[:, :64]) + e[:, 64:]
    else:
        h = n2(h + e)
    h = F.conv2d(F.silu(h), p["out_layers.3.weight"], p["out_layers.3.bias"], padding=1)
    want = F.conv2d(x, p["skip_connection.weight"], p["skip_connection.bias"]) + h
    with torch.no_grad():
        got = blk(x, emb)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("new_order", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention_block_is_the_hand_written_forward(new_order, backend):
    m = _randomised(use_new_attention_order=new_order).set_attention_backend(backend)
    blk = m.middle_block[1]  # 64 channels, num_head_channels 8: 8 heads
    assert blk.num_heads == 8 and blk.legacy != new_order
    x = torch.randn(2, 64, 8, 8)
    p = dict(blk.named_parameters())
    xr = x.reshape(2, 64, 64)
    qkv = torch.einsum("oc,bct->bot", p["qkv.weight"][:, :, 0], F.group_norm(xr, 32, p["norm.weight"], p["norm.bias"]))
    qkv = qkv + p["qkv.bias"][:, None]

    def attend(q, k, v):  # [B, heads, 8, T] each
        w = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(8), dim=-1)
        return torch.einsum("bhts,bhcs->bhct", w, v).reshape(2, 64, 64)

    legacy = attend(*qkv.reshape(2, 8, 24, 64).split(8, dim=2))  # per head [q | k | v]
    new = attend(*(u.reshape(2, 8, 8, 64) for u in qkv.chunk(3, dim=1)))  # [q of all heads | k | v]
    out = lambda a: (xr + torch.einsum("oc,bct->bot", p["proj_out.weight"][:, :, 0], a)  # noqa: E731
                     + p["proj_out.bias"][:, None]).reshape(2, 64, 8, 8)
    with torch.no_grad():
        got = blk(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, out(new if new_order else legacy), rtol=0, atol=1e-5)
    assert (got - out(legacy if new_order else new)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw", [{}, {"use_scale_shift_norm": False, "resblock_updown": False}])
def test_fused_norm_act_equals_the_modules(backend, kw):
    from ppap_fast import ops

    m = _randomised(**kw)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        want = m(x, t)
        m.fuse_norm_act()
        assert all(b.fused_norm_act for b in m.modules() if type(b).__name__ in ("ResBlock", "AttentionBlock"))
        assert any(type(b).__name__ == "AttentionBlock" for b in m.modules())
        assert m.fused_out_norm_act
        ops.set_backend(backend)
        try:
            got = m(x, t)
        finally:
            ops.set_backend(None)
        assert ops.last_backend("group_norm_act") == backend and ops.last_backend("bias_residual_add") == backend
        assert ((got - want).norm() / want.norm()).item() < 1e-5
        assert torch.equal(m.fuse_norm_act(False)(x, t), want)
    m.fuse_norm_act()  # with autograd recording the reference path runs, and gradients flow
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(m(xg, t).square().sum(), xg)
    assert ops.last_backend("group_norm_act") == "reference" and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("new_order", [False, True])
def test_fused_attention_in_channels_last_is_token_major_and_equals_the_modules(backend, new_order, monkeypatch):
    """A fused model in channels_last: attention blocks run token-major (qkv / proj_out as GEMMs on [B, T, C]
    views, q / k / v as strided views: no layout copy before SDPA, no conv1d), for both channel orders of
    qkv, equal to the modules in NCHW; the output stays channels_last."""
    from ppap_fast import ops
    from ppap_fast.models import adm

    m = _randomised(use_new_attention_order=new_order)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(adm.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: (seen.append((q.stride(-1), q.is_contiguous())), sdpa(q, k, v, **kw))[1])
    with torch.no_grad():
        want = m(x, t)
        m = m.to(memory_format=torch.channels_last).fuse_norm_act()
        calls = []
        for blk in (b for b in m.modules() if type(b).__name__ == "AttentionBlock"):
            blk.qkv.register_forward_hook(lambda *a: calls.append(1))
        seen.clear()
        ops.set_backend(backend)
        try:
            got = m(x.contiguous(memory_format=torch.channels_last), t)
        finally:
            ops.set_backend(None)
    assert seen and all(s == (1, False) for s in seen), seen  # strided views of the qkv GEMM's output
    assert not calls  # the qkv conv1d module did not run: its weight went to a GEMM
    assert torch.isfinite(got).all() and ((got - want).norm() / want.norm()).item() < 1e-5


def test_fused_norm_act_fp16_torso_no_less_accurate():
    """fp16 torso against its fp32 twin: fusing (one rounding to fp16 instead of two) is at least as
    close as the modules are."""
    m32 = _randomised()
    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(m32.state_dict(), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    with torch.no_grad():
        want = m32(x, t)
        unfused = rel(m16(x, t), want)
        fused = rel(m16.fuse_norm_act()(x, t), want)
    assert 0 < fused < 5e-3 and fused <= 1.1 * unfused, (fused, unfused)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_output_head_reads_the_half_torso_without_an_upcast(backend, monkeypatch):
    """The fused float32 out head (half_out_conv=False) takes the fp16 torso's last activation as it is and
    writes float32 (out_dtype): no upcast pass, and the same bits as upcasting first (the head before)."""
    from ppap_fast import ops
    from ppap_fast.ops import norm_act

    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(_randomised().state_dict(), strict=True)
    m16.fuse_norm_act(half_out_conv=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    real, calls = norm_act.group_norm_act, []

    def recording(h, *a, **kw):
        calls.append((h.dtype, kw.get("out_dtype")))
        return real(h, *a, **kw)

    def upcast_first(h, *a, out_dtype=None, **kw):
        return real(h.to(out_dtype or h.dtype), *a, **kw)

    ops.set_backend(backend)
    try:
        with torch.no_grad():
            monkeypatch.setattr(norm_act, "group_norm_act", recording)
            got = m16(x, t)
            monkeypatch.setattr(norm_act, "group_norm_act", upcast_first)
            before = m16(x, t)
    finally:
        ops.set_backend(None)
    assert calls[-1] == (torch.float16, torch.float32) and calls[0] == (torch.float16, None)
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and torch.equal(got, before)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decoder_blocks_write_into_the_next_concatenation(backend, monkeypatch):
    """A fused channels_last model without autograd: every decoder block (and the middle block) whose last
    layer is a fused ResBlock / AttentionBlock writes its output into the next concatenation's buffer, so
    only the skip is copied in (one full concatenation: the first block's, where the middle block's output
    came from elsewhere, none here); bit for bit the model with a concatenation per block."""
    from ppap_fast import ops
    from ppap_fast.models import adm
    from ppap_fast.ops import concat

    m = _randomised().to(memory_format=torch.channels_last).fuse_norm_act()
    x, t = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last), torch.tensor([3, 800])
    real, calls = concat.cat_channels, []
    monkeypatch.setattr(concat, "cat_channels", lambda ts, **kw: (calls.append((len(ts), "out" in kw)), real(ts, **kw))[1])
    xg = x.clone().requires_grad_(True)  # with autograd recording: a concatenation per block, gradients flow
    m(xg, t).sum().backward()
    assert calls == [(2, False)] * len(m.output_blocks) and torch.isfinite(xg.grad).all()
    calls.clear()
    ops.set_backend(backend)
    try:
        with torch.no_grad():
            got = m(x, t)
            into = list(calls)
            calls.clear()
            monkeypatch.setattr(adm.ADMUNet, "_into_next_cat", lambda self, block, h, emb, nxt: (block(h, emb), None))
            want = m(x, t)
    finally:
        ops.set_backend(None)
    assert into == [(1, True)] * len(m.output_blocks), into
    assert calls == [(2, False)] * len(m.output_blocks)
    assert torch.equal(got, want)


def test_compiled_fused_channels_last_model_traces_in_one_graph():
    """torch.compile of a fused channels_last model without autograd (fullgraph): the decoder's writes into the
    next concatenation's buffer (module attributes, data_ptr checks) stay out of the trace; same output."""
    m = _randomised().to(memory_format=torch.channels_last).fuse_norm_act()
    x, t = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last), torch.tensor([3, 800])
    torch._dynamo.reset()
    with torch.no_grad():
        want = m(x, t)
        got = torch.compile(m, backend="eager", fullgraph=True)(x, t)
    torch._dynamo.reset()
    assert torch.equal(got, want)


def test_concatenation_buffer_is_allocated_at_the_residual_op(monkeypatch):
    """The next concatenation's buffer does not exist while the block's norms (and so its intermediates) run:
    allocated by the last residual op (peak memory as before, plus the skip's channels only there)."""
    from ppap_fast.models import adm

    m = _randomised().to(memory_format=torch.channels_last).fuse_norm_act()
    x, t = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last), torch.tensor([3, 800])
    real, seen = adm._fused_norm_act, []

    def spy(*a, **kw):
        targets = [mod._cat_target for mod in m.modules() if getattr(mod, "_cat_target", None) is not None]
        seen.extend(getattr(tg, "buf", tg) is None for tg in targets)
        return real(*a, **kw)

    monkeypatch.setattr(adm, "_fused_norm_act", spy)
    with torch.no_grad():
        got = m(x, t)
    monkeypatch.setattr(adm, "_fused_norm_act", real)
    with torch.no_grad():
        assert torch.equal(got, m(x, t))
    assert seen and all(seen)


def test_fused_decoder_runs_without_triton(monkeypatch):
    """Without Triton (an optional extra) a fused channels_last model runs its references, the decoder's
    out= writes included."""
    import sys

    m = _randomised().to(memory_format=torch.channels_last).fuse_norm_act()
    x, t = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last), torch.tensor([3, 800])
    with torch.no_grad():
        want = m(x, t)
        for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.") or n.endswith("_triton")]:
            monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
        assert torch.equal(m(x, t), want)


def test_half_out_conv_runs_the_output_conv_in_the_torso_dtype(monkeypatch):
    """half_out_conv (the default; PPAP_FAST_HALF_OUT_CONV=0 turns it off): the out norm written in fp16 and
    the output conv run in fp16, the result float32 and close to the float32 head; a float32 torso keeps the
    float32 head (nothing to gain)."""
    from ppap_fast.ops import norm_act

    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(_randomised().state_dict(), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    real, outs = norm_act.group_norm_act, []
    monkeypatch.setattr(norm_act, "group_norm_act", lambda h, *a, **kw: outs.append(real(h, *a, **kw)) or outs[-1])
    with torch.no_grad():
        monkeypatch.setenv("PPAP_FAST_HALF_OUT_CONV", "0")
        want = m16.fuse_norm_act()(x, t)
        assert not m16.half_out_conv
        monkeypatch.delenv("PPAP_FAST_HALF_OUT_CONV")
        assert m16.fuse_norm_act().half_out_conv
        outs.clear()
        got = m16(x, t)
        assert outs[-1].dtype == torch.float16  # the out norm's output: the conv's half input
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        rel = ((got - want).norm() / want.norm()).item()
        assert 0 < rel < 3e-3, rel
        assert not m16.fuse_norm_act(half_out_conv=False).half_out_conv
        m32 = _randomised().fuse_norm_act(half_out_conv=True)
        assert torch.equal(m32(x, t), _randomised().fuse_norm_act()(x, t))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_out_head_is_the_half_head_in_one_op(backend, monkeypatch):
    """fused_out_head (the default with half_out_conv; PPAP_FAST_FUSED_OUT_HEAD=0 turns it off): the head's
    norm, SiLU and conv as ops.group_norm_silu_conv3x3; the reference is bit for bit the unfused half head,
    the Triton path (no rounding of the conv's result to fp16) as close to the float32 model as it. Heads
    it cannot take keep the unfused one: a float32 torso, a conv to more than 14 channels or not 3x3."""
    from ppap_fast import ops
    from ppap_fast.ops import out_head

    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(_randomised().state_dict(), strict=True)
    m16 = m16.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([3, 800])
    real, calls = out_head.group_norm_silu_conv3x3, []
    monkeypatch.setattr(out_head, "group_norm_silu_conv3x3", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        want32 = _randomised()(x, t)
        monkeypatch.setenv("PPAP_FAST_FUSED_OUT_HEAD", "0")
        assert not m16.fuse_norm_act().fused_out_head and m16.half_out_conv
        ops.set_backend(backend)
        try:
            unfused = m16(x, t)
            assert not calls
            monkeypatch.delenv("PPAP_FAST_FUSED_OUT_HEAD")
            assert m16.fuse_norm_act().fused_out_head
            got = m16(x, t)
            assert calls and ops.last_backend(out_head.OP) == backend
        finally:
            ops.set_backend(None)
    assert got.dtype == torch.float32 and got.shape == unfused.shape and torch.isfinite(got).all()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    if backend == "reference":
        assert torch.equal(got, unfused)
    else:
        assert 0 < rel(got, unfused) < 3e-3 and rel(got, want32) <= 1.1 * rel(unfused, want32)
    assert not m16.fuse_norm_act(half_out_conv=False).fused_out_head
    assert not m16.fuse_norm_act(fused_out_head=False).fused_out_head
    calls.clear()
    with torch.no_grad():
        _randomised().fuse_norm_act()(x, t)  # a float32 torso: no half head to fuse
    assert not calls
    for conv in (torch.nn.Conv2d(32, 15, 3, padding=1), torch.nn.Conv2d(32, 6, 1), torch.nn.Conv2d(32, 6, 3, padding=2)):
        m16.out[2] = conv
        assert not m16.fuse_norm_act().fused_out_head


@pytest.mark.parametrize("fault", ["none", "offset", "nan", "model_nan"])
def test_fused_out_head_is_checked_once_per_device_against_the_half_head(fault, monkeypatch):
    """A device's first eager fused head (never yet run on a GPU when it became the default) is compared with
    the unfused half head: a wrong or non-finite result warns, returns the half head and turns the fused head
    off; a right one is kept and not checked again; the model's own NaN judges nothing. (On a CPU the check
    is off: here it is forced on.)"""
    from ppap_fast.ops import out_head

    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(_randomised().state_dict(), strict=True)
    m16.fuse_norm_act()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    real, calls = out_head.group_norm_silu_conv3x3, []

    def op(*a, **kw):
        calls.append(1)
        y = real(*a, **kw)
        return {"offset": y + 0.1, "nan": y.index_fill(2, torch.tensor([3]), float("nan"))}.get(fault, y)

    monkeypatch.setattr(out_head, "group_norm_silu_conv3x3", op)
    monkeypatch.setattr(ADMUNet, "_should_verify_fused_head",
                        lambda self, y: str(y.device) not in self._fused_out_head_verified)
    with torch.no_grad():
        m16.fuse_norm_act(fused_out_head=False)
        unfused = m16(x, t)
        m16.fuse_norm_act()
        if fault == "model_nan":
            m16.out[0].weight.data[0] = float("nan")
            unfused = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = m16(x, t), m16(x, t)
    warned = [w for w in caught if "fused output head" in str(w.message)]
    if fault in ("offset", "nan"):
        assert len(warned) == 1 and issubclass(warned[0].category, RuntimeWarning), caught
        assert not m16.fused_out_head and len(calls) == 1
        assert torch.equal(first, unfused) and torch.equal(second, unfused)
    elif fault == "none":
        assert not warned and m16.fused_out_head and m16._fused_out_head_verified == {"cpu"} and len(calls) == 2
        assert torch.equal(first, unfused) and torch.equal(second, unfused)
    else:  # not judged, checked again next time
        assert not warned and m16.fused_out_head and not m16._fused_out_head_verified and len(calls) == 2
    m16.fuse_norm_act()
    assert not m16._fused_out_head_verified  # a new fuse_norm_act checks again


def test_fused_out_head_that_raises_falls_back_to_the_half_head_once(monkeypatch):
    """A fused output head that raises (e.g. a Triton compile failure on a new GPU) failed every forward:
    the model warns once naming the error, returns the unfused half head and never calls the fused op again."""
    from ppap_fast.ops import out_head

    m16 = ADMUNet(**SMALL, use_fp16=True).eval()
    m16.load_state_dict(_randomised().state_dict(), strict=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    calls = []

    def broken_op(*a, **kw):
        calls.append(1)
        raise RuntimeError("triton compile failed: out of resources\n(long compiler log)")

    with torch.no_grad():
        unfused = m16.fuse_norm_act(fused_out_head=False)(x, t)
        m16.fuse_norm_act()
        monkeypatch.setattr(out_head, "group_norm_silu_conv3x3", broken_op)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = m16(x, t), m16(x, t)
    warned = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert warned == ["ADMUNet: the fused output head (ops.group_norm_silu_conv3x3) raised RuntimeError: triton "
                      "compile failed: out of resources; using the unfused half head from now on "
                      "(fuse_norm_act(fused_out_head=False)); please report this with your GPU and versions"], warned
    assert len(calls) == 1 and not m16.fused_out_head
    assert torch.isfinite(unfused).all() and torch.equal(first, unfused) and torch.equal(second, unfused)
    monkeypatch.setattr(out_head, "group_norm_silu_conv3x3", lambda *a, **kw: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory")))
    with torch.no_grad(), pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        m16.fuse_norm_act()(x, t)  # no kernel fault: raised, the fused head kept
    assert m16.fused_out_head


def test_fused_out_head_check_is_off_on_cpu_and_while_capturing():
    m16 = ADMUNet(**SMALL, use_fp16=True).eval().fuse_norm_act()
    assert not m16._should_verify_fused_head(torch.zeros(1))


@pytest.mark.cuda
@cuda
def test_fused_norm_act_cuda_fp16_channels_last(fixtures_dir):
    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    m = ADMUNet.from_config(g["config"]).convert_to_fp16(torch.float16)
    m.load_state_dict(g["state_dict"], strict=True)
    m = m.cuda().eval().to(memory_format=torch.channels_last).fuse_norm_act()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused head's first-use check falling back fails here
        out = m(g["x"].cuda().contiguous(memory_format=torch.channels_last), g["t"].cuda()).cpu()
    from ppap_fast import ops

    assert m.fused_out_head and m._fused_out_head_verified == {"cuda:0"}
    assert ops.last_backend("group_norm_silu_conv3x3") == "triton"
    assert ops.last_backend("group_norm_act") == "triton"
    assert ops.last_backend("upsample_nearest2x") == ops.last_backend("avg_pool2x") == "triton"  # resblock_updown
    assert ops.last_backend("cat_channels") == "triton"  # the decoder's skips
    rel = ((out - g["out"]).norm() / g["out"].norm()).item()
    assert rel < 5e-3, rel


@pytest.mark.parametrize("shape,groups", [((3, 32, 5, 7), 32), ((2, 64, 4, 4), 32), ((2, 96, 3, 5), 32),
                                          ((2, 12, 9), 3), ((1, 8, 2, 3, 4), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_from_channel_stats_is_group_norm(shape, groups, affine):
    from ppap_fast.models.adm import group_norm_from_channel_stats

    g = torch.Generator().manual_seed(sum(shape) + groups)
    # channels of one group with different means and spreads, far from zero (cancellation would show)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.rand(C, dtype=torch.float64, generator=g).add(
        0.1).view((1, C) + (1,) * (len(shape) - 2)) + torch.randn(C, generator=g, dtype=torch.float64).mul(50).view(
        (1, C) + (1,) * (len(shape) - 2))
    w = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(C, generator=g, dtype=torch.float64) if affine else None
    want = torch.nn.functional.group_norm(x, groups, w, b, 1e-5)
    got = group_norm_from_channel_stats(x, groups, w, b, 1e-5)
    assert torch.isfinite(got).all()
    assert (got - want).norm() / want.norm() < 1e-12
    got32 = group_norm_from_channel_stats(x.float(), groups, None if w is None else w.float(),
                                          None if b is None else b.float(), 1e-5)
    assert (got32.double() - want).norm() / want.norm() < 1e-5
    with pytest.raises(ValueError, match="divide"):
        group_norm_from_channel_stats(x, 5, None, None)


def test_set_group_norm_stats_only_changes_compiled_cpu_traces(monkeypatch):
    from ppap_fast.models import adm

    torch.manual_seed(0)
    model = ADMUNet(image_size=32, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                    attention_resolutions=(), channel_mult=(1, 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    calls = []
    real = adm.group_norm_from_channel_stats
    monkeypatch.setattr(adm, "group_norm_from_channel_stats", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        want = model(x, t)
        assert model.set_group_norm_stats("channel") is model
        assert torch.equal(model(x, t), want) and not calls  # eager: F.group_norm as before
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager")(x, t)
    # traced: the 32x32 norms with more channels than groups (the up path's 64 and 96), not the others
    assert calls and all(s[1] > 32 and s[2] * s[3] >= 1024 for s in calls)
    assert (got - want).norm() / want.norm() < 1e-5
    with pytest.raises(ValueError, match="channel"):
        model.set_group_norm_stats("per-channel")
    model.set_group_norm_stats("group")
    assert not any(getattr(m, "stats_by_channel", False) for m in model.modules())


@pytest.mark.parametrize("fused", [False, True])
def test_x_of_another_dtype_than_the_model_gives_the_output_in_x_dtype(fused):
    """x of another dtype than the weights (float64 / half x into a float32 model, float32 x into model.half())
    ran the whole torso (in the torso's dtype) and then failed at the output conv ('Input type (double) and
    bias type (float) should be the same'). The head now runs in its weights' dtype, the output in x's."""
    m = _randomised()
    if fused:
        m.fuse_norm_act()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        for dt in (torch.float64, torch.float16, torch.bfloat16):
            xd = x.to(dt)
            out = m(xd, t)
            assert out.dtype == dt and torch.isfinite(out).all()
            torch.testing.assert_close(out, m(xd.float(), t).to(dt), rtol=0, atol=0)
        mh = copy.deepcopy(m).half()
        out = mh(x, t)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out, mh(x.half(), t).float(), rtol=0, atol=0)


def test_from_checkpoint_non_strict_names_what_it_left_out(fixtures_dir, tmp_path):
    """strict=False dropped missing / unexpected keys without a word (a partial model ran silently) and a
    misshaped key was load_state_dict's multi-line RuntimeError: the dropped keys are now a warning naming
    them, a misshaped key or a non-finite value a one-line CheckpointError."""
    from ppap_fast.models.offtheshelf import CheckpointError

    g = torch.load(fixtures_dir / "adm_small_golden_1.pt", weights_only=True)
    sd = dict(g["state_dict"])
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(2)
    f = tmp_path / "partial.pt"
    torch.save(sd, f)
    with pytest.warns(UserWarning, match=r"partial\.pt loaded partially .*strict=False\): 1 missing keys keep their "
                                         r"initial values \['out\.2\.bias'\], 1 unexpected keys ignored "
                                         r"\['extra\.weight'\]"):
        m = ADMUNet.from_checkpoint(f, g["config"], strict=False)
    assert torch.equal(m.out[2].weight, g["state_dict"]["out.2.weight"]) and not m.out[2].bias.any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ADMUNet.from_checkpoint(_save(tmp_path / "full.pt", g["state_dict"]), g["config"], strict=False)
    bad = dict(g["state_dict"], **{"out.2.weight": torch.zeros(3, 32, 3, 3)})
    with pytest.raises(CheckpointError, match=r"bad\.pt does not fit .* even with strict=False: 1 shape mismatches "
                                              r"\['out\.2\.weight: model \(6, 32, 3, 3\) vs checkpoint \(3, 32, 3, 3\)'\]"):
        ADMUNet.from_checkpoint(_save(tmp_path / "bad.pt", bad), g["config"], strict=False)
    nan = dict(g["state_dict"], **{"out.2.bias": torch.full((6,), float("nan"))})
    with pytest.raises(CheckpointError, match=r"nan\.pt has non-finite values in \['out\.2\.bias'\]"):
        ADMUNet.from_checkpoint(_save(tmp_path / "nan.pt", nan), g["config"], strict=False)


def _save(path, sd):
    torch.save(sd, path)
    return path


def test_num_heads_not_dividing_the_attention_channels_is_refused_at_construction():
    """num_heads (or num_heads_upsample) not dividing an attention block's channels built the model, whose first
    forward then failed in the attention ('qkv width 192 is not divisible by 3*num_heads=9')."""
    kw = {**SMALL, "num_head_channels": -1}
    with pytest.raises(ValueError, match=r"num_heads 3 does not divide the 64 channels of an attention block"):
        ADMUNet(**kw, num_heads=3)
    with pytest.raises(ValueError, match=r"num_heads 5 does not divide the 64 channels .*num_heads_upsample"):
        ADMUNet(**kw, num_heads=2, num_heads_upsample=5)
    m = ADMUNet(**kw, num_heads=4, num_heads_upsample=2).eval()
    assert m.middle_block[1].num_heads == 4 and m.output_blocks[0][1].num_heads == 2
    with torch.no_grad():
        assert torch.isfinite(m(torch.randn(1, 3, 16, 16), torch.tensor([1]))).all()


def test_timesteps_forms():
    """An int, a float, a [1] tensor (guided-diffusion broadcasts it over the batch; here it was refused) and a
    [B] tensor give the same output; other shapes are one-line errors saying what is accepted."""
    m = _randomised()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = m(x, torch.tensor([7, 7]))
        assert torch.isfinite(want).all()
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7.0]), [7, 7], torch.tensor([7, 7]).int()):
            torch.testing.assert_close(m(x, t), want, rtol=0, atol=0)
        for bad in (torch.tensor([[7], [7]]), torch.tensor([7, 7, 7])):
            with pytest.raises(ValueError, match=r"timesteps must be one value or one per sample, shape \(2,\), got "
                                                 rf"shape {re.escape(str(tuple(bad.shape)))}"):
                m(x, bad)


def test_script_flag_overrides():
    """from_config / from_checkpoint overrides that are script flags (class_cond=True, learn_sigma=False,
    num_channels=...) were the constructor's TypeError ('unexpected keyword argument'); on flags and presets they
    now change the flags, on UNetModel kwargs they are a one-line error naming the arguments to use."""
    flags = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16", learn_sigma=True,
                 channel_mult="1,2", num_head_channels=8)
    m = ADMUNet.from_config(flags, class_cond=True, learn_sigma=False, num_channels=64, num_res_blocks=2)
    want = ADMUNet.from_config(dict(flags, class_cond=True, learn_sigma=False, num_channels=64, num_res_blocks=2))
    assert (m.num_classes, m.out_channels, m.model_channels, m.num_res_blocks) == (1000, 3, 64, 2)
    assert [(k, v.shape) for k, v in m.state_dict().items()] == [(k, v.shape) for k, v in want.state_dict().items()]
    p = ADMUNet.from_config("256x256_diffusion_uncond", num_channels=32, num_head_channels=16, use_fp16=False)
    assert p.model_channels == 32 and p.out_channels == 6 and p.trained_schedule == ("linear", 1000)
    with pytest.raises(ValueError, match=r"unknown ADM flags: \['bogus'\]"):
        ADMUNet.from_config(flags, bogus=1)
    with pytest.raises(ValueError, match=r"overrides \['class_cond'\] are not ADMUNet arguments, and this config "
                                         r"gives UNetModel arguments: override those \(image_size, "):
        ADMUNet.from_config(SMALL, class_cond=True)


@pytest.mark.parametrize("fused", [False, True])
def test_empty_batch(fused):
    """A batch of 0 (an empty shard) failed in the attention blocks: reshape(b, c, -1) of 0 elements is ambiguous."""
    m = _randomised(num_classes=10)
    if fused:
        m.fuse_norm_act()
    none = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        for x in (torch.randn(0, 3, 16, 16), torch.randn(0, 3, 16, 16).to(memory_format=torch.channels_last)):
            out = m(x, none, none)
            assert out.shape == (0, 6, 16, 16) and out.dtype == torch.float32


def test_attention_resolution_flags_the_unet_never_reaches_are_refused():
    """A flag resolution that is no level of the UNet (image_size // r not a downsample rate it reaches) built a
    model without that attention block, silently."""
    from ppap_fast.models import adm_kwargs_from_flags

    flags = dict(image_size=64, num_channels=32, use_fp16=False)  # channel_mult (1, 2, 3, 4): 64, 32, 16, 8
    assert adm_kwargs_from_flags(dict(flags, attention_resolutions="32,16,8"))["attention_resolutions"] == (2, 4, 8)
    for bad, missed in (("24", [24]), ("16,4", [4]), ("128", [128])):
        with pytest.raises(ValueError, match=rf"attention_resolutions='{bad}': {re.escape(str(missed))} not among "
                                             r"the resolutions this UNet runs at \(\[64, 32, 16, 8\]: image_size 64 "
                                             r"halved 3 times\)"):
            adm_kwargs_from_flags(dict(flags, attention_resolutions=bad))


def test_attention_rates_the_unet_never_reaches_are_refused():
    """UNetModel kwargs: a downsample rate no level reaches (3, or 4 with two levels) built no attention there."""
    for bad, missed in (((2, 4), [4]), ((3,), [3])):
        with pytest.raises(ValueError, match=rf"attention_resolutions {re.escape(str(bad))} are downsample rates; "
                                             rf"{re.escape(str(missed))} is none this UNet reaches \(\[1, 2\], for 2 "
                                             r"channel_mult levels\)"):
            ADMUNet(**{**SMALL, "attention_resolutions": bad})
    m = ADMUNet(**{**SMALL, "attention_resolutions": (1, 2)})
    assert sum(type(b).__name__ == "AttentionBlock" for b in m.modules()) == 2 + 1 + 4  # encoder, middle, decoder
