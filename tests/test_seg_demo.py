"""The segmentation-guidance demo: SegNet's labels, the IoU metric, the shipped SegNet / PPAP-5 experts,
the CLI's segmentation task on tiny weights, and bad input. Nothing is downloaded."""
import json

import numpy as np
import pytest
import torch

from ppap_fast.cli import main
from ppap_fast.data import DigitsSplits, ink_mask
from ppap_fast.demo import WEIGHTS_DIR, DemoError, make_tiny_weights
from ppap_fast.seg_demo import (SEG_METHODS, TARGET_ROW, check_masks, heldout_targets, iou, load_seg_guide,
                                run_segmentation, score_segmentation)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


# ----------------------------------------------------------------------------- labels and metric
def test_ink_mask_is_the_threshold_of_the_clean_image():
    x = torch.tensor([-1.0, -0.2, 0.0, 1e-6, 0.3, 1.0]).view(1, 1, 1, 6)
    assert ink_mask(x).tolist() == [[[0, 0, 0, 1, 1, 1]]]  # value > 0 is ink, 0 itself is not
    with pytest.raises(ValueError, match=r"N x 1 x H x W.*\(2, 16, 16\)"):
        ink_mask(torch.zeros(2, 16, 16))


def test_segnet_training_labels_are_the_ink_of_the_batch_it_sees():
    """train_classifier's labels_fn gets exactly the (shifted) clean batch the net is trained on."""
    from ppap_fast.finetune import train_classifier
    from ppap_fast.models.tiny import SegNet

    x = DigitsSplits.create(0).classifier[0][:40]
    net = SegNet(width=4, depth=1)
    seen_by_net, labelled = [], []
    hook = net.register_forward_pre_hook(lambda m, a: seen_by_net.append(a[0].detach().clone()))

    def labels(xb):
        labelled.append(xb.clone())
        return ink_mask(xb)

    train_classifier(net, x, None, steps=3, batch_size=8, seed=0, progress=False, labels_fn=labels)
    hook.remove()
    assert len(labelled) == 3 and all(torch.equal(a, b) for a, b in zip(labelled, seen_by_net))
    clean = set(x.unique().tolist()) | {-1.0}  # shifted clean images: no noise, only the split's pixel values
    assert all(set(b.unique().tolist()) <= clean for b in labelled)
    with pytest.raises(ValueError, match="got neither"):
        train_classifier(net, x, None, steps=1, progress=False)


def _iou_float(p, t):
    p, t = np.asarray(p, bool).reshape(len(p), -1), np.asarray(t, bool).reshape(len(t), -1)
    out = []
    for a, b in zip(p, t):
        u = float(np.logical_or(a, b).sum())
        out.append(1.0 if u == 0 else float(np.logical_and(a, b).sum()) / u)
    return np.array(out)


def test_iou_matches_a_float_computation():
    # [1 1 0 0] vs [1 0 1 0]: IoU 1/3 (Dice and pixel accuracy would give 0.5); empty vs empty: 1; one empty: 0
    p = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]]])
    t = torch.tensor([[[1, 0, 1, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 1]]])
    torch.testing.assert_close(iou(p, t), torch.tensor([1 / 3, 1.0, 0.0, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(50, 16, 16, generator=g) > 0.6, torch.rand(50, 16, 16, generator=g) > 0.5
    np.testing.assert_allclose(iou(a, b).numpy(), _iou_float(a, b), rtol=0, atol=1e-12)
    assert torch.equal(iou(a, b), iou(b, a)) and bool((iou(a, a) == 1).all())
    # the demo's score: sample i aims at mask i % T
    masks = (torch.rand(3, 16, 16, generator=g) > 0.5).long()
    imgs = np.where(torch.cat([masks, 1 - masks]).numpy()[..., None] == 1, 255, 0).astype(np.uint8)
    s = score_segmentation(imgs, masks)
    assert s["iou_per_target"] == [0.5, 0.5, 0.5] and s["iou"] == 0.5  # exact masks, then their complements


def test_bad_masks_and_images_are_refused_clearly():
    with pytest.raises(ValueError, match=r"one shape \[N, H, W\].*\(2, 16, 16\) and \(2, 8, 8\)"):
        iou(torch.zeros(2, 16, 16, dtype=torch.long), torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="binary mask"):
        iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="binary mask.*values \\[0, 2\\]"):
        iou(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 1]]]))
    with pytest.raises(DemoError, match=r"\[T, 16, 16\].*\(3, 8, 8\)"):
        check_masks(torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(DemoError, match="0 \\(background\\) and 1 \\(ink\\)"):
        check_masks(torch.full((16, 16), 0.5))
    assert check_masks(torch.ones(16, 16, dtype=torch.bool)).shape == (1, 16, 16)
    with pytest.raises(DemoError, match="not a whole number of rounds over 3 targets"):
        score_segmentation(np.zeros((4, 16, 16, 1), np.uint8), torch.zeros(3, 16, 16, dtype=torch.long))
    with pytest.raises(DemoError, match="no samples to score"):  # was an IoU of NaN
        score_segmentation(np.zeros((0, 16, 16, 1), np.uint8), torch.zeros(3, 16, 16, dtype=torch.long))
    with pytest.raises(DemoError, match="unknown segmentation method 'x0hat'"):
        load_seg_guide(WEIGHTS_DIR, "x0hat")


# ----------------------------------------------------------------------------- the shipped weights
def test_shipped_seg_weights_load_and_segment_clean_digits():
    from ppap_fast.models.tiny import load_model

    net = load_model(WEIGHTS_DIR / "segnet.safetensors", "segnet")
    assert net.extra["labelled_images"] == 0 and "value > 0" in net.extra["labels"]
    xe = DigitsSplits.create(0).eval[0]
    with torch.no_grad():
        assert (net(xe).argmax(1) == ink_mask(xe)).float().mean() > 0.98  # held-out clean digits
    x, t = torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])
    for m in SEG_METHODS:
        model, pass_t, info = load_seg_guide(WEIGHTS_DIR, m)
        assert info["labelled_data"] == 0
        if model is not None:
            assert (model(x, t) if pass_t else model(x)).shape == (2, 2, 16, 16), m
    masks, classes = heldout_targets()
    assert masks.shape == (10, 16, 16) and classes.tolist() == list(range(10))
    assert 0.1 < masks.float().mean() < 0.5  # real strokes, not empty or full masks


