"""--denoiser diffusers:PATH: a UNet2DModel or pipeline saved with save_pretrained, as the CLI's denoiser
(guided-sample, data-free generation); its scheduler config checked against the run's schedule."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

from ppap_fast import distributed as D  # noqa: E402
from ppap_fast.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet(**kw):
    torch.manual_seed(0)
    return UNet2DModel(**{**dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")), **kw}).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(a UNet folder, a DDPM pipeline folder with the default linear 1000-step scheduler, the UNet)."""
    root = tmp_path_factory.mktemp("diffusers")
    unet = _unet()
    unet.save_pretrained(root / "unet_only")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "pipe")
    return root / "unet_only", root / "pipe", unet


def test_saved_unet_and_pipeline_load_as_the_unets_eps(saved):
    unet_dir, pipe_dir, unet = saved
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    want = unet(x, t).sample
    for path in (unet_dir, pipe_dir):
        den = D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000)
        with torch.no_grad():
            assert torch.equal(den(x, t), want), path


def test_scheduler_config_must_match_the_runs_schedule(saved, tmp_path):
    _, pipe_dir, unet = saved
    with pytest.raises(ValueError, match="linear schedule over 1000 steps.*pass --schedule linear"):
        D.build_denoiser(f"diffusers:{pipe_dir}", None, 1, "cpu", "cosine", 1000)
    for sched, msg in ((DDPMScheduler(beta_schedule="squaredcos_cap_v2"), "pass --schedule cosine"),
                       (DDPMScheduler(num_train_timesteps=500, beta_start=2e-4, beta_end=0.04),
                        "--schedule linear --num-timesteps 500"),
                       (DDPMScheduler(beta_end=0.012, beta_schedule="scaled_linear"), "none of the named"),
                       (DDPMScheduler(beta_end=0.03), "none of the named"),
                       (DDPMScheduler(prediction_type="v_prediction"), "predicts 'v_prediction'"),
                       (DDPMScheduler(rescale_betas_zero_snr=True), "rescale_betas_zero_snr")):  # was accepted
        path = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
        with pytest.raises(ValueError, match=msg):
            D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000)
    cos = tmp_path / "cos"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(cos)
    D.build_denoiser(f"diffusers:{cos}", None, 1, "cpu", "cosine", 1000)  # matching: no error


def test_conditional_missing_and_checkpoint_specs_are_refused(saved, tmp_path):
    unet_dir, _, _ = saved
    UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                         norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(tmp_path / "text")
    _unet(num_class_embeds=3).save_pretrained(tmp_path / "cls")
    _unet(time_embedding_type="fourier").save_pretrained(tmp_path / "ve")  # was loaded: output / t, NaN at t = 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    for path, msg in ((tmp_path / "text", "UNet2DConditionModel.*prompt_embeds"), (tmp_path / "cls", "class-conditional"),
                      (tmp_path / "ve", "time_embedding_type='fourier'"), (tmp_path / "empty", "no config.json"), (tmp_path / "noweights", "no diffusion_pytorch_model")):
        with pytest.raises(ValueError, match=msg):
            D.build_denoiser(f"diffusers:{path}", None, 1, "cpu")
    with pytest.raises(ValueError, match="drop --checkpoint"):
        D.build_denoiser(f"diffusers:{unet_dir}", "x.pt", 1, "cpu")


def test_generation_identity_follows_the_weights(saved, tmp_path):
    """A data-free set of a diffusers denoiser is keyed on its weight files: new weights in the same folder are
    another set; other denoiser specs keep their identity (no new key: old sets keep their hash)."""
    cfg = lambda den: D.GenerateConfig(out_dir=str(tmp_path / "set"), num_images=2, shard_size=2, image_size=8,  # noqa: E731
                                       channels=1, denoiser=den, respacing="ddim2", device="cpu")
    path = tmp_path / "u"
    _unet().save_pretrained(path)
    before = cfg(f"diffusers:{path}").identity()
    assert before["denoiser_fingerprint"] and "denoiser_fingerprint" not in cfg("random-conv").identity()
    with torch.no_grad():
        u = _unet()
        u.conv_in.weight.add_(1)
    u.save_pretrained(path)
    assert cfg(f"diffusers:{path}").identity()["denoiser_fingerprint"] != before["denoiser_fingerprint"]


