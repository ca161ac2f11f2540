"""Output handling of guided-sample and the CLI (shape mismatches, outputs that are directories, interrupted writes, empty inputs) and degenerate metric inputs: one-line errors before any work, nothing stale or lost."""
import json
import pathlib

import numpy as np
import pytest

from ppap_fast import cli
from ppap_fast.cli import main
from ppap_fast.demo import WEIGHTS_DIR

RC = ["--denoiser", "random-conv", "--num-samples", "2", "--batch-size", "2", "--steps", "2", "--no-progress"]
TINY = ["--denoiser", "tiny", "--checkpoint", str(WEIGHTS_DIR / "unet.safetensors"), "--num-samples", "1",
        "--batch-size", "1", "--steps", "2", "--no-progress"]


@pytest.mark.parametrize("extra,msg", [
    ([*TINY, "--channels", "3", "--image-size", "16"], "--channels"),
    ([*TINY, "--channels", "1", "--image-size", "15"], "--image-size"),
    ([*RC, "--channels", "3", "--image-size", "16", "--guide", f"tiny:{WEIGHTS_DIR / 'classifier.safetensors'}",
      "--targets", "1"], "guide"),
])
def test_guided_sample_shape_mismatch_is_one_line(tmp_path, capsys, extra, msg):
    assert main(["guided-sample", "--out", str(tmp_path / "s.npz"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_guided_sample_zero_image_size_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse refuses it before start-up
        main(["guided-sample", "--out", str(tmp_path / "s.npz"), *RC, "--channels", "1", "--image-size", "0"])
    assert e.value.code == 2 and "--image-size: must be a positive integer, got 0" in capsys.readouterr().err


def test_guided_sample_out_is_a_directory_fails_before_sampling(tmp_path, capsys, monkeypatch):
    import ppap_fast.guided_sample as gs

    (tmp_path / "s.npz").mkdir()
    monkeypatch.setattr(gs, "_build_guide", lambda *a: pytest.fail("worked before refusing"))
    assert main(["guided-sample", "--out", str(tmp_path / "s.npz"), *RC, "--channels", "1", "--image-size", "8"]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_guided_sample_interrupted_leaves_no_stale_stats(tmp_path, monkeypatch):
    import ppap_fast.guided_sample as gs

    out = tmp_path / "s.npz"
    args = ["guided-sample", "--out", str(out), *RC, "--channels", "1", "--image-size", "8"]
    assert main([*args, "--seed", "1"]) == 0
    monkeypatch.setattr(gs, "save_image_grid", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([*args, "--seed", "2"]) == 2
    js = out.with_suffix(".json")
    assert not js.exists() or json.loads(js.read_text())["config"]["seed"] == 2


def test_demo_empty_methods_is_refused(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--methods", ",", "--no-progress"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_evaluate_empty_sample_file(tmp_path, capsys):
    p = tmp_path / "e.npz"
    np.savez(p, images=np.zeros((0, 16, 16, 1), np.uint8), labels=np.zeros(0, np.int64))
    assert main(["evaluate", str(p)]) == 2
    assert "at least 4 samples" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["finetune", "--steps", "1", "--no-progress"], ["train-classifier", "--steps", "1", "--no-progress"],
    ["train-diffusion", "--steps", "1", "--no-progress"]])
def test_out_file_that_is_a_directory_is_refused_first(tmp_path, capsys, argv):
    (tmp_path / "d").mkdir()
    assert main([*argv, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and ".tmp" not in err


def test_atomic_dir_interrupted_between_renames_keeps_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "ppap5"
    cli._atomic_dir(out, lambda d: (d / "config.json").write_text("v1"))
    orig = pathlib.Path.rename

    def rename(self, target):
        if str(self).endswith(".tmp"):
            raise KeyboardInterrupt
        return orig(self, target)

    monkeypatch.setattr(pathlib.Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        cli._atomic_dir(out, lambda d: (d / "config.json").write_text("v2"))
    monkeypatch.undo()
    assert (out / "config.json").read_text() == "v1"
    # a kill (no handler) leaves only the hidden copy: the next run puts it back before deciding
    out.rename(tmp_path / ".ppap5.old")
    with pytest.raises(RuntimeError):
        cli._atomic_dir(out, lambda d: (_ for _ in ()).throw(RuntimeError("boom")))
    assert (out / "config.json").read_text() == "v1"


def test_atomic_dir_removes_a_killed_runs_temporary_of_that_name_only(tmp_path):
    out = tmp_path / "run[1]"
    killed = tmp_path / ".run[1].ab_3xy9z.tmp"  # what mkdtemp names it; a SIGKILL runs no cleanup
    (killed / "sub").mkdir(parents=True)
    keep = [tmp_path / ".run[1].abcdefgh.tmp.bak", tmp_path / ".run[1].abc.tmp", tmp_path / ".run1.abcdefgh.tmp",
            tmp_path / ".other.abcdefgh.tmp"]
    for k in keep:
        k.mkdir()
    (tmp_path / ".run[1].zzzzzzzz.tmp").write_text("a file, not ours")
    cli._atomic_dir(out, lambda d: (d / "config.json").write_text("v1"))
    assert (out / "config.json").read_text() == "v1" and not killed.exists()
    assert all(k.is_dir() for k in keep) and (tmp_path / ".run[1].zzzzzzzz.tmp").is_file()


def test_train_diffusion_checkpoint_is_written_by_the_atomic_writer(tmp_path, monkeypatch):
    # the checkpoint had its own torch.save + rename (nothing fsynced); a killed write's temporary stays
    from ppap_fast import demo
    from ppap_fast.data import shards

    stale = tmp_path / ".u.safetensors.ckpt.pt.k2j4x9ab.pt.tmp"  # mkstemp: 8 random characters
    stale.write_bytes(b"partial")
    written = []

    def spy(path, write_fn, suffix):
        written.append(pathlib.Path(path).name)
        return shards._atomic(path, write_fn, suffix)

    monkeypatch.setattr(demo, "_atomic", spy, raising=False)
    assert main(["train-diffusion", "--out", str(tmp_path / "u.safetensors"), "--steps", "1", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert written == ["u.safetensors.ckpt.pt"] and not stale.exists()
    assert (tmp_path / "u.safetensors.ckpt.pt").stat().st_size > 0 and not list(tmp_path.glob(".*.tmp"))


def test_metrics_degenerate_inputs():
    from ppap_fast.metrics import frechet_distance, inception_score, precision_recall

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 1)), rng.normal(size=(12, 1)) + 3
    va, vb = a.var(ddof=1), b.var(ddof=1)
    assert frechet_distance(a, b) == pytest.approx((a.mean() - b.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb))
    r, f = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    f[0] = np.nan
    for fn in (lambda: precision_recall(r, f), lambda: frechet_distance(f, r),
               lambda: inception_score(np.array([[np.nan, 1.0]])), lambda: inception_score(np.zeros((0, 3))),
               lambda: precision_recall(r, r, k=0)):
        with pytest.raises(ValueError):
            fn()
