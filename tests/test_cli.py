"""ppap-fast CLI stages on tiny, untrained models (built on the fly; nothing downloaded)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _util import assert_removes_only_its_own_temporaries
from ppap_fast.cli import main
from ppap_fast.demo import make_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("w"))


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppap-fast: error: "), err
    return err[0]


@pytest.mark.slow
def test_train_stages(tmp_path, capsys):
    assert main(["train-diffusion", "--out", str(tmp_path / "u.safetensors"), "--steps", "1", "--batch-size", "2",
                 "--no-progress"]) == 0
    assert "unet" in str(load_file(tmp_path / "u.safetensors").keys())
    assert main(["train-classifier", "--arch", "resnet", "--widths", "4,8,8", "--steps", "2", "--batch-size", "8",
                 "--out", str(tmp_path / "c.safetensors"), "--no-progress"]) == 0
    assert main(["train-classifier", "--arch", "evalnet", "--steps", "1", "--batch-size", "4",
                 "--out", str(tmp_path / "e.safetensors"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"labelled_images": 1400' in out and '"labelled_images": 500' in out


TINY_UNET = dict(block_out_channels=[8, 8], down_block_types=["DownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=4)


def _killed_then_resumed(tmp_path, monkeypatch, kw, name, killer, after_kill=lambda: None):
    """train_diffusion to ref.safetensors; to out.safetensors with ``demo.<name>`` replaced by ``killer`` (it
    raises KeyboardInterrupt), ``after_kill()``, then again with it restored. Checks the resumed run's weights
    are ref's bit for bit (both at ``kw["steps"]``, finite); one thread: tiny tensors."""
    from ppap_fast import demo
    from ppap_fast.models.tiny import read_safetensors

    threads, real = torch.get_num_threads(), getattr(demo, name)
    torch.set_num_threads(1)
    try:
        demo.train_diffusion(tmp_path / "ref.safetensors", **kw)
        monkeypatch.setattr(demo, name, killer)
        with pytest.raises(KeyboardInterrupt):
            demo.train_diffusion(tmp_path / "out.safetensors", **kw)
        after_kill()
        monkeypatch.setattr(demo, name, real)
        demo.train_diffusion(tmp_path / "out.safetensors", **kw)
    finally:
        torch.set_num_threads(threads)
    (ref, ref_meta), (out, out_meta) = (read_safetensors(tmp_path / f) for f in ("ref.safetensors", "out.safetensors"))
    assert json.loads(out_meta["extra"])["steps"] == json.loads(ref_meta["extra"])["steps"] == kw["steps"]
    assert ref.keys() == out.keys() and all(torch.equal(out[k], ref[k]) for k in ref)
    assert all(bool(v.isfinite().all()) for v in out.values() if v.is_floating_point())


def test_train_diffusion_killed_between_checkpoint_and_weights_resumes_to_the_final_weights(tmp_path, monkeypatch):
    """A kill after the last checkpoint is written but before --out is: the restart (nothing left
    to train) must write the checkpoint's EMA weights, not keep the previous checkpoint's --out."""
    from ppap_fast import demo

    real = demo.save_model

    def killed_at_the_last_step(model, path, extra=None):
        if extra["steps"] == 2:
            raise KeyboardInterrupt
        return real(model, path, extra=extra)

    _killed_then_resumed(tmp_path, monkeypatch, dict(steps=2, batch_size=2, checkpoint_every=1, unet_config=TINY_UNET,
                                                     progress=False), "save_model", killed_at_the_last_step)


def test_train_diffusion_killed_mid_run_leaves_no_out_and_resumes_bitwise(tmp_path, monkeypatch):
    """--out was written at every checkpoint: a kill after one left a partly trained unet that looked finished."""
    from ppap_fast import demo

    real, writes = demo._atomic, []

    def killed_at_the_second_checkpoint(path, write_fn, suffix):
        writes.append(Path(path).name)
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real(path, write_fn, suffix)

    def only_checkpoints_were_written():
        assert writes == ["out.safetensors.ckpt.pt"] * 2 and not (tmp_path / "out.safetensors").exists()

    _killed_then_resumed(tmp_path, monkeypatch, dict(steps=4, batch_size=2, checkpoint_every=2, unet_config=TINY_UNET,
                                                     progress=False), "_atomic", killed_at_the_second_checkpoint,
                         only_checkpoints_were_written)


def test_train_diffusion_refuses_a_checkpoint_past_its_steps(tmp_path):
    """A checkpoint at step 2 and --steps 1 wrote the 2-step weights as the result, without a word."""
    from ppap_fast import demo

    kw = dict(batch_size=2, checkpoint_every=1, unet_config=TINY_UNET, progress=False)
    demo.train_diffusion(tmp_path / "u.safetensors", steps=2, **kw)
    before = (tmp_path / "u.safetensors").read_bytes()
    with pytest.raises(demo.DemoError, match=r"u\.safetensors\.ckpt\.pt is at step 2, past --steps 1: pass --steps 2 or "
                                             "more, or remove it to start over"):
        demo.train_diffusion(tmp_path / "u.safetensors", steps=1, **kw)
    assert (tmp_path / "u.safetensors").read_bytes() == before


def test_train_diffusion_keeps_its_checkpoint_to_extend_training_and_says_so(tmp_path, capsys):
    """OUT.ckpt.pt stays after training ends (distill / finetune remove their states): a rerun with more --steps
    continues from it, bitwise as one longer run. The help did not say it stays, nor why."""
    from ppap_fast import demo

    with pytest.raises(SystemExit, match="0"):
        main(["train-diffusion", "--help"])
    assert "OUT.ckpt.pt (model, EMA and optimizer) stays after training ends: a rerun with more --steps continues" \
        in " ".join(capsys.readouterr().out.split())
    kw = dict(batch_size=2, checkpoint_every=100, unet_config=TINY_UNET, progress=False)
    demo.train_diffusion(tmp_path / "once.safetensors", steps=3, **kw)
    demo.train_diffusion(tmp_path / "extended.safetensors", steps=1, **kw)
    assert (tmp_path / "extended.safetensors.ckpt.pt").is_file()
    demo.train_diffusion(tmp_path / "extended.safetensors", steps=3, **kw)
    once, extended = (load_file(tmp_path / f) for f in ("once.safetensors", "extended.safetensors"))
    assert once.keys() == extended.keys() and all(torch.equal(once[k], extended[k]) for k in once)
    assert all(bool(v.isfinite().all()) for v in once.values() if v.is_floating_point())


