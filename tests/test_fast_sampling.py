"""FastGuidedSampler vs the reference sample_loop / steps (tiny ADM UNet + tiny ResNet ExpertBank guide)."""
import re
import warnings

import pytest
import torch
import torch.nn as nn

from ppap_fast import fast_sampling as fs
from ppap_fast.experts import ExpertBank
from ppap_fast.fast_sampling import FastGuidedSampler, FastSamplingWarning, fast_sample_loop
from ppap_fast.guidance import ClassGuide, ComposedGuide, DenseRegressionGuide, SegmentationGuide, X0HatGuide
from ppap_fast.models import ADMUNet
from ppap_fast.models.tiny import TinyResNet
from ppap_fast.sampling import ddim_step, ddpm_step, sample_loop
from ppap_fast.schedule import Schedule
from ppap_fast.testing import linear_classifier_guide

from _util import assert_no_host_sync, randomise_bank, rel_err, requires_cuda

SHAPE = (4, 3, 8, 8)
TOL = 2e-5  # float32 rounding over a few steps (merged + BN-folded experts vs routed bank)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_adm(learn_sigma=True):
    m = ADMUNet(image_size=8, in_channels=3, model_channels=32, out_channels=6 if learn_sigma else 3,
                num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2,
                use_scale_shift_norm=True, resblock_updown=True)
    with torch.no_grad():  # ADM zero-inits its output convs: give them weights so eps is not 0
        for p in m.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return m.eval()


def tiny_bank(n_experts=5, num_timesteps=1000):
    net = TinyResNet(widths=(8, 16), layers=(1, 1), in_channels=3, num_classes=4)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2)
    return randomise_bank(ExpertBank(net, "resnet", n_experts=n_experts, num_timesteps=num_timesteps, r=4,
                                     alpha=2)).eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, bank = tiny_adm(), tiny_bank()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    return model, bank, guide


def _both(model, sched, sampler, guide, seed=1, **kw):
    ref = sample_loop(model, SHAPE, sched, sampler=sampler, guide=guide,
                      generator=torch.Generator().manual_seed(seed), **kw)
    opts = {k: v for k, v in kw.items() if k in ("eta", "var_type")}
    fast = FastGuidedSampler(model, sched, sampler=sampler, guide=guide, **opts)
    out = fast.sample(SHAPE, generator=torch.Generator().manual_seed(seed))
    return ref, out, fast


def _patch_compile(monkeypatch, error=None):
    """fs._compile replaced: "compiles" to the function itself (run eagerly), or, given ``error``, to one that raises
    RuntimeError(error) when called. Returns the list of the functions it was given."""
    compiled = []

    def fake(fn, **kw):
        compiled.append(fn)
        if error is None:
            return fn

        def run(*a, **k):
            raise RuntimeError(error)
        return run

    monkeypatch.setattr(fs, "_compile", fake)
    return compiled


CASES = [("ddim", "ddim5", {}), ("ddim", "ddim5", {"eta": 0.7}), ("ddpm", "6", {})]


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("sampler,respacing,kw", CASES)
def test_equals_reference_sample_loop(setup, sampler, respacing, kw, guided):
    model, bank, guide = setup
    sched = Schedule.create("linear", 1000, respacing)
    ref, out, fast = _both(model, sched, sampler, guide if guided else None, **kw)
    assert rel_err(out, ref) < TOL
    if guided:  # the guide really moved the samples, and every band ran merged
        unguided = sample_loop(model, SHAPE, sched, sampler=sampler, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.isfinite(unguided).all() and rel_err(unguided, ref) > 20 * TOL
        bands = {int(t) // bank.band for t in sched.timestep_map}
        assert {k[0] for k in fast._variants} == bands and len(fast._merged_models) == len(bands)


def test_ddpm_fixed_variance_and_plain_callable_guide():
    torch.manual_seed(3)
    model = tiny_adm(learn_sigma=False)
    W, y = torch.randn(4, 3 * 8 * 8) * 0.1, torch.tensor([0, 1, 2, 3])
    guide = linear_classifier_guide(W, y, 2.0)
    sched = Schedule.create("linear", 1000, "5")
    for var_type in (None, "fixed_small"):
        ref = sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, var_type=var_type,
                          generator=torch.Generator().manual_seed(2))
        out = fast_sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, var_type=var_type,
                               generator=torch.Generator().manual_seed(2))
        assert rel_err(out, ref) < TOL
    # sample_loop's progress= passes through (it was an unexpected keyword of FastGuidedSampler);
    # its callback / denoised_fn, which have no fast equivalent, are named
    out = fast_sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, progress=True,
                           generator=torch.Generator().manual_seed(2))
    assert rel_err(out, sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide,
                                    generator=torch.Generator().manual_seed(2))) < TOL
    with pytest.raises(TypeError, match="FastGuidedSampler.*sample.*callback"):
        fast_sample_loop(model, SHAPE, sched, callback=lambda i, out: None)
    with pytest.raises(TypeError, match="denoised_fn"):
        fast_sample_loop(model, SHAPE, sched, denoised_fn=lambda x0: x0)


def test_merged_path_does_not_call_the_bank(setup):
    model, bank, guide = setup
    calls = []
    h = bank.register_forward_hook(lambda *a: calls.append(1))
    try:
        FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=guide).sample(
            SHAPE, generator=torch.Generator().manual_seed(0))
        assert not calls
        FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=guide,
                          merge_experts=False).sample(SHAPE, generator=torch.Generator().manual_seed(0))
        assert len(calls) == 5
    finally:
        h.remove()


@pytest.mark.parametrize("sampler,respacing", [("ddim", "ddim5"), ("ddpm", "6")])
def test_swap_merge_mode_equals_cache_with_one_copy(setup, sampler, respacing):
    model, bank, guide = setup
    sched = Schedule.create("linear", 1000, respacing)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    ref = sample_loop(model, SHAPE, sched, sampler=sampler, guide=guide, generator=gen())
    cache = FastGuidedSampler(model, sched, sampler=sampler, guide=guide)
    swap = FastGuidedSampler(model, sched, sampler=sampler, guide=guide, merge_mode="swap")
    a, b = cache.sample(SHAPE, generator=gen()), swap.sample(SHAPE, generator=gen())
    assert rel_err(a, ref) < TOL and rel_err(b, ref) < TOL
    bands = [int(t) // bank.band for t in reversed(sched.timestep_map.tolist())]
    switches = sum(1 for p, q in zip(bands, bands[1:]) if p != q)
    assert len(cache._merged_models) == len(set(bands)) > 1
    assert len(swap._merged_models) == 1 and len(swap._variants) == 1 and swap.fast_guide.swaps == switches
    again = swap.sample(SHAPE, generator=gen())  # starts from the last band: swaps back
    assert rel_err(again, ref) < TOL and swap.fast_guide.swaps == 2 * switches + 1
    with pytest.raises(ValueError, match="merge_mode"):
        FastGuidedSampler(model, sched, guide=guide, merge_mode="lazy")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_mixed_timestep_batch_routes_per_sample(setup, sampler):
    model, bank, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5" if sampler == "ddim" else "10")
    x = torch.randn(SHAPE)
    idx = torch.tensor([4, 3, 1, 0]) if sampler == "ddim" else torch.tensor([9, 5, 2, 0])
    noise = torch.randn(SHAPE)
    fast = FastGuidedSampler(model, sched, sampler=sampler, guide=guide)
    assert bank.check_inputs
    out, pred = fast.step(x, idx, noise=noise)
    assert bank.check_inputs and not fast._variants  # routed through the bank, checks restored
    step = ddim_step if sampler == "ddim" else ddpm_step
    ref = step(model, x, idx, sched, guide=guide, **({"noise": noise} if sampler == "ddpm" else {}))
    assert rel_err(out, ref.sample) < TOL and rel_err(pred, ref.pred_xstart) < TOL
    for b in range(4):  # each sample as if it were alone at its own step (merged expert)
        alone = FastGuidedSampler(model, sched, sampler=sampler, guide=ClassGuide(bank, b, scale=3.0))
        one, _ = alone.step(x[b:b + 1], int(idx[b]), noise=noise[b:b + 1])
        assert rel_err(one, out[b:b + 1]) < TOL


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_merged_step_reads_no_scalar_on_the_host(setup, sampler):
    """CPU proxy of "no .item() / host sync": no aten._local_scalar_dense in a merged step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountScalarReads.n += 1
            return func(*args, **(kwargs or {}))

    model, bank, _ = setup
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0, nonfinite="zero")
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), sampler=sampler, guide=guide,
                             nonfinite_grad="zero")
    x = torch.randn(SHAPE)
    fast.step(x, 3)  # builds the merged expert
    with CountScalarReads():
        fast.step(x, 3)
    assert CountScalarReads.n == 0


def test_composed_guide_merges_its_banks(setup):
    model, bank, guide = setup
    other = ClassGuide(tiny_bank(n_experts=2), 1, scale=1.5)
    W = torch.randn(4, 3 * 8 * 8) * 0.1
    composed = ComposedGuide([(guide, 1.0), (other, 0.5), (linear_classifier_guide(W, torch.tensor([1, 1, 0, 0]), 1.0), 2.0)])
    sched = Schedule.create("linear", 1000, "ddim5")
    ref, out, fast = _both(model, sched, "ddim", composed)
    assert rel_err(out, ref) < TOL
    assert len(fast.banks) == 2 and len(fast._merged_models) == 5 + 2


def test_compile_failure_warns_and_falls_back(setup, monkeypatch):
    model, _, guide = setup
    _patch_compile(monkeypatch, error="simulated inductor failure\nmore lines")
    sched = Schedule.create("linear", 1000, "ddim5")
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator().manual_seed(1))
    with pytest.warns(FastSamplingWarning) as rec:
        out = fast_sample_loop(model, SHAPE, sched, guide=guide, compile_guide=True, compile_model=True,
                               generator=torch.Generator().manual_seed(1))
    msgs = [str(w.message) for w in rec]
    assert any("denoiser failed" in m for m in msgs) and any("guide failed" in m for m in msgs)
    assert all("simulated inductor failure" in m for m in msgs)
    assert rel_err(out, ref) < TOL


def test_guide_error_under_compile_guide_is_not_taken_for_a_failed_compile(monkeypatch):
    """Out-of-range labels (as_cond_fn's y, the pipeline's class_labels) under compile_guide were taken for a failed
    compile: a "torch.compile of the guide failed" warning, and the guide ran eagerly from then on. The guide's own
    error is raised now, and the compiled guide keeps running."""
    compiled = _patch_compile(monkeypatch)  # "compiled": the functional path, run eagerly
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    fast = fs.FastGuide(ClassGuide(clf, torch.tensor([0, 1, 2, 3]), scale=2.0), "cpu", compile_guide=True)
    x, t, y = torch.randn(SHAPE), torch.full((SHAPE[0],), 300), torch.tensor([3, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        with pytest.raises(ValueError, match="target class 7 is out of range"):
            fast(x, t, target=torch.tensor([7, 0, 0, 0]))
        assert rel_err(fast(x, t, target=y), ClassGuide(clf, y, scale=2.0)(x, t)) < TOL
    assert fast._routed._compile_ok and len(compiled) == 1 and not fast.opts.state


def test_denoiser_error_under_compile_model_is_not_taken_for_a_failed_compile(monkeypatch):
    """The denoiser's own error (an out-of-range class label in model_kwargs) under compile_model was taken for a
    failed compile: a "torch.compile of the denoiser failed" warning, and the eager denoiser from then on. The
    model's error is raised now, and the compiled denoiser keeps running."""
    compiled = _patch_compile(monkeypatch)  # "compiled": the model itself
    torch.manual_seed(0)
    model = ADMUNet(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                    attention_resolutions=(), channel_mult=(1,), num_heads=2, num_classes=4).eval()
    y = torch.tensor([7, 0, 0, 0])
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), compile_model=True,
                             model_kwargs={"y": y})
    x = torch.randn(SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        with pytest.raises(ValueError, match=r"y must be class indices in \[0, 4\), got min 0 max 7"):
            fast.step(x, 3)
        y.copy_(torch.tensor([3, 2, 1, 0]))  # the labels fixed in place: the same runner goes on
        got = fast.step(x, 3)[0]
    assert fast._denoise._compile_ok and len(compiled) == 1
    ref = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), model_kwargs={"y": y}).step(x, 3)[0]
    assert torch.isfinite(got).all() and rel_err(got, ref) < TOL


