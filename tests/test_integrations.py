"""diffusers adapter (tiny random UNet2DModel; no downloads) and the guided-diffusion cond_fn re-export."""
import subprocess
import sys
import warnings

import pytest
import torch

from ppap_fast.guidance import ClassGuide
from ppap_fast.sampling import eps_correction
from ppap_fast.testing import linear_classifier_guide

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, HeunDiscreteScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, UNet2DModel)

from ppap_fast.integrations.diffusers import PPAPGuidance, PPAPGuidedPipeline  # noqa: E402

SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler]
B, C, H = 4, 3, 8
try:  # DPMSolverSDEScheduler samples its noise with torchsde's Brownian tree
    import torchsde  # noqa: F401
    SDE = "DPMSolverSDEScheduler"
except ImportError:
    SDE = pytest.param("DPMSolverSDEScheduler", marks=pytest.mark.skip(reason="torchsde is not installed"))

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


def _assert_moves_to_target(W, y, guided, plain):
    """Every sample's log p(y | x) no lower than unguided (1e-4), 0.1 higher on average (a sample
    already at log p = 0 cannot gain)."""
    gain = _logp(W, y, guided) - _logp(W, y, plain)
    assert (gain >= -1e-4).all() and gain.mean() > 0.1, gain


def _assert_pipeline_guidance_gains(unet, sched, W, y, steps: int, seed: int):
    """PPAPGuidedPipeline with a scale-4 linear-classifier guide vs unguided, same noise: finite and
    moved to the target (_assert_moves_to_target)."""
    def run(guide):
        pipe = PPAPGuidedPipeline(unet, sched, guide)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="raw").images

    plain, guided = run(None), run(linear_classifier_guide(W, y, 4.0))
    assert torch.isfinite(guided).all()
    _assert_moves_to_target(W, y, guided, plain)


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
    _assert_moves_to_target(W, y, guided, plain)


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
    _assert_moves_to_target(W, y, guided, plain)
    if cls is DDIMScheduler:  # same noise and loop as diffusers' own DDIMPipeline
        ref = diffusers.DDIMPipeline(unet, DDIMScheduler.from_config(sched.config))(
            batch_size=B, num_inference_steps=5, generator=torch.Generator().manual_seed(3), output_type="np",
            eta=0.0).images
        np_imgs = pipe(batch_size=B, num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                       output_type="np", guidance_scale=0.0).images
        assert abs(np_imgs - ref).max() < 1e-5
        pil = PPAPGuidedPipeline(unet, sched, linear_classifier_guide(W, y[:1], 4.0))(
            batch_size=1, num_inference_steps=2, output_type="pil").images  # one label per sample
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
    with pytest.raises(ValueError, match="alphas_cumprod"):
        guided.correct(x, x, 10, diffusers.EDMEulerScheduler())
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
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):  # inf: NaN images, no error
        PPAPGuidedPipeline(unet, DDIMScheduler())(num_inference_steps=2, eta=float("inf"))
    with pytest.raises(ValueError, match="latents must be finite"):  # unguided: NaN images, no error
        PPAPGuidedPipeline(unet, DDIMScheduler())(num_inference_steps=2, latents=torch.full((1, C, H, H), float("nan")))
    for n in (True, 2.0):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            PPAPGuidedPipeline(unet, DDIMScheduler())(batch_size=n, num_inference_steps=1)
    for n in (0, -1):  # 0: ZeroDivisionError in set_timesteps; -1: no step at all, x_T returned as the images
        with pytest.raises(ValueError, match=f"num_inference_steps must be a positive int, got {n}"):
            PPAPGuidedPipeline(unet, DDIMScheduler())(num_inference_steps=n)
    with pytest.raises(ValueError, match="image_shape"):
        PPAPGuidedPipeline(lambda x, t: x, DDIMScheduler())(batch_size=1, num_inference_steps=1)
    for bad in ((H, H), (1, C, H, H), (C, 8.5, H), (C, 0, H)):  # (H, W) sampled [B, H, W]: rows read as channels
        with pytest.raises(ValueError, match=r"image_shape must be \(C, H, W\): three positive ints"):
            PPAPGuidedPipeline(lambda x, t: torch.zeros_like(x), DDIMScheduler(), image_shape=bad)


def test_pipeline_refuses_a_guide_target_of_another_batch_before_the_unet(unet, classifier):
    W, _ = classifier
    calls = []
    hook = unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        guide = ClassGuide(lambda x: x.flatten(1) @ W.T, torch.tensor([0, 1, 2, 0]), scale=1.0)
        pipe = PPAPGuidedPipeline(unet, DDIMScheduler(), guide)
        with pytest.raises(ValueError, match="target has 4 class labels for a batch of 2"):
            pipe(batch_size=2, num_inference_steps=2, output_type="pt")
        assert not calls
        out = pipe(batch_size=2, num_inference_steps=2, output_type="pt", class_labels=[1, 2]).images
        assert out.shape == (2, C, H, H) and calls  # labels per call replace the guide's target
    finally:
        hook.remove()


def test_pipeline_warns_when_images_are_not_finite(unet):
    class HalfOverflow(torch.nn.Module):  # sample 1's output overflows, as a half-precision UNet's can
        def forward(self, x, t):
            out = unet(x, t).sample.clone()
            out[1] = float("inf")
            return out

    pipe = PPAPGuidedPipeline(HalfOverflow(), DDIMScheduler(), image_shape=(C, H, H))
    with pytest.warns(RuntimeWarning, match="1 of 3 images hold NaN/Inf: the denoiser.s output went non-finite "
                      r"first, at step 1 of 2 \(t=\d+\)") as rec:
        pipe(batch_size=3, num_inference_steps=2, output_type="np")
    assert rec[0].filename == __file__  # the caller's line, not torch.no_grad's wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PPAPGuidedPipeline(unet, DDIMScheduler())(batch_size=3, num_inference_steps=2, output_type="np")


def test_pipeline_warning_names_the_guidance_and_its_step(unet):
    def late_overflow(x, t):  # finite at the first step (t ~ 500), Inf at the second (t ~ 0)
        return torch.where(t[:, None, None, None] < 250, torch.full_like(x, float("inf")), torch.zeros_like(x))

    pipe = PPAPGuidedPipeline(unet, DDIMScheduler(), PPAPGuidance(late_overflow, fast=False))
    with pytest.warns(RuntimeWarning, match=r"3 of 3 images hold NaN/Inf: the guided output \(the guidance\) went "
                                            r"non-finite first, at step 2 of 2 \(t=0\)"):
        pipe(batch_size=3, num_inference_steps=2, output_type="pt")


def test_pipeline_keeps_the_scale_of_a_ppap_guidance(unet, classifier):
    # PPAPGuidance(guide, scale=s) given to the pipeline: its scale was replaced by guidance_scale (0 still guided)
    W, y = classifier

    def run(guide, **kw):
        return PPAPGuidedPipeline(unet, DDIMScheduler(), guide)(
            batch_size=B, num_inference_steps=3, generator=torch.Generator().manual_seed(3), output_type="raw",
            **kw).images

    g = linear_classifier_guide(W, y, 1.0)
    assert torch.equal(run(PPAPGuidance(g, scale=4.0)), run(PPAPGuidance(g), guidance_scale=4.0))
    assert torch.equal(run(PPAPGuidance(g, scale=2.0), guidance_scale=2.0), run(g, guidance_scale=4.0))
    assert torch.equal(run(PPAPGuidance(g, scale=0.0)), run(None))


def test_x0hat_guide_of_another_schedule_than_the_scheduler_is_refused(classifier):
    # x0-hat silently took another schedule's abar than the one the denoiser was trained on
    from ppap_fast.guidance import X0HatGuide
    from ppap_fast.schedule import Schedule

    W, y = classifier
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * H * H, 3))
    x = torch.randn(B, C, H, H)
    den = lambda x, t: torch.zeros_like(x)  # noqa: E731
    ok = X0HatGuide(clf, den, Schedule.create("linear", 1000), y)
    PPAPGuidance(ok).correct(torch.randn_like(x), x, 500, DDIMScheduler())
    for sched, acp in ((DDIMScheduler(beta_schedule="scaled_linear"), Schedule.create("linear", 1000)),
                       (DDIMScheduler(), Schedule.create("cosine", 1000)), (DDIMScheduler(), Schedule.create("linear", 500))):
        with pytest.raises(ValueError, match="X0HatGuide's alphas_cumprod .* is not the DDIMScheduler's"):
            PPAPGuidance(X0HatGuide(clf, den, acp, y)).correct(torch.randn_like(x), x, 400, sched)


def test_any_denoiser_callable(unet):
    pipe = PPAPGuidedPipeline(lambda x, t: unet(x, t).sample, DDIMScheduler(num_train_timesteps=1000),
                              image_shape=(C, H, H))
    a = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = PPAPGuidedPipeline(unet, DDIMScheduler(num_train_timesteps=1000))(
        batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_unet2dmodel_in_our_samplers_as_it_is(unet, classifier):
    """A diffusers UNet2DModel (UNet2DOutput, or a tuple with return_dict=False) goes into sample_loop,
    FastGuidedSampler and the single steps' precomputed model_output as it is: the same samples as a
    plain-tensor wrapper of it."""
    from ppap_fast.fast_sampling import FastGuidedSampler
    from ppap_fast.sampling import ddim_step, sample_loop
    from ppap_fast.schedule import Schedule

    sched = Schedule.create("linear", 1000, "ddim5")
    guide = linear_classifier_guide(*classifier, 2.0)
    plain = lambda x, t: unet(x, t).sample  # noqa: E731
    as_tuple = lambda x, t: unet(x, t, return_dict=False)  # noqa: E731
    run = lambda m, fast: (FastGuidedSampler(m, sched, guide=guide).sample if fast else  # noqa: E731
                           (lambda shape, generator: sample_loop(m, shape, sched, guide=guide, generator=generator)))(
        (B, C, H, H), generator=torch.Generator().manual_seed(3))
    for fast in (False, True):
        want = run(plain, fast)
        assert torch.isfinite(want).all()
        torch.testing.assert_close(run(unet, fast), want, rtol=0, atol=0)
        torch.testing.assert_close(run(as_tuple, fast), want, rtol=0, atol=0)
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(4))
    t = sched.timestep_map[torch.full((B,), 2)]
    with torch.no_grad():
        a = ddim_step(None, x, 2, sched, model_output=unet(x, t), guide=guide).sample
        b = ddim_step(plain, x, 2, sched, guide=guide).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="model_output must be a tensor"):
        sample_loop(lambda x, t: {"eps": x}, (B, C, H, H), sched)


def test_pipeline_takes_a_configured_guidance(unet, classifier):
    """A PPAPGuidance given as the pipeline's guide is used as it is (its options kept), not wrapped as
    if it were a guide(x_t, t)."""
    guide = linear_classifier_guide(*classifier, 3.0)
    run = lambda g: PPAPGuidedPipeline(unet, DDIMScheduler(num_train_timesteps=1000), g)(  # noqa: E731
        batch_size=B, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="raw").images
    configured = PPAPGuidance(guide, fast=False)
    pipe = PPAPGuidedPipeline(unet, DDIMScheduler(num_train_timesteps=1000), configured)
    assert pipe.guidance is configured
    want = run(guide)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(run(configured), want, rtol=1e-6, atol=1e-6)
    unguided = run(None)
    assert torch.isfinite(unguided).all() and not torch.allclose(unguided, want)