def test_train_diffusion_removes_only_its_own_checkpoint_temporaries(tmp_path):
    """Every .<ckpt>.*.tmp was removed, a user's file of that shape too: only _atomic's exact names go."""
    from ppap_fast import demo

    assert_removes_only_its_own_temporaries(
        tmp_path, "u.safetensors.ckpt.pt", ".pt", ".npz",
        lambda: demo.train_diffusion(tmp_path / "u.safetensors", steps=0, batch_size=2, unet_config=TINY_UNET,
                                     progress=False))


def test_generate_distill_finetune(weights, tmp_path):
    data = tmp_path / "data"
    common = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["generate", "--out", str(data), "--num-images", "12", "--shard-size", "5", "--steps", "2"] + common) == 0
    man = json.loads((data / "manifest.json").read_text())
    assert man["complete"] and man["num_shards"] == 3
    with np.load(data / "shard_00002.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (2, 16, 16, 1) and z["logits"].shape == (2, 10)
        assert z["logits"].dtype == np.float32  # N x K: float16 would blur the targets at temperature 0.25
    assert main(["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--alpha", "1", "--steps", "2",
                 "--batch-size", "8", "--out", str(tmp_path / "ppap5")] + common) == 0
    cfg = json.loads((tmp_path / "ppap5" / "config.json").read_text())
    assert cfg["n_experts"] == 5 and cfg["bands"][1] == [200, 400]
    assert cfg["input_transform"] == {"raw": True}  # the tiny teachers take raw x_t: a normalised guide is refused
    assert main(["finetune", "--experts", "5", "--steps", "2", "--batch-size", "10",
                 "--out", str(tmp_path / "m5.safetensors")] + common) == 0
    assert (tmp_path / "m5.safetensors").exists()


def test_distill_reads_a_float16_logits_cache(weights, tmp_path):
    # a set whose logits were cached in float16 (by hand or another tool) still distils: upcast on read
    from ppap_fast.data import ShardWriter, load_shards

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    ShardWriter(data, num_images=6, shard_size=3).run(lambda k: {
        "images": rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8),
        "logits": (rng.standard_normal((3, 10)) * 8).astype(np.float16)})
    assert load_shards(data)["logits"].dtype == np.float16
    assert main(["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--steps", "1", "--batch-size",
                 "4", "--out", str(tmp_path / "d"), "--weights-dir", str(weights), "--no-progress"]) == 0
    assert (tmp_path / "d" / "config.json").exists()


def _kill_refuse_then_resume(args, out, state, changed, named, monkeypatch, capsys):
    """Run ``args`` killed after step 3 (state written at step 2, --out not yet), rerun with ``changed``
    settings (refused, naming them: ``named``; the state kept), then rerun as before: resumed from step 2."""
    from ppap_fast.distributed import SimulatedCrash

    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(SimulatedCrash):
        main(args)
    monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")
    assert not out.exists() and state.is_file()  # --out appears only when finished
    assert main(args + changed) == 2
    err = _err(capsys)
    assert "another configuration" in err and named in err and state.is_file()
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 2


def test_distill_killed_then_rerun_resumes_to_the_uninterrupted_experts(weights, tmp_path, monkeypatch, capsys):
    import torch

    data, ref, out = tmp_path / "data", tmp_path / "ref", tmp_path / "out"
    state = tmp_path / "out.distill_state.safetensors"
    common = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["generate", "--out", str(data), "--num-images", "4", "--shard-size", "2", "--steps", "2"] + common) == 0
    args = ["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--steps", "4", "--batch-size", "4",
            "--checkpoint-every", "2"] + common
    assert main(args + ["--out", str(ref)]) == 0
    assert not (tmp_path / "ref.distill_state.safetensors").exists()
    capsys.readouterr()
    _kill_refuse_then_resume(args + ["--out", str(out)], out, state, ["--lr", "0.002"],
                             "lr: 0.001 there vs 0.002 now", monkeypatch, capsys)
    assert not state.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data", "out", "ref"]
    a, b = load_file(ref / "experts.safetensors"), load_file(out / "experts.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distill_rerun_on_another_data_set_is_refused_naming_data_before_verifying(weights, tmp_path, monkeypatch,
                                                                                     capsys):
    """The refusal came after every shard's CRC was read and named only "data_manifest: '<hash>' there vs ..."."""
    from ppap_fast.data import ShardSet
    from ppap_fast.distributed import SimulatedCrash

    common = ["--weights-dir", str(weights), "--no-progress"]
    for name, seed in (("data", "0"), ("data2", "1")):
        assert main(["generate", "--out", str(tmp_path / name), "--num-images", "4", "--shard-size", "2", "--steps",
                     "2", "--seed", seed] + common) == 0
    out, state = tmp_path / "out", tmp_path / "out.distill_state.safetensors"
    args = ["distill", "--data", str(tmp_path / "data"), "--experts", "2", "--rank", "2", "--steps", "4",
            "--batch-size", "4", "--checkpoint-every", "2", "--out", str(out)] + common
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "3")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(SimulatedCrash):
        main(args)
    monkeypatch.delenv("PPAP_FAST_TEST_KILL_AFTER_STEPS")
    capsys.readouterr()
    verified = []
    orig = ShardSet.verify
    monkeypatch.setattr(ShardSet, "verify", lambda self, *a, **k: verified.append(1) or orig(self, *a, **k))
    assert main(args + ["--data", str(tmp_path / "data2")]) == 2
    err = _err(capsys)
    assert "another configuration" in err and "--data" in err and "there vs" not in err, err
    assert verified == [] and state.is_file()
    assert main(args) == 0 and verified == [1]