def test_guide_compile_failure_warns_once_not_once_per_band(setup, monkeypatch):
    """A failed guide compile was retried (and warned about) for every band's merged expert: five compiles that fail
    the same way and five warnings for one sampling run; once now, the eager guide from then on (a ComposedGuide's
    parts each once)."""
    model, _, guide = setup
    compiled = _patch_compile(monkeypatch, error="simulated inductor failure")
    sched = Schedule.create("linear", 1000, "ddim5")
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator().manual_seed(1))
    plain = ClassGuide(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval(), torch.tensor([1, 1, 0, 0]), 1.0)
    for g, parts in ((guide, 1), (ComposedGuide([(guide, 1.0), (plain, 2.0)]), 2)):
        compiled.clear()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fast = FastGuidedSampler(model, sched, guide=g, compile_guide=True)
            out = fast.sample(SHAPE, generator=torch.Generator().manual_seed(1))
        msgs = [str(w.message) for w in rec if "guide failed" in str(w.message)]
        assert len(msgs) == parts and len(compiled) == parts, (msgs, len(compiled))
        assert len(fast._variants) == 5
        if g is guide:
            assert rel_err(out, ref) < TOL


def test_compile_eager_backend_matches(setup):
    model, _, guide = setup
    torch._dynamo.reset()
    sched = Schedule.create("linear", 1000, "ddim2")
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        out = fast_sample_loop(model, SHAPE, sched, guide=guide, compile_guide=True,
                               compile_kwargs={"backend": "eager"}, generator=torch.Generator().manual_seed(1))
    assert rel_err(out, ref) < TOL


def _has_cxx():
    import shutil

    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


requires_cxx = pytest.mark.skipif(not _has_cxx(), reason="inductor's CPU backend needs a C++ compiler")


@requires_cxx
def test_inductor_compile_on_cpu_matches(setup):
    # the CPU benchmark's options: inductor (C++ codegen) for the denoiser, frozen, and for the guide
    model, _, guide = setup
    torch._dynamo.reset()
    sched = Schedule.create("linear", 1000, "ddim2")
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator().manual_seed(1))
    fast = FastGuidedSampler(model, sched, guide=guide, compile_model=True, compile_guide=True, compile_freeze=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)  # a compile failure would fall back silently here
        out = fast.sample(SHAPE, generator=torch.Generator().manual_seed(1))
    assert fast._denoise._compiled is not None and all(v._compiled is not None for v in fast._variants.values())
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("freeze", [False, True])
def test_compile_freeze_takes_channel_stats(freeze, monkeypatch):
    # compile_freeze: an ADMUNet's norms take per-channel statistics (traced on CPU only); the
    # user's compile kwargs go through as they are either way
    seen = []

    def spy(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(fs, "_compile", spy)
    model = tiny_adm()
    sched = Schedule.create("linear", 1000, "ddim5")
    kwargs = {"dynamic": False, "options": {"max_autotune": False}}
    fast = FastGuidedSampler(model, sched, compile_model=True, compile_freeze=freeze, compile_kwargs=kwargs)
    fast.step(torch.randn(SHAPE), 2)
    assert seen == [kwargs]
    norms = [m.stats_by_channel for m in model.modules() if type(m).__name__ == "GroupNorm32"]
    assert norms and all(norms) == freeze and any(norms) == freeze
    # a model off the CPU (CUDA: unmeasured there) is left as it is
    other = ADMUNet(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                    attention_resolutions=(), channel_mult=(1,)).to("meta")
    assert fs._denoiser_compile_kwargs(other, fast.opts) == kwargs
    assert not any(getattr(m, "stats_by_channel", False) for m in other.modules())



@pytest.mark.parametrize("freeze", [False, True])
def test_frozen_cpu_denoiser_compiles_with_cpp_wrapper(freeze, monkeypatch):
    # compile_freeze on the CPU: inductor's C++ wrapper (and freezing) are on while the denoiser compiles
    import torch._inductor.config as inductor_config

    seen = []

    def spy(fn, **kw):
        def run(*a, **k):
            seen.append((inductor_config.freezing, inductor_config.cpp_wrapper))
            return fn(*a, **k)
        return run

    monkeypatch.setattr(fs, "_compile", spy)
    model = tiny_adm()
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), compile_model=True,
                             compile_freeze=freeze)
    x = torch.randn(SHAPE)
    fast.step(x, 2)
    assert seen == [(freeze, freeze)]
    assert (inductor_config.freezing, inductor_config.cpp_wrapper) == (False, False)  # restored after the call


