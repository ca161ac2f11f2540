"""PPAP distillation of dense guides: the per-pixel KL and MSE losses against float64 formulas,
a tiny depth teacher (``py:module:factory``) and DeepLabV3 distilled end to end through
``ppap_fast.distributed.distill`` (single process), cached float16 targets, and clear errors."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ppap_fast import distributed as D
from ppap_fast.data import load_shards
from ppap_fast.data.shards import write_npz_atomic
from ppap_fast.distill import DISTILL_LOSSES, dense_mse_loss, distill_loss, kd_loss, pixel_kd_loss

from _util import distill_crashing

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread

REPO = Path(__file__).resolve().parents[1]
GEN = dict(num_images=8, shard_size=4, image_size=8, channels=1, denoiser="random-conv", respacing="ddim5",
           seed=5, device="cpu")

DEPTH_MODULE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class TinyDepth(nn.Module):
        """[B, 1, H, W] images in [-1, 1] -> a positive depth map [B, 1, H, W] (or [B, H, W])."""

        task = "depth"

        def __init__(self, squeeze=False):
            super().__init__()
            self.c1 = nn.Conv2d(1, 6, 3, padding=1)
            self.bn = nn.BatchNorm2d(6)
            self.c2 = nn.Conv2d(6, 1, 3, padding=1)
            self.squeeze = squeeze

        def forward(self, x):
            d = nn.functional.softplus(self.c2(torch.relu(self.bn(self.c1(x)))))
            return d[:, 0] if self.squeeze else d


    def make():
        return TinyDepth()


    def make_hw():  # no task attribute on the factory nor on the module: --teacher-task gives it
        m = TinyDepth(squeeze=True)
        m.task = None
        return m


    def make_other():  # same architecture, other weights
        m = TinyDepth()
        with torch.no_grad():
            m.c1.weight.mul_(0.5)
        return m


    def make_nan():
        m = TinyDepth()
        with torch.no_grad():
            m.c2.bias.fill_(float("nan"))
        return m
''')




@pytest.fixture
def depth_module(tmp_path, monkeypatch):
    """An importable module holding depth factories (any user module works the same way)."""
    d = tmp_path / "pymods"
    d.mkdir()
    (d / "ppap_test_depth.py").write_text(DEPTH_MODULE)
    monkeypatch.syspath_prepend(str(d))
    return "py:ppap_test_depth:make"


# ----------------------------------------------------------------------------- losses vs float64 formulas
def _pixel_kl_ref(s, t, temp):
    s, t = s.double(), t.double()
    p = torch.softmax(t / temp, 1)
    return (p * (torch.log(p) - torch.log_softmax(s, 1))).sum(1).mean()


def test_pixel_kl_and_mse_match_float64_formulas():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 4, 6, generator=g) * 2, torch.randn(3, 5, 4, 6, generator=g) * 2
    for temp in (0.25, 1.0):
        got = pixel_kd_loss(s, t, temp)
        assert got.dtype == torch.float32 and got > 0
        torch.testing.assert_close(got.double(), _pixel_kl_ref(s, t, temp), rtol=1e-5, atol=1e-6)
        assert distill_loss("pixel_kl", s, t, temp) == got
    # zero exactly where softmax(student) == softmax(teacher / T)
    assert pixel_kd_loss(t / 0.25, t, 0.25).abs() < 1e-6
    assert pixel_kd_loss(t, t, 1.0).abs() < 1e-6
    # no spatial dims: the classifier KL (batch mean)
    s2, t2 = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    torch.testing.assert_close(pixel_kd_loss(s2, t2, 0.25), kd_loss(s2, t2, 0.25))
    torch.testing.assert_close(distill_loss("kl", s2, t2, 0.25), kd_loss(s2, t2, 0.25))

    for shape in ((3, 1, 4, 6), (3, 4, 6)):
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        got = dense_mse_loss(a, b)
        torch.testing.assert_close(got.double(), ((a.double() - b.double()) ** 2).mean(), rtol=1e-6, atol=1e-7)
        assert got > 0 and dense_mse_loss(a, a) == 0
        assert distill_loss("mse", a, b, 0.25) == got
    # NaN propagates (the training loop turns it into an error); it never reads as a small loss
    assert torch.isnan(dense_mse_loss(a, b.clone().fill_(float("nan"))))
    assert torch.isnan(pixel_kd_loss(s, t.clone().fill_(float("nan")), 0.25))


def test_loss_errors_name_shapes_and_kinds():
    s = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 2, 2\)"):
        distill_loss("pixel_kl", s, torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 1, 4, 4\)"):
        distill_loss("mse", s, torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="use pixel_kl"):
        distill_loss("kl", s, s)
    with pytest.raises(ValueError, match=r"unknown distillation loss 'l1'.*kl.*pixel_kl.*mse"):
        distill_loss("l1", s, s)
    assert DISTILL_LOSSES == ("kl", "pixel_kl", "mse")


# ----------------------------------------------------------------------------- teachers and configuration
def test_teacher_specs_tasks_and_loss_choice(depth_module, tmp_path, capsys):
    t = D.build_teacher(depth_module)
    assert t.task == "depth" and t.transform is None and t.arch == depth_module
    assert D.build_teacher("py:ppap_test_depth:make_hw").task is None
    assert D.build_teacher("py:ppap_test_depth:make_hw", task="depth").task == "depth"
    # seeded: generation and distillation build the same random teacher; the caller's RNG is untouched
    before = torch.get_rng_state()
    a, b = D.build_teacher(depth_module).model, D.build_teacher(depth_module).model
    assert torch.equal(torch.get_rng_state(), before)
    fp = [D.tensors_fingerprint(sorted(m.state_dict().items())) for m in (a, b)]
    assert fp[0] == fp[1]
    for bad, msg in (("py:ppap_test_depth", "expected py:package.module:factory"),
                     ("py:ppap_test_depth:nothing", "no callable 'nothing'"),
                     ("py:ppap_no_such_module:make", "cannot import 'ppap_no_such_module'")):
        with pytest.raises(ValueError, match=msg):
            D.build_teacher(bad)
    with pytest.raises(ValueError, match="unknown teacher task 'sky'"):
        D.build_teacher(depth_module, task="sky")
    # a tiny file's model kind gives its task and placement (the stroke segmentation net failed as a ResNet)
    from ppap_fast.models.tiny import EpsModel, SegNet, save_model

    seg = D.build_teacher(f"tiny:{save_model(SegNet(width=4, depth=2), tmp_path / 'seg.safetensors')}")
    assert seg.task == "segmentation" and seg.placement(r=2, alpha=2.0).rule == "generic"
    with pytest.raises(ValueError, match="tiny 'unet' model"):
        D.build_teacher(f"tiny:{save_model(EpsModel(), tmp_path / 'unet.safetensors')}")

    cfg = D.DistillConfig("d", "o", depth_module)
    assert D.resolve_loss(cfg, "depth") == "mse"
    assert D.resolve_loss(cfg, "segmentation") == "pixel_kl"
    assert D.resolve_loss(cfg, "classification") == "kl"
    assert D.resolve_loss(dataclasses.replace(cfg, loss="pixel_kl"), "depth") == "pixel_kl"  # override
    with pytest.raises(ValueError, match="unknown distillation loss 'huber'"):
        D.resolve_loss(dataclasses.replace(cfg, loss="huber"), "depth")
    with pytest.raises(ValueError, match="task of teacher .* is unknown: pass --teacher-task"):
        D.resolve_loss(cfg, None)

    a = D._parser().parse_args(["distill", "--data", "d", "--out", "o", "--teacher", depth_module, "--loss", "mse",
                                "--teacher-task", "depth", "--checkpoint-every", "7"])
    c = D.config_from_args(a)
    assert (c.loss, c.teacher_task, c.checkpoint_every, c.n_experts) == ("mse", "depth", 7, 5)
    with pytest.raises(SystemExit) as e:
        D._parser().parse_args(["distill", "--data", "d", "--out", "o", "--teacher", "x", "--loss", "huber"])
    assert e.value.code == 2 and "argument --loss: invalid choice: 'huber'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end
def _depth_cfg(data, out, teacher, **kw):
    base = dict(n_experts=2, r=2, alpha=2.0, steps=40, batch_size=8, lr=0.03, warmup=1, weight_decay=0.0,
                device="cpu")
    return D.DistillConfig(str(data), str(out), teacher, **{**base, **kw})


def test_depth_teacher_cached_float16_targets_and_loss_decreases(tmp_path, depth_module):
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), **GEN, teacher=depth_module), D.DistEnv())
    cached = load_shards(data)
    assert "logits" not in cached and cached["targets"].dtype == np.float16
    assert cached["targets"].shape == (8, 1, 8, 8)
    teacher = D.build_teacher(depth_module).model
    with torch.no_grad():
        x = torch.from_numpy(cached["images"].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
        ref = teacher(x).half()
    assert torch.equal(torch.from_numpy(cached["targets"]), ref)
    man = json.loads((data / "manifest.json").read_text())
    assert man["config"]["teacher_state"] == D.tensors_fingerprint(sorted(teacher.state_dict().items()))

    bank = D.distill(_depth_cfg(data, tmp_path / "out", depth_module), D.DistEnv())
    s = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert s["loss"] == "mse" and s["targets"] == "cached" and s["config"]["loss"] == "mse"
    assert s["config"]["teacher_task"] == "depth" and s["resumed_from_step"] == 0
    losses = np.array(s["losses"])
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.5 * losses[:10].mean(), losses   # about 0.22 on 3 seeds
    assert bank.arch == depth_module and not bank.training

    # the same set without cached targets: computed once up front (rounded to float16 like the cache)
    plain = tmp_path / "plain"
    D.generate(D.GenerateConfig(str(plain), **GEN), D.DistEnv())
    cfg = _depth_cfg(plain, tmp_path / "out2", "py:ppap_test_depth:make_hw", teacher_task="depth", steps=2)
    D.distill(cfg, D.DistEnv())
    s2 = json.loads((tmp_path / "out2" / "train_summary.json").read_text())
    assert s2["targets"] == "computed" and s2["loss"] == "mse" and len(s2["losses"]) == 2
    # the loss choice is part of the configuration identity
    D.distill(dataclasses.replace(cfg, loss="pixel_kl", out_dir=str(tmp_path / "out3")), D.DistEnv())
    s3 = json.loads((tmp_path / "out3" / "train_summary.json").read_text())
    assert s3["loss"] == "pixel_kl" and s3["config_hash"] != s2["config_hash"]
    with pytest.raises(ValueError, match="task of teacher .* is unknown"):
        D.distill(dataclasses.replace(cfg, teacher_task=None), D.DistEnv())


def test_cached_targets_of_wrong_shape_or_other_teacher_raise(tmp_path, depth_module):
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), **GEN, teacher=depth_module), D.DistEnv())
    # another teacher (other weights) into the same set: refused, naming the state fingerprint
    with pytest.raises(D.DistributedRunError, match="another configuration.*teacher_state"):
        D.generate(D.GenerateConfig(str(data), **GEN, teacher="py:ppap_test_depth:make_other"), D.DistEnv())
    # another teacher than the one that filled the cache: refused before training
    with pytest.raises(D.DistributedRunError, match="computed by another teacher"):
        D.distill(_depth_cfg(data, tmp_path / "o1", "py:ppap_test_depth:make_other", steps=1), D.DistEnv())
    # same weights, but a [B, H, W] output: the first step names both shapes
    with pytest.raises(ValueError, match=r"student's output has shape \(8, 8, 8\).*targets have shape \(8, 1, 8, 8\)"):
        D.distill(_depth_cfg(data, tmp_path / "o1", "py:ppap_test_depth:make_hw", teacher_task="depth", steps=1),
                  D.DistEnv())
    # targets at another resolution (same teacher state): the first step names both shapes
    for k in (0, 1):
        p = data / f"shard_{k:05d}.npz"
        with np.load(p) as z:
            arrays = {n: z[n] for n in z.files}
        arrays["targets"] = arrays["targets"][:, :, ::2, ::2].copy()
        write_npz_atomic(p, **arrays)
    with pytest.raises(ValueError, match=r"output has shape \(8, 1, 8, 8\).*targets have shape \(8, 1, 4, 4\)"):
        D.distill(_depth_cfg(data, tmp_path / "o2", depth_module, steps=1), D.DistEnv())
    assert not (tmp_path / "o2" / "experts.safetensors").exists()


def test_nonfinite_teacher_or_loss_is_an_error(tmp_path, depth_module):
    data = tmp_path / "data"
    with pytest.raises(ValueError, match="not all finite"):
        D.generate(D.GenerateConfig(str(data), **GEN, teacher="py:ppap_test_depth:make_nan"), D.DistEnv())
    plain = tmp_path / "plain"
    D.generate(D.GenerateConfig(str(plain), **GEN), D.DistEnv())
    with pytest.raises(D.DistributedRunError, match="not all finite"):
        D.distill(_depth_cfg(plain, tmp_path / "o", "py:ppap_test_depth:make_nan", steps=1), D.DistEnv())
    # NaN hidden in a cached set: the loss check stops training at the first step
    data = tmp_path / "cached"
    D.generate(D.GenerateConfig(str(data), **GEN, teacher=depth_module), D.DistEnv())
    for k in (0, 1):
        p = data / f"shard_{k:05d}.npz"
        with np.load(p) as z:
            arrays = {n: z[n] for n in z.files}
        arrays["targets"][:] = np.nan
        write_npz_atomic(p, **arrays)
    with pytest.raises(D.DistributedRunError, match="loss is nan at step 0"):
        D.distill(_depth_cfg(data, tmp_path / "o3", depth_module, steps=3, batch_size=8), D.DistEnv())


def test_deeplabv3_segmentation_distillation_end_to_end(tmp_path):
    """Registry DeepLabV3 (random init, nothing downloaded) at 32x32: per-pixel KL, targets computed once."""
    data = tmp_path / "data"
    D.generate(D.GenerateConfig(str(data), **{**GEN, "num_images": 4, "shard_size": 4, "image_size": 32,
                                               "channels": 3}), D.DistEnv())
    cfg = D.DistillConfig(str(data), str(tmp_path / "out"), "deeplabv3_resnet50", n_experts=2, r=2, alpha=2.0,
                          steps=2, batch_size=2, lr=1e-2, warmup=1, weight_decay=0.0, device="cpu")
    bank = D.distill(cfg, D.DistEnv())
    s = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert s["loss"] == "pixel_kl" and s["config"]["teacher_task"] == "segmentation" and s["targets"] == "computed"
    assert len(s["losses"]) == 2 and all(np.isfinite(s["losses"])) and min(s["losses"]) > 0
    lora_b = [v for k, v in bank.per_expert_state_dict().items() if k.endswith(("lora_B", "lora_b"))]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA did not train"
    assert (tmp_path / "out" / "experts.safetensors").is_file()


# ----------------------------------------------------------------------------- sets larger than memory
RSS_CHILD = textwrap.dedent('''
    import dataclasses, json, sys
    import torch
    from ppap_fast import distributed as D


    def status(key):  # kB -> bytes; VmHWM is this process's peak RSS (ru_maxrss can be inherited from the parent)
        return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) * 1024


    torch.set_num_threads(1)
    data, small, out, teacher = sys.argv[1:5]
    cfg = D.DistillConfig(data, out, teacher, n_experts=2, r=2, alpha=2.0, steps=10, batch_size=16, lr=1e-2,
                          warmup=1, device="cpu")
    # warm-up on a one-shard set: imports, lazy kernels, allocator pools are not data
    D.distill(dataclasses.replace(cfg, data_dir=small, out_dir=out + "_warm", steps=2), D.DistEnv())
    base = status("VmRSS")
    try:  # reset the peak to the current RSS (Linux >= 4.0); without it the peak includes the warm-up's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    D.distill(cfg, D.DistEnv())
    print(json.dumps({"base": base, "peak": status("VmHWM")}))
''')


RSS_TEACHER = textwrap.dedent('''
    import torch.nn as nn


    def make():  # 64x64x3 -> a 2-channel "depth" map
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))


    make.task = "depth"
''')


def _write_set(d, n, shard, rng):
    from ppap_fast.data.shards import write_json_atomic

    names = []
    for k in range(-(-n // shard)):
        c = min(shard, n - k * shard)
        names.append(write_npz_atomic(d / f"shard_{k:05d}.npz",
                                      images=rng.integers(0, 256, (c, 64, 64, 3), dtype=np.uint8),
                                      targets=rng.standard_normal((c, 2, 64, 64)).astype(np.float16)).name)
    write_json_atomic(d / "manifest.json", {"num_images": n, "shard_size": shard, "num_shards": len(names),
                                            "complete": True, "shards": names})
    return sum((d / s).stat().st_size for s in names)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_distillation_memory_does_not_grow_with_the_set(tmp_path):
    """4000 images 64x64x3 + float16 targets 2x64x64 (110 MiB of shards), batch 16: the peak RSS of a
    distillation stays within 40% of the set's size above a warmed-up process: measured 25 MiB; reading
    the set into memory (before ShardSet) grew it by 489 MiB."""
    rng = np.random.default_rng(0)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "ppap_rss_teacher.py").write_text(RSS_TEACHER)
    size = _write_set(tmp_path / "big", 4000, 250, rng)
    _write_set(tmp_path / "small", 64, 64, rng)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "mods"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "big"), str(tmp_path / "small"),
                        str(tmp_path / "out"), "py:ppap_rss_teacher:make"], env=env, capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    growth = got["peak"] - got["base"]
    assert size > 100 << 20
    assert growth < 0.4 * size, f"peak RSS grew by {growth / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB set"
    s = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert s["targets"] == "cached" and len(s["losses"]) == 10 and np.isfinite(s["losses"]).all()


def test_computed_targets_live_on_disk_and_survive_a_crash(tmp_path, depth_module, monkeypatch):
    """No cached targets: the teacher's outputs go to <out>/teacher_targets/ (one file per shard, what
    generate --teacher caches with the same micro-batch), a restart reuses them (a damaged one is
    redone), and they are removed once the experts are written."""
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    D.generate(D.GenerateConfig(str(cached), **GEN, teacher=depth_module), D.DistEnv())
    D.generate(D.GenerateConfig(str(plain), **GEN), D.DistEnv())
    want = load_shards(cached)["targets"]
    out = tmp_path / "out"
    cfg = _depth_cfg(plain, out, depth_module, steps=4, batch_size=4, checkpoint_every=2)
    distill_crashing(monkeypatch, cfg, steps=3)
    tdir = out / D.TARGETS_DIR
    files = sorted(tdir.glob("targets_*.npz"))
    assert [f.name for f in files] == ["targets_00000.npz", "targets_00001.npz"]
    got = np.concatenate([np.load(f)["targets"] for f in files])
    assert got.dtype == np.float16 and np.array_equal(got, want)
    files[1].write_bytes(files[1].read_bytes()[:50])  # damaged: recomputed on restart
    D.distill(cfg, D.DistEnv())
    s = json.loads((out / "train_summary.json").read_text())
    assert s["targets"] == "computed" and s["resumed_from_step"] == 2 and len(s["losses"]) == 4
    assert not tdir.exists()  # finished: removed with the training state
    # the cached set gives the same run (same targets, same batches)
    ref = tmp_path / "ref"
    D.distill(_depth_cfg(cached, ref, depth_module, steps=4, batch_size=4), D.DistEnv())
    assert json.loads((ref / "train_summary.json").read_text())["losses"] == s["losses"]


def test_computed_targets_of_another_teacher_are_not_reused(tmp_path, depth_module, monkeypatch):
    plain = tmp_path / "plain"
    D.generate(D.GenerateConfig(str(plain), **GEN), D.DistEnv())
    out = tmp_path / "out"
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_AFTER_STEPS", "1")
    monkeypatch.setenv("PPAP_FAST_TEST_KILL_SCOPE", "raise")
    with pytest.raises(D.SimulatedCrash):
        D.distill(_depth_cfg(plain, out, "py:ppap_test_depth:make_other", steps=2, batch_size=4), D.DistEnv())
    tdir = out / D.TARGETS_DIR
    other = np.load(tdir / "targets_00000.npz")["targets"]
    with pytest.raises(D.SimulatedCrash):  # another teacher into the same --out: its files are replaced
        D.distill(_depth_cfg(plain, out, depth_module, steps=2, batch_size=4), D.DistEnv())
    mine = np.load(tdir / "targets_00000.npz")["targets"]
    assert not np.array_equal(mine, other)
    teacher = D.build_teacher(depth_module).model
    with torch.no_grad():
        x = torch.from_numpy(load_shards(plain)["images"][:4].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
        assert torch.equal(torch.from_numpy(mine), teacher(x).half())
    # the same teacher again: complete files are reused as they are
    stamp = {f.name: f.stat().st_mtime_ns for f in tdir.glob("targets_*.npz")}
    with pytest.raises(D.SimulatedCrash):
        D.distill(_depth_cfg(plain, out, depth_module, steps=2, batch_size=4), D.DistEnv())
    assert {f.name: f.stat().st_mtime_ns for f in tdir.glob("targets_*.npz")} == stamp


def test_rerun_with_another_configuration_keeps_the_resumable_runs_targets(tmp_path, depth_module, monkeypatch):
    """A rerun into the same --out with other arguments is refused because of the training state;
    it must be refused BEFORE it replaces the interrupted run's computed teacher outputs (hours of
    teacher passes on a large set), so the real resume finds them intact."""
    plain = tmp_path / "plain"
    D.generate(D.GenerateConfig(str(plain), **GEN), D.DistEnv())
    out = tmp_path / "out"
    distill_crashing(monkeypatch, _depth_cfg(plain, out, depth_module, steps=4, batch_size=4, checkpoint_every=2),
                     steps=3)
    tdir = out / D.TARGETS_DIR
    stamp = {f.name: f.stat().st_mtime_ns for f in tdir.iterdir()}
    assert (out / D.TRAIN_STATE).exists() and stamp
    with pytest.raises(D.DistributedRunError, match="another configuration"):
        D.distill(_depth_cfg(plain, out, "py:ppap_test_depth:make_other", steps=4, batch_size=4,
                             checkpoint_every=2), D.DistEnv())
    assert {f.name: f.stat().st_mtime_ns for f in tdir.iterdir()} == stamp