def test_finetune_killed_then_rerun_resumes_to_the_uninterrupted_experts(weights, tmp_path, monkeypatch, capsys):
    import torch

    ref, out = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    state = tmp_path / "out.safetensors.finetune_state.safetensors"
    args = ["finetune", "--experts", "2", "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2",
            "--weights-dir", str(weights), "--no-progress"]
    assert main(args + ["--out", str(ref)]) == 0
    assert json.loads(capsys.readouterr().out)["loss_reduction"] == "expert_mean"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors"]  # no state left
    _kill_refuse_then_resume(args + ["--out", str(out)], out, state, ["--loss-reduction", "batch_mean"],
                             "loss_reduction: 'expert_mean' there vs 'batch_mean' now", monkeypatch, capsys)
    assert not state.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]
    a, b = load_file(ref), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_and_evaluate(weights, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--weights-dir", str(weights), "--method", "ppap-10", "--targets", "3,7",
                 "--num-samples", "5", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    with np.load(out) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (5, 16, 16, 1)
        assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [3, 7, 3, 7, 3]
    assert out.with_suffix(".png").exists()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--weights-dir", str(weights), "--json", str(tmp_path / "m.json")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"target_accuracy", "fd", "is", "precision", "recall"}
    assert json.loads((tmp_path / "m.json").read_text()) == res


@pytest.mark.parametrize("flag", [["--seed", "3"], ["--no-progress"]])
def test_evaluate_refuses_flags_it_would_ignore(flag, capsys, tmp_path):
    """evaluate draws nothing and shows no bar: --seed / --no-progress were accepted and did nothing."""
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(tmp_path / "s.npz"), *flag])
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(flag)}" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["none", "naive", "x0hat", "noise-aware", "multi-experts-5"])
def test_sample_every_method(weights, tmp_path, method):
    assert main(["sample", "--weights-dir", str(weights), "--method", method, "--num-samples", "3", "--steps", "2",
                 "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0


def test_ddpm_sampler(weights, tmp_path):
    assert main(["sample", "--weights-dir", str(weights), "--method", "naive", "--sampler", "ddpm", "--steps", "3",
                 "--num-samples", "2", "--out", str(tmp_path / "s.npz"), "--no-progress"]) == 0


# ----------------------------------------------------------------------------- bad input
def _sample(weights, out, *extra):
    return main(["sample", "--weights-dir", str(weights), "--num-samples", "2", "--steps", "2", "--out", str(out),
                 "--no-progress", *extra])


def test_unknown_method(weights, tmp_path, capsys):
    assert _sample(weights, tmp_path / "s.npz", "--method", "magic") == 2
    assert "unknown method" in _err(capsys)
    assert not list(tmp_path.iterdir())


def test_target_out_of_range(weights, tmp_path, capsys):
    assert _sample(weights, tmp_path / "s.npz", "--method", "ppap-5", "--targets", "3,10") == 2
    assert "out of range" in _err(capsys)
    assert not list(tmp_path.glob("*.npz"))
    assert _sample(weights, tmp_path / "s.npz", "--method", "ppap-5", "--targets", "-1") == 2
    assert "target class -1 out of range" in _err(capsys)  # refused up front, not by the guide later


def test_targets_that_would_not_all_be_sampled_are_refused(weights, tmp_path, capsys):
    """--targets 1,2,3 with --num-samples 2 dropped class 3 silently; an empty entry (1,,2: a typo) was skipped."""
    assert _sample(weights, tmp_path / "s.npz", "--method", "ppap-5", "--targets", "1,2,3") == 2
    assert "--targets gives 3 classes but --num-samples is 2" in _err(capsys)
    assert _sample(weights, tmp_path / "s.npz", "--method", "ppap-5", "--targets", "1,,2") == 2
    assert "--targets must be comma-separated integers, got '1,,2'" in _err(capsys)
    assert not list(tmp_path.glob("*.npz"))


def test_missing_weight_file(weights, tmp_path, capsys):
    assert _sample(tmp_path / "nowhere", tmp_path / "s.npz", "--method", "naive") == 2
    assert "not found" in _err(capsys)
    assert _sample(weights, tmp_path / "s.npz", "--method", "ppap-20") == 2
    assert "not found" in _err(capsys)


def test_corrupt_weight_file(weights, tmp_path, capsys):
    import shutil

    bad = tmp_path / "w"
    shutil.copytree(weights, bad)
    (bad / "classifier.safetensors").write_bytes(b"\x00" * 100)
    assert _sample(bad, tmp_path / "s.npz", "--method", "naive") == 2
    assert "corrupt" in _err(capsys)
    data = (weights / "unet.safetensors").read_bytes()
    (bad / "unet.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    assert _sample(bad, tmp_path / "s.npz", "--method", "none") == 2
    assert "corrupt" in _err(capsys)
    assert main(["demo", "--weights-dir", str(bad), "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "corrupt" in _err(capsys)
    assert not list((tmp_path / "d").glob("*"))


def test_weight_file_with_other_keys_names_them(weights, tmp_path, capsys):
    """A tiny weight file whose keys do not fit its model said only "Error(s) in loading state_dict for
    TinyResNet:" (load_state_dict's first line): the file, its model and the differing keys are named."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = tmp_path / "w"
    shutil.copytree(weights, bad)
    f = bad / "classifier.safetensors"
    with safe_open(str(f), framework="pt") as r:
        meta, sd = r.metadata(), {k: r.get_tensor(k) for k in r.keys()}
    sd["head.weight"] = sd.pop("fc.weight")
    save_file(sd, str(f), metadata=meta)
    assert _sample(bad, tmp_path / "s.npz", "--method", "naive") == 2
    err = _err(capsys)
    assert str(f) in err and "'resnet' model" in err
    assert "1 missing keys ['fc.weight'], 1 unexpected keys ['head.weight'], 0 shape mismatches" in err


def test_unwritable_output(weights, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _sample(weights, blocker / "sub" / "s.npz", "--method", "none") == 2
    assert "not writable" in _err(capsys)
    assert main(["demo", "--weights-dir", str(weights), "--out", str(blocker / "d"), "--no-progress"]) == 2
    assert "not writable" in _err(capsys)


def test_bad_sample_file(weights, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--weights-dir", str(weights)]) == 2
    assert "not found" in _err(capsys)
    assert main(["evaluate", str(tmp_path), "--weights-dir", str(weights)]) == 2
    assert "is a directory" in _err(capsys)
    p = tmp_path / "bad.npz"
    np.savez(p, images=np.zeros((2, 16, 16, 1), np.float32), labels=np.zeros(2, np.int64))
    assert main(["evaluate", str(p), "--weights-dir", str(weights)]) == 2
    assert "uint8" in _err(capsys)
    np.savez(p, images=np.zeros((2, 16, 16, 1), np.uint8))  # no labels: named, not "corrupt" + a KeyError
    assert main(["evaluate", str(p), "--weights-dir", str(weights)]) == 2
    assert "has no 'images' and 'labels' (or 'targets') arrays (it has ['images'])" in _err(capsys)


def test_evaluate_reads_guided_sample_targets(weights, tmp_path, capsys):
    """guided-sample with the tiny models writes 16x16x1 images and 'targets': evaluate scores them."""
    p = tmp_path / "g.npz"
    np.savez(p, images=np.full((4, 16, 16, 1), 128, np.uint8), targets=np.array([0, 1, 2, 3]))
    assert main(["evaluate", str(p), "--weights-dir", str(weights)]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == 4


@pytest.mark.parametrize("content", ["text", "npy"])
def test_sample_file_that_is_not_npz_names_the_expected_file(weights, tmp_path, capsys, content):
    """A text file or a bare .npy passed to evaluate: one line saying what evaluate reads, not numpy's
    'pickled (object) data ... allow_pickle=' advice or a bare AttributeError."""
    p = tmp_path / "s.npz"
    if content == "text":
        p.write_text("not samples\n")
    else:
        with open(p, "wb") as f:
            np.save(f, np.zeros((2, 16, 16, 1), np.uint8))
    assert main(["evaluate", str(p), "--weights-dir", str(weights)]) == 2
    err = _err(capsys)
    assert "is not an .npz archive" in err and "ppap-fast sample" in err and "pickle" not in err


def test_generate_step_count_ddim_cannot_take_is_refused_before_the_folder_is_made(weights, tmp_path, capsys):
    """--steps 1001 failed after loading, leaving an empty --out folder, with an error that named no step count."""
    assert main(["generate", "--weights-dir", str(weights), "--out", str(tmp_path / "d"), "--num-images", "2",
                 "--steps", "1001", "--no-progress"]) == 2
    assert "bad step count 1001 for ddim" in _err(capsys) and not (tmp_path / "d").exists()


def test_generate_resumes_after_interruption(weights, tmp_path, monkeypatch):
    """A run killed mid-way leaves only complete shards; the rerun fills in the rest, identical to a clean run."""
    from ppap_fast.data import shards
    from ppap_fast.distill import generate_datafree
    from ppap_fast.models.tiny import load_model

    unet, teacher = load_model(weights / "unet.safetensors"), load_model(weights / "classifier.safetensors")

    class Crash(Exception):
        pass

    real_write = shards.write_npz_atomic

    def crash_after_first(path, **arrays):  # in ShardWriter.run, right after shard 0 is written
        real_write(path, **arrays)
        raise Crash

    with monkeypatch.context() as m, pytest.raises(Crash):
        m.setattr(shards, "write_npz_atomic", crash_after_first)
        generate_datafree(unet, teacher, tmp_path / "a", 9, 3, respacing="ddim2", progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("shard_*.npz")) == ["shard_00000.npz"]
    assert generate_datafree(unet, teacher, tmp_path / "a", 9, 3, respacing="ddim2", progress=False) == [1, 2]
    generate_datafree(unet, teacher, tmp_path / "b", 9, 3, respacing="ddim2", progress=False)
    from ppap_fast.data import load_shards

    a, b = load_shards(tmp_path / "a"), load_shards(tmp_path / "b")
    assert np.array_equal(a["images"], b["images"]) and np.allclose(a["logits"], b["logits"])


@pytest.mark.parametrize("method,sampler", [("ppap-10", "ddim"), ("multi-experts-5", "ddim"), ("x0hat", "ddim"),
                                            ("ppap-5", "ddpm"), ("none", "ddpm")])
def test_fast_sampling_path_matches_reference(weights, method, sampler):
    import torch

    from ppap_fast import demo

    targets = torch.tensor([3, 7, 1])
    kw = dict(sampler=sampler, steps=4, scale=10.0, seed=3, batch_size=2, progress=False)
    ref, s_ref = demo.sample_method(method, weights, targets, **kw)
    fast, s_fast = demo.sample_method(method, weights, targets, fast=True, **kw)
    assert s_ref["path"] == "reference" and s_fast["path"] == "fast"
    assert s_fast["nfe_per_sample"] == s_ref["nfe_per_sample"]
    assert torch.isfinite(fast).all()
    err = ((fast.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-4, err


def test_sample_fast_flag(weights, tmp_path, capsys):
    assert main(["sample", "--weights-dir", str(weights), "--method", "ppap-5", "--num-samples", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.npz"), "--no-progress", "--fast"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["path"] == "fast" and res["images_per_s"] > 0 and res["nfe_per_sample"] == 2
    assert json.loads((tmp_path / "s.json").read_text()) == res  # the stats beside the .npz, as guided-sample
    assert res["peak_rss_mb"] > 0 and res["seconds"] >= 0
    # named as guided-sample's (README): the figure and which memory it is
    assert res["peak_memory_mb"] == res["peak_rss_mb"] and res["peak_memory_kind"] == "process_rss"


def test_out_dir_that_is_not_a_previous_output_is_never_replaced(weights, tmp_path, capsys):
    data, keep = tmp_path / "data", tmp_path / "precious"
    common = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["generate", "--out", str(data), "--num-images", "4", "--shard-size", "2", "--steps", "2"] + common) == 0
    keep.mkdir()
    (keep / "notes.txt").write_text("keep")
    args = ["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--steps", "1", "--batch-size", "4"]
    assert main(args + ["--out", str(keep)] + common) == 2
    assert "refusing to replace" in _err(capsys)
    assert (keep / "notes.txt").read_text() == "keep" and sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    other = tmp_path / "hf_config_only"  # a config.json alone, another model's: it was replaced
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "resnet"}')
    assert main(args + ["--out", str(other)] + common) == 2
    assert "not a ppap_fast experts checkpoint" in _err(capsys)
    assert (other / "config.json").read_text() == '{"model_type": "resnet"}'
    assert main(args + ["--out", str(tmp_path / "d")] + common) == 0
    assert json.loads(capsys.readouterr().out)["steps_done"] == 1  # steps taken (was the last index, 0)
    summary = json.loads((tmp_path / "d" / "train_summary.json").read_text())  # the run's losses, and a picture
    assert summary["steps_done"] == 1 and len(summary["losses"]) == 1 and summary["settings"]["rank"] == 2
    assert summary["bands"] == [[0, 200], [200, 400], [400, 600], [600, 800], [800, 1000]]
    row = summary["expert_losses"][0]  # 4 samples over 5 experts: one at least had none (null)
    assert len(row) == 5 and None in row and min(v for v in row if v is not None) <= summary["losses"][0]
    from PIL import Image

    with Image.open(tmp_path / "d" / "train_loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert main(args + ["--out", str(tmp_path / "d")] + common) == 0  # a previous output is replaced


def test_generate_rerun_with_other_steps_names_the_option(weights, tmp_path, capsys):
    """The refusal named only "respacing: 'ddim2' there vs 'ddim3' now", an internal name for --steps."""
    gen = ["generate", "--out", str(tmp_path / "d"), "--num-images", "2", "--shard-size", "2", "--weights-dir",
           str(weights), "--no-progress"]
    assert main(gen + ["--steps", "2"]) == 0
    capsys.readouterr()
    assert main(gen + ["--steps", "3"]) == 2
    assert "respacing: 'ddim2' there vs 'ddim3' now (--steps 2 there vs --steps 3 now)" in _err(capsys)


def test_resume_with_other_settings_or_teacher_is_refused(weights, tmp_path, capsys):
    data = tmp_path / "data"
    common = ["--weights-dir", str(weights), "--no-progress"]
    gen = ["generate", "--out", str(data), "--num-images", "4", "--shard-size", "2"]
    assert main(gen + ["--steps", "2"] + common) == 0
    (data / "shard_00001.npz").unlink()
    assert main(gen + ["--steps", "3", "--seed", "9"] + common) == 2
    err = _err(capsys)
    assert "other settings" in err and "seed" in err
    assert not (data / "shard_00001.npz").exists()
    assert main(gen + ["--steps", "2"] + common) == 0  # same settings: finishes
    other = make_tiny_weights(tmp_path / "w_other", seed=7)
    assert main(["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--steps", "1", "--batch-size",
                 "4", "--out", str(tmp_path / "d"), "--weights-dir", str(other), "--no-progress"]) == 2
    assert "another classifier" in _err(capsys)


@pytest.mark.parametrize("argv", [
    ["sample", "--method", "none", "--num-samples", "0", "--out", "x.npz"],
    ["sample", "--method", "none", "--steps", "-1", "--out", "x.npz"],
    ["train-diffusion", "--out", "u.safetensors", "--checkpoint-every", "0"],
    ["distill", "--data", "d", "--out", "o", "--max-minutes", "0"],
    ["finetune", "--experts", "0", "--out", "f.safetensors"],
    ["distill", "--data", "d", "--out", "o", "--lr", "nan"],  # was accepted (type=float)
    ["train-classifier", "--out", "c.safetensors", "--lr", "-1"],
    ["distill", "--data", "d", "--out", "o", "--alpha", "0"],  # a LoRA that never learns
    # refused only after start-up (type=int)
    ["score", "s.npz", "--batch-size", "0"],
    ["guided-sample", "--out", "g.npz", "--num-samples", "0"],
    ["guided-sample", "--out", "g.npz", "--batch-size", "-2"],
    ["guided-sample", "--out", "g.npz", "--steps", "0"],
    ["guided-sample", "--out", "g.npz", "--image-size", "0"],
    ["guided-sample", "--out", "g.npz", "--channels", "0"],
])
def test_non_positive_counts_are_usage_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but never into the repo
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "must be a positive" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_non_positive_threads_is_a_usage_error(value, capsys, tmp_path, monkeypatch):
    """--threads 0 / -2 ran with one thread, the value ignored without a word."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--threads", value, "info"])
    assert e.value.code == 2 and "argument --threads: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_ppap_threads_is_refused(value, capsys, tmp_path, monkeypatch):
    """$PPAP_THREADS=abc ran with 2 threads and 0 with 1, the value ignored without a word."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PPAP_THREADS", value)
    threads = torch.get_num_threads()
    try:
        assert main(["info"]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    assert err.startswith("ppap-fast: error: $PPAP_THREADS: ") and value in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("env,argv,want", [(None, [], 2), ("3", [], 3), (" ", [], 2), ("abc", ["--threads", "1"], 1)])
def test_threads_default_from_ppap_threads(env, argv, want, tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    if env is None:
        monkeypatch.delenv("PPAP_THREADS", raising=False)
    else:
        monkeypatch.setenv("PPAP_THREADS", env)
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert main(argv + ["info"]) == 0 and seen[:1] == [want]


@pytest.mark.parametrize("argv", [
    ["sample", "--method", "none", "--out", "x.npz", "--seed", "99999999999999999999"],
    ["sample", "--method", "none", "--out", "x.npz", "--seed", "1e20"],
    ["train-diffusion", "--out", "u.safetensors", "--steps", "1", "--seed", "-1"],
    ["guided-sample", "--out", "g.npz", "--seed", str(2**63)],
    ["generate", "--out", "d", "--seed", str(2**63 // 1_000_003 + 1)],  # seed * 1_000_003 + k leaves torch's range
])
def test_seed_out_of_torchs_range_is_a_usage_error(argv, capsys, tmp_path, monkeypatch):
    """--seed 99999999999999999999 failed after start-up with 'Overflow when unpacking long long'."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: " in err and "a seed in 0 .. " in err, err


def test_largest_seeds_run(weights, tmp_path):
    from ppap_fast.cli import SEED_MAX, SHARD_SEED_MAX

    common = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["sample", "--method", "none", "--targets", "1", "--steps", "2", "--seed", str(SEED_MAX),
                 "--out", str(tmp_path / "s.npz")] + common) == 0
    assert main(["generate", "--out", str(tmp_path / "d"), "--num-images", "2", "--steps", "2",
                 "--seed", str(SHARD_SEED_MAX)] + common) == 0


def test_unavailable_device_is_one_line(weights, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train-classifier", "--out", str(tmp_path / "c.safetensors"), "--steps", "1", "--device", "cuda",
                 "--no-progress"]) == 2
    assert "CUDA is not available" in _err(capsys)


def test_damaged_shard_is_one_line(weights, tmp_path, capsys):
    data = tmp_path / "data"
    common = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["generate", "--out", str(data), "--num-images", "4", "--shard-size", "2", "--steps", "2"] + common) == 0
    raw = bytearray((data / "shard_00001.npz").read_bytes())
    raw[200] ^= 0xFF
    (data / "shard_00001.npz").write_bytes(bytes(raw))
    assert main(["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--steps", "1", "--batch-size",
                 "4", "--out", str(tmp_path / "d")] + common) == 2
    assert "shard_00001.npz" in _err(capsys)


