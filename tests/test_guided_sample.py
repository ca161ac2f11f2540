"""ppap-fast guided-sample: guided sampling from model specs, on the shipped digits weights
(tiny UNet, TinyResNet classifier, PPAP-10 experts) at 16x16; nothing downloaded."""
import json
import re

import numpy as np
import pytest
import torch

from ppap_fast.cli import main
from ppap_fast.demo import WEIGHTS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["--denoiser", "tiny", "--checkpoint", str(WEIGHTS_DIR / "unet.safetensors"), "--image-size", "16",
        "--channels", "1", "--num-samples", "6", "--batch-size", "4", "--steps", "5", "--no-progress"]
GUIDE = ["--guide", f"tiny:{WEIGHTS_DIR / 'classifier.safetensors'}", "--experts", str(WEIGHTS_DIR / "ppap10"),
         "--targets", "3,7"]


def _run(tmp_path, name, *extra):
    out = tmp_path / f"{name}.npz"
    assert main(["guided-sample", "--out", str(out), *BASE, *extra]) == 0
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(out.with_suffix(".json").read_text())


def test_guided_sample_files_stats_and_paths(tmp_path, capsys):
    fast, stats = _run(tmp_path, "fast", *GUIDE)
    assert fast["images"].dtype == np.uint8 and fast["images"].shape == (6, 16, 16, 1)
    assert fast["targets"].tolist() == [3, 7, 3, 7, 3, 7]
    assert (tmp_path / "fast.png").stat().st_size > 0
    assert stats["path"] == "fast" and stats["nfe_per_sample"] == 5 and stats["guide_evals_per_sample"] == 5
    assert stats["fast_options"]["fuse_norm_act"] is False and stats["fast_options"]["guide_autocast"] is None
    assert stats["experts"]["n_experts"] == 10 and stats["task"] == "classification"
    assert stats["images_per_s"] > 0 and stats["peak_memory_mb"] > 0
    assert 0 < stats["first_batch_seconds"] <= stats["seconds"] and stats["steady_images_per_s"] > 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(tmp_path / "fast.npz")
    ref, rstats = _run(tmp_path, "ref", *GUIDE, "--no-fast")
    assert rstats["path"] == "reference" and rstats["fast_options"] == {}
    diff = np.abs(fast["images"].astype(int) - ref["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # same noise: float rounding only
    plain, _ = _run(tmp_path, "plain")
    assert "targets" not in plain and np.abs(plain["images"].astype(int) - fast["images"].astype(int)).mean() > 2
    naive, nstats = _run(tmp_path, "naive", "--guide", f"tiny:{WEIGHTS_DIR / 'classifier.safetensors'}",
                         "--targets", "3,7")
    assert nstats["experts"] is None and not np.array_equal(naive["images"], fast["images"])


def test_guided_sample_quantises_as_guided_diffusions_sample_scripts(tmp_path, monkeypatch):
    """The .npz held round((x + 1) * 127.5); guided-diffusion's scripts (whose samples the paper's FIDs score)
    write ((x + 1) * 127.5).clamp(0, 255).to(uint8), which truncates: ~half the pixels were a level brighter."""
    import ppap_fast.data

    floats = []
    real = ppap_fast.data.to_uint8

    def spy(x, *a, **kw):
        floats.append(x.detach().float().cpu().clone())
        return real(x, *a, **kw)

    monkeypatch.setattr(ppap_fast.data, "to_uint8", spy)
    imgs, _ = _run(tmp_path, "q")
    x = torch.cat(floats)
    official = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert x.shape[0] == 6 and np.array_equal(imgs["images"], official)


def test_guided_sample_removes_the_temporaries_of_a_killed_run(tmp_path):
    """A guided-sample killed (SIGKILL) mid-write left its atomic-write .tmp beside --out for good."""
    left = [tmp_path / ".g.npz.abcd1234.npz.tmp", tmp_path / ".g.png.k2j4x_9z.png.tmp",
            tmp_path / ".g.json.q1w2e3r4.json.tmp"]  # the names shards._atomic makes for g.npz/.png/.json
    others = [tmp_path / ".h.npz.abcd1234.npz.tmp", tmp_path / ".g.npz.mine.tmp", tmp_path / "g.npz.tmp"]
    for p in left + others:
        p.write_text("left")
    _run(tmp_path, "g")
    assert not [p for p in left if p.exists()]
    assert all(p.read_text() == "left" for p in others)  # another output's, or not a name the writer makes


@pytest.mark.parametrize("sampler", [["--sampler", "ddpm"], []])
def test_images_do_not_depend_on_the_batch_size(tmp_path, sampler):
    """Per-sample x_T and noise: sample k is the same image at any --batch-size (float rounding aside)."""
    runs = [_run(tmp_path, f"b{bs}", *GUIDE, *sampler, "--batch-size", str(bs))[0]["images"].astype(int)
            for bs in (1, 4, 6)]
    for got in runs[1:]:
        diff = np.abs(got - runs[0])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert len({im.tobytes() for im in runs[0]}) == 6  # six different samples, not one repeated
    other = _run(tmp_path, "seed", *GUIDE, *sampler, "--seed", "1")[0]["images"].astype(int)
    assert (other != runs[0]).mean() > 0.5


def test_a_run_split_by_first_sample_gives_the_whole_runs_images(tmp_path, capsys):
    """--first-sample: samples 0-2 and 3-5 run apart (other batch sizes) are samples 0-5 of one run, targets
    cycled by the sample's index; a negative index is refused."""
    whole = _run(tmp_path, "whole", *GUIDE, "--sampler", "ddpm")[0]
    parts = [_run(tmp_path, f"part{k}", *GUIDE, "--sampler", "ddpm", "--first-sample", str(k), "--num-samples", "3",
                  "--batch-size", str(bs))[0] for k, bs in ((0, 2), (3, 3))]
    assert np.concatenate([p["targets"] for p in parts]).tolist() == whole["targets"].tolist() == [3, 7, 3, 7, 3, 7]
    diff = np.abs(np.concatenate([p["images"] for p in parts]).astype(int) - whole["images"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(parts[0]["images"], parts[1]["images"])
    assert main(["guided-sample", "--out", str(tmp_path / "bad.npz"), *BASE, "--first-sample", "-1"]) != 0
    assert "--first-sample must be >= 0, got -1" in capsys.readouterr().err


def test_peak_memory_says_what_it_measured(tmp_path, capsys, monkeypatch):
    # peak_memory_mb was the CUDA allocator's peak on a GPU but the process RSS on a CPU, unlabelled
    from ppap_fast import guided_sample as gs
    from ppap_fast.demo import PeakMemory

    _, stats = _run(tmp_path, "plain")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for st in (stats, printed):
        assert st["peak_memory_kind"] == "process_rss" and st["peak_memory_mb"] == st["peak_rss_mb"] > 0
    mem = PeakMemory()
    mem.peak_mb = 321.04
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5 * 2**20)
    assert gs._peak_memory(torch.device("cuda", 0), mem) == {
        "peak_memory_mb": 5.0, "peak_memory_kind": "cuda_allocator", "peak_rss_mb": 321.0}
    assert gs._peak_memory(torch.device("cpu"), mem) == {
        "peak_memory_mb": 321.0, "peak_memory_kind": "process_rss", "peak_rss_mb": 321.0}


def test_ppap_guidance_reaches_the_targets(tmp_path):
    from ppap_fast.data import from_uint8
    from ppap_fast.demo import load_evaluator

    imgs, _ = _run(tmp_path, "g", *GUIDE[:-1], "3", "--num-samples", "12", "--batch-size", "12", "--steps", "10")
    plain, _ = _run(tmp_path, "p", "--num-samples", "12", "--batch-size", "12", "--steps", "10")
    evaluator = load_evaluator(WEIGHTS_DIR)
    with torch.no_grad():
        hit = [(evaluator(from_uint8(a["images"])).argmax(1) == 3).float().mean().item() for a in (imgs, plain)]
    assert hit[0] >= 0.75 and hit[0] > hit[1] + 0.4, hit


@pytest.mark.parametrize("extra,msg", [
    (["--targets", "3"], "need --guide"),
    ([*GUIDE[:-1], "12"], "out of range"),
    ([*GUIDE[:-2]], "needs --targets"),
    ([*GUIDE, "--experts", str(WEIGHTS_DIR)], "config.json"),
    ([*GUIDE, "--no-fast", "--cuda-graph"], "fast path"),
    ([*GUIDE, "--no-fast", "--compile"], "fast path"),
    ([*GUIDE, "--no-fast", "--fuse-norm-act"], "fast path"),
    # silently ignored before: a map for a classifier, --steps 0 (ran the default 25), a subfolder without experts
    ([*GUIDE, "--target-map", "map.npy"], "--target-map"),
    (["--steps", "0"], "--steps"),
    (["--experts-subfolder", "ppap10"], "--experts-subfolder"),
    # options of the guide without --guide: the run was unguided, the option ignored silently
    (["--guide-weights", "r50.pth"], "--guide-weights need --guide"),
    (["--guide-task", "classification"], "--guide-task need --guide"),
    (["--raw-input"], "--raw-input need --guide"),
    (["--ignore-index", "255"], "--ignore-index need --guide"),
    (["--raw-input", "--guide-weights", "r50.pth"], "--guide-weights / --raw-input need --guide"),
    (["--sampler", "ddpm", "--eta", "0.5"], "eta=0.5 is DDIM's noise level"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--sampler", "plms"], "cuda|invalid choice"),
    (["--guide-dtype", "bf16"], "--guide-dtype .* needs --guide"),  # an unguided run ignored it silently
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, msg):
    import re

    try:
        rc = main(["guided-sample", "--out", str(tmp_path / "s.npz"), *BASE, *extra])
    except SystemExit as e:  # argparse choices
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search(msg, err), err
    assert not (tmp_path / "s.npz").exists()



def test_segmentation_target_map_must_hold_integer_labels(tmp_path):
    # a float map was cast with .long() (1.7 -> class 1), hiding SegmentationGuide's own check
    from ppap_fast.guided_sample import _target_map

    np.save(tmp_path / "f.npy", np.full((4, 4), 1.7, np.float32))
    with pytest.raises(ValueError, match="integer"):
        _target_map(str(tmp_path / "f.npy"), "segmentation")
    np.save(tmp_path / "i.npy", np.full((4, 4), 2, np.uint8))
    assert _target_map(str(tmp_path / "i.npy"), "segmentation").dtype == torch.long
    assert _target_map(str(tmp_path / "f.npy"), "depth").dtype == torch.float32


def test_segmentation_target_map_must_be_one_label_map(tmp_path, capsys):
    # a [4, H, W] map with --batch-size 4 guided each batch's sample k towards map k (samples 4..7 towards
    # maps 0..3 again), and a shorter last batch failed after the others were sampled
    from ppap_fast.guided_sample import _target_map

    np.save(tmp_path / "b.npy", np.ones((4, 16, 16), np.int64))
    with pytest.raises(ValueError, match=r"one \[H, W\] label map shared by all samples, got shape \(4, 16, 16\)"):
        _target_map(str(tmp_path / "b.npy"), "segmentation")
    seg = ["--guide", f"tiny:{WEIGHTS_DIR / 'segnet.safetensors'}", "--num-samples", "8", "--steps", "2"]
    assert main(["guided-sample", "--out", str(tmp_path / "s.npz"), *BASE, *seg, "--target-map",
                 str(tmp_path / "b.npy")]) == 2
    assert "shared by all samples" in capsys.readouterr().err and not (tmp_path / "s.npz").exists()
    assert _target_map(str(tmp_path / "b.npy"), "depth").shape == (4, 16, 16)  # a C-channel depth target


@pytest.mark.parametrize("sampler,steps", [("ddim", "600"), ("ddpm", "1500")])
def test_step_count_the_sampler_cannot_take_names_the_options(tmp_path, capsys, sampler, steps):
    # "cannot create exactly 600 steps with an integer stride from 1000" named neither --steps nor --sampler
    assert main(["guided-sample", "--out", str(tmp_path / "s.npz"), *BASE, "--sampler", sampler,
                 "--steps", steps]) == 2
    assert f"--steps {steps} with --sampler {sampler} over 1000 diffusion steps: " in capsys.readouterr().err



@pytest.mark.parametrize("sampler,steps", [("ddim", "600"), ("ddpm", "1500"), ("ddpm", "1")])
def test_a_refused_step_count_leaves_no_new_output_folder(tmp_path, capsys, sampler, steps):
    """The step count was checked after --out's folders were made: each refused run left them empty."""
    out = tmp_path / "new" / "deeper" / "s.npz"
    assert main(["guided-sample", "--out", str(out), *BASE, "--sampler", sampler, "--steps", steps]) == 2
    assert f"--steps {steps} with --sampler {sampler} over 1000 diffusion steps: " in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_an_unknown_schedule_is_named_as_such(tmp_path):
    """GuidedSampleConfig(schedule='foo') was refused as '--steps 25 with --sampler ddim ...: unknown beta schedule'."""
    from ppap_fast.guided_sample import GuidedSampleConfig, run_guided_sample

    with pytest.raises(ValueError, match=r"^--schedule must be one of linear, cosine, got 'foo'$"):
        run_guided_sample(GuidedSampleConfig(out=str(tmp_path / "new" / "s.npz"), schedule="foo"), progress=False)
    assert not (tmp_path / "new").exists()

def test_target_map_that_is_not_a_single_array_is_a_value_error(tmp_path):
    # an .npz given as --target-map came back from np.load as an open NpzFile: torch.from_numpy
    # raised TypeError (a traceback, not the CLI's one-line error) and the file stayed open
    from ppap_fast.guided_sample import _target_map

    np.savez(tmp_path / "m.npz", depth=np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match="m.npz.*single .npy array"):
        _target_map(str(tmp_path / "m.npz"), "depth")



@pytest.mark.parametrize("kind", ["junk", "object array"])
def test_target_map_that_numpy_cannot_load_names_the_file(tmp_path, kind):
    """numpy's ValueError named no file, and called a junk file 'pickled (object) data'."""
    from ppap_fast.guided_sample import _target_map

    path = tmp_path / "m.npy"
    if kind == "junk":
        path.write_bytes(b"not an npy file" * 4)
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"^--target-map {re.escape(str(path))} is not a readable \.npy array \("):
        _target_map(str(path), "depth")

@pytest.mark.parametrize("path", [[], ["--no-fast"]])
def test_non_finite_guidance_is_a_one_line_error(tmp_path, capsys, path):
    rc = main(["guided-sample", "--out", str(tmp_path / "s.npz"), *BASE, *GUIDE, "--scale", "1e38", *path])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "too large" in err[0], err
    assert not (tmp_path / "s.npz").exists()


def test_compile_option_reaches_the_fast_sampler(tmp_path, monkeypatch):
    import ppap_fast.fast_sampling as fs

    seen = []
    real = fs.FastGuidedSampler

    def spy(*a, **kw):
        seen.append(dict(kw))
        kw["compile_model"] = kw["fuse_norm_act"] = kw["compile_freeze"] = False  # the plumbing is under test
        return real(*a, **kw)

    monkeypatch.setattr(fs, "FastGuidedSampler", spy)
    _run(tmp_path, "c", *GUIDE, "--compile", "--fuse-norm-act")
    assert seen and all(kw["compile_model"] is True and kw["fuse_norm_act"] is True and kw["compile_freeze"] is True
                        for kw in seen)  # CPU: compiled frozen
    seen.clear()  # default on CPU: none of the CUDA options
    _run(tmp_path, "d", *GUIDE)
    assert seen and all(kw["fuse_norm_act"] is False and kw["channels_last"] is False and kw["cuda_graph"] is False
                        and kw["compile_freeze"] is False for kw in seen)


def test_stats_fast_options_say_what_ran(tmp_path, monkeypatch):
    """stats["fast_options"] held what was asked: cuda_graph True on a CPU run, fuse_norm_act True with --compile,
    though neither ran. Now what ran (both batch sizes' samplers); config keeps what was asked."""
    import warnings

    import ppap_fast.fast_sampling as fs

    monkeypatch.setattr(fs, "_compile", lambda fn, **kw: fn)  # compiled at once: the options are under test
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, stats = _run(tmp_path, "s", *GUIDE, "--device", "cpu", "--cuda-graph", "--fuse-norm-act", "--compile")
    said = " | ".join(str(w.message) for w in caught)  # the sampler's warnings, as before
    assert "CUDA-graph capture needs a CUDA device" in said and "fuse_norm_act is skipped with compile_model" in said
    opts = stats["fast_options"]
    assert opts["cuda_graph"] is False and opts["fuse_norm_act"] is False, opts
    assert opts["compile_model"] is True and opts["compile_freeze"] is True and opts["guide_autocast"] is None
    assert stats["config"]["cuda_graph"] is True and stats["config"]["fuse_norm_act"] is True


def test_schedule_option_reaches_the_sampler(tmp_path):
    lin, _ = _run(tmp_path, "lin")
    cos, stats = _run(tmp_path, "cos", "--schedule", "cosine")
    assert stats["config"]["schedule"] == "cosine"
    assert np.abs(lin["images"].astype(int) - cos["images"].astype(int)).mean() > 1


def test_registry_guide_without_weights_warns(tmp_path):
    """--guide resnet18 with no --guide-weights guided with a random network without a word."""
    args = ["guided-sample", "--denoiser", "random-conv", "--image-size", "16", "--num-samples", "1", "--steps", "2",
            "--no-progress", "--guide", "resnet18", "--targets", "5"]
    with pytest.warns(UserWarning, match="--guide resnet18 without --guide-weights: a randomly initialised"):
        assert main([*args, "--out", str(tmp_path / "a.npz")]) == 0


def test_an_image_size_the_denoiser_does_not_declare_warns(tmp_path):
    """The default --image-size 256 with a denoiser made for 16x16 (an ADM-64 at 256) sampled images of another
    resolution without a word."""
    args = [a for a in BASE if a not in ("--image-size", "16")]
    with pytest.warns(UserWarning, match=r"the denoiser declares \(1, 16, 16\) images but sampling makes "
                                         r"\(1, 32, 32\) \(--channels / --image-size\)"):
        assert main(["guided-sample", "--out", str(tmp_path / "a.npz"), *args, "--image-size", "32",
                     "--num-samples", "1"]) == 0


def test_guide_weights_with_a_tiny_guide_are_refused(tmp_path, capsys):
    """--guide tiny:FILE --guide-weights OTHER guided with FILE's weights, OTHER ignored silently."""
    other = tmp_path / "other.safetensors"
    other.write_bytes((WEIGHTS_DIR / "classifier.safetensors").read_bytes())
    assert main(["guided-sample", "--out", str(tmp_path / "g.npz"), *BASE, "--guide",
                 f"tiny:{WEIGHTS_DIR / 'classifier.safetensors'}", "--guide-weights", str(other),
                 "--targets", "3"]) == 2
    err = capsys.readouterr().err
    assert "holds its own weights" in err and str(other) in err and not (tmp_path / "g.npz").exists()


def test_checkpoint_with_the_random_conv_denoiser_is_refused(tmp_path, capsys):
    """--denoiser random-conv --checkpoint FILE sampled with random weights, FILE ignored silently."""
    assert main(["guided-sample", "--out", str(tmp_path / "g.npz"), "--denoiser", "random-conv", "--checkpoint",
                 str(WEIGHTS_DIR / "unet.safetensors"), "--image-size", "8", "--channels", "1", "--num-samples",
                 "1", "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no weights to load" in err and not (tmp_path / "g.npz").exists()


def test_segmentation_void_label_255_needs_and_takes_ignore_index(tmp_path, capsys):
    """A VOC-style map (255: void) was refused with 'pass ignore_index=255', which guided-sample had no way to
    pass; --ignore-index 255 guides exactly as the same map with the void pixels at the default -100."""
    seg = ["--guide", f"tiny:{WEIGHTS_DIR / 'segnet.safetensors'}", "--num-samples", "2", "--steps", "2"]
    labels = np.ones((16, 16), np.int64)
    labels[:, :4] = 255
    np.save(tmp_path / "voc.npy", labels)
    np.save(tmp_path / "plain.npy", np.where(labels == 255, -100, labels))
    assert main(["guided-sample", "--out", str(tmp_path / "x.npz"), *BASE, *seg, "--target-map",
                 str(tmp_path / "voc.npy")]) == 2
    assert "ignore_index=255" in capsys.readouterr().err
    voc, _ = _run(tmp_path, "voc", *seg, "--target-map", str(tmp_path / "voc.npy"), "--ignore-index", "255")
    plain, _ = _run(tmp_path, "plain", *seg, "--target-map", str(tmp_path / "plain.npy"))
    unguided, _ = _run(tmp_path, "none", "--num-samples", "2", "--steps", "2")
    assert np.array_equal(voc["images"], plain["images"]) and not np.array_equal(voc["images"], unguided["images"])
    assert main(["guided-sample", "--out", str(tmp_path / "c.npz"), *BASE, *GUIDE, "--ignore-index", "255"]) == 2
    assert "--ignore-index marks void pixels of a segmentation" in capsys.readouterr().err


@pytest.mark.parametrize("guide", [GUIDE, ["--guide", "mobilenet_v2", "--targets", "3"],
                                   ["--guide", "py:no_such_module:make", "--guide-task", "depth"]])
def test_ignore_index_of_a_guide_not_segmentation_is_refused_before_loading(tmp_path, capsys, monkeypatch, guide):
    """Refused only after the denoiser and the guide were built (seconds for real models); the task of a tiny:
    file, a registry model or --guide-task is known before that."""
    import ppap_fast.distributed as dist

    def no_loading(*a, **k):
        raise AssertionError("loaded a model before refusing --ignore-index")

    monkeypatch.setattr(dist, "build_denoiser", no_loading)
    monkeypatch.setattr(dist, "build_teacher", no_loading)
    out = tmp_path / "sub" / "s.npz"
    assert main(["guided-sample", "--out", str(out), *BASE, *guide, "--ignore-index", "255"]) == 2
    err = capsys.readouterr().err
    assert "--ignore-index marks void pixels of a segmentation --target-map; this guide's task is" in err, err
    assert ("depth" if "depth" in guide else "classification") in err and not out.parent.exists()


def test_experts_refuse_a_guide_normalised_otherwise_than_their_distillation(tmp_path, capsys):
    """Experts distilled from weights with a timm config.json (mean = std = 0.5) guided through the bare weight
    file (ImageNet statistics), or through raw x_t (--raw-input), ran without a word: refused, naming both."""
    from safetensors.torch import save_file

    from ppap_fast import distributed as D
    from ppap_fast.models.registry import build_guide_model

    timm_dir, bare = tmp_path / "timm", tmp_path / "bare"
    sd = build_guide_model("resnet18").model.state_dict()
    for d in (timm_dir, bare):  # the same weights, with and without their config.json
        d.mkdir()
        save_file(sd, d / "model.safetensors")
    (timm_dir / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    data, experts = tmp_path / "data", tmp_path / "experts"
    D.generate(D.GenerateConfig(str(data), num_images=2, shard_size=2, image_size=16, channels=3,
                                denoiser="random-conv", respacing="ddim2", teacher="resnet18",
                                teacher_weights=str(timm_dir), device="cpu"), D.DistEnv())
    D.distill(D.DistillConfig(str(data), str(experts), "resnet18", teacher_weights=str(timm_dir), n_experts=2,
                              steps=1, batch_size=2, device="cpu"), D.DistEnv())
    args = ["guided-sample", "--denoiser", "random-conv", "--image-size", "16", "--num-samples", "1", "--steps", "2",
            "--no-progress", "--guide", "resnet18", "--targets", "5", "--experts", str(experts)]
    assert main([*args, "--out", str(tmp_path / "same.npz"), "--guide-weights", str(timm_dir)]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "bare.npz"), "--guide-weights", str(bare / "model.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mean [0.5, 0.5, 0.5]" in err and "mean [0.485, 0.456, 0.406]" in err
    assert "no timm config.json beside" in err and not (tmp_path / "bare.npz").exists()
    assert main([*args, "--out", str(tmp_path / "raw.npz"), "--guide-weights", str(timm_dir), "--raw-input"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "raw x_t" in err and "drop --raw-input" in err
    # a checkpoint saved before the transform was recorded loads as before, whatever the guide's normalisation
    cfg = json.loads((experts / "config.json").read_text())
    assert cfg.pop("input_transform") == {"raw": False, "mean": [0.5] * 3, "std": [0.5] * 3, "size": [224, 224],
                                          "antialias": "auto"}
    (experts / "config.json").write_text(json.dumps(cfg))
    assert main([*args, "--out", str(tmp_path / "old.npz"), "--guide-weights", str(bare / "model.safetensors")]) == 0


def test_a_dense_target_map_is_shared_at_a_batch_equal_to_its_channel_count(tmp_path, monkeypatch):
    # [C, H, W] at --num-samples C was refused as ambiguous by DenseRegressionGuide (a [B, H, W] reading)
    (tmp_path / "rgb_dense_factory.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Conv2d(1, 3, 3, padding=1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "map.npy", np.random.default_rng(0).uniform(-1, 1, (3, 16, 16)).astype(np.float32))
    guide = ["--guide", "py:rgb_dense_factory:make", "--guide-task", "regression",
             "--target-map", str(tmp_path / "map.npy")]
    arrays, stats = _run(tmp_path, "dense", *guide, "--num-samples", "3", "--no-fast")
    assert stats["num_samples"] == 3 and stats["task"] == "regression"
    assert all(np.isfinite(a.astype(np.float64)).all() for a in arrays.values())


@pytest.mark.parametrize("cmd", [["guided-sample", *BASE],
                                 ["sample", "--method", "none", "--num-samples", "1", "--weights-dir", str(WEIGHTS_DIR)]])
def test_guided_sample_and_the_demos_share_one_step_count_check(tmp_path, capsys, monkeypatch, cmd):
    """guided_sample repeated demo_schedule's --steps 1 check: a change to one left the other behind."""
    from ppap_fast import demo

    def refuse(sampler, steps):
        raise ValueError(f"shared check refused {sampler} {steps}")

    monkeypatch.setattr(demo, "check_step_count", refuse)
    out = tmp_path / "o.npz"
    assert main([*cmd, "--sampler", "ddpm", "--steps", "7", "--out", str(out), "--no-progress"]) == 2
    assert "shared check refused ddpm 7" in capsys.readouterr().err
    assert not out.exists()


def test_check_step_count_refuses_one_step_naming_the_sampler():
    from ppap_fast.demo import check_step_count

    with pytest.raises(ValueError, match=r"^DDPM needs --steps 2 or more"):
        check_step_count("ddpm", 1)
    with pytest.raises(ValueError, match=r"^DDIM needs --steps 2 or more"):
        check_step_count("ddim", 1)
    assert check_step_count("ddim", 2) is None and check_step_count("ddpm", 2) is None
