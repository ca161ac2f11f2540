"""ppap-fast score: an independent classifier scores samples of real models (target accuracy, IS, FD,
precision / recall against real images)."""
import json
import textwrap

import numpy as np
import pytest

from ppap_fast.cli import main

FACTORY = textwrap.dedent('''
    import torch
    import torch.nn as nn

    task = "classification"

    def make():
        """Class 1 for bright images, 0 for dark ones; its last linear layer sees the mean colour."""
        lin = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]) * 10)
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
''')


@pytest.fixture()
def brightness_classifier(tmp_path, monkeypatch):
    (tmp_path / "bright_cls.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "py:bright_cls:make"


def _images(levels, size=8):
    return np.stack([np.full((size, size, 3), v, dtype=np.uint8) for v in levels])


def test_score_counts_what_the_classifier_sees(tmp_path, capsys, brightness_classifier):
    samples, real = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, images=_images([250, 240, 230, 10]), targets=np.array([1, 1, 1, 1]))
    np.savez(real, images=_images([250, 240, 230, 10]))
    out = tmp_path / "scores" / "s.json"
    assert main(["score", str(samples), "--classifier", brightness_classifier, "--real", str(real),
                 "--device", "cpu", "--batch-size", "3", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert "score samples" in captured.err and "score real images" in captured.err and "4/4" in captured.err
    assert json.loads(out.read_text()) == res
    assert res["num_samples"] == 4 and res["num_classes"] == 2 and res["feature_dim"] == 3
    assert res["target_accuracy"] == 0.75 and res["target_top5_accuracy"] == 1.0
    assert 0.7 < res["mean_target_probability"] < 0.76
    assert abs(res["fd"]) < 1e-6 and res["precision"] == res["recall"] == 1.0
    assert 1.0 <= res["is"] <= 2.0

    np.savez(real, images=_images([0, 5, 10, 15, 20]))  # real images unlike the samples: a large distance
    assert main(["score", str(samples), "--classifier", brightness_classifier, "--real", str(real),
                 "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fd"] > 1.0 and "score samples" not in captured.err


def test_score_reads_the_parts_of_a_split_run_as_one_set(tmp_path, capsys, brightness_classifier):
    """Several sample files (guided-sample --first-sample parts): the scores of their concatenation; parts
    that do not fit together (image sizes, targets in some only) are refused by name."""
    whole, a, b = tmp_path / "w.npz", tmp_path / "a.npz", tmp_path / "b.npz"
    levels, targets = [250, 240, 230, 10, 20], np.array([1, 1, 0, 0, 1])
    np.savez(whole, images=_images(levels), targets=targets)
    np.savez(a, images=_images(levels[:2]), targets=targets[:2])
    np.savez(b, images=_images(levels[2:]), targets=targets[2:])
    args = ["--classifier", brightness_classifier, "--device", "cpu"]
    assert main(["score", str(whole), *args]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["score", str(a), str(b), *args]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got.pop("samples") == [str(a), str(b)] and want.pop("samples") == str(whole)
    assert got == want and got["num_samples"] == 5 and got["target_accuracy"] == 0.6
    np.savez(b, images=_images(levels[2:], size=4), targets=targets[2:])
    assert main(["score", str(a), str(b), *args]) == 2
    assert "images of different sizes" in capsys.readouterr().err
    np.savez(b, images=_images(levels[2:]))
    assert main(["score", str(a), str(b), *args]) == 2
    assert f"targets in some sample files but not in others: {b} have none" in capsys.readouterr().err


def test_score_with_the_offline_mobilenet(tmp_path, capsys):
    """The default classifier: MobileNetV2 with its ImageNet weights from the offline package."""
    np.savez(tmp_path / "s.npz", images=_images([120, 130], size=32), targets=np.array([1, 999]))
    assert main(["score", str(tmp_path / "s.npz"), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_classes"] == 1000 and res["feature_dim"] == 1280 and 0 <= res["target_accuracy"] <= 1
    assert "fd" not in res


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"), ("directory", "is a directory"), ("not_npz", "not an .npz"), ("no_images", "no 'images'"),
    ("target_range", "targets must lie in 0..1"), ("bad_targets", "targets must be integers"),
    ("few_real", "more than k=3"), ("no_weights", "no offline weights"),
    ("gray_samples", "cannot take the samples (images 8 x 8 x 1)"),
    ("gray_real", "cannot take the real images (images 8 x 8 x 1)"),
    ("channels_first", "got (4, 3, 8, 8), channels first")])
def test_score_bad_input(tmp_path, capsys, brightness_classifier, case, match):
    s = tmp_path / "s.npz"
    args = ["score", str(s), "--classifier", brightness_classifier, "--device", "cpu"]
    if case == "directory":  # it said "not found" of a folder that exists
        s.mkdir()
    elif case == "not_npz":
        s.write_text("hello")
    elif case == "no_images":
        np.savez(s, pictures=_images([1]))
    elif case == "target_range":
        np.savez(s, images=_images([1, 2]), targets=np.array([0, 2]))
    elif case == "bad_targets":
        np.savez(s, images=_images([1, 2]), targets=np.array([0.5, 1.0]))
    elif case == "few_real":
        np.savez(s, images=_images([1, 2, 3, 4]))
        np.savez(tmp_path / "r.npz", images=_images([1, 2]))
        args += ["--real", str(tmp_path / "r.npz")]
    elif case in ("gray_samples", "gray_real"):  # 1 channel for a 3-channel classifier: one line, no traceback
        gray = _images([1, 2, 3, 4])[..., :1]
        np.savez(s, images=gray if case == "gray_samples" else _images([1, 2, 3, 4]))
        np.savez(tmp_path / "r.npz", images=gray)
        args += ["--real", str(tmp_path / "r.npz")]
    elif case == "channels_first":  # it said "cannot take the samples (images 3 x 8 x 8)" of 8 x 8 RGB images
        np.savez(s, images=_images([1, 2, 3, 4]).transpose(0, 3, 1, 2))
    elif case == "no_weights":
        np.savez(s, images=_images([1, 2]))
        args[args.index("--classifier") + 1] = "resnet50"
    assert main(args) == 2
    assert match in capsys.readouterr().err



SQRT_FACTORY = FACTORY.replace("return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)",
                               "return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), Sqrt(), lin)")
SQRT_FACTORY += textwrap.dedent('''
    class Sqrt(nn.Module):  # NaN features on dark images (a mean below 0 in [-1, 1])
        def forward(self, x):
            return x.sqrt()
''')


def test_score_names_the_real_images_a_classifier_gives_non_finite_features(tmp_path, capsys, monkeypatch):
    """NaN features of the real images only were reported as metrics' 'features hold 3 non-finite values',
    naming neither the real images nor the classifier."""
    (tmp_path / "sqrt_cls.py").write_text(SQRT_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    samples, real = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, images=_images([250, 240, 230, 200]), targets=np.array([1, 1, 1, 1]))
    np.savez(real, images=_images([0, 5, 10, 15]))
    assert main(["score", str(samples), "--classifier", "py:sqrt_cls:make", "--real", str(real), "--device", "cpu",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ppap-fast: error: ScoreError: the classifier returned non-finite features on the real images {real}"

def test_score_default_device_auto(tmp_path, capsys, brightness_classifier):
    """Without --device (its default "auto": CUDA when available, else the CPU) score runs."""
    np.savez(tmp_path / "s.npz", images=_images([250, 10]), targets=np.array([1, 0]))
    assert main(["score", str(tmp_path / "s.npz"), "--classifier", brightness_classifier]) == 0, \
        capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["target_accuracy"] == 1.0
    assert main(["score", str(tmp_path / "s.npz"), "--classifier", brightness_classifier, "--device", "bogus"]) == 2
    assert "--device 'bogus'" in capsys.readouterr().err


def test_score_with_the_tiny_digits_evaluator(tmp_path, capsys):
    """tiny:evaluator.safetensors (the digits' independent scorer) was refused as 'not a tiny teacher'."""
    import torch

    from ppap_fast.models.tiny import EvalNet, SegNet, save_model

    torch.manual_seed(0)
    save_model(EvalNet(width=4, feat_dim=8).eval(), tmp_path / "e.safetensors")
    save_model(SegNet(width=4, depth=2).eval(), tmp_path / "seg.safetensors")
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 16, 16, 1), np.uint8), targets=np.array([0, 1, 2, 3]))
    args = ["score", str(tmp_path / "s.npz"), "--device", "cpu", "--no-progress", "--classifier"]
    assert main(args + [f"tiny:{tmp_path / 'e.safetensors'}"]) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["num_classes"] == 10 and res["feature_dim"] == 8
    assert main(args + [f"tiny:{tmp_path / 'seg.safetensors'}"]) == 2
    assert "tiny 'segnet' model: scoring needs a classifier" in capsys.readouterr().err
    # --classifier-weights was ignored (the file's own weights scored) yet recorded as the weights used
    assert main(args + [f"tiny:{tmp_path / 'e.safetensors'}", "--classifier-weights", str(tmp_path / "w.pth")]) == 2
    assert "holds its own weights" in capsys.readouterr().err
    assert main(args + [f"tiny:{tmp_path / 'e.safetensors'}", "--classifier-weights", "none"]) == 0


def test_score_tiny_classifier_that_is_a_directory_says_so(tmp_path, capsys):
    """tiny:<an experts folder> said 'weight file not found' of a path that exists."""
    (tmp_path / "ppap5").mkdir()
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 16, 16, 1), np.uint8))
    assert main(["score", str(tmp_path / "s.npz"), "--device", "cpu", "--classifier",
                 f"tiny:{tmp_path / 'ppap5'}"]) == 2
    err = capsys.readouterr().err
    assert "is a directory: name a .safetensors file" in err and "not found" not in err