def test_guided_diffusion_cond_fn_is_the_guidance_one():
    from ppap_fast import guidance
    from ppap_fast.integrations import guided_diffusion

    assert guided_diffusion.as_cond_fn is guidance.as_cond_fn
    import ppap_fast.integrations as integ

    assert integ.as_cond_fn is guidance.as_cond_fn and integ.PPAPGuidance is PPAPGuidance


def test_cond_fn_names_rescale_timesteps_for_float_timesteps(classifier):
    """guided-diffusion with rescale_timesteps=True hands cond_fn t * 1000 / T as floats: refused naming the fix."""
    from ppap_fast.integrations.guided_diffusion import as_cond_fn

    cond_fn = as_cond_fn(_bank_guide())
    x = torch.randn(B, C, H, H)
    t = torch.tensor([999, 500, 10, 0])
    assert cond_fn(x, t).shape == x.shape
    with pytest.raises(ValueError, match="rescale_timesteps=False"):
        cond_fn(x, t.float() * 0.25, y=torch.tensor([0, 1, 2, 0]))
    # a guide of the user's own that takes any t is left alone
    assert as_cond_fn(lambda x, t: x * 0 + t.view(-1, 1, 1, 1))(x, t.float() * 0.25)[1, 0, 0, 0] == 125.0
    with pytest.raises(TypeError, match=r"got a PPAPGuidance .* as_cond_fn\(guidance.guide\)"):
        as_cond_fn(PPAPGuidance(_bank_guide()))  # failed at the first call: correct() missing 't' and 'scheduler'


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
    with pytest.raises(ValueError, match=r"fast options \['guide_autocast'\] .* fast=False does not run"):
        PPAPGuidance(guide, fast=False, guide_autocast=torch.bfloat16)  # was ignored silently


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
        peak = want.abs().max().item()  # ~5e-3: the absolute 2e-2 it had passed a zero gradient
        assert peak > 0
        for fast in (True, False):
            g = PPAPGuidance(guide, fast=fast).grad(x, 500)
            assert g.dtype == dt
            torch.testing.assert_close(g.float(), want.to(dt).float(), rtol=2e-2, atol=2e-2 * peak)


def test_scheduler_with_other_timesteps_than_the_bank_is_refused():
    guide = _bank_guide()
    x = torch.randn(B, C, H, H)
    for T in (500, 2000):
        with pytest.raises(ValueError, match="num_train_timesteps"):
            PPAPGuidance(guide).correct(torch.randn_like(x), x, 100, DDIMScheduler(num_train_timesteps=T))
    PPAPGuidance(guide).correct(torch.randn_like(x), x, 100, DDIMScheduler(num_train_timesteps=1000))


def _ddim_reference(unet, sched, xT, steps, grad_fn, limit_x0=None):
    """Hand-written guided DDIM (eta=0): eps_hat = eps - sqrt(1 - abar_t) * grad log p(y | x_t), with x0
    limited (clip / threshold) BEFORE the guidance is added, as guided-diffusion's ddim_sample."""
    acp = sched.alphas_cumprod
    ts = [1000 // steps * i for i in range(steps)][::-1]  # "leading" spacing, steps_offset 0
    x = xT.clone()
    with torch.no_grad():
        for i, t in enumerate(ts):
            a_t = acp[t]
            a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            eps = unet(x, t).sample
            if limit_x0 is not None:
                x0 = limit_x0((x - (1 - a_t).sqrt() * eps) / a_t.sqrt())
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            eps = eps - (1 - a_t).sqrt() * grad_fn(x, t)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def _dpmpp_2m_reference(unet, sched, xT, grad_fn):
    """Hand-written guided DPM-Solver++(2M) on the scheduler's own sigmas (first order at the first and last
    step, as diffusers' lower_order_final for < 15 steps)."""
    vp_alpha = 1 / (1 + sched.sigmas ** 2).sqrt()
    vp_sigma = sched.sigmas * vp_alpha
    lam = vp_alpha.log() - vp_sigma.log()
    x, prev_x0, n = xT.clone(), None, len(sched.timesteps)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = unet(x, t).sample - vp_sigma[i] * grad_fn(x, t)
            x0 = (x - vp_sigma[i] * eps) / vp_alpha[i]
            if vp_sigma[i + 1] == 0:
                return x0
            h = lam[i + 1] - lam[i]
            d = x0 if prev_x0 is None or i == n - 1 else x0 + 0.5 * (x0 - prev_x0) * h / (lam[i] - lam[i - 1])
            x = vp_sigma[i + 1] / vp_sigma[i] * x - vp_alpha[i + 1] * torch.expm1(-h) * d
            prev_x0 = x0
    return x


def test_guided_ddim_and_dpmsolver_equal_hand_written_references(unet, classifier):
    W, y = classifier
    guide = linear_classifier_guide(W, y, 0.5)
    grad_fn = lambda x, t: guide(x, torch.full((B,), int(t)))  # noqa: E731
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(11))
    steps = 8
    uniform = lambda x, t: torch.full_like(x, 0.5)  # noqa: E731  (guidance as large at low noise as at high)
    for kw in ({}, {"timestep_spacing": "trailing"}, {"use_karras_sigmas": True}, {"use_lu_lambdas": True}):
        for g, g_fn in ((guide, grad_fn), (uniform, uniform)):
            sched = DPMSolverMultistepScheduler(**kw)
            pipe = PPAPGuidedPipeline(unet, sched, g)
            pipe.set_progress_bar_config(disable=True)
            got = pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw").images
            ref = _dpmpp_2m_reference(unet, sched, xT, g_fn)
            unguided = pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw",
                            guidance_scale=0.0).images
            assert (got - unguided).norm() > 0.05 * ref.norm()  # the guidance matters here
            # karras / lu-lambda sigmas lie off the training grid: the correction uses the step's own sigma, as
            # the reference (abar of the rounded timestep was up to 1% off at the low-noise steps)
            assert ((got - ref).norm() / ref.norm()).item() < 1e-6, kw  # lu-lambdas were 3e-6 off
    sched = DDIMScheduler(clip_sample=False)
    pipe = PPAPGuidedPipeline(unet, sched, guide)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw").images
    ref = _ddim_reference(unet, sched, xT, steps, grad_fn)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5


def test_dynamic_thresholding_is_applied_before_the_guidance(unet, classifier):
    """thresholding=True: the scheduler thresholds x0 in its step, after the guidance was added (saturated
    pixels lose it): the pipeline thresholds first and steps an unthresholded copy, as with clip_sample."""
    W, y = classifier
    guide = linear_classifier_guide(W, y, 2.0)
    grad_fn = lambda x, t: guide(x, torch.full((B,), int(t)))  # noqa: E731
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(12))
    steps, ratio, max_value = 6, 0.9, 2.0
    saturated = []

    def threshold(x0):  # Imagen's dynamic thresholding, written out
        s = torch.quantile(x0.abs().flatten(1), ratio, dim=1).clamp(1, max_value).view(-1, 1, 1, 1)
        saturated.append(bool((x0.abs() > s).any()))
        return x0.clamp(-s, s) / s

    ref = _ddim_reference(unet, DDIMScheduler(), xT, steps, grad_fn, limit_x0=threshold)
    assert any(saturated)
    sched = DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    pipe = PPAPGuidedPipeline(unet, sched, guide)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw").images
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    assert sched.config.thresholding  # the user's scheduler is left as it was


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_clip_sample_carried_over_from_another_schedulers_config_is_not_applied(unet, classifier, cls):
    """diffusers' scheduler swap, cls.from_config(ddpm_pipe.scheduler.config), keeps an explicit clip_sample=True in
    the new config though DPM-Solver / Euler never clip: the guided pipeline clipped x0 first there (up to 900 off)."""
    W, y = classifier
    src = DDPMScheduler.from_config({"clip_sample": True})
    swapped, own = cls.from_config(src.config), cls.from_config({**src.config, "clip_sample": False})
    assert swapped.config.clip_sample and not own.config.clip_sample  # the carried key, not the class's setting
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(1))
    outs = []
    for sched in (swapped, own):
        pipe = PPAPGuidedPipeline(unet, sched, linear_classifier_guide(W, y, 3.0))
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(batch_size=B, num_inference_steps=5, latents=xT, output_type="raw").images)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["TCDScheduler", "CogVideoXDDIMScheduler"])
def test_clip_sample_a_scheduler_takes_but_never_applies_is_not_applied(unet, classifier, name):
    """TCD and CogVideoX-DDIM take clip_sample (CogVideoX's default True) but their step never clips: the guided
    pipeline clipped x0 first there, silently."""
    cls = getattr(diffusers, name)
    W, y = classifier
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(4))
    outs = []
    for clip in (True, False):
        pipe = PPAPGuidedPipeline(unet, cls(clip_sample=clip), linear_classifier_guide(W, y, 3.0))
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(batch_size=B, num_inference_steps=4, latents=xT, generator=torch.Generator().manual_seed(5),
                         output_type="raw").images)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])


def test_settings_carried_over_from_another_schedulers_config_are_not_read(unet, classifier):
    """Keys a scheduler's class does not take, kept in its config by from_config: DPM-Solver made from an Euler config
    with timestep_type='continuous' was refused as continuous; DDIM made from a learned_range DDPM config let a 2C
    output through to a broadcast error inside its step."""
    W, y = classifier
    guide = linear_classifier_guide(W, y, 3.0)
    carried = DPMSolverMultistepScheduler.from_config(EulerDiscreteScheduler(timestep_type="continuous").config)
    plain = DPMSolverMultistepScheduler.from_config({**carried.config, "timestep_type": "discrete"})
    assert carried.config.timestep_type == "continuous"
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(2))
    outs = []
    for sched in (carried, plain):
        pipe = PPAPGuidedPipeline(unet, sched, guide)
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(batch_size=B, num_inference_steps=4, latents=xT, output_type="raw").images)
    assert torch.isfinite(outs[1]).all() and torch.equal(outs[0], outs[1])
    torch.manual_seed(3)
    unet2c = UNet2DModel(sample_size=H, in_channels=C, out_channels=2 * C, layers_per_block=1, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    ddim = DDIMScheduler.from_config(DDPMScheduler(variance_type="learned_range").config)
    assert ddim.config.variance_type == "learned_range"
    pipe = PPAPGuidedPipeline(unet2c, ddim, guide)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"returns 6 channels .* but DDIMScheduler \(variance_type=None\)"):
        pipe(batch_size=B, num_inference_steps=2, output_type="raw")


