"""`ppap-fast demo` end to end on tiny untrained weights (fast); the real run uses ppap_fast/weights."""
import json

import numpy as np
import pytest

from ppap_fast.cli import main
from ppap_fast.demo import DEMO_METHODS, make_tiny_weights


def _kill_at_the_second_call(monkeypatch, module, name: str = "sample_method"):
    """module.<name> (a sampling step of the demo) raises KeyboardInterrupt at its second call; returns the list
    of methods it was called with and the real function."""
    real, calls = getattr(module, name), []

    def killed_at_the_second_call(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, killed_at_the_second_call)
    return calls, real


@pytest.mark.slow
def test_demo_writes_every_artefact(tmp_path, capsys):
    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    assert main(["demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10", "--steps", "2",
                 "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == DEMO_METHODS
    for m in DEMO_METHODS:
        r = res["methods"][m]
        for key in ("target_accuracy", "fd", "is", "precision", "recall", "trainable_parameters", "labelled_data",
                    "nfe_per_sample", "seconds", "peak_rss_mb", "peak_rss_delta_mb"):
            assert key in r, (m, key)
        with np.load(out / f"samples_{m}.npz") as z:
            assert z["images"].dtype == np.uint8 and z["images"].shape == (10, 16, 16, 1)
            assert z["labels"].dtype == np.int64 and z["labels"].tolist() == list(range(10))
        assert (out / f"grid_{m}.png").stat().st_size > 0
    assert res["methods"]["none"]["trainable_parameters"] == 0
    assert res["methods"]["ppap-10"]["labelled_data"] == 0 and res["methods"]["multi-experts-5"]["labelled_data"] == 500
    assert res["methods"]["x0hat"]["nfe_per_sample"] == 4  # the UNet runs again inside the x0-hat guide
    assert (out / "results.png").stat().st_size > 0
    from PIL import Image

    from ppap_fast.demo import COMPARISON_CELL, comparison_cell
    pic = np.asarray(Image.open(out / "comparison.png"))  # a row per method, a column per target class
    assert pic.shape == comparison_cell(len(DEMO_METHODS), 10)[::-1]
    for i, m in enumerate(DEMO_METHODS):
        with np.load(out / f"samples_{m}.npz") as z:
            for j in (0, 7):
                x, y = comparison_cell(i, j)
                want = np.kron(z["images"][j, ..., 0], np.ones((COMPARISON_CELL // 16,) * 2, np.uint8))
                assert np.array_equal(pic[y:y + COMPARISON_CELL, x:x + COMPARISON_CELL], want), (m, j)
    from ppap_fast.seg_demo import SEG_METHODS
    seg = res["segmentation"]  # the segmentation comparison: 2 samples for each of the 10 held-out masks
    assert list(seg["methods"]) == SEG_METHODS and seg["per_target"] == 2 and seg["num_targets"] == 10
    for m in SEG_METHODS:
        assert 0 <= seg["methods"][m]["iou"] <= 1 and seg["methods"][m]["num_samples"] == 20, m
        with np.load(out / f"seg_samples_{m}.npz") as z:
            assert z["images"].shape == (20, 16, 16, 1)
    seg_pic = np.asarray(Image.open(out / "segmentation.png"))  # target masks, then a row per method
    assert seg_pic.shape == comparison_cell(1 + len(SEG_METHODS), 10)[::-1]
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    table = capsys.readouterr().out
    assert "| method" in table and "ppap-10" in table
    assert "segmentation guidance" in table and "| IoU" in table


def test_grid_has_one_row_per_class_present(tmp_path):
    from PIL import Image

    from ppap_fast.demo import save_grid

    imgs = np.random.default_rng(0).integers(1, 255, (5, 16, 16, 1), dtype=np.uint8)
    labels = np.array([3, 7, 3, 7, 7])
    with Image.open(save_grid(tmp_path / "g.png", imgs, labels, per_class=3, scale=1)) as im:
        assert im.size == (3 * 17 + 1, 2 * 17 + 1)  # rows 3 and 7 only, not 8 empty ones
        px = np.asarray(im)
    assert (px[1:17, 1:17] == imgs[0, ..., 0]).all() and (px[18:34, 35:51] == imgs[4, ..., 0]).all()
    with Image.open(save_grid(tmp_path / "all.png", np.repeat(imgs, 2, 0), np.arange(10), per_class=1, scale=1)) as im:
        assert im.size == (18, 10 * 17 + 1)


def test_tiny_weights_record_their_teachers_raw_input(tmp_path):
    """make_tiny_weights saved its experts recording no input transform, so a normalised guide of them
    (GuideModel.guide, guided-sample, ClassGuide) was not refused: they record raw x_t, as cli distill's."""
    from ppap_fast.demo import load_classifier
    from ppap_fast.experts import load_experts
    from ppap_fast.guidance import ClassGuide, input_transform

    w = make_tiny_weights(tmp_path / "w")
    for d in ("ppap5", "ppap10", "seg_ppap5", "semseg_ppap5"):
        assert json.loads((w / d / "config.json").read_text())["input_transform"] == {"raw": True}, d
    bank = load_experts(w / "ppap5", load_classifier(w))
    with pytest.raises(ValueError, match="distilled through raw x_t"):
        ClassGuide(bank, 1, input_transform=input_transform((0.5,), (0.5,), 16))
    assert ClassGuide(bank, 1).model is bank


def test_bad_seg_per_target_is_refused_before_the_output_directory_is_made(tmp_path):
    from ppap_fast.demo import DemoError, run_demo

    with pytest.raises(DemoError, match="seg_per_target"):
        run_demo(tmp_path / "never", seg_per_target=-1)
    assert not (tmp_path / "never").exists()


def test_an_interrupted_rerun_leaves_no_older_summary(tmp_path, monkeypatch):
    """A rerun into a previous demo's --out stopped mid-way left the old results.json / comparison.png beside
    its new samples_*.npz; segmentation.png stayed after a rerun with --seg-per-target 0."""
    from ppap_fast import demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.json", "results.png", "comparison.png", "segmentation.png"):
        (out / name).write_text("an older run's")
    names = ("results.json", "results.png", "comparison.png", "segmentation.png")
    demo._write_demo_record(out, {n: demo._file_entry(out / n) for n in names})  # as the older run recorded them
    calls, _ = _kill_at_the_second_call(monkeypatch, demo)
    args = ["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10", "--steps",
            "2", "--methods", "none,naive", "--seg-per-target", "0", "--no-progress"]
    assert main(args) == 2
    assert (out / "samples_none.npz").exists() and not (out / "results.json").exists()
    assert not (out / "comparison.png").exists() and not (out / "segmentation.png").exists()
    assert main(args) == 0 and not (out / "segmentation.png").exists()
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["none", "naive"]


@pytest.mark.parametrize("methods,named", [("none,naive, none", "'none' and 'none'"),
                                           ("ppap-5,PPAP-5", "'ppap-5' and 'PPAP-5'"),
                                           ("noise-aware,single", "'noise-aware' and 'single'")])
def test_demo_refuses_a_method_named_twice(methods, named, tmp_path, capsys):
    """--methods none,none sampled none twice and reported it once (results keyed by name)."""
    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    assert main(["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10",
                 "--steps", "2", "--methods", methods, "--seg-per-target", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--methods names one method twice ({named})" in err and not out.exists()


def test_a_users_summary_named_files_stay_when_no_demo_run_wrote_them(tmp_path, monkeypatch):
    """At start the demo removed results.json / results.png / comparison.png / segmentation.png by name although no
    earlier demo run wrote them: a user's results.json in --out was lost (here: the run stops before writing its own)."""
    from ppap_fast import demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    out.mkdir()
    names = ["results.json", "results.png", "comparison.png", "segmentation.png"]
    for name in names:
        (out / name).write_text("mine")

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "sample_method", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, w, methods=["none"], num_samples=10, steps=2, progress=False, seg_per_target=1)
    assert [(out / n).read_text() for n in names] == ["mine"] * 4


@pytest.mark.parametrize("theirs", ['{"files": ["notes.txt"]}', "my notes", '["notes.txt"]'])
def test_a_demo_outputs_json_the_demo_did_not_write_is_refused(tmp_path, monkeypatch, theirs):
    """A user's own demo_outputs.json in --out was overwritten (and the files it listed removed as stale)."""
    from ppap_fast import demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / demo.DEMO_RECORD).write_text(theirs)
    monkeypatch.setattr(demo, "sample_method", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(demo.DemoError, match=r"demo_outputs\.json was not written by ppap-fast demo.*another --out"):
        demo.run_demo(out, w, methods=["none"], num_samples=10, steps=2, progress=False, seg_per_target=0)
    assert (out / demo.DEMO_RECORD).read_text() == theirs and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == [demo.DEMO_RECORD, "notes.txt"]


def test_rerun_with_fewer_methods_removes_the_others_samples_and_grids(tmp_path):
    """A rerun with fewer --methods left the earlier run's samples_<m>.npz / grid_<m>.png of the others;
    a killed run's atomic-write temporaries stayed for good."""
    from ppap_fast.demo import DEMO_RECORD, _file_entry, _write_demo_record

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    out.mkdir()
    stale = ["samples_ppap-5.npz", "grid_ppap-5.png", "samples_multi-experts-5.npz", "grid_NAIVE.png"]
    mine = ["samples_mine.npz", "grid_ppap-5.txt", "notes.txt", "samples_naive.npz"]  # not recorded: kept
    for name in stale + mine:
        (out / name).write_text("an older run's")
    _write_demo_record(out, {n: _file_entry(out / n) for n in stale})  # as the older run recorded them
    temps = [".samples_none.npz.abcd1234.npz.tmp", ".grid_ppap-5.png.k2j4x_9z.png.tmp",
             f".{DEMO_RECORD}.q1w2e3r4.json.tmp"]  # the names shards._atomic makes
    mine += [".samples_none.npz.mine.tmp", "samples_none.npz.tmp", ".notes.txt.abcd1234.txt.tmp"]
    for name in temps + mine[-3:]:
        (out / name).write_text("an older run's")
    assert main(["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10",
                 "--steps", "2", "--methods", "none", "--seg-per-target", "0", "--no-progress"]) == 0
    assert not [n for n in stale + temps if (out / n).exists()]
    assert all((out / n).read_text() == "an older run's" for n in mine)
    assert (out / "samples_none.npz").exists() and (out / "grid_none.png").exists()
    files = json.loads((out / DEMO_RECORD).read_text())["files"]
    assert sorted(files) == sorted(["samples_none.npz", "grid_none.png", "results.json", "results.png",
                                    "comparison.png"])
    assert all(files[n] == _file_entry(out / n) for n in files)


def test_rerun_removes_only_what_an_earlier_demo_run_wrote(tmp_path):
    """A user's samples_none.npz in --out was removed as another method's; an earlier run's seg_samples_<m>.npz
    and segmentation.png stayed after a rerun with --seg-per-target 0."""
    from ppap_fast.seg_demo import SEG_METHODS

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    args = ["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10",
            "--steps", "2", "--no-progress"]
    assert main(args + ["--methods", "naive,ppap-5", "--seg-per-target", "1"]) == 0
    earlier = ["samples_ppap-5.npz", "grid_ppap-5.png", "segmentation.png"] + [f"seg_samples_{m}.npz"
                                                                             for m in SEG_METHODS]
    assert all((out / n).is_file() for n in earlier)
    mine = ["samples_none.npz", "grid_x0hat.png"]  # named as demo outputs, but the user's
    for name in mine:
        (out / name).write_text("mine")
    assert main(args + ["--methods", "naive", "--seg-per-target", "0"]) == 0
    assert not [n for n in earlier if (out / n).exists()]
    assert all((out / n).read_text() == "mine" for n in mine)
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["naive"] and "segmentation" not in res


@pytest.mark.parametrize("sampler", [[], ["--ddpm"]])
def test_a_step_count_the_sampler_cannot_take_keeps_the_earlier_runs_outputs(tmp_path, capsys, sampler):
    """--steps 1001 was refused only at the first method's sampling, after the earlier run's results.json,
    results.png and comparison.png were removed."""
    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    args = ["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10",
            "--methods", "none", "--seg-per-target", "0", "--no-progress"]
    assert main(args + ["--steps", "2"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"results.json", "results.png", "comparison.png"} <= set(before)
    capsys.readouterr()
    assert main(args + ["--steps", "1001", *sampler]) == 2
    assert "bad step count 1001" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_file_put_in_place_of_a_recorded_output_is_kept(tmp_path, monkeypatch):
    """demo_outputs.json listed names only: a user's file that replaced an earlier run's output of the same name
    (same size here) was removed as stale."""
    from ppap_fast import demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    args = ["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10",
            "--steps", "2", "--no-progress", "--seg-per-target", "0"]
    assert main(args + ["--methods", "ppap-5"]) == 0
    mine = {n: b"m" * (out / n).stat().st_size for n in ("samples_ppap-5.npz", "results.json")}  # recorded sizes
    mine["results.png"] = b"mine"
    for name, data in mine.items():
        (out / name).write_bytes(data)

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "sample_method", stopped)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, w, methods=["none"], num_samples=10, steps=2, progress=False, seg_per_target=0)
    assert {n: (out / n).read_bytes() for n in mine} == mine
    assert not (out / "grid_ppap-5.png").exists() and not (out / "comparison.png").exists()  # unchanged: removed
    assert json.loads((out / demo.DEMO_RECORD).read_text())["files"] == {}  # the kept files are the user's now


def test_a_run_killed_in_the_segmentation_step_records_what_it_wrote(tmp_path, monkeypatch):
    """seg_samples_<m>.npz were recorded only after the whole segmentation step: a run killed at its second method
    left the first one's file unrecorded, so a rerun with --seg-per-target 0 never removed it."""
    from ppap_fast import demo, seg_demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    calls, real = _kill_at_the_second_call(monkeypatch, seg_demo, "sample_seg_method")
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(out, w, methods=["none"], num_samples=10, steps=2, progress=False, seg_per_target=1)
    first = out / f"seg_samples_{calls[0]}.npz"
    assert first.is_file()
    assert json.loads((out / demo.DEMO_RECORD).read_text())["files"][first.name] == demo._file_entry(first)
    monkeypatch.setattr(seg_demo, "sample_seg_method", real)
    demo.run_demo(out, w, methods=["none"], num_samples=10, steps=2, progress=False, seg_per_target=0)
    assert not first.exists()


def test_a_rerun_stopped_early_leaves_none_of_the_earlier_runs_samples(tmp_path, monkeypatch):
    """A rerun with another --seed stopped at its second method left the earlier run's samples_naive.npz and
    grid_naive.png beside its own samples_none.npz: two runs' samples mixed in one --out, nothing saying so."""
    from ppap_fast import demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    args = ["--threads", "1", "demo", "--weights-dir", str(w), "--out", str(out), "--num-samples", "10", "--steps",
            "2", "--methods", "none,naive", "--seg-per-target", "0", "--no-progress"]
    assert main(args) == 0
    seed0 = (out / "samples_none.npz").read_bytes()
    calls, _ = _kill_at_the_second_call(monkeypatch, demo)
    assert main(args + ["--seed", "1"]) == 2
    assert (out / "samples_none.npz").read_bytes() != seed0  # this run's
    assert sorted(p.name for p in out.iterdir()) == [demo.DEMO_RECORD, "grid_none.png", "samples_none.npz"]
    assert sorted(json.loads((out / demo.DEMO_RECORD).read_text())["files"]) == ["grid_none.png", "samples_none.npz"]


@pytest.mark.parametrize("fails_at", ["record", "results.png"])
def test_a_full_disk_leaves_no_output_unrecorded(tmp_path, monkeypatch, fails_at):
    """demo_outputs.json failing to update after samples_none.npz was written (or results.png failing after
    results.json) left that file unrecorded: a later run kept it as the user's."""
    import errno

    from ppap_fast import demo

    w = make_tiny_weights(tmp_path / "w")
    out = tmp_path / "out"
    full = OSError(errno.ENOSPC, "No space left on device")
    real_record = demo._write_demo_record

    def record_fails_once_samples_exist(path, files):
        if "samples_none.npz" in files:
            raise full
        return real_record(path, files)

    def chart_fails(*a, **k):
        raise full

    if fails_at == "record":
        monkeypatch.setattr(demo, "_write_demo_record", record_fails_once_samples_exist)
    else:
        monkeypatch.setattr(demo, "save_bar_chart", chart_fails)
    with pytest.raises(OSError, match="No space left on device"):
        demo.run_demo(out, w, methods=["none"], num_samples=10, steps=2, progress=False, seg_per_target=0)
    recorded = json.loads((out / demo.DEMO_RECORD).read_text())["files"]
    on_disk = sorted(p.name for p in out.iterdir() if p.name != demo.DEMO_RECORD)
    assert on_disk == sorted(recorded) and all(recorded[n] == demo._file_entry(out / n) for n in on_disk)
    assert ("results.json" in on_disk) == (fails_at == "results.png")