def test_cli_generates_and_guided_samples_with_a_saved_pipeline(saved, tmp_path):
    _, pipe_dir, _ = saved
    spec = f"diffusers:{pipe_dir}"
    out = tmp_path / "s.npz"
    assert main(["guided-sample", "--out", str(out), "--denoiser", spec, "--channels", "1", "--image-size", "8",
                 "--num-samples", "2", "--batch-size", "2", "--steps", "2", "--no-progress", "--device", "cpu"]) == 0
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["config"]["denoiser"] == spec
    res = D.generate(D.GenerateConfig(out_dir=str(tmp_path / "set"), num_images=2, shard_size=2, image_size=8,
                                      channels=1, denoiser=spec, respacing="ddim2", device="cpu"), D.DistEnv())
    assert res["written"] == [0]
    assert main(["guided-sample", "--out", str(tmp_path / "c.npz"), "--denoiser", spec, "--schedule", "cosine",
                 "--channels", "1", "--image-size", "8", "--num-samples", "1", "--no-progress", "--device", "cpu"]) == 2


def test_a_scheduler_config_without_betas_is_refused(saved, tmp_path):
    """A VE / sigma scheduler (ScoreSdeVe, KarrasVe: no beta_schedule) is no DDPM schedule: not taken for linear."""
    _, _, unet = saved
    path = tmp_path / "ve"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(path)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "ScoreSdeVeScheduler", "num_train_timesteps": 1000, "sigma_min": 0.01, "sigma_max": 1348.0}))
    with pytest.raises(ValueError, match="ScoreSdeVeScheduler.*no beta_schedule"):
        D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000)