def test_clip_sample_with_repeated_timesteps_reads_the_stepping_schedulers_sigma(unet, classifier):
    """Heun (clip_sample=True) repeats each timestep for its second-order pass: the pipeline steps an
    unclipped copy, and every step's input scaling, clip and correction must use that copy's sigma
    (the user's scheduler never steps: its step index stayed at the first step). Reference written out
    in sigma space: x0 = x - sigma eps clipped, eps' = (x - x0) / sigma, minus sigma_vp * grad(x_vp)."""
    W, y = classifier
    guide = linear_classifier_guide(W, y, 2.0)
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(22))
    steps = 3
    ref = HeunDiscreteScheduler(clip_sample=False)
    ref.set_timesteps(steps)
    assert len(set(ref.timesteps.tolist())) < len(ref.timesteps)  # repeated timesteps
    x, clipped = xT * ref.init_noise_sigma, []
    with torch.no_grad():
        for t in ref.timesteps:
            if ref.step_index is None:
                ref._init_step_index(t)
            sigma = ref.sigmas[ref.step_index]
            c_in = 1 / (sigma ** 2 + 1) ** 0.5
            eps = unet(x * c_in, t).sample
            x0 = x - sigma * eps
            clipped.append(bool((x0.abs() > 1).any()))
            eps = (x - x0.clamp(-1, 1)) / sigma
            eps = eps - sigma * c_in * guide(x * c_in, torch.full((B,), int(t)))
            x = ref.step(eps, t, x).prev_sample
    assert any(clipped)
    sched = HeunDiscreteScheduler(clip_sample=True)
    pipe = PPAPGuidedPipeline(unet, sched, guide)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw").images
    # 2e-5 (measured 2.8e-6): sqrt(1 - abar) from the stepping scheduler's sigma in float64; from
    # scale_model_input's float32 c_in it was 7e-5 off at sigma 0.03 (1.5e-3 after Heun's last
    # derivative average); the user's scheduler's sigma gave 12x that
    assert torch.isfinite(got).all() and ((got - x).norm() / x.norm()).item() < 2e-5
    assert sched.config.clip_sample and not pipe.guidance._tables.keys() - {
        k for k in pipe.guidance._tables if k[0] == id(sched)}  # the copy's table is not kept


def test_scale_and_prediction_type_checked_on_every_path(unet, classifier):
    W, y = classifier
    guided = PPAPGuidance(linear_classifier_guide(W, y, 1.0))
    x = torch.randn(B, C, H, H)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            guided.correct(x, x, 10, DDIMScheduler(), scale=bad)
        with pytest.raises(ValueError, match="scale must be a finite number"):
            guided.grad(x, 10, scale=bad)
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            PPAPGuidedPipeline(unet, DDIMScheduler(), linear_classifier_guide(W, y, 1.0))(
                batch_size=1, num_inference_steps=2, guidance_scale=bad)
    bad_sched = DDPMScheduler()
    bad_sched.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        guided.clip_first(x, x, 10, bad_sched)
    with pytest.raises(ValueError, match="does not match"):
        guided.clip_first(x[:, :2], x, 10, DDIMScheduler())


def test_pipeline_scales_the_initial_noise_after_set_timesteps(unet):
    """A sigma-space scheduler's init_noise_sigma is its first sigma, known only after set_timesteps
    ("leading" spacing starts below the training grid's last sigma): the pipeline equals diffusers' own loop."""
    sched = EulerDiscreteScheduler(timestep_spacing="leading")
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(13))
    pipe = PPAPGuidedPipeline(unet, sched)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(batch_size=B, num_inference_steps=4, latents=xT, output_type="raw").images
    ref_sched = EulerDiscreteScheduler(timestep_spacing="leading")
    ref_sched.set_timesteps(4)
    x = xT * ref_sched.init_noise_sigma
    with torch.no_grad():
        for t in ref_sched.timesteps:
            x = ref_sched.step(unet(ref_sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert torch.isfinite(got).all() and (got - x).abs().max() < 1e-5


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_sigma_space_schedulers_guide_the_variance_preserving_sample(unet, classifier, pt):
    """Euler samples x = x_t * sqrt(1 + sigma^2): the guide gets x_t (and the rounded timestep) and the correction
    uses abar = 1 / (1 + sigma^2). Deterministic Euler on the same grid is DDIM, so guided Euler equals guided
    DDIM (no clipping), in all three parameterisations (the tiny UNet's output read as eps, v or x0 by both);
    the user's loop equals the pipeline."""
    W, y = classifier
    guide = linear_classifier_guide(W, y, 1.0)
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(14))
    steps = 5

    def run(sched, scale=1.0):
        pipe = PPAPGuidedPipeline(unet, sched, guide)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=steps, latents=xT, output_type="raw",
                    guidance_scale=scale).images

    ddim = run(DDIMScheduler(clip_sample=False, prediction_type=pt))
    euler = run(EulerDiscreteScheduler(timestep_spacing="leading", prediction_type=pt))
    assert (ddim - run(DDIMScheduler(clip_sample=False, prediction_type=pt), 0.0)).norm() > 0.1 * ddim.norm()
    assert ((euler - ddim).norm() / ddim.norm()).item() < 1e-5
    # the README loop, with Euler's scale_model_input
    sched, guided = EulerDiscreteScheduler(timestep_spacing="leading", prediction_type=pt), PPAPGuidance(guide)
    sched.set_timesteps(steps)
    x = xT * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            out = guided.correct(unet(sched.scale_model_input(x, t), t).sample, x, t, sched)
            x = sched.step(out, t, x).prev_sample
    assert ((x - euler).norm() / euler.norm()).item() < 1e-5


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", SDE])
def test_other_sigma_space_schedulers_move_to_the_target(unet, classifier, name):
    W, y = classifier
    sched = getattr(diffusers, name)()

    _assert_pipeline_guidance_gains(unet, sched, W, y, steps=5, seed=15)


def test_class_labels_per_call_replace_the_guides_target(unet, classifier):
    """class_labels (one per sample, or one int) guide toward those classes, as a guide built with them would."""
    from ppap_fast.guidance import ClassGuide

    guide = _bank_guide()
    bank = guide.model
    labels = torch.tensor([2, 1, 0, 2])
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(16))

    def run(g, **kw):
        pipe = PPAPGuidedPipeline(unet, DDIMScheduler(clip_sample=False), g)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=3, latents=xT, output_type="raw", **kw).images

    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    want = run(ClassGuide(bank, labels, scale=3.0))
    assert rel(run(guide), want) > 1e-3  # the guide's own target [0, 1, 2, 0] gives another sample
    assert rel(run(guide, class_labels=labels), want) < 1e-5
    assert rel(run(guide, class_labels=1), run(ClassGuide(bank, torch.ones(B, dtype=torch.long), scale=3.0))) < 1e-5
    x = torch.randn(B, C, H, H)
    torch.testing.assert_close(PPAPGuidance(guide, fast=False).grad(x, 500, target=labels),
                               ClassGuide(bank, labels, scale=3.0)(x, torch.full((B,), 500)))
    with pytest.raises(ValueError, match="3 class labels for a batch of 4"):
        run(guide, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="no class target"):
        PPAPGuidance(lambda x, t: torch.zeros_like(x)).grad(x, 500, target=labels)
    with pytest.raises(ValueError, match="without a guide"):
        run(None, class_labels=labels)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                                  SDE])
def test_sigma_space_correction_coefficient_comes_from_the_input_scalings_sigma(name):
    """At every step, second-order passes included (KDPM2's interpolated sigmas), correct() subtracts
    sqrt(1 - abar) * grad with sqrt(1 - abar) = sigma / sqrt(1 + sigma^2) of the sigma scale_model_input
    used, to float32 rounding; from its float32 c_in, sqrt(1 - c_in^2) was 1e-4 off (relative) at sigma 0.03."""
    sched = getattr(diffusers, name)()
    sched.set_timesteps(6)
    candidates = torch.cat([sched.sigmas] + [getattr(sched, "sigmas_interpol", sched.sigmas)]).double()
    candidates = candidates[candidates.isfinite()]  # KDPM2's first interpolated sigma is NaN (never used)
    grad = torch.ones(1, 1, 2, 2)
    guided = PPAPGuidance(lambda x, t: grad)
    x, worst = torch.zeros(1, 1, 2, 2), []
    for t in sched.timesteps:
        c_in = float(sched.scale_model_input(torch.ones(()), t))
        mid = getattr(sched, "mid_point_sigma", None)  # DPM-Solver SDE's second pass reads it
        pool = candidates if mid is None else torch.cat([candidates, torch.as_tensor(mid).double().reshape(1)])
        sigma = pool[((1 / c_in ** 2 - 1) ** 0.5 - pool).abs().argmin()]  # the one c_in rounds
        want = float(sigma / (1 + sigma ** 2) ** 0.5)
        got = -guided.correct(torch.zeros_like(x), x, t, sched)  # eps' = 0 - sqrt(1 - abar) * grad
        assert torch.isfinite(got).all()
        worst.append(((got - want).abs().max() / want).item())
        kw = {"generator": torch.Generator().manual_seed(0)} if "Ancestral" in name else {}
        x = sched.step(torch.zeros_like(x), t, x, **kw).prev_sample
    assert max(worst) < 2e-7, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"])
def test_kdpm2_second_pass_on_cuda_corrects_as_on_the_cpu(name):
    """set_timesteps(device="cuda"): diffusers moves KDPM2's sigmas to the CPU but keeps sigmas_interpol on CUDA,
    so the second pass's input scaling c_in is a CUDA tensor; torch.equal against the CPU candidates raised."""
    grad = torch.ones(1, 1, 2, 2)
    outs = {}
    for dev in ("cpu", "cuda"):
        sched = getattr(diffusers, name)()
        sched.set_timesteps(4, device=dev)
        x, got = torch.zeros(1, 1, 2, 2, device=dev), []
        for t in sched.timesteps:
            got.append(PPAPGuidance(lambda x, t: grad.to(x.device)).correct(torch.zeros_like(x), x, t, sched).cpu())
            kw = {"generator": torch.Generator(dev).manual_seed(0)} if "Ancestral" in name else {}
            x = sched.step(torch.zeros_like(x), t, x, **kw).prev_sample
        outs[dev] = torch.stack(got)
    assert torch.isfinite(outs["cuda"]).all()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-6, atol=0)


