"""Bad input to the CLI and the examples found by a user's audit: one line, exit status 2, nothing written."""
import shutil

import pytest

from ppap_fast.cli import main
from test_cli import _err, weights  # noqa: F401  (weights: the tiny-weights fixture)


@pytest.mark.parametrize("task, file, other", [("semantic", "semseg.safetensors", "segnet.safetensors"),
                                               ("segmentation", "segnet.safetensors", "semseg.safetensors")])
def test_generate_refuses_the_other_segmentation_net(tmp_path, capsys, weights, task, file, other):
    """Both nets are segnets: a 2-class stroke net as semseg.safetensors (or the 11-class semantic one as
    segnet.safetensors) cached the wrong net's outputs for --task, silently."""
    w = tmp_path / "w"
    shutil.copytree(weights, w)
    shutil.copy(weights / other, w / file)
    out = tmp_path / "set"
    assert main(["generate", "--weights-dir", str(w), "--task", task, "--out", str(out), "--num-images", "2",
                 "--steps", "2", "--no-progress"]) == 2
    err = _err(capsys)
    want = {"semantic": "11-class", "segmentation": "2-class"}[task]
    assert str(w / file) in err and f"--task {task} needs the {want} one" in err, err
    assert not out.exists()  # refused before the folder was made


def _npz(path, n, c):
    import numpy as np

    np.savez(path, images=np.random.default_rng(0).integers(0, 256, (n, 16, 16, c), dtype=np.uint8),
             targets=np.arange(n) % 10)
    return str(path)


@pytest.mark.parametrize("real", [False, True])
def test_score_refuses_images_of_another_channel_count_than_the_classifier(tmp_path, capsys, real):
    """1-channel digits scored by a registry classifier (3-channel statistics) ended in a bare
    'ValueError: InputTransform has 3 channel statistics', naming neither the images nor a fix."""
    rgb, grey = _npz(tmp_path / "rgb.npz", 8, 3), _npz(tmp_path / "grey.npz", 8, 1)
    samples, extra = (rgb, ["--real", grey]) if real else (grey, [])
    assert main(["score", samples, *extra, "--classifier", "resnet18", "--classifier-weights", "none",
                 "--device", "cpu", "--no-progress", "--json", str(tmp_path / "s.json")]) == 2
    err = _err(capsys)
    what = "real images" if real else "samples"
    assert f"takes 3-channel images, the {what} have 1 (16 x 16 x 1)" in err and "--classifier" in err, err
    assert not (tmp_path / "s.json").exists()


EXAMPLES = ["guide_a_sampling_loop.py", "guided_diffusion_cond_fn.py", "diffusers_schedulers.py",
            "distill_your_own_experts.py", "why_experts.py", "dense_guide_strength.py"]


def _run_example(tmp_path, name, *args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(repo / "examples" / name), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    err = proc.stderr.strip().splitlines()  # argparse's usage, then its one error line
    assert proc.returncode == 2 and err[-1].startswith(f"{name}: error: argument "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return err[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_out_naming_a_file_is_a_usage_error(tmp_path, name):
    """--out naming a file ran the whole example, then ended in a FileExistsError traceback when saving."""
    (tmp_path / "taken").write_text("mine")
    err = _run_example(tmp_path, name, "--out", "taken")
    assert "argument --out: taken is a file" in err, err
    assert (tmp_path / "taken").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES[:4])
@pytest.mark.parametrize("dev, why", [("cuda", "CUDA is not available"), ("gpu", "Expected one of")])
def test_example_unavailable_device_is_a_usage_error(tmp_path, name, dev, why):
    """--device cuda on a machine without CUDA (or a misspelt device) was a traceback after loading the models."""
    import torch

    if dev == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    err = _run_example(tmp_path, name, "--out", str(tmp_path / "out"), "--device", dev)
    assert f"argument --device: {why}" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("digits", ["12", "a", "3,,4"])
def test_guide_a_sampling_loop_bad_digits_are_a_usage_error(tmp_path, digits):
    """--digits 12 ended in ClassGuide's ValueError traceback after loading, 'a' in int()'s."""
    err = _run_example(tmp_path, "guide_a_sampling_loop.py", "--out", str(tmp_path / "out"), "--digits", digits)
    assert "argument --digits:" in err and "comma-separated digits in 0..9" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cmd", [["sample", "--method", "none", "--num-samples", "1"],
                                 ["generate", "--num-images", "2"], ["demo", "--num-samples", "10"],
                                 ["guided-sample", "--denoiser", "tiny", "--image-size", "16", "--channels", "1",
                                  "--guide", "none", "--num-samples", "1"]])