def test_guided_sample_names_no_num_timesteps_flag_it_lacks(saved, tmp_path, capsys):
    """guided-sample samples over 1000 steps (no --num-timesteps): its error must not tell to pass that flag."""
    _, _, unet = saved
    path = tmp_path / "t500"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=500, beta_start=2e-4,
                                                    beta_end=0.04)).save_pretrained(path)
    assert main(["guided-sample", "--out", str(tmp_path / "s.npz"), "--denoiser", f"diffusers:{path}", "--channels",
                 "1", "--image-size", "8", "--num-samples", "1", "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "over 500 steps" in err and "--num-timesteps" not in err


def test_loaded_denoiser_takes_the_fast_samplers_fused_norms(saved):
    """DiffusersDenoiser.fuse_norm_act fuses the UNet's ResnetBlock2D norms (same outputs), so the fast
    sampler's CUDA options fuse and go channels_last as for ADM (recommended_options)."""
    from ppap_fast.fast_sampling import recommended_options

    unet_dir, _, unet = saved
    den = D.build_denoiser(f"diffusers:{unet_dir}", None, 1, "cpu")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        want = den(x, t)
        assert den.fuse_norm_act() is den
        assert any("forward" in vars(m) for m in den.unet.modules())  # blocks now run the fused forward
        assert torch.allclose(den(x, t), want, rtol=1e-5, atol=1e-6)
        den.fuse_norm_act(False)
        assert not any("forward" in vars(m) for m in den.unet.modules())
    opts = recommended_options(den, "cuda")
    assert opts["fuse_norm_act"] and opts["channels_last"]


def test_fuse_norm_act_warns_when_no_block_can_fuse():
    """A UNet whose ResnetBlock2Ds cannot run fused (act_fn="mish": no SiLU) ran unchanged without a word under
    FastGuidedSampler(fuse_norm_act=True)."""
    import warnings

    from ppap_fast.fast_sampling import FastGuidedSampler, FastSamplingWarning
    from ppap_fast.integrations.diffusers_models import DiffusersDenoiser
    from ppap_fast.schedule import Schedule

    sched = Schedule.create("linear", 1000, "ddim5")
    with pytest.warns(FastSamplingWarning, match="fuse_norm_act: no block of this UNet2DModel can run fused"):
        FastGuidedSampler(DiffusersDenoiser(_unet(act_fn="mish")), sched, fuse_norm_act=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastGuidedSampler(DiffusersDenoiser(_unet()), sched, fuse_norm_act=True)
        DiffusersDenoiser(_unet(act_fn="mish")).fuse_norm_act(False)


def test_latent_pipeline_is_refused(saved, tmp_path):
    """An LDMPipeline's UNet (its vqvae decodes the latents) was sampled as a pixel model: latents saved as images."""
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    _, pipe_dir, unet = saved
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=1, block_out_channels=(8,), norm_num_groups=4,
                 layers_per_block=1, num_vq_embeddings=8, vq_embed_dim=1)
    LDMPipeline(vqvae=vq, unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ldm")
    for path in (tmp_path / "ldm", tmp_path / "ldm" / "unet"):
        with pytest.raises(ValueError, match=r"latent diffusion pipeline \(its vqvae \(VQModel\)"):
            D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000)
    D.build_denoiser(f"diffusers:{pipe_dir / 'unet'}", None, 1, "cpu", "linear", 1000)  # a pixel pipeline's unet/


def test_a_pipeline_saved_as_an_fp16_variant_loads(saved, tmp_path):
    """save_pretrained(variant="fp16") writes only diffusion_pytorch_model.fp16.safetensors: it was refused
    as holding no weights. It loads as those weights, and keys a data-free set's identity."""
    _, _, unet = saved
    half = _unet().half()
    path = tmp_path / "v16"
    DDPMPipeline(unet=half, scheduler=DDPMScheduler()).save_pretrained(path, variant="fp16")
    den = D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000)
    want = {k: v.float() for k, v in half.state_dict().items()}
    got = den.unet.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k].float(), want[k]) for k in want)
    from ppap_fast.integrations.diffusers_models import weights_fingerprint

    assert len(weights_fingerprint(path)) == 2  # config.json and the variant's weights
    unet.save_pretrained(path / "unet", variant="bf16")  # two variants, no plain file: which one is unknown
    with pytest.raises(ValueError, match=r"several variants \['bf16', 'fp16'\]"):
        D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000)


def test_learned_variance_is_refused_for_ddpm_only(tmp_path, capsys):
    """A 2C-channel UNet whose scheduler says variance_type='learned' (its variance itself, not learned_range's
    interpolation) was sampled by DDPM as learned_range: refused there; DDIM ignores the variance channels."""
    unet = _unet(out_channels=2)
    path, rng = tmp_path / "learned", tmp_path / "range"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="learned")).save_pretrained(path)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="learned_range")).save_pretrained(rng)
    with pytest.raises(ValueError, match="variance_type='learned'.*--sampler ddim"):
        D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000, "ddpm")
    D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000, "ddim")
    D.build_denoiser(f"diffusers:{rng}", None, 1, "cpu", "linear", 1000, "ddpm")  # what the sampler computes
    args = ["guided-sample", "--denoiser", f"diffusers:{path}", "--channels", "1", "--image-size", "8",
            "--num-samples", "1", "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "p.npz"), "--sampler", "ddpm"]) == 2
    assert "variance_type='learned'" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "i.npz")]) == 0
    with pytest.raises(ValueError, match="variance_type='learned'"):
        D.generate(D.GenerateConfig(out_dir=str(tmp_path / "set"), num_images=1, shard_size=1, image_size=8,
                                    channels=1, denoiser=f"diffusers:{path}", sampler="ddpm", respacing="2",
                                    device="cpu"), D.DistEnv())