def test_sigma_space_correction_keeps_diffusers_scale_model_input_check(classifier):
    """correct() reads the step's sigma through scale_model_input; a loop that never scaled the UNet's input
    must still get diffusers' warning from step()."""
    W, y = classifier
    sched = EulerDiscreteScheduler()
    sched.set_timesteps(3)
    x = torch.randn(B, C, H, H) * sched.init_noise_sigma
    PPAPGuidance(linear_classifier_guide(W, y, 1.0)).correct(torch.randn_like(x), x, sched.timesteps[0], sched)
    assert sched.is_scale_input_called is False


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_zero_terminal_snr_step_is_not_guided(unet, classifier, cls):
    """rescale_betas_zero_snr=True makes abar_999 = 0 (DDIM / DDPM keep the exact 0): x_t is pure noise there,
    p(y | x_t) = p(y), so that step gets no guidance; the v / x0 coefficients (1/sqrt(abar)) made it NaN."""
    W, y = classifier
    guide = linear_classifier_guide(W, y, 1.0)
    sched = cls(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    assert sched.alphas_cumprod[-1] == 0
    x, v = torch.randn(B, C, H, H), torch.randn(B, C, H, H)
    for pt in ("v_prediction", "sample", "epsilon"):
        sched.register_to_config(prediction_type=pt)
        assert torch.equal(PPAPGuidance(guide).correct(v, x, 999, sched), v)
    sched.register_to_config(prediction_type="v_prediction")

    _assert_pipeline_guidance_gains(unet, sched, W, y, steps=4, seed=17)


@pytest.mark.parametrize("limit", [dict(clip_sample=True), dict(thresholding=True, sample_max_value=2.0)])
def test_clip_first_leaves_singular_steps_unchanged(classifier, limit):
    """clip_first converts through x0 = (x - sqrt(1-abar) eps) / sqrt(abar) and back: at abar = 0 (zero
    terminal SNR) with epsilon, or abar = 1 with epsilon / v, that divides by 0 (NaN). There the output is
    returned as it is (like correct's unguided step); the other samples of the batch are limited as before."""
    W, y = classifier
    guided = PPAPGuidance(linear_classifier_guide(W, y, 1.0))
    sched = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing", **limit)
    sched.alphas_cumprod[0] = 1.0  # abar = 1 at t = 0 (a table ending at zero noise)
    assert sched.alphas_cumprod[-1] == 0
    gen = torch.Generator().manual_seed(21)
    x, out = torch.randn(B, C, H, H, generator=gen), 3 * torch.randn(B, C, H, H, generator=gen)
    t = torch.tensor([999, 0, 500, 999])
    for pt, singular in (("epsilon", [0, 1, 3]), ("v_prediction", [1]), ("sample", [])):
        sched.register_to_config(prediction_type=pt)
        got = guided.clip_first(out, x, t, sched)
        assert torch.isfinite(got).all(), pt
        for i in range(B):
            one = guided.clip_first(out[i:i + 1], x[i:i + 1], t[i:i + 1], sched)
            assert torch.equal(got[i:i + 1], one), (pt, i)  # per sample, as alone
            if i in singular:
                assert torch.equal(one, out[i:i + 1]), (pt, i)
            else:
                assert not torch.equal(one, out[i:i + 1]), (pt, i)  # |x0| > 1 here: limited


@pytest.mark.parametrize("name, sigmas", [
    ("DPMSolverMultistepScheduler", "use_karras_sigmas"), ("DPMSolverMultistepScheduler", "use_lu_lambdas"),
    ("DPMSolverMultistepScheduler", "use_exponential_sigmas"), ("DPMSolverSinglestepScheduler", "use_karras_sigmas"),
    ("UniPCMultistepScheduler", "use_karras_sigmas")])
def test_solver_correction_uses_the_steps_own_sigma(classifier, name, sigmas):
    """The solver converts the model output to x0 with alpha_t, sigma_t of sigmas[step_index] (off the training
    grid with these sigmas): the guided output shifts that x0 by exactly sigma_t^2 / alpha_t * grad (the score
    correction) at every step; abar of the rounded timestep was up to 1% off."""
    cls = getattr(diffusers, name)
    W, y = classifier
    guide = linear_classifier_guide(W, y, 1.0)
    sched = cls(**{sigmas: True})
    sched.set_timesteps(6)
    gen = torch.Generator().manual_seed(18)
    x0_data = torch.randn(B, C, H, H, generator=gen, dtype=torch.float64) * 0.5
    guided, x, errs = PPAPGuidance(guide), torch.randn(B, C, H, H, generator=gen, dtype=torch.float64), []
    for t in sched.timesteps:
        if sched.step_index is None:
            sched._init_step_index(t)
        alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sched.sigmas[sched.step_index].double())
        eps = (x - alpha_t * x0_data) / sigma_t  # float64 and an x0 that stays bounded: shifts well resolved
        grad = guide(x.float(), torch.full((B,), int(t))).double()
        shift = sched.convert_model_output(guided.correct(eps, x, t, sched), sample=x) - \
            sched.convert_model_output(eps, sample=x)
        want = sigma_t ** 2 / alpha_t * grad
        errs.append(((shift - want).norm() / want.norm()).item())
        x = sched.step(eps, t, x).prev_sample
    assert errs and all(e < 1e-4 for e in errs), errs  # (max(worst, nan) kept worst: NaN outputs passed)


class _AnalyticDenoiser(torch.nn.Module):
    """A float64 eps model in ``pt``'s parameterisation, converted with the alpha_t, sigma_t the scheduler's step reads
    (sigmas[step_index] for DPM-Solver-like solvers, else alphas_cumprod[t]); with ``guide`` it is the guided model
    itself: eps - sigma_t * guide(x, t)."""

    def __init__(self, sched, pt, guide=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # the pipeline's dtype
        self.sched, self.pt, self.guide = sched, pt, guide

    def forward(self, x, t):
        s = self.sched
        if hasattr(s, "_sigma_to_alpha_sigma_t"):
            idx = s.step_index if s.step_index is not None else int((s.timesteps == t).nonzero()[0])
            a, sig = s._sigma_to_alpha_sigma_t(s.sigmas[idx].double())
        else:
            a, sig = s.alphas_cumprod[int(t)].double().sqrt(), (1 - s.alphas_cumprod[int(t)].double()).sqrt()
        eps = torch.tanh(0.7 * x) + 0.1 * torch.sin(3 * x) + 1e-3 * float(t)
        if self.guide is not None:
            eps = eps - sig * self.guide(x, torch.full((x.shape[0],), int(t)))
        x0 = (x - sig * eps) / a
        return {"epsilon": eps, "v_prediction": a * eps - sig * x0, "sample": x0}[self.pt]


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
def test_multistep_solver_histories_hold_the_guided_output(classifier, pt):
    """Solvers that keep a history of (converted) model outputs: the guided pipeline equals the unguided one on the
    guided model itself (eps - sigma_t * grad in the scheduler's parameterisation), so every history entry is the
    corrected eps / x0, at orders 2 and 3, SDE variants and eps-space UniPC included."""
    W, y = classifier
    W64 = W[:, : C * 4 * 4].double()
    guide = lambda x, t: 2.0 * torch.func.grad(  # noqa: E731
        lambda z: torch.log_softmax(z.flatten(1) @ W64.T, -1)[torch.arange(z.shape[0]), y].sum())(x)
    d = diffusers
    cases = [(d.DPMSolverMultistepScheduler, dict(algorithm_type=a, solver_order=o))
             for a in ("dpmsolver++", "sde-dpmsolver++") for o in (2, 3)]
    cases += [(d.DPMSolverSinglestepScheduler, dict(solver_order=3)), (d.DEISMultistepScheduler, dict(solver_order=3)),
              (d.UniPCMultistepScheduler, dict(solver_order=3)), (d.SASolverScheduler, {}),
              (d.UniPCMultistepScheduler, dict(predict_x0=False, final_sigmas_type="sigma_min")),
              (DDIMScheduler, dict(clip_sample=False, timestep_spacing="trailing")), (DDPMScheduler, dict(clip_sample=False))]
    if pt != "sample":  # PNDM takes eps and v only
        cases += [(d.PNDMScheduler, {}), (d.PNDMScheduler, dict(skip_prk_steps=True))]
    xT = torch.randn(B, C, 4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for cls, kw in cases:
        runs = []
        for pipe_guide, model_guide in ((guide, None), (None, guide), (None, None)):  # guided, reference, unguided
            sched = cls(prediction_type=pt, **kw)
            pipe = PPAPGuidedPipeline(_AnalyticDenoiser(sched, pt, model_guide), sched, pipe_guide, image_shape=(C, 4, 4))
            pipe.set_progress_bar_config(disable=True)
            runs.append(pipe(batch_size=B, num_inference_steps=7, latents=xT, output_type="raw",
                             generator=torch.Generator().manual_seed(9), eta=0.5 if cls is DDIMScheduler else 0.0).images)
        got, want, plain = runs
        assert torch.isfinite(got).all(), (cls.__name__, kw)
        assert ((got - want).norm() / (want - plain).norm()).item() < 1e-5, (cls.__name__, kw)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_near_zero_snr_step_is_not_guided(unet, classifier, cls):
    """rescale_betas_zero_snr in DPM-Solver / Euler keeps abar_999 = 2**-24, not 0: the v / x0 correction there
    was 4096 x grad (guided samples ~30x the unguided range). Below MIN_GUIDED_ABAR a step is unguided, in every
    parameterisation; the linear schedule's last step (abar 4e-5) stays guided, the cosine one's (2.4e-9) not."""
    from ppap_fast.integrations.diffusers import MIN_GUIDED_ABAR

    W, y = classifier
    guide = linear_classifier_guide(W, y, 1.0)
    sched = cls(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    assert 0 < sched.alphas_cumprod[-1] < MIN_GUIDED_ABAR
    sched.set_timesteps(4)
    t0 = sched.timesteps[0]
    assert int(t0) == 999
    x, v = torch.randn(B, C, H, H), torch.randn(B, C, H, H)
    x = x * sched.init_noise_sigma
    for pt in ("v_prediction", "sample", "epsilon"):
        sched.register_to_config(prediction_type=pt)
        assert torch.equal(PPAPGuidance(guide).correct(v, x, t0, sched), v), pt
    sched.register_to_config(prediction_type="v_prediction")

    def run(g):
        pipe = PPAPGuidedPipeline(unet, sched, g)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=4, generator=torch.Generator().manual_seed(17),
                    output_type="latent").images

    plain, guided = run(None), run(linear_classifier_guide(W, y, 1.0))
    assert torch.isfinite(guided).all() and guided.abs().max() < 2 * plain.abs().max()
    assert _logp(W, y, guided).mean() > _logp(W, y, plain).mean()
    xs = torch.randn(B, C, H, H)
    linear, cosine = DDIMScheduler(), DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    assert not torch.equal(PPAPGuidance(guide).correct(v, xs, 999, linear), v)
    assert torch.equal(PPAPGuidance(guide).correct(v, xs, 999, cosine), v)
    assert not torch.equal(PPAPGuidance(guide).correct(v, xs, 998, cosine), v)


def _class_unet():
    torch.manual_seed(3)
    return UNet2DModel(sample_size=H, in_channels=C, out_channels=C, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=3).eval()


def test_class_conditional_unet_gets_the_class_labels(classifier):
    """A class-conditional UNet2DModel (num_class_embeds) is called with the pipeline's class_labels (with or
    without a guide); without labels the pipeline says to pass them."""
    W, y = classifier
    net, labels = _class_unet(), torch.tensor([2, 0, 1, 2])
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(19))
    guide = linear_classifier_guide(W, y, 2.0)

    def run(g, **kw):
        pipe = PPAPGuidedPipeline(net, DDIMScheduler(clip_sample=False), g)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=3, latents=xT, output_type="latent", **kw).images

    grad_fn = lambda x, t: guide(x, torch.full((B,), int(t)))  # noqa: E731
    conditioned = lambda x, t: net(x, t, class_labels=labels)  # noqa: E731
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    sched = DDIMScheduler(clip_sample=False)
    assert rel(run(guide, class_labels=labels), _ddim_reference(conditioned, sched, xT, 3, grad_fn)) < 1e-5
    assert rel(run(None, class_labels=labels), _ddim_reference(conditioned, sched, xT, 3, lambda x, t: 0 * x)) < 1e-5
    one = run(None, class_labels=1)
    assert rel(one, run(None, class_labels=torch.ones(B, dtype=torch.long))) < 1e-7
    assert rel(one, run(None, class_labels=labels)) > 1e-3  # the labels matter
    with pytest.raises(ValueError, match="class-conditional.*pass class_labels"):
        run(guide)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        run(None, class_labels=[0, 1, 3, 0])
    with pytest.raises(ValueError, match="3 class labels for a batch of 4"):
        run(None, class_labels=[0, 1, 2])