def test_compiled_guide_runs_merged_experts_channels_last_on_cpu(setup, monkeypatch):
    # compile_guide on the CPU: merged experts and the guide's input in channels_last, same gradient
    model, bank, guide = setup
    seen = []

    def spy(fn, **kw):
        def run(x, t, **k):
            runner = fn.__self__
            seen.append(runner._input(x).is_contiguous(memory_format=torch.channels_last))
            return fn(x, t, **k)
        return run

    monkeypatch.setattr(fs, "_compile", spy)
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 480)
    want = fs.FastGuide(guide, "cpu")(x, t, t_host=480)
    fast = fs.FastGuide(guide, "cpu", compile_guide=True)
    got = fast(x, t, t_host=480)
    assert seen == [True]
    convs = [m.weight for m in fast._merged_models[(id(bank), 480 // bank.band)].modules()
             if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 3x3 convs: NCHW no longer
    assert torch.isfinite(got).all() and rel_err(got, want) < TOL
    # a plain classifier in a ComposedGuide beside the bank keeps its NCHW input
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 4))
    both = ComposedGuide([(guide, 1.0), (ClassGuide(plain, 1, scale=2.0), 0.5)])
    seen.clear()
    fs.FastGuide(both, "cpu", compile_guide=True)(x, t, t_host=480)
    assert seen == [True, False]
    # without compile_guide the merged experts stay NCHW (the eager guide: unmeasured in channels_last)
    eager = fs.FastGuide(guide, "cpu")
    eager(x, t, t_host=480)
    assert all(m.weight.is_contiguous() for m in eager._merged_models[(id(bank), 480 // bank.band)].modules()
               if isinstance(m, nn.Conv2d))

class _ConvDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + 0 * t.view(-1, 1, 1, 1)


@requires_cxx
def test_two_frozen_models_of_one_class_keep_their_own_weights():
    # dynamo caches per code object: a guard filter that drops module guards would run the second
    # model through the first one's frozen graph (seen with skip_guard_on_all_nn_modules_unsafe)
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [_ConvDenoiser().eval().requires_grad_(False) for _ in range(2)]
    sched = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        outs = [FastGuidedSampler(m, sched, compile_model=True, compile_freeze=True).step(x, 3)[0] for m in models]
    wants = [FastGuidedSampler(m, sched).step(x, 3)[0] for m in models]
    assert rel_err(wants[0], wants[1]) > 1e-2
    assert all(rel_err(o, w) < 1e-5 for o, w in zip(outs, wants))


@requires_cxx
@pytest.mark.parametrize("freeze", [False, True])
def test_compile_freeze_makes_the_weights_constants(freeze):
    # what compile_freeze documents: the frozen graph keeps the weights it was compiled with
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _ConvDenoiser().eval().requires_grad_(False)
    sched = Schedule.create("linear", 1000, "ddim5")
    fast = FastGuidedSampler(model, sched, compile_model=True, compile_freeze=freeze)
    eager = FastGuidedSampler(model, sched)
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        before = fast.step(x, 3)[0]
        assert rel_err(before, eager.step(x, 3)[0]) < 1e-5
        with torch.no_grad():
            model.conv.weight.mul_(-1)
        after = fast.step(x, 3)[0]
    changed = eager.step(x, 3)[0]
    with pytest.raises(ValueError, match="compile_model"):
        FastGuidedSampler(model, sched, compile_freeze=True)
    assert rel_err(changed, before) > 1e-2
    if freeze:
        assert torch.equal(after, before)
    else:
        assert rel_err(after, changed) < 1e-5


def test_cuda_graph_and_overlap_on_cpu_run_eagerly(setup):
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "6")
    ref = sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings(record=True) as rec:  # both at construction (cuda_graph warned at the first step)
        warnings.simplefilter("always")
        fast = FastGuidedSampler(model, sched, sampler="ddpm", guide=guide, cuda_graph=True, overlap_guide=True)
    said = [str(w.message) for w in rec if issubclass(w.category, FastSamplingWarning)]
    assert len(said) == 2 and all(w.filename == __file__ for w in rec), said
    assert re.match(r"overlap_guide=True needs a CUDA device .* runs on cpu", said[0]), said
    assert said[1] == ("cuda_graph=True: CUDA-graph capture needs a CUDA device, but the sampler runs on cpu: the "
                       "guided step runs eagerly"), said
    with warnings.catch_warnings():  # warned once only
        warnings.simplefilter("error", FastSamplingWarning)
        out = fast.sample(SHAPE, generator=torch.Generator().manual_seed(4))
        fast.step(out, 3)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL and not fast._graphs


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")
def test_cuda_device_without_gpu_says_so_in_one_line():
    """device='cuda' with no GPU raised torch's 'Found no NVIDIA driver on your system' from deep inside."""
    sched = Schedule.create("linear", 1000, "ddim5")
    for device in ("cuda", torch.device("cuda", 1)):
        with pytest.raises(RuntimeError, match=r"^device='cuda(:1)?': torch sees no CUDA device \(no GPU or driver "
                                               r"visible\); use device='cpu'$"):
            FastGuidedSampler(lambda x, t: torch.zeros_like(x), sched, device=device)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sample_warns_of_non_finite_samples_as_the_reference(sampler):
    # sample_loop warns when samples come out NaN; the fast path returned them without a word
    sched = Schedule.create("linear", 1000, "ddim5")
    nan_model = lambda x, t: torch.where(t.view(-1, 1, 1, 1) < 100, float("nan"), 0.1 * x)  # noqa: E731
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=r"FastGuidedSampler.sample: 4 of 4 samples hold NaN/Inf"):
        out = fast_sample_loop(nan_model, x_T, sched, sampler=sampler)
    assert torch.isnan(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fast_sample_loop(lambda x, t: 0.1 * x, x_T, sched, sampler=sampler)
    assert torch.isfinite(out).all()


def test_sample_from_an_x_T_requiring_grad_builds_no_graph(setup):
    # every fused step chained onto x_T's autograd graph (sample_loop runs under no_grad): the result required
    # grad and held all the steps' tensors
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out, traj = FastGuidedSampler(model, sched, guide=guide).sample(x_T, return_trajectory=True)
    assert not out.requires_grad and not traj.requires_grad
    assert rel_err(out, sample_loop(model, x_T, sched, guide=guide)) < TOL


def test_cudnn_benchmark_option_is_scoped(setup, monkeypatch):
    """cudnn_benchmark switches torch.backends.cudnn.benchmark on only inside a CUDA step (restored
    after, also when the step raises); on CPU it changes nothing."""
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    with pytest.warns(FastSamplingWarning, match="cudnn_benchmark=True needs a CUDA device .* on cpu: ignored"):
        fast = FastGuidedSampler(model, sched, guide=guide, cudnn_benchmark=True)  # it was silent
    plain = FastGuidedSampler(model, sched, guide=guide)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    before = torch.backends.cudnn.benchmark
    assert torch.equal(fast.step(x, 3)[0], plain.step(x, 3)[0])
    assert torch.backends.cudnn.benchmark == before
    from ppap_fast import fast_sampling as fs

    seen = []

    def boom(*a, **k):
        seen.append(torch.backends.cudnn.benchmark)
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(fast, "_run_graph_or_eager", boom)
    with fs._cudnn_benchmark(), pytest.raises(RuntimeError, match="boom"):
        fast._run_graph_or_eager(x, None, None, None, None)
    assert seen == [True] and torch.backends.cudnn.benchmark is False


def test_channels_last_and_autocast(setup):
    model, _, guide = setup
    model_cl = tiny_adm()
    model_cl.load_state_dict(model.state_dict())
    sched = Schedule.create("linear", 1000, "ddim5")
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator().manual_seed(1))
    out = fast_sample_loop(model_cl, SHAPE, sched, guide=guide, channels_last=True,
                           generator=torch.Generator().manual_seed(1))
    assert rel_err(out, ref) < TOL
    out16 = fast_sample_loop(model, SHAPE, sched, guide=guide, guide_autocast=torch.bfloat16,
                             generator=torch.Generator().manual_seed(1))
    # the guide moves these samples by ~5e-3 only: 3e-2 passed with no guidance at all under autocast
    unguided = sample_loop(model, SHAPE, sched, generator=torch.Generator().manual_seed(1))
    assert out16.dtype == torch.float32 and rel_err(out16, ref) < 0.1 * rel_err(unguided, ref)


def test_guide_options_without_a_guide_warn(setup):
    """guide_autocast, compile_guide and overlap_guide on an unguided sampler were ignored without a word."""
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    with pytest.warns(FastSamplingWarning, match="^guide_autocast, compile_guide configure the guide, but this "
                                                 "sampler has none \\(guide=None\\): ignored") as rec:
        FastGuidedSampler(model, sched, guide_autocast=torch.bfloat16, compile_guide=True)
    assert len(rec) == 1 and rec[0].filename == __file__
    with pytest.warns(FastSamplingWarning, match="^overlap_guide configures the guide"):
        FastGuidedSampler(model, sched, overlap_guide=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastGuidedSampler(model, sched, guide=guide, guide_autocast=torch.bfloat16)
        FastGuidedSampler(model, sched, compile_model=True, channels_last=True)


def test_a_fast_guide_given_to_the_sampler_warns_that_it_routes(setup):
    """A FastGuide as the sampler's guide is an opaque callable: it got no host timestep, so its bank routed per
    sample at every step (merge_experts=True had no effect) without a word; same result, slower."""
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for g in (fs.FastGuide(guide, "cpu"), ComposedGuide([(fs.FastGuide(guide, "cpu"), 1.0)])):
        with pytest.warns(FastSamplingWarning, match="FastGuide: .* routes per sample .*\\(.source\\)") as rec:
            wrapped = FastGuidedSampler(model, sched, guide=g)
        assert len(rec) == 1 and rec[0].filename == __file__
    calls = []
    h = guide.model.register_forward_hook(lambda *a: calls.append(1))  # the routed bank runs
    try:
        got, _ = wrapped.step(x, 2)
    finally:
        h.remove()
    assert calls and rel_err(got, FastGuidedSampler(model, sched, guide=guide).step(x, 2)[0]) < TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastGuidedSampler(model, sched, guide=fs.FastGuide(guide, "cpu", merge_experts=False))
        FastGuidedSampler(model, sched, guide=fs.FastGuide(guide, "cpu"), merge_experts=False)


def test_guide_options_reach_a_plain_callable_guide():
    """guide_autocast and channels_last were silently not applied to a plain callable guide (only to ppap_fast
    Guides); compile_guide, which cannot compile it, warns instead of doing nothing silently."""
    seen = []
    inner = linear_classifier_guide(torch.randn(3, 3 * 8 * 8) * 0.2, torch.tensor([0, 1, 2, 0]), 2.0)

    def guide(x, t):
        seen.append((torch.is_autocast_enabled("cpu"), x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous()))
        return inner(x, t)

    sched, x = Schedule.create("linear", 1000, "ddim5"), torch.randn(SHAPE)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for opts, want in ((dict(guide_autocast=torch.bfloat16), (True, False)), (dict(channels_last=True), (False, True)),
                       (dict(), (False, False))):
        seen.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            FastGuidedSampler(model, sched, guide=guide, **opts).step(x, 3)
        assert seen == [want], opts
    with pytest.warns(FastSamplingWarning, match="compile_guide: the guide .* plain callable"):
        FastGuidedSampler(model, sched, guide=guide, compile_guide=True)


def test_plain_callable_part_of_a_composed_guide_warns_once(setup):
    """compile_guide's warning about a plain callable part of a ComposedGuide came again for every band's merged
    variant (six warnings for one PPAP-5 run)."""
    model, _, bank_guide = setup
    inner = linear_classifier_guide(torch.randn(4, 3 * 8 * 8) * 0.1, torch.tensor([1, 1, 0, 0]), 1.0)
    composed = ComposedGuide([(bank_guide, 1.0), (inner, 2.0)])
    sched = Schedule.create("linear", 1000, "ddim5")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fast = FastGuidedSampler(model, sched, guide=composed, compile_guide=True, compile_kwargs={"backend": "eager"})
        fast.sample(SHAPE, generator=torch.Generator().manual_seed(1))
    assert len(fast._variants) == 5
    assert [str(w.message)[:40] for w in rec] == ["compile_guide: the guide (function) is a"]


def test_compile_guide_with_merging_off_warns(setup, monkeypatch):
    """compile_guide=True with merge_experts=False compiled nothing (a routed bank runs eagerly) without a word."""
    model, _, guide = setup
    monkeypatch.setattr(fs, "_compile", lambda fn, **kw: pytest.fail("a routed bank was compiled"))
    sched = Schedule.create("linear", 1000, "ddim5")
    with pytest.warns(FastSamplingWarning, match="compile_guide: with merge_experts=False .* runs eagerly") as rec:
        FastGuidedSampler(model, sched, guide=guide, compile_guide=True, merge_experts=False)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastGuidedSampler(model, sched, guide=guide, merge_experts=False)


def test_sample_callback_gets_tensors_the_next_graph_replay_does_not_overwrite(setup, monkeypatch):
    """With CUDA graphs a step's outputs are the graph's static buffers, overwritten by the next replay: callback(i,
    x, pred_x0) got those, so every pred_x0 a user kept became the last step's. Simulated on the CPU by a _run that
    returns the same two buffers every step, as a replay does."""
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    want = []
    FastGuidedSampler(model, sched, guide=guide).sample(SHAPE, generator=torch.Generator().manual_seed(3),
                                                        callback=lambda i, x, p: want.append((x, p)))
    fast = FastGuidedSampler(model, sched, guide=guide)
    bufs = (torch.empty(SHAPE), torch.empty(SHAPE))

    def replay(x, idx, key, runner, noise):
        s, p = fast._core(x, idx, runner, noise)
        bufs[0].copy_(s)
        bufs[1].copy_(p)
        return bufs

    monkeypatch.setattr(fast, "_graph_ok", lambda x: True)
    monkeypatch.setattr(fast, "_run", replay)
    got = []
    fast.sample(SHAPE, generator=torch.Generator().manual_seed(3), callback=lambda i, x, p: got.append((x, p)))
    assert len(got) == len(want) == 5
    for (gx, gp), (wx, wp) in zip(got, want):
        torch.testing.assert_close(gx, wx, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gp, wp, rtol=1e-5, atol=1e-6)


def test_merged_timestep_out_of_the_banks_range_names_it(setup):
    """A host timestep outside 0..T-1 failed on the merged path as "expert -1 out of range [0, 5)"."""
    _, _, guide = setup
    x = torch.randn(SHAPE)
    for t in (-5, 1000):
        with pytest.raises(ValueError, match=f"timestep {t} out of range \\[0, 1000\\) of the guide's ExpertBank"):
            fs.FastGuide(guide)(x, torch.full((SHAPE[0],), t), t)


def test_train_mode_bank_is_routed_not_merged(setup):
    model, bank, _ = setup
    b = tiny_bank().train()
    with pytest.warns(FastSamplingWarning, match="train mode"):
        fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=ClassGuide(b, 0))
    assert not fast.merge_experts


def test_bank_switched_to_train_mode_after_construction_is_routed(setup):
    """Merged experts equal the bank in eval mode only: a bank switched to train mode after the sampler was
    built is routed per sample (as the guide itself runs it: batch statistics), with a warning saying so;
    bank.eval() merges again. (The merged eval-mode experts were used, only the guide's warning given.)"""
    model, _, _ = setup
    bank = tiny_bank()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    sched = Schedule.create("linear", 1000, "ddim5")
    fast = FastGuidedSampler(model, sched, guide=guide)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    merged, _ = fast.step(x, 2)
    assert fast.merge_experts and fast.expert_key(2) is not None
    generation = fast.fast_guide.generation
    bank.train()
    fast.fast_guide.sync()  # a mode change alone makes CUDA graphs captured before it stale
    assert fast.fast_guide.generation == generation + 1
    with pytest.warns(RuntimeWarning, match="ClassGuide: a guide network is in train mode"):  # the guide's own
        want, _ = FastGuidedSampler(model, sched, guide=guide, merge_experts=False).step(x, 2)  # routed, train mode
    assert rel_err(want, merged) > 1e-3  # batch statistics differ from the running ones
    with pytest.warns(FastSamplingWarning, match="switched to train mode after this sampler was built.*bank.eval"):
        got, _ = fast.step(x, 2)
    assert not fast.merge_experts and torch.equal(got, want)
    bank.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        again, _ = fast.step(x, 2)
    # the train-mode steps moved the running statistics: re-merged, as the routed eval-mode bank
    routed, _ = FastGuidedSampler(model, sched, guide=guide, merge_experts=False).step(x, 2)
    assert fast.merge_experts and rel_err(again, routed) < TOL and rel_err(again, merged) > TOL


def test_bank_with_a_batchnorm_in_train_mode_is_routed_not_merged(setup):
    """bank.model.train() leaves bank.training False but its BatchNorms use batch statistics: the fast path merged
    the eval-mode experts anyway (1.9e-2 off the guide it was given, with the guide's own warning only)."""
    model, _, _ = setup
    bank = tiny_bank()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    sched = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    bank.model.train()
    assert not bank.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the guide's own train-mode warning
        want, _ = FastGuidedSampler(model, sched, guide=guide, merge_experts=False).step(x, 2)  # as the guide runs
        with pytest.warns(FastSamplingWarning, match="BatchNorm / Dropout in it\\) is in train mode"):
            fast = FastGuidedSampler(model, sched, guide=guide)
        got, _ = fast.step(x, 2)
    assert not fast.merge_experts and torch.equal(got, want)
    bank.eval()  # merged again
    merged, _ = fast.step(x, 2)
    routed, _ = FastGuidedSampler(model, sched, guide=guide, merge_experts=False).step(x, 2)
    assert fast.merge_experts and fast._variants and rel_err(merged, routed) < TOL and rel_err(merged, want) > 1e-3


class _CountingDenoiser(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *a, **kw):
        self.calls += 1
        return self.model(*a, **kw)


def test_guide_batch_mismatch_is_refused_before_the_denoiser_runs(setup):
    model, bank, guide = setup  # guide: a [4] class target
    sched = Schedule.create("linear", 1000, "ddim5")
    counted = _CountingDenoiser(model)
    composed = ComposedGuide([ClassGuide(bank, 1, scale=torch.tensor([1.0, 2.0, 3.0])), guide])
    weighted = ComposedGuide([(guide, torch.tensor([1.0, 2.0, 3.0, 4.0]))])
    for g, msg in ((guide, "target has 4 class labels for a batch of 2"),
                   (composed, "scale has 3 per-sample values for a batch of 2"),
                   (weighted, "weight has 4 per-sample values for a batch of 2")):
        with pytest.raises(ValueError, match=msg):
            sample_loop(counted, (2, 3, 8, 8), sched, guide=g)
        with pytest.raises(ValueError, match=msg):
            FastGuidedSampler(counted, sched, guide=g).sample((2, 3, 8, 8))
    assert counted.calls == 0
    FastGuidedSampler(counted, sched, guide=guide).sample(SHAPE)  # the right batch still samples
    assert counted.calls == 5


def test_dense_guide_target_batch_mismatch_is_refused_before_the_denoiser_runs(setup):
    """A dense guide's per-sample target maps [n, ...] for a batch of another size failed only after the first
    denoiser forward (the target / logits shape error); refused before it now. Shared maps still sample."""
    model = setup[0]
    sched = Schedule.create("linear", 1000, "ddim5")
    counted = _CountingDenoiser(model)
    seg_net, depth_net = nn.Conv2d(3, 4, 1).eval(), nn.Conv2d(3, 1, 1).eval()
    bad = ((SegmentationGuide(seg_net, torch.zeros(3, 8, 8, dtype=torch.long)), "SegmentationGuide: target (3, 8, 8)"),
           (DenseRegressionGuide(depth_net, torch.zeros(3, 1, 8, 8)), "DenseRegressionGuide: target (3, 1, 8, 8)"))
    for g, head in bad:
        msg = rf"^{re.escape(head)} holds 3 per-sample maps for a batch of 2: give one map per sample, or one shared"
        for guide in (g, ComposedGuide([g]), fs.FastGuide(g, "cpu")):
            with pytest.raises(ValueError, match=msg):
                sample_loop(counted, (2, 3, 8, 8), sched, guide=guide)
            with pytest.raises(ValueError, match=msg):
                FastGuidedSampler(counted, sched, guide=guide).sample((2, 3, 8, 8))
    assert counted.calls == 0
    good = [SegmentationGuide(seg_net, torch.zeros(*lead, 8, 8, dtype=torch.long)) for lead in ((2,), (1,), ())] + \
        [DenseRegressionGuide(depth_net, torch.zeros(*lead, 8, 8)) for lead in ((2, 1), (1, 1), (2,), (1,), ())]
    for g in good:
        out = FastGuidedSampler(counted, sched, guide=g).sample((2, 3, 8, 8))
        assert torch.isfinite(out).all()
    assert counted.calls == 5 * len(good)


def test_on_off_options_given_as_strings_are_refused(setup):
    """cuda_graph="false" (an option read from a config file or the environment) ran as True, and every other on/off
    option likewise; a compile_kwargs that is not a dict failed as "dictionary update sequence element #0 ..."."""
    import numpy as np

    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    names = ("merge_experts", "channels_last", "compile_guide", "compile_model", "compile_freeze", "cuda_graph",
             "overlap_guide", "fuse_norm_act", "cudnn_benchmark")
    for name in names:
        with pytest.raises(TypeError, match=f"{name} must be True or False, got 'false' \\(str\\)"):
            FastGuidedSampler(model, sched, guide=guide, **{name: "false"})
    with pytest.raises(TypeError, match="merge_experts must be True or False"):
        fs.FastGuide(guide, merge_experts="no")
    with pytest.raises(TypeError, match="compile_kwargs must be a dict .* got str"):
        FastGuidedSampler(model, sched, guide=guide, compile_kwargs="eager")
    with pytest.raises(TypeError, match="compile_kwargs must be a dict"):
        fs.FastGuide(guide, compile_guide=True, compile_kwargs=["backend", "eager"])
    fast = FastGuidedSampler(model, sched, guide=guide, merge_experts=np.bool_(False), channels_last=0,
                             compile_kwargs={"backend": "eager"})  # numpy bools and 0 / 1 still pass
    assert not fast.merge_experts and not fast.opts.channels_last


def test_nonfinite_and_bad_inputs(setup):
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    nan_guide = lambda x, t: torch.full_like(x, float("nan"))  # noqa: E731
    x = torch.randn(SHAPE)
    with pytest.raises(RuntimeError, match="NaN"):
        FastGuidedSampler(model, sched, guide=nan_guide).step(x, 2)
    out, _ = FastGuidedSampler(model, sched, guide=nan_guide, nonfinite_grad="zero").step(x, 2)
    assert rel_err(out, ddim_step(model, x, 2, sched).sample) < TOL
    with pytest.raises(ValueError, match="sampler"):
        FastGuidedSampler(model, sched, sampler="plms")
    with pytest.raises(ValueError, match="learned"):
        FastGuidedSampler(model, sched, sampler="ddpm", var_type="learned")
    with pytest.raises(ValueError, match="nonfinite_grad"):
        FastGuidedSampler(model, sched, nonfinite_grad="nope")
    with pytest.raises(ValueError, match="guide_autocast"):
        FastGuidedSampler(model, sched, guide_autocast=torch.float64)
    with pytest.raises(TypeError, match="guide"):
        FastGuidedSampler(model, sched, guide=3)
    fast = FastGuidedSampler(model, sched, guide=guide)
    with pytest.raises(ValueError, match="out of range"):
        fast.step(x, 5)
    with pytest.raises(ValueError, match="out of range"):
        fast.step(x, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match="integer"):
        fast.step(x, torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        fast.step(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise"):
        FastGuidedSampler(model, sched, eta=1.0).step(x, 1, noise=torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):  # inf: NaN samples, no error
        FastGuidedSampler(model, sched, eta=float("inf"))
    with pytest.raises(ValueError, match="merge_mode"):  # was accepted without a guide
        FastGuidedSampler(model, sched, merge_mode="swapp")
    with pytest.raises(ValueError, match="learned_range"):
        FastGuidedSampler(tiny_adm(learn_sigma=False), sched, sampler="ddpm", var_type="learned_range").step(x, 1)


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
cuda = requires_cuda


def _cuda_setup():
    torch.manual_seed(0)
    model, bank = tiny_adm().cuda(), tiny_bank().cuda()
    return model, bank, ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)


@pytest.mark.cuda
@cuda
def test_cuda_steps_do_not_sync(no_tf32):
    model, _, guide = _cuda_setup()
    sched = Schedule.create("linear", 1000, "ddim5")
    fast = FastGuidedSampler(model, sched, guide=guide, device="cuda")
    fast_p = FastGuidedSampler(model, Schedule.create("linear", 1000, "6"), sampler="ddpm", guide=guide,
                               device="cuda", nonfinite_grad="zero")
    x, noise = torch.randn(SHAPE, device="cuda"), torch.randn(SHAPE, device="cuda")
    idx = torch.tensor([4, 3, 1, 0], device="cuda")
    calls = [lambda: fast.step(x, 3), lambda: fast.step(x, idx), lambda: fast_p.step(x, 5, noise=noise),
             lambda: fast_p.step(x, idx, noise=noise)]
    assert_no_host_sync(calls)  # merged experts are built in the warm-up


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_cuda_graph_step_equals_reference(no_tf32, sampler):
    model, _, guide = _cuda_setup()
    sched = Schedule.create("linear", 1000, "ddim5" if sampler == "ddim" else "6").to("cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(7)  # noqa: E731
    ref = sample_loop(model, SHAPE, sched, sampler=sampler, guide=guide, generator=gen())
    fast = FastGuidedSampler(model, sched, sampler=sampler, guide=guide, cuda_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        out = fast.sample(SHAPE, generator=gen())
        again = fast.sample(SHAPE, generator=gen())  # replays the captured graphs
    assert len(fast._graphs) > 1 and len({g.graph.pool() for g in fast._graphs.values()}) == 1  # shared pool
    assert rel_err(out, ref) < 1e-4 and rel_err(again, ref) < 1e-4
    x = torch.randn(SHAPE, device="cuda")
    idx = torch.tensor([4, 3, 1, 0], device="cuda")
    noise = torch.randn(SHAPE, device="cuda")
    step = ddim_step if sampler == "ddim" else ddpm_step
    want = step(model, x, idx, sched, guide=guide, **({"noise": noise} if sampler == "ddpm" else {})).sample
    for _ in range(2):  # capture, then replay, of a mixed (routed) batch
        got, _ = fast.step(x, idx, noise=noise)
        assert rel_err(got, want) < 1e-4


@pytest.mark.cuda
@cuda
def test_cuda_graphs_follow_a_changed_guide(no_tf32):
    """Captured steps bake the guide's scale in: a changed scale drops them (new graphs, new scale)."""
    model, _, guide = _cuda_setup()
    sched = Schedule.create("linear", 1000, "ddim5").to("cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(7)  # noqa: E731
    fast = FastGuidedSampler(model, sched, guide=guide, cuda_graph=True)
    first = fast.sample(SHAPE, generator=gen())
    guide.scale = 9.0  # this test's own guide (_cuda_setup builds a fresh one)
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=gen())
    out = fast.sample(SHAPE, generator=gen())
    assert fast.fast_guide.generation == 1 and fast._graphs
    assert torch.isfinite(first).all() and rel_err(out, ref) < 1e-4 and rel_err(first, ref) > 1e-3


def _check_graphs_replay_a_target_changed_in_place(target_device):
    """A ClassGuide target on target_device, changed in place between two CUDA-graph samples: the captured steps are
    kept and their replays read the new targets."""
    model, bank, _ = _cuda_setup()
    buf = torch.tensor([0, 1, 2, 3], device=target_device)
    sched = Schedule.create("linear", 1000, "ddim5").to("cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(7)  # noqa: E731
    fast = FastGuidedSampler(model, sched, guide=ClassGuide(bank, buf, scale=3.0), cuda_graph=True)
    first = fast.sample(SHAPE, generator=gen())
    graphs = dict(fast._graphs)
    buf.copy_(torch.tensor([3, 2, 1, 0], device=target_device))
    out = fast.sample(SHAPE, generator=gen())
    want = ClassGuide(bank, torch.tensor([3, 2, 1, 0], device="cuda"), scale=3.0)
    ref = sample_loop(model, SHAPE, sched, guide=want, generator=gen())
    assert graphs and fast._graphs == graphs and fast.fast_guide.generation == 0
    assert torch.isfinite(first).all() and rel_err(out, ref) < 1e-4 and rel_err(first, ref) > 1e-3


@pytest.mark.cuda
@cuda
def test_cuda_graphs_replay_an_on_device_target_changed_in_place(no_tf32):
    """guided-sample's per-batch targets, copied into the guide's CUDA target in place: the captured steps are kept
    (they were dropped and recaptured for every batch) and their replays read the new targets."""
    _check_graphs_replay_a_target_changed_in_place("cuda")


@pytest.mark.cuda
@cuda
def test_cuda_graphs_replay_a_cpu_target_changed_in_place(no_tf32):
    """A CPU target under a CUDA sampler, changed in place: copied into the guide's CUDA copy (it was copied to a new
    tensor, and every captured step dropped and recaptured); the replays read the new targets."""
    _check_graphs_replay_a_target_changed_in_place("cpu")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_overlap_guide_equals_reference(no_tf32, graph):
    model, _, guide = _cuda_setup()
    sched = Schedule.create("linear", 1000, "6").to("cuda")
    ref = sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide,
                      generator=torch.Generator(device="cuda").manual_seed(3))
    out = fast_sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, overlap_guide=True, cuda_graph=graph,
                           generator=torch.Generator(device="cuda").manual_seed(3))
    assert rel_err(out, ref) < 1e-4


@pytest.mark.cuda
@cuda
def test_cuda_bf16_channels_last_graph(no_tf32):
    """The full fast configuration: bf16 guide, channels_last, cuDNN algorithm timing, CUDA graphs."""
    model, _, guide = _cuda_setup()
    sched = Schedule.create("linear", 1000, "ddim5").to("cuda")
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator(device="cuda").manual_seed(1))
    before = torch.backends.cudnn.benchmark
    out = fast_sample_loop(model, SHAPE, sched, guide=guide, guide_autocast=torch.bfloat16, channels_last=True,
                           cuda_graph=True, cudnn_benchmark=True, generator=torch.Generator(device="cuda").manual_seed(1))
    assert rel_err(out, ref) < 3e-2 and torch.backends.cudnn.benchmark == before


@pytest.mark.cuda
@cuda
def test_cuda_graph_swap_mode_one_graph_for_every_band(no_tf32):
    model, _, guide = _cuda_setup()
    sched = Schedule.create("linear", 1000, "ddim5").to("cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(2)  # noqa: E731
    ref = sample_loop(model, SHAPE, sched, guide=guide, generator=gen())
    fast = FastGuidedSampler(model, sched, guide=guide, cuda_graph=True, merge_mode="swap")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        out, again = fast.sample(SHAPE, generator=gen()), fast.sample(SHAPE, generator=gen())
    assert len(fast._graphs) == 1 and fast.fast_guide.swaps > 0
    assert rel_err(out, ref) < 1e-4 and rel_err(again, ref) < 1e-4


def test_fuse_norm_act_option(one_thread):
    sched = Schedule.create("linear", 1000, "ddim5")
    model = tiny_adm()
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    want = FastGuidedSampler(model, sched).sample(SHAPE, generator=gen())
    fused = FastGuidedSampler(model, sched, fuse_norm_act=True)
    assert all(b.fused_norm_act for b in model.modules() if type(b).__name__ == "ResBlock")
    assert rel_err(fused.sample(SHAPE, generator=gen()), want) < 1e-5
    model.fuse_norm_act(False)
    with pytest.warns(FastSamplingWarning, match="has no fuse_norm_act"):
        FastGuidedSampler(lambda x, t: torch.cat([x, x], 1), sched, fuse_norm_act=True)
    with pytest.warns(FastSamplingWarning, match="inductor fuses"):
        FastGuidedSampler(model, sched, fuse_norm_act=True, compile_model=True)
    assert not any(b.fused_norm_act for b in model.modules() if type(b).__name__ == "ResBlock")


def test_applied_options_say_what_runs(setup, monkeypatch):
    """applied_options: what the sampler runs after its fallbacks, not what was asked (ppap-fast guided-sample's
    stats showed cuda_graph True on a CPU run and fuse_norm_act True with compile_model)."""
    model, bank, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    cpu = not torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FastSamplingWarning)
        asked = FastGuidedSampler(lambda x, t: torch.cat([x, x], 1), sched, guide=guide, cuda_graph=True,
                                  fuse_norm_act=True, cudnn_benchmark=True, overlap_guide=True,
                                  guide_autocast=torch.bfloat16)
        compiled = FastGuidedSampler(tiny_adm(), sched, fuse_norm_act=True, compile_model=True,
                                     compile_freeze=True)
    got = asked.applied_options
    assert got["fuse_norm_act"] is False and got["merge_experts"] is True and got["guide_autocast"] is torch.bfloat16
    assert got["compile_model"] is False and got["compile_guide"] is False and got["channels_last"] is False
    if cpu:  # CUDA-only options
        assert got["cuda_graph"] is False and got["cudnn_benchmark"] is False and got["overlap_guide"] is False
    c = compiled.applied_options
    assert c["fuse_norm_act"] is False and c["guide_autocast"] is None  # skipped with compile_model; no guide
    assert c["compile_model"] is True and c["compile_freeze"] is True

    def failing(fn, **kw):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fs, "_compile", failing)
    with pytest.warns(FastSamplingWarning, match="torch.compile of the denoiser failed"):
        compiled.step(torch.randn(SHAPE), 4)
    c = compiled.applied_options
    assert c["compile_model"] is False and c["compile_freeze"] is False  # the eager denoiser runs
    fused = FastGuidedSampler(tiny_adm(), sched, fuse_norm_act=True)
    assert fused.applied_options["fuse_norm_act"] is True


def test_recommended_options_follow_the_h100_measurements():
    """CUDA: ADM fused in channels_last; a model without fuse_norm_act stays NCHW (eager unfused
    channels_last was slower); compiled: channels_last, no fusion; CPU: nothing, and freezing when
    compiled. Overrides win."""
    from ppap_fast.fast_sampling import recommended_options

    adm, plain = tiny_adm(), (lambda x, t: x)
    assert recommended_options(adm, "cuda") == {"compile_model": False, "fuse_norm_act": True, "channels_last": True,
                                                "cudnn_benchmark": True, "compile_freeze": False}
    assert recommended_options(plain, "cuda") == {"compile_model": False, "fuse_norm_act": False, "channels_last": False,
                                                  "cudnn_benchmark": True, "compile_freeze": False}
    assert recommended_options(adm, "cuda", compile_model=True)["compile_freeze"] is False
    assert recommended_options(adm, "cpu", compile_model=True) == {
        "compile_model": True, "fuse_norm_act": False, "channels_last": False, "cudnn_benchmark": False,
        "compile_freeze": True}
    FastGuidedSampler(adm, Schedule.create("linear", 1000, respacing="ddim5"),
                      **recommended_options(adm, "cpu", compile_model=True))  # usable as **kwargs alone
    assert recommended_options(adm, torch.device("cuda", 0), compile_model=True)["fuse_norm_act"] is False
    assert recommended_options(adm, "cuda", compile_model=True)["channels_last"] is True
    assert recommended_options(adm, "cuda", fuse_norm_act=False)["channels_last"] is False
    assert not any(recommended_options(adm, "cpu").values())
    assert recommended_options(adm, "cpu", fuse_norm_act=True)["fuse_norm_act"] is True


def test_fast_path_follows_changes_of_the_guide(setup):
    """A guide changed after the sampler's first use (scale, a ComposedGuide weight, new expert weights
    loaded in place) is what the next steps use, as in the reference loop; unchanged guides do not
    count as changed (no re-merge, no new CUDA graphs)."""
    model = setup[0]
    sched = Schedule.create("linear", 1000, "ddim5")
    bank = tiny_bank()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    composed = ComposedGuide([(guide, 1.0)])
    fast = FastGuidedSampler(model, sched, guide=composed)
    run = lambda: fast.sample(SHAPE, generator=torch.Generator().manual_seed(2))  # noqa: E731
    ref = lambda: sample_loop(model, SHAPE, sched, sampler="ddim", guide=composed,  # noqa: E731
                              generator=torch.Generator().manual_seed(2))
    first = run()
    torch.testing.assert_close(first, ref(), rtol=1e-4, atol=1e-5)
    gen = fast.fast_guide.generation
    torch.testing.assert_close(run(), first, rtol=0, atol=0)
    assert fast.fast_guide.generation == gen  # nothing changed: nothing re-merged
    guide.scale = 12.0
    changed = run()
    assert (changed - first).abs().max() > 1e-3
    torch.testing.assert_close(changed, ref(), rtol=1e-4, atol=1e-5)
    composed.guides = [(guide, 0.0)]  # weight 0: unguided
    torch.testing.assert_close(run(), ref(), rtol=1e-4, atol=1e-5)
    composed.guides = [(guide, 1.0)]
    with torch.no_grad():  # new experts loaded in place (load_experts_into copies into the bank)
        for name, t in bank.per_expert_state_dict().items():
            if not name.endswith(("num_batches_tracked", "running_var")):
                t.add_(torch.randn_like(t.float()).to(t.dtype) * 0.1)
    reloaded = run()
    assert (reloaded - changed).abs().max() > 1e-4
    torch.testing.assert_close(reloaded, ref(), rtol=1e-4, atol=1e-5)
    # the scale, then the weights: the weight-0 run ran no guide (nothing synced), and its weight was back at 1.0
    assert fast.fast_guide.generation == gen + 2


def test_an_on_device_target_changed_in_place_keeps_the_captured_steps(setup):
    """guided-sample copies each batch's class ids into the guide's on-device target in place ("captured graphs see
    it"), but that bumped the FastGuide's generation, which drops every captured step: each batch recaptured them
    all (warm-up + capture per band). The steps read the tensor where it lies, so the result follows the new
    targets without it; a target off the sampler's device is still copied again when changed in place."""
    model, bank, _ = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    buf = torch.tensor([0, 1, 2, 3])
    guide = ClassGuide(bank, buf, scale=3.0)
    fast = FastGuidedSampler(model, sched, guide=guide)
    run = lambda: fast.sample(SHAPE, generator=torch.Generator().manual_seed(1))  # noqa: E731
    first = run()
    buf.copy_(torch.tensor([3, 2, 1, 0]))
    changed = run()
    ref = sample_loop(model, SHAPE, sched, guide=ClassGuide(bank, torch.tensor([3, 2, 1, 0]), scale=3.0),
                      generator=torch.Generator().manual_seed(1))
    assert fast.fast_guide.generation == 0
    assert torch.isfinite(first).all() and rel_err(changed, ref) < TOL and rel_err(first, ref) > 1e-3
    before = fs._guide_state(guide, torch.device("cuda"))  # off the device: its version still counts
    buf.add_(0)
    assert fs._guide_state(guide, torch.device("cuda")) != before
    assert fs._guide_state(guide, torch.device("cpu")) == fs._guide_state(guide, torch.device("cpu"))


def test_a_composed_guides_parts_get_their_targets_on_the_device():
    """A FastGuide on another device moved a plain guide's class target / target map there once, but not those of a
    ComposedGuide's parts (nested too): they were copied to the device at every step. "meta" stands in for a GPU;
    a part's target changed in place is copied again (into its device copy); the user's guide keeps its own."""
    buf = torch.tensor([0, 1, 2, 3])
    cg = ClassGuide(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), buf, 1.0)
    dg = DenseRegressionGuide(nn.Conv2d(3, 1, 1), torch.randn(4, 1, 8, 8))
    comp = ComposedGuide([cg, (ComposedGuide([(dg, 2.0)]), -1.0)])
    fast = fs.FastGuide(comp, "meta")
    part, inner = fast.guide.guides[0][0], fast.guide.guides[1][0].guides[0][0]
    assert part.target.target.device.type == "meta" and inner.target_map.device.type == "meta"
    assert [w for _, w in fast.guide.guides] == [1.0, -1.0] and fast.guide.guides[1][0].guides[0][1] == 2.0
    assert cg.target.target is buf and dg.target_map.device.type == "cpu" and comp.guides[0][0] is cg
    old = part.target.target
    buf.add_(0)
    fast.sync()
    assert fast.guide.guides[0][0].target.target is old and part.target.target.device.type == "meta"