def test_fixed_variance_config_of_a_2c_unet_is_refused_for_ddpm(tmp_path, capsys):
    """A 2C-channel UNet whose scheduler says variance_type='fixed_small' / 'fixed_large' (inconsistent: diffusers'
    own step fails on it) was sampled by DDPM as learned_range without a word: refused naming the value; DDIM
    ignores the variance channels."""
    unet = _unet(out_channels=2)
    for vt in ("fixed_small", "fixed_large", "fixed_small_log"):
        path = tmp_path / vt
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=vt)).save_pretrained(path)
        with pytest.raises(ValueError, match=f"variance_type='{vt}' but the UNet outputs 2C channels"):
            D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000, "ddpm")
        D.build_denoiser(f"diffusers:{path}", None, 1, "cpu", "linear", 1000, "ddim")
    args = ["guided-sample", "--denoiser", f"diffusers:{tmp_path / 'fixed_small'}", "--channels", "1",
            "--image-size", "8", "--num-samples", "1", "--steps", "2", "--no-progress", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "p.npz"), "--sampler", "ddpm"]) == 2
    assert "variance_type='fixed_small'" in capsys.readouterr().err and not (tmp_path / "p.npz").exists()
    assert main([*args, "--out", str(tmp_path / "i.npz")]) == 0


def test_ddpm_takes_the_schedulers_fixed_variance(saved, tmp_path):
    """A C-channel UNet whose DDPMScheduler says variance_type='fixed_small' (diffusers' default) was sampled by
    --sampler ddpm with fixed_large (the samplers' default) without a word: its scheduler's variance is used."""
    import numpy as np

    from ppap_fast.data import to_uint8
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule
    from ppap_fast.seeding import PerSampleNoise

    _, _, unet = saved
    small, large = tmp_path / "small", tmp_path / "large"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="fixed_small")).save_pretrained(small)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type="fixed_large")).save_pretrained(large)
    den = D.build_denoiser(f"diffusers:{small}", None, 1, "cpu", "linear", 1000, "ddpm")
    sched = Schedule.create("linear", 1000, respacing="4")

    def ours(var_type):
        streams = PerSampleNoise((0,), range(2))
        with torch.no_grad():
            x0 = sample_loop(den, streams.randn((1, 8, 8)), sched, sampler="ddpm", var_type=var_type,
                             noise_fn=streams.noise_fn)
        return to_uint8(x0, truncate=True)

    want, other = ours("fixed_small"), ours("fixed_large")
    assert not np.array_equal(want, other)
    for path, expect, ref in ((small, "fixed_small", want), (large, "fixed_large", other)):
        for fast in ([], ["--no-fast"]):
            out = tmp_path / f"{path.name}{len(fast)}.npz"
            assert main(["guided-sample", "--out", str(out), "--denoiser", f"diffusers:{path}", "--channels", "1",
                         "--image-size", "8", "--num-samples", "2", "--steps", "4", "--sampler", "ddpm",
                         "--no-progress", "--device", "cpu", *fast]) == 0
            got = np.load(out)["images"]
            assert np.abs(got.astype(int) - ref).max() <= 1, (path.name, fast)  # fast path: rounding only
            assert json.loads(out.with_suffix(".json").read_text())["var_type"] == expect
    gen = lambda path: D.generate(D.GenerateConfig(  # noqa: E731
        out_dir=str(tmp_path / f"set_{path.name}"), num_images=2, shard_size=2, image_size=8, channels=1,
        denoiser=f"diffusers:{path}", sampler="ddpm", respacing="4", device="cpu"), D.DistEnv())
    res_s, res_l = gen(small), gen(large)
    assert res_s["var_type"] == "fixed_small" and res_l["var_type"] == "fixed_large"
    img = lambda path: np.load(tmp_path / f"set_{path.name}" / "shard_00000.npz")["images"]  # noqa: E731
    assert not np.array_equal(img(small), img(large))
    assert res_s["config_hash"] != res_l["config_hash"]  # a set sampled with fixed_large is not resumed as fixed_small