def test_score_json_that_names_an_input_is_refused(tmp_path, capsys, brightness_classifier):
    """--json naming the samples (or --real) file replaced that .npz with the scores."""
    s, r = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(s, images=_images([250, 240, 230, 10]), targets=np.array([1, 1, 1, 1]))
    np.savez(r, images=_images([250, 240, 230, 10]))
    before = s.read_bytes(), r.read_bytes()
    for out in (s, r, tmp_path / "." / "s.npz"):
        assert main(["score", str(s), "--classifier", brightness_classifier, "--real", str(r), "--device", "cpu",
                     "--no-progress", "--json", str(out)]) == 2
        assert "is one of the input files" in capsys.readouterr().err
    assert (s.read_bytes(), r.read_bytes()) == before


def _head_first_class():
    """A classifier whose head is registered before another Linear (proj), so registration order misleads."""
    import torch
    import torch.nn as nn

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.proj = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.relu(self.proj(x.mean((2, 3)))))

    return HeadFirst


def test_score_features_are_the_input_of_the_linear_that_produces_the_logits():
    """The head registered before another Linear: the features were the input of the last registered Linear
    (here the 3 mean colours), not the head's input; a conv head (no Linear produces the logits): the logits."""
    import torch
    import torch.nn as nn

    from ppap_fast.score import classifier_outputs

    class HeadFirst(_head_first_class()):
        def forward(self, x):
            return {"logits": super().forward(x)}

    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(3, 3)  # an SE-style gate, not the head
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            x = x * torch.sigmoid(self.gate(x.mean((2, 3))))[:, :, None, None]
            return self.head(x).mean((2, 3))

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    class BothKeys(HeadFirst):  # scored by "logits": the features are that head's input, not "out"'s
        def __init__(self):
            super().__init__()
            self.aux = nn.Linear(3, 2)

        def forward(self, x):
            return {"out": self.aux(x.mean((2, 3))), "logits": self.head(torch.relu(self.proj(x.mean((2, 3)))))}

    for model in (HeadFirst().eval(), ConvHead().eval(), BothKeys().eval()):
        with torch.no_grad():
            out = model(x)
            logits = out["logits"] if isinstance(out, dict) else out
            want = torch.relu(model.proj(x.mean((2, 3)))) if isinstance(model, HeadFirst) else logits
        feats, probs = classifier_outputs(model, None, images, 2, torch.device("cpu"))
        assert feats.shape == tuple(want.shape) and np.isfinite(feats).all()
        np.testing.assert_allclose(feats, want.double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(probs, torch.softmax(logits.double(), 1).numpy(), rtol=1e-5, atol=1e-7)


def test_score_and_generic_placement_take_the_same_head():
    """One head lookup (placement.head_linear) for score and the generic placement: the Linear torch.fx finds
    (registered first here), and for an untraceable model the last registered Linear, in both."""
    import warnings

    import torch
    import torch.nn as nn

    from ppap_fast.experts.placement import generic_placement, head_linear
    from ppap_fast.score import _head_linear

    HeadFirst = _head_first_class()

    class Untraceable(HeadFirst):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x[:, :2, 0, 0]

    for model, want in ((HeadFirst(), (True, "head")), (Untraceable(), (False, "proj"))):
        assert head_linear(model) == want
        assert _head_linear(model) is model.get_submodule(want[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = generic_placement(model).lora
        assert set(dict(model.named_modules())) - {""} - set(lora) == {want[1]}


def test_top5_counts_the_classes_above_the_target_with_ties_to_the_lower_class():
    """score's top-5 sorted all classes of every row (argsort, which leaves the order of tied classes open): the
    classes ranked above the target are counted instead, ties to the lower class index (a stable sort's first 5)."""
    from ppap_fast.score import in_top_k

    rng = np.random.default_rng(0)
    for probs in (rng.random((300, 1000)), np.round(rng.random((300, 1000)), 2), np.full((300, 1000), 1e-3)):
        probs = probs.astype(np.float32)
        targets = rng.integers(0, 1000, 300)
        order = np.argsort(-probs, 1, kind="stable")
        targets[:100] = order[np.arange(100), 3 + np.arange(100) % 4]  # ranks 3..6: around the cut
        want = (order[:, :5] == targets[:, None]).any(1)
        assert want.any() and not want.all()
        assert np.array_equal(in_top_k(probs, targets, 5), want)
    tied = np.full((7, 7), 1 / 7)
    assert in_top_k(tied, np.arange(7), 5).tolist() == [True] * 5 + [False] * 2
    assert in_top_k(np.array([[0.2, 0.5, 0.3]] * 3), np.arange(3), 5).all()  # fewer than 5 classes: all in