def test_a_shard_failing_its_crc_says_how_to_rewrite_it(weights, tmp_path, capsys):
    """A byte flipped past the npy header passes generate's cheap check (zip directory and headers), so rerunning
    generate kept the shard and distill failed again: the error named the file but not what rewrites it."""
    from ppap_fast.data.shards import npz_members

    data = tmp_path / "data"
    common = ["--weights-dir", str(weights), "--no-progress"]
    gen = ["generate", "--out", str(data), "--num-images", "40", "--shard-size", "20", "--steps", "2"] + common
    distill = ["distill", "--data", str(data), "--experts", "5", "--rank", "2", "--steps", "1", "--batch-size", "4",
               "--out", str(tmp_path / "d")] + common
    assert main(gen) == 0
    shard = data / "shard_00001.npz"
    im = npz_members(shard)["images"]
    raw = bytearray(shard.read_bytes())
    raw[im.offset + int(np.prod(im.shape)) - 1] ^= 0xFF  # the last image byte: beyond what reading a header touches
    shard.write_bytes(bytes(raw))
    assert main(gen) == 0 and "none (already complete)" in capsys.readouterr().out  # kept: headers intact
    assert main(distill) == 2
    err = _err(capsys)
    assert "shard_00001.npz: member images.npy fails its CRC-32 check" in err
    assert "remove the damaged shard file(s) and rerun generate" in err
    shard.unlink()  # as the error says
    assert main(gen) == 0 and main(distill) == 0