@pytest.mark.parametrize("device_view", [False, True])
@pytest.mark.parametrize("merge_mode", ["cache", "swap"])
def test_fast_path_follows_a_guide_given_another_bank(setup, monkeypatch, device_view, merge_mode):
    """guide.model = another bank after the first steps: the merged path kept the old bank's experts silently
    (and, where the sampler holds an on-device copy of the guide, a CUDA device with a CPU target, the routed
    path kept the old bank too: simulated here by forcing that copy)."""
    import copy

    model = setup[0]
    if device_view:
        monkeypatch.setattr(fs, "_on_device", lambda g, device, seen=None: copy.copy(g))
    sched = Schedule.create("linear", 1000, "ddim5")
    guide = ClassGuide(tiny_bank(), torch.tensor([0, 1, 2, 3]), scale=3.0)
    fast = FastGuidedSampler(model, sched, guide=guide, merge_mode=merge_mode)
    run = lambda: fast.sample(SHAPE, generator=torch.Generator().manual_seed(2))  # noqa: E731
    first = run()
    torch.manual_seed(7)
    guide.model = tiny_bank()
    want = sample_loop(model, SHAPE, sched, guide=guide, generator=torch.Generator().manual_seed(2))
    assert (want - first).abs().max() > 1e-3
    torch.testing.assert_close(run(), want, rtol=1e-4, atol=1e-5)
    x = torch.randn(SHAPE)
    t = torch.tensor([900, 500, 100, 10])
    torch.testing.assert_close(fast.fast_guide(x, t), guide(x, t), rtol=1e-5, atol=1e-6)  # routed per sample