def test_ddpm_fixed_small_log_is_fixed_small(saved, tmp_path):
    """DDPMScheduler's fixed_small_log draws with the posterior std (computed in log space), as fixed_small: it
    fell to the samplers' fixed_large. fixed_large_log is left to the default (diffusers' step is NaN there)."""
    _, _, unet = saved
    for vt, want in (("fixed_small_log", "fixed_small"), ("fixed_large_log", None)):
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(variance_type=vt)).save_pretrained(tmp_path / vt)
        assert D.denoiser_var_type(f"diffusers:{tmp_path / vt}", "ddpm") == want
    sch = DDPMScheduler(variance_type="fixed_small_log")
    ref = DDPMScheduler(variance_type="fixed_small")
    assert torch.allclose(sch._get_variance(500), ref._get_variance(500) ** 0.5)


def test_the_schedulers_x0_clip_is_followed(saved, tmp_path):
    """The CLI clipped x0 to [-1, 1] whatever the saved scheduler said: clip_sample=False and clip_sample_range
    are followed (the fast path: clip or not only), thresholding=True is refused."""
    import numpy as np

    from ppap_fast.data import to_uint8
    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule
    from ppap_fast.seeding import PerSampleNoise

    _, _, unet = saved
    paths = {}
    for name, kw in (("noclip", dict(clip_sample=False)), ("range2", dict(clip_sample_range=2.0)),
                     ("thresh", dict(thresholding=True))):
        paths[name] = tmp_path / name
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**kw)).save_pretrained(paths[name])
    sched = Schedule.create("linear", 1000, respacing="ddim4")

    def ours(**clip):
        streams = PerSampleNoise((0,), range(2))
        with torch.no_grad():
            x0 = sample_loop(unet, streams.randn((1, 8, 8)), sched, sampler="ddim", noise_fn=streams.noise_fn, **clip)
        assert torch.isfinite(x0).all()
        return to_uint8(x0, truncate=True)

    clipped, unclipped = ours(), ours(clip_denoised=False)
    in_range2 = ours(clip_denoised=False, denoised_fn=lambda x0: x0.clamp(-2, 2))
    assert not np.array_equal(clipped, unclipped) and not np.array_equal(in_range2, unclipped)

    def cli(name, *extra):
        out = tmp_path / f"{name}{len(extra)}.npz"
        rc = main(["guided-sample", "--out", str(out), "--denoiser", f"diffusers:{paths[name]}", "--channels", "1",
                   "--image-size", "8", "--num-samples", "2", "--steps", "4", "--no-progress", "--device", "cpu",
                   *extra])
        return rc, (np.load(out)["images"] if rc == 0 else None)

    for extra in ([], ["--no-fast"]):
        rc, got = cli("noclip", *extra)
        assert rc == 0 and np.abs(got.astype(int) - unclipped).max() <= 1, extra  # fast path: rounding only
    rc, got = cli("range2", "--no-fast")
    assert rc == 0 and np.array_equal(got, in_range2)
    with pytest.raises(ValueError, match=r"clips x0 to \[-2.0, 2.0\].*sample with --no-fast"):
        D.denoiser_clip(f"diffusers:{paths['range2']}", fast=True)
    assert cli("range2")[0] == 2
    with pytest.raises(ValueError, match="thresholding=True.*set thresholding to false"):
        D.build_denoiser(f"diffusers:{paths['thresh']}", None, 1, "cpu", "linear", 1000, "ddim")
    gen = lambda path, **kw: D.generate(D.GenerateConfig(  # noqa: E731
        out_dir=str(tmp_path / f"set_{path.name}"), num_images=2, shard_size=2, image_size=8, channels=1,
        denoiser=f"diffusers:{path}", respacing="ddim4", device="cpu", **kw), D.DistEnv())
    _, pipe_dir, _ = saved
    gen(pipe_dir, fast=False), gen(paths["noclip"], fast=False)
    img = lambda path: np.load(tmp_path / f"set_{path.name}" / "shard_00000.npz")["images"]  # noqa: E731
    assert not np.array_equal(img(pipe_dir), img(paths["noclip"]))

    def ident(path):
        return D.GenerateConfig(out_dir="x", num_images=1, denoiser=f"diffusers:{path}").identity()

    assert "clip_x0" not in ident(pipe_dir)  # older sets' hashes hold
    assert ident(paths["noclip"])["clip_x0"] is None and ident(paths["range2"])["clip_x0"] == 2.0
    cfg_file = paths["range2"] / "scheduler" / "scheduler_config.json"
    for bad in (0, -1.0, "2"):  # refused before the fast path's check (it named --no-fast for a bound of 0)
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "clip_sample_range": bad}))
        with pytest.raises(ValueError, match=f"has clip_sample_range={bad!r}: give a finite bound > 0"):
            D.denoiser_clip(f"diffusers:{paths['range2']}", fast=True)