@pytest.mark.parametrize("argv", [
    ["sample", "--method", "ppap-5", "--scale", "nan", "--out", "x.npz"],
    ["demo", "--scale", "inf", "--out", "d"],
    ["guided-sample", "--scale", "nan", "--out", "g.npz"],
])
def test_non_finite_scale_is_a_usage_error(argv, capsys, tmp_path, monkeypatch):
    """--scale nan / inf is refused while parsing (before any weight is loaded or sample drawn)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "argument --scale: must be a finite number" in capsys.readouterr().err


def test_sample_sampler_choices_are_in_help_and_checked_while_parsing(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--method", "none", "--sampler", "ddim25", "--out", "x.npz"])
    assert e.value.code == 2 and "argument --sampler: invalid choice: 'ddim25'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--sampler {ddim,ddpm}" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", [["distill", "--data", "d"], ["finetune"]])
def test_expert_count_must_divide_1000_and_help_says_so(cmd, capsys, tmp_path, monkeypatch):
    """--experts 3 was refused only after the weights (and distill's data set) were read."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(cmd + ["--experts", "3", "--out", "o"])
    assert e.value.code == 2 and "argument --experts: must be a positive integer dividing T = 1000" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([cmd[0], "--help"])
    assert "T = 1000" in " ".join(capsys.readouterr().out.split())


def test_demo_num_samples_below_ten_is_a_usage_error_that_help_states(capsys, tmp_path):
    """--num-samples 5 was refused only after the output directory was made, and --help did not say so."""
    with pytest.raises(SystemExit) as e:
        main(["demo", "--num-samples", "5", "--out", str(tmp_path / "d")])
    assert e.value.code == 2 and "argument --num-samples: must be an integer of at least 10" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "at least 10" in " ".join(capsys.readouterr().out.split())
    from ppap_fast.demo import DemoError, run_demo

    with pytest.raises(DemoError, match="at least 10"):
        run_demo(tmp_path / "d", num_samples=5)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["nan", "-1", "1.5"])