def test_guide_given_a_bank_of_another_T_is_refused(setup):
    """guide.model = a bank of another T after the first steps: refused as at construction (a T=2000 bank on a
    T=1000 schedule ran silently on its first experts only), and still refused at the next call."""
    sched = Schedule.create("linear", 1000, "ddim5")
    guide = ClassGuide(tiny_bank(), torch.tensor([0, 1, 2, 3]), scale=3.0)
    fast = FastGuidedSampler(setup[0], sched, guide=guide)
    fast.sample(SHAPE, generator=torch.Generator().manual_seed(2))
    guide.model = tiny_bank(num_timesteps=2000)
    for _ in range(2):
        with pytest.raises(ValueError, match="T=2000"):
            fast.sample(SHAPE, generator=torch.Generator().manual_seed(2))


def test_guidance_under_inference_mode_says_why(setup):
    model, _, guide = setup
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=guide)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        fast.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="torch.no_grad"):
        sample_loop(model, SHAPE, Schedule.create("linear", 1000, "ddim5"), guide=guide)


def test_targets_made_under_inference_mode(setup):
    """Targets built under torch.inference_mode (no version counter, not savable for backward) guide the
    reference loop and the fast path alike, the fast one equal to the reference."""
    from ppap_fast.guidance import DenseRegressionGuide

    model = setup[0]
    sched = Schedule.create("linear", 1000, "ddim5")
    with torch.inference_mode():
        labels, depth = torch.tensor([0, 1, 2, 3]), torch.rand(1, 8, 8)
    dense_net = nn.Sequential(nn.Conv2d(3, 1, 3, padding=1))
    for guide in (ClassGuide(tiny_bank(), labels, scale=3.0), DenseRegressionGuide(dense_net, depth, scale=2.0),
                  ComposedGuide([(ClassGuide(tiny_bank(), labels, scale=3.0), 1.0)])):
        ref = sample_loop(model, SHAPE, sched, sampler="ddim", guide=guide, generator=torch.Generator().manual_seed(3))
        fast = FastGuidedSampler(model, sched, guide=guide)
        out = fast.sample(SHAPE, generator=torch.Generator().manual_seed(3))
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        gen = fast.fast_guide.generation
        fast.sample(SHAPE, generator=torch.Generator().manual_seed(3))
        assert fast.fast_guide.generation == gen