def test_timestep_outside_the_schedule_is_a_clear_error(classifier):
    W, y = classifier
    guided = PPAPGuidance(linear_classifier_guide(W, y, 1.0))
    x = torch.randn(B, C, H, H)
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(3)
    for sched in (DDPMScheduler(), DDIMScheduler(), DPMSolverMultistepScheduler(), euler):
        for bad in (1000, torch.tensor(1000), torch.tensor([5, 6, 1000, 7]), -1, torch.tensor([-1, 0, 1, 2])):
            with pytest.raises(ValueError, match=r"outside the scheduler's range 0\.\.999"):
                guided.correct(x, x, bad, sched)
            with pytest.raises(ValueError, match=r"outside the scheduler's range 0\.\.999"):
                guided.clip_first(x, x, bad, sched)
    assert guided.correct(x, x, 999, DDPMScheduler()).shape == x.shape


def test_timesteps_of_the_schedulers_table_are_range_checked_once(classifier):
    """t = scheduler.timesteps[i] had its min / max read at every step (a sync a step for set_timesteps(device=
    'cuda')): the table is checked once per set_timesteps / in-place change, a t of it not again; others still are."""
    from torch.overrides import TorchFunctionMode

    class Reads(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Reads.n += func is torch.Tensor.tolist
            return func(*args, **(kwargs or {}))

    W, y = classifier
    guided = PPAPGuidance(linear_classifier_guide(W, y, 1.0))
    x = torch.randn(B, C, H, H)
    sched = DDIMScheduler()
    sched.set_timesteps(5)
    guided.correct(x, x, sched.timesteps[0], sched)  # the table's one read
    with Reads():
        for t in sched.timesteps:
            guided.correct(x, x, t, sched)
    assert Reads.n == 0
    with pytest.raises(ValueError, match=r"outside the scheduler's range 0\.\.999"):
        guided.correct(x, x, torch.tensor(1000), sched)
    sched.timesteps[1] = 1000  # in place: the table is checked again
    with pytest.raises(ValueError, match=r"outside the scheduler's range 0\.\.999"):
        guided.correct(x, x, sched.timesteps[1], sched)
    sched.set_timesteps(4)
    guided.correct(x, x, sched.timesteps[0], sched)
    with Reads():
        guided.correct(x, x, sched.timesteps[2], sched)
    assert Reads.n == 0


def test_output_types_follow_diffusers(unet):
    pipe = PPAPGuidedPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    run = lambda ot: pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(20),  # noqa
                          output_type=ot).images
    latent = run("latent")
    assert torch.is_tensor(latent) and latent.shape == (2, C, H, H) and torch.equal(run("raw"), latent)
    assert (latent.abs() > 0.5).any()
    torch.testing.assert_close(run("pt"), (latent / 2 + 0.5).clamp(0, 1))
    assert run("np").shape == (2, H, H, C) and len(run("pil")) == 2
    with pytest.raises(ValueError, match="'latent'"):
        run("tensor")


def test_callback_on_step_end_as_diffusers(unet):
    """callback_on_step_end(pipe, i, t, {"latents": x}) after every step (a function or a diffusers
    PipelineCallback); a returned dict replaces the latents; the older callback(i, t, x) still runs."""
    from diffusers.callbacks import PipelineCallback

    pipe = PPAPGuidedPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    run = lambda **kw: pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(21),  # noqa
                            output_type="latent", **kw).images
    plain, seen, old = run(), [], []

    def on_end(p, i, t, kw):
        seen.append((p, i, int(t), sorted(kw), kw["latents"].clone()))
        return {"latents": kw["latents"] * 0 + 0.25} if i == 2 else {}

    got = run(callback_on_step_end=on_end, callback_on_step_end_tensor_inputs=["latents"],
              callback=lambda i, t, x: old.append((i, x.clone())))
    assert [s[:4] for s in seen] == [(pipe, i, int(t), ["latents"]) for i, t in enumerate(pipe.scheduler.timesteps)]
    assert torch.equal(seen[-1][4], plain) and torch.equal(got, torch.full_like(plain, 0.25))
    assert [i for i, _ in old] == [0, 1, 2] and torch.equal(old[-1][1], got)
    # replacing the latents mid-run changes the next steps
    shifted = run(callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] + 1} if i == 0 else kw)
    assert (shifted - plain).abs().max() > 0.1

    class Scale(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": callback_kwargs["latents"] * 2} if step_index == 2 else callback_kwargs

    torch.testing.assert_close(run(callback_on_step_end=Scale()), plain * 2)
    # diffusers' interrupt flag: the steps after the callback that set it are skipped (it was ignored)
    calls, denoise = [], pipe._denoise
    pipe._denoise = lambda *a: calls.append(1) or denoise(*a)
    stop = run(callback_on_step_end=lambda p, i, t, kw: setattr(p, "_interrupt", i == 0) or kw)
    assert len(calls) == 1 and torch.equal(stop, seen[0][4]) and pipe.interrupt
    del pipe._denoise
    assert torch.equal(run(), plain) and not pipe.interrupt  # the next call starts uninterrupted
    with pytest.raises(ValueError, match="prompt_embeds"):
        run(callback_on_step_end=on_end, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_abar_table_cache_follows_reused_ids_and_in_place_changes(monkeypatch):
    """The abar table is cached by (id(scheduler), id(alphas_cumprod), device): ids are reused once an
    object is freed, and a table can change in place. Forced id collisions (every id 0) and an in-place
    change must give the scheduler's own table, never another's."""
    import ppap_fast.integrations.diffusers as D

    monkeypatch.setattr(D, "id", lambda obj: 0, raising=False)
    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    a = DDIMScheduler(num_train_timesteps=1000)
    b = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(g._abar(a, "cpu"), a.alphas_cumprod.float())
    assert torch.equal(g._abar(b, "cpu"), b.alphas_cumprod.float())  # same key as a's
    b.alphas_cumprod.mul_(0.5)
    assert torch.equal(g._abar(b, "cpu"), b.alphas_cumprod.float())


def test_replacing_the_guide_drops_the_caches_of_the_old_one(classifier):
    """guidance.guide = new: the fast path kept running the old guide (its FastGuide was cached per device), and
    the new guide's X0HatGuide / bank were never checked against a scheduler whose table was cached."""
    from ppap_fast.guidance import X0HatGuide
    from ppap_fast.schedule import Schedule

    W, y = classifier
    x, sched = torch.randn(B, C, H, H), DDIMScheduler()
    for fast in (True, False):
        g = PPAPGuidance(lambda x, t: torch.ones_like(x), fast=fast)
        g.correct(torch.zeros_like(x), x, 500, sched)
        g.guide = lambda x, t: torch.full_like(x, 2.0)
        assert torch.equal(g.grad(x, 500), torch.full_like(x, 2.0)), fast
        clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * H * H, 3))
        g.guide = X0HatGuide(clf, lambda x, t: torch.zeros_like(x), Schedule.create("cosine", 1000), y)
        with pytest.raises(ValueError, match="X0HatGuide's alphas_cumprod .* is not the DDIMScheduler's"):
            g.correct(torch.randn_like(x), x, 400, sched)
        with pytest.raises(TypeError, match="guide must be callable"):
            g.guide = None


def test_correct_refuses_a_precomputed_grad_not_shaped_like_x():
    """grad= of another shape was broadcast silently ([C, H, W] or [H] to every sample, [B, 1, H, W] to every
    channel); x's shape, or [1, ...] for every sample, are taken."""
    g, sched = PPAPGuidance(lambda x, t: torch.zeros_like(x)), DDIMScheduler()
    x, out = torch.randn(B, C, H, H), torch.randn(B, 2 * C, H, H)
    for grad in (torch.ones(B, C, H, H), torch.ones(1, C, H, H)):
        assert torch.isfinite(g.correct(out, x, 500, sched, grad=grad)).all()
    for shape in ((C, H, H), (H,), (B, 1, H, H), (B, 2 * C, H, H), (2, C, H, H), ()):
        with pytest.raises(ValueError, match=r"grad must be a precomputed .* shaped like x \(4, 3, 8, 8\)"):
            g.correct(out, x, 500, sched, grad=torch.ones(shape))
    with pytest.raises(ValueError, match="it takes no target="):  # the labels were ignored silently
        g.correct(out, x, 500, sched, grad=torch.ones(B, C, H, H), target=torch.tensor([0, 1, 2, 0]))


def test_pipeline_takes_numpy_int_counts(unet):
    """batch_size / num_inference_steps of numpy ints (np.int64 from a config or an array) were refused."""
    import numpy as np

    pipe = PPAPGuidedPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=np.int64(2), num_inference_steps=np.int32(2), generator=torch.Generator().manual_seed(0),
               output_type="raw").images
    ref = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="raw").images
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)


def test_pipeline_generator_list_needs_one_generator_per_sample(unet):
    """A list of generators is one per sample (as diffusers): a shorter list crashed with IndexError, a longer one
    ran silently on its first batch_size generators; a list as long as the batch gives each sample its own noise."""
    pipe = PPAPGuidedPipeline(unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    gens = lambda n: [torch.Generator().manual_seed(10 + i) for i in range(n)]  # noqa: E731
    for n in (2, 4):
        with pytest.raises(ValueError, match=rf"{n} generators for a batch of 3: give one per sample"):
            pipe(batch_size=3, num_inference_steps=2, generator=gens(n), output_type="raw")
        with pytest.raises(ValueError, match=rf"{n} generators for a batch of 3"):  # the step's noise uses them too
            pipe(batch_size=3, num_inference_steps=2, generator=gens(n), output_type="raw",
                 latents=torch.zeros(3, C, H, H))
    both = pipe(batch_size=2, num_inference_steps=2, generator=gens(2), output_type="raw").images
    second = pipe(batch_size=1, num_inference_steps=2, generator=gens(2)[1:], output_type="raw").images
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[1:], second, rtol=1e-5, atol=1e-5)  # batched UNet convs: not bitwise


def test_pipeline_takes_a_tuple_of_generators_as_a_list(unet):
    """A tuple of per-sample generators failed in diffusers' randn_tensor (AttributeError: no .device)."""
    pipe = PPAPGuidedPipeline(unet, DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(20 + i) for i in range(2)]  # noqa: E731
    got = pipe(batch_size=2, num_inference_steps=2, generator=tuple(gens()), output_type="raw").images
    want = pipe(batch_size=2, num_inference_steps=2, generator=gens(), output_type="raw").images
    assert torch.isfinite(got).all() and torch.equal(got, want)


def test_pipeline_warns_of_an_eta_its_scheduler_ignores(unet):
    """eta > 0 with a scheduler whose step takes none (DDPM, Euler, DPM-Solver) was dropped without a word."""
    def run(sched, eta):
        pipe = PPAPGuidedPipeline(unet, sched)
        pipe.set_progress_bar_config(disable=True)
        return pipe(num_inference_steps=2, eta=eta, generator=torch.Generator().manual_seed(0), output_type="raw").images

    with pytest.warns(UserWarning, match=r"eta=0.5 is ignored: DDPMScheduler.step takes no eta") as rec:
        run(DDPMScheduler(), 0.5)
    assert rec[0].filename == __file__  # the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(DDPMScheduler(), 0.0)
        run(DDIMScheduler(), 0.5)
        import numpy as np

        for zero in (torch.tensor(0.0), np.float32(0.0), np.array(0.0), torch.tensor([0])):  # it warned for these
            run(DDPMScheduler(), zero)
    with pytest.warns(UserWarning, match=r"is ignored: DDPMScheduler.step takes no eta"):
        run(DDPMScheduler(), torch.tensor(0.5))