def test_guided_sample_stats_record_the_x0_clip(saved, tmp_path):
    """The stats JSON recorded var_type but not the x0 clip a diffusers scheduler config can turn off or widen."""
    unet_dir, pipe_dir, unet = saved
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample=False)).save_pretrained(tmp_path / "noclip")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(clip_sample_range=2.0)).save_pretrained(tmp_path / "range2")

    def clip_x0(path, *extra):
        out = tmp_path / f"{path.name}.npz"
        assert main(["guided-sample", "--out", str(out), "--denoiser", f"diffusers:{path}", "--channels", "1",
                     "--image-size", "8", "--num-samples", "1", "--steps", "2", "--no-progress", "--device", "cpu",
                     *extra]) == 0
        return json.loads(out.with_suffix(".json").read_text())["clip_x0"]

    assert clip_x0(pipe_dir) == 1.0 and clip_x0(unet_dir) == 1.0
    assert clip_x0(tmp_path / "noclip") is None
    assert clip_x0(tmp_path / "range2", "--no-fast") == 2.0


def test_the_cli_ddim_step_is_ddim_pipelines_with_the_clipped_models_output(saved):
    """The CLI's DDIM re-derives eps from the clipped x0 (guided-diffusion): diffusers' DDIMScheduler.step with
    use_clipped_model_output=True, not its default (the model's eps), as the README's diffusers:PATH note says."""
    from pathlib import Path

    from diffusers import DDIMScheduler

    from ppap_fast.sampling import sample_loop
    from ppap_fast.schedule import Schedule

    _, _, unet = saved
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def diffusers_ddim(**kw):
        sched = DDIMScheduler(clip_sample=True)
        sched.set_timesteps(4)
        x = x_T.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t).sample, t, x, eta=0.0, **kw).prev_sample
        return x

    with torch.no_grad():
        ours = sample_loop(unet, x_T.clone(), Schedule.create("linear", 1000, respacing="ddim4"), sampler="ddim")
    assert torch.isfinite(ours).all()
    assert torch.allclose(ours, diffusers_ddim(use_clipped_model_output=True), rtol=0, atol=1e-5)
    assert (ours - diffusers_ddim()).abs().max() > 1e-2  # the default keeps the model's eps: other images
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "use_clipped_model_output=True" in readme.split("--denoiser diffusers:PATH", 1)[1]