def test_bad_ema_decay_is_a_usage_error(value, capsys, tmp_path):
    """--ema-decay nan trained and saved a UNet of NaN weights with exit status 0."""
    with pytest.raises(SystemExit) as e:
        main(["train-diffusion", "--ema-decay", value, "--steps", "1", "--out", str(tmp_path / "u.safetensors")])
    assert e.value.code == 2 and "argument --ema-decay: must be a number in [0, 1]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    from ppap_fast.demo import train_diffusion

    with pytest.raises(ValueError, match="ema_decay must lie in"):
        train_diffusion(tmp_path / "u.safetensors", steps=1, ema_decay=float(value))


@pytest.mark.parametrize("cmd,shown", [
    ("distill", ["--lr LR", "default: 0.001", "--experts EXPERTS", "default: 5",
                 "a resumed run counts the time trained before"]),
    ("generate", ["default: 6000"]),
    ("sample", ["default: 250", "default: ddim", "one per --targets entry"]),
    ("guided-sample", ["default: 256", "default: linear", "--guide-task {classification,segmentation,depth,"
                       "regression} default: the guide's own", "default: none, the guide runs in its weights' dtype"]),
])
def test_help_states_defaults(cmd, shown, capsys):
    """`ppap-fast <cmd> --help` states each option's default (docs/demo.md's commands pass values that differ)."""
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for s in shown:
        assert s in out, (s, out)