def test_continuous_timesteps_are_refused(unet):
    """Euler's timestep_type='continuous' passes 0.25 * log(sigma) as t: rounded, the guide got t = 1 and 0 at
    the noisiest steps (the wrong experts, silently) and a range error only at the last step."""
    sched = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    sched.set_timesteps(10)
    x = torch.randn(B, C, H, H)
    with pytest.raises(ValueError, match="timestep_type='continuous' passes 0.25 \\* log\\(sigma\\)"):
        PPAPGuidance(lambda x, t: torch.zeros_like(x)).correct(x, x, sched.timesteps[0], sched)
    with pytest.raises(ValueError, match="timestep_type='continuous'"):  # before sampling
        PPAPGuidedPipeline(unet, sched, lambda x, t: torch.zeros_like(x))(num_inference_steps=2)


def test_guidance_scale_without_a_guide_is_refused(unet):
    """guidance_scale=5 on a pipeline built without guide= sampled unguided images without a word."""
    pipe = PPAPGuidedPipeline(unet, DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="guidance_scale=5.0 given to a pipeline without a guide: pass guide="):
        pipe(num_inference_steps=2, guidance_scale=5.0)
    for scale in (0.0, 1.0):  # the default, and "no guidance"
        assert pipe(num_inference_steps=2, guidance_scale=scale, output_type="raw").images.shape == (1, C, H, H)


def test_class_labels_reach_a_guide_given_as_a_fast_guide():
    """PPAPGuidance(FastGuide(class_guide)) (or a ComposedGuide of one) ran the FastGuide as a plain callable
    on the fast path and dropped target=: the guide's own target was used silently."""
    from ppap_fast.fast_sampling import FastGuide
    from ppap_fast.guidance import ComposedGuide

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * H * H, 4))
    g = ClassGuide(clf, target=torch.zeros(B, dtype=torch.long))
    x, y = torch.randn(B, C, H, H), torch.tensor([2, 3, 1, 2])
    want = g(x, torch.full((B,), 5), target=y)
    own = g(x, torch.full((B,), 5))  # want is forced finite by the assert_close below
    assert torch.isfinite(own).all() and not torch.allclose(want, own)
    for guide in (FastGuide(g), ComposedGuide([FastGuide(g)])):
        for fast in (True, False):
            torch.testing.assert_close(PPAPGuidance(guide, fast=fast).grad(x, 5, target=y), want)


def test_guide_given_as_a_fast_guide_is_checked_against_the_scheduler(classifier):
    """A T=1000 bank with a T=500 scheduler (every step routed to experts 0-2 of 5) and an X0HatGuide of another
    schedule were refused, but not when the guide came wrapped in a FastGuide."""
    from ppap_fast.fast_sampling import FastGuide
    from ppap_fast.guidance import ComposedGuide, X0HatGuide
    from ppap_fast.schedule import Schedule

    W, y = classifier
    x, bank_guide = torch.randn(B, C, H, H), _bank_guide()
    for g in (bank_guide, FastGuide(bank_guide), ComposedGuide([FastGuide(bank_guide)])):
        with pytest.raises(ValueError, match="num_train_timesteps=500 but the guide's ExpertBank splits T=1000"):
            PPAPGuidance(g).correct(x, x, 400, DDIMScheduler(num_train_timesteps=500))
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(C * H * H, 3))
    x0hat = X0HatGuide(clf, lambda x, t: torch.zeros_like(x), Schedule.create("cosine", 1000), y)
    with pytest.raises(ValueError, match="X0HatGuide's alphas_cumprod .* is not the DDIMScheduler's"):
        PPAPGuidance(FastGuide(x0hat)).correct(x, x, 400, DDIMScheduler())


def test_numpy_timesteps_run_merged_experts():
    """A numpy int timestep (or a numpy array of one value) is known on the host as an int is: it routed per sample
    through the bank instead of running the band's merged experts."""
    import numpy as np

    guide = _bank_guide()
    x = torch.randn(B, C, H, H)
    for t in (np.int64(500), np.array(500), np.full(B, 500)):
        g = PPAPGuidance(guide)
        got = g.grad(x, t)
        assert len(g._fast_guides[torch.device("cpu")]._merged_models) == 1, type(t)
        torch.testing.assert_close(got, guide(x, 500), rtol=1e-5, atol=1e-6)


def test_abar_table_of_an_inference_mode_scheduler():
    """A scheduler built under torch.inference_mode() has an inference tensor as alphas_cumprod, which has
    no version counter: its table is rebuilt on every call (an in-place change made in inference mode
    is seen), not a RuntimeError."""
    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    with torch.inference_mode():
        s = DDIMScheduler(num_train_timesteps=1000)
        s.alphas_cumprod = s.alphas_cumprod.double()  # the float32 table is then a copy, not acp itself
    x_t, abar = g.vp_sample(torch.ones(2, 1, 2, 2), torch.tensor([10, 900]), s)
    assert torch.equal(abar.flatten(), s.alphas_cumprod[[10, 900]].float()) and torch.equal(x_t, torch.ones(2, 1, 2, 2))
    with torch.inference_mode():
        s.alphas_cumprod.mul_(0.5)
    assert torch.equal(g._abar(s, "cpu"), s.alphas_cumprod.float())


def test_pipeline_refuses_a_scheduler_whose_step_needs_more_than_the_sample(unet, classifier):
    """RePaint's step needs original_image and mask (inpainting): a TypeError from inside the loop
    before; now one error naming them, before sampling."""
    from diffusers import RePaintScheduler

    W, y = classifier
    for guide in (linear_classifier_guide(W, y, 4.0), None):
        pipe = PPAPGuidedPipeline(unet, RePaintScheduler(num_train_timesteps=1000), guide)
        pipe.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match=r"RePaintScheduler.step needs \['original_image', 'mask'\]"):
            pipe(batch_size=B, num_inference_steps=2, output_type="raw")


def test_pipeline_gives_unclip_its_previous_timestep(unet, classifier):
    """UnCLIPScheduler.step steps to prev_timestep, t - 1 when not given (its pipelines pass the next timestep):
    the pipeline's 5 steps went 999 -> 998 ... and returned (clipped) noise."""
    from diffusers import UnCLIPScheduler

    from ppap_fast.integrations.diffusers import MIN_GUIDED_ABAR

    W, y = classifier
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(6))
    for guide in (None, linear_classifier_guide(W, y, 2.0)):
        pipe = PPAPGuidedPipeline(unet, UnCLIPScheduler(clip_sample=False), guide)
        pipe.set_progress_bar_config(disable=True)
        got = pipe(batch_size=B, num_inference_steps=5, latents=xT, generator=torch.Generator().manual_seed(7),
                   output_type="raw").images
        sched, x, gen = UnCLIPScheduler(clip_sample=False), xT.clone(), torch.Generator().manual_seed(7)
        sched.set_timesteps(5)
        ts = sched.timesteps
        with torch.no_grad():
            for i, t in enumerate(ts):
                eps = unet(x, t).sample
                abar = sched.alphas_cumprod[t]
                if guide is not None and abar >= MIN_GUIDED_ABAR:  # its cosine schedule's t = 999 is not guided
                    eps = eps - (1 - abar).sqrt() * guide(x, torch.full((B,), int(t)))
                prev = ts[i + 1] if i + 1 < len(ts) else None
                x = sched.step(eps, t, x, prev_timestep=prev, generator=gen).prev_sample
        assert torch.isfinite(x).all()
        torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_pipeline_refuses_a_scheduler_without_a_step(unet, classifier):
    """ScoreSdeVeScheduler has step_pred / step_correct, no step: an AttributeError from the signature check."""
    from diffusers import ScoreSdeVeScheduler

    W, y = classifier
    for guide in (linear_classifier_guide(W, y, 4.0), None):
        pipe = PPAPGuidedPipeline(unet, ScoreSdeVeScheduler(), guide)
        pipe.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match=r"ScoreSdeVeScheduler has no step\(model_output, timestep, sample\)"):
            pipe(batch_size=B, num_inference_steps=2, output_type="raw")


def test_pipeline_names_variance_channels_its_scheduler_does_not_read(classifier):
    """A 2C-output UNet (eps and a learned variance) with a scheduler that does not split the variance off (DDIM,
    UniPC, Euler, DDPM with a fixed variance) failed inside its step: "size of tensor a (3) must match ... (6)"."""
    from diffusers import UniPCMultistepScheduler

    torch.manual_seed(3)
    unet2c = UNet2DModel(sample_size=H, in_channels=C, out_channels=2 * C, layers_per_block=1, block_out_channels=(8, 16),
                         norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    W, y = classifier
    for sched in (DDIMScheduler(), UniPCMultistepScheduler(), EulerDiscreteScheduler(), DDPMScheduler()):
        for guide in (linear_classifier_guide(W, y, 4.0), None):
            pipe = PPAPGuidedPipeline(unet2c, sched, guide)
            pipe.set_progress_bar_config(disable=True)
            with pytest.raises(ValueError, match=rf"the denoiser returns 6 channels for a 3-channel sample \(eps and a "
                                                 rf"learned variance\), but {type(sched).__name__} \(variance_type="):
                pipe(batch_size=B, num_inference_steps=2, output_type="raw")
    for sched in (DDPMScheduler(variance_type="learned_range"), DPMSolverMultistepScheduler(variance_type="learned_range")):
        pipe = PPAPGuidedPipeline(unet2c, sched, linear_classifier_guide(W, y, 4.0))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=B, num_inference_steps=2, output_type="raw").images
        assert out.shape == (B, C, H, H) and torch.isfinite(out).all()


def _text_unet(out_channels=C):
    torch.manual_seed(7)
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=H, in_channels=C, out_channels=out_channels, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


