"""The semantic segmentation guidance (background / ink of digit 0..9): labels, the context SegNet, scoring,
the comparison on tiny random weights, and the CLI's semantic task. Nothing is downloaded."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from ppap_fast.cli import main
from ppap_fast.data import DigitsSplits, SEMANTIC_CLASSES, ink_mask, semantic_mask
from ppap_fast.demo import DemoError, make_tiny_weights
from ppap_fast.models.tiny import SegNet, load_model, save_model
from ppap_fast.seg_demo import (SEG_METHODS, SEM_PALETTE, SEM_TARGET_ROW, check_semantic_masks, colour_masks,
                                heldout_targets, load_seg_guide, run_semantic, score_semantic, semantic_targets)

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- labels
def test_semantic_mask_marks_ink_with_one_plus_the_class():
    x = torch.tensor([[-1.0, 0.5], [0.0, 1.0]]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    got = semantic_mask(x, torch.tensor([0, 7, 9]))
    assert got.dtype == torch.long and got.tolist() == [[[0, 1], [0, 1]], [[0, 8], [0, 8]], [[0, 10], [0, 10]]]
    assert SEMANTIC_CLASSES == 11 and torch.equal(got > 0, ink_mask(x).bool())


def test_semantic_mask_refuses_bad_input():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        semantic_mask(torch.zeros(2, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"one integer class per image, \[2\].*\(3,\)"):
        semantic_mask(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one integer class per image"):
        semantic_mask(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 10\).*10"):
        semantic_mask(x, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\).*-1"):
        semantic_mask(x, torch.tensor([-1, 0]))


def test_semantic_targets_are_the_stroke_targets_with_their_class():
    sem, classes = semantic_targets()
    ink, classes2 = heldout_targets()
    assert torch.equal(classes, classes2) and classes.tolist() == list(range(10))
    assert torch.equal((sem > 0).long(), ink)
    for c in range(10):
        assert set(sem[c].unique().tolist()) == {0, c + 1}


def test_training_labels_fn_gets_the_batch_and_its_classes():
    from ppap_fast.finetune import train_classifier

    x, y = DigitsSplits.create(0).classifier
    x, y = x[:40], y[:40]
    net = SegNet(width=4, depth=1, num_classes=11, context=1)
    seen = []

    def labels(xb, yb):
        seen.append((xb.clone(), yb.clone()))
        return semantic_mask(xb, yb)

    train_classifier(net, x, y, steps=2, batch_size=8, seed=0, progress=False, labels_fn=labels)
    gen = torch.Generator().manual_seed(0)  # train_classifier's own draw of the first batch
    idx = torch.randint(0, 40, (8,), generator=gen)
    assert len(seen) == 2 and torch.equal(seen[0][1], y[idx])


# ----------------------------------------------------------------------------- the context SegNet
def test_context_branch_sees_the_whole_image_and_round_trips(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 16, 16)
    far = x.clone()
    far[0, 0, 15, 15] += 5.0  # outside pixel (0, 0)'s 7x7 neighbourhood
    for context, changes in ((0, False), (2, True)):
        net = SegNet(width=4, depth=3, num_classes=11, context=context).eval()
        with torch.no_grad():
            a, b = net(x), net(far)
        assert a.shape == (1, 11, 16, 16)
        assert bool((a[0, :, 0, 0] != b[0, :, 0, 0]).any()) is changes, context
        back = load_model(save_model(net, tmp_path / f"s{context}.safetensors"), "segnet")
        with torch.no_grad():
            torch.testing.assert_close(back(x), a)
    assert "context" not in SegNet().config  # the stroke net's files keep their config
    with pytest.raises(ValueError, match="context must be 0"):
        SegNet(context=-1)


# ----------------------------------------------------------------------------- scoring
class _Reads(nn.Module):
    """A stub evaluator that reads sample i as class ``reads[i]``."""

    def __init__(self, reads):
        super().__init__()
        self.reads = torch.as_tensor(reads)
        self.w = nn.Parameter(torch.zeros(1))

    def features(self, x):
        return x.flatten(1)[:, :4] * 0 + torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1)

    def head(self, h):
        return nn.functional.one_hot(self.reads[h[:, 0].long()], 10).to(h.dtype) * 10


def test_score_semantic_on_hand_made_samples():
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[0, :8] = 4  # digit 3 on the top half
    masks[1, :, :4] = 8  # digit 7 on the left quarter
    ink = (masks > 0).numpy()
    images = np.concatenate([ink, ink[:, ::-1, ::-1]])  # exact ink, then rotated by 180 degrees (disjoint)
    images = np.where(images[..., None], 255, 0).astype(np.uint8)
    ev = _Reads([3, 1, 3, 7])  # sample 1 misread, samples 2 and 3 right but their ink is wrong
    s = score_semantic(images, masks, ev)
    assert s["iou"] == 0.5
    assert s["class_accuracy"] == 0.75 and s["success"] == 0.25 and s["success_per_target"] == [0.5, 0.0]


def test_bad_semantic_masks_are_refused():
    with pytest.raises(DemoError, match=r"\[T, 16, 16\].*\(3, 8, 8\)"):
        check_semantic_masks(torch.zeros(3, 8, 8, dtype=torch.long))
    with pytest.raises(DemoError, match="integers 0 \\(background\\) .. 10"):
        check_semantic_masks(torch.full((16, 16), 11))
    with pytest.raises(DemoError, match="integers 0"):
        check_semantic_masks(torch.zeros(16, 16))
    assert check_semantic_masks(torch.zeros(16, 16, dtype=torch.int32)).shape == (1, 16, 16)
    with pytest.raises(DemoError, match="no ink"):
        score_semantic(np.zeros((1, 16, 16, 1), np.uint8), torch.zeros(1, 16, 16, dtype=torch.long), _Reads([0]))
    two = torch.zeros(1, 16, 16, dtype=torch.long)
    two[0, :8], two[0, 8:] = 4, 8  # digits 3 and 7: scored against 7 only
    with pytest.raises(DemoError, match="more than one class"):
        score_semantic(np.zeros((1, 16, 16, 1), np.uint8), two, _Reads([7]))
    m = torch.ones(3, 16, 16, dtype=torch.long)
    with pytest.raises(DemoError, match="not a whole number of rounds over 3 targets"):
        score_semantic(np.zeros((4, 16, 16, 1), np.uint8), m, _Reads([0] * 4))
    with pytest.raises(DemoError, match="unknown dense task 'depth'"):
        load_seg_guide("/nonexistent", "naive", "depth")
    assert colour_masks(torch.tensor([[0, 10]] * 16).repeat(1, 8)).shape == (1, 16, 16, 3)


# ----------------------------------------------------------------------------- the comparison, tiny weights
def test_semantic_comparison_runs_on_tiny_weights(tmp_path):
    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "o"
    res = run_semantic(out, w, per_target=1, steps=2, progress=False)
    assert list(res["methods"]) == SEG_METHODS and res["num_targets"] == 10 and res["success_iou"] == 0.5
    for m, r in res["methods"].items():
        assert 0 <= r["success"] <= r["class_accuracy"] <= 1 and 0 <= r["iou"] <= 1 and r["num_samples"] == 10
        with np.load(out / f"sem_samples_{m}.npz") as z:
            assert z["images"].shape == (10, 16, 16, 1) and z["labels"].tolist() == list(range(10))
    assert res["methods"]["ppap-5"]["trainable_parameters"] > 0 and res["methods"]["naive"]["scale"] == 10.0
    from PIL import Image

    from ppap_fast.demo import COMPARISON_CELL, comparison_cell
    pic = np.asarray(Image.open(out / "semantic.png"))  # RGB: the coloured target row, then each method
    assert pic.shape == comparison_cell(1 + len(SEG_METHODS), 10)[::-1] + (3,)
    masks, _ = semantic_targets()
    x, y = comparison_cell(0, 4)
    want = np.kron(masks[4].numpy(), np.ones((COMPARISON_CELL // 16,) * 2, np.int64))
    assert np.array_equal(pic[y:y + COMPARISON_CELL, x:x + COMPARISON_CELL], SEM_PALETTE[want]), SEM_TARGET_ROW
    with np.load(out / "sem_samples_naive.npz") as z:
        x, y = comparison_cell(2, 0)
        assert np.array_equal(pic[y:y + COMPARISON_CELL, x:x + COMPARISON_CELL, 1],
                              np.kron(z["images"][0, ..., 0], np.ones((COMPARISON_CELL // 16,) * 2, np.uint8)))
    (w / "semseg_ppap5" / "experts.safetensors").unlink()
    with pytest.raises(DemoError, match="semseg_ppap5"):
        run_semantic(tmp_path / "o2", w, per_target=1, steps=2, progress=False)


# ----------------------------------------------------------------------------- the shipped weights
def test_shipped_semantic_weights_segment_held_out_digits():
    from ppap_fast.demo import WEIGHTS_DIR

    net = load_model(WEIGHTS_DIR / "semseg.safetensors", "segnet")
    assert net.config == {"width": 16, "depth": 3, "in_channels": 1, "num_classes": 11, "context": 2}
    xe, ye = DigitsSplits.create(0).eval
    want = semantic_mask(xe, ye)
    with torch.no_grad():
        pred = net(xe).argmax(1)
    assert (pred == want).float().mean() > 0.95 and (pred[want > 0] == want[want > 0]).float().mean() > 0.9
    x, t = torch.zeros(2, 1, 16, 16), torch.tensor([0, 999])
    for m in SEG_METHODS:
        model, pass_t, info = load_seg_guide(WEIGHTS_DIR, m, "semantic")
        assert info["labelled_data"] == 0
        if model is not None:
            assert (model(x, t) if pass_t else model(x)).shape == (2, 11, 16, 16), m
    assert load_seg_guide(WEIGHTS_DIR, "ppap-5", "semantic")[2]["trainable_parameters"] == 5 * 3915


# ----------------------------------------------------------------------------- the CLI's semantic task
def test_cli_trains_generates_and_distils_the_semantic_task(tmp_path, capsys):
    w = make_tiny_weights(tmp_path / "w")
    sem = w / "semseg.safetensors"
    sem.unlink()
    assert main(["--threads", "1", "train-classifier", "--arch", "semseg", "--steps", "2", "--batch-size", "8",
                 "--out", str(sem), "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["labelled_images"] == 500 and 0 <= info["heldout_ink_class_accuracy"] <= 1
    net = load_model(sem, "segnet")
    assert net.config["num_classes"] == 11 and net.config["context"] == 2
    data = tmp_path / "data"
    assert main(["--threads", "1", "generate", "--task", "semantic", "--weights-dir", str(w), "--out", str(data),
                 "--num-images", "4", "--shard-size", "4", "--steps", "2", "--no-progress"]) == 0
    from ppap_fast.data import ShardSet

    assert ShardSet(data).gather("logits", np.arange(2)).shape == (2, 11, 16, 16)
    out = w / "semseg_ppap5"
    assert main(["--threads", "1", "distill", "--task", "semantic", "--weights-dir", str(w), "--data", str(data),
                 "--experts", "5", "--steps", "1", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["placement"]["rule"] == "generic" and cfg["n_experts"] == 5
    model, pass_t, _ = load_seg_guide(w, "ppap-5", "semantic")
    assert pass_t and model(torch.zeros(2, 1, 16, 16), torch.tensor([5, 905])).shape == (2, 11, 16, 16)
    # the stroke task cannot distil a set whose cached outputs are the semantic net's
    assert main(["--threads", "1", "distill", "--task", "segmentation", "--weights-dir", str(w), "--data", str(data),
                 "--steps", "1", "--batch-size", "4", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    capsys.readouterr()
    sem.unlink()
    assert main(["generate", "--task", "semantic", "--weights-dir", str(w), "--out", str(tmp_path / "d"),
                 "--num-images", "4", "--no-progress"]) == 2
    assert "semseg.safetensors" in capsys.readouterr().err