def test_model_autocast_runs_the_denoiser_in_half_precision(setup):
    """model_autocast=bf16: the denoiser's forward under bf16 autocast (the output back in x's dtype): the
    reference loop with an autocast wrapper of the denoiser, not the float32 samples; other dtypes refused."""
    model, _, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731

    def bf16_denoiser(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t).float()

    want = sample_loop(bf16_denoiser, SHAPE, sched, sampler="ddim", guide=guide, generator=gen())
    fp32 = sample_loop(model, SHAPE, sched, sampler="ddim", guide=guide, generator=gen())
    got = FastGuidedSampler(model, sched, guide=guide, model_autocast=torch.bfloat16).sample(SHAPE, generator=gen())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert rel_err(got, want) < TOL
    assert rel_err(got, fp32) > 10 * rel_err(got, want)
    with pytest.raises(ValueError, match="model_autocast must be None"):
        FastGuidedSampler(model, sched, model_autocast=torch.float64)


def test_train_mode_guide_warns_once():
    b = tiny_bank().train()
    g = ClassGuide(b, 0, scale=1.0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with pytest.warns(RuntimeWarning, match="train mode"):
        g(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        g(x, t)  # once
        ClassGuide(b.eval(), 0, scale=1.0)(x, t)


def test_fast_composed_nonfinite_policy_applies_over_default_sub_guides():
    class Bad(nn.Module):  # sample 0: NaN logits, sample 1: fine
        def forward(self, x):
            return x.flatten(1)[:, :4] * torch.tensor([[float("nan")], [1.0]])

    cg = ComposedGuide([ClassGuide(Bad(), 1), (ClassGuide(Bad(), 2), 0.5)], nonfinite="zero")
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([10, 10])
    got = fs.FastGuide(cg, None).runner(None)(x, t)
    torch.testing.assert_close(got, cg(x, t))
    assert not got[0].any() and got[1].abs().sum() > 0
    nested = ComposedGuide([ComposedGuide([ClassGuide(Bad(), 1)]), (ClassGuide(Bad(), 2), 0.5)], nonfinite="zero")
    torch.testing.assert_close(fs.FastGuide(nested, None).runner(None)(x, t), got)  # the inner one raised


def test_fast_guide_target_override_matches_reference(setup):
    """FastGuide(x, t, target=y) (what as_cond_fn passes y as), merged and routed, ComposedGuide included."""
    _, bank, guide = setup
    other = ClassGuide(bank, torch.tensor([3, 2, 1, 0]), scale=0.5)
    comp = ComposedGuide([(guide, 1.0), (ComposedGuide([other]), -2.0)])
    x, y = torch.randn(SHAPE), torch.tensor([2, 2, 0, 1])
    t = torch.full((SHAPE[0],), 420)
    want = ClassGuide(bank, y, scale=3.0)(x, t) - 2.0 * ClassGuide(bank, y, scale=0.5)(x, t)
    fast = fs.FastGuide(comp, None)
    for t_host in (420, None):  # merged expert, routed bank
        assert rel_err(fast(x, t, t_host=t_host, target=y), want) < TOL
    assert rel_err(fast(x, t, t_host=420), comp(x, t)) < TOL and rel_err(comp(x, t), want) > 1e-3


def test_schedule_beyond_the_banks_timesteps_is_refused_at_construction(setup):
    # the steps switch the bank's range checks off: an original t past its bands must fail up front
    model, bank, guide = setup
    with pytest.raises(ValueError, match="splits T=1000 into its experts' bands"):
        FastGuidedSampler(model, Schedule.create("linear", 2000, "ddim4"), guide=guide)
    FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim4"), guide=guide)  # t up to 999: fine


def test_ddpm_fixed_small_last_step_is_unguided_as_reference(setup):
    # the posterior variance scaling the grad is 0 at index 0 (only its log is clipped, for the noise);
    # a 10-step cosine schedule, where the clipped value (posterior_variance[1]) is large
    model = setup[0]
    guide = ClassGuide(tiny_bank(num_timesteps=10), torch.tensor([0, 1, 2, 3]), scale=30.0)  # the schedule's T
    sched = Schedule.create("cosine", 10, "3")
    ref = sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, var_type="fixed_small",
                      generator=torch.Generator().manual_seed(3))
    out = fast_sample_loop(model, SHAPE, sched, sampler="ddpm", guide=guide, var_type="fixed_small",
                           generator=torch.Generator().manual_seed(3))
    assert rel_err(out, ref) < TOL


def test_graphs_dropped_for_a_changed_guide_take_their_pool_with_them(monkeypatch):
    """A changed guide drops the captured steps and their shared memory pool: the next capture gets a new pool
    (capturing into the pool of graphs all gone tripped PyTorch's allocator on an H100). Capture faked on CPU."""
    model, bank = tiny_adm(), tiny_bank()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=guide)
    pools = []

    def fake_capture(x, idx, runner, noise):
        if fast._graph_pool is None:
            fast._graph_pool = object()
        pools.append(fast._graph_pool)
        g = fs._Graph()
        g.x, g.idx, g.noise, g.out = x.clone(), idx.clone(), None, x.clone()
        g.graph = type("FakeGraph", (), {"replay": lambda self: None})()
        return g

    monkeypatch.setattr(fast, "_capture", fake_capture)
    x, idx = torch.randn(SHAPE), torch.tensor([3, 3, 3, 3])
    fast._run_graph(x, idx, "k", None, None)
    fast._run_graph(x, idx, "k", None, None)  # replayed: no new capture
    assert len(pools) == 1
    fast._graph_generation = -1  # as after the guide changed
    fast._run_graph(x, idx, "k", None, None)
    assert len(pools) == 2 and pools[1] is not pools[0]


def test_bank_of_another_T_than_the_schedule_is_refused(setup):
    # a T=500 schedule with a T=1000 bank ran silently, every step routed to experts 0-2 of 5
    model, bank, guide = setup
    for s in (Schedule.create("linear", 500, "ddim5"), Schedule.create("linear", 2000, "ddim5")):
        with pytest.raises(ValueError, match="T=1000 into its experts' bands"):
            FastGuidedSampler(model, s, guide=guide)
        with pytest.raises(ValueError, match="T=1000 into its experts' bands"):
            sample_loop(model, (2, 3, 8, 8), s, guide=guide)
        with pytest.raises(ValueError, match="T=1000 into its experts' bands"):  # a FastGuide was not checked
            FastGuidedSampler(model, s, guide=ComposedGuide([fs.FastGuide(guide)]))
        x0hat = X0HatGuide(bank.model, model, Schedule.create("linear", 1000), 1)  # x0-hat took the wrong abar
        for g in (x0hat, ComposedGuide([x0hat]), fs.FastGuide(x0hat)):
            with pytest.raises(ValueError, match="X0HatGuide's alphas_cumprod has 1000"):
                FastGuidedSampler(model, s, guide=g)
            with pytest.raises(ValueError, match="X0HatGuide's alphas_cumprod has 1000"):
                sample_loop(model, (2, 3, 8, 8), s, guide=g)


def test_fast_guide_refuses_a_t_host_that_is_not_t(setup):
    """t_host picks the merged expert: a wrong one silently guided with another band's expert."""
    _, _, guide = setup
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 300)
    fg = fs.FastGuide(guide, "cpu")
    right = fg(x, t, t_host=300)
    assert torch.isfinite(right).all()
    with pytest.raises(ValueError, match=r"t_host=700 but t holds \[300\]"):
        fg(x, t, t_host=700)
    assert torch.equal(fg(x, t), right) or (fg(x, t) - right).abs().max() < 1e-5  # routed by t: the same expert


def test_fast_guide_refuses_an_int_t_with_another_t_host_on_any_device(setup):
    """An int t is known on the host: a different t_host is refused without looking at x's device (x off the
    CPU, here 'meta', skipped the check: on a GPU t_host's expert guided every sample)."""
    _, _, guide = setup
    for x in (torch.randn(SHAPE), torch.empty(SHAPE, device="meta")):
        with pytest.raises(ValueError, match=r"t_host=700 but t holds \[300\]"):
            fs.FastGuide(guide, "cpu")(x, 300, t_host=700)