def test_text_conditional_unet_with_classifier_free_guidance_as_diffusers(classifier):
    """A DeepFloyd-IF-like denoiser (UNet2DConditionModel, learned variance: 2C channels, DDPM learned_range):
    the pipeline equals the hand-written loop of diffusers' IF pipeline (one forward of [x; x] with
    [negative; prompt] states, eps = uncond + w (text - uncond), the variance of the text half) with the PPAP
    correction on top; without cfg_scale one forward of the prompt. Every forward of a CFG step is 2B wide."""
    W, y = classifier
    net = _text_unet(2 * C)
    g = torch.Generator().manual_seed(23)
    cond, neg = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    xT = torch.randn(B, C, H, H, generator=g)
    guide = linear_classifier_guide(W, y, 2.0)
    sched = lambda: DDPMScheduler(variance_type="learned_range", clip_sample=False)  # noqa: E731
    widths = []
    net.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[0]))

    def run(gd, **kw):
        pipe = PPAPGuidedPipeline(net, sched(), gd)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=3, latents=xT, output_type="latent",
                    generator=torch.Generator().manual_seed(1), **kw).images

    def by_hand(gd, w):
        s, x, gen = sched(), xT.clone(), torch.Generator().manual_seed(1)
        s.set_timesteps(3)
        with torch.no_grad():
            for t in s.timesteps:
                if w > 1:
                    states = torch.cat([neg.expand(B, -1, -1), cond.expand(B, -1, -1)])
                    out_u, out_c = net(torch.cat([x, x]), t, encoder_hidden_states=states).sample.chunk(2)
                    eps_u, _ = out_u.split(C, dim=1)
                    eps_c, var = out_c.split(C, dim=1)
                    out = torch.cat([eps_u + w * (eps_c - eps_u), var], dim=1)
                else:
                    out = net(x, t, encoder_hidden_states=cond.expand(B, -1, -1)).sample
                if gd is not None:
                    out = PPAPGuidance(gd).correct(out, x, t, s)
                x = s.step(out, t, x, generator=gen).prev_sample
        return x

    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    text = dict(prompt_embeds=cond, negative_prompt_embeds=neg)
    widths.clear()
    cfg_guided = run(guide, cfg_scale=4.0, **text)
    assert widths == [2 * B] * 3
    assert rel(cfg_guided, by_hand(guide, 4.0)) < 1e-6
    cfg_plain = run(None, cfg_scale=4.0, **text)
    assert rel(cfg_plain, by_hand(None, 4.0)) < 1e-6
    widths.clear()
    prompt_only = run(None, prompt_embeds=cond)
    assert widths == [B] * 3 and rel(prompt_only, by_hand(None, 1.0)) < 1e-6
    assert rel(cfg_plain, prompt_only) > 1e-3 and rel(run(None, prompt_embeds=neg), prompt_only) > 1e-3
    assert rel(cfg_guided, cfg_plain) > 1e-3  # the PPAP guidance acts on the combined prediction
    assert torch.equal(run(None, prompt_embeds=cond.expand(B, -1, -1)), prompt_only)  # per-sample states


def test_text_conditioning_bad_inputs(unet):
    net = _text_unet()
    cond = torch.randn(1, 5, 12)

    def run(model, **kw):
        pipe = PPAPGuidedPipeline(model, DDIMScheduler(clip_sample=False))
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=2, output_type="latent", **kw)

    cases = [
        (net, {}, "text-conditional \\(cross_attention_dim=12\\): pass prompt_embeds"),
        (unet, dict(prompt_embeds=cond), "takes no text conditioning"),
        (unet, dict(cfg_scale=3.0), "cfg_scale .* needs prompt_embeds"),
        (unet, dict(negative_prompt_embeds=cond), "without prompt_embeds"),
        (net, dict(prompt_embeds=cond, cfg_scale=3.0), "needs negative_prompt_embeds"),
        (net, dict(prompt_embeds=torch.randn(1, 5, 8)), "width 8 != the denoiser's cross_attention_dim 12"),
        (net, dict(prompt_embeds=torch.randn(3, 5, 12)), r"\[1 or batch_size=4, tokens, width\]"),
        (net, dict(prompt_embeds=torch.randn(5, 12)), r"\[1 or batch_size=4, tokens, width\]"),
        (net, dict(prompt_embeds=cond, negative_prompt_embeds=torch.randn(1, 4, 12), cfg_scale=2.0), "same tokens"),
        (net, dict(prompt_embeds=torch.full((1, 5, 12), float("nan"))), "finite"),
        (net, dict(prompt_embeds=cond, cfg_scale=float("inf")), "cfg_scale must be a finite number"),
        (net, dict(prompt_embeds=cond, negative_prompt_embeds=cond, cfg_scale=0.5), "with cfg_scale=0.5"),
        (net, dict(prompt_embeds=cond, negative_prompt_embeds=cond), "with cfg_scale=1.0"),
    ]
    for model, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            run(model, **kw)


def test_text_unet_with_encoder_hid_proj_takes_the_text_encoders_width():
    """IF's stage I projects the T5 states (encoder_hid_dim) to cross_attention_dim inside: prompt_embeds
    are encoder_hid_dim wide."""
    torch.manual_seed(7)
    from diffusers import UNet2DConditionModel

    net = UNet2DConditionModel(sample_size=H, in_channels=C, out_channels=C, layers_per_block=1,
                               block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=12,
                               encoder_hid_dim=20, attention_head_dim=4,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    pipe = PPAPGuidedPipeline(net, DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=B, num_inference_steps=2, output_type="latent", prompt_embeds=torch.randn(1, 5, 20),
               negative_prompt_embeds=torch.randn(1, 5, 20), cfg_scale=3.0).images
    assert out.shape == (B, C, H, H) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="width 12 != the denoiser.s encoder_hid_dim 20"):
        pipe(batch_size=B, num_inference_steps=2, output_type="latent", prompt_embeds=torch.randn(1, 5, 12))


def test_from_pipe_keeps_a_text_conditional_unet():
    """from_pipe switches a model over only if its exact type is in the signature: a UNet2DConditionModel too."""
    from diffusers import DDPMPipeline

    net = _text_unet()
    pipe = PPAPGuidedPipeline.from_pipe(DDPMPipeline(unet=net, scheduler=DDPMScheduler()))
    assert pipe.unet is net


def test_a_fast_guide_given_runs_its_merged_experts():
    """PPAPGuidance(FastGuide(guide)) wrapped the FastGuide in a second one, which ran it as an opaque callable
    (no host timestep): the bank routed per sample at every step, never its merged experts."""
    from ppap_fast.fast_sampling import FastGuide

    guide = _bank_guide()
    x = torch.randn(B, C, H, H)
    fast = FastGuide(guide)
    g = PPAPGuidance(fast)
    got = g.grad(x, torch.tensor(500))
    assert g._fast_guides[torch.device("cpu")] is fast and len(fast._merged_models) == 1
    torch.testing.assert_close(got, guide(x, 500), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="give them to the FastGuide"):
        PPAPGuidance(FastGuide(guide), channels_last=True).grad(x, torch.tensor(500))


def test_a_subclassed_scheduler_clips_as_its_base(unet, classifier):
    """A user's subclass of DDIMScheduler inherits its clipping step: the guided pipeline clips x0 first for it as for
    DDIMScheduler (a check of the subclass's own source found no clip_sample and skipped it)."""
    class MyDDIM(DDIMScheduler):
        pass

    W, y = classifier
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(6))
    outs = []
    for cls in (DDIMScheduler, MyDDIM):
        pipe = PPAPGuidedPipeline(unet, cls(clip_sample=True, clip_sample_range=0.5), linear_classifier_guide(W, y, 30.0))
        pipe.set_progress_bar_config(disable=True)
        outs.append(pipe(batch_size=B, num_inference_steps=4, latents=xT, output_type="raw").images)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("name", ["DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"])
def test_pipeline_refuses_an_inverse_scheduler(unet, classifier, name):
    """An inverse scheduler steps an image towards noise: the pipeline ran it from noise and returned noise."""
    W, y = classifier
    for guide in (linear_classifier_guide(W, y, 4.0), None):
        pipe = PPAPGuidedPipeline(unet, getattr(diffusers, name)(), guide)
        pipe.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match=rf"{name} steps from an image towards noise \(inversion\)"):
            pipe(batch_size=B, num_inference_steps=2, output_type="raw")


def test_own_config_reads_a_scheduler_classes_signature_once(unet, classifier, monkeypatch):
    """_own_config runs several times a step (use_flow_sigmas, thresholding, ...): inspect.signature of the scheduler's
    __init__ ran at each of them."""
    import inspect

    class FreshDPM(DPMSolverMultistepScheduler):  # a class no earlier test has looked up
        pass

    W, y = classifier
    pipe = PPAPGuidedPipeline(unet, FreshDPM(), linear_classifier_guide(W, y, 4.0))
    pipe.set_progress_bar_config(disable=True)
    calls, signature = [], inspect.signature
    monkeypatch.setattr(inspect, "signature",
                        lambda f, *a, **k: (calls.append(f), signature(f, *a, **k))[1])
    out = pipe(batch_size=B, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="raw")
    assert torch.isfinite(out.images).all()
    assert sum(f is FreshDPM.__init__ for f in calls) == 1


@pytest.mark.parametrize("name", ["DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"])
def test_public_helpers_refuse_an_inverse_scheduler(classifier, name):
    """A manual loop over an inverse scheduler: its step at t converts with alphas_cumprod[t - stride], the correction
    took alphas_cumprod[t] (a wrong coefficient, silently)."""
    W, y = classifier
    sched = getattr(diffusers, name)()
    sched.set_timesteps(4)
    guided = PPAPGuidance(linear_classifier_guide(W, y, 4.0))
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[1]
    for call in (lambda: guided.correct(x, x, t, sched), lambda: guided.vp_sample(x, t, sched),
                 lambda: guided.clip_first(x, x, t, sched)):
        with pytest.raises(ValueError, match=rf"{name} steps from an image towards noise \(inversion\): "
                                             "PPAPGuidance guides sampling only"):
            call()


def test_unguided_pipeline_runs_a_flow_matching_scheduler_as_its_loop(unet):
    """FlowMatchEulerDiscreteScheduler has no init_noise_sigma (its noise is x at sigma 1): AttributeError."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(3))
    pipe = PPAPGuidedPipeline(unet, sched)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=B, num_inference_steps=3, latents=xT, output_type="raw").images
    ref = diffusers.FlowMatchEulerDiscreteScheduler()
    ref.set_timesteps(3)
    x = xT
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(unet(x, t).sample, t, x).prev_sample
    assert torch.isfinite(out).all() and torch.equal(out, x)


@pytest.mark.parametrize("name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
def test_guide_at_scale_zero_runs_schedulers_it_cannot_guide_unguided(unet, classifier, name):
    """EDM / flow matching (no alphas_cumprod) were refused with a guide attached even at guidance_scale=0, which
    samples unguided; guided they still are refused."""
    W, y = classifier
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(4))

    def run(guide, **kw):
        pipe = PPAPGuidedPipeline(unet, getattr(diffusers, name)(), guide)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=B, num_inference_steps=3, latents=xT, output_type="raw", **kw).images

    plain = run(None)
    assert torch.isfinite(plain).all()
    assert torch.equal(run(linear_classifier_guide(W, y, 4.0), guidance_scale=0.0), plain)
    assert torch.equal(run(PPAPGuidance(linear_classifier_guide(W, y, 4.0), scale=0.0)), plain)
    with pytest.raises(ValueError, match=f"{name} has no alphas_cumprod table"):
        run(linear_classifier_guide(W, y, 4.0))


def _float64_coef(sched, i, pt):
    """The correction coefficient of step t, written out in float64: alpha, sigma of the step's abar (alphas_cumprod
    for DDPM / DDIM; the step's own sigma for a solver or a sigma-space scheduler)."""
    if isinstance(sched, (DPMSolverMultistepScheduler, EulerDiscreteScheduler)):
        sigma = sched.sigmas[i].double()
        abar = 1 / (1 + sigma * sigma)
    else:
        abar = sched.alphas_cumprod.double()[int(sched.timesteps[i])]
    a, s1 = abar.sqrt(), (1 - abar).sqrt()
    return {"epsilon": s1, "v_prediction": s1 / a, "sample": -s1 * s1 / a}[pt]


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_float64_output_is_corrected_with_a_float64_coefficient(cls, pt):
    """The coefficient was computed in float32 for a float64 model (sqrt(1 - abar) 1e-7 off)."""
    sched = cls(prediction_type=pt)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(8)
    x, out, grad = (torch.randn(B, C, H, H, generator=g, dtype=torch.float64) for _ in range(3))
    t = sched.timesteps[7]
    if isinstance(sched, EulerDiscreteScheduler):
        sched.scale_model_input(x, t)  # sets its step index, as the loop does
    got = PPAPGuidance(lambda x, t: x).correct(out, x, t, sched, grad=grad)
    ref = out - _float64_coef(sched, 7, pt) * grad
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=1e-14)