def test_help_of_a_no_flag_does_not_call_it_on_by_default(capsys):
    """--no-fast (store_false, dest fast=True) must not read "the reference sampling loop (default: True)"."""
    with pytest.raises(SystemExit):
        main(["guided-sample", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--no-fast the reference sampling loop" in out and "the reference sampling loop (default: True)" not in out


def test_generate_refuses_a_distributed_set(weights, tmp_path, capsys):
    """generate adopted a `python -m ppap_fast.distributed generate` set with the same seed / respacing as its own
    ("already complete", whatever denoiser made it) and overwrote its manifest, dropping its config."""
    d = tmp_path / "dist"
    d.mkdir()
    manifest = {"kind": "datafree", "format": "ppap_fast.datafree", "num_images": 2, "shard_size": 2,
                "num_shards": 1, "complete": True, "shards": ["shard_00000.npz"], "seed": 0, "respacing": "ddim2",
                "config": {"denoiser": "random-conv"}, "config_hash": "abc"}
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert main(["generate", "--out", str(d), "--num-images", "2", "--shard-size", "2", "--steps", "2",
                 "--weights-dir", str(weights), "--no-progress"]) == 2
    assert "written by another tool (format='ppap_fast.datafree'" in _err(capsys)
    assert json.loads((d / "manifest.json").read_text()) == manifest and not list(d.glob("shard_*"))


def test_distill_of_a_set_of_another_task_names_the_task(weights, tmp_path, capsys):
    """A segmentation set distilled without --task said only 'computed by another classifier than this teacher'."""
    data = tmp_path / "seg"
    assert main(["generate", "--task", "segmentation", "--out", str(data), "--num-images", "2", "--steps", "2",
                 "--weights-dir", str(weights), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["distill", "--data", str(data), "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "e"),
                 "--weights-dir", str(weights), "--no-progress"]) == 2
    assert "was generated with --task segmentation: distil it with --task segmentation" in _err(capsys)


def test_generate_into_a_set_of_another_task_names_the_task(weights, tmp_path, capsys):
    """A rerun into a classification set with --task segmentation named only teacher_state hashes."""
    data = tmp_path / "cls"
    common = ["--out", str(data), "--num-images", "2", "--steps", "2", "--weights-dir", str(weights), "--no-progress"]
    assert main(["generate"] + common) == 0
    manifest = (data / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["generate", "--task", "segmentation"] + common) == 2
    err = _err(capsys)
    assert "made with --task classification; this run asks for --task segmentation" in err
    assert (data / "manifest.json").read_text() == manifest


def test_generate_stopped_before_its_first_shard_does_not_lock_its_folder(weights, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the first shard of a run with the wrong --task (or --seed, --steps, ...): its manifest alone
    refused the corrected rerun (\"made with --task segmentation\", \"other settings\"), with nothing to keep."""
    from ppap_fast.data import shards

    data = tmp_path / "d"
    common = ["--out", str(data), "--num-images", "2", "--weights-dir", str(weights), "--no-progress"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shards, "write_npz_atomic", interrupted)
        assert main(["generate", "--task", "segmentation", "--steps", "3"] + common) == 2
    assert (data / "manifest.json").exists() and not list(data.glob("shard_*.npz"))
    capsys.readouterr()
    assert main(["generate", "--steps", "2", "--seed", "1"] + common) == 0, _err(capsys)
    man = json.loads((data / "manifest.json").read_text())
    assert man["complete"] and man["seed"] == 1 and man["respacing"] == "ddim2"

def test_evaluate_json_that_is_the_samples_file_is_refused(weights, tmp_path, capsys):
    """evaluate s.npz --json s.npz replaced the samples with the metrics."""
    s = tmp_path / "s.npz"
    assert main(["sample", "--weights-dir", str(weights), "--method", "none", "--num-samples", "4", "--steps", "2",
                 "--out", str(s), "--no-progress"]) == 0
    capsys.readouterr()
    before = s.read_bytes()
    assert main(["evaluate", str(s), "--weights-dir", str(weights), "--json", str(tmp_path / "." / "s.npz")]) == 2
    assert "is the sample file" in _err(capsys) and s.read_bytes() == before


def test_evaluate_removes_the_temporaries_of_a_killed_json_write(weights, tmp_path, capsys):
    """An evaluate --json killed (SIGKILL) mid-write left its atomic-write .tmp beside the json for good."""
    s = tmp_path / "s.npz"
    assert main(["sample", "--weights-dir", str(weights), "--method", "none", "--num-samples", "4", "--steps", "2",
                 "--out", str(s), "--no-progress"]) == 0
    d = tmp_path / "m"
    d.mkdir()
    left = [d / ".m.txt.abcd1234.json.tmp", d / ".m.txt.k2j4x_9z.json.tmp"]  # write_json_atomic's names for m.txt
    others = [d / ".m.json.abcd1234.json.tmp", d / ".m.txt.abcd1234.txt.tmp", d / ".m.txt.mine.tmp", d / "notes.txt"]
    for p in left + others:
        p.write_text("left")
    assert main(["evaluate", str(s), "--weights-dir", str(weights), "--json", str(d / "m.txt")]) == 0
    assert (d / "m.txt").is_file() and not [p for p in left if p.exists()]
    assert all(p.read_text() == "left" for p in others)


def test_finetune_out_that_is_its_base_classifier_is_refused(weights, tmp_path, capsys):
    """finetune --out W/classifier.safetensors overwrote the base classifier with the fine-tuned experts."""
    import shutil

    w = tmp_path / "w"
    shutil.copytree(weights, w)
    before = (w / "classifier.safetensors").read_bytes()
    assert main(["--threads", "1", "finetune", "--weights-dir", str(w), "--steps", "1", "--batch-size", "2",
                 "--out", str(w / "classifier.safetensors"), "--no-progress"]) == 2
    assert "is the base classifier it fine-tunes" in _err(capsys)
    assert (w / "classifier.safetensors").read_bytes() == before


def test_generate_out_that_is_a_file_says_so(weights, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert main(["generate", "--out", str(f), "--num-images", "2", "--weights-dir", str(weights), "--no-progress"]) == 2
    err = _err(capsys)
    assert "is an existing file, not a directory" in err and "not writable" not in err
    assert f.read_text() == "x"


@pytest.mark.parametrize("task,shown", [("distill", ["default: 1000", "default: 0.0001", "(default: expert_mean)"]),
                                        ("generate", ["--seed SEED random seed (default: 0)"])])
def test_distributed_help_states_defaults(task, shown, capsys):
    """`python -m ppap_fast.distributed <task> --help` states defaults as ppap-fast's commands do."""
    from ppap_fast.distributed import _parser

    with pytest.raises(SystemExit) as e:
        _parser().parse_args([task, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for s in shown:
        assert s in out, (s, out)


@pytest.mark.parametrize("fast", [False, True])
def test_ddpm_samples_do_not_depend_on_batch_size(weights, fast):
    from ppap_fast.demo import sample_method

    runs = [sample_method("ppap-5", weights, torch.tensor([1, 4, 7]), sampler="ddpm", steps=4, scale=5.0, seed=3,
                          batch_size=bs, progress=False, fast=fast)[0] for bs in (3, 2, 1)]
    assert torch.isfinite(runs[0]).all()
    for x in runs[1:]:
        torch.testing.assert_close(x, runs[0], rtol=0, atol=1e-4)  # batched convs round apart
    other_seed = sample_method("ppap-5", weights, torch.tensor([1, 4, 7]), sampler="ddpm", steps=4, scale=5.0, seed=4,
                               batch_size=3, progress=False, fast=fast)[0]
    assert (other_seed - runs[0]).abs().max() > 1e-2


def test_sample_removes_the_temporaries_of_a_killed_run(weights, tmp_path, capsys):
    """A `sample` killed (SIGKILL) mid-write left its atomic-write .tmp beside --out for good."""
    import os
    import tempfile

    out = tmp_path / "s.npz"
    left = []
    for side in (out, out.with_suffix(".png"), out.with_suffix(".json")):  # the names the atomic writer makes
        fd, tmp = tempfile.mkstemp(prefix=f".{side.name}.", suffix=side.suffix + ".tmp", dir=tmp_path)
        os.close(fd)
        left.append(Path(tmp))
    others = [tmp_path / ".t.npz.abcd1234.npz.tmp", tmp_path / ".s.npz.mine.tmp", tmp_path / "s.npz.tmp"]
    for p in others:  # another output's, or not a name the writer makes: kept
        p.write_text("not sample's")
    assert main(["sample", "--method", "none", "--targets", "1", "--steps", "2", "--out", str(out),
                 "--weights-dir", str(weights), "--no-progress"]) == 0
    assert out.is_file() and not [p for p in left if p.exists()]
    assert all(p.read_text() == "not sample's" for p in others)


def test_sample_failing_after_its_npz_leaves_no_older_runs_stats(weights, tmp_path, monkeypatch):
    from ppap_fast import demo

    out = tmp_path / "s.npz"
    out.with_suffix(".json").write_text('{"method": "an older run"}')

    def broken_grid(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(demo, "save_grid", broken_grid)
    assert main(["sample", "--weights-dir", str(weights), "--method", "none", "--num-samples", "2", "--steps", "2",
                 "--out", str(out), "--no-progress"]) != 0
    assert out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize("value", ["0,0,0", "16,-8", "16,x"])
def test_bad_classifier_widths_are_a_usage_error(value, capsys, tmp_path):
    """--widths 0,0,0 ended in a conv2d traceback after loading the data."""
    with pytest.raises(SystemExit) as e:
        main(["train-classifier", "--widths", value, "--steps", "1", "--out", str(tmp_path / "c.safetensors")])
    assert e.value.code == 2 and "argument --widths:" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_weights_dir_that_is_a_file_says_so(tmp_path, capsys):
    """A file given as --weights-dir was reported as a missing '<file>/unet.safetensors'."""
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    assert main(["sample", "--weights-dir", str(f), "--method", "ppap-5", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert f"--weights-dir {f} is a file" in err and "unet.safetensors" not in err


def test_classifier_with_four_widths_trains(tmp_path, capsys):
    """--widths 4,8,8,8 built 3 stages (layers defaulted to (1, 1, 1)) and crashed on the missing 4th."""
    from ppap_fast.models.tiny import load_model

    out = tmp_path / "c.safetensors"
    assert main(["--threads", "1", "train-classifier", "--widths", "4,8,8,8", "--steps", "1", "--batch-size", "4",
                 "--out", str(out), "--no-progress"]) == 0
    assert load_model(out, "resnet").num_stages == 4


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_generate_writes_a_preview_with_the_teachers_view(weights, tmp_path, capsys, task):
    """A data-free set is only as good as the teacher's reading of it: generate shows it (preview.png) and, for a
    classifier, counts the teacher's top-1 classes over the whole set."""
    import re

    import numpy as np
    from PIL import Image

    from ppap_fast.data import ShardSet

    out = tmp_path / "set"
    assert main(["generate", "--weights-dir", str(weights), "--out", str(out), "--num-images", "6", "--shard-size", "4",
                 "--steps", "2", "--task", task, "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"{out}: wrote shards [0, 1]" and lines[1].startswith(f"{out / 'preview.png'}: the first 6 "), lines
    with Image.open(out / "preview.png") as im:
        im.load()
        grid = np.asarray(im)
    if task == "classification":
        counts = [int(n) for n in re.findall(r"\d+: (\d+)", lines[1].split("over all 6: ")[1])]
        top1 = ShardSet(out).gather("logits", np.arange(6)).argmax(1)
        assert counts == np.bincount(top1, minlength=10).tolist() and sum(counts) == 6
        assert grid.shape[:2] == (len(set(top1.tolist())) * 49 + 1, 10 * 49 + 1)  # a row per class the teacher saw
    else:
        assert "beside the teacher's predicted mask" in lines[1] and grid.shape == (2 * 49 + 1, 10 * 49 + 1, 3)
    assert not ShardSet(out).verify()  # the picture does not disturb the set
    assert main(["generate", "--weights-dir", str(weights), "--out", str(out), "--num-images", "6", "--shard-size", "4",
                 "--steps", "2", "--task", task, "--no-progress"]) == 0  # complete: the preview is redrawn
    assert "none (already complete)" in capsys.readouterr().out


@pytest.mark.parametrize("arch", ["evalnet", "segnet", "semseg"])
def test_classifier_widths_of_another_arch_are_refused(arch, tmp_path, capsys):
    """--widths is the resnet's: with --arch evalnet / segnet / semseg it was ignored silently."""
    out = tmp_path / "sub" / "n.safetensors"
    assert main(["train-classifier", "--arch", arch, "--widths", "4,8,8", "--steps", "1", "--out", str(out),
                 "--no-progress"]) == 2
    assert f"--arch {arch} has none" in _err(capsys) and not (tmp_path / "sub").exists()


def test_classifier_default_widths_are_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train-classifier", "--help"])
    assert "default: 16,32,64" in " ".join(capsys.readouterr().out.split())


def test_rerun_into_a_previous_output_keeps_its_readme(weights, tmp_path, capsys):
    """A README.md (a model card) beside a previous export-peft / distill output was deleted by the rerun."""
    out = tmp_path / "adapter"
    args = ["export-peft", "--experts-dir", str(weights / "ppap5"), "--out", str(out), "--weights-dir", str(weights)]
    assert main(args + ["--expert", "1"]) == 0
    (out / "README.md").write_text("# my card\n")
    assert main(args + ["--expert", "2"]) == 0
    assert (out / "README.md").read_text() == "# my card\n"
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_an_output_named_through_a_symlink_is_written_to_its_target(weights, tmp_path):
    """--out LINK -> DIR: the link was replaced by a new folder (DIR kept the old output, a .LINK.old link was
    left); a file output through a link was replaced by a file the same way."""
    from safetensors import safe_open

    from ppap_fast.data.shards import write_json_atomic

    real, link = tmp_path / "real", tmp_path / "link"
    args = ["export-peft", "--experts-dir", str(weights / "ppap5"), "--weights-dir", str(weights)]
    assert main(args + ["--expert", "1", "--out", str(real)]) == 0
    link.symlink_to(real)
    assert main(args + ["--expert", "2", "--out", str(link)]) == 0
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    with safe_open(str(real / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["ppap_fast.expert"] == "2"
    (tmp_path / "stats.json").write_text("{}")
    (tmp_path / "s.json").symlink_to(tmp_path / "stats.json")
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert (tmp_path / "s.json").is_symlink() and json.loads((tmp_path / "stats.json").read_text()) == {"a": 1}


def test_distill_refuses_its_out_before_reading_the_whole_set(weights, tmp_path, capsys, monkeypatch):
    """A wrong --out was refused only after every shard had been read and CRC-checked (minutes on a large set)."""
    from ppap_fast.data import ShardSet

    data, keep = tmp_path / "data", tmp_path / "precious"
    common = ["--weights-dir", str(weights), "--no-progress"]
    assert main(["generate", "--out", str(data), "--num-images", "2", "--steps", "2"] + common) == 0
    keep.mkdir()
    (keep / "notes.txt").write_text("keep")
    read = []
    monkeypatch.setattr(ShardSet, "verify", lambda self, *a, **k: read.append(self) or [])
    assert main(["distill", "--data", str(data), "--steps", "1", "--out", str(keep)] + common) == 2
    assert "refusing to replace" in _err(capsys) and not read


def test_generate_refuses_a_folder_of_other_files(weights, tmp_path, capsys):
    """generate wrote shards, a manifest and a preview into any folder (the weights folder, an experts folder);
    a folder holding files and no data-free set is now refused before any work, and left as it was."""
    out = tmp_path / "experts"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(["generate", "--out", str(out), "--num-images", "2", "--weights-dir", str(weights),
                 "--no-progress"]) == 2
    err = _err(capsys)
    assert "is not empty (config.json)" in err and "manifest.json" in err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_generate_preview_failure_after_a_complete_set_warns_and_exits_0(weights, tmp_path, capsys, monkeypatch):
    """preview.png failing to draw after the last shard made generate exit 2, reporting a complete set as failed."""
    from ppap_fast.data import preview

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(preview, "datafree_preview", broken)
    data = tmp_path / "d"
    assert main(["generate", "--out", str(data), "--num-images", "2", "--shard-size", "2", "--steps", "2",
                 "--weights-dir", str(weights), "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppap-fast: warning: ") and "disk full" in err[0], err
    assert json.loads((data / "manifest.json").read_text())["complete"] is True