def test_one_ddim_step_names_the_cli_fix(tmp_path, capsys, weights, cmd):
    """--steps 1 (a positive integer, as --help asks) was refused with 'use respacing '1'', an option no
    command has."""
    out = tmp_path / ("o.npz" if cmd[0] in ("sample", "guided-sample") else "o")
    extra = ["--checkpoint", str(weights / "unet.safetensors")] if cmd[0] == "guided-sample" else \
        ["--weights-dir", str(weights)]
    assert main([*cmd, *extra, "--steps", "1", "--out", str(out), "--no-progress"]) == 2
    err = _err(capsys)
    assert "DDIM needs --steps 2 or more" in err and "respacing" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("cmd", [["sample", "--method", "none", "--num-samples", "1", "--steps", "2",
                                  "--out", "{new}/deeper/s.npz"],
                                 ["demo", "--num-samples", "10", "--steps", "2", "--out", "{new}/deeper"],
                                 ["evaluate", "{samples}", "--json", "{new}/deeper/m.json"]])
def test_failed_run_leaves_no_new_empty_output_folder(tmp_path, capsys, cmd):
    """Missing weights were reported after --out's folders were made: each failed run left them empty."""
    import numpy as np

    np.savez(tmp_path / "s.npz", images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.arange(4))
    argv = [a.format(new=tmp_path / "new", samples=tmp_path / "s.npz") for a in cmd]
    assert main([*argv, "--weights-dir", str(tmp_path / "no_weights")]) == 2
    assert "weight file not found" in _err(capsys)
    assert not (tmp_path / "new").exists()


def test_evaluate_json_under_a_file_is_refused_before_scoring(tmp_path, capsys, weights, monkeypatch):
    """--json FILE/m.json was refused only after the samples were read and scored."""
    import numpy as np

    from ppap_fast import demo

    np.savez(tmp_path / "s.npz", images=np.zeros((4, 16, 16, 1), np.uint8), labels=np.arange(4))
    (tmp_path / "f").write_text("")
    scored = []
    monkeypatch.setattr(demo, "evaluate_samples", lambda *a: scored.append(1) or {})
    assert main(["evaluate", str(tmp_path / "s.npz"), "--weights-dir", str(weights),
                 "--json", str(tmp_path / "f" / "m.json")]) == 2
    assert "is an existing file, not a directory" in _err(capsys) and not scored


@pytest.mark.slow
def test_reading_a_whole_data_free_set_shows_a_bar(tmp_path, capsys, weights):
    """info --verify-data and distill read and CRC-check every shard (slow for large sets) with no progress bar."""
    data = tmp_path / "set"
    assert main(["generate", "--weights-dir", str(weights), "--out", str(data), "--num-images", "4",
                 "--shard-size", "2", "--steps", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(data), "--verify-data"]) == 0
    assert "verifying shards" in capsys.readouterr().err
    assert main(["info", str(data), "--verify-data", "--no-progress"]) == 0
    assert "verifying shards" not in capsys.readouterr().err
    assert main(["distill", "--weights-dir", str(weights), "--data", str(data), "--experts", "1", "--steps", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "e")]) == 0
    assert "verifying shards" in capsys.readouterr().err


def test_guided_sample_at_another_size_than_the_denoiser_declares_is_one_line_naming_it(tmp_path, capsys, weights,
                                                                                       recwarn):
    """The tiny UNet at the default 3 x 256 x 256 printed a UserWarning, then the error, neither naming the
    options' values that fit."""
    out = tmp_path / "s.npz"
    assert main(["guided-sample", "--denoiser", "tiny", "--checkpoint", str(weights / "unet.safetensors"),
                 "--guide", "none", "--steps", "2", "--num-samples", "1", "--out", str(out), "--no-progress"]) == 2
    err = _err(capsys)
    assert "(it declares 1 x 16 x 16: --channels 1 --image-size 16) does not take [1, 3, 256, 256]" in err, err
    assert not [w for w in recwarn if "declares" in str(w.message)]  # the error alone, no warning before it
    assert not out.exists()