def test_float64_pipeline_corrects_with_float64_abar(unet, classifier):
    """A float64 UNet and guide in the pipeline: each step's output is eps - sqrt(1 - abar_t) grad with abar_t, the
    square root and the product in float64, stepped by the scheduler (clip_sample=False: no clipping first)."""
    W, y = classifier
    unet64 = UNet2DModel.from_config(unet.config).double().eval()
    unet64.load_state_dict(unet.state_dict())
    guide = linear_classifier_guide(W.double(), y, 4.0)
    xT = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    pipe = PPAPGuidedPipeline(unet64, DDIMScheduler(clip_sample=False), PPAPGuidance(guide, fast=False))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=B, num_inference_steps=4, latents=xT, output_type="raw").images
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(4)
    abar, x = sched.alphas_cumprod.double(), xT
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet64(x, t).sample - (1 - abar[t]).sqrt() * guide(x, t.expand(B))
            x = sched.step(eps, t, x).prev_sample
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    torch.testing.assert_close(out, x, rtol=1e-13, atol=1e-13)


def test_clip_first_of_a_float64_output_in_float64(classifier):
    """clip_first rounded a float64 output to float32 before clipping its x0 (1e-7 off)."""
    sched = DDIMScheduler(clip_sample=True, clip_sample_range=0.5)
    sched.set_timesteps(10)
    t = sched.timesteps[7]
    g = torch.Generator().manual_seed(10)
    x, eps = (torch.randn(B, C, H, H, generator=g, dtype=torch.float64) for _ in range(2))
    got = PPAPGuidance(lambda x, t: x).clip_first(eps, x, t, sched)
    abar = sched.alphas_cumprod.double()[int(t)]
    x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-0.5, 0.5)
    ref = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    assert got.dtype == torch.float64 and torch.isfinite(got).all() and not torch.equal(got, eps)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)


def test_output_type_pil_refuses_non_image_channel_counts():
    """A latent UNet's 4-channel x came back as RGBA pictures ("pil") or 4-channel arrays ("np") without a word
    (the pipeline has no VAE): "pil" refuses 2 or 4 channels before sampling, "np" / "pt" warn, "latent" is silent."""
    calls = []

    def tiny(chans):
        torch.manual_seed(0)
        blocks = ("DownBlock2D", "DownBlock2D"), ("UpBlock2D", "UpBlock2D")
        net = UNet2DModel(sample_size=H, in_channels=chans, out_channels=chans, layers_per_block=1,
                          block_out_channels=(8, 16), norm_num_groups=4, down_block_types=blocks[0],
                          up_block_types=blocks[1]).eval()
        net.register_forward_hook(lambda *a: calls.append(1))
        return PPAPGuidedPipeline(net, DDIMScheduler())

    for chans in (2, 4):
        with pytest.raises(ValueError, match=f"output_type='pil': the pipeline's x has {chans} channels, not 1 or 3"):
            tiny(chans)(batch_size=1, num_inference_steps=2, output_type="pil")
    assert not calls  # refused before sampling
    pipe = tiny(4)
    for kind, shape in (("np", (1, H, H, 4)), ("pt", (1, 4, H, H))):
        with pytest.warns(UserWarning, match=f"output_type='{kind}': the pipeline's x has 4 channels") as rec:
            img = pipe(batch_size=1, num_inference_steps=2, output_type=kind).images
        assert tuple(img.shape) == shape and rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raw = pipe(batch_size=1, num_inference_steps=2, output_type="latent").images
        gray = tiny(1)(batch_size=1, num_inference_steps=2, output_type="pil").images
    assert raw.shape == (1, 4, H, H) and torch.isfinite(raw).all() and gray[0].mode == "L"


def test_abar_tables_of_one_scheduler_are_kept_per_device():
    """Building a scheduler's table on a new device dropped its tables on the others: alternating devices rebuilt
    it every time. One table per device is kept (at most ABAR_CACHE_SIZE in all, least recently used dropped)."""
    from ppap_fast.integrations.diffusers import ABAR_CACHE_SIZE

    sched = DDIMScheduler()
    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    cpu = g._abar(sched, "cpu")
    meta = g._abar(sched, "meta")
    assert meta.device.type == "meta" and g._abar(sched, "cpu") is cpu and g._abar(sched, "meta") is meta
    assert torch.equal(cpu, sched.alphas_cumprod.double())
    sched.alphas_cumprod.mul_(1.0)  # changed in place: every device's table is stale
    fresh = g._abar(sched, "cpu")
    assert fresh is not cpu and g._abar(sched, "meta") is not meta and len(g._tables) == 2
    devices = ["meta"] + [torch.device("cpu", i) for i in range(1, ABAR_CACHE_SIZE + 2)]
    for d in devices:  # only the newest ABAR_CACHE_SIZE kept
        g._abar(sched, d)
    assert [k[2] for k in g._tables] == [torch.device(d) for d in devices[-ABAR_CACHE_SIZE:]]
    assert g._abar(sched, devices[-1]) is g._abar(sched, devices[-1])


def test_abar_tables_go_with_their_schedulers():
    """Tables were cached by the scheduler's id until the id was reused or _forget ran: 100 short-lived schedulers
    left 100 tables (and their alphas_cumprod). At most ABAR_CACHE_SIZE are kept, and they hold no scheduler."""
    import gc
    import weakref

    from ppap_fast.integrations.diffusers import ABAR_CACHE_SIZE

    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    scheds = [DDIMScheduler(beta_end=0.02 + i * 1e-5) for i in range(100)]
    refs = [weakref.ref(s) for s in scheds]
    for s in scheds:
        g._abar(s, "cpu")
    assert len(g._tables) == ABAR_CACHE_SIZE
    del scheds, s
    gc.collect()
    assert all(r() is None for r in refs)
    for i in range(100):  # one at a time
        s = DDIMScheduler(beta_end=0.02 + i * 1e-5)
        refs[i] = weakref.ref(s)
        g._abar(s, "cpu")
        del s
    gc.collect()
    assert len(g._tables) == ABAR_CACHE_SIZE and all(r() is None for r in refs)


def test_abar_cache_stays_bounded_over_schedulers_and_devices():
    """100 schedulers alternating over two devices: never more than ABAR_CACHE_SIZE tables; a hit returns the very
    tensor built, and an entry just used outlives older ones."""
    from ppap_fast.integrations.diffusers import ABAR_CACHE_SIZE

    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    first = DDIMScheduler()
    kept = g._abar(first, "cpu")
    scheds = [DDIMScheduler(beta_end=0.02 + i * 1e-5) for i in range(100)]
    for i, s in enumerate(scheds):
        device = "meta" if i % 2 else "cpu"
        tab = g._abar(s, device)
        assert g._abar(s, device) is tab and len(g._tables) <= ABAR_CACHE_SIZE
        assert g._abar(first, "cpu") is kept  # used every step: never the oldest
        if device == "cpu":
            assert torch.equal(tab, s.alphas_cumprod.double())
    assert len(g._tables) == ABAR_CACHE_SIZE
    old = g._abar(scheds[0], "cpu")  # evicted long ago: rebuilt, equal
    assert torch.equal(old, scheds[0].alphas_cumprod.double()) and g._abar(scheds[0], "cpu") is old


def test_a_new_scheduler_under_a_reused_id_gets_its_own_table(monkeypatch):
    """Forced: every scheduler and table gets the same id, so a new scheduler's key is the collected one's."""
    import builtins
    import gc
    import weakref

    from ppap_fast.integrations import diffusers as integ

    monkeypatch.setattr(integ, "id", lambda o: 7 if isinstance(o, (DDIMScheduler, torch.Tensor)) else builtins.id(o),
                        raising=False)
    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    old = DDIMScheduler()
    assert torch.equal(g._abar(old, "cpu"), old.alphas_cumprod.double())
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None and len(g._tables) == 1  # the cache did not keep it; its entry under key 7 remains
    new = DDIMScheduler(beta_schedule="squaredcos_cap_v2")
    assert torch.equal(g._abar(new, "cpu"), new.alphas_cumprod.double())


def test_a_table_is_not_reused_by_another_scheduler_sharing_its_alphas_cumprod(monkeypatch):
    """Forced: every scheduler and table gets the same id, and the schedulers share one alphas_cumprod: the key and
    the table match, yet each scheduler is checked on its own (sigma space, inversion)."""
    import builtins

    from diffusers import DDIMInverseScheduler

    from ppap_fast.integrations import diffusers as integ

    monkeypatch.setattr(integ, "id", lambda o: 7 if isinstance(o, (DDIMScheduler, EulerDiscreteScheduler,
                                                                   DDIMInverseScheduler, torch.Tensor))
                        else builtins.id(o), raising=False)
    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    ddim, euler, inverse = DDIMScheduler(), EulerDiscreteScheduler(), DDIMInverseScheduler()
    euler.alphas_cumprod = inverse.alphas_cumprod = ddim.alphas_cumprod
    assert g._table(ddim, "cpu")[1] is False and g._table(euler, "cpu")[1] is True
    with pytest.raises(ValueError, match="DDIMInverseScheduler steps from an image towards noise"):
        g._table(inverse, "cpu")


class _NoWeakRefs:  # a scheduler that takes no weak reference: its tables hold it
    __slots__ = ("alphas_cumprod", "timesteps", "config", "init_noise_sigma")

    def __init__(self, acp):
        self.alphas_cumprod, self.timesteps, self.config, self.init_noise_sigma = acp, torch.arange(3), {}, 1.0


def test_schedulers_without_weak_references_are_held_at_most_abar_cache_size():
    import gc
    import weakref

    from ppap_fast.integrations.diffusers import ABAR_CACHE_SIZE

    g = PPAPGuidance(lambda x, t: torch.zeros_like(x))
    acp = DDIMScheduler().alphas_cumprod
    held = [_NoWeakRefs(acp * (1 - i * 1e-6)) for i in range(ABAR_CACHE_SIZE + 5)]
    for s in held:
        assert torch.equal(g._abar(s, "cpu"), s.alphas_cumprod.double())
    assert len(g._tables) == ABAR_CACHE_SIZE
    assert {k[0] for k in g._tables} == {id(s) for s in held[-ABAR_CACHE_SIZE:]}
    acp_refs = [weakref.ref(s.alphas_cumprod) for s in held]
    del held, s
    gc.collect()  # the evicted schedulers (and their alphas_cumprod) are let go; the cached ones held
    assert [r() is not None for r in acp_refs] == [False] * 5 + [True] * ABAR_CACHE_SIZE
