"""diffusers adapter (tiny random UNet2DModel; no downloads) and the guided-diffusion cond_fn re-export."""
import subprocess
import sys

import pytest
import torch

from ppap_fast.sampling import eps_correction
from ppap_fast.testing import linear_classifier_guide

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, UNet2DModel)

from ppap_fast.integrations.diffusers import PPAPGuidance, PPAPGuidedPipeline  # noqa: E402

SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler]
B, C, H = 4, 3, 8

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=H, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def classifier():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, C * H * H, generator=g) * 0.2
    y = torch.tensor([0, 1, 2, 0])
    return W, y


def _logp(W, y, x):
    return torch.log_softmax(x.flatten(1) @ W.T, -1)[torch.arange(x.shape[0]), y]


def _manual_loop(unet, sched, steps, seed, guided=None):
    """The user's 3-line loop."""
    sched.set_timesteps(steps)
    x = torch.randn((B, C, H, H), generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    # DDIM with clip_sample: re-derive eps from the clipped x0 (guided-diffusion's ddim_sample does),
    # else the direction term carries -grad while x0's +grad is clipped away
    kw = {"generator": gen} if not isinstance(sched, DDIMScheduler) else {"use_clipped_model_output": True}
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(x, t).sample
            if guided is not None:
                eps = guided.correct(eps, x, t, sched)
            x = sched.step(eps, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_scale_zero_is_unguided_and_guidance_moves_to_target(unet, classifier, cls):
    W, y = classifier
    sched = cls(num_train_timesteps=1000)
    plain = _manual_loop(unet, sched, 6, seed=1)
    zero = _manual_loop(unet, sched, 6, seed=1, guided=PPAPGuidance(linear_classifier_guide(W, y, 0.0)))
    assert torch.equal(zero, plain)
    guided = _manual_loop(unet, sched, 6, seed=1, guided=PPAPGuidance(linear_classifier_guide(W, y, 4.0)))
    assert torch.isfinite(guided).all()
    gain = _logp(W, y, guided) - _logp(W, y, plain)
    assert (gain >= -1e-4).all() and gain.mean() > 0.1, gain  # (a sample already at log p = 0 cannot gain)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_pipeline(unet, classifier, cls):
    W, y = classifier
    sched = cls(num_train_timesteps=1000)
    pipe = PPAPGuidedPipeline(unet, sched, linear_classifier_guide(W, y, 4.0))
    run = lambda **kw: pipe(batch_size=B, num_inference_steps=5, generator=torch.Generator().manual_seed(3),  # noqa: E731
                            output_type="raw", **kw).images
    guided, off = run(), run(guidance_scale=0.0)
    plain = PPAPGuidedPipeline(unet, sched)(batch_size=B, num_inference_steps=5,
                                            generator=torch.Generator().manual_seed(3), output_type="raw").images
    assert torch.equal(off, plain)
    gain = _logp(W, y, guided) - _logp(W, y, plain)
    assert (gain >= -1e-4).all() and gain.mean() > 0.1, gain
    if cls is DDIMScheduler:  # same noise and loop as diffusers' own DDIMPipeline
        ref = diffusers.DDIMPipeline(unet, DDIMScheduler.from_config(sched.config))(
            batch_size=B, num_inference_steps=5, generator=torch.Generator().manual_seed(3), output_type="np",
            eta=0.0).images
        np_imgs = pipe(batch_size=B, num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                       output_type="np", guidance_scale=0.0).images
        assert abs(np_imgs - ref).max() < 1e-5
        pil = pipe(batch_size=1, num_inference_steps=2, output_type="pil").images
        assert len(pil) == 1 and pil[0].size == (H, H)


def test_correction_formula_and_parameterisations(classifier):
    W, y = classifier
    guide = linear_classifier_guide(W, y, 2.0)
    x, eps = torch.randn(B, C, H, H), torch.randn(B, C, H, H)
    t = torch.tensor([999, 500, 10, 0])
    s_eps = DDPMScheduler(num_train_timesteps=1000)
    g = guided = PPAPGuidance(guide)
    abar = s_eps.alphas_cumprod[t].view(-1, 1, 1, 1)
    grad = guide(x, t)
    want = eps_correction(eps, grad, abar)
    got = guided.correct(eps, x, t, s_eps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # learned variance: only the eps half moves
    both = guided.correct(torch.cat([eps, x], 1), x, t, s_eps)
    torch.testing.assert_close(both[:, :C], want, rtol=1e-6, atol=1e-6)
    assert torch.equal(both[:, C:], x)
    # v-prediction / sample prediction: the same eps correction, in their own parameterisation
    a, s1 = abar.sqrt(), (1 - abar).sqrt()
    x0 = (x - s1 * eps) / a
    v = a * eps - s1 * x0
    sv = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    v2 = g.correct(v, x, t, sv)
    torch.testing.assert_close(a * v2 + s1 * x, want, rtol=1e-5, atol=1e-5)
    ss = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    x02 = g.correct(x0, x, t, ss)
    torch.testing.assert_close((x - a * x02) / s1, want, rtol=1e-4, atol=1e-4)


def test_bad_inputs(unet, classifier):
    W, y = classifier
    guided = PPAPGuidance(linear_classifier_guide(W, y, 1.0))
    x = torch.randn(B, C, H, H)
    bad = DDPMScheduler(num_train_timesteps=1000)
    bad.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        guided.correct(x, x, 10, bad)
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        PPAPGuidedPipeline(unet, bad, linear_classifier_guide(W, y, 1.0))(batch_size=1, num_inference_steps=2)
    with pytest.raises(ValueError, match="sigma space"):
        guided.correct(x, x, 10, EulerDiscreteScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match="does not match"):
        guided.correct(x[:, :2], x, 10, DDIMScheduler())
    with pytest.raises(ValueError, match="shape"):
        guided.correct(x, x, torch.tensor([1, 2]), DDIMScheduler())
    with pytest.raises(TypeError):
        PPAPGuidance(3)
    with pytest.raises(ValueError):
        PPAPGuidance(lambda x, t: x, scale=float("nan"))
    with pytest.raises(ValueError, match="gradient"):
        PPAPGuidance(lambda x, t: x[:1]).correct(x, x, 5, DDIMScheduler())
    with pytest.raises(ValueError, match="output_type"):
        PPAPGuidedPipeline(unet, DDIMScheduler())(output_type="jpg")
    with pytest.raises(ValueError, match="image_shape"):
        PPAPGuidedPipeline(lambda x, t: x, DDIMScheduler())(batch_size=1, num_inference_steps=1)


def test_any_denoiser_callable(unet):
    pipe = PPAPGuidedPipeline(lambda x, t: unet(x, t).sample, DDIMScheduler(num_train_timesteps=1000),
                              image_shape=(C, H, H))
    a = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = PPAPGuidedPipeline(unet, DDIMScheduler(num_train_timesteps=1000))(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_guided_diffusion_cond_fn_is_the_guidance_one():
    from ppap_fast import guidance
    from ppap_fast.integrations import guided_diffusion

    assert guided_diffusion.as_cond_fn is guidance.as_cond_fn
    import ppap_fast.integrations as integ

    assert integ.as_cond_fn is guidance.as_cond_fn and integ.PPAPGuidance is PPAPGuidance


def test_imports_without_diffusers():
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import ppap_fast, ppap_fast.integrations, ppap_fast.integrations.diffusers as d\n"
            "import ppap_fast.integrations.guided_diffusion, ppap_fast.fast_sampling\n"
            "assert 'diffusers' not in sys.modules or sys.modules['diffusers'] is None\n"
            "import torch\n"
            "g = d.PPAPGuidance(lambda x, t: torch.ones_like(x))\n"
            "class S: alphas_cumprod = torch.linspace(0.99, 0.01, 10); init_noise_sigma = 1.0\n"
            "x = torch.zeros(2, 1, 2, 2)\n"
            "out = g.correct(x, x, 3, S())\n"
            "assert torch.allclose(out, -(1 - S.alphas_cumprod[3]).sqrt().expand_as(x))\n"
            "try:\n    d.PPAPGuidedPipeline(None, S())()\nexcept ImportError: print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_fast_guidance_merges_experts_and_matches_routed(unet):
    guide = _bank_guide()
    fast, slow = PPAPGuidance(guide), PPAPGuidance(guide, fast=False)
    for cls in (DDIMScheduler, DPMSolverMultistepScheduler):
        a = _manual_loop(unet, cls(num_train_timesteps=1000), 5, seed=2, guided=fast)
        b = _manual_loop(unet, cls(num_train_timesteps=1000), 5, seed=2, guided=slow)
        assert (a - b).norm() / b.norm() < 1e-5
    assert len(fast._fast_guides[torch.device("cpu")]._merged_models) == 5
    x = torch.randn(B, C, H, H)  # a device-side / mixed t routes per sample: same gradient
    t_mixed = torch.tensor([900, 500, 100, 10])
    torch.testing.assert_close(fast.grad(x, t_mixed), guide(x, t_mixed), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="unknown fast options"):
        PPAPGuidance(guide, cuda_graph=True)


def test_pipeline_is_a_diffusion_pipeline(unet, classifier, tmp_path):
    W, y = classifier
    guide = linear_classifier_guide(W, y, 4.0)
    pipe = PPAPGuidedPipeline(unet, DDIMScheduler(num_train_timesteps=1000), guide)
    assert isinstance(pipe, diffusers.DiffusionPipeline)
    assert set(pipe.components) == {"unet", "scheduler"} and pipe.components["unet"] is unet
    pipe.set_progress_bar_config(disable=True)
    run = lambda p: p(batch_size=B, num_inference_steps=4, generator=torch.Generator().manual_seed(7),  # noqa: E731
                      output_type="raw").images
    want = run(pipe)
    # from an ordinary diffusers pipeline, adding the guide
    ddim = diffusers.DDIMPipeline(unet, DDIMScheduler(num_train_timesteps=1000))
    from_pipe = PPAPGuidedPipeline.from_pipe(ddim, guide=guide)
    assert from_pipe.unet is unet and from_pipe.guidance is not None
    from_pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run(from_pipe), want)
    # save_pretrained / from_pretrained round trip (local directory: nothing downloaded); the guide is passed again
    pipe.save_pretrained(tmp_path)
    loaded = PPAPGuidedPipeline.from_pretrained(tmp_path, guide=guide)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "PPAPGuidedPipeline" and loaded.guidance is not None
    assert torch.allclose(run(loaded), want, atol=1e-6)
    unguided = PPAPGuidedPipeline.from_pretrained(tmp_path)
    unguided.set_progress_bar_config(disable=True)
    assert unguided.guidance is None and not torch.allclose(run(unguided), want, atol=1e-3)
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw", [
    {},
    {"resnet_time_scale_shift": "scale_shift", "down_block_types": ("ResnetDownsampleBlock2D", "DownBlock2D"),
     "up_block_types": ("UpBlock2D", "ResnetUpsampleBlock2D")},
    {"block_out_channels": (8, 16), "layers_per_block": 2, "add_attention": False},
])
def test_fuse_norm_act_matches_the_modules(backend, kw):
    """Fused ResnetBlock2D (GroupNorm + SiLU one op, conv biases in the next op) equals the modules: the
    default and scale-shift time embeddings, resnet up/down blocks, conv shortcuts; undone by False."""
    from ppap_fast import ops
    from ppap_fast.integrations.diffusers import fuse_norm_act

    torch.manual_seed(1)
    cfg = dict(sample_size=H, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(8, 16),
               norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D"))
    net = UNet2DModel(**{**cfg, **kw}).eval()
    x, t = torch.randn(B, C, H, H), torch.tensor([10, 500, 999, 0])
    with torch.no_grad():
        want = net(x, t).sample
        n = fuse_norm_act(net)
        assert n == sum(type(m).__name__ == "ResnetBlock2D" for m in net.modules()) > 0
        ops.set_backend(backend)
        try:
            got = net(x, t).sample
        finally:
            ops.set_backend(None)
        assert ops.last_backend("group_norm_act") == backend and ops.last_backend("bias_residual_add") == backend
        assert ((got - want).norm() / want.norm()).item() < 1e-5
        assert fuse_norm_act(net, False) == 0
        assert torch.equal(net(x, t).sample, want)


def _bank_guide(scale=3.0):
    from ppap_fast.experts import ExpertBank
    from ppap_fast.guidance import ClassGuide
    from ppap_fast.models.tiny import TinyResNet

    torch.manual_seed(1)
    bank = ExpertBank(TinyResNet(widths=(8, 16), layers=(1, 1), in_channels=C, num_classes=3), "resnet",
                      n_experts=5, r=4, alpha=2)
    with torch.no_grad():
        for name, t in bank.per_expert_state_dict().items():
            if not name.endswith(("num_batches_tracked", "running_var")):
                t.normal_(0, 0.2)
    return ClassGuide(bank.eval(), torch.tensor([0, 1, 2, 0]), scale=scale)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_pipeline_clips_x0_before_the_guidance_as_guided_diffusion(unet, classifier, pt):
    """DDIMScheduler's default clip_sample=True: the pipeline equals the reference DDIM sampler
    (guided-diffusion's order: clip x0, then condition_score; the guidance itself is never clipped)."""
    from ppap_fast import Schedule
    from ppap_fast.sampling import sample_loop

    W, y = classifier
    guide, steps = linear_classifier_guide(W, y, 4.0), 10
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sample_loop(lambda x, t: unet(x, t).sample, xT, Schedule.create("linear", 1000, respacing=f"ddim{steps}"),
                          guide=guide)
    sched = DDIMScheduler(prediction_type=pt)
    assert sched.config.clip_sample
    acp = sched.alphas_cumprod

    def den(x, t):  # the same denoiser in the scheduler's parameterisation
        eps = unet(x, t).sample
        a, s1 = acp[int(t)].sqrt(), (1 - acp[int(t)]).sqrt()
        x0 = (x - s1 * eps) / a
        return {"epsilon": eps, "v_prediction": a * eps - s1 * x0, "sample": x0}[pt]

    pipe = PPAPGuidedPipeline(den, sched, guide, image_shape=(C, H, H))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw").images
    assert (ref.abs() > 0.999).any()  # clipping mattered on this run
    assert (out - ref).abs().max() < 1e-4


def test_half_precision_unet_with_a_float32_guide():
    guide = _bank_guide()
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(B, C, H, H).to(dt)
        want = guide(x.float(), torch.full((B,), 500))
        for fast in (True, False):
            g = PPAPGuidance(guide, fast=fast).grad(x, 500)
            assert g.dtype == dt
            torch.testing.assert_close(g.float(), want.to(dt).float(), rtol=2e-2, atol=2e-2)


def test_scheduler_with_other_timesteps_than_the_bank_is_refused():
    guide = _bank_guide()
    x = torch.randn(B, C, H, H)
    for T in (500, 2000):
        with pytest.raises(ValueError, match="num_train_timesteps"):
            PPAPGuidance(guide).correct(torch.randn_like(x), x, 100, DDIMScheduler(num_train_timesteps=T))
    PPAPGuidance(guide).correct(torch.randn_like(x), x, 100, DDIMScheduler(num_train_timesteps=1000))