@pytest.mark.parametrize("cmd", [["sample", "--method", "none", "--num-samples", "1"],
                                 ["guided-sample", "--denoiser", "tiny", "--image-size", "16", "--channels", "1",
                                  "--guide", "none", "--num-samples", "1"]])
def test_one_ddpm_step_is_refused(tmp_path, capsys, weights, cmd):
    """--sampler ddpm --steps 1 took the single step t = 0 and wrote the initial noise as samples, silently."""
    out = tmp_path / "o.npz"
    extra = ["--checkpoint", str(weights / "unet.safetensors")] if cmd[0] == "guided-sample" else \
        ["--weights-dir", str(weights)]
    assert main([*cmd, *extra, "--sampler", "ddpm", "--steps", "1", "--out", str(out), "--no-progress"]) == 2
    assert "DDPM needs --steps 2 or more" in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("cmd", [["train-diffusion"], ["train-classifier"], ["finetune", "--experts", "2"]])
def test_safetensors_writers_refuse_another_suffix(tmp_path, capsys, weights, cmd):
    """train-diffusion / train-classifier / finetune --out x.npz wrote a safetensors file under an .npz name."""
    extra = ["--weights-dir", str(weights)] if cmd[0] == "finetune" else []
    assert main([*cmd, *extra, "--steps", "1", "--out", str(tmp_path / "m.npz"), "--no-progress"]) == 2
    assert _err(capsys).endswith(f"--out {tmp_path / 'm.npz'}: this command writes a safetensors file; "
                                 "name it *.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd, says", [
    (["train-diffusion", "--out", "{new}/deeper/u.npz"], "name it *.safetensors"),
    (["train-classifier", "--arch", "resnet", "--out", "{new}/deeper/c.npz"], "name it *.safetensors"),
    (["finetune", "--weights-dir", "{w}", "--experts", "1", "--out", "{new}/deeper/m.npz"], "name it *.safetensors"),
    (["distill", "--weights-dir", "{w}", "--data", "{new}/no_set", "--out", "{new}/deeper/e"], "no_set"),
])
def test_refused_training_leaves_no_new_empty_output_folder(tmp_path, capsys, weights, cmd, says):
    """train-* / finetune / distill made --out's folders, then refused the run: the folders stayed, empty."""
    argv = [a.format(new=tmp_path / "new", w=weights) for a in cmd]
    assert main([*argv, "--steps", "1", "--no-progress"]) == 2
    err = _err(capsys)
    assert says in err, err
    assert not (tmp_path / "new").exists()


KILLED_RUNS = {  # the command, the function its work runs in
    "train-diffusion": (["train-diffusion"], "ppap_fast.demo.train_diffusion"),
    "train-classifier": (["train-classifier", "--arch", "resnet"], "ppap_fast.finetune.train_classifier"),
    "finetune": (["finetune", "--weights-dir", "{w}", "--experts", "1"], "ppap_fast.finetune.finetune_noise_aware"),
    "generate": (["generate", "--weights-dir", "{w}", "--num-images", "2"], "ppap_fast.distill.generate_datafree"),
}


@pytest.mark.parametrize("leaves_state", [False, True])
@pytest.mark.parametrize("name", sorted(KILLED_RUNS))
def test_killed_training_leaves_no_new_empty_output_folder(tmp_path, capsys, weights, monkeypatch, name,
                                                           leaves_state):
    """Killed during its work, a run left the folders it had made for --out, empty; a folder holding the
    run's resumable state stays."""
    cmd, work = KILLED_RUNS[name]
    deeper = tmp_path / "new" / "deeper"
    out = deeper / ("set" if name == "generate" else "o.safetensors")
    state = (out if name == "generate" else deeper) / "state"

    def killed(*args, **kwargs):
        assert out.parent.is_dir()  # made before the work, as the run needs it
        if leaves_state:
            state.parent.mkdir(exist_ok=True)
            state.write_text("resume from here")
        raise KeyboardInterrupt

    monkeypatch.setattr(work, killed)
    argv = [a.format(w=weights) for a in cmd]
    assert main([*argv, "--steps", "2", "--out", str(out), "--no-progress"]) == 2
    assert _err(capsys) == "ppap-fast: error: interrupted"
    if leaves_state:
        assert state.read_text() == "resume from here"
    else:
        assert not (tmp_path / "new").exists()