def test_fast_guide_with_an_int_t_runs_the_merged_expert(setup):
    """FastGuide(x, 300): the timestep is known on the host, so the band's merged expert runs (it routed
    per sample through the bank), with the routed gradient."""
    import numpy as np

    _, bank, guide = setup
    x = torch.randn(SHAPE)
    routed = fs.FastGuide(guide, "cpu")(x, torch.full((SHAPE[0],), 300))
    for t in (300, np.int64(300)):
        fg = fs.FastGuide(guide, "cpu")
        got = fg(x, t)
        assert list(fg._variants) == [(300 // bank.band,)]  # merged, no routed call
        assert torch.isfinite(got).all() and rel_err(got, routed) < TOL
        assert torch.equal(got, fg(x, torch.full((SHAPE[0],), 300), t_host=300))


def test_step_and_bank_guide_take_numpy_integers(setup):
    """ClassGuide(bank, 3)(x, np.int64(500)) and step(x, np.int64(i)) were refused or routed where an int
    merges; numpy floats still refused."""
    import numpy as np

    model, bank, guide = setup
    x = torch.randn(SHAPE)
    g = ClassGuide(bank, 3)
    assert torch.equal(g(x, np.int64(500)), g(x, 500))
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=guide)
    want, _ = fast.step(x, 2)
    got, _ = fast.step(x, np.int64(2))
    assert torch.equal(got, want) and list(fast._variants) == [fast.expert_key(2)]  # merged, as an int
    assert torch.equal(fast.fast_guide(x, torch.full((4,), 500), t_host=np.int64(500)),
                       fast.fast_guide(x, torch.full((4,), 500), t_host=500))
    with pytest.raises(ValueError, match="index must be an integer tensor"):
        fast.step(x, np.float64(2))


@pytest.mark.parametrize("rows", [1, 2])
def test_model_kwargs_of_another_batch_size_named(rows):
    """A model_kwargs tensor of another batch size failed inside the model (2 rows for 4 samples) or broadcast
    silently (1 row: every sample got y[0]); now refused naming the kwarg. A 0-dim tensor is left alone."""

    class Cond(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = nn.Embedding(4, 3), nn.Conv2d(3, 3, 1)

        def forward(self, x, t, y=None, w=None):
            return self.conv(x) * w + self.emb(y)[:, :, None, None]

    sched = Schedule.create("linear", 1000, "ddim3")
    bad = FastGuidedSampler(Cond(), sched, model_kwargs={"y": torch.arange(rows), "w": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] has batch size %d" % rows):
        bad.sample(SHAPE, generator=torch.Generator().manual_seed(0))
    ok = FastGuidedSampler(Cond(), sched, model_kwargs={"y": torch.arange(4), "w": torch.tensor(1.0)})
    assert torch.isfinite(ok.sample(SHAPE, generator=torch.Generator().manual_seed(0))).all()
    from ppap_fast.sampling import sample_loop  # the reference loop broadcast 1 row silently, too

    with pytest.raises(ValueError, match=r"model_kwargs\['y'\] has batch size %d" % rows):
        sample_loop(Cond(), SHAPE, sched, model_kwargs={"y": torch.arange(rows), "w": torch.tensor(1.0)})
    assert torch.isfinite(sample_loop(Cond(), SHAPE, sched, model_kwargs={"y": torch.arange(4),
                                                                          "w": torch.tensor(1.0)})).all()


def test_compiled_guide_refuses_a_network_that_detaches_its_input(setup):
    """compile_guide's torch.func.grad path gave all-zero guidance for a guide network detaching its input (the eager
    path raised ValueError); it raises the same one line now."""
    model = setup[0]

    class Detaching(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 4)

        def forward(self, z):
            return self.fc(z.detach().flatten(1))

    sched = Schedule.create("linear", 1000, "ddim5")
    x = torch.randn(SHAPE)
    torch._dynamo.reset()
    for net in (Detaching().eval(), Detaching().eval().requires_grad_(False)):
        fast = FastGuidedSampler(model, sched, guide=ClassGuide(net, 1, scale=3.0), compile_guide=True,
                                 compile_kwargs={"backend": "eager"})
        with pytest.raises(ValueError, match=r"^ClassGuide: the guidance objective does not depend on x_t through "
                                             r"autograd .*keep the path from its input to its output differentiable$"):
            fast.step(x, 3)
    torch._dynamo.reset()


def test_compiled_guide_takes_a_per_call_target_without_a_graph_break():
    """A per-call target (as_cond_fn's y, the pipeline's class_labels) under compile_guide had its range read inside
    the compiled guide (int(target.min())): a graph break, the guide's gradient run outside the graph while
    applied_options said compiled. It is checked on the host before the call now (once per tensor while unchanged);
    out-of-range labels still raise the guide's error."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounter()
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()  # no num_classes: unknown until it has run
    fast = fs.FastGuide(ClassGuide(clf, 0, scale=2.0), "cpu", compile_guide=True, compile_kwargs={"backend": cnt})
    x, t, y = torch.randn(SHAPE), torch.full((SHAPE[0],), 300), torch.tensor([3, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastSamplingWarning)
        for labels in (y, y, torch.tensor([1, 1, 0, 2])):  # the first runs eagerly (class count unknown)
            assert rel_err(fast(x, t, target=labels), ClassGuide(clf, labels, scale=2.0)(x, t)) < TOL
        assert cnt.frame_count == 1 and not counters["graph_break"]
        with pytest.raises(ValueError, match="target class 7 is out of range"):
            fast(x, t, target=torch.tensor([7, 0, 0, 0]))
        y[0] = 4  # in place: checked again
        with pytest.raises(ValueError, match="target class 4 is out of range"):
            fast(x, t, target=y)
    assert fast._routed._compile_ok and not fast.opts.state and cnt.frame_count == 1
    torch._dynamo.reset()


def test_an_off_device_target_changed_in_place_is_copied_into_its_device_copy():
    """A CPU target under a sampler on another device, changed in place (a new batch's labels), was copied to a new
    device tensor and counted as a changed guide: every captured CUDA graph dropped and recaptured. It is copied into
    the device copy the captured steps read now ("meta" stands in for a GPU); a target whose shape changed, or any
    other change, still counts."""
    buf, scale = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    dmap = torch.randn(4, 1, 8, 8)
    cg = ClassGuide(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), buf, scale)
    dg = DenseRegressionGuide(nn.Conv2d(3, 1, 1), dmap)
    fast = fs.FastGuide(ComposedGuide([cg, dg]), "meta")
    part, dpart = fast.guide.guides[0][0], fast.guide.guides[1][0]
    on_device = part.target.target, dpart.target_map
    buf.copy_(torch.tensor([3, 2, 1, 0]))
    dmap.mul_(2)
    fast.sync()
    assert part.target.target is on_device[0] and dpart.target_map is on_device[1] and fast.generation == 0
    assert on_device[0].device.type == "meta" and cg.target.target is buf
    scale.mul_(2)  # another tensor changed in place: a changed guide
    fast.sync()
    assert fast.generation == 1 and part.scale is scale
    buf.resize_(2)  # a new shape: a new device copy
    fast.sync()
    assert part.target.target is not on_device[0] and part.target.target.shape == (2,) and fast.generation == 2
    fast.sync()
    assert fast.generation == 2


def test_a_part_added_to_or_replaced_in_a_composed_guide_is_followed(setup):
    """The fast path paired its sub-runners with the ComposedGuide's parts by zip: a part appended to the user's list
    after the FastGuide was built was left out, a replaced one kept running (routed: 0.27 off); a merged view took a
    replaced plain part's target and scale onto the old part, the user's object (0.66 off). The runners are built
    anew now, the new parts' targets moved to the FastGuide's device once (they were copied at every step)."""
    model, bank, _ = setup
    clf, clf2 = (nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval() for _ in range(2))
    first = ClassGuide(clf, torch.tensor([0, 1, 2, 3]), scale=2.0)
    x, t = torch.randn(SHAPE), torch.full((SHAPE[0],), 300)
    for bank_part, t_host in ((False, None), (True, 300)):  # routed, merged
        comp = ComposedGuide([ClassGuide(bank, 1, scale=3.0) if bank_part else first])
        fast = fs.FastGuide(comp, "cpu")
        assert rel_err(fast(x, t, t_host=t_host), comp(x, t)) < TOL
        comp.guides.append((ClassGuide(clf2, 1, scale=3.0), 1.0))
        assert rel_err(fast(x, t, t_host=t_host), comp(x, t)) < TOL
        old = comp.guides[1][0]
        comp.guides[1] = (ClassGuide(clf, 2, scale=5.0), -1.0)
        assert rel_err(fast(x, t, t_host=t_host), comp(x, t)) < TOL
        assert old.scale == 3.0 and old.target.target == 1 and old.model is clf2
    # "meta" stands in for a GPU: built with no device copy (an int target) or with one (a tensor target)
    for old_target in (1, torch.tensor([0, 1, 2, 3])):
        comp = ComposedGuide([ClassGuide(clf, old_target, 1.0)])
        fast = fs.FastGuide(comp, "meta")
        for step in range(2):  # appended, then replaced: followed again
            new = ClassGuide(clf2, torch.tensor([3, 2, 1, 0]), scale=2.0)
            if step:
                comp.guides[1] = (new, -1.0)
            else:
                comp.guides.append((new, 1.0))
            gen = fast.generation
            fast.sync()
            part = fast.guide.guides[1][0]
            assert fast.generation == gen + 1 and part is not new and part.model is clf2 and part.scale == 2.0
            assert part.target.target.device.type == "meta" and new.target.target.device.type == "cpu"
            if isinstance(old_target, torch.Tensor):  # the kept part's target: on the device still
                assert fast.guide.guides[0][0].target.target.device.type == "meta"
            assert [w for _, w in fast.guide.guides] == [1.0, -1.0 if step else 1.0]
            assert fast._routed.guide is fast.guide and comp.guides[1][0] is new
            on_device = part.target.target
            new.target.target.copy_(torch.tensor([0, 0, 1, 1]))  # in place: into the same device copy
            fast.sync()
            assert fast.guide.guides[1][0].target.target is on_device and fast.generation == gen + 1


def test_a_composed_guides_per_sample_weight_replaced_is_followed(setup):
    """A ComposedGuide weight given per sample (a [B] tensor) and then replaced (by another tensor or a float) made
    every later step raise "Boolean value of Tensor with more than one value is ambiguous" (the change check compared
    the weights by value); an in-place change is read where the weight lies, as before."""
    model, bank, _ = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    part = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    other = ClassGuide(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval(), 1, scale=2.0)
    composed = ComposedGuide([(part, torch.tensor([1.0, 0.5, 2.0, 0.0])), (other, 1.0)])
    fast = FastGuidedSampler(model, sched, guide=composed)
    x = torch.randn(SHAPE)
    outs = []
    for weights in ((torch.tensor([0.0, 1.0, 1.0, 3.0]), 1.0), (2.0, torch.tensor([1.0, 0.0, -1.0, 2.0])),
                    (2.0, 1.0)):
        composed.guides = [(part, weights[0]), (other, weights[1])]
        out, _ = fast.step(x, 3)
        ref = ddim_step(model, x, 3, sched, guide=composed).sample
        assert torch.isfinite(out).all() and rel_err(out, ref) < TOL
        outs.append(out)
    assert rel_err(outs[0], outs[1]) > 1e-3 and rel_err(outs[1], outs[2]) > 1e-3  # the weights reached the step
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    composed.guides = [(part, w), (other, 1.0)]
    fast.step(x, 3)
    gen = fast.fast_guide.generation
    w.mul_(-2.0)
    out, _ = fast.step(x, 3)
    assert rel_err(out, ddim_step(model, x, 3, sched, guide=composed).sample) < TOL
    assert fast.fast_guide.generation == gen  # on the sampler's device: read in place, no new graphs


@pytest.mark.parametrize("merge_mode", ["cache", "swap"])
def test_the_first_step_after_a_bank_change_takes_the_new_banks_expert(setup, merge_mode):
    """The merged expert was chosen by the bands of the banks held BEFORE following the guide's change: the first
    step after guide.model = a bank of 10 experts (it had 5) ran the new bank's expert 3 at t=600, not 6 (silently;
    right from the second step on), and a bank part appended to a ComposedGuide raised a bare KeyError."""
    model = setup[0]
    sched = Schedule.create("linear", 1000, "ddim5")  # index 3: t=600
    guide = ClassGuide(tiny_bank(), torch.tensor([0, 1, 2, 3]), scale=3.0)
    fast = FastGuidedSampler(model, sched, guide=guide, merge_mode=merge_mode)
    alone = fs.FastGuide(guide, merge_mode=merge_mode)
    x = torch.randn(SHAPE)
    fast.step(x, 3)
    alone(x, 600)
    guide.model = tiny_bank(n_experts=10)
    out, _ = fast.step(x, 3)
    assert torch.isfinite(out).all() and rel_err(out, ddim_step(model, x, 3, sched, guide=guide).sample) < TOL
    assert rel_err(alone(x, 600), guide(x, 600)) < TOL and fast.expert_key(3) == alone.key(600) == (6,)
    comp = ComposedGuide([ClassGuide(tiny_bank(), 1, scale=3.0)])
    fast_comp = fs.FastGuide(comp, "cpu", merge_mode=merge_mode)
    fast_comp(x, 600)
    comp.guides.append((ClassGuide(tiny_bank(n_experts=10), 2, scale=2.0), 1.0))
    assert rel_err(fast_comp(x, 600), comp(x, 600)) < TOL and fast_comp.key(600) == (3, 6)


def _replace_bank_tensors(bank, how):
    """Change a bank's weights without writing into its tensors: new tensor objects or new storage."""
    if how == "load_state_dict_assign":  # new Parameter objects, as load_state_dict(assign=True) makes
        sd = {k: (v * 1.5 if "lora_" in k else v.clone()) for k, v in bank.state_dict().items()}
        bank.load_state_dict(sd, assign=True)
    elif how == "data_assign":  # the same Parameter with new storage, as Module.to / .half() / .double() do
        for p in bank.parameters_to_train():
            p.data = p.data * 1.5
    elif how == "module_replaced":  # a frozen base module of the bank replaced by another
        old = bank.model.fc
        bank.model.fc = nn.Linear(old.in_features, old.out_features).to(old.weight.dtype)
    else:  # a dtype change through Module.to: the merged copies must follow it
        bank.double()


@pytest.mark.parametrize("merge_mode", ["cache", "swap"])
@pytest.mark.parametrize("how", ["load_state_dict_assign", "data_assign", "dtype", "module_replaced"])
def test_merged_experts_follow_bank_weights_given_new_tensors(merge_mode, how):
    """Only in-place writes (version counters) were seen: after load_state_dict(assign=True), p.data = ...,
    bank.double() or a module of the bank replaced, the sampler kept running the old merged copies (cache mode:
    relative error ~0.2 in float64; a float32 copy for a float64 bank)."""
    torch.manual_seed(0)
    model, bank = tiny_adm().double(), tiny_bank()
    if how != "dtype":
        bank.double()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    sched = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    fast = FastGuidedSampler(model, sched, guide=guide, merge_mode=merge_mode)
    fast.sample(x_T)  # every band merged (a float32 bank: float32 copies, the guide casts x_t to them)
    _replace_bank_tensors(bank, how)
    out = fast.sample(x_T)
    ref = sample_loop(model, x_T, sched, guide=guide)
    assert torch.isfinite(out).all() and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("sampler,respacing,kw", CASES)
def test_guide_of_scale_zero_samples_exactly_unguided(setup, sampler, respacing, kw):
    """DDIM's condition_score with a zero gradient re-derives x0-hat from eps: scale 0 differed from the unguided
    sample by ~1e-14 (float64) / ~8e-6 (float32), in sample_loop and on the fast path, and still ran the guide."""
    model, bank, _ = setup
    sched = Schedule.create("linear", 1000, respacing)
    x_T = torch.randn(SHAPE)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    off = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=0.0)
    weighted_off = ComposedGuide([(ClassGuide(bank, 1, scale=3.0), 0.0), (off, 2.0)])
    plain_ref = sample_loop(model, x_T, sched, sampler=sampler, generator=gen(), **kw)
    plain_fast = FastGuidedSampler(model, sched, sampler=sampler, **kw).sample(x_T, generator=gen())
    assert torch.isfinite(plain_ref).all() and torch.isfinite(plain_fast).all()
    calls = []
    hook = bank.register_forward_hook(lambda *a: calls.append(1))
    try:
        for guide in (off, weighted_off):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # not "the guide returned no gradient": scale 0 asked for none
                ref = sample_loop(model, x_T, sched, sampler=sampler, guide=guide, generator=gen(), **kw)
            assert torch.equal(ref, plain_ref)
            fast = FastGuidedSampler(model, sched, sampler=sampler, guide=guide, merge_experts=False, **kw)
            assert torch.equal(fast.sample(x_T, generator=gen()), plain_fast)
    finally:
        hook.remove()
    assert not calls  # the guide's network did not run


def test_bad_inputs_name_what_is_wrong_in_one_line(setup):
    """An integer x was reported by its shape, model_kwargs=[...] raised 'cannot convert dictionary update sequence
    element', sample(dtype=torch.long) raised randn's NotImplementedError, and FastGuide took a t of another batch
    size (or float) with t_host silently (an X0HatGuide indexes its table by it)."""
    model, bank, guide = setup
    sched = Schedule.create("linear", 1000, "ddim5")
    fast = FastGuidedSampler(model, sched, guide=guide)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"^x must be a floating tensor \[B, C, \.\.\.\] with B > 0, got torch\.int64 "
                                         r"\(4, 3, 8, 8\)$"):
        fast.step(x.long(), 2)
    with pytest.raises(TypeError, match=r"^model_kwargs must be a dict of the denoiser's keyword arguments .*list$"):
        FastGuidedSampler(model, sched, model_kwargs=[1])
    with pytest.raises(ValueError, match=r"^dtype must be a floating torch\.dtype for x_T .*got torch\.int64$"):
        fast.sample(SHAPE, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^dtype must be a floating torch\.dtype"):
        sample_loop(model, SHAPE, sched, dtype=torch.long)
    alone = fs.FastGuide(guide)
    for t in (torch.tensor([600, 600]), torch.full((4, 1), 600)):
        with pytest.raises(ValueError, match=r"^FastGuide: t must be an int or a tensor \[4\] \(one timestep per "
                                             r"sample\), got shape \(" + ", ?".join(map(str, t.shape)) + r",?\)$"):
            alone(x, t, t_host=600)
    with pytest.raises(ValueError, match=r"^FastGuide: t must hold integer original timesteps, got dtype "
                                         r"torch\.float32$"):
        alone(x, torch.full((4,), 600.0), t_host=600)
    good = alone(x, torch.full((4,), 600), t_host=600)
    assert torch.isfinite(good).all() and rel_err(good, guide(x, 600)) < TOL


@pytest.mark.parametrize("merge_mode", ["cache", "swap"])
def test_refresh_experts_after_a_fused_optimizer_step(merge_mode):
    """torch.optim's fused=True optimizers write the parameters without bumping their version counters, so the
    merged experts could not see the step: refresh_experts() merges them again."""
    torch.manual_seed(0)
    model, bank = tiny_adm().double(), tiny_bank().double()
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=3.0)
    sched = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    fast = FastGuidedSampler(model, sched, guide=guide, merge_mode=merge_mode)
    fast.sample(x_T)
    opt = torch.optim.SGD(bank.parameters_to_train(), lr=1.0, fused=True)
    bank(torch.randn(SHAPE, dtype=torch.float64), torch.tensor([100, 300, 500, 900])).square().sum().backward()
    opt.step()
    fast.refresh_experts()
    out, ref = fast.sample(x_T), sample_loop(model, x_T, sched, guide=guide)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-12
    alone = fs.FastGuide(guide, merge_mode=merge_mode)
    x = torch.randn(SHAPE, dtype=torch.float64)
    alone(x, 600)
    bank(x, torch.tensor([600] * 4)).square().sum().backward()
    opt.step()
    alone.refresh_experts()
    got = alone(x, 600)
    assert torch.isfinite(got).all() and rel_err(got, guide(x, 600)) < 1e-12


def test_autocast_with_float64_x_warns_that_it_does_nothing(setup):
    """guide_autocast / model_autocast with a float64 x_t changed nothing (autocast lowers float32 ops), silently."""
    model, bank, _ = setup
    model64, bank64 = tiny_adm().double(), tiny_bank().double()
    model64.load_state_dict(model.state_dict())
    bank64.load_state_dict(bank.state_dict())
    guide = ClassGuide(bank64, torch.tensor([0, 1, 2, 3]), scale=3.0)
    sched = Schedule.create("linear", 1000, "ddim5")
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    plain = FastGuidedSampler(model64, sched, guide=guide).sample(x_T)
    fast = FastGuidedSampler(model64, sched, guide=guide, guide_autocast=torch.bfloat16, model_autocast=torch.float16)
    with pytest.warns(FastSamplingWarning, match=r"^guide_autocast=torch\.bfloat16, model_autocast=torch\.float16: "
                                                 r"autocast lowers float32 ops only, so with float64 x it does "):
        out = fast.sample(x_T)
    assert torch.isfinite(out).all() and torch.equal(out, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per sampler
        fast.step(x_T, 2)
        FastGuidedSampler(model, sched, guide=ClassGuide(bank, 1), guide_autocast=torch.bfloat16).step(
            x_T.float(), 2)  # float32: autocast applies, no warning


def test_a_step_without_guidance_leaves_the_next_routed_step_its_sync(setup):
    """A scale-0 step took the merged key (which syncs the guide and lets the runner() that follows skip its sync)
    but ran no runner: the next routed step then skipped the sync of a guide changed in between."""
    model, bank, _ = setup
    guide = ClassGuide(bank, torch.tensor([0, 1, 2, 3]), scale=0.0)
    sched = Schedule.create("linear", 1000, "ddim5")
    fast = FastGuidedSampler(model, sched, guide=guide)
    x = torch.randn(SHAPE)
    fast.step(x, 3)
    assert not fast.fast_guide._synced_for_runner
    guide.scale = 3.0
    idx = torch.tensor([4, 3, 1, 0])
    out, _ = fast.step(x, idx)
    assert torch.isfinite(out).all() and rel_err(out, ddim_step(model, x, idx, sched, guide=guide).sample) < TOL


def test_expert_key_alone_leaves_the_next_runner_its_sync(setup):
    """expert_key(i) (public) told the next runner() to skip its sync, as if it were the key() of that step."""
    model, bank, guide = setup
    fast = FastGuidedSampler(model, Schedule.create("linear", 1000, "ddim5"), guide=guide)
    assert fast.expert_key(3) == (3,) and not fast.fast_guide._synced_for_runner
    assert fast.fast_guide.key(600) == (3,) and not fast.fast_guide._synced_for_runner
    out, _ = fast.step(torch.randn(SHAPE), 3)
    assert torch.isfinite(out).all() and not fast.fast_guide._synced_for_runner  # the step's runner() took it