def test_demo_segmentation_section_runs_on_the_shipped_weights(tmp_path):
    res = run_segmentation(tmp_path, WEIGHTS_DIR, per_target=1, steps=2, progress=False)
    assert list(res["methods"]) == SEG_METHODS and res["num_targets"] == 10
    for m, r in res["methods"].items():
        assert 0 <= r["iou"] <= 1 and len(r["iou_per_target"]) == 10 and r["num_samples"] == 10
        with np.load(tmp_path / f"seg_samples_{m}.npz") as z:
            assert z["images"].shape == (10, 16, 16, 1) and z["labels"].tolist() == list(range(10))
    assert res["methods"]["ppap-5"]["trainable_parameters"] > 0 and res["methods"]["naive"]["scale"] == 10.0
    from PIL import Image

    from ppap_fast.demo import COMPARISON_CELL, comparison_cell
    pic = np.asarray(Image.open(tmp_path / "segmentation.png"))  # rows: target mask, then each method
    assert pic.shape == comparison_cell(1 + len(SEG_METHODS), 10)[::-1]
    masks, _ = heldout_targets()
    x, y = comparison_cell(0, 3)
    want = np.kron(masks[3].numpy().astype(np.uint8) * 255, np.ones((COMPARISON_CELL // 16,) * 2, np.uint8))
    assert np.array_equal(pic[y:y + COMPARISON_CELL, x:x + COMPARISON_CELL], want), TARGET_ROW


@pytest.mark.slow
def test_shipped_seg_guides_raise_iou_above_no_guidance(tmp_path):
    """10 held-out masks, one DDIM-25 sample each, s = 10: both guides raise the IoU above no guidance.
    PPAP-5 does NOT beat naive at s = 10 (0.465 vs 0.638 over 200 samples, docs/demo.md): not asserted."""
    res = run_segmentation(tmp_path, WEIGHTS_DIR, per_target=1, progress=False)["methods"]
    iou_of = {m: r["iou"] for m, r in res.items()}
    assert iou_of["ppap-5"] > iou_of["none"] + 0.05 and iou_of["naive"] > iou_of["none"] + 0.15, iou_of


# ----------------------------------------------------------------------------- the CLI's segmentation task
@pytest.mark.slow
def test_cli_trains_generates_and_distils_the_segmentation_task(tmp_path, capsys):
    w = make_tiny_weights(tmp_path / "w")
    seg = w / "segnet.safetensors"
    seg.unlink()
    assert main(["--threads", "1", "train-classifier", "--arch", "segnet", "--steps", "3", "--out", str(seg),
                 "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["labelled_images"] == 0 and 0 <= info["heldout_pixel_accuracy"] <= 1
    data = tmp_path / "data"
    assert main(["--threads", "1", "generate", "--task", "segmentation", "--weights-dir", str(w), "--out", str(data),
                 "--num-images", "8", "--shard-size", "4", "--steps", "2", "--no-progress"]) == 0
    from ppap_fast.data import ShardSet

    assert ShardSet(data).gather("logits", np.arange(2)).shape == (2, 2, 16, 16)  # per-pixel teacher logits
    # the classifier cannot be distilled on a set whose cached outputs are the segnet's
    assert main(["--threads", "1", "distill", "--weights-dir", str(w), "--data", str(data), "--steps", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "clf5"), "--no-progress"]) == 2
    assert "was generated with --task segmentation: distil it with --task segmentation" in capsys.readouterr().err
    out = w / "seg_ppap5"
    assert main(["--threads", "1", "distill", "--task", "segmentation", "--weights-dir", str(w), "--data", str(data),
                 "--experts", "5", "--steps", "2", "--batch-size", "10", "--out", str(out), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps_done"] == 2
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "SegNet" and cfg["placement"]["rule"] == "generic" and cfg["n_experts"] == 5
    model, pass_t, _ = load_seg_guide(w, "ppap-5")
    assert pass_t and model(torch.zeros(2, 1, 16, 16), torch.tensor([5, 905])).shape == (2, 2, 16, 16)


def test_cli_refuses_missing_seg_weights_and_bad_counts(tmp_path, capsys):
    w = make_tiny_weights(tmp_path / "w")
    (w / "segnet.safetensors").unlink()
    assert main(["demo", "--weights-dir", str(w), "--out", str(tmp_path / "o"), "--num-samples", "10",
                 "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "segnet.safetensors" in err and "--seg-per-target 0" in err and err.count("\n") == 1
    assert not list((tmp_path / "o").glob("*.npz"))  # refused before any sampling
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(tmp_path / "o"), "--seg-per-target", "-1"])
    assert "--seg-per-target" in capsys.readouterr().err
    assert main(["generate", "--task", "segmentation", "--weights-dir", str(w), "--out", str(tmp_path / "d"),
                 "--num-images", "4", "--no-progress"]) == 2
    assert "weight file not found" in capsys.readouterr().err