def test_a_full_disk_is_one_line_naming_the_output_and_the_way_out(tmp_path, capsys, weights, monkeypatch):
    """A full --out disk printed `OSError: [Errno 28] No space left on device`: no file, nothing to do."""
    import errno

    from ppap_fast.data import shards

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "write_json_atomic", full)
    out = tmp_path / "out"
    assert main(["--threads", "1", "demo", "--weights-dir", str(weights), "--out", str(out), "--num-samples", "10",
                 "--steps", "2", "--methods", "none", "--seg-per-target", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == (f"ppap-fast: error: no space left on the disk writing {out}: free some space (or name an output "
                   "on another disk) and rerun\n")


def _disk_full_line(out) -> str:
    return f"ppap-fast: error: no space left on the disk writing {out}: free some space (or name an output on another disk) and rerun"


@pytest.mark.parametrize("cmd, out_name, written", [
    (["train-classifier", "--steps", "1", "--batch-size", "2"], "c.safetensors", "c.safetensors"),
    (["finetune", "--steps", "1", "--batch-size", "2", "--checkpoint-every", "1"], "f.safetensors", "f.safetensors"),
])
def test_a_full_disk_under_safetensors_is_one_line(tmp_path, capsys, weights, monkeypatch, cmd, out_name, written):
    """safetensors reports a full disk as SafetensorError: a traceback (train-classifier), or a DistributedRunError
    traceback from the training state (finetune, distill)."""
    import safetensors.torch

    def full(*a, **k):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / out_name
    assert main(["--threads", "1", *cmd, "--weights-dir", str(weights), "--out", str(out), "--no-progress"]
                if cmd[0] == "finetune" else ["--threads", "1", *cmd, "--out", str(out), "--no-progress"]) == 2
    assert _err(capsys) == _disk_full_line(tmp_path / written)
    assert not list(tmp_path.iterdir())  # no temporaries left


@pytest.mark.parametrize("free", [0, 10 << 30])
def test_a_full_disk_under_torch_save_is_one_line(tmp_path, capsys, monkeypatch, free):
    """torch.save on a full disk says only `unexpected pos 128 vs 0`: train-diffusion's checkpoint was a traceback.
    With space left the same error is no full disk (its traceback stays)."""
    import os
    import torch

    def cryptic(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0")

    real_statvfs = os.statvfs

    def statvfs(p):
        st = real_statvfs(p)
        return type("St", (), {"f_bavail": free // st.f_frsize, "f_frsize": st.f_frsize})()

    monkeypatch.setattr(torch, "save", cryptic)
    monkeypatch.setattr(os, "statvfs", statvfs)
    out = tmp_path / "u.safetensors"
    args = ["--threads", "1", "train-diffusion", "--steps", "1", "--batch-size", "2", "--out", str(out), "--no-progress"]
    if free:
        with pytest.raises(RuntimeError, match="unexpected pos 128 vs 0"):
            main(args)
    else:
        assert main(args) == 2
        assert _err(capsys) == _disk_full_line(f"{out}.ckpt.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("both", [False, True])
def test_a_closed_stdout_lets_train_diffusion_finish_and_write_its_weights(tmp_path, both):
    """`ppap-fast train-diffusion ... | head` died of BrokenPipeError at its next print, before --out was written
    (with `2>&1 | head`: at its progress bar's next update)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "u.safetensors"
    code = "import sys; from ppap_fast.cli import main; sys.exit(main())"  # as the ppap-fast console script
    proc = subprocess.Popen([sys.executable, "-c", code, "--threads", "1", "train-diffusion", "--steps", "1",
                             "--batch-size", "2", "--out", str(out)] + ([] if both else ["--no-progress"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if both else subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    proc.stdout.close()  # the reader is gone before the first line
    err = "" if both else proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 0 and err == "", err
    weights = load_file(out)
    assert weights and all(bool(v.isfinite().all()) for v in weights.values() if v.is_floating_point())