def test_generation_identity_covers_the_scheduler_keys_that_change_images(saved, tmp_path):
    """The set's identity fingerprints the UNet's files, not the scheduler config: each key the CLI reads either
    must match the run (check_schedule: beta schedule, T, prediction type, ...) or is in the identity when not the
    default (var_type, clip_x0); the others (timestep spacing, offsets, the class under DDIM) change no image."""
    import numpy as np
    from diffusers import DDIMScheduler

    _, _, unet = saved

    def pipe(name, sched):
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / name)
        return tmp_path / name

    def cfg(path, sampler="ddim"):
        return D.GenerateConfig(out_dir=str(tmp_path / f"set_{path.name}"), num_images=2, shard_size=2, image_size=8,
                                channels=1, denoiser=f"diffusers:{path}", respacing="ddim4" if sampler == "ddim" else "4",
                                sampler=sampler, device="cpu", fast=False)

    def ident(path, sampler="ddim"):
        return {k: v for k, v in cfg(path, sampler).identity().items() if k != "denoiser"}  # its folder

    def images(path):
        D.generate(cfg(path), D.DistEnv())
        x = np.load(tmp_path / f"set_{path.name}" / "shard_00000.npz")["images"]
        assert x.shape == (2, 8, 8, 1)
        return x

    base = pipe("base", DDPMScheduler())
    want = images(base)
    for name, sched in (("spacing", DDPMScheduler(timestep_spacing="trailing", steps_offset=1)),
                        ("ddim", DDIMScheduler(set_alpha_to_one=False, timestep_spacing="linspace"))):
        path = pipe(name, sched)
        assert ident(path) == ident(base) and np.array_equal(images(path), want), name
    assert ident(pipe("ddim_for_ddpm", DDIMScheduler()), "ddpm") != ident(base, "ddpm")  # fixed_large, not small
    for name, kw in (("noclip", dict(clip_sample=False)), ("range2", dict(clip_sample_range=2.0))):
        path = pipe(name, DDPMScheduler(**kw))
        assert ident(path) != ident(base) and not np.array_equal(images(path), want), name
    for name, kw, msg in (("cos", dict(beta_schedule="squaredcos_cap_v2"), "pass --schedule cosine"),
                          ("t500", dict(num_train_timesteps=500, beta_start=2e-4, beta_end=0.04), "--num-timesteps 500"),
                          ("v", dict(prediction_type="v_prediction"), "predicts 'v_prediction'")):
        with pytest.raises(ValueError, match=msg):
            images(pipe(name, DDPMScheduler(**kw)))


def test_a_unet_folders_sibling_scheduler_is_not_its_own(saved, tmp_path):
    """A UNet saved alone took the scheduler config of a sibling scheduler/ folder (another model's) as its own; a
    pipeline's unet/ folder still takes its pipeline's."""
    _, _, unet = saved
    unet.save_pretrained(tmp_path / "unet_only")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "scheduler")
    den = D.build_denoiser(f"diffusers:{tmp_path / 'unet_only'}", None, 1, "cpu", "linear", 1000)
    with torch.no_grad():
        assert torch.isfinite(den(torch.zeros(1, 1, 8, 8), torch.tensor([5]))).all()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="pass --schedule cosine"):
        D.build_denoiser(f"diffusers:{tmp_path / 'p' / 'unet'}", None, 1, "cpu", "linear", 1000)

@pytest.mark.parametrize("name", ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"])
@pytest.mark.parametrize("content, why", [(b"\xff\xfe\x00 binary", r"is not valid JSON \('utf-8' codec"),
                                          (b'{"_class_name": ', r"is not valid JSON \(Expecting value"),
                                          (b"[1, 2]", r"must hold a JSON object, got a JSON list: save the model "
                                                      r"again \(save_pretrained\)")], ids=["binary", "cut", "list"])
def test_a_damaged_json_file_of_a_saved_pipeline_is_named(saved, tmp_path, name, content, why):
    """A damaged model_index.json / scheduler config / UNet config gave json's or the codec's message naming no
    file (a list: an AttributeError)."""
    import re
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(saved[1], pipe)
    (pipe / name).write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(pipe / name)) + " " + why):
        D.build_denoiser(f"diffusers:{pipe}", None, 1, "cpu", "linear", 1000)
